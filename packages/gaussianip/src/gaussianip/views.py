"""Stage-1 cameras, view-dependent prompts and view-dependent skeleton cropping (GaussianIP Sec. 3.1, 4.1).

Cameras follow the official sampler: azimuth stratified over [-180, 180) across the batch, elevation, distance
and vertical fov uniform in ranges; from a step on, a head zoom with some probability (camera and target raised
to the head), otherwise an upper-body zoom with some probability. Azimuth 0 is in front of the body and 90 on
the body's left (:mod:`avatar_core.cameras`).

Skeleton cropping (the Janus fix): a head zoom keeps only the head-related keypoints; eyes and ears are hidden
by azimuth windows (a profile hides the far eye and ear) and by the nose-versus-ear depth rule (a back view hides
the nose and the eyes), so the pose condition never asks for a face on the back of the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from avatar_core.body.model import OPENPOSE_18
from avatar_core.cameras import Cameras, look_at, spherical_to_position
from avatar_core.render.conditions import keypoint_visibility

KP = {n: i for i, n in enumerate(OPENPOSE_18)}
#: Keypoints a head zoom keeps (official poser): nose, neck, elbows, eyes, ears.
HEAD_KEEP = ("nose", "neck", "right_elbow", "left_elbow", "right_eye", "left_eye", "right_ear", "left_ear")


@dataclass
class ViewBatch:
    """One batch of stage-1 views: cameras, their angles and what kind of zoom they are."""

    cameras: Cameras
    azimuth: Tensor  # [C] degrees
    elevation: Tensor  # [C] degrees
    kind: str  # "full", "head" or "upper"


def _uniform(g: torch.Generator, lo: float, hi: float, n: int) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def sample_views(cfg, step: int, batch: int, size: int, g: torch.Generator) -> ViewBatch:
    """The official stage-1 camera sampler (``cfg`` is a :class:`~gaussianip.config.CameraConfig`)."""
    kind = "full"
    if step >= cfg.head_zoom_from and torch.rand(1, generator=g).item() < cfg.head_zoom_p:
        kind = "head"
    elif torch.rand(1, generator=g).item() < cfg.upper_zoom_p:
        kind = "upper"
    if kind == "full":
        lo, hi = cfg.azimuth
        azimuth = lo + (torch.arange(batch, dtype=torch.float64) + torch.rand(batch, generator=g, dtype=torch.float64)) \
            * (hi - lo) / batch
        dist, raise_y = cfg.distance, 0.0
    elif kind == "head":
        azimuth, dist, raise_y = _uniform(g, *cfg.head_azimuth, batch), cfg.head_distance, cfg.zoom_raise
    else:
        azimuth, dist, raise_y = _uniform(g, *cfg.upper_azimuth, batch), cfg.upper_distance, cfg.zoom_raise
    elevation = _uniform(g, *cfg.elevation, batch)
    radius = _uniform(g, *dist, batch)
    fov = _uniform(g, *cfg.fovy, batch)
    target = torch.tensor([0.0, raise_y, 0.0], dtype=torch.float64).expand(batch, 3)
    eye = spherical_to_position(azimuth, elevation, radius, target)
    cams = Cameras.from_fov(look_at(eye, target).float(), fov.float(), size, size)
    return ViewBatch(cams, azimuth.float(), elevation.float(), kind)


def view_direction(azimuth: Tensor, front: float = 45.0, back: float = 135.0) -> list[str]:
    """"front", "side" or "back" per camera (threestudio's view-dependent prompting)."""
    a = ((azimuth + 180.0) % 360.0 - 180.0).abs()
    return ["front" if x <= front else "back" if x >= back else "side" for x in a.tolist()]


def view_prompts(prompt: str, views: ViewBatch) -> list[str]:
    """The prompt with a view suffix per camera; head zooms ask for the face."""
    out = []
    for d in view_direction(views.azimuth):
        base = f"the face of {prompt}" if views.kind == "head" and d != "back" else prompt
        out.append(f"{base}, {d} view")
    return out


def skeleton_visibility(keypoints_px: Tensor, keypoints_depth: Tensor, azimuth: Tensor, kind: str, width: int,
                        height: int, profile: tuple[float, float] = (60.0, 120.0)) -> Tensor:  # [C, 18] bool
    """Which OpenPose keypoints the pose condition draws in each view (view-dependent skeleton cropping).

    In-image and in-front keypoints, with the nose-versus-ear depth rule (from behind: no nose, no eyes); an
    azimuth in the ``profile`` window (either side) hides the far eye and ear; a head zoom keeps only
    :data:`HEAD_KEEP`.
    """
    vis = keypoint_visibility(keypoints_px, keypoints_depth, width, height, None, face_rule=True)
    a = (azimuth + 180.0) % 360.0 - 180.0  # (-180, 180]
    from_left = (a >= profile[0]) & (a <= profile[1])  # camera on the body's left: the right side is far
    from_right = (a <= -profile[0]) & (a >= -profile[1])
    for k in ("right_eye", "right_ear"):
        vis[:, KP[k]] &= ~from_left
    for k in ("left_eye", "left_ear"):
        vis[:, KP[k]] &= ~from_right
    if kind == "head":
        keep = torch.zeros(len(OPENPOSE_18), dtype=torch.bool)
        keep[[KP[k] for k in HEAD_KEEP]] = True
        vis &= keep[None].to(vis.device)
    return vis
