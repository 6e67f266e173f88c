"""MCMC densification on the CPU: Eq. 9 in closed form, and the strategy step for step against gsplat's own."""

from __future__ import annotations

import math

import torch
from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci
from gsplat.strategy import MCMCStrategy as GsplatMCMC

from avatar_core.render import rasterize_gaussians
from avatar_core.render.strategies import MCMCStrategy, compute_relocation


def _binoms(n_max=51):
    b = torch.zeros(n_max, n_max)
    for n in range(n_max):
        for k in range(n + 1):
            b[n, k] = math.comb(n, k)
    return b


def test_relocation_closed_form():
    o = torch.tensor([0.3, 0.3, 0.9, 0.05, 0.6], dtype=torch.float64)
    s = torch.rand(5, 3, dtype=torch.float64) + 0.1
    n = torch.tensor([1, 2, 2, 7, 60])  # 60 is clamped to 51, as gsplat does
    new_o, new_s = compute_relocation(o, s, n, _binoms().double())
    # n copies of the new opacity composite to the old one.
    torch.testing.assert_close(1 - (1 - new_o) ** n.clamp(max=51).double(), o)
    # n = 1 changes nothing; n = 2 by hand: D = C(0,0) o' + C(1,0) o' - C(1,1) o'^2 / sqrt(2).
    torch.testing.assert_close(new_s[0], s[0])
    o2 = 1 - math.sqrt(0.7)
    torch.testing.assert_close(new_s[1], 0.3 / (2 * o2 - o2**2 / math.sqrt(2)) * s[1])


def _scene(seed):
    g = torch.Generator().manual_seed(seed)
    n = 60
    opac = torch.full((n,), 0.5)
    opac[:10] = 0.001  # dead: below min_opacity, to be relocated
    opac[10:20] = 0.01  # faint but alive: the position noise moves these
    params = torch.nn.ParameterDict({
        "means": 0.4 * (torch.rand(n, 3, generator=g) - 0.5),
        "quats": torch.randn(n, 4, generator=g),
        "scales": torch.full((n, 3), math.log(0.03)),
        "opacities": torch.logit(opac),
        "colors": torch.rand(n, 3, generator=g),
    })
    return params, {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}


def _run(strategy, params, optimizers, steps=5, seed=0):
    torch.manual_seed(seed)  # both strategies draw from the global generator
    state = strategy.initialize_state()
    viewmat = torch.eye(4)
    viewmat[2, 3] = 2.5
    K = torch.tensor([[[50.0, 0, 20], [0, 50, 16], [0, 0, 1]]])
    for step in range(steps):
        img, _, info = rasterize_gaussians(params["means"], params["quats"], params["scales"].exp(),
                                           torch.sigmoid(params["opacities"]), params["colors"], viewmat[None], K,
                                           40, 32)
        img.mean().backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        strategy.step_post_backward(params, optimizers, state, step, info, lr=1e-3)


def test_mcmc_strategy_on_cpu_matches_gsplats_step_for_step(monkeypatch):
    """gsplat's MCMCStrategy with its two CUDA ops given PyTorch stand-ins (its own _torch_impl covariance, our
    Eq. 9) against ours: the same Gaussians after relocation, growth and noise."""
    import gsplat.strategy.ops as ops

    kw = dict(cap_max=70, refine_start_iter=0, refine_every=2, noise_lr=5e2, min_opacity=0.005)
    ours_p, ours_o = _scene(0)
    _run(MCMCStrategy(**kw), ours_p, ours_o)

    monkeypatch.setattr(ops, "compute_relocation", compute_relocation)
    monkeypatch.setattr(ops, "quat_scale_to_covar_preci", _quat_scale_to_covar_preci)
    ref_p, ref_o = _scene(0)
    _run(GsplatMCMC(**kw), ref_p, ref_o)

    assert len(ours_p["means"]) == len(ref_p["means"]) == 66  # +5% at steps 2 and 4: 60 -> 63 -> 66
    for k in ours_p:
        torch.testing.assert_close(ours_p[k], ref_p[k], msg=k)
    # Nothing is left dead after relocation.
    assert (torch.sigmoid(ours_p["opacities"]) > 0.005).all()
    for k, opt in ours_o.items():
        assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].shape == ours_p[k].shape
