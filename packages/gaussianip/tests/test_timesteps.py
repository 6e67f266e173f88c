"""AHDS: the two-sided Gaussian fitted by L-BFGS-B reproduces the official fit and planned timesteps."""

import numpy as np
import pytest

from gaussianip.timesteps import TimestepSchedule, fit_ahds, planned_timesteps


def test_fit_values_and_phase_masses():
    fit = fit_ahds()
    assert fit.T == pytest.approx(257.72, abs=0.02)
    assert fit.s1 == pytest.approx(62.16, abs=0.02)
    assert fit.s2 == pytest.approx(279.11, abs=0.02)
    assert np.allclose(fit.phase_masses(), [0.41, 0.21, 0.375], atol=0.005)
    assert fit.pdf.sum() == pytest.approx(1.0)


def test_planned_checkpoints():
    planned = planned_timesteps(fit_ahds(), 2400)
    for step, t in {0: 799, 700: 496, 900: 450, 1400: 353, 2000: 249, 2399: 68}.items():
        assert planned[step] == t, (step, planned[step])
    assert np.all(np.diff(planned) <= 0)  # coarse to fine


def test_draw_regimes():
    s = TimestepSchedule("ahds", 2400)
    assert s.bounds(0) == (500, 800) and s.bounds(699) == (500, 800)
    assert s.bounds(700) == (400, 496 + 50)
    assert s.bounds(900) == (150, 450 + 50)
    assert s.bounds(1400) == (20, 353 + 50)
    # At 1/10 of the steps the regimes move with the run.
    short = TimestepSchedule("ahds", 240)
    assert short.bounds(69) == (500, 800) and short.bounds(70)[0] == 400
    assert TimestepSchedule("uniform", 10).bounds(5) == (20, 800)
    lin = TimestepSchedule("linear", 11)
    assert lin.bounds(0) == (20, 800) and lin.bounds(10) == (20, 21)
    import torch

    g = torch.Generator().manual_seed(0)
    assert all(20 <= s.sample(k, g) < 800 for k in range(0, 2400, 97))
