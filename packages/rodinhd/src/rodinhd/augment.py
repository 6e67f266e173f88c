"""Conditional augmentation of the upsampler's low-resolution input (Sec. 4.1; Ho et al. 2022, "Cascaded
Diffusion Models"): the upsampler is trained on corrupted conditions so that, at sampling, it tolerates the base
model's imperfect triplanes.

Two routes, chosen by ``upsample.aug_mode``:

* ``degrade`` (the paper config's): the low-resolution triplane is degraded, as the authors' code does (it
  degrades the triplane BSRGAN-style, or uses stored low-resolution fits, then upsamples bicubically). Here:
  a Gaussian blur of std ``level * blur_max`` low-resolution texels, an area downsampling by
  ``1 + level * (down_max - 1)``, then bicubic upsampling plane by plane to the model's size
  (:func:`degrade_rollout`). Level 0 is the plain bicubic upsampling.
* ``noise``: Gaussian noise, ``sqrt(ab) x + sqrt(1 - ab) n`` with ``ab`` the ``aug_schedule``'s alpha_bar at the
  level (the CDM's noise augmentation), on the bilinearly upsampled condition.

The level is drawn uniformly in ``[0, aug_max_train]`` per training sample and fixed to ``aug_sample`` at
sampling; the UNet embeds it. Neither the paper nor the authors' code publishes levels: every level, ``blur_max``
and ``down_max`` are ours.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rodinhd.unet import planes_to_rollout, rollout_to_planes

__all__ = ["AUG_MODES", "degrade_rollout", "gaussian_blur"]

#: The conditional-augmentation routes.
AUG_MODES = ("degrade", "noise")


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:  # [N, C, H, W] -> same
    """Separable Gaussian blur of std ``sigma`` pixels (reflect padding, radius 3 sigma); sigma <= 0: identity."""
    if sigma <= 1e-6:
        return x
    H, W = x.shape[-2:]
    radius = max(1, min(int(math.ceil(3.0 * sigma)), min(H, W) - 1))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    C = x.shape[1]
    y = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(C, 1, 1, -1),
                 groups=C)
    return F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).expand(C, 1, -1, 1),
                    groups=C)


def degrade_rollout(low_res: Tensor, level: Tensor, size: int, blur_max: float = 1.0,
                    down_max: float = 2.0) -> Tensor:  # [B, C, h, 3h], [B] in [0, 1] -> [B, C, size, 3 size]
    """Blur, downsample and bicubically upsample each plane of each roll-out by its own ``level``."""
    p = rollout_to_planes(low_res)  # [B, 3, C, h, h]
    B, _, C, h, w = p.shape
    out = []
    for b in range(B):
        s = float(level[b])
        x = gaussian_blur(p[b], s * blur_max)  # [3, C, h, w]
        factor = 1.0 + s * (down_max - 1.0)
        small = (max(1, round(h / factor)), max(1, round(w / factor)))
        if small != (h, w):
            x = F.interpolate(x, size=small, mode="area")
        out.append(F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False))
    return planes_to_rollout(torch.stack(out))
