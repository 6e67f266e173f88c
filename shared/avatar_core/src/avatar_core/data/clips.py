"""Synthetic video clips of the synthetic avatars: novel-view orbits and novel-pose motions (any video method).

A clip starts from a *reference* frame (the avatar in its dataset pose, seen from a reference camera) and has
``T`` frames: a **view** clip keeps the reference pose and moves the camera on an orbit that starts at the
reference view; a **pose** clip keeps the reference camera and drives the body through a motion (a pose sequence
``[T, J-1, 3]`` or ``[T, J-1, 3, 3]`` in the kernel's convention, a built-in of :mod:`avatar_core.body.motions`,
or by default per avatar one of :data:`DEFAULT_MOTIONS`). Every frame has its RGBA render, camera,
body parameters and body normal map (camera space, OpenGL axes, in [0, 1]).

The appearance, body and renders come from :class:`~avatar_core.data.generate.AvatarGenerator` and
:func:`~avatar_core.data.generate.render_textured`, so clip avatar ``i`` is dataset avatar ``i`` of the same
settings. Layout of a clip folder::

    meta.json                    settings, format, clip list
    clips/000000_view/clip.safetensors   rgba [T,H,W,4] u8, normals [T,H,W,3] u8, ref_rgba, ref_normals,
                                         viewmats [T,4,4], Ks [T,3,3], ref_viewmat, ref_K, shape, pose [T],
                                         global_orient [T], transl [T], ref_pose (+ metadata: kind, avatar)
    clips/000000_view/preview.png        reference + frames strip
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avatar_core.body import BodyModel
from avatar_core.cameras import Cameras, orbit_cameras
from avatar_core.data.generate import AvatarGenerator, default_settings, render_textured
from avatar_core.data.poses import build_pose, sample_pose_params
from avatar_core.errors import ConfigError, CorruptFileError, InputError, MissingFileError
from avatar_core.io import image_grid, load_tensors, save_image, save_json, save_tensors
from avatar_core.io.tensors import fsync_dir

__all__ = ["CLIP_KINDS", "CLIP_FORMAT", "DEFAULT_MOTIONS", "Clip", "ClipMaker", "write_clips", "load_clip", "list_clips",
           "interpolated_motion"]

CLIP_FORMAT = "avatar_core.synthetic_clips/1"
CLIP_KINDS = ("view", "pose")
#: Motions of the pose clips when none is given, cycled by avatar index: the kernel's built-ins and an
#: interpolation between the avatar's pose and another sampled natural pose.
DEFAULT_MOTIONS = ("interpolated", "walk", "wave")


@dataclass
class Clip:
    """One clip in memory; images float in [0, 1], channels last."""

    kind: str  # "view" or "pose"
    avatar: int
    rgba: Tensor  # [T, H, W, 4]
    normals: Tensor  # [T, H, W, 3] camera-space (OpenGL axes) normals encoded (n + 1) / 2, 0 off-body
    cameras: Cameras  # T cameras
    shape: Tensor  # [S]
    pose: Tensor  # [T, J-1, 3] axis-angle or [T, J-1, 3, 3] rotation matrices
    global_orient: Tensor  # [T, 3]
    transl: Tensor  # [T, 3]
    ref_rgba: Tensor  # [H, W, 4]
    ref_normals: Tensor  # [H, W, 3]
    ref_camera: Cameras  # 1 camera
    ref_pose: Tensor  # [J-1, 3]

    @property
    def num_frames(self) -> int:
        return self.rgba.shape[0]


def interpolated_motion(body: BodyModel, shape: Tensor, start: dict[str, float], end: dict[str, float],
                        frames: int) -> Tensor:  # [T, J-1, 3]
    """Poses along a smooth (cosine-eased) interpolation of the pose library's joint angles from start to end."""
    keys = sorted(set(start) | set(end))
    out = []
    for k in range(frames):
        a = 0.5 - 0.5 * math.cos(math.pi * k / max(frames - 1, 1))
        out.append(build_pose(body, shape, {key: (1 - a) * start.get(key, 0.0) + a * end.get(key, 0.0)
                                            for key in keys}))
    return torch.stack(out)


