"""The shared MLP decoder F (RodinHD Sec. 3.1): triplane features at a point -> density and colour.

The paper does not specify F. Two variants, both two small nets (a density net giving a raw density and a
geometry feature, a colour net giving RGB), which is what identity-aware weight consolidation protects
(:meth:`TriplaneDecoder.consolidated_parameters`):

* ours (the default): the three plane features are summed, all C channels feed the density net, colour is
  view-independent and read from the geometry feature; width 64 (a design of this project, not torch-ngp's or
  the authors'; the two are compared at the tiny scale in the package README);
* the authors' (RodinHD/RodinHD ``network.py`` @ 9d53b2a): ``reduce="mean"`` (planes averaged),
  ``color_channels=24`` (of the 32 channels, 24 feed the colour net and the other 8 the density net),
  ``view_dependent=True`` (the colour net also reads a frequency encoding of the view direction) and width 128.
  The geometry feature's width and the number of direction frequencies are ours (15 and 4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from avatar_core.errors import InputError
from avatar_core.render.volume import sample_triplane

if TYPE_CHECKING:
    from rodinhd.config import DecoderConfig

__all__ = ["TriplaneDecoder", "frequency_encoding", "trunc_exp"]


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


def frequency_encoding(x: Tensor, frequencies: int) -> Tensor:  # [N, D] -> [N, D (1 + 2 frequencies)]
    """NeRF's positional encoding: x, then sin(2^k pi x) and cos(2^k pi x) for k < frequencies."""
    if frequencies <= 0:
        return x
    scaled = x[..., None, :] * (torch.pi * 2.0 ** torch.arange(frequencies, dtype=x.dtype, device=x.device))[:, None]
    return torch.cat([x, torch.sin(scaled).flatten(-2), torch.cos(scaled).flatten(-2)], dim=-1)


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
        reduce: how the three plane features combine: ``"sum"`` (ours, default, F = C), ``"mean"`` (the
            authors', F = C) or ``"concat"`` (F = 3C).
        hidden_dim: width of both nets (ours 64; the authors' 128).
        geo_feat_dim: geometry feature passed from the density net to the colour net (15).
        color_channels: 0 (ours): every feature channel feeds the density net. k > 0 (the authors': 24 of 32):
            the first k channels of each plane feed the colour net, the remaining C - k the density net.
        view_dependent: colour also reads the view direction (the authors'; ours: False).
        dir_frequencies: frequencies of the direction's encoding (:func:`frequency_encoding`; 4, ours).
        density_layers: linear layers of the density net (2).
        color_layers: linear layers of the colour net (2).
        density_activation: ``"exp"`` (torch-ngp's truncated exp, default) or ``"softplus"``.
        density_bias: added to the raw density before activation (0); a negative value starts a scene emptier.

    Ours keeps colour view-independent: the same triplane must render consistently from every view, and the
    diffusion stage only ever sees triplanes, so a view-dependent branch can absorb fitting error.
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
        color_channels: int = 0,
        view_dependent: bool = False,
        dir_frequencies: int = 4,
    ):
        super().__init__()
        if reduce not in ("sum", "mean", "concat"):
            raise InputError(f"unknown plane-feature reduction {reduce!r}", "use 'sum', 'mean' or 'concat'")
        if not 0 <= color_channels < channels:
            raise InputError(f"color_channels={color_channels} must lie in [0, {channels})",
                             "0 (every channel to the density net) or e.g. 24 of 32 (the authors')")
        if density_activation not in ("exp", "softplus"):
            raise InputError(f"unknown density activation {density_activation!r}", "use 'exp' or 'softplus'")
        if min(density_layers, color_layers) < 1:
            raise InputError("the decoder nets need at least one layer each", "set density_layers/color_layers >= 1")
        self.channels = channels
        self.reduce = reduce
        self.density_activation = density_activation
        self.density_bias = float(density_bias)
        self.color_channels = int(color_channels)
        self.view_dependent = bool(view_dependent)
        self.dir_frequencies = int(dir_frequencies)
        per = 3 if reduce == "concat" else 1
        color_in = per * self.color_channels + geo_feat_dim + (3 * (1 + 2 * self.dir_frequencies) if view_dependent else 0)
        self.density_net = _mlp(per * (channels - self.color_channels), hidden_dim, 1 + geo_feat_dim, density_layers)
        self.color_net = _mlp(color_in, hidden_dim, 3, color_layers)

    @classmethod
    def from_config(cls, channels: int, settings: DecoderConfig) -> TriplaneDecoder:
        """The decoder of a run's ``decoder`` section for ``channels``-channel triplanes."""
        return cls(channels, reduce=settings.reduce, hidden_dim=settings.hidden_dim, geo_feat_dim=settings.geo_feat_dim,
                   density_layers=settings.density_layers, color_layers=settings.color_layers,
                   density_activation=settings.density_activation, density_bias=settings.density_bias,
                   color_channels=getattr(settings, "color_channels", 0),
                   view_dependent=getattr(settings, "view_dependent", False),
                   dir_frequencies=getattr(settings, "dir_frequencies", 4))

    @property
    def in_dim(self) -> int:
        return 3 * self.channels if self.reduce == "concat" else self.channels

    def _split(self, features: Tensor) -> tuple[Tensor, Tensor]:  # [N, F] -> colour part, density part
        k = self.color_channels
        if not k:
            return features[..., :0], features
        if self.reduce == "concat":
            f = features.unflatten(-1, (3, self.channels))
            return f[..., :k].flatten(-2), f[..., k:].flatten(-2)
        return features[..., :k], features[..., k:]

    def _activate(self, raw: Tensor) -> Tensor:
        raw = raw + self.density_bias
        return trunc_exp(raw) if self.density_activation == "exp" else nn.functional.softplus(raw)

    def forward(self, features: Tensor, directions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Colour and density from aggregated plane features [N, F] (and unit view directions [N, 3] when the
        colour is view-dependent): rgb [N, 3], sigma [N]."""
        color_feat, density_feat = self._split(features)
        h = self.density_net(density_feat)
        sigma = self._activate(h[..., 0])
        parts = [color_feat, h[..., 1:]]
        if self.view_dependent:
            if directions is None:
                raise InputError("this decoder's colour depends on the view direction, none was given",
                                 "pass the ray directions (TriplaneField does)")
            parts.append(frequency_encoding(directions.to(features.dtype), self.dir_frequencies))
        rgb = torch.sigmoid(self.color_net(torch.cat(parts, dim=-1)))
        return rgb, sigma

    def density(self, features: Tensor) -> Tensor:  # [N, F] -> [N]
        """Density only (the colour net is skipped), for occupancy updates and empty-space skipping."""
        return self._activate(self.density_net(self._split(features)[1])[..., 0])

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

    def query(self, planes: Tensor, points: Tensor,
              directions: Tensor | None = None) -> tuple[Tensor, Tensor]:  # [3,C,H,W], [N,3] -> [N,3], [N]
        """Colour and density of a triplane at normalised points ``[-1, 1]^3`` (seen along ``directions``)."""
        return self(self.features(planes, points), directions)

    def consolidated_parameters(self) -> dict[str, Tensor]:
        """The colour- and density-net weights that IWC snapshots and penalises (Eq. 3), by name."""
        return {name: p for name, p in self.named_parameters()
                if name.startswith(("density_net.", "color_net."))}
