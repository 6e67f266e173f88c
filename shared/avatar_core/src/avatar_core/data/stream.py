"""Training data streamed from disk: per-item records read lazily, served by a ``DataLoader`` with workers.

Memory is flat in the dataset's size: a process holds the item ids, the prefetched batches and nothing else. An item
is assembled by *fields*, callables ``item_id -> dict``, each reading one kind of record:

* :class:`RecordField` -- tensors of a :class:`RecordFolder` (fitted triplanes, latents, cached features): one
  safetensors file per item, ``<root>/<item_id>.safetensors``, written atomically by :mod:`avatar_core.io`.
* :class:`CameraField` -- an avatar's calibrated cameras from its ``cameras.json`` (never by decoding an image).
* :class:`ViewsField` -- an avatar's RGBA views (fitting and evaluation targets).

Storage format, chosen by measurement (``tools/bench_formats.py``, 2 CPU cores, page cache warm): one shuffled
epoch of 512 items of 0.38 MiB read 4400 items/s from per-item safetensors (0 workers), 1870 from webdataset tar
shards and 1110 from litdata chunks; at 6 MiB items 302, 47 and 655 items/s. The per-item folder was kept: it reads
any item in any order (an epoch's order is a pure function of seed and epoch, so a resumed run skips consumed
batches without reading them; tar shards only stream in shard order through a shuffle buffer), a fitting stage
writes and resumes item by item, a truncated file is detected from its header, and it needs no new dependency.
Object stores are reached through a mounted filesystem (s3fs, gcsfuse, a cluster's shared filesystem).

Sharding follows :mod:`avatar_core.train.sharding`: ``batch_size`` is the global batch, an epoch is a seeded
permutation cut into global batches, and rank ``r`` of ``w`` takes items ``r::w`` of each. :class:`StreamLoader` is
given to :class:`avatar_core.train.Trainer` as its data; the Trainer calls :meth:`StreamLoader.batches_from` to
resume mid-epoch.

A missing or corrupt item is named in the error; ``on_error="skip"`` drops it from its batch instead (logged once
per item), ``"stop"`` (the default) ends the run, leaving every file already written in place.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from avatar_core.errors import AvatarError, ConfigError, CorruptFileError, InputError, MissingFileError
from avatar_core.io import load_image, load_tensors, save_tensors
from avatar_core.train.sharding import global_batches, process_shard, shard_batch

log = logging.getLogger(__name__)

__all__ = [
    "ON_ERROR",
    "CameraField",
    "EpochBatchSampler",
    "RecordField",
    "RecordFolder",
    "StreamDataset",
    "StreamLoader",
    "ViewsField",
    "collate_items",
    "epoch_order",
]

#: What a dataset does with an item it cannot read.
ON_ERROR = ("stop", "skip")

Field = Callable[[str], Mapping[str, Any]]


# ---------------------------------------------------------------------------------------------------------------
# Records on disk
# ---------------------------------------------------------------------------------------------------------------
class RecordFolder:
    """One safetensors file per item: ``<root>/<item_id>.safetensors`` (atomic writes, item-by-item resume)."""

    SUFFIX = ".safetensors"

    def __init__(self, root: str | os.PathLike, what: str = "record"):
        self.root = Path(root)
        self.what = what

    def path(self, item_id: str) -> Path:
        return self.root / f"{item_id}{self.SUFFIX}"

    def exists(self, item_id: str) -> bool:
        return self.path(item_id).is_file()

    def ids(self) -> list[str]:
        """Items with a file, sorted (half-written temporary files are not items)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name[: -len(self.SUFFIX)] for p in self.root.glob(f"*{self.SUFFIX}")
                      if not p.name.startswith("."))

    def missing(self, ids: Sequence[str]) -> list[str]:
        return [i for i in ids if not self.exists(i)]

    def is_complete(self, item_id: str) -> bool:
        """The file exists and its header covers the whole file (a truncated write fails this)."""
        try:
            with safe_open(str(self.path(item_id)), framework="pt") as f:
                f.metadata()
            return True
        except (SafetensorError, OSError):
            return False

    def save(self, item_id: str, tensors: Mapping[str, Tensor], metadata: dict | None = None) -> Path:
        return save_tensors(self.path(item_id), tensors, metadata)

    def load(self, item_id: str, keys: Sequence[str] | None = None) -> dict[str, Tensor]:
        """The item's tensors (all, or ``keys``); errors name the item and the file."""
        path = self.path(item_id)
        if not path.is_file():
            raise MissingFileError(f"{self.what} of item {item_id} not found: {path}",
                                   "write it first (run the stage that produces it), or drop the item")
        tensors, _ = load_tensors(path)
        if keys is not None:
            absent = [k for k in keys if k not in tensors]
            if absent:
                raise CorruptFileError(f"{self.what} {path} of item {item_id} lacks {absent} (has {sorted(tensors)})",
                                       "delete the file and write it again")
            tensors = {k: tensors[k] for k in keys}
        return tensors


