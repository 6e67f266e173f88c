"""avatar_core.diffusion against diffusers' schedulers, closed forms and round trips."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from avatar_core.diffusion import (
    cfg,
    convert,
    ddim_step,
    ddpm_step,
    get_schedule,
    inpaint_merge,
    linear_guidance_scale,
    q_sample,
    respace,
    space_timesteps,
    triangular_guidance_scale,
)
from avatar_core.errors import ConfigError

T = 1000


def _reference_betas(alpha_bar, n, max_beta=0.999):
    """improved-diffusion's betas_for_alpha_bar as a plain Python loop over math-module alpha_bar."""
    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=torch.float64
    )


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("ours", "theirs", "n"),
    [
        ("linear", "linear", T),
        ("cosine", "squaredcos_cap_v2", T),
        ("scaled_linear", "scaled_linear", T),
        ("scaled_linear", "scaled_linear", 500),
    ],
)
def test_betas_match_diffusers(ours, theirs, n):
    betas = get_schedule(ours).betas(n)
    ends = {"beta_start": 0.00085, "beta_end": 0.012} if theirs == "scaled_linear" else {}
    ref = DDPMScheduler(num_train_timesteps=n, beta_schedule=theirs, **ends).betas.double()
    torch.testing.assert_close(betas, ref, atol=1e-6, rtol=0)
    # trained_betas round-trips through a diffusers scheduler config.
    sched = DDIMScheduler(num_train_timesteps=n, trained_betas=get_schedule(ours).trained_betas(n))
    torch.testing.assert_close(sched.alphas_cumprod.double(), torch.cumprod(1 - ref, 0), atol=1e-6, rtol=1e-5)


def test_linear_rescales_like_improved_diffusion_and_alpha_bar_is_exact_on_grid():
    # improved-diffusion: N steps use endpoints scaled by 1000 / N.
    ref250 = DDPMScheduler(num_train_timesteps=250, beta_start=4e-4, beta_end=8e-2).betas.double()
    torch.testing.assert_close(get_schedule("linear").betas(250), ref250, atol=1e-6, rtol=0)
    # alpha_bar(k / 1000) equals the 1000-step cumulative product; discretising it gives the betas back.
    sched = get_schedule("linear")
    ac = DDPMScheduler(num_train_timesteps=T).alphas_cumprod.double()
    k = torch.arange(1, T + 1)
    torch.testing.assert_close(sched.alpha_bar(k.double() / T), ac, atol=1e-6, rtol=1e-5)
    assert sched.alpha_bar(0.0).item() == 1.0
    fine = sched.alpha_bar(torch.linspace(0, 1, 4001, dtype=torch.float64))
    assert (fine[1:] < fine[:-1]).all()


def test_cosine_power_and_sigmoid_closed_form_endpoints_monotone_and_betas():
    def cosine_power(t, start, end, tau):
        v = lambda x: math.cos(x * math.pi / 2) ** (2 * tau)  # noqa: E731
        return (v(end) - v(t * (end - start) + start)) / (v(end) - v(start))

    def sigmoid(t, start, end, tau):
        s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        return (s(end / tau) - s((t * (end - start) + start) / tau)) / (s(end / tau) - s(start / tau))

    cases = {  # Chen (2023)'s defaults, and the settings RodinHD uses
        ("cosine_power", ()): lambda t: cosine_power(t, 0.0, 1.0, 1.0),
        ("sigmoid", ()): lambda t: sigmoid(t, -3.0, 3.0, 1.0),
        ("cosine_power", (0.2, 1.0, 5.0)): lambda t: cosine_power(t, 0.2, 1.0, 5.0),
        ("cosine_power", (0.2, 1.0, 3.0)): lambda t: cosine_power(t, 0.2, 1.0, 3.0),
        ("sigmoid", (0.0, 3.0, 0.1)): lambda t: sigmoid(t, 0.0, 3.0, 0.1),
    }
    # Values worked out by hand: cos(0.3 pi)^10 / cos(0.1 pi)^10 and (S(30) - S(15)) / (S(30) - 1/2).
    assert get_schedule("cosine_power", start=0.2, tau=5.0).alpha_bar(0.5).item() == pytest.approx(
        0.5877852522924731**10 / 0.9510565162951535**10, rel=1e-12
    )
    assert get_schedule("sigmoid", start=0.0, end=3.0, tau=0.1).alpha_bar(0.5).item() == pytest.approx(
        (1 / (1 + math.exp(-30)) - 1 / (1 + math.exp(-15))) / (1 / (1 + math.exp(-30)) - 0.5), rel=1e-12
    )
    # cosine_power's defaults are the plain cos^2 (Nichol's without the offset s).
    assert get_schedule("cosine_power").alpha_bar(0.5).item() == pytest.approx(0.5, rel=1e-12)
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    for (name, args), f in cases.items():
        s = get_schedule(name, **dict(zip(("start", "end", "tau"), args)))
        assert s.alpha_bar(0.0).item() == 1.0 and abs(s.alpha_bar(1.0).item()) < 1e-12
        for t in (0.1, 0.37, 0.5, 0.9):
            assert s.alpha_bar(t).item() == pytest.approx(f(t), rel=1e-10, abs=1e-15)
        ab = s.alpha_bar(grid)
        assert (ab[1:] < ab[:-1]).all(), (name, args)
        torch.testing.assert_close(s.betas(T), _reference_betas(f, T), atol=1e-9, rtol=0)
        # VP identities.
        torch.testing.assert_close(s.alpha(grid) ** 2 + s.sigma(grid) ** 2, torch.ones_like(grid))
    assert get_schedule("cosine") == get_schedule("squaredcos_cap_v2") != get_schedule("cosine_power")


