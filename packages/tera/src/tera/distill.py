"""Stage 1 of TeRA: the distillation decoder and the distilled, structured latent space.

The latent of an avatar is its teacher UV feature map (IDOL's 32 x 1536 x 1536, or the project's fitted teacher)
downsampled to the latent resolution (paper 256 x 256): no encoder is trained, the downsampled features *are* the
latent. A compact convolutional decoder upsamples the latent (paper to 1024 x 1024) and decodes geometry and colour
attributes in two branches (IDOL's UV decoder heads), trained with

    L_dist = sum_views ( ||I_pred - I_gt||^2 + lambda_vgg * L_vgg ) + lambda_offset * ||G_offset||^2.

Perceptual term: the kernel's :mod:`avatar_core.perceptual`: LPIPS over VGG-16 from a local torchvision weights
file when one is configured; without one its embedded random-feature stand-in (not VGG: it rewards matching local
structure at several scales, but has none of VGG's learned semantics).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatar_core.cameras import Cameras
from avatar_core.errors import InputError
from avatar_core.perceptual import PerceptualLoss as KernelPerceptualLoss
from tera.uv_gaussians import UVDecoder, UVGaussianAvatar, composite

# --------------------------------------------------------------------------------------------------
# Perceptual loss
# --------------------------------------------------------------------------------------------------


class PerceptualLoss(KernelPerceptualLoss):
    """TeRA's L_vgg term: the kernel's perceptual loss (:class:`avatar_core.perceptual.PerceptualLoss`).

    ``vgg_weights``: a local torchvision ``vgg16`` state dict (config key ``teacher.vgg_weights``; no environment
    variable overrides it, so a run's settings say what it trained with) gives
    LPIPS over VGG-16 (IDOL's LPIPS term; heads from ``lpips_weights`` or an installed ``lpips`` package, else
    LPIPS's baseline); none gives the kernel's embedded random-feature stand-in. ``describe()`` names the choice.
    """

    def __init__(self, vgg_weights: str | os.PathLike | None = None, lpips_weights: str | os.PathLike | None = "auto",
                 seed: int = 0):
        super().__init__(vgg_weights or None, lpips_weights, "vgg", seed)


# --------------------------------------------------------------------------------------------------
# Latents and the decoder
# --------------------------------------------------------------------------------------------------


def features_to_latent(features: Tensor, latent_resolution: int) -> Tensor:  # [B, C, H, W] -> [B, C, r, r]
    """The structured latent: teacher UV features area-downsampled to ``latent_resolution`` (paper 1536 -> 256).

    Texels whose features are exactly zero in every channel are outside the UV charts (the fitted teacher writes
    zeros there): the pooling averages only the texels inside, so a chart's border keeps its own values instead
    of being pulled towards zero, and a latent texel with no texel inside is zero. Features without such texels
    (IDOL's) are plainly area-averaged."""
    if features.dim() == 3:
        features = features[None]
    if features.dim() != 4:
        raise InputError(f"teacher features must be [B, C, H, W], got {tuple(features.shape)}", "stack feature maps")
    features = features.float()
    if features.shape[-2:] == (latent_resolution, latent_resolution):
        return features
    size = (latent_resolution, latent_resolution)
    inside = (features != 0).any(1, keepdim=True).float()  # [B, 1, H, W]
    pooled = F.interpolate(features * inside, size=size, mode="area")
    share = F.interpolate(inside, size=size, mode="area")
    return torch.where(share > 0, pooled / share.clamp_min(1e-12), torch.zeros_like(pooled))


def latent_scale(latents: Tensor | Iterable[Tensor], per_channel: bool = False, center: bool = True) -> Tensor:
    """Spread of latents over a dataset: standard deviation (``center``) or RMS; scalar, or ``[C]`` per channel.

    Streams the batches (``[B, C, h, w]`` or ``[C, h, w]`` each) in float64, so datasets larger than memory work;
    the diffusion model trains on ``latent / scale`` and decodes ``sample * scale`` (LDM's scale factor).
    """
    batches = [latents] if isinstance(latents, Tensor) else latents
    n = 0
    s1 = s2 = None
    for z in batches:
        z = z.detach().double()
        if z.dim() == 3:
            z = z[None]
        flat = z.transpose(0, 1).reshape(z.shape[1], -1)  # [C, B*h*w]
        if s1 is None:
            s1, s2 = flat.sum(1), (flat * flat).sum(1)
        else:
            s1, s2 = s1 + flat.sum(1), s2 + (flat * flat).sum(1)
        n += flat.shape[1]
    if s1 is None or n < 2:
        raise InputError("latent_scale needs at least two latent values", "pass the dataset's latents")
    if not per_channel:
        s1, s2, n = s1.sum(), s2.sum(), n * s1.shape[0]
    var = (s2 - s1 * s1 / n) / (n - 1) if center else s2 / n
    return var.clamp_min(0).sqrt().float()


class DistillationDecoder(nn.Module):
    """The compact distillation decoder: latent ``[B, C, r, r]`` -> attribute maps ``[B, 13, r*f, r*f]`` (TeRA stage 1).

    A conv stem, ``log2(upsample_factor)`` stages of (nearest x2, conv3x3, GroupNorm, SiLU), and a zero-initialised
    conv back to ``latent_channels`` added to the bilinearly upsampled latent; then IDOL's two-branch UV decoder
    (geometry -> offsets, colour -> rgb / radius / rotation). The zero-initialised residual makes the untrained
    decoder equal the teacher's UV decoder on the upsampled teacher features, so it can start from the teacher's
    decoder weights (:meth:`load_teacher_head`).

    Args:
        latent_channels: latent channels = teacher feature channels (32).
        upsample_factor: output / latent resolution, a power of two (paper 1024 / 256 = 4).
        hidden_channels: width of the upsampling trunk (not published; 64 here, 128 at paper scale is a guess).
        geometry_channels, geometry_hidden, texture_hidden, offset_init: the two-branch head (:class:`UVDecoder`).
        norm: the head's normalisation. ``"group"`` by default: generated latents are decoded one avatar at a
            time, and BatchNorm trained on per-avatar batches loses ~7 dB PSNR when switched to its running
            statistics at inference (measured on the tiny setup); ``"batch"`` is IDOL's choice.
    """

    def __init__(
        self,
        latent_channels: int = 32,
        upsample_factor: int = 4,
        hidden_channels: int = 64,
        geometry_channels: int = 16,
        geometry_hidden: int = 64,
        texture_hidden: int = 128,
        offset_init: float = 1e-5,
        norm: str = "group",
    ):
        super().__init__()
        if upsample_factor < 1 or upsample_factor & (upsample_factor - 1):
            raise InputError(f"upsample_factor must be a power of two, got {upsample_factor}", "paper: 4 (256 -> 1024)")
        self.latent_channels = latent_channels
        self.upsample_factor = upsample_factor
        groups = math.gcd(8, hidden_channels)
        self.stem = nn.Sequential(nn.Conv2d(latent_channels, hidden_channels, 3, padding=1), nn.SiLU())
        ups: list[nn.Module] = []
        for _ in range(int(math.log2(upsample_factor))):
            ups += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
                    nn.GroupNorm(groups, hidden_channels), nn.SiLU()]
        self.up = nn.Sequential(*ups)
        self.to_features = nn.Conv2d(hidden_channels, latent_channels, 3, padding=1)
        nn.init.zeros_(self.to_features.weight)
        nn.init.zeros_(self.to_features.bias)
        self.head = UVDecoder(latent_channels, geometry_channels, geometry_hidden, texture_hidden, offset_init, norm)

    def load_teacher_head(self, teacher_decoder: UVDecoder) -> None:
        """Start the two branches from the fitted teacher's UV decoder: convolutions and norm affines (same widths).

        With a BatchNorm teacher and a GroupNorm head the running statistics have no counterpart and are dropped.
        """
        own = self.head.state_dict()
        state = {k: v for k, v in teacher_decoder.state_dict().items() if k in own and own[k].shape == v.shape}
        missing = [k for k in own if k not in state and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        if missing:
            raise InputError(f"the teacher decoder does not match this head (missing {missing[:3]})",
                             "build the DistillationDecoder with the teacher's geometry/texture widths")
        self.head.load_state_dict(state, strict=False)

    def forward(self, latent: Tensor) -> Tensor:  # [B, C, r, r] -> [B, 13, r*f, r*f]
        if latent.dim() != 4 or latent.shape[1] != self.latent_channels:
            raise InputError(f"latents must be [B, {self.latent_channels}, r, r], got {tuple(latent.shape)}",
                             "downsample teacher features with features_to_latent first")
        base = latent
        if self.upsample_factor > 1:
            base = F.interpolate(latent, scale_factor=self.upsample_factor, mode="bilinear", align_corners=False)
        features = base + self.to_features(self.up(self.stem(latent)))
        return self.head(features)


# --------------------------------------------------------------------------------------------------
# The loss and a training step
# --------------------------------------------------------------------------------------------------


def render_loss(
    pred: Tensor,  # [B, V, H, W, 3]
    target: Tensor,  # [B, V, H, W, 3]
    offsets: Tensor,  # [B, N, 3]
    perceptual: PerceptualLoss | None,
    lambda_mse: float = 1.0,
    lambda_perceptual: float = 0.5,
    lambda_offset: float = 0.05,
    sum_views: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """TeRA's L_dist (``sum_views``) or IDOL's loss (mean over views): total and its parts, averaged over the batch.

    ``||I_pred - I_gt||^2`` is the per-view mean squared error; ``||G_offset||^2`` the mean squared offset norm.
    """
    mse = ((pred - target) ** 2).mean((-3, -2, -1))  # [B, V]
    perc = perceptual(pred, target) if perceptual is not None and lambda_perceptual > 0 else torch.zeros_like(mse)
    per_view = lambda_mse * mse + lambda_perceptual * perc
    views = per_view.sum(1) if sum_views else per_view.mean(1)
    off = (offsets ** 2).sum(-1).mean(-1)  # [B]
    total = (views + lambda_offset * off).mean()
    return total, {"mse": mse.mean().detach(), "perceptual": perc.mean().detach(), "offset": off.mean().detach()}


class Distiller(nn.Module):
    """Trains the distillation decoder on (latent, multi-view images) pairs (TeRA stage 1, L_dist).

    Args:
        avatar: the UV Gaussian avatar (fixed UV points on the body) that turns attribute maps into Gaussians.
        decoder: the :class:`DistillationDecoder`.
        perceptual: the L_vgg term; None builds :class:`PerceptualLoss` without weights (the embedded
            random-feature stand-in).
        lambda_vgg: perceptual weight (not published for TeRA; 0.5 keeps IDOL's 10 : 20 ratio to the MSE).
        lambda_offset: offset regulariser weight (not published; 0.05 keeps IDOL's 1 : 20 ratio).
        background: colour behind the avatar, the same for renders and RGBA targets.
    """

    def __init__(
        self,
        avatar: UVGaussianAvatar,
        decoder: DistillationDecoder,
        perceptual: PerceptualLoss | None = None,
        lambda_vgg: float = 0.5,
        lambda_offset: float = 0.05,
        background: Sequence[float] = (1.0, 1.0, 1.0),
    ):
        super().__init__()
        self.avatar = avatar
        self.decoder = decoder
        self.perceptual = perceptual if perceptual is not None else PerceptualLoss()
        self.lambda_vgg = lambda_vgg
        self.lambda_offset = lambda_offset
        self.background = tuple(background)

    def decode(self, latent: Tensor):  # [B, C, r, r] -> (maps [B, 13, R, R], GaussianBatch)
        """Latents -> attribute maps -> canonical Gaussians."""
        maps = self.decoder(latent)
        return maps, self.avatar(maps)

    def loss(
        self,
        latent: Tensor,  # [B, C, r, r]
        images: Tensor,  # [B, V, H, W, 4] RGBA (or RGB already on the background)
        cameras: Cameras | Sequence[Cameras],  # one batch of V cameras, or one per avatar
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """L_dist for a batch, and its parts (mse, perceptual, offset)."""
        maps, g = self.decode(latent)
        pred, _ = self.avatar.render(g, cameras, self.background)
        target = composite(images, self.background).to(pred)
        total, parts = render_loss(pred, target, g.offsets, self.perceptual, 1.0, self.lambda_vgg,
                                   self.lambda_offset, sum_views=True)
        return total, parts

    def fit(
        self,
        latents: Tensor,  # [A, C, r, r] the dataset's latents
        get_views,  # index -> (images [V, H, W, 4], Cameras)
        steps: int,
        lr: float = 2e-4,
        batch_size: int = 1,
        grad_clip: float = 10.0,
        seed: int = 0,
        progress: bool = True,
    ) -> list[float]:
        """A plain Adam loop over random avatars (the CLI trains with avatar_core.train instead); losses per step."""
        from tqdm.auto import tqdm

        opt = torch.optim.Adam(self.decoder.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        history = []
        self.decoder.train()
        for _ in tqdm(range(steps), desc="distill", disable=not progress):
            idx = torch.randint(len(latents), (batch_size,), generator=g).tolist()
            views = [get_views(i) for i in idx]
            device = next(self.decoder.parameters()).device
            images = torch.stack([v[0] for v in views]).to(device)
            loss, _ = self.loss(latents[idx].to(device), images, [v[1] for v in views])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.decoder.parameters(), grad_clip)
            opt.step()
            history.append(loss.item())
        return history


__all__ = [
    "DistillationDecoder",
    "Distiller",
    "PerceptualLoss",
    "features_to_latent",
    "latent_scale",
    "render_loss",
]
