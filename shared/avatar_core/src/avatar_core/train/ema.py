"""Exponential moving average (EMA) of model parameters, as used for evaluation and sampling by diffusion models."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from avatar_core.errors import ConfigError, InputError


class EMA:
    """Shadow copy ``s <- decay * s + (1 - decay) * p`` of every trainable floating-point parameter.

    The decay is constant (no warm-up), so an EMA started at step 0 is a pure function of the
    parameter trajectory; buffers are not averaged. Shadows live on the parameters' device and dtype.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {decay}", "use e.g. 0.999, or None to turn EMA off")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone()
            for name, p in model.named_parameters()
            if p.requires_grad and p.is_floating_point()
        }

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise InputError(f"EMA: the model lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}",
                             "pass the same (unwrapped) model the EMA was created from")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every shadow towards the model's current parameter (call once per optimizer step)."""
        params = self._params(model)
        for name, s in self.shadow.items():
            s.lerp_(params[name].detach().to(s.dtype), 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the EMA weights (permanently)."""
        params = self._params(model)
        for name, s in self.shadow.items():
            params[name].copy_(s)

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily swap the EMA weights into ``model`` (e.g. for evaluation); restored on exit."""
        params = self._params(model)
        backup = {name: params[name].detach().clone() for name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, b in backup.items():
                    params[name].copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int = 0) -> None:
        if set(state) != set(self.shadow):
            diff = sorted(set(state) ^ set(self.shadow))
            raise ConfigError(f"EMA weights do not match the model's parameters (differing names: {diff[:5]})",
                              "resume with the same model architecture the checkpoint was trained with")
        for name, s in self.shadow.items():
            s.copy_(state[name])
        self.num_updates = int(num_updates)