def test_resolution_shift_and_errors():
    base = get_schedule("cosine")
    shifted = get_schedule("cosine", base_resolution=64, resolution=256)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    torch.testing.assert_close(shifted.log_snr(t), base.log_snr(t) + 2 * math.log(64 / 256))
    assert shifted.alpha_bar(0.0).item() == 1.0
    b = shifted.betas(T)
    assert ((b > 0) & (b <= 0.999)).all()
    same = get_schedule("cosine", base_resolution=64, resolution=64)
    torch.testing.assert_close(same.betas(T), base.betas(T))
    with pytest.raises(ConfigError, match="cosine_power"):
        get_schedule("nichol")
    with pytest.raises(ConfigError, match="tau"):
        get_schedule("linear", tau=1.0)


# ---------------------------------------------------------------- parameterisation


def test_round_trip_and_v_matches_diffusers():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.99, 0.7, 0.3, 0.01], dtype=torch.float64)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    x0_hat = convert(eps, "eps", "x0", x_t, alpha, sigma)
    v = convert(x0_hat, "x0", "v", x_t, alpha, sigma)
    eps_back = convert(v, "v", "eps", x_t, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_back, eps)
    # Discrete indices into diffusers' alphas_cumprod, and diffusers' own v target.
    ddpm = DDPMScheduler(num_train_timesteps=T)
    t = torch.tensor([0, 10, 500, 999])
    x0f, epsf = x0.float(), eps.float()
    x_tf = ddpm.add_noise(x0f, epsf, t)
    torch.testing.assert_close(q_sample(x0f, t, epsf, ddpm.alphas_cumprod), x_tf, atol=1e-6, rtol=1e-6)
    # v from (x_t, eps) divides by alpha (0.006 at t = 999), so compare in float64.
    v_ref = ddpm.get_velocity(x0, eps, t)
    x_t64 = ddpm.add_noise(x0, eps, t)
    v_ours = convert(eps, "epsilon", "v_prediction", x_t64, t=t, schedule=ddpm.alphas_cumprod)
    torch.testing.assert_close(v_ours, v_ref, atol=1e-9, rtol=1e-9)
    # Continuous time through a schedule object.
    s = get_schedule("cosine")
    tc = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    xs = q_sample(x0, tc, eps, s)
    torch.testing.assert_close(convert(eps, "eps", "x0", xs, t=tc, schedule=s), x0)


# ---------------------------------------------------------------- samplers


def _float64(scheduler):
    """Run a diffusers scheduler's arithmetic in float64 on its own (float32-built) alphas_cumprod.

    In float32, 1 - abar_1 / abar_0 alone is off by ~5e-4 relative, which would hide real errors.
    """
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


@pytest.mark.parametrize("num_inference_steps", [T, 50])
def test_ddpm_step_matches_diffusers(num_inference_steps):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    var_values = torch.rand(2, 4, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    for variance_type in ("fixed_small", "fixed_large", "learned_range"):
        ref = DDPMScheduler(num_train_timesteps=T, clip_sample=False, variance_type=variance_type)
        ref.set_timesteps(num_inference_steps)
        ref = _float64(ref)
        # diffusers strides the 1000-step chain; the same chain is our respacing of it.
        chain = respace(ref.alphas_cumprod, ref.timesteps.tolist())
        assert chain.timesteps.flip(0).tolist() == ref.timesteps.tolist()
        learned = variance_type == "learned_range"
        for k in (len(chain.timesteps) - 1, len(chain.timesteps) // 2, 1, 0):
            t = int(chain.timesteps[k])
            out = torch.cat([eps, var_values], 1) if learned else eps
            expected = ref.step(out, t, sample, generator=torch.Generator().manual_seed(7)).prev_sample
            noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
            x0 = convert(eps, "eps", "x0", sample, t=k, schedule=chain.alphas_cumprod)
            got = ddpm_step(x0, sample, k, chain.alphas_cumprod, noise, variance_type, var_values if learned else None)
            torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)


def test_ddim_step_matches_diffusers():
    g = torch.Generator().manual_seed(2)
    sample, out, noise = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for prediction_type, eta in (("epsilon", 0.0), ("v_prediction", 0.0), ("epsilon", 0.7)):
        ref = DDIMScheduler(
            num_train_timesteps=T,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=True,
            prediction_type=prediction_type,
        )
        ref.set_timesteps(50)
        ref = _float64(ref)
        ac = ref.alphas_cumprod
        for t in ref.timesteps[[0, 25, -1]].tolist():
            t_prev = t - T // 50  # -1 on the last step: the clean level
            expected = ref.step(out, t, sample, eta=eta, variance_noise=noise if eta else None).prev_sample
            x0 = convert(out, prediction_type, "x0", sample, t=t, schedule=ac)
            got = ddim_step(x0, sample, t, t_prev, ac, eta=eta, noise=noise)
            torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)


