"""Animation of a GaussianIP result (beyond the paper, which renders static humans): the Gaussians are bound to
the body's rest surface (nearest-surface skinning weights of the kernel) and driven by the kernel's motions."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from avatar_core.body.motions import MOTIONS, builtin_motion, load_motion
from avatar_core.body.skinning import bind_to_surface, skin_gaussians
from avatar_core.errors import InputError
from gaussianip.gaussians import BodyFrame, render


def motion_poses(frame: BodyFrame, motion: str, frames: int) -> torch.Tensor:
    """A built-in motion by name, or an SMPL-X / AMASS ``.npz`` file, as rotations for ``frame.body``."""
    if motion in MOTIONS:
        return builtin_motion(frame.body, motion, frames)
    p = Path(motion)
    if p.suffix == ".npz":
        return load_motion(p, frame.body).poses[:frames]
    raise InputError(f"unknown motion {motion!r}", f"use one of {', '.join(MOTIONS)} or an SMPL-X / AMASS .npz file")


def animate_gaussians(params: nn.ParameterDict, frame: BodyFrame, poses: torch.Tensor):
    """Posed means ``[T, N, 3]`` and rotations ``[T, N, 4]`` of the Gaussians (normalised frame)."""
    s, off = frame.scale, frame.offset
    means_m = params["means"].detach() / s - off
    rest_m = frame.vertices / s - off
    binding = bind_to_surface(frame.body, means_m, vertices=rest_m)
    with torch.no_grad():
        out = frame.body(pose=poses)
    posed, quats = skin_gaussians(binding, out.transforms, means_m, params["quats"].detach())
    return ((posed + off) * s).float(), quats.float()


def render_animation(params, frame: BodyFrame, poses, cams, background) -> torch.Tensor:  # [T, H, W, 3]
    means, quats = animate_gaussians(params, frame, poses)
    frames = []
    for t in range(means.shape[0]):
        p = nn.ParameterDict({k: nn.Parameter(v.detach().clone(), requires_grad=False) for k, v in params.items()})
        p["means"].data, p["quats"].data = means[t], quats[t]
        with torch.no_grad():
            frames.append(render(p, cams, background)[0][0])
    return torch.stack(frames)
