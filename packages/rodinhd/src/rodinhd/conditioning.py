"""Multi-scale portrait conditioning (Sec. 3.2 "Multi-scale image feature conditioning", Eqs. 7-8, App. A).

A front portrait (composited on white, resized to ``portrait_size``; paper 256) goes through a VAE encoder whose
feature maps at H/2, H/4 and H/8 (SDXL VAE: 128, 256, 512 channels) are the multi-scale condition y1, y2, y3.
:class:`PortraitTokenizer` partitions each map into patches with a strided conv (kernel = stride = 16, 8, 4 in the
authors' code, so every scale gives 8 x 8 = 64 tokens at 256^2) -- the tokens that cross-attention reads.

Encoders:
- :class:`SDVAEFeatures`: a pretrained SD/SDXL ``AutoencoderKL`` from a local folder (``avatar_core.pretrained``);
  the features are its first three down-block outputs.
- :class:`PortraitVAE`: the embedded default, a small convolutional VAE (encoder with the same three-scale layout,
  decoder, KL term) trained on the dataset's portraits by :func:`train_portrait_vae`.

The null condition for classifier-free guidance is a feature map of ones (not zeros), as in the authors' code;
condition dropout (20%) replaces a sample's features with ones.

The tokenizer also offers the two baselines of the paper's Tab. 4(b) (``base.condition``): ``single_scale`` (one
scale's tokens at every cross-attention layer) and ``global`` (one pooled token, the stand-in for Rodin's CLIP
image token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatar_core.errors import ConfigError, CorruptFileError, InputError, MissingFileError
from avatar_core.io import load_tensors, save_tensors

#: The feature maps' strides relative to the portrait (paper: 128, 64, 32 at 256^2).
FEATURE_STRIDES = (2, 4, 8)


# -- portrait validation and preparation --------------------------------------------------------------------------

def prepare_portrait(
    image: Tensor | np.ndarray,  # [H, W, 4] (or [B, H, W, 4]) RGBA, uint8 or float in [0, 1]
    size: int = 256,
    resize: bool = True,
    background: float = 1.0,
) -> Tensor:  # [B, 3, size, size] float32 in [-1, 1]
    """Validate an RGBA portrait, composite it on white with its alpha and resize it to ``size`` (paper 256).

    Errors (``InputError``): not an image array, not RGBA (RGB without alpha included: the alpha is what separates
    the avatar from its background), non-square, smaller than 8 px, float values outside [0, 1], non-finite values,
    or a size other than ``size`` when ``resize=False``.
    """
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == np.uint8:
            img = torch.from_numpy(arr.astype(np.float32) / 255.0)
        elif np.issubdtype(arr.dtype, np.floating):
            img = torch.from_numpy(arr.astype(np.float32))
        else:
            raise InputError(f"portrait array has dtype {arr.dtype}", "pass uint8 RGBA or float RGBA in [0, 1]")
    elif isinstance(image, Tensor):
        img = image.float() / 255.0 if image.dtype == torch.uint8 else image
        if not img.is_floating_point():
            raise InputError(f"portrait tensor has dtype {image.dtype}", "pass uint8 RGBA or float RGBA in [0, 1]")
        img = img.float()
    else:
        raise InputError(f"portrait must be an image array, got {type(image).__name__}",
                         "load it first, e.g. avatar_core.io.load_image(path) -> [H, W, 4]")
    if img.ndim == 3:
        img = img[None]
    if img.ndim != 4:
        raise InputError(f"portrait must be [H, W, 4] or [B, H, W, 4], got shape {tuple(img.shape)}",
                         "pass one RGBA image (height, width, channels last)")
    channels = img.shape[-1]
    if channels == 3:
        raise InputError("portrait has no alpha channel (RGB)",
                         "save the front portrait as RGBA with a transparent background (the dataset's portraits are)")
    if channels != 4:
        raise InputError(f"portrait must be RGBA (4 channels), got {channels}",
                         "convert it to an RGBA image with the avatar opaque and the background transparent")
    h, w = img.shape[1:3]
    if h != w:
        raise InputError(f"portrait must be square, got {h}x{w}", "crop the portrait to a square around the head")
    if h < 8:
        raise InputError(f"portrait of {h}x{w} pixels is too small", f"pass at least 8x8, ideally {size}x{size}")
    if not resize and h != size:
        raise InputError(f"portrait is {h}x{w}, the model expects {size}x{size}",
                         f"resize it to {size}x{size} (or prepare it with resize=True)")
    if not torch.isfinite(img).all():
        raise InputError("portrait contains NaN or infinite values", "check the image file")
    if img.min() < 0 or img.max() > 1:
        raise InputError(f"float portrait values must lie in [0, 1], got [{img.min():.3g}, {img.max():.3g}]",
                         "divide 8-bit values by 255")
    rgb, alpha = img[..., :3], img[..., 3:]
    rgb = rgb * alpha + background * (1.0 - alpha)
    x = rgb.permute(0, 3, 1, 2)
    if h != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=h > size)
    return x.clamp(0, 1) * 2.0 - 1.0


# -- the null condition and condition dropout --------------------------------------------------------------------

def null_features(features: Sequence[Tensor]) -> list[Tensor]:
    """The null condition for guidance: every feature map replaced by ones (the authors' choice, not zeros)."""
    return [torch.ones_like(f) for f in features]


def drop_condition(
    features: Sequence[Tensor],  # each [B, C_i, H_i, W_i]
    drop_prob: float = 0.2,
    generator: torch.Generator | None = None,
    drop_mask: Tensor | None = None,  # [B] bool, overrides the random draw
) -> tuple[list[Tensor], Tensor]:  # features with dropped samples set to ones, and the mask [B]
    """Condition dropout for classifier-free guidance (Sec. 4.1: 20%): dropped samples get the null condition."""
    B = features[0].shape[0]
    if drop_mask is None:
        drop_mask = torch.rand(B, generator=generator, device="cpu").to(features[0].device) < drop_prob
    out = [torch.where(drop_mask.reshape(B, 1, 1, 1), torch.ones_like(f), f) for f in features]
    return out, drop_mask


# -- patch tokens --------------------------------------------------------------------------------------------------

#: Portrait conditions of the base model (Tab. 4(b)): the paper's multi-scale features, one scale at every layer,
#: or one global token (Rodin's CLIP image token; here pooled from the same encoder).
CONDITION_MODES = ("multi_scale", "single_scale", "global")


class PortraitTokenizer(nn.Module):
    """PatchPartition of Eq. 8: one strided conv per scale maps a feature map to tokens [B, K_i, token_dim].

    Args: feature_channels (SDXL VAE: (128, 256, 512)), kernel_sizes (= strides; (16, 8, 4)), token_dim (width of
    the tokens the UNet's cross-attention reads), portrait_size (256; sets the token count for the learned
    positional embeddings, which let attention tell patches apart), mode (:data:`CONDITION_MODES`), scale (the
    feature map ``single_scale`` / ``global`` read; -1: the last given, the deepest).

    The output always has one token tensor per given scale (one per cross-attention resolution):

    - ``multi_scale`` (the paper): scale i's patch tokens for resolution i.
    - ``single_scale``: the patch tokens of scale ``scale`` for every resolution (Tab. 4(b) D).
    - ``global``: one token, a linear projection of the global average of scale ``scale``'s map, for every
      resolution (Tab. 4(b) A-C: the stand-in for Rodin's global CLIP image token, which needs no positional code).
    """

    def __init__(self, feature_channels: Sequence[int] = (128, 256, 512), kernel_sizes: Sequence[int] = (16, 8, 4),
                 token_dim: int = 512, portrait_size: int = 256, mode: str = "multi_scale", scale: int = -1):
        super().__init__()
        if len(feature_channels) != len(kernel_sizes):
            raise ConfigError("feature_channels and kernel_sizes must have one entry per scale",
                              "e.g. feature_channels=(128, 256, 512), kernel_sizes=(16, 8, 4)")
        if mode not in CONDITION_MODES:
            raise ConfigError(f"unknown portrait condition {mode!r}", f"use one of {list(CONDITION_MODES)}")
        n = len(feature_channels)
        if not -n <= scale < n:
            raise ConfigError(f"condition scale {scale} is not among the {n} feature scales",
                              f"use an index in [-{n}, {n - 1}] (-1: the deepest)")
        self.mode, self.scale, self.num_scales = mode, scale % n, n
        used = range(n) if mode == "multi_scale" else [self.scale]
        counts = {}
        for i in used:
            side = portrait_size // FEATURE_STRIDES[i] // kernel_sizes[i]
            if side < 1:
                raise ConfigError(f"portrait_size {portrait_size} gives no patches at stride {FEATURE_STRIDES[i]} "
                                  f"with kernel {kernel_sizes[i]}", "use a larger portrait or smaller patch kernels")
            counts[i] = side * side
        if mode == "global":
            self.projs = nn.ModuleList([nn.Linear(feature_channels[self.scale], token_dim)])
            self.pos = nn.ParameterList()
        else:
            self.projs = nn.ModuleList(nn.Conv2d(feature_channels[i], token_dim, kernel_sizes[i],
                                                 stride=kernel_sizes[i]) for i in used)
            self.pos = nn.ParameterList(nn.Parameter(torch.randn(1, counts[i], token_dim) * 0.02) for i in used)
        self.token_dim = token_dim
        self.feature_channels = tuple(int(c) for c in feature_channels)
        self.portrait_size = portrait_size

    def describe(self) -> dict:
        """The condition as recorded in a run's settings."""
        return {"condition": self.mode, "scale": None if self.mode == "multi_scale" else self.scale,
                "scales": self.num_scales, "token_dim": self.token_dim}

    def null_features(self, batch_size: int, device: str | torch.device = "cpu") -> list[Tensor]:
        """Ones-valued feature maps of the right shapes: the null condition when no portrait is given."""
        return [torch.ones(batch_size, c, self.portrait_size // s, self.portrait_size // s, device=device)
                for c, s in zip(self.feature_channels, FEATURE_STRIDES)]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:  # each [B, C_i, H_i, W_i] -> [B, K_i, D]
        if len(features) < self.num_scales:
            raise InputError(f"{len(features)} portrait feature maps where the tokenizer reads {self.num_scales}",
                             "pass the encoder's first len(context_resolutions) feature maps")
        features = list(features)[: self.num_scales]
        if self.mode == "global":
            tok = self.projs[0](features[self.scale].mean(dim=(2, 3)))[:, None]  # [B, 1, D]
            return [tok] * self.num_scales
        out = []
        for proj, pos, f in zip(self.projs, self.pos,
                                features if self.mode == "multi_scale" else [features[self.scale]]):
            tok = proj(f).flatten(2).transpose(1, 2)
            if tok.shape[1] != pos.shape[1]:
                raise InputError(f"{tok.shape[1]} portrait tokens where the tokenizer was built for {pos.shape[1]}",
                                 "prepare portraits at the configured portrait_size")
            out.append(tok + pos)
        return out if self.mode == "multi_scale" else out * self.num_scales


# -- encoders ------------------------------------------------------------------------------------------------------

class _Down(nn.Module):
    """Two 3x3 convs with GroupNorm/SiLU and a stride-2 conv: one scale of the small encoder."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        g = math.gcd(8, cout)
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(g, cout), nn.SiLU(),
                                  nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(g, cout), nn.SiLU(),
                                  nn.Conv2d(cout, cout, 3, stride=2, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        g = math.gcd(8, cout)
        self.body = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1),
                                  nn.GroupNorm(g, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
                                  nn.GroupNorm(g, cout), nn.SiLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class PortraitVAE(nn.Module):
    """The embedded default encoder: a small KL-regularised conv autoencoder (Kingma & Welling 2014).

    Its encoder mirrors the SD VAE's layout: features at H/2, H/4, H/8 with (c, 2c, 4c) channels (Eq. 7), then a
    diagonal Gaussian latent (``latent_channels``) at H/8; the decoder maps the latent back to RGB. Args:
    base_channels (c; the SDXL VAE has 128), latent_channels (4, as SD).
    """

    def __init__(self, base_channels: int = 32, latent_channels: int = 4):
        super().__init__()
        c = base_channels
        self.base_channels, self.latent_channels = c, latent_channels
        self.feature_channels = (c, 2 * c, 4 * c)
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.downs = nn.ModuleList([_Down(c, c), _Down(c, 2 * c), _Down(2 * c, 4 * c)])
        self.to_moments = nn.Conv2d(4 * c, 2 * latent_channels, 3, padding=1)
        self.from_latent = nn.Conv2d(latent_channels, 4 * c, 3, padding=1)
        self.ups = nn.ModuleList([_Up(4 * c, 2 * c), _Up(2 * c, c), _Up(c, c)])
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def features(self, images: Tensor) -> list[Tensor]:  # [B, 3, H, W] in [-1, 1] -> [B, c*2^i, H/2^(i+1), ...]
        """The multi-scale features y1, y2, y3 of Eq. 7."""
        h = self.conv_in(images)
        out = []
        for down in self.downs:
            h = down(h)
            out.append(h)
        return out

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:  # mean, logvar [B, latent, H/8, W/8]
        mean, logvar = self.to_moments(self.features(images)[-1]).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:  # [B, latent, H/8, W/8] -> [B, 3, H, W]
        h = self.from_latent(z)
        for up in self.ups:
            h = up(h)
        return self.conv_out(h)

    def loss(self, images: Tensor, kl_weight: float = 1e-4,
             generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Reconstruction L1 + MSE plus kl_weight * KL(q(z|x) || N(0, I)) per element, as SD's autoencoder."""
        mean, logvar = self.encode(images)
        noise = torch.randn(mean.shape, generator=generator, device="cpu").to(mean)
        z = mean + torch.exp(0.5 * logvar) * noise
        recon = self.decode(z)
        rec = (recon - images).abs().mean() + F.mse_loss(recon, images)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return rec + kl_weight * kl, {"rec": rec.item(), "kl": kl.item()}

    def save(self, path: str | PathLike) -> Path:
        """Write the weights and the architecture to one safetensors file (avatar_core.io)."""
        meta = {"kind": "rodinhd.PortraitVAE", "base_channels": self.base_channels,
                "latent_channels": self.latent_channels}
        return save_tensors(path, {k: v.detach().cpu() for k, v in self.state_dict().items()}, metadata=meta)

    @classmethod
    def load(cls, path: str | PathLike, device: str | torch.device = "cpu") -> PortraitVAE:
        """Read a VAE written by :meth:`save`."""
        if not Path(path).exists():
            raise MissingFileError(f"portrait VAE file {path} does not exist",
                                   "train it first (rodinhd train-base trains it when no pretrained VAE is configured)")
        tensors, meta = load_tensors(path, device=device)
        if meta.get("kind") != "rodinhd.PortraitVAE":
            raise CorruptFileError(f"{path} is not a RodinHD portrait VAE (kind={meta.get('kind')!r})",
                                   "point to the portrait_vae.safetensors written by training")
        vae = cls(int(meta["base_channels"]), int(meta["latent_channels"])).to(device)
        vae.load_state_dict(tensors)
        return vae


def train_portrait_vae(
    images: Tensor | np.ndarray,  # [N, H, W, 3] RGB in [0, 1] (or uint8), already composited on white
    steps: int = 500,
    base_channels: int = 32,
    latent_channels: int = 4,
    batch_size: int = 8,
    lr: float = 2e-4,
    kl_weight: float = 1e-4,
    size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    vae: PortraitVAE | None = None,
) -> tuple[PortraitVAE, list[float]]:
    """Train the embedded :class:`PortraitVAE` on the dataset's portraits (Adam, random flips); returns it and the losses.

    Args: images, steps, base_channels, latent_channels, batch_size, lr, kl_weight, size (resize to this side;
    default: keep), seed, device, vae (continue training an existing one).
    """
    x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if x.ndim != 4 or x.shape[-1] != 3:
        raise InputError(f"portraits for the VAE must be [N, H, W, 3], got {tuple(x.shape)}",
                         "composite RGBA portraits on white first (prepare_portrait does)")
    x = x.float().permute(0, 3, 1, 2) * 2.0 - 1.0
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if x.shape[-1] % 8 or x.shape[-2] % 8:
        raise InputError(f"portrait side {tuple(x.shape[-2:])} is not divisible by 8",
                         "resize portraits to a multiple of 8 (the paper uses 256)")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = (vae or PortraitVAE(base_channels, latent_channels)).to(device).train()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    losses = []
    for _ in range(int(steps)):
        idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=gen)
        batch = x[idx]
        flip = torch.rand(batch.shape[0], generator=gen) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch).to(device)
        loss, _ = vae.loss(batch, kl_weight=kl_weight, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return vae.eval(), losses


class SDVAEFeatures(nn.Module):
    """Multi-scale features from a pretrained SD/SDXL ``AutoencoderKL`` encoder (the paper's choice, Sec. 3.2).

    The outputs of the encoder's first three down blocks are y1, y2, y3 (SDXL VAE: 128 ch at H/2, 256 at H/4,
    512 at H/8). Build with :meth:`from_pretrained` (a local folder, via ``avatar_core.pretrained.load_sd_vae``) or
    from an ``AutoencoderKL`` instance. The encoder is frozen.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        enc = vae.encoder
        if len(enc.down_blocks) < 3:
            raise ConfigError(f"the VAE encoder has {len(enc.down_blocks)} down blocks, three are needed",
                              "use an SD/SDXL AutoencoderKL (four down blocks)")
        self.encoder = enc
        self.feature_channels = tuple(int(b.resnets[-1].conv2.out_channels) for b in enc.down_blocks[:3])
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, path: str | PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> SDVAEFeatures:
        """Load the VAE from a local folder (a pipeline folder with ``vae/`` or the VAE folder itself)."""
        from avatar_core.pretrained import load_sd_vae

        return cls(load_sd_vae(path, dtype=dtype, device=device))

    def train(self, mode: bool = True) -> SDVAEFeatures:
        return super().train(False)  # frozen: keep dropout/norm statistics in eval mode

    @torch.no_grad()
    def features(self, images: Tensor) -> list[Tensor]:  # [B, 3, H, W] in [-1, 1]
        """Outputs of down blocks 0, 1, 2 (the diffusers down blocks downsample at their end)."""
        p = next(self.encoder.parameters())
        h = self.encoder.conv_in(images.to(device=p.device, dtype=p.dtype))
        out = []
        for block in self.encoder.down_blocks[:3]:
            h = block(h)
            out.append(h.float())
        return out


def portrait_features(encoder: nn.Module, images: Tensor) -> list[Tensor]:
    """y1, y2, y3 for prepared portraits [B, 3, H, W] in [-1, 1] from either encoder, without gradient to it."""
    with torch.no_grad():
        return [f.detach() for f in encoder.features(images)]


def load_portrait_encoder(pretrained_vae: str | PathLike | None = None, own_vae: str | PathLike | None = None,
                          device: str | torch.device = "cpu") -> nn.Module:
    """The configured portrait encoder: a pretrained SD/SDXL VAE folder if given (paper), else the package's VAE file.

    Both return an object with ``features(images)`` and ``feature_channels``; a missing folder or file raises
    a clear ``MissingWeightsError`` / ``MissingFileError``.
    """
    if pretrained_vae is not None:
        return SDVAEFeatures.from_pretrained(pretrained_vae, device=device)
    if own_vae is None:
        raise ConfigError("no portrait encoder is configured",
                          "set a pretrained SD/SDXL VAE folder, or train the embedded portrait VAE "
                          "(train_portrait_vae) and give its file")
    return PortraitVAE.load(own_vae, device=device).eval().requires_grad_(False)
