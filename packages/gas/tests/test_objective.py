"""SVD's EDM preconditioning agrees with diffusers' EulerDiscreteScheduler (SVD-xt's config), and the EDM loss
trains the tiny UNet."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from gas.objective import EDMConfig, denoise, edm_loss, preconditioning
from gas.svd_parts import added_time_ids, build_scheduler


def test_preconditioning_matches_the_euler_scheduler(tiny_cfg):
    sched = build_scheduler(OmegaConf.to_container(tiny_cfg.video.scheduler))
    sched.set_timesteps(10)
    x = torch.randn(1, 3, 4, 2, 2)
    v = torch.randn_like(x)
    for i in (0, 4, 8):
        t = sched.timesteps[i]
        sigma = sched.sigmas[i].reshape(1)
        c_skip, c_out, c_in, c_noise = preconditioning(sigma)
        torch.testing.assert_close(c_noise, t.reshape(1).float(), atol=1e-5, rtol=1e-5)
        sched._step_index = None
        sched._init_step_index(t)
        torch.testing.assert_close(sched.scale_model_input(x, t), c_in * x)
        sched._step_index = None
        out = sched.step(v, t, x)
        torch.testing.assert_close(out.pred_original_sample, c_skip * x + c_out * v, atol=1e-5, rtol=1e-5)


def test_edm_loss_decreases_on_one_clip(tiny_parts):
    unet = tiny_parts.unet
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 3, 4, 8, 8, generator=g) * 0.5
    ref = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 1, 32, generator=g)
    ids = added_time_ids(7, 127, 0.0, 2)
    opt = torch.optim.Adam(unet.parameters(), 1e-3)
    losses = []
    cfg = EDMConfig(cond_drop=0.0)
    for k in range(8):
        loss, _ = edm_loss(unet, lat, ref, ctx, ids, cfg, torch.Generator().manual_seed(k % 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) < sum(losses[:3])
    with torch.no_grad():
        d = denoise(unet, lat, torch.tensor([1e-3, 1e-3]), ref, ctx, ids)
    torch.testing.assert_close(d, lat, atol=5e-3, rtol=0)  # c_skip -> 1 as sigma -> 0
