"""Triplane normalisation: fitted triplanes are not unit-variance, so a per-channel shift/scale measured on the
training data maps them to zero mean, unit variance before diffusion and back after sampling (App. A)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from avatar_core.data.stats import ChannelMoments
from avatar_core.errors import ConfigError, InputError
from rodinhd.triplane import rollout as planes_to_rollout  # [B, 3, C, H, W] -> [B, C, H, 3W]


class TriplaneNormalizer(nn.Module):
    """Per-channel shift/scale to zero mean, unit variance, measured on the training triplanes.

    Args: channels (C), per_channel (True: one mean/std per channel; False: one for all), eps (std floor).
    ``fit(triplanes)`` takes roll-outs [N, C, H, 3W] (or planes [N, 3, C, H, W]); the statistics live in buffers.
    """

    def __init__(self, channels: int, per_channel: bool = True, eps: float = 1e-6):
        super().__init__()
        self.per_channel = per_channel
        self.eps = eps
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.register_buffer("low", torch.full((channels,), -float("inf")))
        self.register_buffer("high", torch.full((channels,), float("inf")))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, triplanes: Tensor | Iterable[Tensor]) -> TriplaneNormalizer:
        """Measure mean, standard deviation and range on a batch, or stream over an iterable of batches.

        The kernel's running moments (float64, batch by batch) do the counting, so a whole dataset can be
        streamed from disk.
        """
        batches = [triplanes] if isinstance(triplanes, Tensor) else triplanes
        C = self.mean.shape[0]
        moments = ChannelMoments(C)
        for b in batches:
            if b.ndim == 5:
                b = planes_to_rollout(b)
            if b.ndim != 4 or b.shape[1] != C:
                raise InputError(f"triplanes for normalisation must be [N, {C}, H, 3W], got {tuple(b.shape)}",
                                 "pass roll-outs of the model's channel count")
            moments.update(b)
        if moments.count < 2:
            raise InputError("no triplane values to fit the normaliser on", "pass at least one triplane")
        if not self.per_channel:
            moments = moments.pooled()
        mean = moments.mean
        std = moments.std().clamp(min=self.eps)
        self.mean.copy_(mean.float())
        self.std.copy_(std.float())
        self.low.copy_(((moments.low - mean) / std).float())
        self.high.copy_(((moments.high - mean) / std).float())
        self.fitted.fill_(True)
        return self

    def _check(self) -> None:
        if not bool(self.fitted):
            raise ConfigError("the triplane normaliser has not been fitted",
                              "call model.normalizer.fit(training_triplanes) before training (it is then saved "
                              "with the model)")

    def normalize(self, x: Tensor) -> Tensor:  # [B, C, H, 3W]
        self._check()
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def denormalize(self, x: Tensor) -> Tensor:  # [B, C, H, 3W]
        self._check()
        return x * self.std[:, None, None] + self.mean[:, None, None]

    def clip(self, x: Tensor) -> Tensor:  # [B, C, H, 3W] normalised
        """Clamp a normalised x0 prediction to the per-channel range seen in the training data.

        The data-driven counterpart of improved-diffusion's ``clip_denoised`` (x0 clamped to the image range
        [-1, 1]): at the first sampling steps alpha_t is ~1e-10 and an eps-derived x0 is otherwise unbounded.
        """
        return torch.maximum(torch.minimum(x, self.high[:, None, None]), self.low[:, None, None])
