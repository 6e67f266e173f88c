"""Continuous-time, variance-preserving noise schedules on t in [0, 1] and their discretisation to betas.

Every schedule is defined by ``alpha_bar(t)`` (the signal fraction of ``x_t = alpha x_0 + sigma eps``),
with ``alpha = sqrt(alpha_bar)``, ``sigma = sqrt(1 - alpha_bar)`` and ``log_snr = log(alpha^2 / sigma^2)``.
``t = 0`` is clean data, ``t = 1`` is (close to) pure noise.

Discretisation to ``N`` steps follows improved-diffusion's ``betas_for_alpha_bar`` (Nichol & Dhariwal 2021,
Sec. 3.2): ``beta_i = min(1 - alpha_bar((i + 1) / N) / alpha_bar(i / N), 0.999)``. The betas go to any
diffusers scheduler through ``trained_betas=schedule.trained_betas(N)``.

Names accepted by :func:`get_schedule` (each family's parameters can be overridden by keyword):

==========================  =========================================================================
``linear``                  DDPM (Ho et al. 2020): betas linspace(1e-4, 2e-2) over 1000 steps.
``scaled_linear``           Stable Diffusion: betas linspace(sqrt(0.00085), sqrt(0.012))^2.
``cosine``                  Nichol & Dhariwal (2021) Eq. 17, s = 0.008 (diffusers: ``squaredcos_cap_v2``).
``cosine_power``            cos(x pi / 2)^(2 tau) over x in [start, end], renormalised to [1, 0]
                            (Chen 2023, "On the importance of noise scheduling", Alg. 1); defaults
                            start = 0, end = 1, tau = 1.
``sigmoid``                 logistic S(x / tau) over x in [start, end], renormalised (Chen 2023, Alg. 1);
                            defaults start = -3, end = 3, tau = 1.
==========================  =========================================================================

Alias (:data:`ALIASES`): ``squaredcos_cap_v2`` -> ``cosine``. A method that names its schedules after its paper
maps those names onto these families in its own package.
"""

from __future__ import annotations

import abc
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from avatar_core.errors import ConfigError, InputError

#: improved-diffusion's cap on a single beta; keeps 1 - beta away from zero at the noisy end.
MAX_BETA = 0.999

TimeLike = float | Tensor


def _as_time(t: TimeLike) -> tuple[Tensor, torch.dtype]:
    """t as float64 plus the dtype to hand results back in (the input's float dtype, else float64)."""
    if isinstance(t, Tensor):
        out_dtype = t.dtype if t.is_floating_point() else torch.float64
        tt = t.to(torch.float64)
    else:
        out_dtype = torch.float64
        tt = torch.tensor(float(t), dtype=torch.float64)
    if bool(((tt < 0) | (tt > 1)).any()):
        raise InputError(
            f"diffusion time t must lie in [0, 1], got values in [{tt.min().item()}, {tt.max().item()}]",
            "pass continuous time t = step / num_steps (0 = clean, 1 = pure noise)",
        )
    return tt, out_dtype


def betas_for_alpha_bar(
    alpha_bar: Callable[[Tensor], Tensor],
    num_steps: int,
    max_beta: float = MAX_BETA,
) -> Tensor:  # [num_steps] float64
    """Discretise alpha_bar(t) to betas the way improved-diffusion does (Nichol & Dhariwal 2021, Sec. 3.2)."""
    if int(num_steps) < 1:
        raise InputError(f"num_steps must be >= 1, got {num_steps}", "ask for at least one diffusion step")
    grid = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps  # t_i = i / N, as i / N in Python
    ab = alpha_bar(grid)
    prev, nxt = ab[:-1], ab[1:]
    # Once alpha_bar reaches 0 the ratio is 0/0; such a step is pure noise, so it gets the cap.
    ratio = torch.where(prev > 0, nxt / prev.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(prev))
    return (1.0 - ratio).clamp(max=max_beta)


