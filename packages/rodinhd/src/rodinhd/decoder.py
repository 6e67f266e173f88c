"""The shared MLP decoder F (RodinHD Sec. 3.1): triplane features at a point -> density and colour.

Two small nets, as in torch-ngp's NeRF (the renderer of the authors' code): a density net mapping the aggregated
plane features to a raw density and a geometry feature, and a colour net mapping that feature to RGB. These two
nets are what identity-aware weight consolidation protects (:meth:`TriplaneDecoder.consolidated_parameters`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from avatar_core.errors import InputError
from avatar_core.render.volume import sample_triplane

if TYPE_CHECKING:
    from rodinhd.config import DecoderConfig

__all__ = ["TriplaneDecoder", "trunc_exp"]


#: Largest raw density fed to ``exp``: e^15 ~ 3e6 is opaque over any step, and capping it keeps the packed
#: renderer's running sums of ``sigma * dt`` (one cumulative sum over all rays on a CPU) far from float64 limits.
MAX_LOG_DENSITY = 15.0


class _TruncExp(torch.autograd.Function):
    """``exp(min(x, 15))`` whose gradient is ``exp(min(x, 15))`` everywhere: torch-ngp's truncated-exp density
    activation, with the value capped as well as the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x.clamp(max=MAX_LOG_DENSITY))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=MAX_LOG_DENSITY))


def trunc_exp(x: Tensor) -> Tensor:
    """Exponential density activation with a clamped gradient (torch-ngp)."""
    return _TruncExp.apply(x)


def _mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden), nn.ReLU(inplace=True)]
        dim = hidden
    mods.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*mods)


class TriplaneDecoder(nn.Module):
    """Shared decoder: aggregated triplane features ``[N, F]`` -> ``rgb [N, 3]`` in [0, 1], ``sigma [N]`` >= 0.

    Args:
        channels: triplane channels C (paper 32).
        reduce: how the three plane features combine: ``"sum"`` (default, F = C) or ``"concat"`` (F = 3C).
        hidden_dim: width of both nets (64, torch-ngp's default).
        geo_feat_dim: geometry feature passed from the density net to the colour net (15, torch-ngp).
        density_layers: linear layers of the density net (2).
        color_layers: linear layers of the colour net (2).
        density_activation: ``"exp"`` (torch-ngp's truncated exp, default) or ``"softplus"``.
        density_bias: added to the raw density before activation (0); a negative value starts a scene emptier.

    Colour is view-independent: the same triplane must render consistently from every view, and the diffusion
    stage only ever sees triplanes, so a view-dependent branch would only absorb fitting error.
    """

    def __init__(
        self,
        channels: int = 32,
        reduce: Literal["sum", "concat"] = "sum",
        hidden_dim: int = 64,
        geo_feat_dim: int = 15,
        density_layers: int = 2,
        color_layers: int = 2,
        density_activation: Literal["exp", "softplus"] = "exp",
        density_bias: float = 0.0,
    ):
        super().__init__()
        if reduce not in ("sum", "concat"):
            raise InputError(f"unknown plane-feature reduction {reduce!r}", "use 'sum' or 'concat'")
        if density_activation not in ("exp", "softplus"):
            raise InputError(f"unknown density activation {density_activation!r}", "use 'exp' or 'softplus'")
        if min(density_layers, color_layers) < 1:
            raise InputError("the decoder nets need at least one layer each", "set density_layers/color_layers >= 1")
        self.channels = channels
        self.reduce = reduce
        self.density_activation = density_activation
        self.density_bias = float(density_bias)
        in_dim = channels if reduce == "sum" else 3 * channels
        self.density_net = _mlp(in_dim, hidden_dim, 1 + geo_feat_dim, density_layers)
        self.color_net = _mlp(geo_feat_dim, hidden_dim, 3, color_layers)

    @classmethod
    def from_config(cls, channels: int, settings: DecoderConfig) -> TriplaneDecoder:
        """The decoder of a run's ``decoder`` section for ``channels``-channel triplanes."""
        return cls(channels, reduce=settings.reduce, hidden_dim=settings.hidden_dim, geo_feat_dim=settings.geo_feat_dim,
                   density_layers=settings.density_layers, color_layers=settings.color_layers,
                   density_activation=settings.density_activation, density_bias=settings.density_bias)

    @property
    def in_dim(self) -> int:
        return self.channels if self.reduce == "sum" else 3 * self.channels

    def _activate(self, raw: Tensor) -> Tensor:
        raw = raw + self.density_bias
        return trunc_exp(raw) if self.density_activation == "exp" else nn.functional.softplus(raw)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:  # features [N, F] -> rgb [N, 3], sigma [N]
        """Colour and density from aggregated plane features."""
        h = self.density_net(features)
        sigma = self._activate(h[..., 0])
        rgb = torch.sigmoid(self.color_net(h[..., 1:]))
        return rgb, sigma

    def density(self, features: Tensor) -> Tensor:  # [N, F] -> [N]
        """Density only (the colour net is skipped), for occupancy updates and empty-space skipping."""
        return self._activate(self.density_net(features)[..., 0])

    def features(
        self,
        planes: Tensor,  # [3, C, H, W]
        points: Tensor,  # [N, 3] in [-1, 1]^3
    ) -> Tensor:  # [N, F]
        """Bilinear triplane features at normalised points, aggregated by ``reduce``."""
        if planes.shape[-3] != self.channels:
            raise InputError(f"triplane has {planes.shape[-3]} channels, the decoder expects {self.channels}",
                             "use the decoder fitted with triplanes of this channel count")
        return sample_triplane(planes[None], points[None], reduce=self.reduce)[0]

    def query(self, planes: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:  # [3,C,H,W], [N,3] -> [N,3], [N]
        """Colour and density of a triplane at normalised points ``[-1, 1]^3``."""
        return self(self.features(planes, points))

    def consolidated_parameters(self) -> dict[str, Tensor]:
        """The colour- and density-net weights that IWC snapshots and penalises (Eq. 3), by name."""
        return {name: p for name, p in self.named_parameters()
                if name.startswith(("density_net.", "color_net."))}
