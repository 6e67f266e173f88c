"""Camera rays for volume rendering: one ray through each pixel centre ``(j + 0.5, i + 0.5)``."""

from __future__ import annotations

import torch
from torch import Tensor

from avatar_core.cameras import Cameras
from avatar_core.errors import InputError

__all__ = ["generate_rays", "sample_pixels"]


def generate_rays(
    cameras: Cameras,
    camera_ids: Tensor | None = None,  # [N] long, with rows/cols: a subset of pixels
    rows: Tensor | None = None,  # [N] long (or float: continuous pixel coordinates without the +0.5)
    cols: Tensor | None = None,  # [N]
) -> tuple[Tensor, Tensor]:
    """World-space ray origins and unit directions.

    Without a pixel subset: ``origins, directions`` of shape ``[C, H, W, 3]``. With ``camera_ids, rows, cols``
    (e.g. from :func:`sample_pixels`, for training on sampled rays): shape ``[N, 3]``. Integer rows/cols
    address pixel centres (+0.5); float rows/cols are used as given.
    """
    device, dtype = cameras.device, cameras.viewmats.dtype
    if camera_ids is None and rows is None and cols is None:
        C, H, W = len(cameras), cameras.height, cameras.width
        ii, jj = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
        cam = torch.arange(C, device=device)[:, None, None].expand(C, H, W)
        origins, dirs = generate_rays(cameras, cam.reshape(-1), ii.expand(C, H, W).reshape(-1),
                                      jj.expand(C, H, W).reshape(-1))
        return origins.reshape(C, H, W, 3), dirs.reshape(C, H, W, 3)
    if camera_ids is None or rows is None or cols is None:
        raise InputError("generate_rays: camera_ids, rows and cols go together",
                         "pass all three (see sample_pixels) or none for full images")
    if not (camera_ids.shape == rows.shape == cols.shape) or camera_ids.ndim != 1:
        raise InputError(f"camera_ids, rows, cols must be [N] each, got {tuple(camera_ids.shape)}, "
                         f"{tuple(rows.shape)}, {tuple(cols.shape)}", "flatten the pixel indices")
    x = cols.to(dtype) + (0.5 if not cols.is_floating_point() else 0.0)
    y = rows.to(dtype) + (0.5 if not rows.is_floating_point() else 0.0)
    K = cameras.Ks[camera_ids]  # [N, 3, 3]
    # Invert the pinhole model (with skew) for camera-space directions at depth 1.
    dy = (y - K[:, 1, 2]) / K[:, 1, 1]
    dx = (x - K[:, 0, 2] - K[:, 0, 1] * dy) / K[:, 0, 0]
    dirs_cam = torch.stack([dx, dy, torch.ones_like(dx)], dim=-1)
    c2w = cameras.c2w[camera_ids]  # [N, 4, 4]
    dirs = (c2w[:, :3, :3] @ dirs_cam[..., None])[..., 0]
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = c2w[:, :3, 3].expand_as(dirs).contiguous()
    return origins, dirs


def sample_pixels(
    cameras: Cameras,
    num: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``num`` pixels drawn uniformly (with replacement) over all cameras: ``camera_ids, rows, cols``, each ``[N]``."""
    C, H, W = len(cameras), cameras.height, cameras.width
    flat = torch.randint(C * H * W, (num,), generator=generator).to(cameras.device)
    return flat // (H * W), (flat // W) % H, flat % W
