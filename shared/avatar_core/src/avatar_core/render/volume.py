"""Volume rendering of radiance fields along rays: uniform samples or an estimator's, then compositing.

Samples come batched (``[n_rays, n_samples]``, uniform bins) or packed (``[S]`` with sorted ``ray_indices``)
from any :class:`~avatar_core.render.estimators.RayEstimator` (``nerfacc.OccGridEstimator`` on CUDA, the kernel's
:class:`~avatar_core.render.occupancy.OccupancyGrid` elsewhere); :mod:`avatar_core.render.compositing` turns them
into colour, opacity and depth. ``sample_triplane`` (:mod:`avatar_core.render.triplane_sampling`) and the
compositing functions are re-exported here for existing callers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from avatar_core.errors import InputError
from avatar_core.render.compositing import composite, packed_exclusive_sum, render_visibility, render_weights
from avatar_core.render.estimators import RayEstimator
from avatar_core.render.triplane_sampling import TRIPLANE_AXES, sample_triplane

__all__ = [
    "FieldFn",
    "VolumeRender",
    "render_weights",
    "packed_exclusive_sum",
    "render_visibility",
    "composite",
    "uniform_samples",
    "render_rays",
    "render_cameras",
    "sample_triplane",
    "TRIPLANE_AXES",
]

#: ``field_fn(points [N, 3], directions [N, 3]) -> (rgb [N, 3], sigma [N])`` (post-activation density).
FieldFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass
class VolumeRender:
    """Per-ray outputs of :func:`render_rays` plus the samples they came from."""

    rgb: Tensor  # [n_rays, 3] (background composited)
    opacity: Tensor  # [n_rays, 1]
    depth: Tensor  # [n_rays, 1] distance along the unit ray, weight-normalised
    weights: Tensor  # [n_rays, n_samples] or [S]
    t_starts: Tensor  # like weights
    t_ends: Tensor  # like weights
    ray_indices: Tensor | None  # [S] for packed samples, None for batched
    num_evaluated: int  # field evaluations spent on these rays, the skipping pass included


def uniform_samples(
    n_rays: int,
    near: float | Tensor,  # scalar or [n_rays]
    far: float | Tensor,  # scalar or [n_rays]
    num_samples: int,
    stratified: bool = False,
    generator: torch.Generator | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """``num_samples`` equal bins between ``near`` and ``far``: ``t_starts, t_ends`` of shape ``[n_rays, S]``.

    Bin ``k`` is ``[near + k d, near + (k + 1) d]``, ``d = (far - near) / S``, the same lattice an occupancy
    grid marches with ``render_step_size = d`` and ``near_plane = near``. ``stratified`` shifts every ray's
    bins by one uniform offset in ``[0, d)`` (as nerfacc's marcher does), keeping bins contiguous.
    """
    near_t = torch.as_tensor(near, dtype=dtype, device=device).reshape(-1, 1).expand(n_rays, 1)
    far_t = torch.as_tensor(far, dtype=dtype, device=device).reshape(-1, 1).expand(n_rays, 1)
    if bool((far_t <= near_t).any()):
        raise InputError("volume rendering needs far > near", "check the near/far planes of the scene")
    step = (far_t - near_t) / num_samples
    k = torch.arange(num_samples + 1, dtype=dtype, device=device)
    edges = near_t + k * step
    if stratified:
        edges = edges + torch.rand(n_rays, 1, generator=generator, dtype=dtype).to(edges.device) * step
    return edges[:, :-1].contiguous(), edges[:, 1:].contiguous()


def render_rays(
    field_fn: FieldFn,
    rays_o: Tensor,  # [n_rays, 3]
    rays_d: Tensor,  # [n_rays, 3] unit
    near: float,
    far: float,
    num_samples: int = 64,
    estimator: RayEstimator | None = None,
    render_step_size: float | None = None,
    density_fn: Callable[[Tensor], Tensor] | None = None,
    stratified: bool = False,
    early_stop_eps: float = 1e-4,
    alpha_thre: float = 0.0,
    cone_angle: float = 0.0,
    background: Tensor | None = None,  # [3]
    generator: torch.Generator | None = None,
) -> VolumeRender:
    """Render rays through a radiance field, by uniform sampling or with an occupancy-grid estimator.

    Without ``estimator``: ``num_samples`` uniform bins in ``[near, far]``. With one (an
    :class:`~avatar_core.render.occupancy.OccupancyGrid` or ``nerfacc.OccGridEstimator``): samples of length
    ``render_step_size`` (default ``(far - near) / num_samples``) in occupied cells only, then those behind an
    opaque surface (``T < early_stop_eps``) dropped using ``density_fn`` (default: the field's density) without
    gradients; the same lattice as the uniform path, so the two agree up to the skipped empty space.
    """
    if rays_o.shape != rays_d.shape or rays_o.ndim != 2 or rays_o.shape[-1] != 3:
        raise InputError(f"rays must be [n_rays, 3] each, got {tuple(rays_o.shape)} and {tuple(rays_d.shape)}",
                         "flatten image rays with .reshape(-1, 3)")
    n_rays = rays_o.shape[0]
    if estimator is None:
        t_starts, t_ends = uniform_samples(n_rays, near, far, num_samples, stratified, generator,
                                           rays_o.device, rays_o.dtype)
        t_mid = (t_starts + t_ends) / 2
        points = rays_o[:, None] + rays_d[:, None] * t_mid[..., None]
        dirs = rays_d[:, None].expand_as(points)
        rgbs, sigmas = field_fn(points.reshape(-1, 3), dirs.reshape(-1, 3))
        rgbs = rgbs.reshape(n_rays, num_samples, -1)
        sigmas = sigmas.reshape(n_rays, num_samples)
        rgb, opacity, depth, weights = composite(rgbs, sigmas, t_starts, t_ends, background=background)
        return VolumeRender(rgb, opacity, depth, weights, t_starts, t_ends, None, n_rays * num_samples)

    step = render_step_size if render_step_size is not None else (far - near) / num_samples
    counter = [0]

    def sigma_fn(t0: Tensor, t1: Tensor, ridx: Tensor) -> Tensor:
        pts = rays_o[ridx] + rays_d[ridx] * ((t0 + t1) / 2)[:, None]
        counter[0] += pts.shape[0]
        if density_fn is not None:
            return density_fn(pts).reshape(-1)
        return field_fn(pts, rays_d[ridx])[1].reshape(-1)

    skip = early_stop_eps > 0 or alpha_thre > 0
    kwargs = dict(near_plane=near, far_plane=far, render_step_size=step, early_stop_eps=early_stop_eps,
                  alpha_thre=alpha_thre, stratified=stratified, cone_angle=cone_angle)
    if generator is not None and _accepts_generator(estimator):
        kwargs["generator"] = generator
    ray_indices, t_starts, t_ends = estimator.sampling(rays_o, rays_d, sigma_fn=sigma_fn if skip else None,
                                                       **kwargs)
    ray_indices = ray_indices.long()
    points = rays_o[ray_indices] + rays_d[ray_indices] * ((t_starts + t_ends) / 2)[:, None]
    if points.shape[0] > 0:
        rgbs, sigmas = field_fn(points, rays_d[ray_indices])
        sigmas = sigmas.reshape(-1)
    else:  # nothing occupied along any ray: keep the graph-free empty result well-shaped
        rgbs = torch.zeros(0, 3, dtype=rays_o.dtype, device=rays_o.device)
        sigmas = torch.zeros(0, dtype=rays_o.dtype, device=rays_o.device)
    rgb, opacity, depth, weights = composite(rgbs, sigmas, t_starts, t_ends, ray_indices, n_rays, background)
    return VolumeRender(rgb, opacity, depth, weights, t_starts, t_ends, ray_indices,
                        counter[0] + points.shape[0])


def _accepts_generator(estimator: RayEstimator) -> bool:
    """Whether ``estimator.sampling`` takes a ``generator`` (the kernel's grid does, nerfacc's does not)."""
    try:
        return "generator" in inspect.signature(estimator.sampling).parameters
    except (TypeError, ValueError):  # a builtin or C-level callable without a signature
        return False


def render_cameras(
    field_fn: FieldFn,
    cameras,
    near: float,
    far: float,
    chunk: int = 1 << 14,
    **kwargs,
) -> tuple[Tensor, Tensor, Tensor]:
    """Full images of a field: rgb ``[C, H, W, 3]``, alpha ``[C, H, W, 1]``, depth ``[C, H, W, 1]``.

    Rays go through :func:`render_rays` in chunks of ``chunk``; ``kwargs`` are passed on (estimator,
    num_samples, background, ...).
    """
    from avatar_core.render.rays import generate_rays

    origins, dirs = generate_rays(cameras)
    C, H, W = len(cameras), cameras.height, cameras.width
    origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    outs = [render_rays(field_fn, origins[i:i + chunk], dirs[i:i + chunk], near, far, **kwargs)
            for i in range(0, origins.shape[0], chunk)]
    rgb = torch.cat([o.rgb for o in outs]).reshape(C, H, W, -1)
    alpha = torch.cat([o.opacity for o in outs]).reshape(C, H, W, 1)
    depth = torch.cat([o.depth for o in outs]).reshape(C, H, W, 1)
    return rgb, alpha, depth


