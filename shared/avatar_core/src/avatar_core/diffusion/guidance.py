"""Classifier-free guidance (Ho & Salimans 2022, Eq. 6) with scalar, per-sample, per-frame or per-view scales."""

from __future__ import annotations

import torch
from torch import Tensor

from avatar_core.diffusion.parameterization import expand_to
from avatar_core.errors import InputError


def cfg(
    cond: Tensor,  # [B, ...] prediction with the condition
    uncond: Tensor,  # [B, ...] prediction with the null condition
    scale: float | Tensor,  # scalar, [B], [B|1, F|1] or of cond's full rank
    frame_dim: int = 1,
) -> Tensor:  # [B, ...]
    """Guided prediction uncond + scale (cond - uncond).

    ``scale`` is a float or 0-d tensor; ``[B]`` (per sample); ``[B, F]`` (per frame or per view, with the
    frames/views along ``frame_dim`` of ``cond``, dim 1 as in SVD's ``[B, F, C, H, W]`` latents; use
    ``[1, F]`` for one ramp shared by the batch); or any tensor of cond's rank. It is written as
    cond + (scale - 1)(cond - uncond) so that scale 1 returns ``cond`` exactly.
    """
    if cond.shape != uncond.shape:
        raise InputError(
            f"conditional {tuple(cond.shape)} and unconditional {tuple(uncond.shape)} predictions differ in shape",
            "run the model on the same inputs with and without the condition (e.g. torch.chunk(out, 2))",
        )
    if isinstance(scale, Tensor) and scale.ndim == 2 and scale.ndim != cond.ndim:
        w = expand_to(scale, cond, dims=(0, frame_dim))
    else:
        w = expand_to(scale, cond, dims=(0,))
    return cond + (w - 1) * (cond - uncond)


def triangular_guidance_scale(
    num_frames: int,
    min_scale: float = 1.0,
    max_scale: float = 2.0,
    dtype: torch.dtype = torch.float32,
    symmetric: bool = False,
) -> Tensor:  # [num_frames]
    """GAS's per-frame scale for novel views: rises linearly from min to max and falls back toward min.

    Frame ``h = num_frames // 2`` has ``max_scale``; frames after it follow linspace(max, min,
    num_frames - h + 1) from its second entry, so the last frame sits one step above ``min_scale``.
    This is GAS's novel-view schedule, whose hard-coded slice is this one at its 20 frames.

    ``symmetric=True``: the triangle the paper describes for any length, ``min_scale`` at the first and the last
    frame, ``max_scale`` in the middle (at both middle frames for an even count), mirror-symmetric in time:
    ``max - (max - min) |2k / (n - 1) - 1|`` with ``k`` rounded onto the nearer middle frame.
    """
    if num_frames < 1:
        raise InputError(f"num_frames must be >= 1, got {num_frames}", "ask for at least one frame")
    if symmetric:
        if num_frames == 1:
            return torch.tensor([min_scale], dtype=dtype)
        k = torch.arange(num_frames, dtype=torch.float64)
        # Distance to the nearer end, over the distance from an end to the (nearest) middle frame.
        d = torch.minimum(k, num_frames - 1 - k) / max((num_frames - 1) // 2, 1)
        return (min_scale + (max_scale - min_scale) * d.clamp(max=1.0)).to(dtype)
    half = num_frames // 2
    up = torch.linspace(min_scale, max_scale, half + 1, dtype=torch.float64)
    down = torch.linspace(max_scale, min_scale, num_frames - half + 1, dtype=torch.float64)[1 : num_frames - half]
    return torch.cat([up, down]).to(dtype)


def linear_guidance_scale(
    num_frames: int,
    min_scale: float = 1.0,
    max_scale: float = 3.0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:  # [num_frames]
    """Stable Video Diffusion's per-frame scale: linspace(min_scale, max_scale) over the frames."""
    if num_frames < 1:
        raise InputError(f"num_frames must be >= 1, got {num_frames}", "ask for at least one frame")
    return torch.linspace(min_scale, max_scale, num_frames, dtype=torch.float64).to(dtype)
