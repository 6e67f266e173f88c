"""Stable Diffusion (UNet, VAE, CLIP text encoder, tokenizer, scheduler), ControlNet and Stable Video Diffusion."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from avatar_core.errors import CorruptFileError, InputError
from avatar_core.pretrained.loading import guarded, load_diffusers, load_tokenizer, load_transformers
from avatar_core.pretrained.registry import PathLike, find_model_dir, model_spec


def load_sd_unet(path: PathLike | None, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 variant: str | None = None, config_key: str | None = None):
    """Stable Diffusion ``UNet2DConditionModel`` from a pipeline folder (``unet/``) or the UNet folder itself."""
    from diffusers import UNet2DConditionModel

    return load_diffusers("sd_unet", UNet2DConditionModel, path, dtype=dtype, device=device, variant=variant,
                          config_key=config_key)


def load_sd_vae(path: PathLike | None, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                variant: str | None = None, config_key: str | None = None):
    """Stable Diffusion ``AutoencoderKL`` from a pipeline folder (``vae/``) or a VAE folder (e.g. sd-vae-ft-mse)."""
    from diffusers import AutoencoderKL

    return load_diffusers("sd_vae", AutoencoderKL, path, dtype=dtype, device=device, variant=variant,
                          config_key=config_key)


def load_sd_text_encoder(path: PathLike | None, *, dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None, variant: str | None = None,
                         config_key: str | None = None):
    """Stable Diffusion's ``CLIPTextModel`` from a pipeline folder (``text_encoder/``) or the encoder folder."""
    from transformers import CLIPTextModel

    return load_transformers("sd_text_encoder", CLIPTextModel, path, dtype=dtype, device=device, variant=variant,
                             config_key=config_key)


def load_sd_tokenizer(path: PathLike | None, *, config_key: str | None = None):
    """Stable Diffusion's CLIP tokenizer from a pipeline folder (``tokenizer/``) or the tokenizer folder."""
    return load_tokenizer("sd_tokenizer", path, config_key)


def load_sd_scheduler(path: PathLike | None, scheduler_cls: type | None = None, *, config_key: str | None = None):
    """The noise scheduler saved with a pipeline; ``scheduler_cls`` (e.g. ``DDIMScheduler``) overrides its class."""
    import diffusers

    spec = model_spec("sd_scheduler")
    d = find_model_dir("sd_scheduler", path, None, config_key)
    if scheduler_cls is None:
        cfg = guarded(spec, d, lambda: json.loads((d / spec.config).read_text()))
        name = cfg.get("_class_name", "DDIMScheduler")
        scheduler_cls = getattr(diffusers, name, None)
        if scheduler_cls is None:
            raise CorruptFileError(f"{d / spec.config} names an unknown scheduler class {name!r}",
                                   "pass scheduler_cls explicitly, e.g. diffusers.DDIMScheduler")
    return guarded(spec, d, lambda: scheduler_cls.from_pretrained(d, local_files_only=True))


@dataclass
class StableDiffusionParts:
    """The components of a Stable Diffusion pipeline; absent ones are None."""

    unet: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    scheduler: Any = None


_SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def load_stable_diffusion(path: PathLike | None, *, vae_path: PathLike | None = None,
                          components: Iterable[str] = _SD_COMPONENTS, dtype: torch.dtype | None = None,
                          device: torch.device | str | None = None, variant: str | None = None,
                          config_key: str | None = None) -> StableDiffusionParts:
    """Components of a Stable Diffusion pipeline folder; ``vae_path`` swaps in a separate VAE (GaussianIP's
    Realistic_Vision_noVAE + sd-vae-ft-mse)."""
    components = tuple(components)
    unknown = sorted(set(components) - set(_SD_COMPONENTS))
    if unknown:
        raise InputError(f"unknown Stable Diffusion components {unknown}", f"choose from {list(_SD_COMPONENTS)}")
    kw = dict(dtype=dtype, device=device, variant=variant, config_key=config_key)
    parts = StableDiffusionParts()
    if "unet" in components:
        parts.unet = load_sd_unet(path, **kw)
    if "vae" in components:
        parts.vae = load_sd_vae(vae_path if vae_path is not None else path, **kw)
    if "text_encoder" in components:
        parts.text_encoder = load_sd_text_encoder(path, **kw)
    if "tokenizer" in components:
        parts.tokenizer = load_sd_tokenizer(path, config_key=config_key)
    if "scheduler" in components:
        parts.scheduler = load_sd_scheduler(path, config_key=config_key)
    return parts


def load_controlnet(path: PathLike | None, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, variant: str | None = None,
                    config_key: str | None = None):
    """A ``ControlNetModel`` (e.g. control_v11p_sd15_openpose) from its folder."""
    from diffusers import ControlNetModel

    return load_diffusers("controlnet", ControlNetModel, path, dtype=dtype, device=device, variant=variant,
                          config_key=config_key)


def load_svd_unet(path: PathLike | None, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  variant: str | None = None, config_key: str | None = None):
    """SVD's ``UNetSpatioTemporalConditionModel`` from a pipeline folder (``unet/``) or the UNet folder."""
    from diffusers import UNetSpatioTemporalConditionModel

    return load_diffusers("svd_unet", UNetSpatioTemporalConditionModel, path, dtype=dtype, device=device,
                          variant=variant, config_key=config_key)


def load_svd_vae(path: PathLike | None, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 variant: str | None = None, config_key: str | None = None):
    """SVD's ``AutoencoderKLTemporalDecoder`` from a pipeline folder (``vae/``) or the VAE folder."""
    from diffusers import AutoencoderKLTemporalDecoder

    return load_diffusers("svd_vae", AutoencoderKLTemporalDecoder, path, dtype=dtype, device=device,
                          variant=variant, config_key=config_key)


def load_svd_image_encoder(path: PathLike | None, *, dtype: torch.dtype | None = None,
                           device: torch.device | str | None = None, variant: str | None = None,
                           config_key: str | None = None):
    """SVD's ``CLIPVisionModelWithProjection`` from a pipeline folder (``image_encoder/``) or its folder."""
    from transformers import CLIPVisionModelWithProjection

    return load_transformers("svd_image_encoder", CLIPVisionModelWithProjection, path, dtype=dtype, device=device,
                             variant=variant, config_key=config_key)


@dataclass
class StableVideoDiffusionParts:
    """The networks of a Stable Video Diffusion pipeline folder."""

    unet: Any
    vae: Any
    image_encoder: Any


def load_stable_video_diffusion(path: PathLike | None, *, dtype: torch.dtype | None = None,
                                device: torch.device | str | None = None, variant: str | None = None,
                                config_key: str | None = None) -> StableVideoDiffusionParts:
    """UNet, temporal-decoder VAE and CLIP image encoder of an SVD pipeline folder (GAS's video prior)."""
    kw = dict(dtype=dtype, device=device, variant=variant, config_key=config_key)
    return StableVideoDiffusionParts(load_svd_unet(path, **kw), load_svd_vae(path, **kw),
                                     load_svd_image_encoder(path, **kw))
