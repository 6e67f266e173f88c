"""Shared steps of every loader: find the folder, call the library offline, cast, place, wrap errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from avatar_core.errors import CorruptFileError, MissingWeightsError
from avatar_core.pretrained.registry import (
    ModelSpec,
    PathLike,
    download_hint,
    find_model_dir,
    model_spec,
    weight_candidates,
)


def _prefers_safetensors(directory: Path, spec: ModelSpec, variant: str | None) -> bool:
    cands = weight_candidates(spec, variant)
    return any((directory / f).is_file() for f in cands[:2])


def _place(model: torch.nn.Module, device: torch.device | str | None) -> torch.nn.Module:
    if device is not None:
        model = model.to(device)
    return model.eval()


def guarded(spec: ModelSpec, where: Path, load: Callable[[], Any]) -> Any:
    """Run a library loader; a file that exists but cannot be read becomes a :class:`CorruptFileError`."""
    try:
        return load()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        if isinstance(exc, MissingWeightsError):
            raise
        raise CorruptFileError(f"cannot load the {spec.name} from {where}: {type(exc).__name__}: {exc}",
                               "the files are truncated, damaged or of another model type; "
                               + download_hint(spec, None)) from exc


def _from_pretrained(kind: str, cls: type, path: PathLike | None, dtype_keyword: str, dtype: torch.dtype | None,
                     device: torch.device | str | None, variant: str | None, config_key: str | None):
    """``cls.from_pretrained`` on the local folder of ``kind``, offline, with its errors made one-line."""
    spec = model_spec(kind)
    d = find_model_dir(kind, path, variant, config_key)
    model = guarded(spec, d, lambda: cls.from_pretrained(
        d, local_files_only=True, variant=variant, use_safetensors=_prefers_safetensors(d, spec, variant),
        **{dtype_keyword: dtype or torch.float32}))
    return _place(model, device)


def load_diffusers(kind: str, cls: type, path: PathLike | None, *, dtype: torch.dtype | None,
                   device: torch.device | str | None, variant: str | None, config_key: str | None):
    return _from_pretrained(kind, cls, path, "torch_dtype", dtype, device, variant, config_key)


def load_transformers(kind: str, cls: type, path: PathLike | None, *, dtype: torch.dtype | None,
                      device: torch.device | str | None, variant: str | None, config_key: str | None):
    return _from_pretrained(kind, cls, path, "dtype", dtype, device, variant, config_key)


def load_tokenizer(kind: str, path: PathLike | None, config_key: str | None):
    from transformers import AutoTokenizer

    spec = model_spec(kind)
    d = find_model_dir(kind, path, None, config_key)
    return guarded(spec, d, lambda: AutoTokenizer.from_pretrained(d, local_files_only=True))
