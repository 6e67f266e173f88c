"""Cascaded diffusion: VLB terms, hybrid loss, guidance, samplers, conditioning and portraits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from avatar_core.diffusion import get_schedule, q_sample, space_timesteps
from avatar_core.errors import ConfigError, InputError, MissingWeightsError
from avatar_core.io import save_image, save_json
from rodinhd.cascade import (
    BaseDiffusion,
    TriplaneNormalizer,
    UpsampleDiffusion,
    discretized_gaussian_log_likelihood,
    normal_kl,
    rodinhd_schedule,
    upsample_rollout,
)
from rodinhd.conditioning import (
    PortraitTokenizer,
    PortraitVAE,
    SDVAEFeatures,
    drop_condition,
    load_portrait_encoder,
    null_features,
    portrait_features,
    prepare_portrait,
    train_portrait_vae,
)
from rodinhd.image_loss import StructuralLoss, TrainingView, VGGPerceptual, body_patch_corners
from rodinhd.unet import TriplaneUNet

C = 4  # triplane channels
S = 8  # low-res plane side
P = 32  # portrait side


def _base(tokenizer=True, num_steps=1000):
    torch.manual_seed(0)
    tok = PortraitTokenizer((8, 16, 32), (4, 2, 1), 16, portrait_size=P) if tokenizer else None
    unet = TriplaneUNet(S, C, 8, 2 * C, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                        cross_attn_resolutions=(8, 4), conv3d_resolutions=(8,), context_dim=16 if tokenizer else 0,
                        num_heads=2)
    model = BaseDiffusion(unet, tok, context_resolutions=(8, 4), num_steps=num_steps)
    # The zero-initialised output would make every guided difference vanish; give the network a non-trivial state.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _features(batch=2, seed=0):
    vae = PortraitVAE(8)
    g = torch.Generator().manual_seed(seed)
    return portrait_features(vae, prepare_portrait(torch.rand(batch, P, P, 4, generator=g), P))


# -- VLB terms -----------------------------------------------------------------------------------------------------

def test_normal_kl_against_closed_form_and_torch():
    m1, m2 = torch.tensor([0.3, -1.0]), torch.tensor([0.3, 0.5])
    lv1, lv2 = torch.tensor([0.1, -0.7]), torch.tensor([0.1, 0.4])
    kl = normal_kl(m1, lv1, m2, lv2)
    assert kl[0].abs() < 1e-7  # identical Gaussians
    s1, s2 = (0.5 * lv1).exp(), (0.5 * lv2).exp()
    closed = torch.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    torch.testing.assert_close(kl, closed)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, s1), torch.distributions.Normal(m2, s2))
    torch.testing.assert_close(kl, ref)


def test_discretized_log_likelihood_is_a_distribution_over_the_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, scale in ((0.3, 0.2), (-0.95, 0.01), (0.0, 3.0)):
        logp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean),
                                                   torch.full_like(bins, math.log(scale)))
        assert abs(logp.exp().sum().item() - 1.0) < 1e-6
    # An interior bin equals the Gaussian's mass on [x - 1/255, x + 1/255].
    x = bins[100:101]
    n = torch.distributions.Normal(torch.tensor(0.1, dtype=torch.float64), 0.3)
    mass = n.cdf(x + 1 / 255) - n.cdf(x - 1 / 255)
    got = discretized_gaussian_log_likelihood(x, torch.full_like(x, 0.1), torch.full_like(x, math.log(0.3))).exp()
    torch.testing.assert_close(got, mass)


def test_vlb_is_zero_when_the_model_is_the_true_posterior():
    model = _base(tokenizer=False)
    x0 = torch.randn(3, C, S, 3 * S)
    t = torch.tensor([1, 400, 999])
    noise = torch.randn_like(x0)
    x_t = q_sample(x0, t, noise, model.alphas_cumprod)
    # eps = the true noise gives the true posterior mean; var = -1 selects the posterior variance.
    vb = model.vlb_terms(x0, x_t, t, noise, -torch.ones_like(x0))
    assert vb.abs().max() < 1e-4
    # var = +1 selects beta_t: the KL of two Gaussians with equal means, written out from alphas_cumprod.
    vb = model.vlb_terms(x0, x_t, t, noise, torch.ones_like(x0))
    ac = model.alphas_cumprod
    beta = 1 - ac[t] / ac[t - 1]
    post = beta * (1 - ac[t - 1]) / (1 - ac[t])
    closed = 0.5 * (-1 + torch.log(beta / post) + post / beta) / math.log(2)
    torch.testing.assert_close(vb, closed.float(), atol=1e-5, rtol=1e-3)
    assert vb[0] > 0.1


class _FixedOutput(nn.Module):
    """A stand-in denoiser whose output is one leaf tensor, to read gradients per output channel."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = nn.Parameter(out)
        self.in_channels, self.out_channels = out.shape[1] // 2, out.shape[1]
        self.context_dim, self.image_size = 0, out.shape[2]

    def forward(self, x, t, context=None, **_):
        return self.out


