"""ADM-style UNet over rolled-out triplanes with 3D-aware convolution and portrait cross-attention (Sec. 3.2, App. A).

The network sees a triplane rolled out to one image ``[B, C, H, 3W]`` (planes ``xy``, ``xz``, ``yz`` side by side,
``avatar_core.conventions``), as the paper does "in order to employ the well-designed 2D UNet" of Dhariwal & Nichol
(ADM). Following the paper, ordinary convolutions, down/upsampling and self-attention treat the roll-out as an image:
self-attention spans all three planes on purpose, and a 3x3 convolution sees one texel column of the neighbouring
plane at a plane border. ``fold_planes=True`` is offered as an option: every ordinary convolution and resampling then
runs on each plane separately (planes folded into the batch), so nothing crosses a border except self-attention and
the 3D-aware convolution. Downsampling by 2 never straddles a border as long as W is divisible by 2^(levels - 1),
which the constructor checks. GroupNorm statistics span the whole roll-out in both modes (one image, as the paper).

Resolutions (``attention_resolutions``, ``cross_attn_resolutions``, ``conv3d_resolutions``) are plane heights H at
a level, as in the paper's appendix (base: 128 -> 8; upsampler: 512 -> 128).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from avatar_core.errors import InputError
from rodinhd.triplane import rollout as planes_to_rollout  # [B, 3, C, H, W] -> [B, C, H, 3W]
from rodinhd.triplane import unroll as rollout_to_planes  # [B, C, H, 3W] -> [B, 3, C, H, W]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:  # [B, dim]
    """Sinusoidal embedding of (possibly fractional) step indices, as in ADM / Transformer positional codes."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter: residual branches then start as the identity (ADM's out convs, Rodin's 3D-aware conv)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where the width allows (ADM), fewer for the tiny CPU configs."""
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels)


