"""Stage 2's training objective: SVD's own EDM objective (Karras et al. 2022; Blattmann et al. 2023, App. D).

SVD-xt is a v-prediction model in EDM preconditioning, and its Euler scheduler samples it that way
(``EulerDiscreteScheduler``: ``timestep_type="continuous"``, ``prediction_type="v_prediction"``): for noise level
``sigma`` the UNet sees ``c_in x`` with ``c_in = 1 / sqrt(sigma^2 + 1)`` at time ``c_noise = 0.25 log sigma``,
and the denoised estimate is ``c_skip x + c_out F`` with ``c_skip = 1 / (sigma^2 + 1)``,
``c_out = -sigma / sqrt(sigma^2 + 1)``. Training draws ``log sigma ~ N(P_mean, P_std^2)`` (SVD's video
fine-tuning: 0.7, 1.6) and weighs the x0 error by ``lambda = (sigma^2 + 1) / sigma^2`` -- so fine-tuning from the
real weights continues the objective they were trained with, and the tests check that the preconditioning agrees
with the scheduler's ``scale_model_input`` / ``step``.

The reference conditions (CLIP embedding and reference latent) are dropped together with probability
``cond_drop`` so that classifier-free guidance has an unconditional model; the NeRF and normal conditions stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gas.video_unet import GASUNet


@dataclass
class EDMConfig:
    p_mean: float = 0.7
    p_std: float = 1.6
    cond_drop: float = 0.1


def preconditioning(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``c_skip, c_out, c_in, c_noise`` of v-prediction EDM (SVD) for noise levels ``sigma [B]``."""
    s2 = sigma**2 + 1
    return 1 / s2, -sigma / s2.sqrt(), 1 / s2.sqrt(), 0.25 * sigma.log()


def denoise(unet: GASUNet, noisy: Tensor, sigma: Tensor, ref_latent: Tensor, context: Tensor, time_ids: Tensor,
            **conditions) -> Tensor:
    """The preconditioned denoiser D(x; sigma): ``noisy [B, F, 4, h, w]``, ``sigma [B]``, ``ref_latent [B, 4, h, w]``."""
    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1, 1) for c in preconditioning(sigma))
    F_ = noisy.shape[1]
    x = torch.cat([noisy * c_in, ref_latent[:, None].expand(-1, F_, -1, -1, -1)], 2)
    out = unet(x.to(unet.dtype), c_noise.reshape(-1).to(unet.dtype), context.to(unet.dtype), time_ids.to(unet.dtype),
               **conditions).sample
    return c_skip * noisy + c_out * out.float()


def edm_loss(unet: GASUNet, latents: Tensor, ref_latent: Tensor, context: Tensor, time_ids: Tensor, cfg: EDMConfig,
             generator: torch.Generator | None = None, **conditions) -> tuple[Tensor, dict[str, Tensor]]:
    """SVD's weighted x0 loss on clip latents ``[B, F, 4, h, w]`` (module docstring)."""
    B = latents.shape[0]
    dev = latents.device
    sigma = torch.exp(cfg.p_mean + cfg.p_std * torch.randn(B, generator=generator).to(dev))
    noise = torch.randn(latents.shape, generator=generator).to(dev)
    keep = (torch.rand(B, generator=generator) >= cfg.cond_drop).float().to(dev)
    ref = ref_latent * keep.reshape(-1, 1, 1, 1)
    ctx = context * keep.reshape(-1, 1, 1)
    noisy = latents + sigma.reshape(-1, 1, 1, 1, 1) * noise
    denoised = denoise(unet, noisy, sigma, ref, ctx, time_ids, **conditions)
    weight = ((sigma**2 + 1) / sigma**2).reshape(-1, 1, 1, 1, 1)
    per = (weight * (denoised - latents) ** 2).flatten(1).mean(1)
    return per.mean(), {"sigma": sigma.mean().detach(), "x0_mse": ((denoised - latents) ** 2).mean().detach()}