class RecordField:
    """Field: the tensors of an item's :class:`RecordFolder` file, optionally renamed (``{file_key: item_key}``)."""

    def __init__(self, folder: RecordFolder | str | os.PathLike, keys: Mapping[str, str] | Sequence[str] | None = None):
        self.folder = folder if isinstance(folder, RecordFolder) else RecordFolder(folder)
        self.keys = dict(keys) if isinstance(keys, Mapping) else ({k: k for k in keys} if keys is not None else None)

    def __call__(self, item_id: str) -> dict[str, Tensor]:
        tensors = self.folder.load(item_id, list(self.keys) if self.keys is not None else None)
        return {self.keys[k]: v for k, v in tensors.items()} if self.keys is not None else tensors


def _avatar_dir(root: Path, item_id: str) -> Path:
    return root / "avatars" / str(item_id)


def read_cameras(root: str | os.PathLike, item_id: str, views: Sequence[int] | None = None) -> dict[str, Any]:
    """An avatar's view cameras from ``avatars/<id>/cameras.json``: ``viewmats [V, 4, 4]``, ``Ks [V, 3, 3]`` (OpenCV
    world-to-camera, :mod:`avatar_core.cameras`), ``width``, ``height`` and the view ``files``."""
    path = _avatar_dir(Path(root), item_id) / "cameras.json"
    if not path.is_file():
        raise MissingFileError(f"cameras of avatar {item_id} not found: {path}",
                               "regenerate the avatar, or drop it from the dataset")
    try:
        cams = json.loads(path.read_text(encoding="utf-8"))
        frames = cams["views"] if views is None else [cams["views"][k] for k in views]
        return {"viewmats": torch.tensor([f["viewmat"] for f in frames], dtype=torch.float32),
                "Ks": torch.tensor([f["K"] for f in frames], dtype=torch.float32),
                "width": int(cams["width"]), "height": int(cams["height"]), "files": [f["file"] for f in frames]}
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise CorruptFileError(f"cameras of avatar {item_id} in {path} are unreadable ({type(e).__name__}: {e})",
                               "regenerate the avatar, or drop it from the dataset") from e


class CameraField:
    """Field: ``viewmats [V, 4, 4]``, ``Ks [V, 3, 3]``, ``width``, ``height`` from ``cameras.json``."""

    def __init__(self, root: str | os.PathLike, views: Sequence[int] | None = None):
        self.root, self.views = Path(root), list(views) if views is not None else None

    def __call__(self, item_id: str) -> dict[str, Any]:
        cams = read_cameras(self.root, item_id, self.views)
        cams.pop("files")
        return cams


class ViewsField:
    """Field: ``images [V, H, W, 4]`` (straight-alpha RGBA in [0, 1]) plus the cameras of :class:`CameraField`."""

    def __init__(self, root: str | os.PathLike, views: Sequence[int] | None = None):
        self.root, self.views = Path(root), list(views) if views is not None else None

    def __call__(self, item_id: str) -> dict[str, Any]:
        cams = read_cameras(self.root, item_id, self.views)
        d = _avatar_dir(self.root, item_id)
        images = torch.stack([load_image(d / f) for f in cams.pop("files")])
        if images.shape[-1] != 4:
            raise CorruptFileError(f"views of avatar {item_id} are not RGBA", "regenerate the avatar")
        return {"images": images, **cams}


# ---------------------------------------------------------------------------------------------------------------
# Dataset, order, loader
# ---------------------------------------------------------------------------------------------------------------
class StreamDataset(Dataset):
    """Items ``{"index", "item_id", "epoch", **field(item_id) for each field}`` read when asked, never all at once.

    Indexed by an int or by ``(index, epoch)`` (what :class:`EpochBatchSampler` yields), so per-epoch choices made
    in ``transform`` (a caption variant, say) are pure functions of seed, epoch and index in any worker process.

    Args:
        ids: the item ids, in index order.
        fields: callables ``item_id -> dict`` merged in order (a later key must not repeat an earlier one).
        on_error: ``"stop"`` raises an error naming the item; ``"skip"`` returns None for it (logged once per
            item in each process), which :func:`collate_items` drops from its batch.
        transform: ``(item, epoch) -> item`` applied after the fields.
    """

    def __init__(self, ids: Sequence[str], fields: Sequence[Field], on_error: str = "stop",
                 transform: Callable[[dict[str, Any], int], dict[str, Any]] | None = None):
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error={on_error!r}", f"use one of {ON_ERROR}")
        if not ids:
            raise InputError("a streaming dataset needs at least one item", "check the dataset folder / id list")
        self.ids = [str(i) for i in ids]
        self.fields = list(fields)
        self.on_error = on_error
        self.transform = transform
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, item_id: str) -> dict[str, Any]:
        """The fields of one item (errors propagate)."""
        out: dict[str, Any] = {}
        for f in self.fields:
            part = f(item_id)
            clash = set(part) & set(out)
            if clash:
                raise InputError(f"fields repeat the keys {sorted(clash)}", "rename them (RecordField keys=...)")
            out.update(part)
        return out

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        i, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)
        item_id = self.ids[i]
        try:
            item = {"index": i, "item_id": item_id, "epoch": epoch, **self.read(item_id)}
            return self.transform(item, epoch) if self.transform is not None else item
        except (AvatarError, OSError, ValueError, KeyError) as e:
            reason = e.message if isinstance(e, AvatarError) else f"{type(e).__name__}: {e}"
            if self.on_error == "stop":
                raise CorruptFileError(f"item {item_id} (index {i}) cannot be read: {reason}",
                                       "fix or regenerate that item, or set the data's on_error to 'skip' to train "
                                       "without it") from e
            if item_id not in self._reported:
                self._reported.add(item_id)
                log.warning("skipping item %s (index %d): %s", item_id, i, reason)
            return None