class PlaneConv2d(nn.Module):
    """A Conv2d on a roll-out, either over the whole image (paper) or on each plane separately (``fold_planes``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 fold_planes: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
        self.fold_planes = fold_planes

    def forward(self, x: Tensor) -> Tensor:  # [B, Cin, H, 3W] -> [B, Cout, H', 3W']
        if not self.fold_planes:
            return self.conv(x)
        y = self.conv(rearrange(rollout_to_planes(x), "b three c h w -> (b three) c h w"))
        return planes_to_rollout(rearrange(y, "(b three) c h w -> b three c h w", three=3))


class Conv3DAware(nn.Module):
    """3D-aware convolution (Rodin, Wang et al. 2023; RodinHD App. A) on a roll-out of square planes.

    Each plane is average-pooled along the axis it shares with nobody in the target plane; the pooled vectors of the
    two other planes are broadcast over the target plane and concatenated with its own features (3C channels); one
    zero-initialised 3x3 conv per plane maps 3C -> C_out; the three outputs are put side by side again. With the
    planes xy [y rows, x cols], xz [z rows, x cols], yz [z rows, y cols]:
    xy gets mean_z(xz) along x (per column) and mean_z(yz) along y (per row); xz gets mean_y(xy) along x and
    mean_y(yz) along z; yz gets mean_x(xy) along y and mean_x(xz) along z.
    """

    def __init__(self, in_channels: int, out_channels: int, zero_init: bool = True):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(3 * in_channels, out_channels, 3, padding=1) for _ in range(3))
        if zero_init:
            zero_module(self.convs)

    def forward(self, x: Tensor) -> Tensor:  # [B, Cin, H, 3W] -> [B, Cout, H, 3W]
        p = rollout_to_planes(x)
        xy, xz, yz = p[:, 0], p[:, 1], p[:, 2]  # [B, C, H, W] each
        H, W = xy.shape[-2:]
        if H != W:
            raise InputError(f"3D-aware convolution needs square planes, got {H}x{W}",
                             "use triplanes with H == W or leave this resolution out of conv3d_resolutions")
        # A vector over an axis becomes "per column" ([B, C, 1, W]) or "per row" ([B, C, H, 1]) of the target.
        xz_over_x = xz.mean(dim=2, keepdim=True)  # mean over z -> [B, C, 1, W(x)]
        yz_over_y = yz.mean(dim=2, keepdim=True)  # mean over z -> [B, C, 1, W(y)]
        xy_over_x = xy.mean(dim=2, keepdim=True)  # mean over y -> [B, C, 1, W(x)]
        yz_over_z = yz.mean(dim=3, keepdim=True)  # mean over y -> [B, C, H(z), 1]
        xy_over_y = xy.mean(dim=3, keepdim=True)  # mean over x -> [B, C, H(y), 1]
        xz_over_z = xz.mean(dim=3, keepdim=True)  # mean over x -> [B, C, H(z), 1]
        cat_xy = torch.cat([xy, xz_over_x.expand_as(xy), yz_over_y.transpose(2, 3).expand_as(xy)], dim=1)
        cat_xz = torch.cat([xz, xy_over_x.expand_as(xz), yz_over_z.expand_as(xz)], dim=1)
        cat_yz = torch.cat([yz, xy_over_y.transpose(2, 3).expand_as(yz), xz_over_z.expand_as(yz)], dim=1)
        outs = [conv(c) for conv, c in zip(self.convs, (cat_xy, cat_xz, cat_yz))]
        return torch.cat(outs, dim=3)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (ADM), halving H and each plane's width."""

    def __init__(self, channels: int, fold_planes: bool = False):
        super().__init__()
        self.op = PlaneConv2d(channels, channels, 3, stride=2, fold_planes=fold_planes)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv (ADM); nearest upsampling never mixes planes."""

    def __init__(self, channels: int, fold_planes: bool = False):
        super().__init__()
        self.conv = PlaneConv2d(channels, channels, 3, fold_planes=fold_planes)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(nn.Module):
    """ADM residual block: GN-SiLU-conv, timestep embedding (added, or FiLM scale/shift after GN), GN-SiLU-dropout-conv.

    Args: channels, emb_channels, dropout (paper 0), out_channels, use_scale_shift_norm (paper: True base,
    False upsampler), up/down (resample inside the block, as ADM's resblock_updown), use_3d_conv (the output conv is
    a zero-initialised :class:`Conv3DAware` instead of a zero-initialised 3x3 conv), fold_planes (see module doc).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None,
                 use_scale_shift_norm: bool = True, up: bool = False, down: bool = False,
                 use_3d_conv: bool = False, fold_planes: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = group_norm(channels)
        self.in_conv = PlaneConv2d(channels, out_channels, 3, fold_planes=fold_planes)
        self.resample: nn.Module | None = None
        self.skip_resample: nn.Module | None = None
        if up:
            self.resample = nn.Upsample(scale_factor=2, mode="nearest")
            self.skip_resample = nn.Upsample(scale_factor=2, mode="nearest")
        elif down:
            # Average pooling over 2x2 cells never crosses a plane border when W is even.
            self.resample = nn.AvgPool2d(2)
            self.skip_resample = nn.AvgPool2d(2)
        self.emb = nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.out_norm = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        if use_3d_conv:
            self.out_conv: nn.Module = Conv3DAware(out_channels, out_channels, zero_init=True)
        else:
            self.out_conv = zero_module(PlaneConv2d(out_channels, out_channels, 3, fold_planes=fold_planes))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # [B, C, H, 3W], [B, E] -> [B, C_out, H', 3W']
        h = F.silu(self.in_norm(x))
        if self.resample is not None:
            h = self.resample(h)
            x = self.skip_resample(x)
        h = self.in_conv(h)
        e = self.emb(F.silu(emb))[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


def _heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    if num_head_channels > 0:
        if channels % num_head_channels:
            raise InputError(f"{channels} channels do not split into heads of {num_head_channels}",
                             "pick num_head_channels dividing every level's width, or use num_heads")
        return channels // num_head_channels
    return num_heads


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all H x 3W positions of the roll-out (ADM), zero-initialised output."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv1d(channels, channels, 1))
        self.num_heads = num_heads

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, 3W]
        H, W = x.shape[-2:]
        qkv = self.qkv(rearrange(self.norm(x), "b c h w -> b c (h w)"))  # [B, 3C, N]
        q, k, v = rearrange(qkv, "b (three nh d) n -> three b nh n d", three=3, nh=self.num_heads)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b nh n d -> b (nh d) n")
        return x + rearrange(self.proj(out), "b c (h w) -> b c h w", h=H, w=W)