def test_respacing_and_space_timesteps():
    ac = get_schedule("cosine").alphas_cumprod(T)
    kept = space_timesteps(T, "ddim50")
    assert kept == list(range(0, T, 20))
    chain = respace(ac, kept)
    torch.testing.assert_close(chain.alphas_cumprod, ac[kept], rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.cumprod(1 - chain.betas, 0), ac[kept], rtol=1e-12, atol=0)
    # improved-diffusion's section semantics: 300 steps in three sections of 100, 10 + 15 + 20 kept.
    mixed = space_timesteps(300, [10, 15, 20])
    assert len(mixed) == 45 and mixed[:10] == [round(i * 11) for i in range(10)]
    assert mixed[10:12] == [100, 107] and mixed[-1] == 299


# ---------------------------------------------------------------- guidance and inpainting


def test_cfg_broadcasts_scales():
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(2, 5, 4, 3, 3, generator=g), torch.randn(2, 5, 4, 3, 3, generator=g)
    assert torch.equal(cfg(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg(cond, uncond, 0.0), uncond)
    per_sample = torch.tensor([1.5, 3.0])
    per_frame = torch.rand(2, 5, generator=g) * 3
    got_s, got_f = cfg(cond, uncond, per_sample), cfg(cond, uncond, per_frame)
    got_shared = cfg(cond, uncond, per_frame[:1])
    moved = cfg(cond.transpose(1, 2), uncond.transpose(1, 2), per_frame, frame_dim=2).transpose(1, 2)
    for b in range(2):
        torch.testing.assert_close(got_s[b], uncond[b] + per_sample[b] * (cond[b] - uncond[b]))
        for f in range(5):
            want = uncond[b, f] + per_frame[b, f] * (cond[b, f] - uncond[b, f])
            torch.testing.assert_close(got_f[b, f], want)
            torch.testing.assert_close(moved[b, f], want)
            torch.testing.assert_close(got_shared[b, f], uncond[b, f] + per_frame[0, f] * (cond[b, f] - uncond[b, f]))
    # GAS (20 frames, 1 -> 2): up over frames 0..10, then down in steps of 0.1 to 1.1.
    want = [1 + 0.1 * i for i in range(11)] + [2 - 0.1 * i for i in range(1, 10)]
    torch.testing.assert_close(triangular_guidance_scale(20), torch.tensor(want))
    assert len(triangular_guidance_scale(7)) == 7 and len(triangular_guidance_scale(1)) == 1
    torch.testing.assert_close(linear_guidance_scale(14, 1.0, 3.0), torch.linspace(1.0, 3.0, 14))


def test_inpaint_merge_keeps_known_region():
    g = torch.Generator().manual_seed(4)
    x_gen, x0_known, noise = (torch.randn(2, 4, 6, 6, generator=g) for _ in range(3))
    mask = (torch.rand(2, 1, 6, 6, generator=g) > 0.5).float()
    ac = get_schedule("linear").alphas_cumprod(T).float()
    keep = mask.expand_as(x_gen).bool()
    # Final step (target level: clean): the known region is reproduced exactly, the rest untouched.
    for merged in (
        inpaint_merge(x_gen, x0_known, mask, -1, noise, ac),
        inpaint_merge(x_gen, x0_known, mask, 0.0, noise, get_schedule("cosine")),
    ):
        assert torch.equal(merged[keep], x0_known[keep])
        assert torch.equal(merged[~keep], x_gen[~keep])
    # Mid-chain, per-sample levels: the known region is the re-noised known content.
    t = torch.tensor([500, 20])
    merged = inpaint_merge(x_gen, x0_known, mask, t, noise, ac)
    torch.testing.assert_close(merged[keep], q_sample(x0_known, t, noise, ac)[keep])


def test_one_step_chain_lands_on_the_prediction():
    """A respaced chain of one step (t = 0 only) must return the predicted clean sample, with no noise."""
    from avatar_core.diffusion.samplers import ddpm_step, respace, space_timesteps

    ac = get_schedule("cosine_power", start=0.2, tau=3.0).alphas_cumprod(1000)
    chain = respace(ac, space_timesteps(1000, [1]))
    x0, x_t, noise = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    for variance in ("fixed_small", "fixed_large"):
        out = ddpm_step(x0, x_t, torch.zeros(2, dtype=torch.long), chain.alphas_cumprod, noise, variance_type=variance)
        torch.testing.assert_close(out, x0)
