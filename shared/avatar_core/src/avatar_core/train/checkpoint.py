"""Training checkpoints on disk: layout, discovery, RNG states and atomic directory replacement.

A checkpoint is a directory ``<output_dir>/checkpoints/step_XXXXXXXX/`` holding::

    model.safetensors       unwrapped model state dict
    ema.safetensors         EMA shadows (when EMA is on)
    optimizer.pt            optimizer state dict (torch.save)
    scheduler.pt            LR-scheduler state dict (when there is one)
    scaler.pt               fp16 GradScaler state (when mixed_precision="fp16")
    rng_<rank>.safetensors  python / numpy / torch CPU / CUDA RNG states of process <rank>
    trainer_state.json      step, data position, config; written last

It is assembled in ``.tmp-step_XXXXXXXX`` and renamed into place only when complete, so a
directory named ``step_*`` that holds ``trainer_state.json`` is always a whole checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avatar_core.io.tensors import fsync_dir, load_tensors, save_tensors

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def holds_run(output_dir: str | os.PathLike) -> bool:
    """``output_dir`` holds (part of) a training run: a checkpoint, even a half-written one, or a metrics log."""
    root = Path(output_dir)
    ckpts = root / CHECKPOINTS
    return (root / METRICS_FILE).is_file() or (ckpts.is_dir() and any(ckpts.iterdir()))


def remove_stale(output_dir: str | os.PathLike) -> None:
    """Delete half-written directories left by a crash during a save."""
    root = Path(output_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` directory to ``final``, replacing an older ``final`` if there is one."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_rng(path: Path) -> None:
    """Python, numpy, torch CPU and (if present) CUDA generator states of this process, as safetensors + JSON."""
    version, py_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    meta = {"python": [version, list(py_state), gauss], "numpy": [np_kind, int(np_pos), int(np_has_gauss),
                                                                float(np_gauss)]}
    save_tensors(path, tensors, meta)


def load_rng(path: Path) -> dict[str, Any]:
    """Read a file written by :func:`save_rng` (raises CorruptFileError/MissingFileError on a bad file)."""
    tensors, meta = load_tensors(path)
    return {"tensors": tensors, "meta": meta}


def restore_rng(rng: dict[str, Any]) -> None:
    tensors, meta = rng["tensors"], rng["meta"]
    version, py_state, gauss = meta["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, pos, has_gauss, g = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, g))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
