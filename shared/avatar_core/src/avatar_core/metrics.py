"""Image-quality metrics shared by the evaluation commands: PSNR and SSIM (Wang et al. 2004)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avatar_core.errors import InputError

__all__ = ["psnr", "ssim"]


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise InputError(f"images to compare differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}",
                         "resize or crop them to the same size first")
    if pred.dim() < 3:
        raise InputError(f"expected images [..., H, W, C], got shape {tuple(pred.shape)}")


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image; images are ``[..., H, W, C]`` in ``[0, data_range]``."""
    _check_pair(pred, target)
    mse = (pred.float() - target.float()).pow(2).flatten(-3).mean(-1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    pred: torch.Tensor,  # [..., H, W, C]
    target: torch.Tensor,  # [..., H, W, C]
    data_range: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:  # [...]
    """Mean structural similarity per image with the paper's 11x11 Gaussian window (sigma 1.5), 'valid' borders."""
    _check_pair(pred, target)
    lead = pred.shape[:-3]
    h, w, c = pred.shape[-3:]
    if min(h, w) < window:
        raise InputError(f"SSIM needs images of at least {window}x{window} pixels, got {h}x{w}")
    dtype = torch.promote_types(pred.dtype, torch.float32)
    x = pred.to(dtype).reshape(-1, h, w, c).permute(0, 3, 1, 2)
    y = target.to(dtype).reshape(-1, h, w, c).permute(0, 3, 1, 2)
    g = _gaussian_window(window, sigma, x.device, x.dtype)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(-1).reshape(lead)