def test_hybrid_loss_vlb_trains_only_the_variance():
    torch.manual_seed(0)
    fixed = _FixedOutput(0.1 * torch.randn(2, 2 * C, S, 3 * S))
    model = BaseDiffusion(fixed, None)
    x0 = torch.randn(2, C, S, 3 * S)
    model.normalizer.fit(x0)
    out = model.loss(x0, generator=torch.Generator().manual_seed(1))
    (grad_vlb,) = torch.autograd.grad(out["vlb"], fixed.out, retain_graph=True)
    assert grad_vlb[:, :C].abs().max() == 0  # stop-gradient on the mean
    assert grad_vlb[:, C:].abs().max() > 0
    (grad_mse,) = torch.autograd.grad(out["mse"], fixed.out, retain_graph=True)
    assert grad_mse[:, C:].abs().max() == 0 and grad_mse[:, :C].abs().max() > 0
    torch.testing.assert_close(out["loss"], out["mse"] + 1e-3 * 1000 * out["vlb"])


# -- conditioning, guidance, sampling -------------------------------------------------------------------------------

def test_null_condition_is_ones_and_dropout_uses_it():
    feats = _features()
    assert all(bool((f == 1).all()) for f in null_features(feats))
    dropped, mask = drop_condition(feats, drop_mask=torch.tensor([True, False]))
    assert bool((dropped[0][0] == 1).all()) and torch.equal(dropped[2][1], feats[2][1])
    tok = PortraitTokenizer((8, 16, 32), (4, 2, 1), 16, portrait_size=P)
    assert [f.shape for f in tok.null_features(2)] == [f.shape for f in feats]
    _, mask = drop_condition([torch.zeros(1000, 1, 1, 1)], 0.2, torch.Generator().manual_seed(0))
    assert 0.1 < mask.float().mean() < 0.3  # 1000 samples at 20%


