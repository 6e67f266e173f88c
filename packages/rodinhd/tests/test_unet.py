"""The rolled-out triplane UNet: 3D-aware convolution, zero-initialised residual branches, roll-out borders."""

from __future__ import annotations

import torch

from rodinhd.unet import (
    AttentionBlock,
    Conv3DAware,
    CrossAttentionBlock,
    PlaneConv2d,
    ResBlock,
    TriplaneUNet,
    planes_to_rollout,
    rollout_to_planes,
)


def _planes(out):  # [1, C, H, 3W] -> xy, xz, yz each [C, H, W]
    p = rollout_to_planes(out)[0]
    return p[0], p[1], p[2]


def test_conv3d_mixes_planes_only_through_pooled_axes():
    torch.manual_seed(0)
    C, S = 3, 8
    conv = Conv3DAware(C, 4, zero_init=False)
    x = torch.randn(1, C, S, 3 * S)
    base = conv(x)

    # A change to xy with zero mean along both of its axes is invisible to both pooled vectors.
    d = torch.randn(C, S, S)
    d = d - d.mean(1, keepdim=True) - d.mean(2, keepdim=True) + d.mean((1, 2), keepdim=True)
    p = rollout_to_planes(x).clone()
    p[0, 0] += d
    xy, xz, yz = _planes(conv(planes_to_rollout(p)) - base)
    assert xy.abs().max() > 1e-2
    torch.testing.assert_close(xz, torch.zeros_like(xz), atol=1e-5, rtol=0)
    torch.testing.assert_close(yz, torch.zeros_like(yz), atol=1e-5, rtol=0)

    # One texel of xy at (y0, x0): xz sees it along x (its columns), yz along y (its columns); 3x3 conv spreads +-1.
    y0, x0 = 2, 5
    p = rollout_to_planes(x).clone()
    p[0, 0, :, y0, x0] += 3.0
    xy, xz, yz = _planes(conv(planes_to_rollout(p)) - base)
    for plane, col in ((xz, x0), (yz, y0)):
        changed = plane.abs().amax(dim=(0, 1)) > 1e-6  # per column
        assert changed[col - 1: col + 2].all() and changed.sum() == 3
        assert (plane.abs().amax(dim=(0, 2)) > 1e-6).all()  # every row of those columns
    assert (xy.abs().amax(dim=0) > 1e-6).sum() <= 9  # own plane: only the 3x3 neighbourhood

    # One texel of yz at (z0, y0): xy sees it along y (its rows), xz along z (its rows).
    z0, y0 = 6, 1
    p = rollout_to_planes(x).clone()
    p[0, 2, :, z0, y0] += 3.0
    xy, xz, yz = _planes(conv(planes_to_rollout(p)) - base)
    for plane, row in ((xy, y0), (xz, z0)):
        changed = plane.abs().amax(dim=(0, 2)) > 1e-6  # per row
        assert changed[max(row - 1, 0): row + 2].all() and changed.sum() == len(range(max(row - 1, 0), row + 2))


def test_zero_init_blocks_start_as_their_skip_path():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 24)
    emb = torch.randn(2, 32)
    for use_3d in (False, True):
        block = ResBlock(8, 32, out_channels=16, use_3d_conv=use_3d)
        torch.testing.assert_close(block(x, emb), block.skip(x))
    torch.testing.assert_close(AttentionBlock(8, 2)(x), x)
    torch.testing.assert_close(CrossAttentionBlock(8, 12, 2)(x, torch.randn(2, 5, 12)), x)
    unet = TriplaneUNet(8, 4, 8, 8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                        conv3d_resolutions=(8,), context_dim=12, cross_attn_resolutions=(4,))
    out = unet(torch.randn(2, 4, 8, 24), torch.tensor([0, 999]), {4: torch.randn(2, 5, 12)})
    assert out.shape == (2, 8, 8, 24) and out.abs().max() == 0  # ADM's zero-initialised output conv


def test_plane_folding_keeps_convolutions_inside_a_plane():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 24)
    x2 = x.clone()
    x2[..., 7] += 5.0  # last column of plane xy, next to plane xz's first column
    for fold, leaks in ((False, True), (True, False)):
        conv = PlaneConv2d(3, 4, 3, fold_planes=fold)
        diff = (conv(x2) - conv(x)).abs()
        assert bool((diff[..., 8] > 1e-6).any()) == leaks  # the paper's image-like roll-out sees one column across
        assert diff[..., 9:].max() == 0


def test_unet_overfits_one_batch():
    torch.manual_seed(0)
    unet = TriplaneUNet(8, 4, 16, 4, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                        conv3d_resolutions=(8,), num_heads=2)
    x = torch.randn(2, 4, 8, 24)
    t = torch.tensor([10, 500])
    target = torch.randn(2, 4, 8, 24)
    opt = torch.optim.Adam(unet.parameters(), lr=5e-3)
    losses = []
    for _ in range(20):
        loss = ((unet(x, t) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]  # measured: 0.98 -> 0.04
