"""gsplat's densification strategies on every backend of :func:`~avatar_core.render.rasterize_gaussians`.

``gsplat.strategy.DefaultStrategy`` (3DGS's clone / split / prune) is pure PyTorch and reads only the meta keys
the kernel rasterizer returns on both backends: use it unchanged (call ``step_post_backward(..., packed=False)``).

``gsplat.strategy.MCMCStrategy`` (3DGS as MCMC, Kheradmand et al. 2024) reads no meta, but two of its ops are
gsplat CUDA kernels: the relocation of Eq. 9 and the covariance used for the position noise. :class:`MCMCStrategy`
here is gsplat's, with those two in PyTorch for tensors that are not on CUDA (on CUDA it is gsplat's own code
path); the rest of the algorithm (which Gaussians are dead, multinomial sampling by opacity, the 5% growth up to
``cap_max``, the noise schedule, the optimizer-state surgery) follows gsplat 1.5's ``strategy/ops.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from gsplat.strategy import MCMCStrategy as _GsplatMCMC
from gsplat.strategy.ops import _multinomial_sample, _update_param_with_optimizer
from torch import Tensor

from avatar_core.rotations import quaternion_to_matrix

__all__ = ["MCMCStrategy", "compute_relocation", "inject_noise_to_position"]


def compute_relocation(
    opacities: Tensor,  # [N] of the sampled Gaussians
    scales: Tensor,  # [N, 3]
    ratios: Tensor,  # [N] how many Gaussians will share each one (itself included)
    binoms: Tensor,  # [n_max, n_max] binomial coefficients C(n, k)
) -> tuple[Tensor, Tensor]:
    """Opacities and scales of the ``ratios`` Gaussians that replace one (Kheradmand et al. 2024, Eq. 9).

    ``o' = 1 - (1 - o)^(1 / n)``, so n copies composite to the old opacity; ``s' = o / D * s`` with
    ``D = sum_{i=1..n} sum_{k=0..i-1} C(i-1, k) (-1)^k o'^(k+1) / sqrt(k+1)``, so their summed footprint keeps the
    old one's. ``ratios`` is clamped to ``[1, n_max]`` as gsplat does.
    """
    n_max = binoms.shape[0]
    n = ratios.clamp(1, n_max).long()
    new_opacities = 1.0 - torch.pow(1.0 - opacities, 1.0 / n.to(opacities.dtype))
    # sum_{i=1..n} C(i-1, k) over the rows of the table (C(i-1, k) = 0 for k >= i): a cumulative sum.
    row_sums = torch.cumsum(binoms.to(opacities.dtype), dim=0)[n - 1]  # [N, n_max], k = 0..n_max-1
    k = torch.arange(n_max, dtype=opacities.dtype, device=opacities.device)
    terms = (-1.0) ** k / torch.sqrt(k + 1.0) * new_opacities[:, None] ** (k + 1.0)
    denom = (row_sums * terms).sum(-1)
    return new_opacities, (opacities / denom)[:, None] * scales


def _split_drawn(params, opacities: Tensor, sampled: Tensor, binoms: Tensor, min_opacity: float):
    """Eq. 9 for the drawn Gaussians (each shared by itself and its copies): ``write(name, p)`` stores the new
    opacity / scale logits into ``p`` at the drawn indices."""
    eps = torch.finfo(torch.float32).eps
    new_o, new_s = compute_relocation(opacities[sampled], torch.exp(params["scales"])[sampled],
                                      torch.bincount(sampled)[sampled] + 1, binoms)
    new_o = torch.clamp(new_o, max=1.0 - eps, min=min_opacity)

    def write(name: str, p: Tensor) -> None:
        if name == "opacities":
            p[sampled] = torch.logit(new_o)
        elif name == "scales":
            p[sampled] = torch.log(new_s)

    return write


@torch.no_grad()
def _relocate(params, optimizers, mask: Tensor, binoms: Tensor, min_opacity: float) -> None:
    """Move the Gaussians of ``mask`` (dead) onto live ones drawn by opacity; the drawn ones are split (Eq. 9)."""
    opacities = torch.sigmoid(params["opacities"])
    dead = mask.nonzero(as_tuple=True)[0]
    alive = (~mask).nonzero(as_tuple=True)[0]
    sampled = alive[_multinomial_sample(opacities[alive].flatten(), len(dead), replacement=True)]
    write = _split_drawn(params, opacities, sampled, binoms, min_opacity)

    def param_fn(name: str, p: Tensor) -> Tensor:
        write(name, p)
        p[dead] = p[sampled]
        return torch.nn.Parameter(p, requires_grad=p.requires_grad)

    def optimizer_fn(key: str, v: Tensor) -> Tensor:
        v[sampled] = 0
        return v

    _update_param_with_optimizer(param_fn, optimizer_fn, params, optimizers)


@torch.no_grad()
def _sample_add(params, optimizers, n: int, binoms: Tensor, min_opacity: float) -> None:
    """Add ``n`` Gaussians as copies of ones drawn by opacity, each drawn one split with its copies (Eq. 9)."""
    opacities = torch.sigmoid(params["opacities"])
    sampled = _multinomial_sample(opacities.flatten(), n, replacement=True)
    write = _split_drawn(params, opacities, sampled, binoms, min_opacity)

    def param_fn(name: str, p: Tensor) -> Tensor:
        write(name, p)
        return torch.nn.Parameter(torch.cat([p, p[sampled]]), requires_grad=p.requires_grad)

    def optimizer_fn(key: str, v: Tensor) -> Tensor:
        return torch.cat([v, torch.zeros((len(sampled), *v.shape[1:]), device=v.device, dtype=v.dtype)])

    _update_param_with_optimizer(param_fn, optimizer_fn, params, optimizers)


@torch.no_grad()
def inject_noise_to_position(params, scaler: float) -> None:
    """SGLD noise on the means, shaped by each Gaussian's covariance and gated to nearly transparent ones."""
    opacities = torch.sigmoid(params["opacities"].flatten())
    scales = torch.exp(params["scales"])
    M = quaternion_to_matrix(params["quats"]) * scales[:, None, :]
    covars = M @ M.transpose(-1, -2)  # R S S^T R^T
    gate = 1.0 / (1.0 + torch.exp(-100.0 * ((1.0 - opacities) - 0.995)))
    noise = torch.randn_like(params["means"]) * gate[:, None] * scaler
    params["means"].add_(torch.einsum("bij,bj->bi", covars, noise))


