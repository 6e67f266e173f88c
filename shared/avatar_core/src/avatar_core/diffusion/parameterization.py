"""What a denoiser predicts -- eps, x0 or v -- and the forward process q(x_t | x_0).

With ``x_t = alpha x_0 + sigma eps`` and alpha^2 + sigma^2 = 1 (variance preserving), the velocity is
``v = alpha eps - sigma x_0`` (Salimans & Ho 2022, Sec. 4). Noise levels come either as ``(alpha, sigma)``
directly, or as a time ``t`` plus a ``schedule``, which is either

- a :class:`~avatar_core.diffusion.schedules.NoiseSchedule` with continuous ``t`` in [0, 1], or
- an ``alphas_cumprod`` tensor ``[T]`` with integer step indices ``t``; a **negative** index means the
  clean level (alpha_bar = 1), as diffusers uses ``prev_timestep < 0`` for the end of sampling.

Scalars, per-sample ``[B]`` tensors and tensors of the sample's full rank all broadcast over the sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from avatar_core.diffusion.schedules import NoiseSchedule
from avatar_core.errors import InputError

#: Names a prediction type goes by (ours, diffusers' ``prediction_type``, improved-diffusion's).
PREDICTION_KINDS: dict[str, str] = {
    "eps": "eps",
    "epsilon": "eps",
    "x0": "x0",
    "sample": "x0",
    "start_x": "x0",
    "v": "v",
    "v_prediction": "v",
}

ScheduleLike = NoiseSchedule | Tensor
Coef = float | Tensor


def prediction_kind(name: str) -> str:
    """Canonical prediction type ``eps``, ``x0`` or ``v`` for any of its names."""
    key = str(name).strip().lower()
    if key not in PREDICTION_KINDS:
        raise InputError(
            f"unknown prediction type {name!r}",
            f"use one of: {', '.join(PREDICTION_KINDS)}",
        )
    return PREDICTION_KINDS[key]


def expand_to(value: Coef, x: Tensor, dims: Sequence[int] = (0,)) -> Tensor:
    """Reshape ``value`` so its axes sit at ``dims`` of ``x`` (size 1 elsewhere), in x's dtype and device.

    0-d values and values of x's full rank pass through; e.g. ``[B]`` with dims (0,) -> ``[B, 1, ..., 1]``,
    ``[B, F]`` with dims (0, 1) -> ``[B, F, 1, ..., 1]``.
    """
    dtype = x.dtype if x.is_floating_point() else None
    v = torch.as_tensor(value, device=x.device, dtype=dtype)
    if v.ndim == 0 or v.ndim == x.ndim:
        return v
    if v.ndim != len(dims):
        raise InputError(
            f"cannot broadcast a value of shape {tuple(v.shape)} over a sample of shape {tuple(x.shape)}",
            f"pass a scalar, a tensor with {len(dims)} dim(s) for axes {tuple(dims)}, or one of rank {x.ndim}",
        )
    shape = [1] * x.ndim
    for k, d in enumerate(dims):
        d = d % x.ndim
        if v.shape[k] not in (1, x.shape[d]):
            raise InputError(
                f"value of shape {tuple(v.shape)} does not match sample axis {d} of size {x.shape[d]}",
                f"give axis {k} of the value size {x.shape[d]} (or 1)",
            )
        shape[d] = v.shape[k]
    return v.reshape(shape)


def alpha_bar_at(t: int | Tensor, alphas_cumprod: Tensor) -> Tensor:  # t's shape, float64
    """alphas_cumprod[t] in float64, with 1 (the clean level) wherever t < 0."""
    ac = alphas_cumprod.to(torch.float64)
    idx = torch.as_tensor(t, device=ac.device)
    if idx.is_floating_point():
        raise InputError(
            "integer step indices are needed with an alphas_cumprod tensor, got floating-point t",
            "pass t as a long tensor or int, or pass a NoiseSchedule for continuous t in [0, 1]",
        )
    if bool((idx >= ac.shape[0]).any()):
        raise InputError(
            f"step index {int(idx.max())} is out of range for {ac.shape[0]} steps",
            f"use indices 0..{ac.shape[0] - 1} (or a negative one for the clean level)",
        )
    return torch.where(idx >= 0, ac[idx.clamp(min=0).long()], torch.ones((), dtype=torch.float64, device=ac.device))


def alpha_sigma(t: float | int | Tensor, schedule: ScheduleLike) -> tuple[Tensor, Tensor]:  # float64, t's shape
    """(alpha, sigma) at t for a NoiseSchedule (continuous t) or an alphas_cumprod tensor (integer t)."""
    if isinstance(schedule, NoiseSchedule):
        # Ask in float64 so a float32 t does not round alpha_bar before sqrt and 1 - alpha_bar.
        ab = schedule.alpha_bar(t.to(torch.float64) if isinstance(t, Tensor) else float(t))
    else:
        ab = alpha_bar_at(t, schedule)
    return ab.sqrt(), (1.0 - ab).sqrt()


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
    """x0 = (x_t - sigma eps) / alpha."""
    return (x_t - expand_to(sigma, x_t) * eps) / expand_to(alpha, x_t)


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
    """eps = (x_t - alpha x0) / sigma."""
    return (x_t - expand_to(alpha, x_t) * x0) / expand_to(sigma, x_t)


def x0_from_v(x_t: Tensor, v: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
    """x0 = alpha x_t - sigma v."""
    return expand_to(alpha, x_t) * x_t - expand_to(sigma, x_t) * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
    """eps = sigma x_t + alpha v."""
    return expand_to(sigma, x_t) * x_t + expand_to(alpha, x_t) * v


def v_from_eps(x_t: Tensor, eps: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
    """v = alpha eps - sigma x0 with x0 from (x_t, eps)."""
    return expand_to(alpha, x_t) * eps - expand_to(sigma, x_t) * x0_from_eps(x_t, eps, alpha, sigma)


def v_from_x0(x_t: Tensor, x0: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
    """v = alpha eps - sigma x0 with eps from (x_t, x0)."""
    return expand_to(alpha, x_t) * eps_from_x0(x_t, x0, alpha, sigma) - expand_to(sigma, x_t) * x0


_CONVERT = {
    ("eps", "x0"): x0_from_eps,
    ("eps", "v"): v_from_eps,
    ("x0", "eps"): eps_from_x0,
    ("x0", "v"): v_from_x0,
    ("v", "x0"): x0_from_v,
    ("v", "eps"): eps_from_v,
}


def convert(
    pred: Tensor,  # [B, ...] the model output
    src: str,
    dst: str,
    x_t: Tensor,  # [B, ...]
    alpha: Coef | None = None,
    sigma: Coef | None = None,
    *,
    t: float | int | Tensor | None = None,
    schedule: ScheduleLike | None = None,
) -> Tensor:  # [B, ...]
    """Turn a prediction of type ``src`` into type ``dst`` given (alpha, sigma) or (t, schedule)."""
    src, dst = prediction_kind(src), prediction_kind(dst)
    if (alpha is None) != (sigma is None) or (alpha is None) == (t is None or schedule is None):
        raise InputError(
            "convert needs the noise level either as alpha and sigma or as t and schedule",
            "pass alpha=..., sigma=... or t=..., schedule=... (a NoiseSchedule or alphas_cumprod)",
        )
    if alpha is None:
        alpha, sigma = alpha_sigma(t, schedule)
    if src == dst:
        return pred
    return _CONVERT[(src, dst)](x_t, pred, alpha, sigma)


def q_sample(
    x0: Tensor,  # [B, ...]
    t: float | int | Tensor,  # scalar or [B]
    noise: Tensor,  # [B, ...]
    schedule: ScheduleLike,
) -> Tensor:  # [B, ...]
    """Sample q(x_t | x_0) = N(alpha_t x0, sigma_t^2 I) with the given noise (Ho et al. 2020, Eq. 4)."""
    if noise.shape != x0.shape:
        raise InputError(
            f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}",
            "draw the noise with torch.randn_like(x0)",
        )
    alpha, sigma = alpha_sigma(t, schedule)
    return expand_to(alpha, x0) * x0 + expand_to(sigma, x0) * noise
