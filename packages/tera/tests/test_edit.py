"""Structure-aware editing: the kept region is exact, the loop is RePaint's merge at every step, region masks."""

from __future__ import annotations

import pytest
import torch

from avatar_core.diffusion import ddim_step, ddpm_step, q_sample
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


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_inpainting_loop_is_renoise_and_merge_at_every_step(model, sampler):
    """edit() equals a loop written from the kernel's functions: step, then paste q(known, next level)."""
    src = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(4))
    r = _region()
    cond, guidance, steps = _text(1, 5), 2.5, 4
    out = edit(model, src, r, cond, steps=steps, guidance=guidance, sampler=sampler,
               generator=torch.Generator().manual_seed(6))

    g = torch.Generator().manual_seed(6)
    known, keep = model.normalize(src), (~r).float()
    chain = model.sampling_chain(steps)
    ac = chain.alphas_cumprod
    x = torch.randn(known.shape, generator=g)
    x = keep * q_sample(known, steps - 1, torch.randn(known.shape, generator=g), ac) + (1 - keep) * x
    with torch.no_grad():
        for k in range(steps - 1, -1, -1):
            x0 = model.predict_x0(x, chain.timesteps[k].expand(1), cond, guidance)
            if sampler == "ddpm":
                noise = torch.randn(known.shape, generator=g) if k > 0 else torch.zeros_like(x)
                x = ddpm_step(x0, x, k, ac, noise)
            else:
                x = ddim_step(x0, x, k, k - 1, ac)
            x = keep * q_sample(known, k - 1, torch.randn(known.shape, generator=g), ac) + (1 - keep) * x
    torch.testing.assert_close(out, torch.where(r, model.denormalize(x), src), rtol=1e-5, atol=1e-5)


def test_direct_replacement_baseline(model):
    src = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(7))
    r = _region()
    out = edit(model, src, r, _text(1, 8), steps=5, method="replace", generator=torch.Generator().manual_seed(9))
    full = model.sample(_text(1, 8), steps=5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(out[:, :, r], full[:, :, r])
    assert torch.equal(out[:, :, ~r], src[:, :, ~r])
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
