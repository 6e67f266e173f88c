"""Stage 2's denoiser: SVD's spatio-temporal UNet with GAS's conditions (GAS Sec. 3.2-3.3; official ``unet``).

:class:`GASUNet` subclasses diffusers' ``UNetSpatioTemporalConditionModel`` and adds

* the **NeRF-render encoder**: the render's VAE latent (``latent_dist.mode()``, not multiplied by the scaling
  factor) -> 3x3 stride-1 convs 4 -> 4 -> 16 -> 32 -> 64 -> 128 with SiLU -> a zero-initialised 1x1 conv to the
  first block's channels, times a learnable scale (initialised at 2);
* the **normal-map encoder**: the body normal map in [0, 1] at image resolution -> 4x4 stride-2 convs (one per
  VAE downsampling, 3 -> 16 -> 32 -> 64) with 3x3 convs between -> 128 -> zero-initialised 1x1, scale 2;
  both are ADDED to the ``conv_in`` output (``conv_in`` itself keeps SVD's 8 channels: noise + reference latent);
* the **modality switcher**: each entry of a one-hot task label ([0, 1] novel view, [1, 0] novel pose) ->
  sinusoidal ``Timesteps(256)``, concatenated -> ``TimestepEmbedding`` to the time-embedding width, ADDED to the
  time embedding. Its last layer starts at zero, so a fresh switcher changes nothing.

The additions enter through forward hooks on ``conv_in`` and ``add_embedding`` (whose output is summed into the
time embedding), so the rest of the forward pass is diffusers' own, unchanged. With zero-initialised encoders and
switcher the model equals the plain SVD UNet (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor, nn

from avatar_core.errors import InputError

#: Task labels of the modality switcher (official order: [1, 0] pose, [0, 1] view).
TASKS = {"pose": 0, "view": 1}


@dataclass
class ConditioningConfig:
    """GAS's additions to the UNet (paper values are the defaults; ``configs/tiny.yaml`` shrinks them)."""

    nerf: bool = True
    """NeRF-render encoder on (off: the "without NeRF conditioning" ablation, normals only)."""
    normal: bool = True
    """Normal-map encoder on."""
    switcher: bool = True
    """Modality switcher on (off: joint training without task labels)."""
    nerf_channels: list[int] = field(default_factory=lambda: [4, 16, 32, 64, 128])
    normal_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    """Channels after each stride-2 conv (one per VAE downsampling), the last one the width before the 1x1."""
    scale_init: float = 2.0
    switcher_dim: int = 256
    """Sinusoidal width per label entry (concatenated: 2 x 256 = 512 in GAS)."""


