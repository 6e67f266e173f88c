"""Sampling the video model: SVD's Euler sampler with per-frame guidance and temporal tiling (GAS Sec. 3.4).

Every step runs the UNet tile by tile (:mod:`gas.tiling`) on ``[unconditional; conditional]`` inputs -- the
unconditional branch has a zero CLIP embedding and a zero reference latent, as diffusers' SVD pipeline does; the
NeRF and normal conditions and the task label are in both -- combines them with the per-frame scales of
:mod:`gas.guidance` (:func:`avatar_core.diffusion.guidance.cfg`), blends the tiles, and takes one
``EulerDiscreteScheduler`` step on the whole sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from avatar_core.diffusion.guidance import cfg
from gas.svd_parts import VideoParts, added_time_ids
from gas.tiling import tiled


@torch.no_grad()
def sample_latents(
    parts: VideoParts,
    ref_latent: Tensor,  # [1, 4, h, w] unscaled mode of the reference
    context: Tensor,  # [1, 1, D] CLIP embedding
    num_frames: int,
    scales: Tensor,  # [num_frames] guidance per frame
    nerf_latents: Tensor | None = None,  # [1, N, 4, h, w]
    normal_maps: Tensor | None = None,  # [1, N, 3, H, W]
    task: Tensor | None = None,  # [1, 2]
    steps: int = 25,
    tile: int = 20,
    overlap: int = 5,
    fps: int = 7,
    motion_bucket_id: int = 127,
    noise_aug: float = 0.0,
    repeat_noise: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> Tensor:  # [1, N, 4, h, w]
    unet, sched = parts.unet, parts.scheduler
    dev, dtype = ref_latent.device, unet.dtype
    h, w = ref_latent.shape[-2:]
    C = unet.config.out_channels
    sched.set_timesteps(steps, device=dev)
    # The official sampler draws one tile's noise and repeats it along the sequence.
    n_noise = min(tile, num_frames) if repeat_noise else num_frames
    noise = torch.randn(1, n_noise, C, h, w, generator=generator).to(dev)
    reps = -(-num_frames // n_noise)
    latents = noise.repeat(1, reps, 1, 1, 1)[:, :num_frames] * sched.init_noise_sigma
    time_ids = added_time_ids(fps, motion_bucket_id, noise_aug, 2, dev)
    ctx2 = torch.cat([torch.zeros_like(context), context]).to(dtype)
    ref2 = torch.cat([torch.zeros_like(ref_latent), ref_latent])
    guided = bool((scales != 1).any())

    for t in tqdm(sched.timesteps, desc="denoise", disable=not progress, leave=False):
        inp = sched.scale_model_input(latents, t)

        def tile_fn(idx: Tensor, inp: Tensor = inp, t: Tensor = t) -> Tensor:
            x = inp[:, idx]
            n = len(idx)
            x = torch.cat([x, ref_latent[:, None].expand(-1, n, -1, -1, -1)], 2)
            kw = {}
            if nerf_latents is not None:
                kw["nerf_latents"] = nerf_latents[:, idx]
            if normal_maps is not None:
                kw["normal_maps"] = normal_maps[:, idx]
            if not guided:
                if task is not None:
                    kw["task"] = task
                return unet(x.to(dtype), t, context.to(dtype), time_ids[:1].to(dtype), **kw).sample.float()
            xu = torch.cat([inp[:, idx], ref2[:1, None].expand(-1, n, -1, -1, -1)], 2)
            kw2 = {k: torch.cat([v, v]) for k, v in kw.items()}
            if task is not None:
                kw2["task"] = torch.cat([task, task])
            out = unet(torch.cat([xu, x]).to(dtype), t, ctx2, time_ids.to(dtype), **kw2).sample.float()
            uncond, cond = out.chunk(2)
            return cfg(cond, uncond, scales[idx].to(cond)[None], frame_dim=1)

        pred = tiled(tile_fn, num_frames, tile, overlap)
        latents = sched.step(pred, t, latents).prev_sample
    return latents