def test_cfg_scale_one_is_conditional_and_scale_mixes_with_ones():
    model = _base()
    feats = _features()
    x, t = torch.randn(2, C, S, 3 * S), torch.tensor([5, 700])
    cond = model.unet(x, t, model.context(feats))
    uncond = model.unet(x, t, model.context([torch.ones_like(f) for f in feats]))
    assert (cond - uncond).abs().max() > 1e-4
    torch.testing.assert_close(model.guided(x, t, feats, 1.0, True), cond)
    # Scale 1 on the batched (cond + null) path too: the kernel's cfg returns cond exactly.
    model.guidance_scale = 1.0
    g = model.guided(x, t, feats, 1.3, True)
    torch.testing.assert_close(g[:, :C], uncond[:, :C] + 1.3 * (cond[:, :C] - uncond[:, :C]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g[:, C:], cond[:, C:], atol=1e-5, rtol=1e-4)  # variance from the conditional pass


def test_base_sampler_runs_ten_respaced_steps():
    model = _base().eval()
    data = torch.randn(4, C, S, 3 * S) * 2 + 1
    model.normalizer.fit(data)
    seen = []
    model.unet.register_forward_hook(lambda m, args, out: seen.append((args[1].clone(), args[0].shape[0])))
    out = model.sample(_features(), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, C, S, 3 * S) and torch.isfinite(out).all()
    # The last step returns the clipped x0 itself, so samples stay inside the training data's range.
    lo, hi = data.amin(dim=(0, 2, 3))[:, None, None], data.amax(dim=(0, 2, 3))[:, None, None]
    assert bool(((out >= lo - 1e-4) & (out <= hi + 1e-4)).all())
    assert [int(t[0]) for t, _ in seen] == sorted(space_timesteps(1000, [10]), reverse=True)
    assert all(b == 4 for _, b in seen)  # guided: conditional and null condition in one batch
    seen.clear()
    assert model.sample(None, batch_size=3).shape == (3, C, S, 3 * S)  # unconditional: null condition, unguided
    assert len(seen) == 10 and all(b == 3 for _, b in seen)


class _Oracle(nn.Module):
    """A denoiser that knows the single clean sample: eps = (x_t - alpha_t x0) / sigma_t (or x0 itself)."""

    def __init__(self, x0, alphas_cumprod, predict="eps"):
        super().__init__()
        self.x0, self.ac, self.predict = x0, alphas_cumprod, predict
        self.in_channels, self.context_dim, self.image_size = x0.shape[1], 0, x0.shape[2]
        self.out_channels = 2 * self.in_channels if predict == "eps" else self.in_channels
        self.cond_channels = 0 if predict == "eps" else self.in_channels

    def forward(self, x, t, context=None, **_):
        if self.predict == "x0":
            return self.x0.expand_as(x)
        ab = self.ac[t].float()[:, None, None, None]
        eps = (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


def test_samplers_recover_the_sample_an_oracle_denoiser_knows():
    data = torch.randn(1, C, S, 3 * S) * 3 + 2
    norm = TriplaneNormalizer(C).fit(data)
    ac = rodinhd_schedule("rodin_cosine_light").alphas_cumprod(1000)
    base = BaseDiffusion(_Oracle(norm.normalize(data), ac), None)
    base.normalizer.load_state_dict(norm.state_dict())
    torch.testing.assert_close(base.sample(batch_size=1, generator=torch.Generator().manual_seed(0)), data,
                               atol=1e-3, rtol=1e-4)
    ac = rodinhd_schedule("rodin_sigmoid").alphas_cumprod(100)
    up = UpsampleDiffusion(_Oracle(norm.normalize(data), ac, "x0"), None)
    up.normalizer.load_state_dict(norm.state_dict())
    torch.testing.assert_close(up.sample(data, generator=torch.Generator().manual_seed(0)), data,
                               atol=1e-3, rtol=1e-4)


def test_normalizer_fits_unit_variance_and_round_trips():
    data = torch.randn(5, C, S, 3 * S) * torch.tensor([0.1, 2.0, 5.0, 0.5])[:, None, None] + 3.0
    norm = TriplaneNormalizer(C)
    with pytest.raises(ConfigError):
        norm.normalize(data)
    z = norm.fit(data).normalize(data)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(C), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(C), atol=1e-4, rtol=0)
    torch.testing.assert_close(norm.denormalize(z), data, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm.low, z.amin(dim=(0, 2, 3)))  # the range that clip_denoised keeps
    torch.testing.assert_close(norm.high, z.amax(dim=(0, 2, 3)))
    streamed = TriplaneNormalizer(C).fit(iter(data.split(2)))  # batch by batch, as from the store
    torch.testing.assert_close(streamed.state_dict(), norm.state_dict())
    restored = TriplaneNormalizer(C)
    restored.load_state_dict(norm.state_dict())  # stored with the model
    torch.testing.assert_close(restored.normalize(data), z)


# -- upsample model ------------------------------------------------------------------------------------------------

def _upsampler(render_patch=None):
    torch.manual_seed(0)
    tok = PortraitTokenizer((8,), (4,), 16, portrait_size=P)
    unet = TriplaneUNet(2 * S, C, 8, C, channel_mult=(1, 2), num_res_blocks=1, conv3d_resolutions=(16, 8),
                        context_dim=16, use_scale_shift_norm=False, cond_channels=C, aug_level_embedding=True,
                        num_heads=2)
    return UpsampleDiffusion(unet, tok, context_resolutions=(8,), render_patch=render_patch, patch_size=8)


def test_conditional_noise_augmentation_is_applied_and_recorded():
    model = _upsampler()
    hr, lr = torch.randn(3, C, 2 * S, 6 * S), torch.randn(3, C, S, 3 * S)
    model.normalizer.fit(hr)
    x, n = torch.randn(2, C, 2 * S, 6 * S), torch.randn(2, C, 2 * S, 6 * S)
    level = torch.tensor([0.0, 0.3], dtype=torch.float64)
    got = model.augment_condition(x, level, n)
    # Nichol & Dhariwal's cosine alpha_bar, written out independently.
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ab = f(0.3) / f(0.0)
    torch.testing.assert_close(got[0], x[0])
    torch.testing.assert_close(got[1], math.sqrt(ab) * x[1] + math.sqrt(1 - ab) * n[1])
    levels = []
    model.unet.register_forward_hook(lambda m, a, kw, o: levels.append(kw["aug_level"].clone()), with_kwargs=True)
    out = model.loss(hr, lr, _features(3), generator=torch.Generator().manual_seed(0))
    assert ((out["aug_level"] >= 0) & (out["aug_level"] <= 0.3)).all()
    torch.testing.assert_close(levels[-1], (out["aug_level"] * 1000).float())
    sample, info = model.sample(lr[:2], _features(2), generator=torch.Generator().manual_seed(0), return_info=True)
    assert sample.shape == (2, C, 2 * S, 6 * S) and info["aug_level"] == 0.1 and info["steps"] == 10
    assert torch.allclose(levels[-1], torch.full((4,), 100.0))  # guided batch, fixed sampling level


def _texel_renderer(calls=None):
    def render_patch(triplane, cameras, rows, cols):  # a differentiable stand-in renderer: one plane's texels
        if calls is not None:
            calls.append((rows.shape, cols.shape, triplane.requires_grad))
        B = triplane.shape[0]
        img = torch.sigmoid(triplane[:, :3])  # [B, 3, H, 3W]
        idx_r = rows[:, :, None].expand(B, rows.shape[1], cols.shape[1])
        idx_c = cols[:, None, :].expand_as(idx_r)
        b = torch.arange(B)[:, None, None]
        return img.permute(0, 2, 3, 1)[b, idx_r, idx_c]  # [B, P, P, 3]

    return render_patch


class _Cams:
    height, width = 2 * S, 6 * S


def _full_render(triplane):  # the whole "image" of the texel renderer, as RGBA with alpha 1
    rgb = torch.sigmoid(triplane[:, :3]).permute(0, 2, 3, 1)
    return torch.cat([rgb, torch.ones_like(rgb[..., :1])], dim=-1)


def test_upsample_image_loss_renders_patches_and_trains_the_unet():
    calls = []
    model = _upsampler(_texel_renderer(calls))
    hr, lr = torch.randn(2, C, 2 * S, 6 * S), torch.randn(2, C, S, 3 * S)
    model.normalizer.fit(hr)
    with pytest.raises(InputError):
        model.loss(hr, lr, _features())
    with pytest.raises(InputError):  # cameras without their images
        model.loss(hr, lr, _features(), cameras=_Cams())
    images = torch.rand(2, 2 * S, 6 * S, 4)
    out = model.loss(hr, lr, _features(), cameras=_Cams(), images=images, generator=torch.Generator().manual_seed(0))
    assert [c[:2] for c in calls] == [((2, 8), (2, 8))] and calls[0][2]  # one render: the prediction's
    torch.testing.assert_close(out["loss"], out["mse"] + out["pixel"] + out["perceptual"])  # Eq. 6: weights 1, 1
    out["loss"].backward()
    assert model.unet.out[-1].conv.weight.grad.abs().max() > 0
    same = torch.rand(2, 12, 12, 3)
    assert StructuralLoss()(same, same).abs() < 1e-5 and StructuralLoss()(same, same.flip(1)) > 0.1


def test_image_loss_is_zero_only_when_the_predicted_render_matches_the_images():
    model = _upsampler(_texel_renderer())
    g = torch.Generator().manual_seed(1)
    predicted = torch.randn(2, C, 2 * S, 6 * S, generator=g)
    fitted = torch.randn(2, C, 2 * S, 6 * S, generator=g)  # the stage-2 fit: close to, but not, the images
    images = _full_render(fitted + 0.5 * torch.randn(fitted.shape, generator=g))
    # The prediction renders exactly the images: zero, at any patch.
    pix, perc = model.image_loss(predicted, _full_render(predicted), _Cams(), torch.Generator().manual_seed(0))
    assert pix.abs() < 1e-12 and perc.abs() < 1e-5
    # The prediction equals the fitted triplane, whose render differs from the images: not zero.
    pix, perc = model.image_loss(fitted, images, _Cams(), torch.Generator().manual_seed(0))
    assert pix > 1e-3 and perc > 1e-2
    # Transparent target pixels are the render background (white): a white render matches an empty view.
    white = torch.full((2, C, 2 * S, 6 * S), 30.0)  # sigmoid -> 1
    empty = torch.zeros(2, 2 * S, 6 * S, 4)
    pix, _ = model.image_loss(white, empty, _Cams(), torch.Generator().manual_seed(0))
    assert pix.abs() < 1e-12


def test_patches_contain_the_body_and_training_views_are_seeded(tmp_path):
    alpha = torch.zeros(64, 2, 40, 30)
    alpha[:, 0, 30:34, 2:5] = 1.0  # a small body near the lower-left corner
    alpha[:, 1, 0:2, 27:30] = 1.0  # and one at the upper-right corner
    g = torch.Generator().manual_seed(0)
    for a in alpha:
        top, left = body_patch_corners(a, 8, g)
        assert 0 <= top.min() and top.max() <= 32 and 0 <= left.min() and left.max() <= 22
        for b in range(2):
            assert a[b, top[b]:top[b] + 8, left[b]:left[b] + 8].sum() > 0
    with pytest.raises(ConfigError):
        body_patch_corners(alpha[0], 31)
    # One view per item and epoch, the same in any process, read from the dataset's cameras.json and images.
    root = tmp_path / "d"
    d = root / "avatars" / "a1"
    frames = []
    for v in range(5):  # view v: alpha 1 in column v only, so the image read identifies the view
        rgba = torch.zeros(16, 16, 4)
        rgba[:, v, 3] = 1.0
        save_image(d / f"{v}.png", rgba)
        frames.append({"file": f"{v}.png", "viewmat": (torch.eye(4) * (v + 1)).tolist(), "K": torch.eye(3).tolist()})
    save_json(d / "cameras.json", {"width": 16, "height": 16, "views": frames})
    view = TrainingView(root, seed=3)
    item = {"index": 1, "item_id": "a1", "epoch": 0}
    picks = {view(item, e)["view_index"] for e in range(12)}
    assert len(picks) > 1 and view(item, 4)["view_index"] == TrainingView(root, seed=3)(item, 4)["view_index"]
    got = view(item, 0)
    k = got["view_index"]
    assert got["view_image"].shape == (16, 16, 4) and float(got["view_viewmat"][0, 0]) == k + 1
    assert got["view_image"][:, k, 3].min() == 1.0 and got["view_image"][..., 3].sum() == 16
    assert TrainingView(root, views=[2], seed=3)(item, 0)["view_image"][:, 2, 3].min() == 1.0


def test_upsample_rollout_keeps_planes_apart():
    lr = torch.zeros(1, 2, 4, 12)
    lr[..., 4:8] = 1.0  # plane xz only
    up = upsample_rollout(lr, 8)
    assert up.shape == (1, 2, 8, 24)
    assert up[..., :8].abs().max() == 0 and up[..., 16:].abs().max() == 0 and (up[..., 8:16] == 1).all()


# -- portraits and encoders ------------------------------------------------------------------------------------------

def test_portrait_validation_and_white_compositing():
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[10:20, 10:20] = (255, 0, 0, 255)
    x = prepare_portrait(rgba, 32)
    assert x.shape == (1, 3, 32, 32)
    assert torch.allclose(x[0, :, 0, 0], torch.ones(3))  # transparent -> white (+1 in [-1, 1])
    assert torch.allclose(x[0, :, 12, 12], torch.tensor([1.0, -1.0, -1.0]))
    bad = [(rgba[..., :3], "no alpha"), (rgba[:, :30], "square"), (rgba[..., 0], "shape"),
           (rgba.astype(np.float32), r"\[0, 1\]"), ("portrait.png", "image array"), (rgba[:4, :4], "too small")]
    for image, msg in bad:
        with pytest.raises(InputError, match=msg):
            prepare_portrait(image, 32)
    with pytest.raises(InputError, match="expects 32x32"):
        prepare_portrait(rgba, 32, resize=False)


def test_sd_vae_features_are_the_first_three_down_block_outputs(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")
    enc = SDVAEFeatures.from_pretrained(tmp_path)  # a pipeline folder with vae/, read locally
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    hooked = []
    hooks = [b.register_forward_hook(lambda m, a, o: hooked.append(o)) for b in vae.encoder.down_blocks[:3]]
    with torch.no_grad():
        vae.encoder(x)
    for h in hooks:
        h.remove()
    feats = enc.features(x)
    assert enc.feature_channels == (8, 16, 32) and [f.shape[-1] for f in feats] == [16, 8, 4]
    for f, ref in zip(feats, hooked):
        torch.testing.assert_close(f, ref)
    with pytest.raises(MissingWeightsError):
        SDVAEFeatures.from_pretrained(tmp_path / "nowhere")


def test_portrait_vae_trains_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    # Smooth colour blobs on white: a tiny stand-in for the dataset's portraits.
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    centres = torch.rand(8, 2, generator=g) - 0.5
    mask = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2 < 0.2).float()[..., None]
    images = mask * torch.rand(8, 1, 1, 3, generator=g) + (1 - mask)
    vae, losses = train_portrait_vae(images, steps=30, base_channels=8, batch_size=8, lr=2e-3)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    path = vae.save(tmp_path / "portrait_vae.safetensors")
    again = load_portrait_encoder(own_vae=path)
    assert isinstance(again, PortraitVAE) and not any(p.requires_grad for p in again.parameters())
    with pytest.raises(ConfigError):
        load_portrait_encoder()
    x = images.permute(0, 3, 1, 2)[:2] * 2 - 1
    for a, b in zip(vae.features(x), again.features(x)):
        torch.testing.assert_close(a, b)
    assert [f.shape[1] for f in again.features(x)] == [8, 16, 32]


def test_vgg_perceptual_reads_local_weights_only(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(MissingWeightsError):
        VGGPerceptual.from_local(tmp_path / "vgg16.safetensors")
    torch.manual_seed(0)
    cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
    state, i, cin = {}, 0, 3
    for v in cfg:
        if v == "M":
            i += 1
            continue
        state[f"features.{i}.weight"] = torch.randn(v, cin, 3, 3) * math.sqrt(2 / (9 * cin))
        state[f"features.{i}.bias"] = torch.zeros(v)
        cin, i = v, i + 2
    save_file(state, str(tmp_path / "vgg16.safetensors"))
    lp = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lp, tmp_path / "vgg.pth")
    a, b = torch.rand(1, 16, 16, 3), torch.rand(1, 16, 16, 3)
    for perc in (VGGPerceptual.from_local(tmp_path / "vgg16.safetensors"),
                 VGGPerceptual.from_local(tmp_path / "vgg16.safetensors", tmp_path / "vgg.pth")):
        assert perc(a, a).abs() < 1e-6 and perc(a, b) > 0


def test_schedules_are_the_papers():
    """The models' chains are RodinHD's closed forms (App. A) discretised as improved-diffusion does."""

    def cosine(t, start=0.2, end=1.0, tau=3.0):  # "Cosine(start=0.2, end=1, tau=3)"
        v = lambda x: math.cos(x * math.pi / 2) ** (2 * tau)  # noqa: E731
        return (v(end) - v(t * (end - start) + start)) / (v(end) - v(start))

    def sigmoid(t, start=0.0, end=3.0, tau=0.1):  # "Sigmoid(start=0, end=3, tau=0.1)"
        s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        return (s(end / tau) - s((t * (end - start) + start) / tau)) / (s(end / tau) - s(start / tau))

    def chain(f, n):  # improved-diffusion's betas_for_alpha_bar, then the cumulative product
        betas = [min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)]
        return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)

    base, up = _base(tokenizer=False), _upsampler()
    torch.testing.assert_close(base.alphas_cumprod.double(), chain(cosine, 1000), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(up.alphas_cumprod.double(), chain(sigmoid, 100), atol=1e-7, rtol=1e-6)
    assert rodinhd_schedule("cosine") == get_schedule("cosine")  # other names: the kernel's




def test_degradation_augmentation_blurs_downsamples_and_keeps_planes_apart():
    from rodinhd.augment import degrade_rollout, gaussian_blur

    impulse = torch.zeros(1, 1, 21, 21)
    impulse[..., 10, 10] = 1.0
    blurred = gaussian_blur(impulse, 1.5)
    r = torch.arange(-10, 11, dtype=torch.float32)
    g = torch.exp(-0.5 * (r / 1.5) ** 2) * (r.abs() <= 5)  # radius ceil(3 sigma) = 5
    torch.testing.assert_close(blurred[0, 0], torch.outer(g, g) / g.sum() ** 2)
    const = torch.full((1, 2, 8, 8), 0.7)
    torch.testing.assert_close(gaussian_blur(const, 2.0), const)
    lr = torch.randn(2, C, S, 3 * S, generator=torch.Generator().manual_seed(0))
    up0 = degrade_rollout(lr, torch.zeros(2), 2 * S)
    torch.testing.assert_close(up0, upsample_rollout_bicubic(lr, 2 * S))
    hi = degrade_rollout(lr, torch.ones(2), 2 * S)

    def roughness(x):
        return (x[..., 1:] - x[..., :-1]).pow(2).mean()

    assert roughness(hi) < 0.5 * roughness(up0)  # level 1 removes detail
    lr = torch.zeros(1, 2, 4, 12)
    lr[..., 4:8] = 1.0  # plane xz only
    out = degrade_rollout(lr, torch.ones(1), 8)
    assert out[..., :8].abs().max() < 1e-6 and out[..., 16:].abs().max() < 1e-6  # no bleeding between planes


def upsample_rollout_bicubic(x, size):
    from rodinhd.unet import planes_to_rollout, rollout_to_planes

    p = rollout_to_planes(x)
    B, _, Cc, h, w = p.shape
    up = torch.nn.functional.interpolate(p.reshape(B * 3, Cc, h, w), size=(size, size), mode="bicubic",
                                         align_corners=False)
    return planes_to_rollout(up.reshape(B, 3, Cc, size, size))


def test_upsampler_with_the_degradation_route_trains_and_samples():
    torch.manual_seed(0)
    tok = PortraitTokenizer((8,), (4,), 16, portrait_size=P)
    unet = TriplaneUNet(2 * S, C, 8, C, channel_mult=(1, 2), num_res_blocks=1, conv3d_resolutions=(16, 8),
                        context_dim=16, use_scale_shift_norm=False, cond_channels=C, aug_level_embedding=True,
                        num_heads=2)
    model = UpsampleDiffusion(unet, tok, context_resolutions=(8,), aug_mode="degrade", aug_max_train=1.0,
                              aug_sample=0.0)
    hr, lr = torch.randn(2, C, 2 * S, 6 * S), torch.randn(2, C, S, 3 * S)
    model.normalizer.fit(hr)
    seen = []
    model.unet.register_forward_hook(lambda m, a, kw, o: seen.append(kw["low_res"].clone()), with_kwargs=True)
    out = model.loss(hr, lr, _features(), generator=torch.Generator().manual_seed(0))
    from rodinhd.augment import degrade_rollout

    torch.testing.assert_close(seen[-1], degrade_rollout(model.normalizer.normalize(lr), out["aug_level"], 2 * S))
    out["loss"].backward()
    sample, info = model.sample(lr, _features(), steps=2, generator=torch.Generator().manual_seed(0), return_info=True)
    assert sample.shape == hr.shape and info["aug_mode"] == "degrade" and info["aug_level"] == 0.0
    with pytest.raises(ConfigError):
        UpsampleDiffusion(unet, tok, context_resolutions=(8,), aug_mode="jpeg")
