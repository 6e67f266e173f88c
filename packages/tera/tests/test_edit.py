"""Structure-aware editing: the kept region is exact, inpainting recovers a closed-form posterior, the replacement
baseline ignores the source, region masks."""

from __future__ import annotations

import pytest
import torch

from avatar_core.errors import InputError
from tera.edit import TRYON_REGIONS, edit, region_mask, region_names, seam_gradient
from tera.latent_diffusion import TINY_UNET_CONFIG, StructuredLatentDiffusion
from tera.text import TextCondition

L, D = 12, 384


def _text(batch: int, seed: int) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    return TextCondition(torch.randn(batch, L, D, generator=g), torch.ones(batch, L, dtype=torch.bool))


@pytest.fixture(scope="module")
def model() -> StructuredLatentDiffusion:
    torch.manual_seed(0)
    m = StructuredLatentDiffusion(TINY_UNET_CONFIG, null_text=_text(1, 99)).eval()
    torch.nn.init.normal_(m.unet.conv_out.weight, std=0.05)  # a UNet whose output depends on its input
    m.set_latent_stats(torch.randn(8, *m.latent_shape) * 1.7 + 0.3, center=True)
    return m


def _region() -> torch.Tensor:  # [16, 16]
    r = torch.zeros(16, 16, dtype=torch.bool)
    r[3:9, 2:12] = True
    r[12:, 5:7] = True
    return r


@pytest.mark.parametrize("sampler,steps", [("ddpm", 8), ("ddim", 5)])
def test_inpainting_keeps_the_source_exactly(model, sampler, steps, monkeypatch):
    src = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1)) * 2 - 0.5
    r = _region()
    seen = []
    denorm = model.denormalize
    monkeypatch.setattr(model, "denormalize", lambda x: seen.append(x.clone()) or denorm(x))
    out = edit(model, src, r, _text(2, 3), steps=steps, guidance=2.0, sampler=sampler,
               generator=torch.Generator().manual_seed(2))
    assert torch.equal(out[:, :, ~r], src[:, :, ~r])  # bit for bit in decoder units
    # ...and already in diffusion units after the final merge (t = clean), before the paste.
    assert torch.equal(seen[-1][:, :, ~r], model.normalize(src)[:, :, ~r])
    assert (out[:, :, r] - src[:, :, r]).abs().mean() > 0.1  # the edited cells were regenerated
    assert torch.isfinite(out).all()
    single = edit(model, src[0], r[None], _text(1, 3), steps=steps, sampler=sampler,
                  generator=torch.Generator().manual_seed(2))
    assert single.shape == src[0].shape and torch.equal(single[:, ~r], src[0][:, ~r])


def _constant_field_denoiser(model: StructuredLatentDiffusion):
    """The exact x0-predictor of a data distribution whose every latent is constant per channel, z_c ~ N(0, 1).

    With x_t = sqrt(a) z + sqrt(1 - a) eps over N cells, E[z | x_t] = sqrt(a) sum(x_t) / (a N + 1 - a). For this
    distribution the posterior given any known cell is a point mass: an edit of a constant source must return the
    source's constant in the edited cells, and a fresh sample is some other constant.
    """

    def predict_x0(x_t, t, cond, guidance):
        a = model.alphas_cumprod[t].to(x_t).view(-1, 1, 1, 1)
        n = x_t.shape[-1] * x_t.shape[-2]
        z = a.sqrt() * x_t.sum(dim=(-1, -2), keepdim=True) / (a * n + 1 - a)
        return z.expand_as(x_t)

    return predict_x0


def _constant_source(model: StructuredLatentDiffusion) -> torch.Tensor:  # [1, C, h, w], decoder units
    c = torch.tensor([2.5, -1.5, 1.0, 3.0, -2.0, 0.5, 1.5, -2.5])[: model.latent_shape[0]]
    return c.view(1, -1, 1, 1).expand(1, *model.latent_shape).clone()


@pytest.mark.parametrize("sampler,steps", [("ddpm", 30), ("ddim", 30)])
def test_inpainting_recovers_the_exact_posterior(model, sampler, steps, monkeypatch):
    """Closed form: under the constant-field model, inpainting a constant source returns that constant."""
    monkeypatch.setattr(model, "predict_x0", _constant_field_denoiser(model))
    src, r = _constant_source(model), _region()
    out = edit(model, src, r, _text(1, 5), steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(6))
    assert torch.equal(out[:, :, ~r], src[:, :, ~r])
    torch.testing.assert_close(out[:, :, r], src[:, :, r], atol=0.05, rtol=0)


