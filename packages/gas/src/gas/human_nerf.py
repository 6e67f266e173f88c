"""Stage 1: the generalizable human NeRF (SHERF, Hu et al. 2023, as vendored by GAS, Sec. 3.1).

From one reference image with its body parameters and camera, a radiance field of the person in any pose:

* target-space sample points go to the canonical big pose by nearest-vertex inverse LBS (:mod:`gas.body_warp`);
* three feature sources are queried: a **global** code (image encoder -> pooled vector -> canonical triplane),
  **point-level** features (canonical points warped to the reference pose and projected into the reference
  image's feature map, plus positional-encoded colours), and **body-anchored** features (the projected visible
  body vertices' pixel features placed at their canonical positions and spread by a 3D conv net,
  :mod:`gas.voxel_net`);
* per triplane plane a token (plane features + 2D + 3D features), a one-layer transformer across the three tokens,
  density from token 0 + PE(x) through an MLP with a skip, colour from the density features + token 1 + PE(d);
* the kernel's volume renderer (:func:`avatar_core.render.volume.render_rays`), stratified samples in each ray's
  slab through the target body's box; points farther than ``max_body_dist`` from the body get no density
  (SHERF sets their raw density to -80).

SHERF's StyleGAN2 mapping/synthesis network becomes a small conv decoder of the global vector, and its ResNet18
image encoder a configurable conv encoder of the same two outputs (a half-resolution feature map, a global vector).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatar_core.cameras import Cameras
from avatar_core.errors import InputError
from avatar_core.render.rays import generate_rays
from avatar_core.render.volume import render_rays, sample_triplane
from gas.body_warp import BodyWarp, PosedAnchors
from gas.voxel_net import VoxelNet


@dataclass
class NeRFConfig:
    """Sizes of the human NeRF; paper values in ``configs/paper.yaml`` (SHERF's)."""

    enc_channels: int = 16
    """Channels of the half-resolution feature map (SHERF: ResNet18 layer1, 64)."""
    global_dim: int = 64
    """Global code size (SHERF: 512)."""
    triplane_channels: int = 16
    """Channels per plane (SHERF: 32)."""
    triplane_res: int = 32
    """Plane resolution (SHERF: 256)."""
    rgb_freqs: int = 2
    """Positional-encoding frequencies of the sampled reference colour (SHERF: 32 dims)."""
    voxel_mode: str = "submanifold"
    """Body-anchored branch: "submanifold" (dense conv with spconv's active-site semantics), "dense" (plain
    dense 3D conv) or "none" (no branch; not "off", which YAML reads as false)."""
    voxel_size: float = 0.05
    """Voxel edge in metres (SHERF: 0.005)."""
    voxel_channels: list[int] | None = None
    """Channels per level of the 3D net (SHERF: 32, 64, 96, 96)."""
    voxel_out: int = 16
    """Output channels of the 3D branch (SHERF: 96)."""
    token_dim: int = 16
    """Per-plane token width (SHERF: 32)."""
    heads: int = 2
    """Attention heads across the three tokens (SHERF: 3)."""
    hidden: int = 64
    """Width of the density MLP (SHERF: 128)."""
    depth: int = 4
    """Layers of the density MLP, skip at depth // 2 (SHERF: 8, skip at 4)."""
    colour_hidden: int = 32
    """Colour head width (SHERF: 64)."""
    xyz_freqs: int = 6
    dir_freqs: int = 2
    num_samples: int = 24
    """Stratified samples per ray (SHERF: 48)."""
    max_body_dist: float = 0.05
    """No density farther than this from the body surface (SHERF: 5 cm)."""
    anchor_stride: int = 2
    """Every k-th body vertex is an anchor (skinning, nearest queries, body features)."""


def positional_encoding(x: Tensor, freqs: int) -> Tensor:  # [..., D] -> [..., D (1 + 2 freqs)]
    """NeRF's encoding: x and sin/cos of 2^k pi x."""
    if freqs == 0:
        return x
    scales = (2.0 ** torch.arange(freqs, dtype=x.dtype, device=x.device)) * torch.pi
    xs = x[..., None, :] * scales[:, None]
    return torch.cat([x, torch.sin(xs).flatten(-2), torch.cos(xs).flatten(-2)], -1)


class ImageEncoder(nn.Module):
    """RGBA reference -> half-resolution feature map [C, H/2, W/2] and a global vector [G]."""

    def __init__(self, channels: int, global_dim: int):
        super().__init__()
        c = channels
        self.stem = nn.Sequential(nn.Conv2d(4, c, 3, 1, 1), nn.SiLU(), nn.Conv2d(c, c, 3, 2, 1), nn.SiLU(),
                                  nn.Conv2d(c, c, 3, 1, 1))
        self.down = nn.Sequential(nn.SiLU(), nn.Conv2d(c, 2 * c, 3, 2, 1), nn.SiLU(), nn.Conv2d(2 * c, 4 * c, 3, 2, 1),
                                  nn.SiLU())
        self.to_global = nn.Linear(4 * c, global_dim)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:  # [B, 4, H, W]
        feat = self.stem(image)
        g = self.to_global(self.down(feat).mean((-2, -1)))
        return feat, g


class TriplaneDecoder(nn.Module):
    """Global vector -> canonical triplane [3, C, R, R] (a conv decoder in place of StyleGAN2's synthesis)."""

    def __init__(self, global_dim: int, channels: int, res: int):
        super().__init__()
        base = 4
        ups = max(int(round(torch.log2(torch.tensor(res / base)).item())), 0)
        if base * 2**ups != res:
            raise InputError(f"triplane_res {res} is not 4 x a power of two", "use e.g. 32, 64, 128 or 256")
        width = 4 * channels
        self.width, self.channels = width, channels
        self.fc = nn.Linear(global_dim, width * base * base)
        blocks = []
        for _ in range(ups):
            blocks += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(width, width, 3, 1, 1), nn.SiLU()]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(width, 3 * channels, 3, 1, 1)

    def forward(self, g: Tensor) -> Tensor:  # [B, G] -> [B, 3, C, R, R]
        x = self.fc(g).reshape(g.shape[0], self.width, 4, 4)
        x = self.out(self.blocks(x))
        return x.reshape(g.shape[0], 3, self.channels, *x.shape[-2:])


