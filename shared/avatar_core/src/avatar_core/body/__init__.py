"""Parametric body models (SMPL-X from the user's files, Anny as the free default) and their UV maps."""

from __future__ import annotations

import os

import torch

from avatar_core.body.model import (
    OPENPOSE_18,
    PART_NAMES,
    BodyModel,
    BodyOutput,
    axis_angle_to_matrix,
    forward_kinematics,
    interpolate_on_faces,
    skin_points,
    unskin_points,
    vertex_normals,
)
from avatar_core.body.motions import MOTIONS, Motion, builtin_motion, load_motion
from avatar_core.body.skinning import (
    SurfaceBinding,
    bind_to_surface,
    nearest_surface,
    pose_correctives,
    skin_gaussians,
    unskin_gaussians,
)
from avatar_core.body.uv import UVMapper
from avatar_core.errors import ConfigError

BODY_MODELS = ("anny", "smplx")


def load_body_model(
    name: str = "anny",
    model_dir: str | os.PathLike | None = None,
    gender: str = "neutral",
    device: str | torch.device = "cpu",
    **kw,
) -> BodyModel:
    """A body model by name: ``"anny"`` (default, ships with the ``anny`` wheel) or ``"smplx"``.

    ``model_dir`` and ``gender`` apply to SMPL-X (the folder holding ``SMPLX_<GENDER>.npz`` and
    ``smplx_uv.obj``; default ``$AVATAR_SMPLX_DIR``); ``kw`` passes ``dtype`` and, for SMPL-X,
    ``num_betas`` / ``num_expression_coeffs``. Anny's phenotypes are inputs of ``forward(shape=...)``.
    """
    key = str(name).lower()
    if key == "anny":
        from avatar_core.body.anny_model import load_anny

        return load_anny(device=device, **kw)
    if key == "smplx":
        from avatar_core.body.smplx_model import SMPLXBody

        return SMPLXBody(model_dir=model_dir, gender=gender, device=device, **kw)
    raise ConfigError(f"unknown body model {name!r}", f"use one of: {', '.join(repr(n) for n in BODY_MODELS)}")


__all__ = [
    "BODY_MODELS",
    "MOTIONS",
    "OPENPOSE_18",
    "PART_NAMES",
    "SurfaceBinding",
    "UVMapper",
    "BodyModel",
    "BodyOutput",
    "Motion",
    "axis_angle_to_matrix",
    "bind_to_surface",
    "builtin_motion",
    "forward_kinematics",
    "interpolate_on_faces",
    "load_body_model",
    "load_motion",
    "nearest_surface",
    "pose_correctives",
    "skin_gaussians",
    "skin_points",
    "unskin_gaussians",
    "unskin_points",
    "vertex_normals",
]
