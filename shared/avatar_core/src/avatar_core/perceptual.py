"""Perceptual image distances from local weights: VGG-16 / AlexNet features and LPIPS (Zhang et al. 2018).

Backbones are built here in torchvision's ``vgg16().features`` / ``alexnet().features`` layout and loaded from
the user's state-dict file (``.pth`` / ``.safetensors``, keys ``features.N.weight`` or the bare ``N.weight``);
nothing is ever downloaded (the ``lpips`` package itself would call torchvision with ``pretrained=True``).
LPIPS's learned linear heads (``lin0..lin4``, version 0.1) are the ``lpips`` package's ``weights/v0.1/<net>.pth``:
a path given by the config, or the file inside an installed ``lpips`` distribution, found without importing it.

Without heads, :class:`LPIPS` is LPIPS's "baseline" (``lpips=False``: unweighted channel sum of the unit-normalised
feature differences). Without any backbone weights, :class:`PerceptualLoss` uses the one embedded stand-in,
:class:`RandomFeaturePerceptual`: a fixed, seeded, untrained three-scale conv net compared the same way. It
rewards matching local structure at several scales but has none of VGG's learned semantics; it is logged once
per process and named by :meth:`PerceptualLoss.describe` (:data:`STANDIN` for a method's stand-in registry).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from avatar_core.errors import CorruptFileError, InputError, MissingWeightsError
from avatar_core.standins import StandIn

log = logging.getLogger(__name__)

#: torchvision's ``vgg16().features``: conv widths, "M" = 2x2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
#: Indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in that Sequential (the layers LPIPS reads).
VGG16_TAPS = (3, 8, 15, 22, 29)
#: torchvision's ``alexnet().features``: (out channels, kernel, stride, padding) per conv, "M" = 3x3/2 max-pool.
ALEXNET_LAYOUT = ((64, 11, 4, 2), "M", (192, 5, 1, 2), "M", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
#: relu1 ... relu5 of AlexNet's features.
ALEXNET_TAPS = (1, 4, 7, 9, 11)
TAP_CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: LPIPS's ScalingLayer on [-1, 1] inputs (ImageNet statistics rounded to three digits).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

#: The embedded stand-in, for a method's stand-in registry (avatar_core.standins).
STANDIN = StandIn("random_feature_perceptual", "VGG-16 / LPIPS from local weights",
                  "a fixed seeded random-feature network compared like LPIPS (no learned semantics)")

_LOGGED: set[str] = set()


def _log_once(key: str, message: str, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.warning(message, *args)


# --------------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------------


def vgg16_features(depth: int = VGG16_TAPS[-1] + 1) -> nn.Sequential:
    """The first ``depth`` layers of torchvision's ``vgg16().features`` (uninitialised; load a state dict)."""
    layers: list[nn.Module] = []
    c = 3
    for v in VGG16_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU()]
            c = int(v)
    return nn.Sequential(*layers[:depth])


def alexnet_features(depth: int = ALEXNET_TAPS[-1] + 1) -> nn.Sequential:
    """The first ``depth`` layers of torchvision's ``alexnet().features``."""
    layers: list[nn.Module] = []
    c = 3
    for v in ALEXNET_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(3, 2))
        else:
            out, k, s, p = v
            layers += [nn.Conv2d(c, out, k, s, p), nn.ReLU()]
            c = out
    return nn.Sequential(*layers[:depth])


