"""One rule for sharing a training epoch among the processes of ``accelerate launch`` (or ``torchrun``).

The rule: a config's ``batch_size`` is the *global* batch, the batch one process alone would train on. An epoch is a
seeded order of the samples cut into consecutive global batches (the remainder, ``n mod batch_size`` samples, is
dropped on every process alike), and every global batch is split among the processes: rank ``r`` of ``w`` takes
items ``r::w``. So whatever the number of processes an epoch has the same optimizer steps over the same samples,
each process computes the mean loss of an equal share, and Accelerate's gradient averaging gives the gradient of
the global batch: N GPUs train as one (up to floating-point order), and a run can resume on another process count.
A global batch that does not split evenly is refused with a ConfigError (raise or lower ``batch_size``).

Per-process work that is not a batch (fitting one triplane per avatar, say) is split by :func:`process_shard`'s
``(rank, world_size)`` in the same ``r::w`` way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from avatar_core.errors import ConfigError, InputError

__all__ = ["global_batches", "process_shard", "shard_batch"]

T = TypeVar("T")


def process_shard(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process: the explicit values, else torch.distributed, else the launcher's
    ``RANK`` / ``WORLD_SIZE`` environment (``torchrun``, ``accelerate launch``), else ``(0, 1)``."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank = int(os.environ.get("RANK", 0)) if rank is None else rank
            world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"invalid shard rank={rank} of world_size={world_size}", "use 0 <= rank < world_size")
    return int(rank), int(world_size)


def global_batches(order: Sequence[int] | np.ndarray | torch.Tensor, batch_size: int) -> list:
    """Consecutive full global batches of an epoch's sample ``order`` (the remainder is dropped).

    Each batch is a slice of ``order`` (same type). ``batch_size`` larger than the epoch gives one batch of all.
    """
    n = len(order)
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size={batch_size}", "use a batch size of at least 1")
    bs = min(int(batch_size), n)
    return [order[s:s + bs] for s in range(0, n - bs + 1, bs)] if bs else []


def _take(x: Any, rank: int, world: int) -> Any:
    if isinstance(x, dict):
        return {k: _take(v, rank, world) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_take(v, rank, world) for v in x)
    return x[rank::world]


def _length(x: Any) -> int:
    if isinstance(x, dict):
        lengths = {_length(v) for v in x.values()}
    elif isinstance(x, tuple):
        lengths = {_length(v) for v in x}
    else:
        return len(x)
    if len(lengths) != 1:
        raise InputError(f"the fields of a batch differ in length ({sorted(lengths)})",
                         "give every field one entry per sample")
    return lengths.pop()


def shard_batch(batch: T, rank: int | None = None, world_size: int | None = None) -> T:
    """This process's share of one global batch: items ``rank::world_size`` of every field.

    ``batch`` is a tensor, array or list with one entry per sample, or a dict / tuple of those (all of the same
    length; a list field of per-scale tensors is given as a tuple of tensors, each sharded). With one process it is
    returned unchanged.
    """
    rank, world = process_shard(rank, world_size)
    if world == 1:
        return batch
    n = _length(batch)
    if n % world:
        raise ConfigError(f"a global batch of {n} samples does not split evenly over {world} processes",
                          f"set the batch size to a multiple of {world} (the batch size is the global batch)")
    return _take(batch, rank, world)