def zero_module(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class NeRFRenderEncoder(nn.Module):
    """VAE latent of a NeRF render ``[N, 4, h, w]`` -> ``[N, C0, h, w]`` (zero at initialisation)."""

    def __init__(self, latent_channels: int, channels: list[int], out_channels: int, scale_init: float):
        super().__init__()
        layers: list[nn.Module] = []
        prev = latent_channels
        for c in channels:
            layers += [nn.Conv2d(prev, c, 3, 1, 1), nn.SiLU()]
            prev = c
        self.body = nn.Sequential(*layers)
        self.out = zero_module(nn.Conv2d(prev, out_channels, 1))
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    def forward(self, latents: Tensor) -> Tensor:
        return self.out(self.body(latents)) * self.scale


class NormalMapEncoder(nn.Module):
    """Normal map ``[N, 3, H, W]`` in [0, 1] -> ``[N, C0, H / 2^k, W / 2^k]`` (zero at initialisation)."""

    def __init__(self, channels: list[int], downsamplings: int, out_channels: int, scale_init: float):
        super().__init__()
        if len(channels) != downsamplings + 1:
            raise InputError(f"normal_channels needs {downsamplings + 1} entries for a VAE that downsamples "
                             f"{2 ** downsamplings}x, got {channels}", "one per stride-2 conv plus the final width")
        layers: list[nn.Module] = []
        prev = 3
        for c in channels[:-1]:
            layers += [nn.Conv2d(prev, c, 4, 2, 1), nn.SiLU(), nn.Conv2d(c, c, 3, 1, 1), nn.SiLU()]
            prev = c
        layers += [nn.Conv2d(prev, channels[-1], 3, 1, 1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = zero_module(nn.Conv2d(channels[-1], out_channels, 1))
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    def forward(self, normals: Tensor) -> Tensor:
        return self.out(self.body(normals)) * self.scale


class ModalitySwitcher(nn.Module):
    """One-hot task label ``[B, 2]`` -> time-embedding offset ``[B, E]`` (zero at initialisation)."""

    def __init__(self, dim: int, time_embed_dim: int, num_tasks: int = 2):
        super().__init__()
        self.num_tasks = num_tasks
        self.proj = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.embed = TimestepEmbedding(dim * num_tasks, time_embed_dim)
        zero_module(self.embed.linear_2)

    def forward(self, label: Tensor) -> Tensor:
        B = label.shape[0]
        e = self.proj(label.reshape(-1).float()).reshape(B, -1)
        return self.embed(e.to(self.embed.linear_1.weight.dtype))


def task_labels(tasks: list[str] | tuple[str, ...], device=None) -> Tensor:  # -> [B, 2]
    """One-hot labels of task names ("view", "pose")."""
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise InputError(f"unknown tasks {bad}", f"use {sorted(TASKS)}")
    idx = torch.tensor([TASKS[t] for t in tasks], device=device)
    return nn.functional.one_hot(idx, len(TASKS)).float()


class GASUNet(UNetSpatioTemporalConditionModel):
    """SVD UNet + NeRF-render encoder + normal-map encoder + modality switcher (module docstring)."""

    def __init__(self, gas: dict[str, Any] | ConditioningConfig | None = None, vae_downsamplings: int = 3,
                 latent_channels: int = 4, **unet_kwargs):
        super().__init__(**unet_kwargs)
        g = gas if isinstance(gas, ConditioningConfig) else ConditioningConfig(**(gas or {}))
        self.gas = g
        c0 = self.config.block_out_channels[0]
        time_dim = self.time_embedding.linear_2.out_features
        self.nerf_encoder = NeRFRenderEncoder(latent_channels, g.nerf_channels, c0, g.scale_init) if g.nerf else None
        self.normal_encoder = (NormalMapEncoder(g.normal_channels, vae_downsamplings, c0, g.scale_init)
                               if g.normal else None)
        self.switcher = ModalitySwitcher(g.switcher_dim, time_dim) if g.switcher else None
        self._gas_context: tuple[Tensor | None, Tensor | None] = (None, None)
        self.conv_in.register_forward_hook(self._add_conditions)
        self.add_embedding.register_forward_hook(self._add_switch)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_unet(cls, unet: UNetSpatioTemporalConditionModel, gas: dict | ConditioningConfig | None = None,
                  vae_downsamplings: int = 3, latent_channels: int = 4) -> GASUNet:
        """A GASUNet holding ``unet``'s weights (e.g. SVD-xt-1.1's) and fresh, zero-initialised additions."""
        config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        model = cls(gas, vae_downsamplings, latent_channels, **config)
        if unet.dtype != model.dtype:
            model = model.to(unet.dtype)
        missing, unexpected = model.load_state_dict(unet.state_dict(), strict=False)
        ours = ("nerf_encoder.", "normal_encoder.", "switcher.")
        if unexpected or any(not k.startswith(ours) for k in missing):
            raise InputError(f"the UNet's weights do not fit GASUNet (unexpected {unexpected[:3]}, "
                             f"missing {[k for k in missing if not k.startswith(ours)][:3]})",
                             "load an SVD UNetSpatioTemporalConditionModel")
        return model

    def gas_parameters(self) -> list[nn.Parameter]:
        """The parameters GAS adds (condition encoders and switcher)."""
        mods = [m for m in (self.nerf_encoder, self.normal_encoder, self.switcher) if m is not None]
        return [p for m in mods for p in m.parameters()]

    # ------------------------------------------------------------------ hooks
    def _add_conditions(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        extra = self._gas_context[0]
        return output if extra is None else output + extra.to(output.dtype)

    def _add_switch(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        switch = self._gas_context[1]
        return output if switch is None else output + switch.to(output.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, sample: Tensor, timestep: Tensor | float, encoder_hidden_states: Tensor,
                added_time_ids: Tensor, nerf_latents: Tensor | None = None, normal_maps: Tensor | None = None,
                task: Tensor | None = None, return_dict: bool = True):
        """``sample [B, F, 8, h, w]``; ``nerf_latents [B, F, 4, h, w]``; ``normal_maps [B, F, 3, H, W]``;
        ``task [B, 2]`` one-hot (see :func:`task_labels`); the rest as in SVD."""
        B, F = sample.shape[:2]
        extra = None
        if nerf_latents is not None and self.nerf_encoder is not None:
            extra = self.nerf_encoder(nerf_latents.flatten(0, 1).to(sample.dtype))
        if normal_maps is not None and self.normal_encoder is not None:
            n = self.normal_encoder(normal_maps.flatten(0, 1).to(sample.dtype))
            extra = n if extra is None else extra + n
        if extra is not None and extra.shape[-2:] != sample.shape[-2:]:
            raise InputError(f"condition features {tuple(extra.shape[-2:])} do not match latents "
                             f"{tuple(sample.shape[-2:])}", "render normals at the image size of the latents' frames")
        switch = self.switcher(task) if (task is not None and self.switcher is not None) else None
        self._gas_context = (extra, switch)
        try:
            return super().forward(sample, timestep, encoder_hidden_states, added_time_ids, return_dict=return_dict)
        finally:
            self._gas_context = (None, None)


def vae_downsamplings(vae) -> int:
    """How many times the VAE halves the image (3 for SVD's: 8x)."""
    return int(round(math.log2(2 ** (len(vae.config.block_out_channels) - 1))))