def test_direct_replacement_baseline(model, monkeypatch):
    """The baseline pastes a fresh sample: under the constant-field model its region is one constant per channel,
    the same for any source (it never sees the source), and not the source's constant."""
    monkeypatch.setattr(model, "predict_x0", _constant_field_denoiser(model))
    src, r = _constant_source(model), _region()
    other = -src
    outs = [edit(model, s, r, _text(1, 8), steps=10, method="replace", sampler="ddim",
                 generator=torch.Generator().manual_seed(9)) for s in (src, other)]
    for s, out in zip((src, other), outs):
        assert torch.equal(out[:, :, ~r], s[:, :, ~r])
        inside = out[0][:, r]  # [C, cells]
        torch.testing.assert_close(inside, inside[:, :1].expand_as(inside), atol=1e-5, rtol=0)
    assert torch.equal(outs[0][:, :, r], outs[1][:, :, r])
    assert (outs[0][0][:, r].mean(1) - src[0, :, 0, 0]).abs().min() > 0.1
    with pytest.raises(InputError, match="unknown edit method"):
        edit(model, src, r, _text(1, 8), method="paste")
    with pytest.raises(InputError, match="region mask must be"):
        edit(model, src, r[:8], _text(1, 8))


def test_region_mask_resize_rules_and_unions():
    parts = {name: torch.zeros(8, 8, dtype=torch.bool) for name in ("head", "hair", "upper_body", "lower_body",
                                                                     "arms", "hands", "legs", "feet")}
    parts["upper_body"][1, 1] = True  # 1 of 4 texels of cell (0, 0), not its first texel
    parts["upper_body"][2, 2:4] = True  # 2 of 4 texels of cell (1, 1), its first one included
    parts["arms"][6:, 6:] = True  # all of cell (3, 3)
    parts["feet"][0, 7] = True  # first row of cell (0, 3)
    any_ = region_mask(parts, "upper_clothes", (4, 4), rule="any")
    major = region_mask(parts, ["upper_clothes"], (4, 4), rule="majority")
    near = region_mask(parts, "upper_clothes", (4, 4), rule="nearest")
    cells = lambda *ij: {tuple(c) for c in ij}  # noqa: E731
    as_set = lambda m: {tuple(c) for c in m.nonzero().tolist()}  # noqa: E731
    assert as_set(any_) == cells((0, 0), (1, 1), (3, 3))
    assert as_set(major) == cells((1, 1), (3, 3))
    assert as_set(near) == cells((1, 1), (3, 3))
    assert as_set(region_mask(parts, "upper_clothes+shoes", (4, 4))) == cells((0, 0), (1, 1), (3, 3), (0, 3))
    assert as_set(region_mask(parts, "shoes", (4, 4), dilate=1)) == cells((0, 2), (0, 3), (1, 2), (1, 3))
    assert set(region_names()) >= {"upper_clothes", "lower_clothes", "shoes", "hair", "legs"}
    with pytest.raises(InputError, match="valid regions: .*upper_clothes.*lower_clothes") as e:
        region_mask(parts, "upper_clothes+hat", (4, 4))
    assert "'hat'" in str(e.value)
    with pytest.raises(InputError, match="resize rule"):
        region_mask(parts, "hair", (4, 4), rule="bilinear")


def test_region_masks_on_the_body_uv():
    from avatar_core.body import load_body_model
    from avatar_core.body.uv import UVMapper

    parts = UVMapper(load_body_model("anny"), 64).part_masks()
    for name, members in TRYON_REGIONS.items():
        m = region_mask(parts, name, (16, 16))
        union = torch.stack([region_mask(parts, p, (16, 16)) for p in members]).any(0)
        assert torch.equal(m, union) and m.any(), name
        assert (region_mask(parts, name, (16, 16), rule="majority") <= m).all()
    upper, lower = region_mask(parts, "upper_clothes", (16, 16)), region_mask(parts, "lower_clothes", (16, 16))
    assert not torch.equal(upper, lower)


def test_seam_gradient_closed_forms():
    r = torch.zeros(8, 8, dtype=torch.bool)
    r[:, :4] = True
    step = torch.zeros(2, 8, 8)
    step[:, :, 4:] = torch.tensor([3.0, 4.0]).view(2, 1, 1)  # a jump of norm 5 at the seam, flat elsewhere
    s = seam_gradient(step, r)
    assert s["seam"] == pytest.approx(5.0) and s["interior"] == 0.0 and s["ratio"] == float("inf")
    ramp = torch.arange(8.0).view(1, 1, 8).expand(1, 8, 8) + torch.arange(8.0).view(1, 8, 1)
    s = seam_gradient(ramp, r)  # every neighbour difference is 1
    assert s["seam"] == pytest.approx(1.0) and s["ratio"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="no boundary"):
        seam_gradient(ramp, torch.zeros(8, 8, dtype=torch.bool))
