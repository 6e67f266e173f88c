"""Compositing of radiance-field samples along rays (NeRF quadrature), apart from how samples are chosen.

Follows ``nerfacc.volrend``: ``alpha_i = 1 - exp(-sigma_i * dt_i)``, ``T_i = exp(-sum_{j<i} sigma_j dt_j)``,
``w_i = T_i alpha_i``; colour, opacity and depth are weight sums (depth normalised by opacity, as nerfacc does).
Samples come batched (``[n_rays, n_samples]``) or packed (``[S]`` with non-decreasing ``ray_indices``, from an
estimator). nerfacc 0.5.3's batched path is pure PyTorch and is used on every device; its packed path needs its
CUDA extension (``pack_info`` and the segmented scans), so packed samples off CUDA go through the project's own
per-ray scan (:func:`packed_exclusive_sum`), which the tests compare with nerfacc's batched path.
"""

from __future__ import annotations

import torch
from nerfacc.volrend import accumulate_along_rays, render_weight_from_density
from torch import Tensor

from avatar_core.errors import InputError

__all__ = ["composite", "distortion_loss", "packed_exclusive_sum", "render_visibility", "render_weights"]


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


def distortion_loss(
    weights: Tensor,  # [n_rays, n_samples] or [S]
    t_starts: Tensor,  # same
    t_ends: Tensor,  # same
    ray_indices: Tensor | None = None,  # [S] non-decreasing, when packed
    n_rays: int | None = None,
) -> Tensor:  # [n_rays]
    """mip-NeRF 360's distortion loss per ray (Barron et al. 2022, Eq. 15), on the intervals as given:

    ``sum_ij w_i w_j |m_i - m_j| + 1/3 sum_i w_i^2 (t_end_i - t_start_i)``, m the interval midpoints, computed in
    O(n) with the exclusive prefix sums of ``w`` and ``w m`` along each ray (samples sorted by distance). Pass
    normalised distances to get the paper's s-space version.
    """
    mids = 0.5 * (t_starts + t_ends)
    wm = weights * mids
    if ray_indices is None:
        w_before = torch.cumsum(weights, dim=-1) - weights
        wm_before = torch.cumsum(wm, dim=-1) - wm
        inter = 2.0 * weights * (mids * w_before - wm_before)
        return inter.sum(-1) + (weights.pow(2) * (t_ends - t_starts)).sum(-1) / 3.0
    _check_sorted(ray_indices)
    inter = 2.0 * weights * (mids * packed_exclusive_sum(weights, ray_indices)
                             - packed_exclusive_sum(wm, ray_indices))
    per_sample = inter + weights.pow(2) * (t_ends - t_starts) / 3.0
    n = int(n_rays) if n_rays is not None else (int(ray_indices.max()) + 1 if ray_indices.numel() else 0)
    return per_sample.new_zeros(n).index_add(0, ray_indices, per_sample)
