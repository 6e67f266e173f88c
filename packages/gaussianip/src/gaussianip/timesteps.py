"""Adaptive human-specific timestep scheduling (AHDS, GaussianIP Sec. 3.2) and the ablation schedules.

The training is read as a 2D human denoising process in three phases (coarse geometry and base texture,
intermediate texture, fine face and clothing detail). A two-sided Gaussian pdf over the diffusion timestep,
``exp(-(t - T)^2 / 2 s^2)`` with ``s = s1`` below ``T`` and ``s2`` above, is fitted with L-BFGS-B so the mass
of each phase's timestep range matches its share of the steps; the planned timestep at step ``i`` of ``N`` is
the ``t`` whose upper-tail mass equals ``i / N``. The actual timestep is drawn between a per-phase lower bound
and the planned value (the official code's four regimes), which avoids over-saturation at phase changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from avatar_core.errors import ConfigError

#: Phase ranges of t (upper bound exclusive) and the share of the steps each gets (official code).
PHASE_RANGES: tuple[tuple[int, int], ...] = ((0, 350), (350, 450), (450, 800))
PHASE_MASSES: tuple[float, ...] = (0.41, 0.21, 0.375)
FIT_INIT = (260.0, 60.0, 280.0)
FIT_BOUNDS = ((200.0, 400.0), (20.0, 100.0), (100.0, 300.0))


def two_sided_gaussian(t: np.ndarray, T: float, s1: float, s2: float) -> np.ndarray:
    """Unnormalised asymmetric Gaussian: width ``s1`` for ``t <= T`` and ``s2`` above."""
    s = np.where(t <= T, s1, s2)
    return np.exp(-((t - T) ** 2) / (2.0 * s**2))


@dataclass(frozen=True)
class AHDSFit:
    """The fitted pdf parameters and its discrete pdf over ``t = 0 .. t_max - 1``."""

    T: float
    s1: float
    s2: float
    pdf: np.ndarray  # [t_max] sums to 1

    def phase_masses(self, ranges=PHASE_RANGES) -> list[float]:
        return [float(self.pdf[a:b].sum()) for a, b in ranges]


def fit_ahds(ranges=PHASE_RANGES, masses=PHASE_MASSES, t_max: int = 800, init=FIT_INIT,
             bounds=FIT_BOUNDS) -> AHDSFit:
    """Fit (T, s1, s2) so the normalised pdf over integer t in [0, t_max) puts ``masses`` in ``ranges``."""
    from scipy.optimize import minimize

    if len(ranges) != len(masses):
        raise ConfigError(f"{len(ranges)} phase ranges but {len(masses)} phase masses", "give one mass per phase")
    t = np.arange(t_max, dtype=np.float64)
    target = np.asarray(masses, dtype=np.float64)

    def loss(p: np.ndarray) -> float:
        y = two_sided_gaussian(t, *p)
        y = y / y.sum()
        m = np.array([y[a:b].sum() for a, b in ranges])
        return float(((m - target) ** 2).sum())

    res = minimize(loss, np.asarray(init, dtype=np.float64), method="L-BFGS-B", bounds=bounds)
    T, s1, s2 = (float(v) for v in res.x)
    y = two_sided_gaussian(t, T, s1, s2)
    return AHDSFit(T, s1, s2, y / y.sum())


def planned_timesteps(fit: AHDSFit, num_steps: int) -> np.ndarray:  # [num_steps] int
    """Planned t per step: the t whose upper-tail mass ``sum_{u >= t} pdf[u]`` is nearest to ``i / N``."""
    t_max = len(fit.pdf)
    tail = np.cumsum(fit.pdf[::-1])  # tail[k] = mass of [t_max - 1 - k, t_max)
    q = np.arange(num_steps, dtype=np.float64) / num_steps
    k = np.abs(tail[None, :] - q[:, None]).argmin(1)
    return (t_max - 1 - k).astype(np.int64)


@dataclass
class TimestepSchedule:
    """Draws the diffusion timestep of each stage-1 step: ``ahds`` (default), ``uniform`` or ``linear``.

    ``ahds`` regimes are written at the paper's 2400 steps and scale with ``num_steps`` (fractions of the run):
    before 700/2400 uniform in [500, 800); to 900/2400 in [400, planned + 50); to 1400/2400 in [150, planned + 50);
    then [20, planned + 50). ``uniform`` draws from [t_min, t_max) throughout (DreamFusion's SDS); ``linear``
    anneals the upper bound linearly from t_max to t_min and draws in [t_min, upper) (HumanGaussian-style).
    """

    kind: str = "ahds"
    num_steps: int = 2400
    t_min: int = 20
    t_max: int = 800
    margin: int = 50
    regime_steps: tuple[int, int, int] = (700, 900, 1400)  # at the reference length below
    regime_lows: tuple[int, int, int, int] = (500, 400, 150, 20)
    reference_steps: int = 2400

    def __post_init__(self):
        if self.kind not in ("ahds", "uniform", "linear"):
            raise ConfigError(f"unknown timestep schedule {self.kind!r}", "use 'ahds', 'uniform' or 'linear'")
        if self.num_steps < 1:
            raise ConfigError(f"the timestep schedule needs num_steps >= 1, got {self.num_steps}", "set stage1.steps")
        self.fit = fit_ahds(t_max=self.t_max) if self.kind == "ahds" else None
        self.planned = planned_timesteps(self.fit, self.num_steps) if self.fit is not None else None

    def bounds(self, step: int) -> tuple[int, int]:
        """``[low, high)`` of the draw at ``step``."""
        if self.kind == "uniform":
            return self.t_min, self.t_max
        if self.kind == "linear":
            frac = min(max(step / max(self.num_steps - 1, 1), 0.0), 1.0)
            high = int(round(self.t_max - frac * (self.t_max - self.t_min)))
            return self.t_min, max(high, self.t_min + 1)
        f = step / self.num_steps * self.reference_steps
        planned = int(self.planned[min(step, self.num_steps - 1)])
        if f < self.regime_steps[0]:
            return self.regime_lows[0], self.t_max
        for k, edge in enumerate(self.regime_steps[1:], start=1):
            if f < edge:
                low = self.regime_lows[k]
                return low, max(planned + self.margin, low + 1)
        low = self.regime_lows[3]
        return low, max(planned + self.margin, low + 1)

    def sample(self, step: int, generator: torch.Generator | None = None) -> int:
        low, high = self.bounds(step)
        return int(torch.randint(low, high, (1,), generator=generator).item())
