"""GASUNet: zero-initialised additions leave SVD's UNet unchanged; the switcher acts only through the time
embedding and the condition encoders only on the conv_in output (checked against the plain diffusers UNet with the
same offsets injected by hooks)."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel

from avatar_core.errors import InputError
from gas.video_unet import GASUNet, task_labels

CFG = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
           up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=16,
           num_attention_heads=(2, 4), out_channels=4, in_channels=8, layers_per_block=1, sample_size=8,
           projection_class_embeddings_input_dim=24, addition_time_embed_dim=8, num_frames=3)
GAS = {"nerf_channels": [4, 8], "normal_channels": [8, 8, 8], "switcher_dim": 8}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    base = UNetSpatioTemporalConditionModel(**CFG).eval()
    return base, GASUNet.from_unet(base, GAS, vae_downsamplings=2).eval()


def _inputs(B=2, F=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, F, 8, 8, 8, generator=g), torch.tensor([0.2, -0.4]), torch.randn(B, 1, 16, generator=g),
            torch.tensor([[6.0, 127.0, 0.0]] * B), torch.randn(B, F, 4, 8, 8, generator=g),
            torch.rand(B, F, 3, 32, 32, generator=g), task_labels(["view", "pose"]))


@torch.no_grad()
def test_zero_initialised_additions_equal_plain_svd(models):
    base, gas = models
    x, t, enc, ids, nerf, normals, task = _inputs()
    plain = base(x, t, enc, ids).sample
    torch.testing.assert_close(gas(x, t, enc, ids, nerf_latents=nerf, normal_maps=normals, task=task).sample, plain,
                               atol=0, rtol=0)
    torch.testing.assert_close(gas(x, t, enc, ids).sample, plain, atol=0, rtol=0)


@torch.no_grad()
def test_switcher_acts_only_through_the_time_embedding(models):
    base, _ = models
    torch.manual_seed(2)
    gas = GASUNet.from_unet(base, GAS, vae_downsamplings=2).eval()
    for p in gas.switcher.parameters():
        p.normal_(0, 0.2)
    x, t, enc, ids, _, _, task = _inputs()
    offset = gas.switcher(task)  # [B, E]
    hook = base.time_embedding.register_forward_hook(lambda m, a, out: out + offset)
    try:
        expected = base(x, t, enc, ids).sample
    finally:
        hook.remove()
    got = gas(x, t, enc, ids, task=task).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base(x, t, enc, ids).sample, atol=1e-4)
    other = gas(x, t, enc, ids, task=task.flip(-1)).sample
    assert not torch.allclose(got, other, atol=1e-4)


@torch.no_grad()
def test_condition_encoders_add_to_conv_in(models):
    base, _ = models
    torch.manual_seed(3)
    gas = GASUNet.from_unet(base, GAS, vae_downsamplings=2).eval()
    for enc_ in (gas.nerf_encoder, gas.normal_encoder):
        enc_.out.weight.normal_(0, 0.1)
    x, t, enc, ids, nerf, normals, _ = _inputs()
    extra = gas.nerf_encoder(nerf.flatten(0, 1)) + gas.normal_encoder(normals.flatten(0, 1))
    assert extra.shape == (6, 32, 8, 8)
    hook = base.conv_in.register_forward_hook(lambda m, a, out: out + extra)
    try:
        expected = base(x, t, enc, ids).sample
    finally:
        hook.remove()
    torch.testing.assert_close(gas(x, t, enc, ids, nerf_latents=nerf, normal_maps=normals).sample, expected,
                               atol=1e-5, rtol=1e-5)


def test_scales_start_at_two_and_layout_errors(models):
    _, gas = models
    assert float(gas.nerf_encoder.scale.detach()) == 2.0 and float(gas.normal_encoder.scale.detach()) == 2.0
    assert gas.conv_in.in_channels == 8
    x, t, enc, ids, nerf, _, _ = _inputs()
    with pytest.raises(InputError):
        gas(x, t, enc, ids, normal_maps=torch.rand(2, 3, 3, 16, 16))
    with pytest.raises(InputError):
        task_labels(["dance"])
