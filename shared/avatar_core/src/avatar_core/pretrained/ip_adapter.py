"""IP-Adapter checkpoints (Ye et al. 2023): read both release formats, validate the keys, install in a UNet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from avatar_core.errors import CorruptFileError, InputError, MissingWeightsError
from avatar_core.pretrained.encoders import load_clip_image_encoder
from avatar_core.pretrained.loading import guarded
from avatar_core.pretrained.registry import ModelSpec, PathLike, download_hint, expand_path, model_spec

# Kinds of image projection, told apart by their keys as the IP-Adapter releases lay them out (checked in order).
_IMAGE_PROJ_KINDS = (
    ("faceid_plus", ("perceiver_resampler.proj_in.weight", "proj.0.weight", "norm.weight")),  # FaceID-Plus(V2)
    ("full_face", ("proj.0.weight", "proj.3.weight")),  # MLP over all 257 CLIP tokens
    ("faceid", ("proj.0.weight", "proj.2.weight", "norm.weight")),  # MLP on the face-ID vector
    ("base", ("proj.weight", "norm.weight")),  # linear map of the pooled CLIP image embedding to 4 tokens
    ("plus", ("latents", "proj_in.weight", "proj_out.weight")),  # perceiver resampler over CLIP hidden states
)
# These read CLIP image features (pooled embedding or hidden states), so the image encoder must come with them;
# plain FaceID reads only the face-recognition embedding.
_NEEDS_IMAGE_ENCODER = {"faceid_plus", "full_face", "plus", "base"}


@dataclass
class IPAdapterWeights:
    """A validated IP-Adapter checkpoint (Ye et al. 2023): image projection + decoupled cross-attention K/V."""

    path: Path
    kind: str  # one of _IMAGE_PROJ_KINDS' names
    image_proj: dict[str, torch.Tensor]
    ip_adapter: dict[str, torch.Tensor]  # "{i}.to_k_ip.weight" / "{i}.to_v_ip.weight" (+ LoRA for FaceID)
    num_layers: int  # cross-attention layers it adapts
    cross_attention_dim: int  # width of the image tokens fed to to_k_ip / to_v_ip
    image_encoder: Any = None  # CLIPVisionModelWithProjection, when the kind needs one

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The nested layout diffusers' UNet loader consumes."""
        return {"image_proj": self.image_proj, "ip_adapter": self.ip_adapter}


