"""Volume rendering of radiance fields (NeRF quadrature) and triplane feature sampling.

Compositing follows ``nerfacc.volrend``: ``alpha_i = 1 - exp(-sigma_i * dt_i)``, ``T_i = exp(-sum_{j<i} sigma_j dt_j)``,
``w_i = T_i alpha_i``; colour, opacity and depth are weight sums (depth normalised by opacity, as nerfacc does).
Samples come either batched (``[n_rays, n_samples]``, uniform sampling) or packed (``[n_samples]`` with sorted
``ray_indices``, from an occupancy grid). nerfacc 0.5.3's batched path is pure PyTorch and is used on every
device; its packed path needs its CUDA extension (``pack_info`` and the segmented scans), so packed samples on
a CPU go through the project's own segmented scan below, which the tests compare with nerfacc's batched path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from nerfacc.volrend import accumulate_along_rays, render_weight_from_density
from torch import Tensor

from avatar_core.errors import InputError

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
]

#: ``field_fn(points [N, 3], directions [N, 3]) -> (rgb [N, 3], sigma [N])`` (post-activation density).
FieldFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


# ---------------------------------------------------------------------------------------------------------------
# Compositing
# ---------------------------------------------------------------------------------------------------------------
def _check_sorted(ray_indices: Tensor) -> None:
    if ray_indices.numel() > 1 and bool((ray_indices[1:] < ray_indices[:-1]).any()):
        raise InputError("packed samples must be grouped by ray (ray_indices non-decreasing)",
                         "sort the samples by ray index, as OccupancyGrid.sampling returns them")


def packed_exclusive_sum(
    values: Tensor,  # [S] samples grouped by ray
    ray_indices: Tensor,  # [S] non-decreasing
) -> Tensor:  # [S]
    """Per-ray exclusive prefix sum of packed samples (differentiable).

    The samples are laid out as a padded ``[rays, longest ray]`` matrix and summed along each row, so a ray's
    sum never passes through the running total of the rays before it (a single global cumulative sum minus
    per-ray offsets loses a ray's small optical depths next to a huge one earlier in the batch).
    """
    if values.numel() == 0:
        return values.clone()
    first = torch.ones_like(ray_indices, dtype=torch.bool)
    first[1:] = ray_indices[1:] != ray_indices[:-1]
    pos = torch.arange(values.shape[0], device=values.device)
    start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), dim=0).values
    row = torch.cumsum(first.long(), dim=0) - 1
    col = pos - start
    padded = values.new_zeros(int(row[-1]) + 1, int(col.max()) + 1).index_put((row, col), values)
    return (torch.cumsum(padded, dim=1) - padded)[row, col]


def render_weights(
    t_starts: Tensor,  # [n_rays, n_samples] or [S]
    t_ends: Tensor,  # same
    sigmas: Tensor,  # same
    ray_indices: Tensor | None = None,  # [S] when packed
    n_rays: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rendering weights, transmittance and alphas from densities, each shaped like ``sigmas``."""
    if ray_indices is None:
        return render_weight_from_density(t_starts, t_ends, sigmas)
    if ray_indices.is_cuda:
        return render_weight_from_density(t_starts, t_ends, sigmas, ray_indices=ray_indices, n_rays=n_rays)
    _check_sorted(ray_indices)
    sigmas_dt = sigmas * (t_ends - t_starts)
    alphas = 1.0 - torch.exp(-sigmas_dt)
    trans = torch.exp(-packed_exclusive_sum(sigmas_dt, ray_indices))
    return trans * alphas, trans, alphas


@torch.no_grad()
def render_visibility(
    t_starts: Tensor,  # [S]
    t_ends: Tensor,  # [S]
    sigmas: Tensor,  # [S]
    ray_indices: Tensor,  # [S]
    n_rays: int,
    early_stop_eps: float = 1e-4,
    alpha_thre: float = 0.0,
) -> Tensor:  # [S] bool
    """Samples still visible (``T >= early_stop_eps`` and ``alpha >= alpha_thre``), as nerfacc decides it."""
    _, trans, alphas = render_weights(t_starts, t_ends, sigmas, ray_indices, n_rays)
    vis = trans >= early_stop_eps
    if alpha_thre > 0:
        vis = vis & (alphas >= alpha_thre)
    return vis


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


def composite(
    rgbs: Tensor,  # [..., 3] like sigmas plus a channel
    sigmas: Tensor,  # [n_rays, n_samples] or [S]
    t_starts: Tensor,
    t_ends: Tensor,
    ray_indices: Tensor | None = None,
    n_rays: int | None = None,
    background: Tensor | None = None,  # [3] or [n_rays, 3]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Colour ``[n_rays, D]``, opacity ``[n_rays, 1]``, depth ``[n_rays, 1]`` and weights (nerfacc.rendering's rules)."""
    weights, _, _ = render_weights(t_starts, t_ends, sigmas, ray_indices, n_rays)
    rgb = accumulate_along_rays(weights, rgbs, ray_indices, n_rays)
    opacity = accumulate_along_rays(weights, None, ray_indices, n_rays)
    depth = accumulate_along_rays(weights, ((t_starts + t_ends) / 2)[..., None], ray_indices, n_rays)
    depth = depth / opacity.clamp_min(torch.finfo(opacity.dtype).eps)
    if background is not None:
        rgb = rgb + background * (1.0 - opacity)
    return rgb, opacity, depth, weights


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
    estimator=None,
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


def _accepts_generator(estimator) -> bool:
    from avatar_core.render.occupancy import OccupancyGrid

    return isinstance(estimator, OccupancyGrid)


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


# ---------------------------------------------------------------------------------------------------------------
# Triplanes
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
    feats = F.grid_sample(planes.reshape(B * 3, C, H, W), coords.reshape(B * 3, 1, -1, 2), mode="bilinear",
                          padding_mode=padding_mode, align_corners=align_corners)  # [B*3, C, 1, N]
    feats = feats.reshape(B, 3, C, -1).permute(0, 3, 1, 2)  # [B, N, 3, C]
    if reduce == "none":
        return feats
    if reduce == "sum":
        return feats.sum(dim=2)
    if reduce == "mean":
        return feats.mean(dim=2)
    if reduce == "concat":
        return feats.reshape(B, feats.shape[1], 3 * C)
    raise InputError(f"unknown triplane reduction {reduce!r}", "use one of none, sum, mean, concat")
