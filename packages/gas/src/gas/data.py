"""GAS's data: the synthetic clips (train / held-out split), posed-body states of a clip, the cached NeRF renders.

Clips come from :mod:`avatar_core.data.clips` (any video method can read them). The NeRF renders of every frame
of a clip, made from the clip's reference image once stage 1 is trained, are cached beside the clips in
``<run>/nerf_renders/<clip>.safetensors`` together with the stage-1 checkpoint they came from; a newer
checkpoint invalidates the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from avatar_core.data.clips import Clip, list_clips, load_clip, write_clips
from avatar_core.errors import InputError
from avatar_core.io import load_tensors, save_tensors
from gas.body_warp import BodyWarp, PosedAnchors


def clips_dir(cfg: Any) -> Path:
    return Path(cfg.data.clips) if cfg.data.clips else Path(cfg.run) / "clips"


def ensure_clips(cfg: Any, progress: bool = True) -> Path:
    """The run's clip folder, written when missing (resumes a partial one)."""
    root = clips_dir(cfg)
    d = cfg.data
    if not (root / "meta.json").is_file() or len(list_clips(root)) < 2 * d.num_avatars:
        write_clips(root, d.num_avatars, d.frames, res=d.res, seed=d.seed, uv_res=d.uv_res, progress=progress)
    return root


def split(cfg: Any, root: Path, kind: str | None = None) -> tuple[list[Path], list[Path]]:
    """(training clips, held-out clips): held-out clips are those of the last ``held_out`` avatars."""
    clips = list_clips(root, kind)
    avatars = sorted({int(p.name.split("_")[0]) for p in clips})
    if len(avatars) <= cfg.data.held_out:
        raise InputError(f"{len(avatars)} avatars cannot leave {cfg.data.held_out} held out",
                         "raise data.num_avatars or lower data.held_out")
    held = set(avatars[len(avatars) - cfg.data.held_out:])
    return ([p for p in clips if int(p.name.split("_")[0]) not in held],
            [p for p in clips if int(p.name.split("_")[0]) in held])


def kind_of(path: Path) -> str:
    return path.name.rsplit("_", 1)[-1]


@dataclass
class ClipBodies:
    """Posed anchors of a clip: reference, big pose and one per frame."""

    ref: PosedAnchors
    big: PosedAnchors
    frames: list[PosedAnchors]


def clip_bodies(warp: BodyWarp, clip: Clip) -> ClipBodies:
    transl = clip.transl[0]
    ref = warp.pose(clip.shape, clip.ref_pose, None, transl)
    big = warp.pose(clip.shape, warp.big_pose(clip.shape), None, transl)
    if clip.kind == "view":
        frames = [ref] * clip.num_frames
    else:
        frames = [warp.pose(clip.shape, clip.pose[k], clip.global_orient[k], clip.transl[k])
                  for k in range(clip.num_frames)]
    return ClipBodies(ref, big, frames)


def dataset_sources(cfg: Any) -> list[Path]:
    """Avatar folders of a kernel multi-view dataset (``data.dataset``) for stage 1, the last ``held_out`` left out."""
    if not cfg.data.dataset:
        return []
    from avatar_core.data.datasets import AvatarDataset

    dirs = AvatarDataset(cfg.data.dataset).dirs
    return dirs[: max(len(dirs) - cfg.data.held_out, 0)]


def clip_from_avatar(avatar_dir: Path, body) -> Clip:
    """A dataset avatar (views on an orbit, one pose) as a view clip: view 0 is the reference, every view a frame."""
    from avatar_core.cameras import Cameras
    from avatar_core.io import load_image, load_json
    from avatar_core.render.conditions import normal_map

    cams = load_json(avatar_dir / "cameras.json")
    views = cams["views"]
    rgba = torch.stack([load_image(avatar_dir / v["file"]) for v in views])
    W, H = int(cams["width"]), int(cams["height"])
    cameras = Cameras(torch.tensor([v["viewmat"] for v in views]), torch.tensor([v["K"] for v in views]), W, H)
    b, _ = load_tensors(avatar_dir / "body.safetensors")
    T = len(views)
    with torch.no_grad():
        verts = body.forward(shape=b["shape"][None], pose=b["pose"][None], global_orient=b["global_orient"][None],
                             transl=b["transl"][None]).vertices[0]
        normals = normal_map(verts, body, cameras, space="camera_opengl")
    return Clip("view", int(avatar_dir.name), rgba, normals, cameras, b["shape"], b["pose"][None].expand(T, -1, -1),
                b["global_orient"][None].expand(T, 3), b["transl"][None].expand(T, 3), rgba[0], normals[0],
                cameras[0:1], b["pose"])


class ClipStore:
    """Clips loaded once per process (small at tiny scale; paper-scale runs stream them)."""

    def __init__(self, warp: BodyWarp):
        self.warp = warp
        self._clips: dict[str, tuple[Clip, ClipBodies]] = {}

    def get(self, path: Path) -> tuple[Clip, ClipBodies]:
        key = str(path)
        if key not in self._clips:
            path = Path(path)
            clip = clip_from_avatar(path, self.warp.body) if (path / "cameras.json").is_file() else load_clip(path)
            self._clips[key] = (clip, clip_bodies(self.warp, clip))
        return self._clips[key]


def on_white(rgba: Tensor) -> Tensor:  # [..., 4] -> [..., 3]
    """Composite straight-alpha RGBA over white (the video model's images)."""
    return rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])


def premultiplied_on_white(rgb: Tensor, alpha: Tensor) -> Tensor:
    """Composite a premultiplied (black-background) render over white."""
    return rgb + (1 - alpha)


# ------------------------------------------------------------------------------------------------ render cache
def render_cache_path(cfg: Any, clip_path: Path) -> Path:
    return Path(cfg.run) / "nerf_renders" / f"{clip_path.name}.safetensors"


def save_render(path: Path, rgb: Tensor, alpha: Tensor, source: str) -> None:
    save_tensors(path, {"rgb": rgb.contiguous(), "alpha": alpha.contiguous()}, metadata={"nerf": source})


def load_render(path: Path, source: str | None = None) -> tuple[Tensor, Tensor] | None:
    """A cached render (rgb premultiplied [T, H, W, 3], alpha [T, H, W, 1]) or None when absent or stale."""
    if not path.is_file():
        return None
    t, meta = load_tensors(path)
    if source is not None and meta.get("nerf") != source:
        return None
    return t["rgb"], t["alpha"]