def _read_ip_adapter_file(path: Path, spec: ModelSpec) -> dict[str, dict[str, torch.Tensor]]:
    """Both release formats: a pickled nested dict (.bin) or flat ``image_proj.*`` / ``ip_adapter.*`` safetensors."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = guarded(spec, path, lambda: load_file(str(path)))
        nested: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            group, _, rest = key.partition(".")
            nested.setdefault(group, {})[rest] = value
        return nested
    # weights_only: never execute code from a downloaded pickle.
    obj = guarded(spec, path, lambda: torch.load(path, map_location="cpu", weights_only=True))
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path} holds a {type(obj).__name__}, not an IP-Adapter state dict",
                               download_hint(spec, None))
    return obj


def _validate_ip_adapter(sd: dict, path: Path, spec: ModelSpec) -> tuple[str, int, int]:
    """Check the two groups and their keys; returns (kind, number of adapted layers, cross-attention width)."""
    groups = sorted(str(k) for k in sd)
    for group in ("image_proj", "ip_adapter"):
        if not isinstance(sd.get(group), dict) or not sd[group]:
            raise CorruptFileError(
                f"{path} is not an IP-Adapter checkpoint: it has no `{group}` weights (top-level keys: "
                f"{groups[:8]}); an IP-Adapter file holds `image_proj` and `ip_adapter` state dicts",
                download_hint(spec, None))
    proj = sd["image_proj"]
    kind = next((name for name, keys in _IMAGE_PROJ_KINDS if all(k in proj for k in keys)), None)
    if kind is None:
        raise CorruptFileError(f"{path}: unrecognised IP-Adapter image projection (keys {sorted(proj)[:8]})",
                               "use an official IP-Adapter / IP-Adapter-FaceID checkpoint")
    layers: dict[int, set[str]] = {}
    for key in sd["ip_adapter"]:
        idx, _, rest = key.partition(".")
        if not idx.isdigit():
            raise CorruptFileError(f"{path}: unexpected ip_adapter key {key!r} (expected '<layer>.to_k_ip.weight')",
                                   "use an official IP-Adapter checkpoint")
        layers.setdefault(int(idx), set()).add(rest)
    adapted = sorted(i for i, names in layers.items() if "to_k_ip.weight" in names or "to_v_ip.weight" in names)
    broken = [i for i in adapted if not {"to_k_ip.weight", "to_v_ip.weight"} <= layers[i]]
    if not adapted or broken:
        raise CorruptFileError(f"{path}: ip_adapter weights lack to_k_ip/to_v_ip pairs (layers {broken or 'none'})",
                               "the file is truncated or not an IP-Adapter checkpoint; download it again")
    widths = {sd["ip_adapter"][f"{i}.to_k_ip.weight"].shape[-1] for i in adapted}
    if len(widths) != 1:
        raise CorruptFileError(f"{path}: to_k_ip weights disagree on the image-token width ({sorted(widths)})",
                               "download the checkpoint again")
    return kind, len(adapted), widths.pop()


def load_ip_adapter(path: PathLike | None, *, image_encoder_path: PathLike | None = None,
                    dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    config_key: str | None = None, image_encoder_config_key: str | None = None) -> IPAdapterWeights:
    """IP-Adapter weights from a ``.bin`` / ``.safetensors`` file, validated; kinds that read CLIP image features
    (Plus, FaceID-PlusV2, ...) also load the CLIP image encoder from ``image_encoder_path``."""
    spec = model_spec("ip_adapter")
    if path is None:
        raise MissingWeightsError(f"no file is configured for the {spec.name}", download_hint(spec, config_key))
    p = expand_path(path)
    if not p.is_file():
        raise MissingWeightsError(
            f"the {spec.name} were not found: expected an IP-Adapter .bin or .safetensors file at {p} "
            f"({'a directory' if p.is_dir() else 'nothing there'})", download_hint(spec, config_key))
    sd = _read_ip_adapter_file(p, spec)
    kind, num_layers, width = _validate_ip_adapter(sd, p, spec)
    dtype = dtype or torch.float32

    def cast(group: dict) -> dict:
        return {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
                for k, v in group.items()}

    weights = IPAdapterWeights(p, kind, cast(sd["image_proj"]), cast(sd["ip_adapter"]), num_layers, width)
    if kind in _NEEDS_IMAGE_ENCODER:
        if image_encoder_path is None:
            enc = model_spec("clip_image_encoder")
            raise MissingWeightsError(
                f"the IP-Adapter checkpoint {p.name} ({kind}) needs the {enc.name}, but no image encoder "
                f"directory was given", download_hint(enc, image_encoder_config_key or "image_encoder_path"))
        weights.image_encoder = load_clip_image_encoder(image_encoder_path, dtype=dtype, device=device,
                                                        config_key=image_encoder_config_key)
    return weights


def attach_ip_adapter(unet, weights: IPAdapterWeights, scale: float = 1.0):
    """Install the adapter's image projection and decoupled cross-attention processors into a diffusers UNet.

    Afterwards the UNet takes ``added_cond_kwargs={"image_embeds": [embeds]}``; ``scale`` weighs the image branch
    (GaussianIP uses 0.5 for FaceID). Only the image projection and the ``to_k_ip`` / ``to_v_ip`` weights are
    installed (through diffusers' UNet loader); the LoRA weights that FaceID checkpoints also carry stay in
    ``weights.ip_adapter`` for the caller, and FaceID-Plus projections additionally need their CLIP hidden states
    set on ``unet.encoder_hid_proj.image_projection_layers[0].clip_embeds`` as diffusers' FaceID pipelines do.
    """
    # Processors are counted over the UNet's cross-attention layers; a mismatch means another UNet family.
    n_cross = sum(1 for name in unet.attn_processors if name.endswith("attn2.processor"))
    if n_cross != weights.num_layers:
        raise InputError(f"the IP-Adapter {weights.path.name} adapts {weights.num_layers} cross-attention layers "
                         f"but this UNet has {n_cross}", "use the adapter made for this base model (e.g. *_sd15)")
    unet._load_ip_adapter_weights([weights.state_dict()])
    for proc in unet.attn_processors.values():
        if hasattr(proc, "scale") and isinstance(proc.scale, list):
            proc.scale = [scale] * len(proc.scale)
    return unet
