"""Loaders for pretrained networks, from local directories only.

Every network the methods borrow (Stable Diffusion, ControlNet, IP-Adapter, Stable Video Diffusion, CLIP, the
embedded MiniLM text encoder) is read from a directory the caller names (usually a config key), in the diffusers
or transformers on-disk layout. Nothing here ever contacts a model hub: every ``from_pretrained`` call gets
``local_files_only=True`` and only an existing local directory, so runs behave the same with or without
``HF_HUB_OFFLINE=1``. Safetensors weights are preferred over pickled ``.bin`` files when both are present.

What each model needs on disk lives in one table, :data:`MODELS`; the completeness checks and the error messages
(which files, where we looked, how to get them) are generated from it.
"""

from avatar_core.pretrained.diffusion import (
    StableDiffusionParts,
    StableVideoDiffusionParts,
    load_controlnet,
    load_sd_scheduler,
    load_sd_text_encoder,
    load_sd_tokenizer,
    load_sd_unet,
    load_sd_vae,
    load_stable_diffusion,
    load_stable_video_diffusion,
    load_svd_image_encoder,
    load_svd_unet,
    load_svd_vae,
)
from avatar_core.pretrained.encoders import (
    CLIPParts,
    load_clip,
    load_clip_image_encoder,
    load_clip_text_encoder,
    load_minilm,
    minilm_dir,
)
from avatar_core.pretrained.ip_adapter import IPAdapterWeights, attach_ip_adapter, load_ip_adapter
from avatar_core.pretrained.registry import (
    MODELS,
    ModelSpec,
    expected_files,
    find_model_dir,
    missing_files,
    model_spec,
)

__all__ = [
    "MODELS",
    "ModelSpec",
    "IPAdapterWeights",
    "StableDiffusionParts",
    "StableVideoDiffusionParts",
    "CLIPParts",
    "model_spec",
    "expected_files",
    "missing_files",
    "find_model_dir",
    "minilm_dir",
    "load_sd_unet",
    "load_sd_vae",
    "load_sd_text_encoder",
    "load_sd_tokenizer",
    "load_sd_scheduler",
    "load_stable_diffusion",
    "load_controlnet",
    "load_ip_adapter",
    "attach_ip_adapter",
    "load_clip_image_encoder",
    "load_svd_unet",
    "load_svd_vae",
    "load_svd_image_encoder",
    "load_stable_video_diffusion",
    "load_clip",
    "load_clip_text_encoder",
    "load_minilm",
]