class NoiseSchedule(abc.ABC):
    """A variance-preserving schedule given by alpha_bar(t) on t in [0, 1]; subclasses define ``_alpha_bar``."""

    @abc.abstractmethod
    def _alpha_bar(self, t: Tensor) -> Tensor:  # float64 in, float64 out, same shape
        """alpha_bar at float64 times already checked to lie in [0, 1]."""

    def alpha_bar(self, t: TimeLike) -> Tensor:
        """Cumulative signal fraction alpha_bar(t) = alpha(t)^2."""
        tt, dtype = _as_time(t)
        return self._alpha_bar(tt).to(dtype)

    def log_snr(self, t: TimeLike) -> Tensor:
        """log(alpha^2 / sigma^2); +inf at a clean level, -inf at pure noise."""
        tt, dtype = _as_time(t)
        ab = self._alpha_bar(tt)
        return (torch.log(ab) - torch.log1p(-ab)).to(dtype)

    def alpha(self, t: TimeLike) -> Tensor:
        """Signal scale sqrt(alpha_bar(t))."""
        tt, dtype = _as_time(t)
        return self._alpha_bar(tt).sqrt().to(dtype)

    def sigma(self, t: TimeLike) -> Tensor:
        """Noise scale sqrt(1 - alpha_bar(t))."""
        tt, dtype = _as_time(t)
        return (1.0 - self._alpha_bar(tt)).sqrt().to(dtype)

    def betas(self, num_steps: int, max_beta: float = MAX_BETA) -> Tensor:  # [num_steps] float64
        """Betas for a chain of ``num_steps`` steps (improved-diffusion's betas_for_alpha_bar)."""
        return betas_for_alpha_bar(self._alpha_bar, num_steps, max_beta)

    def alphas_cumprod(self, num_steps: int) -> Tensor:  # [num_steps] float64
        """prod_{j <= i} (1 - beta_j): alpha_bar after step i of the discrete chain."""
        return torch.cumprod(1.0 - self.betas(num_steps), dim=0)

    def trained_betas(self, num_steps: int) -> list[float]:
        """Betas as a plain list for a diffusers scheduler's ``trained_betas`` (JSON-serialisable config)."""
        return self.betas(num_steps).tolist()


@dataclass(frozen=True)
class CosineSchedule(NoiseSchedule):
    """Nichol & Dhariwal (2021) Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos((t + s) / (1 + s) * pi / 2)^2."""

    s: float = 0.008

    def _f(self, t: Tensor) -> Tensor:
        return torch.cos((t + self.s) / (1.0 + self.s) * (math.pi / 2)) ** 2

    def _alpha_bar(self, t: Tensor) -> Tensor:
        return self._f(t) / self._f(torch.zeros_like(t))


@dataclass(frozen=True)
class CosinePowerSchedule(NoiseSchedule):
    """alpha_bar(t) = (v(end) - v(t (end - start) + start)) / (v(end) - v(start)), v(x) = cos(x pi / 2)^(2 tau).

    Chen (2023), Alg. 1 ``cosine_schedule``: a power ``tau`` of the cosine, truncated to ``[start, end]``.
    """

    start: float = 0.0
    end: float = 1.0
    tau: float = 1.0

    def _v(self, x: Tensor) -> Tensor:
        return torch.cos(x * (math.pi / 2)) ** (2.0 * self.tau)

    def _alpha_bar(self, t: Tensor) -> Tensor:
        v_start = self._v(torch.full_like(t, self.start))
        v_end = self._v(torch.full_like(t, self.end))
        return (v_end - self._v(t * (self.end - self.start) + self.start)) / (v_end - v_start)


@dataclass(frozen=True)
class SigmoidSchedule(NoiseSchedule):
    """alpha_bar(t) = (S(end / tau) - S((t (end - start) + start) / tau)) / (S(end / tau) - S(start / tau)), S logistic.

    Chen (2023), Alg. 1 ``sigmoid_schedule``.
    """

    start: float = -3.0
    end: float = 3.0
    tau: float = 1.0

    def _alpha_bar(self, t: Tensor) -> Tensor:
        v_start = torch.sigmoid(torch.full_like(t, self.start / self.tau))
        v_end = torch.sigmoid(torch.full_like(t, self.end / self.tau))
        out = torch.sigmoid((t * (self.end - self.start) + self.start) / self.tau)
        return (v_end - out) / (v_end - v_start)


class _BetaDefinedSchedule(NoiseSchedule):
    """A schedule defined by betas on a reference grid of ``reference_steps`` steps.

    alpha_bar(t) is exact at the grid points t = k / reference_steps (alpha_bar(0) = 1, alpha_bar(k / N) =
    prod_{j < k} (1 - beta_j)) and log-linear in between, i.e. each step's 1 - beta is spread evenly in
    log space over its interval. ``betas(N)`` uses the schedule's own rule for N steps (see subclasses),
    not the interpolation.
    """

    reference_steps: int

    @abc.abstractmethod
    def _betas_for(self, num_steps: int) -> Tensor:  # [num_steps] float64
        """The schedule's defining betas for a chain of num_steps steps."""

    def _alpha_bar(self, t: Tensor) -> Tensor:
        n = self.reference_steps
        log_ab = torch.cat(
            [torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.log1p(-self._betas_for(n)), dim=0)]
        ).to(t.device)
        pos = t * n
        # Snap t = k / N (which may not give exactly k after the multiply) onto the grid, so it is exact there.
        pos = torch.where((pos - pos.round()).abs() < 1e-9, pos.round(), pos)
        k = pos.floor().clamp(0, n - 1)
        w = pos - k
        k = k.long()
        return torch.exp(log_ab[k] * (1.0 - w) + log_ab[k + 1] * w)

    def betas(self, num_steps: int, max_beta: float = MAX_BETA) -> Tensor:  # [num_steps] float64
        if int(num_steps) < 1:
            raise InputError(f"num_steps must be >= 1, got {num_steps}", "ask for at least one diffusion step")
        return self._betas_for(int(num_steps)).clamp(max=max_beta)