class CrossAttentionBlock(nn.Module):
    """Cross-attention from triplane features to portrait tokens (Sec. 3.2, Eq. 8), zero-initialised output."""

    def __init__(self, channels: int, context_dim: int, num_heads: int = 1):
        super().__init__()
        self.norm = group_norm(channels)
        self.context_norm = nn.LayerNorm(context_dim)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))
        self.num_heads = num_heads

    def forward(self, x: Tensor, context: Tensor) -> Tensor:  # [B, C, H, 3W], [B, K, D] -> [B, C, H, 3W]
        H, W = x.shape[-2:]
        heads = "b n (nh d) -> b nh n d"
        q = self.q(rearrange(self.norm(x), "b c h w -> b (h w) c"))  # [B, N, C]
        k, v = self.kv(self.context_norm(context)).chunk(2, dim=-1)  # [B, K, C]
        q, k, v = (rearrange(t, heads, nh=self.num_heads) for t in (q, k, v))
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b nh n d -> b n (nh d)")
        return x + rearrange(self.proj(out), "b (h w) c -> b c h w", h=H, w=W)


class AttentionPool(nn.Module):
    """The appendix's ``feature_pooling_type: attention``: a learned query pools all portrait tokens to one vector
    that is added to the timestep embedding (global conditioning beside the per-resolution cross-attention)."""

    def __init__(self, context_dim: int, emb_channels: int, num_heads: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, context_dim) / math.sqrt(context_dim))
        self.attn = nn.MultiheadAttention(context_dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(context_dim)
        self.proj = nn.Linear(context_dim, emb_channels)

    def forward(self, tokens: Tensor) -> Tensor:  # [B, K, D] -> [B, E]
        t = self.norm(tokens)
        pooled, _ = self.attn(self.query.expand(t.shape[0], -1, -1), t, t, need_weights=False)
        return self.proj(pooled[:, 0])


class _Step(nn.Module):
    """One UNet stage: a list of layers applied in order, feeding the embedding and the level's tokens where needed."""

    def __init__(self, *layers: nn.Module, resolution: int = 0):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.resolution = resolution

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        for layer in self.layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, CrossAttentionBlock):
                if context is not None:
                    h = layer(h, context)
            else:
                h = layer(h)
        return h


