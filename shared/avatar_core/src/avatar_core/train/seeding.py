"""Seeded model construction: the initial weights are a function of the seed alone.

``with seeded(seed): model = build()`` seeds python, numpy, torch CPU and CUDA generators for the block and
restores every generator afterwards, so building a model neither depends on what ran before (a dataset
written first, a teacher fitted in the same process) nor shifts any later random stream. Two runs of the
same config therefore start from bit-identical weights; the :class:`~avatar_core.train.Trainer` builds a
model given as a factory this way (seed ``train.seed``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with every global generator seeded by ``seed``; restore them all on exit."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # also seeds every CUDA device
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