@dataclass(frozen=True)
class LinearSchedule(_BetaDefinedSchedule):
    """DDPM (Ho et al. 2020, Sec. 4): betas linspace(beta_start, beta_end) over ``reference_steps`` steps.

    For N != reference_steps both endpoints are multiplied by reference_steps / N, as improved-diffusion's
    ``get_named_beta_schedule("linear", N)`` does, so the total noise stays about the same (betas above
    0.999, reached for N < 20 with the defaults, are capped).
    """

    beta_start: float = 1e-4
    beta_end: float = 2e-2
    reference_steps: int = 1000

    def _betas_for(self, num_steps: int) -> Tensor:
        scale = self.reference_steps / num_steps
        return torch.linspace(scale * self.beta_start, scale * self.beta_end, num_steps, dtype=torch.float64)


@dataclass(frozen=True)
class ScaledLinearSchedule(_BetaDefinedSchedule):
    """Stable Diffusion's betas: linspace(sqrt(beta_start), sqrt(beta_end), N)^2.

    As in diffusers' ``beta_schedule="scaled_linear"``, the endpoints do not change with N.
    """

    beta_start: float = 0.00085
    beta_end: float = 0.012
    reference_steps: int = 1000

    def _betas_for(self, num_steps: int) -> Tensor:
        return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, num_steps, dtype=torch.float64) ** 2


@dataclass(frozen=True)
class ShiftedSchedule(NoiseSchedule):
    """Resolution shift (Hoogeboom et al. 2023, simple diffusion Sec. 3.1): log_snr(t) + 2 log(base_res / res).

    A model trained at ``base_resolution`` used at a larger ``resolution`` sees more noise at the same t.
    Its betas discretise the shifted alpha_bar with improved-diffusion's rule, whatever the base schedule.
    """

    base: NoiseSchedule
    base_resolution: float
    resolution: float

    @property
    def shift(self) -> float:
        """The additive logSNR shift 2 log(base_resolution / resolution)."""
        return 2.0 * math.log(self.base_resolution / self.resolution)

    def _alpha_bar(self, t: Tensor) -> Tensor:
        ab = self.base._alpha_bar(t)
        # sigmoid(log_snr + shift) written in alpha_bar, so alpha_bar = 1 and 0 stay exact.
        return ab / (ab + (1.0 - ab) * math.exp(-self.shift))


_PRESETS: dict[str, tuple[type[NoiseSchedule], dict[str, float]]] = {
    "linear": (LinearSchedule, {}),
    "scaled_linear": (ScaledLinearSchedule, {}),
    "cosine": (CosineSchedule, {}),
    "cosine_power": (CosinePowerSchedule, {}),
    "sigmoid": (SigmoidSchedule, {}),
}

#: Other names for the presets (diffusers' name for Nichol's cosine).
ALIASES: dict[str, str] = {"squaredcos_cap_v2": "cosine"}

SCHEDULE_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_schedule(
    name: str,
    *,
    base_resolution: float | None = None,
    resolution: float | None = None,
    **params: float,
) -> NoiseSchedule:
    """A schedule by name (see the module docstring), with preset parameters overridable by ``params``.

    Give both ``base_resolution`` and ``resolution`` to wrap it in the logSNR resolution shift.
    """
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in _PRESETS:
        valid = list(_PRESETS) + list(ALIASES)
        near = difflib.get_close_matches(str(name).lower(), valid, n=3)
        raise ConfigError(
            f"unknown noise schedule {name!r}" + (f" (did you mean {', '.join(near)}?)" if near else ""),
            f"use one of: {', '.join(_PRESETS)} (aliases: {', '.join(ALIASES)})",
        )
    cls, preset = _PRESETS[key]
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"schedule {key!r} has no parameter(s) {', '.join(unknown)}",
            f"its parameters are: {', '.join(allowed)}",
        )
    schedule = cls(**{**preset, **params})
    if (base_resolution is None) != (resolution is None):
        raise ConfigError(
            "the resolution shift needs both base_resolution and resolution",
            "give both (e.g. base_resolution=64, resolution=256) or neither",
        )
    if base_resolution is not None:
        if base_resolution <= 0 or resolution <= 0:
            raise ConfigError(
                f"resolutions must be positive, got base_resolution={base_resolution}, resolution={resolution}",
                "pass the training and the target side lengths in pixels or texels",
            )
        schedule = ShiftedSchedule(schedule, float(base_resolution), float(resolution))
    return schedule