def collate_items(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """torch's default collate over the readable items of a batch (skipped items are None)."""
    kept = [it for it in items if it is not None]
    if not kept:
        raise CorruptFileError(f"every item of a batch of {len(items)} was unreadable",
                               "fix the dataset (the warnings above name the items)")
    return default_collate(kept)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> Tensor:  # [n] int64
    """The epoch's sample order: a permutation seeded by ``(seed, epoch)`` only (so a resumed run replays it)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) * 1000003 + int(epoch)))


Order = Callable[[int, int, int], Sequence[int]]


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's batches of ``(index, epoch)`` keys (:mod:`avatar_core.train.sharding`'s rule), from batch
    ``start`` on. ``order(n, seed, epoch)`` gives the epoch's sample order (default :func:`epoch_order`).

    Call :meth:`set_epoch` (and :meth:`set_start` to resume mid-epoch) before iterating.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None, order: Order | None = None):
        self.n, self.batch_size, self.seed, self.shuffle = int(n), int(batch_size), int(seed), shuffle
        self.order = order
        self.rank, self.world = process_shard(rank, world_size)
        bs = min(self.batch_size, self.n)
        if bs < self.world or bs % self.world:
            raise ConfigError(f"a global batch of {bs} does not split evenly over {self.world} processes",
                              f"set the batch size to a multiple of {self.world} (it is the global batch)")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def global_batches(self, epoch: int) -> list[Tensor]:
        if self.order is not None:
            order = torch.as_tensor(list(self.order(self.n, self.seed, epoch)), dtype=torch.int64)
            if sorted(order.tolist()) != list(range(self.n)):
                raise InputError("the data order function did not return a permutation of the items",
                                 "return each index in range(n) once")
        else:
            order = epoch_order(self.n, self.seed, epoch, self.shuffle)
        return global_batches(order, self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.global_batches(self.epoch)[self.start:]:
            yield [(i, self.epoch) for i in shard_batch(batch, self.rank, self.world).tolist()]

    def __len__(self) -> int:
        return max(len(self.global_batches(self.epoch)) - self.start, 0)


class StreamLoader:
    """``epoch -> batches`` of a :class:`StreamDataset` through a ``DataLoader`` (the Trainer's ``data``).

    Args:
        dataset: the items.
        batch_size: the global batch (each of ``w`` processes gets ``batch_size / w`` items of it).
        seed: with the epoch, the only input of the data order.
        num_workers: DataLoader worker processes (0: read in the training process).
        prefetch_factor: batches each worker reads ahead.
        pin_memory: page-locked batches for faster host-to-GPU copies.
        order: ``(n, seed, epoch) -> permutation`` (default :func:`epoch_order`).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True, num_workers: int = 0,
                 prefetch_factor: int = 2, pin_memory: bool = False, rank: int | None = None,
                 world_size: int | None = None, order: Order | None = None):
        if num_workers < 0:
            raise ConfigError(f"num_workers={num_workers}", "use 0 (read in the training process) or more")
        self.dataset = dataset
        self.sampler = EpochBatchSampler(len(dataset), batch_size, seed, shuffle, rank, world_size, order)
        self.seed = int(seed)
        extra = {"prefetch_factor": prefetch_factor, "persistent_workers": True} if num_workers else {}
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                 collate_fn=collate_items, pin_memory=pin_memory, **extra)

    def batches_from(self, epoch: int, skip: int = 0) -> Iterator[Any]:
        """The batches of ``epoch`` after the first ``skip`` (skipped by index: nothing of them is read)."""
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(skip)
        return iter(self.loader)

    def __call__(self, epoch: int) -> Iterator[Any]:
        return self.batches_from(epoch, 0)

    def batches_per_epoch(self) -> int:
        return len(self.sampler.global_batches(0))

    def __len__(self) -> int:
        return self.batches_per_epoch()
