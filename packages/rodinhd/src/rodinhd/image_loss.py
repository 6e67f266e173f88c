"""The perceptual term of RodinHD's image-level loss (Eq. 6) and its embedded stand-in.

``Psi^l`` is VGG-16 (the kernel's :mod:`avatar_core.perceptual`, torchvision weights from a local file); with
LPIPS's heads the term is LPIPS. Without weights the upsampler uses :class:`StructuralLoss` (the stand-in
``ssim_perceptual`` of :mod:`rodinhd.streaming`).
"""

from __future__ import annotations

from os import PathLike

import torch.nn.functional as F
from torch import Tensor, nn

from avatar_core.errors import ConfigError
from avatar_core.metrics import ssim
from avatar_core.perceptual import LPIPS, BackboneFeatures, feature_distance

__all__ = ["StructuralLoss", "VGGPerceptual"]


class VGGPerceptual(nn.Module):
    """Psi^l of Eq. 6 over the kernel's VGG-16 (:mod:`avatar_core.perceptual`, torchvision weights from a local file):
    with LPIPS's linear heads (the ``lpips`` package's ``vgg.pth``) LPIPS (Zhang et al. 2018); without them the
    paper's sum over relu1_2 ... relu5_3 of squared feature differences. The batch mean, a scalar.
    """

    def __init__(self, backbone: BackboneFeatures | None = None, lpips: LPIPS | None = None):
        super().__init__()
        if (backbone is None) == (lpips is None):
            raise ConfigError("VGGPerceptual takes a VGG-16 backbone or an LPIPS metric", "use VGGPerceptual.from_local")
        self.backbone, self.lpips = backbone, lpips

    @classmethod
    def from_local(cls, vgg_path: str | PathLike, lpips_path: str | PathLike | None = None) -> VGGPerceptual:
        """Load from local files only (no download)."""
        if lpips_path:
            return cls(lpips=LPIPS.from_files(vgg_path, lpips_path, "vgg"))
        return cls(backbone=BackboneFeatures.from_file(vgg_path, "vgg", normalization="imagenet"))

    def describe(self) -> dict:
        if self.lpips is not None:
            return self.lpips.describe()
        return {"kind": "vgg_feature_distance", "backbone_weights": self.backbone.source}

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:  # [B, P, P, 3] in [0, 1] each -> scalar
        if self.lpips is not None:
            return self.lpips(pred, target).mean()
        return feature_distance(self.backbone, pred, target).mean()


class StructuralLoss(nn.Module):
    """The embedded default perceptual term (no VGG weights on a fresh machine): 1 - SSIM at full and half
    resolution plus the L1 difference of image gradients, all on [0, 1] RGB. It rewards matching local structure
    and edges, the part of a perceptual loss that plain pixel MSE under-weights."""

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:  # [B, P, P, 3] -> scalar
        """Mean over the two scales of (1 - SSIM) + gradient L1; 0 for identical patches, ~1 for unrelated ones."""
        total = pred.new_zeros(())
        a, b = pred, target
        for _ in range(2):
            side = min(a.shape[1], a.shape[2])
            if side >= 5:
                window = min(11, side if side % 2 else side - 1)
                total = total + (1.0 - ssim(a, b, window=window, sigma=1.5 * window / 11)).mean()
            dx = lambda z: z[:, :, 1:] - z[:, :, :-1]  # noqa: E731
            dy = lambda z: z[:, 1:] - z[:, :-1]  # noqa: E731
            total = total + (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()
            a = F.avg_pool2d(a.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
            b = F.avg_pool2d(b.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        return total / 2
