"""RodinHD's image-level loss (Eq. 6): its targets (ground-truth views), its patches, its perceptual terms.

Eq. 6 compares the patch rendered from the *predicted* triplane with the ground-truth image patch at the same
camera: L_Image = L_Pixel + L_Perc, both with weight 1 (the authors' code weights an LPIPS term 0.5, the
``perceptual_weight`` option). The targets are the dataset's multi-view images (straight-alpha RGBA, composited on
the render background), one view per training item and epoch (:class:`TrainingView`, a transform of the streaming
layer :mod:`avatar_core.data.stream`); patches are centred on a body pixel (:func:`body_patch_corners`).

``Psi^l`` is VGG-16 (the kernel's :mod:`avatar_core.perceptual`, torchvision weights from a local file); with
LPIPS's heads the term is LPIPS. Without weights the upsampler uses :class:`StructuralLoss` (the stand-in
``ssim_perceptual`` of :mod:`rodinhd.streaming`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatar_core.data.stream import read_cameras
from avatar_core.errors import ConfigError, CorruptFileError
from avatar_core.io import load_image
from avatar_core.metrics import ssim
from avatar_core.perceptual import LPIPS, BackboneFeatures, feature_distance

__all__ = ["StructuralLoss", "TrainingView", "VGGPerceptual", "body_patch_corners", "composite", "crop_patches"]


class TrainingView:
    """Streaming transform ``(item, epoch) -> item`` adding one ground-truth view of the item's avatar:
    ``view_image [H, W, 4]`` (straight-alpha RGBA in [0, 1]), ``view_viewmat [4, 4]``, ``view_K [3, 3]``,
    ``view_index``, ``width``, ``height`` (from ``cameras.json``). Only that one image is decoded.

    The view is a pure function of (seed, epoch, item index), so every worker process and a resumed run pick the
    same one. ``views``: the view indices to choose from (None: all of the avatar's views).
    """

    def __init__(self, root: str | os.PathLike, views: Sequence[int] | None = None, seed: int = 0):
        self.root, self.views, self.seed = Path(root), list(views) if views is not None else None, int(seed)

    def __call__(self, item: dict[str, Any], epoch: int) -> dict[str, Any]:
        aid = str(item["item_id"])
        cams = read_cameras(self.root, aid, self.views)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(epoch)) * 1_000_033 + int(item["index"]))
        k = int(torch.randint(len(cams["files"]), (1,), generator=g))
        image = load_image(self.root / "avatars" / aid / cams["files"][k])
        if image.shape[-1] != 4 or tuple(image.shape[:2]) != (cams["height"], cams["width"]):
            raise CorruptFileError(f"view {cams['files'][k]} of avatar {aid} is {tuple(image.shape)}, not the "
                                   f"{cams['width']}x{cams['height']} RGBA of its cameras.json", "regenerate the avatar")
        return {**item, "view_image": image, "view_viewmat": cams["viewmats"][k], "view_K": cams["Ks"][k],
                "view_index": k, "width": cams["width"], "height": cams["height"]}


def composite(rgba: Tensor, background: Sequence[float] | Tensor) -> Tensor:  # [..., 4] -> [..., 3]
    """Straight-alpha RGBA over a constant background colour (what the renderer composites onto)."""
    bg = torch.as_tensor(background, dtype=rgba.dtype, device=rgba.device)
    a = rgba[..., 3:4]
    return rgba[..., :3] * a + bg * (1.0 - a)


def body_patch_corners(alpha: Tensor, size: int, generator: torch.Generator | None = None,
                       threshold: float = 0.5) -> tuple[Tensor, Tensor]:  # alpha [B, H, W] -> top [B], left [B]
    """Top-left corners of ``size`` x ``size`` patches that contain the body: each is centred on a pixel drawn
    uniformly among those with alpha > threshold (then shifted inside the image); an image without body pixels
    gets a uniformly placed patch."""
    B, H, W = alpha.shape
    if size > min(H, W):
        raise ConfigError(f"patch_size {size} exceeds the {W}x{H} view images", "lower patch_size")
    tops, lefts = [], []
    for b in range(B):
        fg = torch.nonzero(alpha[b].detach().cpu() > threshold)
        u = torch.rand(3, generator=generator)
        if len(fg):
            r, c = fg[min(int(u[0] * len(fg)), len(fg) - 1)].tolist()
            t, lft = r - size // 2, c - size // 2
        else:
            t, lft = int(u[1] * (H - size + 1)), int(u[2] * (W - size + 1))
        tops.append(min(max(t, 0), H - size))
        lefts.append(min(max(lft, 0), W - size))
    return torch.tensor(tops), torch.tensor(lefts)


def crop_patches(images: Tensor, top: Tensor, left: Tensor, size: int) -> Tensor:  # [B, H, W, C] -> [B, P, P, C]
    """The ``size`` x ``size`` crops of each image at its corner."""
    return torch.stack([images[b, int(t):int(t) + size, int(lf):int(lf) + size]
                        for b, (t, lf) in enumerate(zip(top.tolist(), left.tolist()))])


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
