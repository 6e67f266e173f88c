"""Normalisation statistics measured by a streaming pass over the training data (or a seeded subset of stated size),
never from a stacked tensor: RodinHD's per-channel triplane statistics, TeRA's latent scale.

:class:`ChannelMoments` merges per-batch count, mean and sum of squared deviations in float64 (Chan, Golub and
LeVeque's pairwise update), which stays exact where ``E[x^2] - E[x]^2`` would cancel, and tracks the range. Its
:meth:`~ChannelMoments.state` is plain JSON, to be stored with the model (checkpoint metadata or buffers).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from avatar_core.errors import InputError

__all__ = ["ChannelMoments", "seeded_subset"]


def seeded_subset(n: int, size: int | None, seed: int) -> list[int]:
    """``size`` distinct indices of ``range(n)`` drawn with ``seed``, sorted (all of them when ``size`` is None or
    at least ``n``): the items a statistics pass reads when the whole dataset is too large to visit."""
    if size is None or size >= n:
        return list(range(n))
    if size < 1:
        raise InputError(f"a statistics subset of {size} items", "use at least 1 item (or None for all)")
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:size].tolist())


class ChannelMoments:
    """Running per-channel count, mean, variance and range of tensors ``[N, C, ...]`` (channel axis ``dim``)."""

    def __init__(self, channels: int, dim: int = 1):
        self.channels, self.dim = int(channels), int(dim)
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)
        self.low = torch.full((channels,), float("inf"), dtype=torch.float64)
        self.high = torch.full((channels,), -float("inf"), dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: Tensor) -> ChannelMoments:
        if x.ndim <= self.dim or x.shape[self.dim] != self.channels:
            raise InputError(f"expected {self.channels} channels on axis {self.dim}, got shape {tuple(x.shape)}",
                             "pass tensors of the model's channel count")
        v = x.detach().movedim(self.dim, 0).reshape(self.channels, -1).double().cpu()
        if not torch.isfinite(v).all():
            raise InputError("statistics input contains NaN or infinite values", "fix or drop the offending items")
        n = v.shape[1]
        if n == 0:
            return self
        mean = v.mean(dim=1)
        m2 = ((v - mean[:, None]) ** 2).sum(dim=1)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total
        self.low = torch.minimum(self.low, v.min(dim=1).values)
        self.high = torch.maximum(self.high, v.max(dim=1).values)
        return self

    def update_all(self, batches: Iterable[Tensor]) -> ChannelMoments:
        for b in batches:
            self.update(b)
        return self

    def _need(self, k: int) -> None:
        if self.count < k:
            raise InputError(f"statistics of {self.count} values", "stream at least one non-empty item first")

    def var(self, unbiased: bool = True) -> Tensor:  # [C] float64
        self._need(2 if unbiased else 1)
        return self.m2 / (self.count - 1 if unbiased else self.count)

    def std(self, unbiased: bool = True) -> Tensor:
        return self.var(unbiased).sqrt()

    def rms(self) -> Tensor:  # [C]: sqrt(E[x^2])
        self._need(1)
        return (self.m2 / self.count + self.mean**2).sqrt()

    def pooled(self) -> ChannelMoments:
        """The statistics of all channels as one (same value repeated over ``C``)."""
        self._need(1)
        n = self.count
        mean = self.mean.mean()
        m2 = self.m2.sum() + (n * (self.mean - mean) ** 2).sum()
        out = ChannelMoments(self.channels, self.dim)
        out.count = n * self.channels
        out.mean, out.m2 = mean.expand(self.channels).clone(), m2.expand(self.channels).clone()
        out.low, out.high = self.low.min().expand(self.channels).clone(), self.high.max().expand(self.channels).clone()
        return out

    def state(self) -> dict[str, Any]:
        """JSON: count, mean, m2, low, high (store it with the model)."""
        return {"channels": self.channels, "dim": self.dim, "count": self.count, "mean": self.mean.tolist(),
                "m2": self.m2.tolist(), "low": self.low.tolist(), "high": self.high.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ChannelMoments:
        out = cls(state["channels"], state["dim"])
        out.count = int(state["count"])
        for k in ("mean", "m2", "low", "high"):
            setattr(out, k, torch.tensor(state[k], dtype=torch.float64))
        return out
