"""Turntables: orbit cameras around an avatar, render every frame, optionally write a video.

Every package's demo ends with one call, e.g.
``turntable(gaussian_render_fn(means, quats, scales, opacities, colors), 48, radius=2.5, path="out/turn.mp4")``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from avatar_core.cameras import Cameras, orbit_cameras
from avatar_core.errors import InputError

__all__ = ["RenderFn", "turntable", "gaussian_render_fn", "volume_render_fn"]

#: ``render_fn(cameras) -> images [C, H, W, 3]`` in [0, 1] (a tuple whose first item is the images also works).
RenderFn = Callable[[Cameras], Tensor]


@torch.no_grad()
def turntable(
    render_fn: RenderFn,
    num_frames: int = 48,
    radius: float = 2.5,
    elevation: float = 0.0,
    fov_deg: float = 40.0,
    width: int = 512,
    height: int = 512,
    target: Sequence[float] | Tensor = (0.0, 0.0, 0.0),
    start_azimuth: float = 0.0,
    path: str | os.PathLike | None = None,
    fps: float = 24,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> Tensor:  # [T, H, W, 3] float in [0, 1], on the CPU
    """Render ``num_frames`` views on a full orbit (frame 0 in front of the body, see :mod:`avatar_core.cameras`).

    Cameras go to ``render_fn`` ``batch_size`` at a time. With ``path``, the frames are also written by
    :func:`avatar_core.io.media.write_video` (MP4, or GIF where no encoder is available).
    """
    if num_frames < 1 or batch_size < 1:
        raise InputError(f"turntable needs num_frames >= 1 and batch_size >= 1, got {num_frames}, {batch_size}",
                         "pass positive counts")
    cams = orbit_cameras(num_frames, radius, elevation, fov_deg, width, height, target, start_azimuth, device)
    frames = []
    for i in range(0, num_frames, batch_size):
        out = render_fn(cams[i:i + batch_size])
        images = out[0] if isinstance(out, (tuple, list)) else out
        expected = (min(batch_size, num_frames - i), height, width)
        if images.ndim != 4 or tuple(images.shape[:3]) != expected or images.shape[-1] < 3:
            raise InputError(f"render_fn returned {tuple(images.shape)}, expected [{expected[0]}, {height}, {width}, 3]",
                             "make render_fn return images [C, H, W, 3] for a Cameras batch of C")
        frames.append(images[..., :3].detach().float().clamp(0, 1).cpu())
    video = torch.cat(frames)
    if path is not None:
        from avatar_core.io.media import write_video

        write_video(Path(path), video, fps=fps)
    return video


def gaussian_render_fn(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz
    scales: Tensor,  # [N, 3] activated
    opacities: Tensor,  # [N] activated
    colors: Tensor,  # [N, 3] RGB, or SH [N, K, 3] with sh_degree
    sh_degree: int | None = None,
    background: Sequence[float] | Tensor = (1.0, 1.0, 1.0),
    **raster_kwargs,
) -> RenderFn:
    """A :data:`RenderFn` that rasterizes one Gaussian set with :func:`~avatar_core.render.gaussians.rasterize_gaussians`
    over a constant ``background`` colour; ``raster_kwargs`` are passed on (backend, near_plane, ...)."""
    from avatar_core.render.gaussians import rasterize_gaussians

    bg = torch.as_tensor(background, dtype=means.dtype, device=means.device).reshape(1, -1)

    def render(cameras: Cameras) -> Tensor:
        cameras = cameras.to(means.device, means.dtype)
        images, _, _ = rasterize_gaussians(
            means, quats, scales, opacities, colors, cameras.viewmats, cameras.Ks, cameras.width, cameras.height,
            sh_degree=sh_degree, backgrounds=bg.expand(len(cameras), -1), **raster_kwargs)
        return images

    return render


def volume_render_fn(
    field_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    near: float,
    far: float,
    background: Sequence[float] | Tensor = (1.0, 1.0, 1.0),
    **render_kwargs,
) -> RenderFn:
    """A :data:`RenderFn` that volume-renders a radiance field with :func:`~avatar_core.render.volume.render_cameras`
    (``render_kwargs``: num_samples, estimator, chunk, ...)."""
    from avatar_core.render.volume import render_cameras

    def render(cameras: Cameras) -> Tensor:
        bg = torch.as_tensor(background, dtype=cameras.viewmats.dtype, device=cameras.device)
        rgb, _, _ = render_cameras(field_fn, cameras, near, far, background=bg, **render_kwargs)
        return rgb

    return render
