"""Novel-view and novel-pose synthesis from one reference (GAS Sec. 3.3-3.4), and the files they write.

Both tasks are one video generation: the NeRF renders the reference person at every target frame (cameras on an
orbit around the body for novel view; the reference camera and the poses of a motion for novel pose), the body's
normal maps are drawn at the same frames, and the video model refines the renders with the task's switcher label
and per-frame guidance, tiled over time when the sequence is longer than the model's frame count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from avatar_core.body import axis_angle_to_matrix
from avatar_core.cameras import Cameras
from avatar_core.errors import InputError
from avatar_core.render.conditions import normal_map
from gas.body_warp import BodyWarp, PosedAnchors
from gas.data import on_white, premultiplied_on_white
from gas.guidance import guidance_scales
from gas.human_nerf import HumanNeRF
from gas.reference import Reference
from gas.sampling import sample_latents
from gas.svd_parts import VideoParts, clip_embedding, decode, vae_mode
from gas.video_unet import task_labels


@dataclass
class Targets:
    """The frames to synthesise: one camera and one body pose per frame."""

    cameras: Cameras  # N cameras
    pose: Tensor  # [N, J-1, 3] or [N, J-1, 3, 3]
    global_orient: Tensor  # [N, 3] or [N, 3, 3]
    transl: Tensor  # [N, 3]

    def __len__(self) -> int:
        return len(self.cameras)


def orbit_targets(ref: Reference, warp: BodyWarp, num_frames: int) -> Targets:
    """A 360-degree orbit of the reference camera about the vertical axis through the body's centre."""
    if num_frames < 1:
        raise InputError(f"--frames must be positive, got {num_frames}", "pass e.g. --frames 20")
    verts = warp.pose(ref.shape, ref.pose, ref.global_orient, ref.transl).vertices
    centre = (verts.min(0).values + verts.max(0).values) / 2
    c2w = ref.camera.c2w[0]
    mats = []
    for k in range(num_frames):
        a = 2 * math.pi * k / num_frames
        R = torch.tensor([[math.cos(a), 0.0, math.sin(a)], [0.0, 1.0, 0.0], [-math.sin(a), 0.0, math.cos(a)]])
        M = torch.eye(4)
        M[:3, :3] = R
        M[:3, 3] = centre - R @ centre
        mats.append(torch.linalg.inv(M @ c2w))
    cams = Cameras(torch.stack(mats), ref.camera.Ks.expand(num_frames, 3, 3), ref.camera.width, ref.camera.height)
    n = num_frames
    return Targets(cams, ref.pose[None].expand(n, -1, -1), ref.global_orient[None].expand(n, 3),
                   ref.transl[None].expand(n, 3))


def motion_targets(ref: Reference, body, motion: str, num_frames: int | None) -> Targets:
    """The reference camera and the poses of a kernel motion: a built-in name or an SMPL-X/AMASS ``.npz`` path."""
    from avatar_core.body.motions import MOTIONS, builtin_motion, load_motion

    if motion in MOTIONS:
        n = num_frames or 20
        poses = builtin_motion(body, motion, n)
        go = axis_angle_to_matrix(ref.global_orient)[None].expand(n, 3, 3)
        tr = ref.transl[None].expand(n, 3)
    else:
        path = Path(motion)
        if not path.is_file():
            raise InputError(f"--motion {motion!r} is neither a built-in ({', '.join(MOTIONS)}) nor a file",
                             "pass walk, wave or the path of an SMPL-X / AMASS .npz sequence")
        m = load_motion(path, body, frames=slice(0, num_frames) if num_frames else None)
        n = len(m)
        poses = m.poses
        # The motion's root motion, relative to its first frame, applied on top of the reference's placement.
        rel = m.global_orient @ m.global_orient[:1].transpose(-1, -2)
        go = rel @ axis_angle_to_matrix(ref.global_orient)
        tr = ref.transl[None] + m.transl
    cams = Cameras(ref.camera.viewmats.expand(n, 4, 4), ref.camera.Ks.expand(n, 3, 3), ref.camera.width,
                   ref.camera.height)
    return Targets(cams, poses.float(), go.float(), tr.float())