class TriplaneUNet(nn.Module):
    """ADM UNet on rolled-out triplanes ``[B, C, H, 3W]`` (Dhariwal & Nichol 2021; RodinHD App. A).

    Args (paper base / paper upsampler in brackets):
        image_size: plane height H of the input (128 / 512).
        in_channels: triplane channels C (32); the upsampler's low-res condition adds ``cond_channels`` more.
        model_channels: base width (192 / 128).
        out_channels: output channels (2C = 64 with learned variance / C = 32); default ``in_channels``.
        channel_mult: width multiplier per level ((1, 1, 2, 3, 4) / (1, 2, 4)).
        num_res_blocks: ResBlocks per level, an int or one per level ((3, 3, 3, 3, 3) / (2, 2, 6)).
        attention_resolutions: plane heights with self-attention ((32, 16, 8) / () -- the upsampler has none).
        cross_attn_resolutions: plane heights of encoder/decoder levels with portrait cross-attention
            ((32, 16, 8) / ()).
        middle_cross_attn: cross-attention in the middle block (True / True; the upsampler only has this one).
        conv3d_resolutions: plane heights whose ResBlocks use the 3D-aware output conv ((128,) / (512, 256, 128)).
        dropout: 0 in both.
        use_scale_shift_norm: FiLM scale/shift after GroupNorm (True / False).
        num_heads, num_head_channels: attention heads (num_head_channels > 0 overrides num_heads; the paper does
            not say; ADM's guided-diffusion models use num_head_channels = 64).
        context_dim: width of the portrait tokens (0: unconditional model without cross-attention).
        attention_pool: add an attention-pooled portrait vector to the timestep embedding
            (the appendix's ``feature_pooling_type: attention``; True / True).
        cond_channels: channels of the concatenated low-res triplane (0 / 32).
        aug_level_embedding: embed the conditional noise-augmentation level next to the timestep (False / True).
        resblock_updown: resample inside ResBlocks (ADM) instead of separate conv (up/down)samplers (True).
        fold_planes: run ordinary convs plane by plane (option; the paper treats the roll-out as an image: False).
        emb_channels: timestep-embedding width (4 * model_channels: 768 / 512, the appendix's ``embed_dim``).

    ``forward(x, t, context=None, low_res=None, aug_level=None)``: ``x`` [B, C, H, 3W]; ``t`` [B] step indices;
    ``context`` maps a resolution (plane height) to tokens [B, K, context_dim] (the middle block reads the entry
    of its own resolution); ``low_res`` [B, cond_channels, H, 3W] is concatenated to ``x``; ``aug_level`` [B].
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int | None = None,
                 channel_mult: Sequence[int] = (1, 2, 4), num_res_blocks: int | Sequence[int] = 2,
                 attention_resolutions: Sequence[int] = (), cross_attn_resolutions: Sequence[int] = (),
                 middle_cross_attn: bool = True, conv3d_resolutions: Sequence[int] = (), dropout: float = 0.0,
                 use_scale_shift_norm: bool = True, num_heads: int = 4, num_head_channels: int = -1,
                 context_dim: int = 0, attention_pool: bool = True, cond_channels: int = 0,
                 aug_level_embedding: bool = False, resblock_updown: bool = True, fold_planes: bool = False,
                 emb_channels: int | None = None):
        super().__init__()
        levels = len(channel_mult)
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * levels
        num_res_blocks = list(num_res_blocks)
        if len(num_res_blocks) != levels:
            raise InputError(f"num_res_blocks has {len(num_res_blocks)} entries for {levels} levels",
                             "give one count per channel_mult entry, or a single int")
        if image_size % (2 ** (levels - 1)):
            raise InputError(f"plane size {image_size} is not divisible by 2^{levels - 1}",
                             "pick a triplane size that halves cleanly at every level so no plane border is straddled")
        self.image_size = image_size
        self.in_channels = in_channels
        self.cond_channels = cond_channels
        self.out_channels = out_channels or in_channels
        self.context_dim = context_dim
        emb_channels = emb_channels or 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_channels), nn.SiLU(),
                                        nn.Linear(emb_channels, emb_channels))
        self.model_channels = model_channels
        self.aug_embed = (nn.Sequential(nn.Linear(model_channels, emb_channels), nn.SiLU(),
                                        nn.Linear(emb_channels, emb_channels)) if aug_level_embedding else None)
        self.pool = AttentionPool(context_dim, emb_channels) if (context_dim and attention_pool) else None
        xattn = set(cross_attn_resolutions) if context_dim else set()
        attn, conv3d = set(attention_resolutions), set(conv3d_resolutions)

        def heads(ch: int) -> int:
            return _heads(ch, num_heads, num_head_channels)

        def res_block(ch_in: int, ch_out: int, res: int, **kw) -> ResBlock:
            return ResBlock(ch_in, emb_channels, dropout, ch_out, use_scale_shift_norm,
                            use_3d_conv=res in conv3d, fold_planes=fold_planes, **kw)

        def extras(ch: int, res: int) -> list[nn.Module]:
            out: list[nn.Module] = []
            if res in attn:
                out.append(AttentionBlock(ch, heads(ch)))
            if res in xattn:
                out.append(CrossAttentionBlock(ch, context_dim, heads(ch)))
            return out

        ch = model_channels * channel_mult[0]
        res = image_size
        self.input_blocks = nn.ModuleList(
            [_Step(PlaneConv2d(in_channels + cond_channels, ch, 3, fold_planes=fold_planes), resolution=res)])
        skip_chs = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks[level]):
                out_ch = model_channels * mult
                self.input_blocks.append(_Step(res_block(ch, out_ch, res), *extras(out_ch, res), resolution=res))
                ch = out_ch
                skip_chs.append(ch)
            if level != levels - 1:
                down = (res_block(ch, ch, res, down=True) if resblock_updown
                        else Downsample(ch, fold_planes=fold_planes))
                res //= 2
                self.input_blocks.append(_Step(down, resolution=res))
                skip_chs.append(ch)
        self.middle_resolution = res
        mid: list[nn.Module] = [res_block(ch, ch, res)]
        if attn:  # ADM's middle block attends; the upsampler, with no self-attention at all, does not
            mid.append(AttentionBlock(ch, heads(ch)))
        if context_dim and middle_cross_attn:
            mid.append(CrossAttentionBlock(ch, context_dim, heads(ch)))
        mid.append(res_block(ch, ch, res))
        self.middle_block = _Step(*mid, resolution=res)
        #: the resolutions whose portrait tokens some cross-attention block reads
        self.context_resolutions = frozenset(xattn | ({res} if context_dim and middle_cross_attn else set()))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks[level] + 1):
                out_ch = model_channels * mult
                layers: list[nn.Module] = [res_block(ch + skip_chs.pop(), out_ch, res), *extras(out_ch, res)]
                ch = out_ch
                if level and i == num_res_blocks[level]:
                    layers.append(res_block(ch, ch, res, up=True) if resblock_updown
                                  else Upsample(ch, fold_planes=fold_planes))
                    step_res = res
                    res *= 2
                else:
                    step_res = res
                self.output_blocks.append(_Step(*layers, resolution=step_res))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(),
                                 zero_module(PlaneConv2d(ch, self.out_channels, 3, fold_planes=fold_planes)))

    def forward(self, x: Tensor, t: Tensor, context: Mapping[int, Tensor] | None = None,
                low_res: Tensor | None = None, aug_level: Tensor | None = None) -> Tensor:
        """Denoiser output [B, out_channels, H, 3W] for a noisy roll-out x [B, C, H, 3W] at step indices t [B]."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] != self.image_size \
                or x.shape[3] != 3 * self.image_size:
            raise InputError(
                f"expected a roll-out [B, {self.in_channels}, {self.image_size}, {3 * self.image_size}], "
                f"got {tuple(x.shape)}", "roll the triplane out to [B, C, H, 3W] at the model's plane size")
        if self.cond_channels:
            if low_res is None or low_res.shape[1] != self.cond_channels or low_res.shape[2:] != x.shape[2:]:
                raise InputError("this model needs the upsampled low-res triplane as low_res "
                                 f"[B, {self.cond_channels}, {x.shape[2]}, {x.shape[3]}]",
                                 "upsample the base model's roll-out to the model's size and pass it as low_res")
            x = torch.cat([x, low_res.to(x.dtype)], dim=1)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if self.aug_embed is not None:
            a = torch.zeros_like(t, dtype=torch.float32) if aug_level is None else \
                torch.as_tensor(aug_level, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
            emb = emb + self.aug_embed(timestep_embedding(a, self.model_channels))
        context = dict(context or {})
        if self.pool is not None and context:
            emb = emb + self.pool(torch.cat([context[k] for k in sorted(context)], dim=1))
        hs = []
        h = x
        for step in self.input_blocks:
            h = step(h, emb, context.get(step.resolution))
            hs.append(h)
        h = self.middle_block(h, emb, context.get(self.middle_resolution))
        for step in self.output_blocks:
            h = step(torch.cat([h, hs.pop()], dim=1), emb, context.get(step.resolution))
        return self.out(h)
