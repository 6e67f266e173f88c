"""Triplane feature sampling: bilinear features of three axis-aligned planes at 3D points (EG3D, RodinHD)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from avatar_core.errors import InputError

__all__ = ["TRIPLANE_AXES", "sample_triplane"]

# ---------------------------------------------------------------------------------------------------------------
#: Which point coordinates index each plane, as (grid_sample x -> width, grid_sample y -> height).
TRIPLANE_AXES = ((0, 1), (0, 2), (1, 2))  # xy, xz, yz (avatar_core.conventions)


def sample_triplane(
    planes: Tensor,  # [B, 3, C, H, W]
    points: Tensor,  # [B, N, 3] in [-1, 1]^3
    reduce: Literal["none", "sum", "mean", "concat"] = "none",
    align_corners: bool = False,
    padding_mode: Literal["zeros", "border", "reflection"] = "border",
) -> Tensor:  # [B, N, 3, C], or [B, N, C] (sum/mean), or [B, N, 3C] (concat)
    """Bilinear features of three axis-aligned planes at 3D points (EG3D / RodinHD triplanes).

    Plane ``xy`` is read at (u, v) = (x, y), ``xz`` at (x, z), ``yz`` at (y, z), where u runs along the plane's
    width (W) and v along its height (H). With ``align_corners=False`` (default, as EG3D) -1 and 1 are the outer
    edges of the border texels, so texel ``j`` has its centre at ``u = (2 j + 1) / W - 1``; with ``True`` they
    are the centres of the border texels. Points outside the cube follow ``padding_mode``.
    """
    if planes.ndim != 5 or planes.shape[1] != 3:
        raise InputError(f"planes must be [B, 3, C, H, W], got {tuple(planes.shape)}",
                         "stack the xy, xz, yz planes on dim 1 (unroll a [B, C, H, 3W] roll-out first)")
    if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] not in (1, planes.shape[0]):
        raise InputError(f"points must be [B, N, 3] with B = {planes.shape[0]}, got {tuple(points.shape)}",
                         "pass one point set per triplane")
    B, _, C, H, W = planes.shape
    points = points.expand(B, -1, -1).to(planes.dtype)
    # One grid_sample call over all three planes: planes become batch items, coordinates are picked per plane.
    coords = torch.stack([points[..., list(ax)] for ax in TRIPLANE_AXES], dim=1)  # [B, 3, N, 2]
    feats = F.grid_sample(rearrange(planes, "b p c h w -> (b p) c h w"),
                          rearrange(coords, "b p n uv -> (b p) 1 n uv"), mode="bilinear",
                          padding_mode=padding_mode, align_corners=align_corners)
    feats = rearrange(feats, "(b p) c 1 n -> b n p c", p=3)
    if reduce == "none":
        return feats
    if reduce == "sum":
        return feats.sum(dim=2)
    if reduce == "mean":
        return feats.mean(dim=2)
    if reduce == "concat":
        return rearrange(feats, "b n p c -> b n (p c)")
    raise InputError(f"unknown triplane reduction {reduce!r}", "use one of none, sum, mean, concat")