class ClipMaker:
    """Makes the clips of avatar ``i`` (same avatar as dataset avatar ``i`` for the same settings)."""

    def __init__(self, settings: dict[str, Any], body: BodyModel | None = None):
        self.settings = settings
        self.gen = AvatarGenerator(settings, body)
        self.body = self.gen.body

    def _avatar(self, index: int) -> dict[str, Any]:
        data = self.gen.make(index)
        data["texture_f"] = torch.from_numpy(data["texture"]).float() / 255.0
        return data

    def _render(self, vertices: Tensor, texture: Tensor, cameras: Cameras) -> tuple[Tensor, Tensor]:
        """RGBA [C,H,W,4] and normals [C,H,W,3] of posed meshes (one mesh [V,3] or one per camera [C,V,3])."""
        from avatar_core.render.conditions import normal_map

        if vertices.ndim == 2:
            rgba = render_textured(vertices, self.body.faces, self.gen.uv_corners, texture, cameras)
            normals = normal_map(vertices, self.body, cameras, space="camera_opengl")
            return rgba, normals
        rgbas, normals = [], []
        for c in range(len(cameras)):
            r, n = self._render(vertices[c], texture, cameras[c:c + 1])
            rgbas.append(r)
            normals.append(n)
        return torch.cat(rgbas), torch.cat(normals)

    def reference_camera(self, azimuth_deg: float = 0.0) -> Cameras:
        s = self.settings
        return orbit_cameras(1, radius=s["camera_radius"], elevation_deg=s["elevation_deg"], fov_deg=s["fov_deg"],
                             width=s["res"], height=s["res"], start_azimuth=azimuth_deg)

    def named_motion(self, name: str, index: int, shape: Tensor, data: dict[str, Any], frames: int) -> Tensor:
        """``"interpolated"`` (from the avatar's pose to another sampled natural pose) or a kernel built-in."""
        if name == "interpolated":
            rng = np.random.default_rng([int(self.settings["seed"]), int(index), 7])
            start = data["attributes"].get("pose_params_deg", {})
            return interpolated_motion(self.body, shape, start, sample_pose_params(rng), frames)
        from avatar_core.body.motions import builtin_motion

        return builtin_motion(self.body, name, frames)

    def make(self, index: int, kind: str, frames: int, motion: Tensor | str | None = None,
             ref_azimuth_deg: float = 0.0) -> Clip:
        """A ``kind`` clip of avatar ``index`` with ``frames`` frames; ``motion [T, J-1, 3]`` drives a pose clip."""
        if kind not in CLIP_KINDS:
            raise InputError(f"unknown clip kind {kind!r}", f"use one of {CLIP_KINDS}")
        if frames < 1:
            raise InputError(f"a clip needs at least one frame, got {frames}", "pass frames >= 1")
        data = self._avatar(index)
        b = data["body"]
        shape, ref_pose, transl = b["shape"], b["pose"], b["transl"]
        ref_cam = self.reference_camera(ref_azimuth_deg)
        with torch.no_grad():
            ref_verts = self.body.forward(shape=shape[None], pose=ref_pose[None], transl=transl[None]).vertices[0]
            ref_rgba, ref_normals = self._render(ref_verts, data["texture_f"], ref_cam)
            if kind == "view":
                s = self.settings
                cams = orbit_cameras(frames, radius=s["camera_radius"], elevation_deg=s["elevation_deg"],
                                     fov_deg=s["fov_deg"], width=s["res"], height=s["res"],
                                     start_azimuth=ref_azimuth_deg)
                pose = ref_pose[None].expand(frames, -1, -1).clone()
                rgba, normals = self._render(ref_verts, data["texture_f"], cams)
            else:
                if motion is None:
                    motion = DEFAULT_MOTIONS[index % len(DEFAULT_MOTIONS)]
                if isinstance(motion, str):
                    motion = self.named_motion(motion, index, shape, data, frames)
                motion = torch.as_tensor(motion, dtype=ref_pose.dtype)
                J1 = ref_pose.shape[0]
                if motion.ndim not in (3, 4) or motion.shape[1] != J1 or tuple(motion.shape[2:]) not in ((3,), (3, 3)):
                    raise InputError(f"motion has shape {tuple(motion.shape)}, expected [T, {J1}, 3] (axis-angle) or "
                                     f"[T, {J1}, 3, 3] for {self.body.name}", "pass a pose sequence of this body model")
                if motion.shape[0] != frames:
                    raise InputError(f"motion has {motion.shape[0]} frames, the clip {frames}",
                                     "pass frames=len(motion)")
                pose = motion
                cams = Cameras.cat([ref_cam] * frames)
                verts = self.body.forward(shape=shape[None], pose=pose, transl=transl[None]).vertices
                rgba, normals = self._render(verts, data["texture_f"], cams)
        return Clip(kind, index, rgba, normals, cams, shape.clone(), pose, torch.zeros(frames, 3),
                    transl[None].expand(frames, 3).clone(), ref_rgba[0], ref_normals[0], ref_cam, ref_pose.clone())


