"""Per-frame classifier-free guidance scales of GAS (Sec. 3.4; official ``pipeline`` for novel view).

Novel view: a triangle over the orbit, low guidance at the front (near the reference view, where the condition
already says everything) and high at the back. ``"triangular"`` is the paper's symmetric triangle for any frame
count (min at both ends, max in the middle); ``"official"`` is the authors' hard-coded list, linspace(1, 2, 11)
followed by linspace(2, 1, 11)[1:10] at 20 frames (1.0 -> 2.0 -> 1.1; it never returns to 1.0), generalised to any
count the same way. Novel pose: SVD's linear ramp, or a constant (2.0 in the paper).
Both come from :func:`avatar_core.diffusion.guidance.triangular_guidance_scale` / ``linear_guidance_scale``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from avatar_core.diffusion.guidance import linear_guidance_scale, triangular_guidance_scale
from avatar_core.errors import InputError

VIEW_SCHEDULES = ("triangular", "official", "constant")
POSE_SCHEDULES = ("constant", "linear")


def guidance_scales(task: str, num_frames: int, schedule: str, min_scale: float = 1.0,
                    max_scale: float = 2.0) -> Tensor:  # [num_frames]
    """The per-frame scales of ``task`` ("view" or "pose") under ``schedule``; ``constant`` uses ``max_scale``."""
    if task == "view":
        if schedule not in VIEW_SCHEDULES:
            raise InputError(f"unknown novel-view guidance {schedule!r}", f"use one of {VIEW_SCHEDULES}")
    elif task == "pose":
        if schedule not in POSE_SCHEDULES:
            raise InputError(f"unknown novel-pose guidance {schedule!r}", f"use one of {POSE_SCHEDULES}")
    else:
        raise InputError(f"unknown task {task!r}", "use 'view' or 'pose'")
    if schedule == "constant":
        if num_frames < 1:
            raise InputError(f"num_frames must be >= 1, got {num_frames}", "ask for at least one frame")
        return torch.full((num_frames,), float(max_scale))
    if schedule == "linear":
        return linear_guidance_scale(num_frames, min_scale, max_scale)
    return triangular_guidance_scale(num_frames, min_scale, max_scale, symmetric=schedule == "triangular")