class TokenAttention(nn.Module):
    """One pre-norm transformer layer over the three plane tokens (SHERF: dim 32, 3 heads)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * dim, bias=False)
        self.proj = nn.Linear(heads * dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:  # [N, 3, D]
        N, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(N, T, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # [N, h, T, d]
        x = x + self.proj(a.transpose(1, 2).reshape(N, T, -1))
        return x + self.mlp(self.norm2(x))


@dataclass
class ReferenceCode:
    """Everything the field needs from the reference image, computed once per reference."""

    planes: Tensor  # [1, 3, C, R, R]
    featmap: Tensor  # [1, C2, H/2, W/2]
    image: Tensor  # [1, 3, H, W]
    camera: Cameras
    ref: PosedAnchors
    big: PosedAnchors
    lo: Tensor  # [3] canonical box
    hi: Tensor  # [3]
    volume: list[Tensor] | None  # multi-scale 3D features of the body-anchored branch


class HumanNeRF(nn.Module):
    """SHERF-style generalizable human NeRF over a kernel body model (see the module docstring)."""

    def __init__(self, warp: BodyWarp, cfg: NeRFConfig):
        super().__init__()
        self.warp, self.cfg = warp, cfg
        c = cfg
        if c.voxel_mode not in ("submanifold", "dense", "none"):
            raise InputError(f"unknown voxel_mode {c.voxel_mode!r}", "use submanifold, dense or none")
        self.encoder = ImageEncoder(c.enc_channels, c.global_dim)
        self.triplane = TriplaneDecoder(c.global_dim, c.triplane_channels, c.triplane_res)
        pix_dim = c.enc_channels + 3 * (1 + 2 * c.rgb_freqs)
        self.voxel = None if c.voxel_mode == "none" else VoxelNet(
            pix_dim, c.voxel_channels or [16, 32, 32], c.voxel_out, masked=c.voxel_mode == "submanifold")
        vox_dim = 0 if self.voxel is None else c.voxel_out
        self.to_token = nn.Linear(c.triplane_channels + pix_dim + vox_dim, c.token_dim)
        self.attn = TokenAttention(c.token_dim, c.heads)
        xyz_dim = 3 * (1 + 2 * c.xyz_freqs)
        in_dim = c.token_dim + xyz_dim
        self.skip = c.depth // 2
        self.density_layers = nn.ModuleList(
            nn.Linear(in_dim if i == 0 else c.hidden + (in_dim if i == self.skip else 0), c.hidden)
            for i in range(c.depth))
        self.sigma_out = nn.Linear(c.hidden, 1)
        dir_dim = 3 * (1 + 2 * c.dir_freqs)
        self.colour = nn.Sequential(nn.Linear(c.hidden + c.token_dim + dir_dim, c.colour_hidden), nn.SiLU(),
                                    nn.Linear(c.colour_hidden, 3))

    # -------------------------------------------------------------------------------- reference
    def encode(self, ref_rgba: Tensor, camera: Cameras, ref: PosedAnchors, big: PosedAnchors) -> ReferenceCode:
        """Encode a reference RGBA image ``[H, W, 4]`` (premultiplied colour) seen by ``camera``."""
        if ref_rgba.ndim != 3 or ref_rgba.shape[-1] != 4:
            raise InputError(f"reference must be RGBA [H, W, 4], got {tuple(ref_rgba.shape)}",
                             "give an RGBA image or an RGB image with its mask")
        img = torch.cat([ref_rgba[..., :3] * ref_rgba[..., 3:], ref_rgba[..., 3:]], -1).permute(2, 0, 1)[None]
        featmap, g = self.encoder(img)
        planes = self.triplane(g)
        pad = 0.1
        lo, hi = big.vertices.min(0).values - pad, big.vertices.max(0).values + pad
        code = ReferenceCode(planes, featmap, img[:, :3], camera, ref, big, lo, hi, None)
        if self.voxel is not None:
            # Body-anchored features: pixel features of the visible reference vertices, at their canonical spots.
            to_cam = ref.vertices - camera.centers[0]
            visible = (ref.normals * to_cam).sum(-1) < 0
            feats = self._pixel_features(code, ref.vertices[visible])
            code.volume = self.voxel.build(big.vertices[visible], feats, lo, hi, self.cfg.voxel_size)
        return code

    def _pixel_features(self, code: ReferenceCode, points_ref: Tensor) -> Tensor:  # [N, 3] -> [N, C2 + rgb]
        px, _ = code.camera.project(points_ref)  # [1, N, 2]
        W, H = code.camera.width, code.camera.height
        grid = torch.stack([px[..., 0] / W * 2 - 1, px[..., 1] / H * 2 - 1], -1)[:, :, None]  # [1, N, 1, 2]
        f = F.grid_sample(code.featmap, grid, align_corners=False)[0, :, :, 0].T
        rgb = F.grid_sample(code.image, grid, align_corners=False)[0, :, :, 0].T
        return torch.cat([f, positional_encoding(rgb, self.cfg.rgb_freqs)], -1)

    # -------------------------------------------------------------------------------- field
    def field(self, code: ReferenceCode, target: PosedAnchors):
        """``field_fn(points, dirs) -> (rgb, sigma)`` of the person posed as ``target`` (world space)."""
        c = self.cfg

        def field_fn(points: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
            ids, dist = self.warp.nearest(points, target)
            near = dist < c.max_body_dist
            rgb = points.new_zeros(points.shape[0], 3)
            sigma = points.new_zeros(points.shape[0])
            if not bool(near.any()):
                return rgb, sigma + 0 * sum(p.sum() for p in self.sigma_out.parameters())
            p, d, i = points[near], dirs[near], ids[near]
            x_big = self.warp.warp(p, i, target, code.big)
            d_big = self.warp.warp_directions(d, i, target, code.big)
            x_ref = self.warp.warp(x_big, i, code.big, code.ref)
            unit = (x_big - code.lo) / (code.hi - code.lo) * 2 - 1  # [-1, 1] in the canonical box
            tri = sample_triplane(code.planes, unit[None])[0]  # [n, 3, C]
            pix = self._pixel_features(code, x_ref)  # [n, C2 + rgb]
            parts = [pix]
            if code.volume is not None:
                parts.append(self.voxel.query(code.volume, unit))
            shared = torch.cat(parts, -1)[:, None].expand(-1, 3, -1)
            tokens = self.attn(self.to_token(torch.cat([tri, shared], -1)))  # [n, 3, D]
            x_pe = positional_encoding(unit, c.xyz_freqs)
            h0 = torch.cat([tokens[:, 0], x_pe], -1)
            h = h0
            for k, layer in enumerate(self.density_layers):
                if k == self.skip and k > 0:
                    h = torch.cat([h, h0], -1)
                h = F.silu(layer(h))
            s = F.softplus(self.sigma_out(h)[:, 0] - 1.0) * 20.0
            col = torch.sigmoid(self.colour(torch.cat([h, tokens[:, 1], positional_encoding(d_big, c.dir_freqs)], -1)))
            rgb = rgb.index_put((near.nonzero()[:, 0],), col)
            sigma = sigma.index_put((near.nonzero()[:, 0],), s)
            return rgb, sigma

        return field_fn

    def render(self, code: ReferenceCode, target: PosedAnchors, cameras: Cameras, stratified: bool = False,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Premultiplied RGB ``[C, H, W, 3]`` (black background) and alpha ``[C, H, W, 1]`` of ``target``."""
        o, d = generate_rays(cameras)
        C, H, W = len(cameras), cameras.height, cameras.width
        o, d = o.reshape(-1, 3), d.reshape(-1, 3)
        pad = self.cfg.max_body_dist
        lo, hi = target.vertices.min(0).values - pad, target.vertices.max(0).values + pad
        # Slab test against the target body's box: only rays through it are rendered.
        inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
        t0, t1 = (lo - o) * inv, (hi - o) * inv
        tn = torch.minimum(t0, t1).max(-1).values.clamp_min(0.0)
        tf = torch.maximum(t0, t1).min(-1).values
        hit = tf > tn + 1e-4
        rgb = o.new_zeros(o.shape[0], 3)
        alpha = o.new_zeros(o.shape[0], 1)
        if bool(hit.any()):
            out = render_rays(self.field(code, target), o[hit], d[hit], tn[hit], tf[hit],
                              num_samples=self.cfg.num_samples, stratified=stratified, generator=generator)
            idx = hit.nonzero()[:, 0]
            rgb = rgb.index_put((idx,), out.rgb)
            alpha = alpha.index_put((idx,), out.opacity)
        return rgb.reshape(C, H, W, 3), alpha.reshape(C, H, W, 1)