@dataclass
class MCMCStrategy(_GsplatMCMC):
    """gsplat's ``MCMCStrategy`` (same fields and defaults) that also runs on CPU tensors (module docstring)."""

    def step_post_backward(self, params, optimizers, state: dict[str, Any], step: int, info: dict[str, Any],
                           lr: float) -> None:
        if params["means"].is_cuda:
            return super().step_post_backward(params, optimizers, state, step, info, lr)
        state["binoms"] = state["binoms"].to(params["means"].device)
        binoms = state["binoms"]
        if self.refine_start_iter < step < self.refine_stop_iter and step % self.refine_every == 0:
            dead = torch.sigmoid(params["opacities"].flatten()) <= self.min_opacity
            n_dead = int(dead.sum())
            if n_dead > 0:
                _relocate(params, optimizers, dead, binoms, self.min_opacity)
            n_now = len(params["means"])
            n_new = max(0, min(self.cap_max, int(1.05 * n_now)) - n_now)
            if n_new > 0:
                _sample_add(params, optimizers, n_new, binoms, self.min_opacity)
            if self.verbose:
                print(f"Step {step}: Relocated {n_dead} GSs.")
                print(f"Step {step}: Added {n_new} GSs. Now having {len(params['means'])} GSs.")
        inject_noise_to_position(params, lr * self.noise_lr)
