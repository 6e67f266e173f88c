"""VCR processors against attention computed directly, and the official view plan."""

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from gaussianip.vcr import (
    Role,
    VCRAttnProcessor,
    VCRState,
    decoder_self_attentions,
    install,
    orbit_azimuths,
    plan_views,
)


def _attn():
    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8, bias=True).eval()


def _direct(attn, q_in, kv_in):
    """softmax(Q K^T / sqrt(d)) V per head, then to_out: written out with explicit matrices."""
    H, d = 2, 8
    q = q_in @ attn.to_q.weight.T + attn.to_q.bias
    k = kv_in @ attn.to_k.weight.T + attn.to_k.bias
    v = kv_in @ attn.to_v.weight.T + attn.to_v.bias
    heads = []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d), dim=-1)
        heads.append(w @ v[..., sl])
    o = torch.cat(heads, -1)
    return o @ attn.to_out[0].weight.T + attn.to_out[0].bias


def _run(attn, state, x):
    return VCRAttnProcessor(state, "layer")(attn, x)


def test_modes_equal_direct_attention():
    attn = _attn()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 16, generator=g)  # views 0..3, one CFG half
    # view 0 principal, 1 key on 0, 2 intermediate between 0 and 1, 3 intermediate with lambda_self 1 later
    roles = [Role("principal"), Role("key", (0,)), Role("intermediate", (0, 1), (0.75, 0.25)),
             Role("intermediate", (1, 0), (0.5, 0.5))]
    state = VCRState(lambda_self=0.55, rows=[(v, 0) for v in range(4)], roles=roles)
    with torch.no_grad():
        out = _run(attn, state, x)
        plain = AttnProcessor2_0()(attn, x)
        torch.testing.assert_close(out[0], plain[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], _direct(attn, x[1], torch.cat([x[1], x[0]])), atol=1e-5, rtol=1e-5)
        fused = 0.55 * _direct(attn, x[2], x[2]) + 0.45 * (0.75 * _direct(attn, x[2], x[0]) + 0.25 * _direct(attn, x[2], x[1]))
        torch.testing.assert_close(out[2], fused, atol=1e-5, rtol=1e-5)
        state.lambda_self = 1.0
        torch.testing.assert_close(_run(attn, state, x), torch.cat([plain[:1], out[1:2], plain[2:]]), atol=1e-5, rtol=1e-5)
        state.rows = None  # plain mode (independent refinement)
        torch.testing.assert_close(_run(attn, state, x), plain, atol=1e-5, rtol=1e-5)


def test_official_plan_32_views():
    az = orbit_azimuths(32)
    roles = plan_views(az, "code")
    kinds = [r.kind for r in roles]
    assert kinds.count("principal") == 4 and kinds.count("key") == 4 and kinds.count("intermediate") == 24
    i = {a: k for k, a in enumerate(az)}
    assert roles[i[45.0]].refs == (i[0.0],) and roles[i[135.0]].refs == (i[0.0],)
    assert roles[i[-45.0]].refs == (i[-180.0],) and roles[i[-135.0]].refs == (i[-180.0],)
    assert plan_views(az, "nearest")[i[135.0]].refs == (i[-180.0],)
    assert roles[i[11.25]].weights == (0.75, 0.25) and roles[i[22.5]].weights == (0.5, 0.5)
    assert roles[i[33.75]].weights == (0.25, 0.75)
    assert set(roles[i[11.25]].refs) == {i[0.0], i[45.0]}
    with pytest.raises(Exception, match="multiple of 8"):
        orbit_azimuths(12)


def test_installed_on_named_decoder_layers_only():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                                attention_head_dim=4, norm_num_groups=8).eval()
    names = decoder_self_attentions(unet)
    assert names == [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1" for b in (0, 1) for a in (0, 1)]
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 3, 8)
    with torch.no_grad():
        ref = unet(x, t, c).sample
        state = VCRState()
        previous = install(unet, state)
        patched = [n for n, p in unet.attn_processors.items() if isinstance(p, VCRAttnProcessor)]
        assert patched == [f"{n}.processor" for n in names]
        torch.testing.assert_close(unet(x, t, c).sample, ref, atol=1e-5, rtol=1e-5)  # rows None: plain attention
        unet.set_attn_processor(previous)