@torch.no_grad()
def nerf_renders(nerf: HumanNeRF, ref: Reference, targets: Targets) -> tuple[Tensor, Tensor, list[PosedAnchors]]:
    """Premultiplied NeRF renders [N,H,W,3], alpha [N,H,W,1] and the posed anchors of every frame."""
    warp = nerf.warp
    ref_a = warp.pose(ref.shape, ref.pose, ref.global_orient, ref.transl)
    big = warp.pose(ref.shape, warp.big_pose(ref.shape), ref.global_orient, ref.transl)
    code = nerf.encode(ref.rgba, ref.camera, ref_a, big)
    rgbs, alphas, frames = [], [], []
    for k in range(len(targets)):
        tgt = warp.pose(ref.shape, targets.pose[k], targets.global_orient[k], targets.transl[k])
        rgb, a = nerf.render(code, tgt, targets.cameras[k:k + 1])
        rgbs.append(rgb)
        alphas.append(a)
        frames.append(tgt)
    return torch.cat(rgbs), torch.cat(alphas), frames


@torch.no_grad()
def normal_maps(body, ref: Reference, targets: Targets) -> Tensor:  # [N, H, W, 3]
    out = []
    for k in range(len(targets)):
        v = body.forward(shape=ref.shape[None], pose=targets.pose[k][None],
                         global_orient=targets.global_orient[k][None], transl=targets.transl[k][None]).vertices[0]
        out.append(normal_map(v, body, targets.cameras[k:k + 1], space="camera_opengl"))
    return torch.cat(out)


@torch.no_grad()
def synthesize(nerf: HumanNeRF, parts: VideoParts | None, ref: Reference, targets: Targets, task: str, sample: Any,
               use_nerf: bool = True, use_normal: bool = True, use_switcher: bool = True,
               progress: bool = True) -> dict[str, Tensor]:
    """Frames ``[N, H, W, 3]`` (on white) of the video model (None without ``parts``), the NeRF-only frames, the
    normal maps and the per-frame guidance scales."""
    rgb, alpha, _ = nerf_renders(nerf, ref, targets)
    nerf_frames = premultiplied_on_white(rgb, alpha)
    normals = normal_maps(nerf.warp.body, ref, targets)
    n = len(targets)
    schedule = sample.view_guidance if task == "view" else sample.pose_guidance
    scales = guidance_scales(task, n, schedule, sample.min_guidance, sample.max_guidance)
    out = {"nerf": nerf_frames, "normals": normals, "scales": scales, "frames": None}
    if parts is None:
        return out
    ref_img = on_white(ref.rgba)[None]
    gen = torch.Generator().manual_seed(int(sample.seed))
    latents = sample_latents(
        parts, vae_mode(parts, ref_img), clip_embedding(parts, ref_img), n, scales,
        nerf_latents=vae_mode(parts, nerf_frames[None]) if use_nerf else None,
        normal_maps=normals.permute(0, 3, 1, 2)[None] if use_normal else None,
        task=task_labels([task]) if use_switcher else None,
        steps=sample.steps, tile=sample.tile, overlap=sample.overlap, fps=sample.fps,
        motion_bucket_id=sample.motion_bucket_id, noise_aug=sample.noise_aug, repeat_noise=sample.repeat_noise,
        generator=gen, progress=progress)
    out["frames"] = decode(parts, latents)[0]
    return out


def write_outputs(out: Path, result: dict[str, Tensor], settings: dict, fps: int) -> dict[str, str]:
    """``frames/``, ``nerf/`` and ``normals/`` PNGs, ``gas.mp4``, ``nerf.mp4``, ``comparison.png``, ``settings.json``."""
    from avatar_core.io import image_grid, save_image, save_json, write_video

    files: dict[str, str] = {}
    for name in ("frames", "nerf", "normals"):
        seq = result[name]
        if seq is None:
            continue
        (out / name).mkdir(parents=True, exist_ok=True)
        for k, img in enumerate(seq):
            save_image(out / name / f"{k:03d}.png", img)
    if result["frames"] is not None:
        files["video"] = str(write_video(out / "gas.mp4", result["frames"], fps=fps))
    files["nerf_video"] = str(write_video(out / "nerf.mp4", result["nerf"], fps=fps))
    rows = [r for r in (result["nerf"], result["frames"]) if r is not None]
    files["comparison"] = str(save_image(out / "comparison.png",
                                         image_grid([f for r in rows for f in r], nrow=len(result["nerf"]))))
    files["settings"] = str(save_json(out / "settings.json", settings))
    return files
