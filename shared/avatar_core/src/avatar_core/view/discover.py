"""What there is to look at under a path: results, runs' training logs and dataset avatars, found by file rules.

The rules are generic, so a method's outputs are found by what they contain, not by which method wrote them:

* a folder with a 3DGS PLY is a splat result (``avatar.ply``, ``canonical.ply``, ``point_cloud.ply``, ... or any
  PLY with the 3DGS properties); PLYs named ``<motion>_<NNN>.ply`` are the frames of a motion;
* a folder with ``triplane.safetensors`` is a triplane result, and so is every ``.safetensors`` in a ``triplanes/``
  folder (fitted triplanes, one file per avatar);
* a folder with ``frames/*.png`` or a video (``.mp4``, ``.gif``) is a clip;
* a folder with ``meta.json`` and avatar folders (``avatars/NNNNNN/``) holding ``attributes.json`` is a dataset,
  each avatar one entry with its caption, views and portrait;
* a ``metrics.jsonl`` anywhere is a training log.

Beside that a result may have a reference image (``reference.png``, ``input.png``, ``portrait.png``, ...), a
thumbnail (``preview.png``, ``views.png``), views (``views/*.png``) and ``settings.json`` with its prompt; a
``settings.json`` with ``"kind": "edit"`` and a ``source`` makes it an edit of that source (before / after).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avatar_core.errors import CorruptFileError, MissingFileError

__all__ = ["Result", "Found", "discover", "LOOKED_FOR"]

MAIN_PLYS = ("avatar.ply", "canonical.ply", "point_cloud.ply", "splats.ply", "gaussians.ply", "body_avatar.ply")
REFERENCE_IMAGES = ("reference.png", "reference.jpg", "input.png", "input.jpg", "image.png", "portrait.png",
                    "ref.png", "condition.png")
THUMBNAILS = ("preview.png", "views.png", "thumbnail.png", "preview.jpg")
VIDEOS = (".mp4", ".gif", ".webm")
SKIP_DIRS = {"checkpoints", "__pycache__", "cache", ".cache", "wandb"}
MAX_DEPTH = 6

#: What discovery looks for, as said when a path holds none of it.
LOOKED_FOR = ("a 3DGS .ply (x y z f_dc_* opacity scale_* rot_*)", "triplane.safetensors",
              "frames/*.png or a video (.mp4/.gif)", "a dataset folder (meta.json + avatar folders)",
              "metrics.jsonl")

_FRAME = re.compile(r"^(?P<motion>.+?)_(?P<index>\d{3,})\.ply$")


@dataclass
class Result:
    """One thing to show: a splat avatar, a triplane, a clip, or an avatar of a dataset."""

    name: str  # relative to the path the viewer was opened on
    path: Path  # its folder
    kind: str  # "splats" | "triplane" | "clip" | "dataset"
    ply: Path | None = None
    motions: dict[str, list[Path]] = field(default_factory=dict)  # motion name -> posed PLY frames in order
    triplane: Path | None = None
    frames: list[Path] = field(default_factory=list)  # clip frames (frames/*.png)
    views: list[Path] = field(default_factory=list)  # still views (views/*.png)
    videos: list[Path] = field(default_factory=list)
    reference: Path | None = None
    thumbnail: Path | None = None
    prompt: str | None = None
    source: Path | None = None  # the folder this result is an edit of
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def animatable(self) -> bool:
        return bool(self.motions)


@dataclass
class Found:
    root: Path
    results: list[Result]
    metrics: list[Path]  # metrics.jsonl files
    skipped: list[str]  # files that looked viewable but are not, with the reason

    def by_path(self, path: Path) -> Result | None:
        path = path.resolve()
        return next((r for r in self.results if r.path.resolve() == path), None)

    def edits_of(self, result: Result) -> list[Result]:
        return [r for r in self.results if r.source is not None and r.source.resolve() == result.path.resolve()]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_splat_ply(path: Path) -> tuple[bool, str]:
    """Whether ``path`` is a 3DGS PLY; else the reason (the missing properties)."""
    from avatar_core.io.ply import read_ply_header

    try:
        head = read_ply_header(path)
    except (CorruptFileError, MissingFileError, OSError) as err:
        return False, str(err)
    if head.missing:
        return False, f"{path.name} is not a 3DGS file: it lacks {', '.join(head.missing)}"
    return True, ""


def _pngs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def _first(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _result_in(folder: Path, root: Path, skipped: list[str]) -> Result | None:
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    plys, motions = [], {}
    for name in sorted(files):
        if not name.lower().endswith(".ply"):
            continue
        ok, why = is_splat_ply(files[name])
        if not ok:
            skipped.append(f"{files[name]}: {why}")
            continue
        m = _FRAME.match(name)
        if m and name not in MAIN_PLYS:
            motions.setdefault(m["motion"], []).append(files[name])
        else:
            plys.append(files[name])
    for frames in motions.values():
        frames.sort(key=lambda p: int(_FRAME.match(p.name)["index"]))
    ply = next((files[n] for n in MAIN_PLYS if files.get(n) in plys), plys[0] if plys else None)
    if ply is None and motions:  # only posed frames: the first frame of the first motion stands for the avatar
        ply = next(iter(motions.values()))[0]
    triplane = files.get("triplane.safetensors")
    frames = _pngs(folder / "frames")
    videos = sorted(p for p in files.values() if p.suffix.lower() in VIDEOS)
    if ply is None and triplane is None and not frames and not videos:
        return None
    settings = _read_json(files["settings.json"]) if "settings.json" in files else {}
    kind = "splats" if ply is not None else "triplane" if triplane is not None else "clip"
    reference = _first(folder, REFERENCE_IMAGES)
    for key in ("reference", "input_image", "image", "portrait"):  # a reference named by the settings
        value = settings.get(key)
        if reference is None and isinstance(value, str) and Path(value).is_file():
            reference = Path(value)
    source = settings.get("source") if settings.get("kind") == "edit" else None
    if isinstance(source, str):
        source = Path(source)
        source = source.parent if source.suffix else source
    else:
        source = None
    views = _pngs(folder / "views")
    thumbnail = _first(folder, THUMBNAILS) or reference or (frames[0] if frames else views[0] if views else None)
    prompt = settings.get("prompt") or settings.get("caption") or settings.get("text")
    name = "." if folder == root else folder.relative_to(root).as_posix()
    return Result(name=name, path=folder, kind=kind, ply=ply, motions=motions, triplane=triplane, frames=frames,
                  views=views, videos=videos, reference=reference, thumbnail=thumbnail,
                  prompt=prompt if isinstance(prompt, str) else None, source=source, settings=settings)


def _dataset(folder: Path, root: Path) -> list[Result]:
    out = []
    holder = folder / "avatars" if (folder / "avatars").is_dir() else folder
    for folder in sorted(p for p in holder.iterdir() if p.is_dir() and (p / "attributes.json").is_file()):
        attrs = _read_json(folder / "attributes.json")
        views = _pngs(folder / "views")
        portrait = folder / "portrait.png"
        name = folder.name if holder in (root, root / "avatars") else folder.relative_to(root).as_posix()
        out.append(Result(name=name, path=folder, kind="dataset", views=views,
                          reference=portrait if portrait.is_file() else None,
                          thumbnail=portrait if portrait.is_file() else (views[0] if views else None),
                          prompt=attrs.get("caption") if isinstance(attrs.get("caption"), str) else None,
                          settings=attrs))
    return out


def discover(path: str | os.PathLike) -> Found:
    """Every result, training log and dataset avatar under ``path`` (a result, a run, a dataset, or one file)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise MissingFileError(f"nothing at {root}", "pass a result folder, a run folder, a dataset folder or a .ply")
    skipped: list[str] = []
    if root.is_file():
        if root.suffix.lower() == ".ply":
            ok, why = is_splat_ply(root)
            if not ok:
                raise CorruptFileError(why, "pass a Gaussian splat PLY (the 3DGS layout save_ply writes)")
            return Found(root.parent, [Result(name=root.name, path=root.parent, kind="splats", ply=root)], [], [])
        if root.suffix.lower() in VIDEOS:
            return Found(root.parent, [Result(name=root.name, path=root.parent, kind="clip", videos=[root])], [], [])
        if root.name == "metrics.jsonl":
            return Found(root.parent, [], [root], [])
        if root.suffix == ".safetensors":
            return Found(root.parent, [Result(name=root.name, path=root.parent, kind="triplane", triplane=root)],
                         [], [])
        raise MissingFileError(f"{root} is not viewable", f"the viewer opens folders or files with: "
                               f"{'; '.join(LOOKED_FOR)}")
    results: list[Result] = []
    metrics: list[Path] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        depth = len(here.relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS and depth < MAX_DEPTH)
        if "metrics.jsonl" in files:
            metrics.append(here / "metrics.jsonl")
        if "meta.json" in files and ((here / "avatars").is_dir() or any((here / d / "attributes.json").is_file()
                                                                         for d in dirs)):
            results += _dataset(here, root)  # a dataset (possibly inside a run): its avatars, not walked further
            dirs[:] = []
            continue
        if here.name == "triplanes":  # a method's fitted triplanes, one file per avatar
            results += [Result(name=(here / f).relative_to(root).with_suffix("").as_posix(), path=here,
                               kind="triplane", triplane=here / f) for f in sorted(files) if f.endswith(".safetensors")]
            continue
        res = _result_in(here, root, skipped)
        if res is not None:
            results.append(res)
            dirs[:] = [d for d in dirs if d not in ("frames", "views")]
    return Found(root, results, sorted(metrics), skipped)
