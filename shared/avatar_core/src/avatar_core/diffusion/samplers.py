"""Discrete samplers on x0 predictions: DDPM posterior and ancestral step, DDIM step, timestep respacing.

Every function takes the chain's ``alphas_cumprod`` ``[T]`` and integer indices ``t`` into it (a scalar or
one per sample ``[B]``), so a respaced chain is used by passing its own alphas_cumprod and indices. Models
that predict eps or v convert to x0 first (:func:`~avatar_core.diffusion.parameterization.convert`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from avatar_core.diffusion.parameterization import alpha_bar_at, expand_to
from avatar_core.errors import InputError

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


def _step_terms(t: int | Tensor, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """alpha_bar_t, alpha_bar_{t-1} (1 at t = 0) and beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, float64."""
    idx = torch.as_tensor(t, device=alphas_cumprod.device)
    if bool((idx < 0).any()):
        raise InputError(f"step index t must be >= 0 here, got {int(idx.min())}", "pass t in 0..T-1")
    ab_t = alpha_bar_at(idx, alphas_cumprod)
    ab_prev = alpha_bar_at(idx - 1, alphas_cumprod)  # index -1 is the clean level
    return ab_t, ab_prev, 1.0 - ab_t / ab_prev


def _posterior_variance(t: int | Tensor, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """Posterior variance beta_t (1 - abar_{t-1}) / (1 - abar_t) and its log clipped at t = 0, float64."""
    ab_t, ab_prev, beta = _step_terms(t, alphas_cumprod)
    variance = beta * (1.0 - ab_prev) / (1.0 - ab_t)
    # The variance is 0 at t = 0; improved-diffusion logs the t = 1 value there instead. A one-step chain has
    # no t = 1: its log-variance at t = 0 is never used to add noise, so beta_0 stands in.
    if alphas_cumprod.shape[0] >= 2:
        ab_1, ab_0, beta_1 = _step_terms(1, alphas_cumprod)
        var_1 = beta_1 * (1.0 - ab_0) / (1.0 - ab_1)
    else:
        var_1 = 1.0 - alpha_bar_at(0, alphas_cumprod)
    idx = torch.as_tensor(t, device=variance.device)
    return variance, torch.log(torch.where(idx > 0, variance, var_1))


def posterior_mean_variance(
    x0: Tensor,  # [B, ...] predicted (or true) clean sample
    x_t: Tensor,  # [B, ...]
    t: int | Tensor,  # scalar or [B]
    alphas_cumprod: Tensor,  # [T]
) -> tuple[Tensor, Tensor, Tensor]:  # mean [B, ...], variance and clipped log-variance (t's shape, float64)
    """Mean and variance of q(x_{t-1} | x_t, x0) (Ho et al. 2020, Eqs. 6-7).

    The log-variance at t = 0, where the variance is 0, takes the value at t = 1, as improved-diffusion does.
    """
    ab_t, ab_prev, beta = _step_terms(t, alphas_cumprod)
    coef_x0 = beta * ab_prev.sqrt() / (1.0 - ab_t)
    coef_xt = (1.0 - ab_prev) * (1.0 - beta).sqrt() / (1.0 - ab_t)
    mean = expand_to(coef_x0, x_t) * x0 + expand_to(coef_xt, x_t) * x_t
    variance, log_variance = _posterior_variance(t, alphas_cumprod)
    return mean, variance, log_variance


def model_log_variance(
    t: int | Tensor,  # scalar or [B]
    alphas_cumprod: Tensor,  # [T]
    variance_type: str = "fixed_small",
    model_var_values: Tensor | None = None,  # [B, ...] in [-1, 1], for learned_range
) -> Tensor:  # t's shape (fixed) or model_var_values' shape (learned_range), float64
    """log of the reverse-step variance (Nichol & Dhariwal 2021, Sec. 3.1).

    ``fixed_small``: the posterior variance (log clipped at t = 0). ``fixed_large``: beta_t, with the
    posterior variance at t = 1 in place of beta_0 (improved-diffusion). ``learned_range``: the model's
    variance output r in [-1, 1] interpolates log beta_t (r = 1) and the clipped log posterior variance (r = -1).
    """
    if variance_type not in VARIANCE_TYPES:
        raise InputError(f"unknown variance type {variance_type!r}", f"use one of: {', '.join(VARIANCE_TYPES)}")
    _, _, beta = _step_terms(t, alphas_cumprod)
    _, log_small = _posterior_variance(t, alphas_cumprod)
    if variance_type == "fixed_small":
        return log_small
    idx = torch.as_tensor(t, device=beta.device)
    log_large = torch.where(idx > 0, torch.log(beta), log_small)
    if variance_type == "fixed_large":
        return log_large
    if model_var_values is None:
        raise InputError(
            "variance_type 'learned_range' needs the model's variance output",
            "pass model_var_values (the second half of the model's output channels, in [-1, 1])",
        )
    frac = (model_var_values.to(torch.float64) + 1.0) / 2.0
    return frac * expand_to(torch.log(beta), frac) + (1.0 - frac) * expand_to(log_small, frac)


def ddpm_step(
    x0: Tensor,  # [B, ...] predicted clean sample
    x_t: Tensor,  # [B, ...]
    t: int | Tensor,  # scalar or [B]
    alphas_cumprod: Tensor,  # [T]
    noise: Tensor,  # [B, ...]
    variance_type: str = "fixed_small",
    model_var_values: Tensor | None = None,  # [B, ...] for learned_range
) -> Tensor:  # [B, ...] x_{t-1}
    """Ancestral step x_{t-1} ~ p(x_{t-1} | x_t) = N(posterior mean, model variance); no noise at t = 0."""
    mean, _, _ = posterior_mean_variance(x0, x_t, t, alphas_cumprod)
    log_var = model_log_variance(t, alphas_cumprod, variance_type, model_var_values)
    std = expand_to(torch.exp(0.5 * log_var), x_t)
    idx = torch.as_tensor(t, device=x_t.device)
    nonzero = expand_to(idx > 0, x_t)
    return mean + nonzero * std * noise


def ddim_step(
    x0: Tensor,  # [B, ...] predicted clean sample
    x_t: Tensor,  # [B, ...]
    t: int | Tensor,  # scalar or [B]
    t_prev: int | Tensor,  # scalar or [B]; negative = the clean level
    alphas_cumprod: Tensor,  # [T]
    eta: float = 0.0,
    noise: Tensor | None = None,  # [B, ...], needed when eta > 0
    eps: Tensor | None = None,  # [B, ...] the model's eps if it predicted eps (skips recomputing it)
) -> Tensor:  # [B, ...] x_{t_prev}
    """DDIM update (Song et al. 2021, Eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
    ab_t = alpha_bar_at(t, alphas_cumprod)
    ab_prev = alpha_bar_at(t_prev, alphas_cumprod)
    if eps is None:
        eps = (x_t - expand_to(ab_t.sqrt(), x_t) * x0) / expand_to((1.0 - ab_t).sqrt(), x_t)
    sigma = eta * ((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)).sqrt()
    direction = (1.0 - ab_prev - sigma**2).clamp(min=0.0).sqrt()  # clamp: round-off at sigma^2 ~ 1 - ab_prev
    out = expand_to(ab_prev.sqrt(), x_t) * x0 + expand_to(direction, x_t) * eps
    if eta > 0:
        if noise is None:
            raise InputError("ddim_step with eta > 0 needs noise", "pass noise=torch.randn_like(x_t)")
        out = out + expand_to(sigma, x_t) * noise
    return out


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Timesteps kept when respacing a chain (improved-diffusion's ``space_timesteps``), ascending.

    ``section_counts``: ``"ddimK"`` keeps range(0, T, stride) for the integer stride giving exactly K steps;
    otherwise a list (or comma-separated string) of counts: the chain is cut into that many equal sections
    (the first ``T % n`` one step longer) and each section keeps that many evenly spaced steps, rounded.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise InputError(
                f"no integer stride gives exactly {want} of {num_timesteps} steps",
                "pick a DDIM step count that divides the chain evenly (e.g. ddim50 for 1000), or a list of counts",
            )
        section_counts = [int(c) for c in section_counts.split(",")]
    n = len(section_counts)
    size_per, extra = divmod(num_timesteps, n)
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise InputError(
                f"cannot keep {count} steps out of a section of {size}",
                f"ask for at most {size} steps in each of the {n} sections",
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept.update(start + round(k * stride) for k in range(count))
        start += size
    return sorted(kept)


@dataclass(frozen=True, eq=False)
class Respaced:
    """A respaced chain: the original indices it keeps and its own betas / alphas_cumprod."""

    timesteps: Tensor  # [K] long, original step indices (what the model is conditioned on), ascending
    betas: Tensor  # [K] float64
    alphas_cumprod: Tensor  # [K] float64, equal to the original alphas_cumprod at `timesteps`


def respace(alphas_cumprod: Tensor, use_timesteps: Iterable[int]) -> Respaced:
    """Shorter chain through the kept steps: beta'_k = 1 - abar[t_k] / abar[t_{k-1}] (improved-diffusion)."""
    ac = alphas_cumprod.to(torch.float64)
    kept = sorted({int(i) for i in use_timesteps})
    if not kept or kept[0] < 0 or kept[-1] >= ac.shape[0]:
        raise InputError(
            f"timesteps to keep must be a non-empty subset of 0..{ac.shape[0] - 1}",
            "build them with space_timesteps(T, 'ddim50') or a list of counts",
        )
    idx = torch.tensor(kept, dtype=torch.long, device=ac.device)
    new_ac = ac[idx]
    prev = torch.cat([torch.ones(1, dtype=torch.float64, device=ac.device), new_ac[:-1]])
    return Respaced(timesteps=idx, betas=1.0 - new_ac / prev, alphas_cumprod=new_ac)
