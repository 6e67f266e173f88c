"""Stage-2 latent diffusion: samplers against diffusers' schedulers, CFG, text dropout, normalisation, training,
persistence, and the text adapter's bad-input behaviour."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from avatar_core.diffusion import cfg, get_schedule, respace
from avatar_core.errors import InputError
from avatar_core.text import PromptTruncatedWarning
from tera.latent_diffusion import TINY_UNET_CONFIG, StructuredLatentDiffusion
from tera.text import TextCondition, TextConditioner

L, D = 12, 384  # token length and width of the synthetic text conditions (MiniLM's width)


def _text(batch: int, seed: int) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, L, dtype=torch.bool)
    mask[:, 6:] = False
    return TextCondition(torch.randn(batch, L, D, generator=g), mask)


def _model(prediction: str = "x0", seed: int = 0, **kw) -> StructuredLatentDiffusion:
    torch.manual_seed(seed)
    null = _text(1, 99)
    null.mask[:, 2:] = False
    return StructuredLatentDiffusion(TINY_UNET_CONFIG, null_text=null, prediction=prediction, **kw).eval()


_DIFFUSERS_KIND = {"x0": "sample", "eps": "epsilon", "v": "v_prediction"}


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_sampler_steps_match_diffusers_schedulers(prediction):
    """One DDPM and one DDIM step (guided UNet output -> x0 -> update) equal diffusers' step on the same output."""
    model = _model(prediction)
    betas = get_schedule("linear").trained_betas(1000)
    kind = _DIFFUSERS_KIND[prediction]
    cond = _text(2, 1)
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    guidance = 2.5
    for sched_cls, sampler, n in ((DDPMScheduler, "ddpm", 100), (DDIMScheduler, "ddim", 25)):
        sched = sched_cls(num_train_timesteps=1000, trained_betas=betas, prediction_type=kind, clip_sample=False,
                          **({"set_alpha_to_one": True} if sampler == "ddim" else {"variance_type": "fixed_small"}))
        sched.set_timesteps(n)
        chain = respace(model.alphas_cumprod, sched.timesteps.tolist())  # same kept steps as diffusers'
        k = len(chain.timesteps) // 2  # a middle step: both neighbours exist, and 1 / alpha stays moderate
        t = int(chain.timesteps[k])
        with torch.no_grad():
            raw_c = model.denoise(x, torch.full((2,), t), cond)
            raw_u = model.denoise(x, torch.full((2,), t), model.null_condition(2))
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
            ours, x0 = model.denoise_step(x, k, chain, cond, guidance, sampler, noise=noise)
        ref = sched.step(raw_u + guidance * (raw_c - raw_u), t, x, generator=torch.Generator().manual_seed(5))
        # float32 round-off of the batched CFG pass, amplified by 1 / alpha for eps and v models.
        torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(ours, ref.prev_sample, rtol=1e-3, atol=1e-3)


def test_cfg_scale_one_is_the_conditional_prediction():
    model = _model()
    x = torch.randn(3, *model.latent_shape)
    t = torch.tensor([10, 500, 990])
    cond = _text(3, 2)
    with torch.no_grad():
        c = model.denoise(x, t, cond)
        u = model.denoise(x, t, model.null_condition(3))
        assert torch.equal(model.predict_x0(x, t, cond, 1.0), c)
        assert torch.equal(cfg(c, u, 1.0), c)
        torch.testing.assert_close(model.predict_x0(x, t, cond, 4.0), u + 4.0 * (c - u), rtol=1e-4, atol=1e-4)


def test_text_dropout_rate_is_twenty_percent():
    model = _model()
    cond = _text(4000, 3)
    out, drop = model.drop_text(cond, torch.Generator().manual_seed(0))
    rate = drop.float().mean().item()
    assert abs(rate - 0.2) < 4 * (0.2 * 0.8 / 4000) ** 0.5, rate  # binomial, 4 sigma
    null = model.null_condition(1)
    assert torch.equal(out.states[drop], null.states.expand(int(drop.sum()), -1, -1))
    assert torch.equal(out.mask[drop], null.mask.expand(int(drop.sum()), -1))
    assert torch.equal(out.states[~drop], cond.states[~drop])
    # Dropping every row gives exactly the loss of training on the null text.
    z = torch.randn(2, *model.latent_shape)
    model.set_latent_stats(z)
    kw = {"t": torch.tensor([3, 700]), "noise": torch.randn_like(z)}
    with torch.no_grad():
        dropped = model.training_loss(z, _text(2, 4), drop=torch.tensor([True, True]), **kw)
        as_null = model.training_loss(z, model.null_condition(2), drop=torch.tensor([False, False]), **kw)
    assert torch.equal(dropped, as_null)