def _to_u8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _save_clip(path: Path, clip: Clip) -> None:
    tensors = {
        "rgba": _to_u8(clip.rgba), "normals": _to_u8(clip.normals), "ref_rgba": _to_u8(clip.ref_rgba),
        "ref_normals": _to_u8(clip.ref_normals), "viewmats": clip.cameras.viewmats, "Ks": clip.cameras.Ks,
        "ref_viewmat": clip.ref_camera.viewmats[0], "ref_K": clip.ref_camera.Ks[0], "shape": clip.shape,
        "pose": clip.pose, "global_orient": clip.global_orient, "transl": clip.transl, "ref_pose": clip.ref_pose,
    }
    save_tensors(path / "clip.safetensors", tensors, metadata={"kind": clip.kind, "avatar": clip.avatar})
    tiles = [clip.ref_rgba] + list(clip.rgba)
    tiles = [t[..., :3] * t[..., 3:] + (1 - t[..., 3:]) for t in tiles]
    save_image(path / "preview.png", image_grid(tiles, nrow=min(len(tiles), 11), padding=1, pad_value=0.8))


def load_clip(path: str | os.PathLike) -> Clip:
    """A clip written by :func:`write_clips` (its folder or its ``clip.safetensors``)."""
    path = Path(path)
    file = path / "clip.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise MissingFileError(f"no clip at {path}", "write clips with avatar_core.data.clips.write_clips")
    t, meta = load_tensors(file)
    try:
        H, W = t["rgba"].shape[1:3]
        f = lambda x: x.float() / 255.0  # noqa: E731
        return Clip(meta["kind"], int(meta["avatar"]), f(t["rgba"]), f(t["normals"]),
                    Cameras(t["viewmats"], t["Ks"], W, H), t["shape"], t["pose"], t["global_orient"], t["transl"],
                    f(t["ref_rgba"]), f(t["ref_normals"]), Cameras(t["ref_viewmat"][None], t["ref_K"][None], W, H),
                    t["ref_pose"])
    except KeyError as e:
        raise CorruptFileError(f"{file} lacks {e}", "rewrite the clips") from e


def list_clips(root: str | os.PathLike, kind: str | None = None) -> list[Path]:
    """Complete clip folders of a clip set, sorted by name, optionally of one kind."""
    root = Path(root)
    if not (root / "meta.json").is_file():
        raise MissingFileError(f"{root} is not a clip set (no meta.json)", "write one with write_clips")
    dirs = sorted(p for p in (root / "clips").iterdir() if p.is_dir() and (p / "clip.safetensors").is_file())
    return [p for p in dirs if kind is None or p.name.endswith(f"_{kind}")]


def write_clips(out: str | os.PathLike, num: int, frames: int, res: int = 64, seed: int = 0,
                kinds: tuple[str, ...] = CLIP_KINDS, first: int = 0, uv_res: int = 256,
                motion: Tensor | str | None = None, overwrite: bool = False, progress: bool = True,
                body_model: BodyModel | None = None) -> Path:
    """Write the clips of avatars ``first .. first + num - 1`` (one per kind) to ``out``; resumes when rerun.

    ``motion`` (a pose sequence ``[frames, J-1, 3(, 3)]`` or a motion name) drives every pose clip; default: per
    avatar one of :data:`DEFAULT_MOTIONS`. Avatars match dataset avatars of the same ``seed``, ``res`` and ``uv_res``.
    """
    for k in kinds:
        if k not in CLIP_KINDS:
            raise InputError(f"unknown clip kind {k!r}", f"use some of {CLIP_KINDS}")
    if num < 1 or frames < 1:
        raise InputError(f"num and frames must be positive, got {num} and {frames}", "pass e.g. num=8 frames=20")
    settings = {**default_settings(first + num, 1, res, seed, "anny", uv_res), "frames": int(frames),
                "kinds": list(kinds), "first": int(first), "motion": motion if isinstance(motion, str) else "given" if motion is not None else "default"}
    root = Path(out)
    meta_path = root / "meta.json"
    if meta_path.is_file() and not overwrite:
        old = json.loads(meta_path.read_text()).get("settings", {})
        diff = [k for k in ("frames", "res", "seed", "uv_res", "motion") if old.get(k) != settings[k]]
        if diff:
            raise ConfigError(f"{root} holds clips made with other settings ({', '.join(diff)})",
                              "pass the same settings, another folder, or overwrite=True")
    elif root.is_dir() and any(root.iterdir()) and not overwrite:
        raise ConfigError(f"{root} exists and is not a clip set", "choose a new folder or pass overwrite=True")
    if overwrite:
        shutil.rmtree(root / "clips", ignore_errors=True)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    save_json(meta_path, {"format": CLIP_FORMAT, "settings": settings})
    maker = ClipMaker(settings, body_model)
    from tqdm.auto import tqdm

    todo = [(i, k) for i in range(first, first + num) for k in kinds]
    for i, k in tqdm(todo, desc="clips", unit="clip", disable=not progress):
        final = root / "clips" / f"{i:06d}_{k}"
        if (final / "clip.safetensors").is_file():
            continue
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _save_clip(tmp, maker.make(i, k, frames, motion))
        os.replace(tmp, final)
    fsync_dir(root / "clips")
    return root