def read_state_dict(path: str | os.PathLike, what: str = "weights") -> dict[str, Tensor]:
    """A state dict from a local ``.pth`` / ``.safetensors`` file (``{"state_dict": ...}`` unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"{what} not found at {path}",
                                  "point the config at a local file (this toolkit never downloads weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, wrong format, pickled objects
        raise CorruptFileError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}",
                               "save the state dict with torch.save(model.state_dict()) or safetensors") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CorruptFileError(f"{path} holds a {type(state).__name__}, not a state dict",
                               "save model.state_dict(), not the model")
    return state


def lpips_weights_path(net: str = "vgg", version: str = "0.1") -> Path | None:
    """``weights/v<version>/<net>.pth`` inside an installed ``lpips`` distribution (not imported), or None."""
    from importlib import metadata

    try:
        dist = metadata.distribution("lpips")
    except metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(f"lpips/weights/v{version}/{net}.pth"))
    return path if path.is_file() else None


class BackboneFeatures(nn.Module):
    """Frozen VGG-16 or AlexNet features at LPIPS's five taps, from a torchvision state dict.

    Args:
        state_dict: torchvision's ``vgg16`` / ``alexnet`` weights (``features.N.*``; ``classifier`` keys ignored).
        net: ``"vgg"`` (VGG-16) or ``"alex"``.
        normalization: ``"imagenet"`` (torchvision's statistics on [0, 1]) or ``"lpips"`` (LPIPS's scaling
            layer on [-1, 1]; the same statistics rounded).
    Input images are channels-last ``[N, H, W, 3]`` in [0, 1]; the output is the five tap activations.
    """

    def __init__(self, state_dict: dict[str, Tensor], net: str = "vgg", normalization: str = "imagenet",
                 source: str = ""):
        super().__init__()
        if net not in TAP_CHANNELS:
            raise InputError(f"unknown backbone {net!r}", "use 'vgg' (VGG-16) or 'alex' (AlexNet)")
        if normalization not in ("imagenet", "lpips"):
            raise InputError(f"unknown normalization {normalization!r}", "use 'imagenet' or 'lpips'")
        self.net, self.normalization, self.source = net, normalization, source
        self.taps = VGG16_TAPS if net == "vgg" else ALEXNET_TAPS
        self.features = vgg16_features() if net == "vgg" else alexnet_features()
        state = {k.removeprefix("features."): v for k, v in state_dict.items() if not k.startswith("classifier")}
        own = self.features.state_dict()
        missing = [k for k in own if k not in state]
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or wrong:
            bad = (missing or wrong)[0]
            raise CorruptFileError(
                f"the {'VGG-16' if net == 'vgg' else 'AlexNet'} weights {source or ''} lack or misshape "
                f"{len(missing) + len(wrong)} tensors (e.g. features.{bad})".replace("  ", " "),
                f"pass torchvision's {'vgg16' if net == 'vgg' else 'alexnet'} state dict (keys features.N.weight/bias)")
        self.features.load_state_dict({k: state[k] for k in own})
        if normalization == "imagenet":
            mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        else:  # (2x - 1 - shift) / scale == (x - (shift + 1) / 2) / (scale / 2)
            mean, std = (torch.tensor(LPIPS_SHIFT) + 1) / 2, torch.tensor(LPIPS_SCALE) / 2
        self.register_buffer("mean", mean.reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.reshape(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | os.PathLike, net: str = "vgg", normalization: str = "imagenet") -> BackboneFeatures:
        what = "VGG-16 weights" if net == "vgg" else "AlexNet weights"
        return cls(read_state_dict(path, what), net, normalization, source=str(path))

    def train(self, mode: bool = True):  # frozen: never leaves eval mode
        super().train(mode)
        self.features.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:  # [N, H, W, 3] in [0, 1] -> 5 x [N, C, h, w]
        x = (images.permute(0, 3, 1, 2) - self.mean.to(images)) / self.std.to(images)
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


def feature_distance(backbone: BackboneFeatures, pred: Tensor, target: Tensor) -> Tensor:  # -> [...]
    """Sum over the taps of the mean squared difference of raw features, per image (a VGG "perceptual loss" as
    in Johnson et al. 2016; RodinHD's Eq. 6 term ``sum_l ||Psi^l(a) - Psi^l(b)||^2``, averaged per element)."""
    _check_pair(pred, target)
    lead = pred.shape[:-3]
    n = math.prod(lead)
    x = torch.cat([pred.reshape(-1, *pred.shape[-3:]), target.reshape(-1, *target.shape[-3:])])
    total = 0.0
    for f in backbone(x):
        total = total + ((f[:n] - f[n:]) ** 2).mean((1, 2, 3))
    return total.reshape(lead)


def _unit(x: Tensor, eps: float = 1e-10) -> Tensor:
    """LPIPS's normalize_tensor: unit length over channels."""
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape or pred.dim() < 3 or pred.shape[-1] != 3:
        raise InputError(f"a perceptual distance needs two [..., H, W, 3] images of one shape, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}", "composite RGBA images over a background first")


# --------------------------------------------------------------------------------------------------
# LPIPS and the stand-in
# --------------------------------------------------------------------------------------------------


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018): per-image distance ``[...]`` of images ``[..., H, W, 3]`` in [0, 1].

    Unit-normalised tap features, squared differences weighted per channel by the linear heads (1x1 convs,
    no bias), averaged over space, summed over taps; without heads (``lin_state=None``) the channel sum
    (LPIPS's baseline). Frozen; gradients flow to the images.
    """

    def __init__(self, backbone: BackboneFeatures, lin_state: dict[str, Tensor] | None = None, lin_source: str = ""):
        super().__init__()
        self.backbone = backbone
        self.lin_source = lin_source
        self.lins = None
        if lin_state is not None:
            self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS[backbone.net])
            for i, lin in enumerate(self.lins):
                key = next((k for k in (f"lin{i}.model.1.weight", f"lin{i}.model.0.weight", f"lin{i}.weight")
                            if k in lin_state), None)
                if key is None or tuple(lin_state[key].shape) != tuple(lin.weight.shape):
                    raise CorruptFileError(f"the LPIPS heads {lin_source} lack lin{i} for {backbone.net} "
                                           f"({TAP_CHANNELS[backbone.net][i]} channels)",
                                           f"pass the lpips package's weights/v0.1/{backbone.net}.pth")
                lin.weight.data.copy_(lin_state[key])
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, backbone_path: str | os.PathLike, lin_path: str | os.PathLike | None = None,
                   net: str = "vgg") -> LPIPS:
        """LPIPS from a torchvision state dict and, optionally, the lpips package's heads (``<net>.pth``)."""
        backbone = BackboneFeatures.from_file(backbone_path, net, normalization="lpips")
        lins = read_state_dict(lin_path, "LPIPS linear heads") if lin_path else None
        return cls(backbone, lins, str(lin_path or ""))

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def describe(self) -> dict:
        return {"kind": "lpips" if self.lins is not None else "lpips_baseline", "net": self.backbone.net,
                "backbone_weights": self.backbone.source, "lin_weights": self.lin_source}

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:  # [..., H, W, 3] x2 -> [...]
        _check_pair(pred, target)
        lead = pred.shape[:-3]
        n = math.prod(lead)
        x = torch.cat([pred.reshape(-1, *pred.shape[-3:]), target.reshape(-1, *target.shape[-3:])])
        total = 0.0
        for i, f in enumerate(self.backbone(x)):
            d = (_unit(f[:n]) - _unit(f[n:])) ** 2
            d = self.lins[i](d) if self.lins is not None else d.sum(1, keepdim=True)
            total = total + d.mean((1, 2, 3))
        return total.reshape(lead)


class RandomFeaturePerceptual(nn.Module):
    """The embedded stand-in for VGG / LPIPS: a fixed, seeded, untrained conv net, compared like LPIPS's baseline.

    Three scales (widths ``channels``, 3x3 convs with He-normal weights and zero bias, 2x2 average pooling
    between scales) on images normalised by mean 0.5 / std 0.25; at each scale the channel-normalised
    features' squared difference is summed over channels and averaged over space; the scales are averaged.
    Per-image distance ``[...]``; 0 for identical images.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        taps = []
        c = 3
        for k, width in enumerate(channels):
            conv = nn.Conv2d(c, width, 3, padding=1)
            with torch.no_grad():  # He-normal so activations keep their scale through the stages
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (9 * c)))
                conv.bias.zero_()
            if k > 0:
                layers.append(nn.AvgPool2d(2))
            layers += [conv, nn.ReLU()]
            taps.append(len(layers) - 1)
            c = width
        self.net = nn.Sequential(*layers).eval().requires_grad_(False)
        self.taps = tuple(taps)
        self.channels, self.seed = tuple(channels), seed
        _log_once("standin", "perceptual loss: no VGG/LPIPS weights configured, using the embedded stand-in (%s)",
                  STANDIN.description)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()
        return self

    def describe(self) -> dict:
        return {"kind": STANDIN.name, "channels": list(self.channels), "seed": self.seed}

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:  # [..., H, W, 3] x2 -> [...]
        _check_pair(pred, target)
        lead = pred.shape[:-3]
        n = math.prod(lead)
        x = torch.cat([pred.reshape(-1, *pred.shape[-3:]), target.reshape(-1, *target.shape[-3:])])
        x = (x.permute(0, 3, 1, 2) - 0.5) / 0.25
        total = 0.0
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in self.taps:
                total = total + ((_unit(x[:n]) - _unit(x[n:])) ** 2).sum(1).mean((1, 2))
        return (total / len(self.taps)).reshape(lead)


class PerceptualLoss(nn.Module):
    """The perceptual term a method uses: LPIPS from local weights, or the embedded stand-in.

    Args:
        backbone_weights: torchvision ``vgg16`` / ``alexnet`` state-dict file; None: :class:`RandomFeaturePerceptual`.
        lpips_weights: the lpips package's ``<net>.pth`` heads; ``"auto"`` (default) takes them from the installed
            ``lpips`` distribution (an error if there is none); None: LPIPS's unweighted baseline.
        net: ``"vgg"`` or ``"alex"``.
    ``describe()`` says which one runs (record it in the run's settings); the call returns a distance per image.
    """

    def __init__(self, backbone_weights: str | os.PathLike | None = None,
                 lpips_weights: str | os.PathLike | None = "auto", net: str = "vgg", seed: int = 0):
        super().__init__()
        if backbone_weights:
            lin = lpips_weights
            if lin == "auto":
                lin = lpips_weights_path(net)
                if lin is None:
                    raise MissingWeightsError(
                        f"LPIPS needs its linear heads (weights/v0.1/{net}.pth) and the lpips package is not installed",
                        "pip install --no-deps lpips==0.1.4 (make setup does), pass lpips_weights=<path of "
                        f"{net}.pth>, or lpips_weights=None for LPIPS's unweighted baseline")
            self.impl = LPIPS.from_files(backbone_weights, lin, net)
        else:
            self.impl = RandomFeaturePerceptual(seed=seed)

    @property
    def kind(self) -> str:
        return self.describe()["kind"]

    def describe(self) -> dict:
        return self.impl.describe()

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:  # [..., H, W, 3] x2 -> [...]
        return self.impl(pred, target)


__all__ = [
    "ALEXNET_TAPS",
    "LPIPS",
    "STANDIN",
    "VGG16_TAPS",
    "BackboneFeatures",
    "PerceptualLoss",
    "RandomFeaturePerceptual",
    "alexnet_features",
    "feature_distance",
    "lpips_weights_path",
    "read_state_dict",
    "vgg16_features",
]