@pytest.mark.parametrize("per_channel,center", [(False, False), (True, True)])
def test_latent_normalisation_round_trip(per_channel, center):
    model = _model()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(32, *model.latent_shape, generator=g) * torch.linspace(0.5, 4, 8).view(1, -1, 1, 1) + 2.0
    model.set_latent_stats(z, per_channel=per_channel, center=center)
    n = model.normalize(z).double()
    if center:
        torch.testing.assert_close(n.mean((0, 2, 3)), torch.zeros(8, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(n.std((0, 2, 3), unbiased=False), torch.ones(8, dtype=torch.float64),
                                   atol=1e-5, rtol=0)
    else:
        assert abs(n.pow(2).mean().sqrt().item() - 1.0) < 1e-5
    torch.testing.assert_close(model.denormalize(model.normalize(z)), z, rtol=1e-6, atol=1e-5)
    with pytest.raises(InputError, match="latents must be"):
        model.set_latent_stats(torch.randn(2, 3, 16, 16))


def test_training_loss_decreases_on_tiny_overfit():
    model = _model().train()
    g = torch.Generator().manual_seed(0)
    # Four smooth, distinct latents: easy to memorise in a couple of dozen steps.
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    z = torch.stack([torch.stack([torch.sin(3 * (c + 1) * xx + k) * torch.cos((k + 1) * yy) for c in range(8)])
                     for k in range(4)]) * 3.0
    model.set_latent_stats(z)
    text = _text(4, 7)
    fixed = {"t": torch.tensor([50, 300, 600, 900]), "noise": torch.randn(z.shape, generator=g),
             "drop": torch.zeros(4, dtype=torch.bool)}
    with torch.no_grad():
        before = model.training_loss(z, text, **fixed).item()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(25):
        loss = model(z, text, generator=g)  # forward is the training loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model.training_loss(z, text, **fixed).item()
    assert after < 0.6 * before, (before, after)  # measured: 1.12 -> 0.53


def test_save_load_gives_identical_samples(tmp_path):
    model = _model(ddim_steps=5)
    model.set_latent_stats(torch.randn(4, *model.latent_shape) * 2 + 1, center=True)
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)  # so the samples depend on the UNet
    model.save(tmp_path / "m")
    loaded = StructuredLatentDiffusion.load(tmp_path / "m").eval()
    cond = _text(2, 8)
    for sampler, steps in (("ddpm", 6), ("ddim", None)):
        a = model.sample(cond, steps=steps, guidance=2.0, generator=torch.Generator().manual_seed(11), sampler=sampler)
        b = loaded.sample(cond, steps=steps, guidance=2.0, generator=torch.Generator().manual_seed(11),
                          sampler=sampler)
        assert a.shape == (2, *model.latent_shape)
        assert torch.equal(a, b)
    assert loaded.config() == model.config()


def test_bad_inputs_are_clear():
    model = _model()
    with pytest.raises(InputError, match="latent statistics"):
        model.training_loss(torch.randn(1, *model.latent_shape), _text(1, 0))
    with pytest.raises(InputError, match="unknown sampler"):
        model.sample(_text(1, 0), sampler="euler")
    with pytest.raises(InputError, match="sampling steps"):
        model.sample(_text(1, 0), steps=0)
    with pytest.raises(InputError, match="no text encoder"):
        model.sample(["a woman in a red dress"])
    with pytest.raises(InputError, match="text states"):
        model.sample(torch.randn(1, L, 7))


@pytest.fixture(scope="module")
def minilm():
    return TextConditioner("minilm")


def test_text_conditioner_prompts_null_and_bad_input(minilm):
    cond = minilm(["a woman in a red dress", "a man in a green striped shirt and black trousers"])
    assert cond.states.shape == (2, 77, 384) and cond.mask.dtype == torch.bool
    assert cond.mask[0].sum() < cond.mask[1].sum()  # padding is marked
    null = minilm.null(3)
    assert null.states.shape == (3, 77, 384) and int(null.mask[0].sum()) == 2  # [CLS] [SEP]
    # The model built on the conditioner stores its null condition and encodes prompts by itself.
    model = StructuredLatentDiffusion({**TINY_UNET_CONFIG, "cross_attention_dim": 64}, text=minilm).eval()
    assert torch.equal(model.null_states, null.states[:1])
    assert isinstance(model.text_proj, torch.nn.Linear)  # 384 -> 64
    assert model.sample("a woman in a red dress", steps=2).shape == (1, *model.latent_shape)
    with pytest.raises(InputError, match="prompt 1 is empty"):
        minilm(["a person", "   "])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        long = minilm(["a woman wearing " + "a very long red dress and " * 40])
    hits = [w for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    assert len(hits) == 1 and hits[0].filename == __file__  # reported at the caller's line
    assert bool(long.mask.all())  # cut to exactly the limit
    with pytest.raises(InputError, match="needs a local folder"):
        TextConditioner("clip")
