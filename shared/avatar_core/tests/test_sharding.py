"""The per-process sharding rule: every global batch split r::w, equal shares, the gradient of the global batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar_core.errors import ConfigError, InputError
from avatar_core.train import global_batches, process_shard, shard_batch


def test_global_batches_drop_the_remainder_and_keep_the_order():
    order = np.random.default_rng(0).permutation(11)
    batches = global_batches(order, 4)
    assert [len(b) for b in batches] == [4, 4]
    np.testing.assert_array_equal(np.concatenate(batches), order[:8])
    assert len(global_batches(torch.arange(3), 10)) == 1  # a batch larger than the epoch: one batch of all
    with pytest.raises(ConfigError, match="batch_size"):
        global_batches(order, 0)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shards_partition_each_batch_and_average_to_its_gradient(world):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, generator=g)
    batch = {"x": x, "y": y, "scales": (x[:, :1], x[:, 1:])}  # a tuple field: one tensor per scale
    w = torch.randn(3, requires_grad=True)

    def grad(b):  # the gradient of the mean loss over b, as each process computes it
        (gw,) = torch.autograd.grad(((b["x"] @ w - b["y"]) ** 2).mean(), w)
        return gw

    shards = [shard_batch(batch, rank, world) for rank in range(world)]
    assert sorted(i for s in shards for i in s["y"].tolist()) == sorted(y.tolist())  # a partition of the batch
    assert all(len(s["x"]) == 8 // world and len(s["scales"][1]) == 8 // world for s in shards)
    # Accelerate averages the processes' gradients: equal shares give exactly the global batch's gradient.
    torch.testing.assert_close(torch.stack([grad(s) for s in shards]).mean(0), grad(batch))


def test_uneven_batches_and_bad_shards_are_refused():
    with pytest.raises(ConfigError, match="multiple of 4"):
        shard_batch(torch.arange(6), 0, 4)
    with pytest.raises(InputError, match="differ in length"):
        shard_batch({"a": torch.arange(4), "b": torch.arange(2)}, 0, 2)
    with pytest.raises(InputError, match="rank"):
        process_shard(2, 2)


def test_process_shard_reads_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert process_shard() == (1, 3)
    assert process_shard(0, 1) == (0, 1)  # explicit values win
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert process_shard() == (0, 1)
