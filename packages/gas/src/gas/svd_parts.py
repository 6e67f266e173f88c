"""The video prior's parts (UNet, VAE, CLIP image encoder, Euler scheduler) and the encodings SVD uses.

Paper scale: SVD-xt-1.1 from a local pipeline folder through the kernel loaders
(:func:`avatar_core.pretrained.load_stable_video_diffusion`), the UNet wrapped as a :class:`~gas.video_unet.GASUNet`.
Embedded default: the same classes built from small configs (``configs/tiny.yaml``); the tiny VAE is trained on the
synthetic frames (:mod:`gas.vae_training`), the tiny image encoder keeps its seeded random weights (frozen, as SVD's
CLIP encoder is).

Encodings as in diffusers' ``StableVideoDiffusionPipeline``: the reference image -> CLIP ``image_embeds`` (224^2
resize with antialiasing at paper scale, CLIP normalisation) as the cross-attention context, and -> VAE
``latent_dist.mode()`` *unscaled* as the reference latent concatenated to the noise; clip frames -> VAE latents
times ``scaling_factor`` (the diffusion space); NeRF renders -> ``mode()`` unscaled (GAS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gas.video_unet import ConditioningConfig, GASUNet, vae_downsamplings

#: CLIP's image normalisation (SVD's ``feature_extractor/preprocessor_config.json``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VideoParts:
    unet: GASUNet
    vae: Any  # AutoencoderKLTemporalDecoder
    image_encoder: Any  # CLIPVisionModelWithProjection
    scheduler: Any  # EulerDiscreteScheduler


def build_scheduler(config: dict[str, Any]):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(dict(config))


def build_tiny_parts(unet_cfg: dict, vae_cfg: dict, clip_cfg: dict, scheduler_cfg: dict,
                     gas: ConditioningConfig) -> VideoParts:
    """Small random-weight SVD-layout parts from configs (the caller seeds them)."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    vae = AutoencoderKLTemporalDecoder(**vae_cfg)
    unet = GASUNet.from_unet(UNetSpatioTemporalConditionModel(**unet_cfg), gas, vae_downsamplings(vae),
                             vae.config.latent_channels)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_cfg))
    return VideoParts(unet, vae, image_encoder.eval(), build_scheduler(scheduler_cfg))


def load_paper_parts(path: str, gas: ConditioningConfig, dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None) -> VideoParts:
    """SVD-xt-1.1 (or any SVD pipeline folder) from ``path``; its scheduler config is read from the folder."""
    import json
    from pathlib import Path

    from avatar_core.errors import MissingWeightsError
    from avatar_core.pretrained import load_stable_video_diffusion

    parts = load_stable_video_diffusion(path, dtype=dtype, device=device)
    sched_file = Path(path) / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise MissingWeightsError(f"{sched_file} is missing", "give the full SVD pipeline folder (it has scheduler/)")
    unet = GASUNet.from_unet(parts.unet, gas, vae_downsamplings(parts.vae), parts.vae.config.latent_channels)
    return VideoParts(unet, parts.vae, parts.image_encoder.eval(), build_scheduler(json.loads(sched_file.read_text())))


def _nchw(images: Tensor) -> Tensor:  # [..., H, W, 3] in [0, 1] -> [N, 3, H, W] in [-1, 1]
    return images.reshape(-1, *images.shape[-3:]).permute(0, 3, 1, 2) * 2 - 1


@torch.no_grad()
def clip_embedding(parts: VideoParts, images: Tensor) -> Tensor:  # [B, H, W, 3] -> [B, 1, D]
    """CLIP image embeddings as the cross-attention context (SVD's ``_encode_image``)."""
    enc = parts.image_encoder
    size = enc.config.image_size
    x = _nchw(images)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True, antialias=True)
    x = (x + 1) / 2
    mean = torch.tensor(CLIP_MEAN, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).reshape(1, 3, 1, 1)
    dtype = next(enc.parameters()).dtype
    return enc(((x - mean) / std).to(dtype)).image_embeds[:, None]


def vae_mode(parts: VideoParts, images: Tensor) -> Tensor:  # [..., H, W, 3] -> [..., 4, h, w]
    """Unscaled ``latent_dist.mode()`` (reference image, NeRF renders)."""
    lead = images.shape[:-3]
    z = parts.vae.encode(_nchw(images).to(parts.vae.dtype)).latent_dist.mode()
    return z.reshape(*lead, *z.shape[1:])


def vae_latents(parts: VideoParts, frames: Tensor) -> Tensor:  # [B, F, H, W, 3] -> [B, F, 4, h, w]
    """Diffusion-space latents of clip frames (mode times the scaling factor)."""
    return vae_mode(parts, frames) * parts.vae.config.scaling_factor


@torch.no_grad()
def decode(parts: VideoParts, latents: Tensor, chunk: int = 14) -> Tensor:  # [B, F, 4, h, w] -> [B, F, H, W, 3]
    B, T = latents.shape[:2]
    outs = []
    for b in range(B):  # the temporal decoder mixes the frames of one video per call
        z = latents[b] / parts.vae.config.scaling_factor
        for s in range(0, T, chunk):
            part = z[s:s + chunk]
            outs.append(parts.vae.decode(part.to(parts.vae.dtype), num_frames=part.shape[0]).sample)
    x = torch.cat(outs).float()
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).reshape(B, T, *x.shape[-2:], 3)


def added_time_ids(fps: int, motion_bucket_id: int, noise_aug: float, batch: int, device=None) -> Tensor:
    """SVD's micro-conditioning ``[fps - 1, motion bucket, noise augmentation]`` per sample (fps passed as fps - 1)."""
    return torch.tensor([[fps - 1, motion_bucket_id, noise_aug]], dtype=torch.float32, device=device).repeat(batch, 1)
