"""Dense reference renderer for 3D Gaussians: every Gaussian against every pixel, for tests and benchmarks.

Deliberately independent of the CPU backend: projection and SH come from gsplat's pure-PyTorch
implementation, compositing from ``nerfacc.render_weight_from_alpha`` on a batched [pixels,
Gaussians] alpha matrix. Memory and time grow as pixels x Gaussians, so keep scenes small.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _composite_chunk(pix: Tensor, means2d: Tensor, conics: Tensor, opac: Tensor, cols: Tensor):
    """Colour [P, D] and alpha [P] of pixel centres ``pix`` [P, 2] over depth-sorted Gaussians [M]."""
    from nerfacc import render_weight_from_alpha

    d = means2d[None, :, :] - pix[:, None, :]  # [P, M, 2]
    sigma = 0.5 * (conics[:, 0] * d[..., 0] ** 2 + conics[:, 2] * d[..., 1] ** 2) + conics[:, 1] * d[..., 0] * d[..., 1]
    alpha = torch.clamp(opac * torch.exp(-sigma), max=0.999)
    alpha = torch.where((sigma >= 0) & (alpha >= 1.0 / 255.0), alpha, torch.zeros_like(alpha))
    _, trans = render_weight_from_alpha(alpha)
    # A pixel stops before the Gaussian whose alpha would take its transmittance to 1e-4 or below.
    keep = (trans * (1.0 - alpha) > 1e-4).detach()
    weights, _ = render_weight_from_alpha(alpha * keep)
    return weights @ cols, weights.sum(-1)


def render_dense(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, D] or [N, K, 3]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,  # [C, D]
    render_mode: str = "RGB",
    rasterize_mode: str = "classic",
    pixel_chunk: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference colours [C, H, W, X], alphas [C, H, W, 1] and 2D means [C, N, 2] (gsplat.rasterization semantics).

    ``pixel_chunk`` renders that many pixels at a time under activation checkpointing, which
    bounds memory at the price of a second forward pass during backward.
    """
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics

    C = viewmats.shape[0]
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, comp = _fully_fused_projection(
        means, covars, viewmats, Ks, width, height, eps2d, near_plane, far_plane,
        calc_compensations=(rasterize_mode == "antialiased"),
    )
    opac = opacities[None].expand(C, -1)
    if comp is not None:
        opac = opac * comp
    if sh_degree is None:
        cols = colors[None].expand(C, *colors.shape)
    else:
        campos = torch.inverse(viewmats)[:, :3, 3]
        dirs = means[None] - campos[:, None]
        cols = torch.clamp_min(_spherical_harmonics(sh_degree, dirs, colors[None].expand(C, *colors.shape)) + 0.5, 0.0)
    if render_mode in ("RGB+D", "RGB+ED"):
        cols = torch.cat([cols, depths[..., None]], -1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(C, 1)], -1)
    elif render_mode in ("D", "ED"):
        cols = depths[..., None]
        backgrounds = None

    jj, ii = torch.meshgrid(torch.arange(width), torch.arange(height), indexing="xy")
    pix = torch.stack([jj, ii], -1).reshape(-1, 2).to(means.dtype) + 0.5  # [H * W, 2] pixel centres
    images, alphas = [], []
    for c in range(C):
        valid = (radii[c] > 0).all(-1)
        order = torch.argsort(depths[c].detach(), stable=True)
        order = order[valid[order]]
        args = (means2d[c, order], conics[c, order], opac[c, order], cols[c, order])
        step = pixel_chunk or pix.shape[0]
        outs = []
        for s in range(0, pix.shape[0], step):
            if pixel_chunk:
                outs.append(checkpoint(_composite_chunk, pix[s : s + step], *args, use_reentrant=False))
            else:
                outs.append(_composite_chunk(pix[s : s + step], *args))
        images.append(torch.cat([o[0] for o in outs]).view(height, width, -1))
        alphas.append(torch.cat([o[1] for o in outs]).view(height, width, 1))
    render, alpha = torch.stack(images), torch.stack(alphas)
    if backgrounds is not None:
        render = render + (1.0 - alpha) * backgrounds[:, None, None, :]
    if render_mode in ("ED", "RGB+ED"):
        render = torch.cat([render[..., :-1], render[..., -1:] / alpha.clamp(min=1e-10)], -1)
    return render, alpha, means2d
