"""An on-disk cache of derived per-item features (text-encoder token states, portrait VAE features, downsampled
triplanes), computed once and read per item by the streaming layer (:mod:`avatar_core.data.stream`).

A cache lives in ``<root>/<name>/<key>/``: ``key`` is a hash of the encoder's *identity* -- a JSON dict naming the
encoder, a fingerprint of its weights (:func:`module_fingerprint`) and every setting that changes its output -- so a
changed encoder or setting reads and writes another folder and an old entry is never served for a new encoder.
``identity.json`` holds the identity in clear; ``items/<item_id>.safetensors`` the features, each written atomically
(:func:`avatar_core.io.save_tensors`) with the key in its metadata. :meth:`FeatureCache.build` computes what is
missing and rebuilds any file that is truncated, unreadable or stamped with another key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from avatar_core.data.stream import RecordField, RecordFolder
from avatar_core.errors import CorruptFileError, InputError, MissingFileError
from avatar_core.io import load_json, save_json
from avatar_core.io.tensors import METADATA_KEY
from avatar_core.train.sharding import process_shard

log = logging.getLogger(__name__)

__all__ = ["FeatureCache", "files_fingerprint", "identity_key", "module_fingerprint"]

Compute = Callable[[list[str]], Sequence[Mapping[str, Tensor] | None]]


def identity_key(identity: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over the identity's canonical JSON."""
    try:
        text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise InputError(f"a cache identity must be JSON ({e})", "use strings, numbers, lists and dicts") from e
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def files_fingerprint(paths: Sequence[str | os.PathLike]) -> str:
    """SHA-256 (16 hex digits) of the files' names, sizes and modification times (absent files count as absent):
    the identity of the inputs a derived feature was computed from (a refitted triplane changes it)."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{os.fspath(p)}:{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(f"{os.fspath(p)}:absent;".encode())
    return h.hexdigest()[:16]


def module_fingerprint(module: nn.Module) -> str:
    """SHA-256 (16 hex digits) of a module's class, parameter and buffer names, shapes, dtypes and values."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class FeatureCache:
    """Per-item features under ``<root>/<name>/<identity_key>``.

    Args:
        root: the cache folder (e.g. ``<run>/cache``).
        name: what is cached (``portrait_features``, ``text_states``, ...), a folder name.
        identity: the encoder's identity and settings (JSON); any change selects a new folder.
    """

    def __init__(self, root: str | os.PathLike, name: str, identity: Mapping[str, Any]):
        self.identity = json.loads(json.dumps(dict(identity), sort_keys=True))
        self.key = identity_key(self.identity)
        self.name = name
        self.dir = Path(root) / name / self.key
        self.folder = RecordFolder(self.dir / "items", what=f"cached {name}")

    def _stamp_ok(self, item_id: str) -> bool:
        """Complete file (header covers it) written for this identity."""
        try:
            with safe_open(str(self.folder.path(item_id)), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
        except (SafetensorError, OSError, ValueError):
            return False
        return meta.get("cache_key") == self.key and meta.get("item") == str(item_id)

    def valid(self, item_id: str) -> bool:
        return self.folder.exists(item_id) and self._stamp_ok(item_id)

    def put(self, item_id: str, tensors: Mapping[str, Tensor]) -> Path:
        return self.folder.save(item_id, tensors, {"cache_key": self.key, "item": str(item_id), "name": self.name})

    def get(self, item_id: str) -> dict[str, Tensor]:
        """The cached features of one item; a missing or damaged entry is an error naming it."""
        if not self.folder.exists(item_id):
            raise MissingFileError(f"no cached {self.name} for item {item_id} in {self.dir}",
                                   "build the cache first (the training command does so before training)")
        if not self._stamp_ok(item_id):
            raise CorruptFileError(f"cached {self.name} of item {item_id} ({self.folder.path(item_id)}) is truncated "
                                   "or belongs to another encoder", "run the command again: it rebuilds the entry")
        return self.folder.load(item_id)

    def field(self, keys: Mapping[str, str] | Sequence[str] | None = None) -> RecordField:
        """A :class:`~avatar_core.data.stream.StreamDataset` field reading this cache."""
        return RecordField(self.folder, keys)

    def _failed_marker(self, item_id: str) -> Path:
        return self.folder.root / f".{item_id}.failed"

    def build(self, ids: Sequence[str], compute: Compute, batch_size: int = 16, progress: bool = False,
              rank: int | None = None, world_size: int | None = None, timeout_s: float = 86400.0) -> dict[str, Any]:
        """Compute the features of every item of ``ids`` that has no valid entry. ``compute(item_ids) -> [features
        dict per item]`` runs on batches of ``batch_size``; it gives None for an item it could not read (a caller
        that skips bad items), which is then left out.

        Under several processes (``rank``/``world_size``, default :func:`~avatar_core.train.sharding.process_shard`)
        each computes its ``rank::world_size`` share, then waits, by the files on the shared filesystem, until every
        item is written or marked unreadable by its process: afterwards every process may read any item.

        Returns counts of this process's share: ``computed`` (new), ``rebuilt`` (truncated / foreign entries
        replaced), ``reused``, and ``failed``: every id (of all processes) that could not be computed.
        """
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size}", "use at least 1")
        rank, world_size = process_shard(rank, world_size)
        all_ids = [str(i) for i in ids]
        mine = all_ids[rank::world_size]
        if rank == 0:
            self._write_identity()
        todo, rebuilt = [], 0
        for i in mine:
            if self.valid(i):
                continue
            self._failed_marker(i).unlink(missing_ok=True)  # a marker of an earlier run: this run tries again
            if self.folder.exists(i):
                log.warning("cached %s of item %s is truncated or stale; rebuilding it", self.name, i)
                rebuilt += 1
            todo.append(i)
        failed: list[str] = []
        bar = tqdm(total=len(todo), desc=f"cache {self.name}", disable=not progress or not todo)
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            feats = compute(chunk)
            if len(feats) != len(chunk):
                raise InputError(f"the feature function returned {len(feats)} items for {len(chunk)}",
                                 "return one dict of tensors per item id")
            for i, f in zip(chunk, feats):
                if f is None:
                    failed.append(i)
                    save_json(self._failed_marker(i), {"item": i})
                    continue
                self.put(i, {k: v.detach().cpu() for k, v in f.items()})
                self._failed_marker(i).unlink(missing_ok=True)
            bar.update(len(chunk))
        bar.close()
        counts = {"computed": len(todo) - rebuilt - len(failed), "rebuilt": rebuilt, "reused": len(mine) - len(todo)}
        if world_size > 1:
            failed = self._wait_for_others(all_ids, set(mine), timeout_s)
        return {**counts, "failed": failed}

    def _wait_for_others(self, ids: list[str], mine: set[str], timeout_s: float) -> list[str]:
        """Poll until every item of the other processes' shares is valid or marked failed; all failed ids."""
        deadline = time.monotonic() + timeout_s
        pending = [i for i in ids if i not in mine]
        while True:
            pending = [i for i in pending if not (self.valid(i) or self._failed_marker(i).is_file())]
            if not pending:
                return [i for i in ids if self._failed_marker(i).is_file() and not self.valid(i)]
            if time.monotonic() > deadline:
                raise MissingFileError(f"{len(pending)} cached {self.name} entries (e.g. {pending[0]}) were not "
                                       f"written by the other processes within {timeout_s:.0f} s",
                                       "check that every process runs and sees the same shared filesystem")
            time.sleep(1.0)

    def _write_identity(self) -> None:
        path = self.dir / "identity.json"
        if path.is_file():
            try:
                if load_json(path) == self.identity:
                    return
            except CorruptFileError:
                pass
        save_json(path, self.identity)
