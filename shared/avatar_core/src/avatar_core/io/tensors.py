"""Tensors and small files on disk: safetensors with JSON metadata, JSON, all written atomically.

Every writer here goes through :func:`atomic_write`: the bytes land in a temporary file in the
target's directory, are flushed to disk (``fsync``) and only then renamed over the target with
``os.replace``. A crash or an exception mid-write therefore leaves either the complete old file or
the complete new one, never a truncated mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from avatar_core.errors import CorruptFileError, InputError, MissingFileError

#: The safetensors string-metadata key under which our JSON metadata is stored.
METADATA_KEY = "avatar_core.json"

PathLike = str | os.PathLike


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX only; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``.

    Write anything to the yielded path (``torch.save``, PIL, ffmpeg, ``Path.write_text``). If the
    block raises, the temporary file is removed and ``path`` is left exactly as it was. The
    temporary name keeps ``path``'s suffix so that writers choosing a format by extension work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_json(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise InputError(f"cannot write {path}: the object is not JSON-serialisable ({e})",
                         "convert tensors/arrays to lists and paths to strings first") from e
    with atomic_write(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def load_json(path: PathLike) -> Any:
    """Read a JSON file; a missing file raises MissingFileError, an unreadable one CorruptFileError."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"JSON file not found: {path}", "check the path, or create the file first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e})",
                               "delete the file and regenerate it, or restore it from a backup") from e


def _prepare_for_saving(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, with aliasing (tied weights) broken by copies: safetensors refuses shared memory."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise InputError(f"save_tensors: value for {name!r} is a {type(t).__name__}, not a torch.Tensor",
                             "store only tensors; put other values into `metadata`")
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() > 0 and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def save_tensors(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Save named tensors as safetensors, with ``metadata`` (any JSON-serialisable dict), atomically."""
    try:
        meta_text = json.dumps(metadata if metadata is not None else {}, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise InputError(f"save_tensors({path}): metadata is not JSON-serialisable ({e})",
                         "pass only dicts, lists, strings, numbers, booleans and None as metadata") from e
    data = _prepare_for_saving(tensors)
    with atomic_write(path) as tmp:
        save_file(data, str(tmp), metadata={METADATA_KEY: meta_text})
    return Path(path)


def load_tensors(path: PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Load a safetensors file: ``(tensors, metadata)``.

    ``metadata`` is the JSON dict given to :func:`save_tensors`; for a file written by other tools
    it is the file's raw string metadata (possibly empty).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"safetensors file not found: {path}",
                               "check the path (and that the run that writes it has finished)")
    hint = ("the file is truncated or damaged: delete it and write it again "
            "(for a training checkpoint, resume from the previous checkpoint)")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw_meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        metadata = json.loads(raw_meta[METADATA_KEY]) if METADATA_KEY in raw_meta else dict(raw_meta)
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, ValueError, OSError, RuntimeError) as e:
        raise CorruptFileError(f"cannot read safetensors file {path}: {e}", hint) from e
    return tensors, metadata
