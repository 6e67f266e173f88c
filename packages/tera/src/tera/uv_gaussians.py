"""UV-structured Gaussians: attribute maps in the body's UV space -> 3D Gaussians on the body (TeRA / IDOL).

TeRA represents an avatar as Gaussians anchored on the body surface whose attributes live in multi-channel
maps in the body's UV space, following IDOL's parameterisation (yiyuzhuang/IDOL, commit 69b6df7). The 13 channels of
an *attribute map* hold already-activated values, in this order (:data:`ATTRIBUTE_SLICES`):

====================  ========  ==========================================================================
channels              range     meaning
====================  ========  ==========================================================================
0:3   ``offset``      metres    displacement of the Gaussian from its surface point, canonical frame
3:6   ``rgb``         [0, 1]    colour
6:9   ``radius``      [0, 1]    scale = (radius + 1) * knn distance of the point on the template
9:12  ``rotation``    [0, 1]    axis-angle = (rotation - 0.5) * pi
12    ``opacity``     [0, 1]    opacity (IDOL keeps Gaussians opaque: its decoder writes ones)
====================  ========  ==========================================================================

A fixed set of UV points (paper ~100K; :meth:`avatar_core.body.UVMapper.sample_points`) reads the maps by
bilinear ``grid_sample`` with border padding. UV follows the kernel's convention (v = 0 at the bottom, map
row 0 at the top, :mod:`avatar_core.conventions`), so ``grid_sample``'s ``y = -1`` (row 0) is ``v = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatar_core.body import BodyModel, UVMapper
from avatar_core.cameras import Cameras
from avatar_core.errors import InputError
from avatar_core.render.gaussians import rasterize_gaussians
from avatar_core.rotations import (  # wxyz quaternions; re-exported for TeRA's callers
    axis_angle_to_quaternion,
    matrix_to_quaternion,
    quaternion_multiply,
    quaternion_to_axis_angle,
    quaternion_to_matrix,
)

#: Channel ranges of the 13-channel attribute map (IDOL's parameterisation).
ATTRIBUTE_SLICES: dict[str, slice] = {
    "offset": slice(0, 3),
    "rgb": slice(3, 6),
    "radius": slice(6, 9),
    "rotation": slice(9, 12),
    "opacity": slice(12, 13),
}
NUM_ATTRIBUTES = 13


# --------------------------------------------------------------------------------------------------
# Gaussians
# --------------------------------------------------------------------------------------------------


@dataclass
class GaussianBatch:
    """A batch of B avatars of N Gaussians each (activated values, ready for rasterisation)."""

    means: Tensor  # [B, N, 3]
    quats: Tensor  # [B, N, 4] wxyz
    scales: Tensor  # [B, N, 3]
    opacities: Tensor  # [B, N]
    colors: Tensor  # [B, N, 3] RGB in [0, 1] ([B, C, N, 3]: per camera, see :func:`lit`)
    offsets: Tensor  # [B, N, 3] canonical-frame offsets from the surface (for the offset regulariser)

    def __len__(self) -> int:
        return self.means.shape[0]

    def __getitem__(self, index: int | slice) -> GaussianBatch:
        """Sub-batch; an integer keeps the batch dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return GaussianBatch(*(getattr(self, f.name)[index] for f in fields(self)))

    def detach(self) -> GaussianBatch:
        return GaussianBatch(*(getattr(self, f.name).detach() for f in fields(self)))

    def save_ply(self, path: str | Path, index: int = 0) -> Path:
        """Write avatar ``index`` as a standard 3DGS PLY (opens in splat viewers)."""
        from avatar_core.io import save_ply

        return save_ply(path, self.means[index], self.quats[index], self.scales[index],
                        self.opacities[index], colors=self.colors[index])


def uv_to_grid(uv: Tensor) -> Tensor:  # [N, 2] -> [N, 2]
    """``grid_sample`` coordinates (x, y) in [-1, 1] of UV points: x = 2u - 1, y = 1 - 2v (row 0 is v = 1)."""
    return torch.stack([2.0 * uv[..., 0] - 1.0, 1.0 - 2.0 * uv[..., 1]], -1)


def sample_maps(maps: Tensor, uv: Tensor) -> Tensor:  # [B, A, R, R], [N, 2] -> [B, N, A]
    """Bilinear values of UV maps at UV points, border padding (IDOL's grid_sample), texel centres exact."""
    if maps.dim() != 4:
        raise InputError(f"UV maps must be [B, C, R, R], got shape {tuple(maps.shape)}", "add a batch dimension")
    grid = uv_to_grid(uv).to(maps)[None, None].expand(maps.shape[0], 1, -1, 2)  # [B, 1, N, 2]
    out = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, 0].transpose(1, 2)


def splat_to_maps(values: Tensor, uv: Tensor, resolution: int, fill: bool = True) -> Tensor:
    """Per-point values ``[B, N, C]`` -> UV maps ``[B, C, R, R]``: the normalised adjoint of bilinear sampling.

    Each texel gets the bilinear-weighted mean of the points around it; with ``fill`` texels that no point
    reaches take their nearest reached texel's value (so border padding and later sampling stay sensible).
    """
    B, N, C = values.shape
    R = resolution
    x = uv[:, 0].to(values) * R - 0.5  # continuous column, texel centres at integers
    y = (1.0 - uv[:, 1].to(values)) * R - 0.5
    x0, y0 = x.floor(), y.floor()
    acc = values.new_zeros(B, R * R, C)
    wsum = values.new_zeros(R * R)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            w = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
            inside = (xi >= 0) & (xi < R) & (yi >= 0) & (yi < R)
            w = torch.where(inside, w, torch.zeros_like(w))
            idx = (yi.clamp(0, R - 1) * R + xi.clamp(0, R - 1)).long()
            acc = acc.index_add(1, idx, values * w[None, :, None])
            wsum = wsum.index_add(0, idx, w)
    reached = wsum > 1e-6
    out = acc / wsum.clamp_min(1e-6)[None, :, None]
    if fill and not bool(reached.all()) and bool(reached.any()):
        from scipy.ndimage import distance_transform_edt

        _, (ii, jj) = distance_transform_edt(~reached.reshape(R, R).cpu().numpy(), return_indices=True)
        nearest = torch.as_tensor(ii * R + jj, device=values.device).flatten()
        out = out[:, nearest]
    return out.reshape(B, R, R, C).permute(0, 3, 1, 2)


def knn_distance(points: Tensor, k: int = 3) -> Tensor:  # [N, 3] -> [N]
    """Mean distance of every point to its k nearest other points (scipy cKDTree), the Gaussians' base scale."""
    from scipy.spatial import cKDTree

    p = points.detach().cpu().double().numpy()
    k = min(k, len(p) - 1)
    if k < 1:
        raise InputError("knn distance needs at least two points", "sample more UV points")
    dist, _ = cKDTree(p).query(p, k=k + 1)
    d = torch.as_tensor(dist[:, 1:].mean(1), dtype=points.dtype, device=points.device)
    return d.clamp_min(1e-6)  # coincident samples would give zero-size Gaussians


def default_attributes(
    batch: int = 1,
    resolution: int = 64,
    rgb: Sequence[float] | Tensor = (0.5, 0.5, 0.5),
    radius: float = 0.5,
    opacity: float = 1.0,
) -> Tensor:  # [B, 13, R, R]
    """Constant attribute maps: zero offset, one colour, isotropic radius, identity rotation (0.5), opacity."""
    maps = torch.zeros(batch, NUM_ATTRIBUTES, resolution, resolution)
    maps[:, ATTRIBUTE_SLICES["rgb"]] = torch.as_tensor(rgb, dtype=maps.dtype).reshape(1, 3, 1, 1)
    maps[:, ATTRIBUTE_SLICES["radius"]] = radius
    maps[:, ATTRIBUTE_SLICES["rotation"]] = 0.5
    maps[:, ATTRIBUTE_SLICES["opacity"]] = opacity
    return maps


def attributes_from_texture(
    texture: Tensor,  # [H, W, 3] / [B, H, W, 3] in [0, 1], row 0 = top (v = 1)
    resolution: int | None = None,
    radius: float = 0.5,
    opacity: float = 1.0,
) -> Tensor:  # [B, 13, R, R]
    """Attribute maps whose colour is a UV texture image (resized bilinearly) on the bare body surface."""
    if texture.dim() == 3:
        texture = texture[None]
    if texture.dim() != 4 or texture.shape[-1] != 3:
        raise InputError(f"a UV texture must be [H, W, 3] or [B, H, W, 3], got {tuple(texture.shape)}",
                         "pass an RGB image in [0, 1], channels last")
    rgb = texture.permute(0, 3, 1, 2).float()
    R = resolution or rgb.shape[-1]
    if rgb.shape[-2:] != (R, R):
        rgb = F.interpolate(rgb, size=(R, R), mode="bilinear", align_corners=False, antialias=True)
    maps = default_attributes(rgb.shape[0], R, radius=radius, opacity=opacity).to(rgb)
    maps[:, ATTRIBUTE_SLICES["rgb"]] = rgb.clamp(0, 1)
    return maps


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(math.gcd(8, channels), channels)


class UVDecoder(nn.Module):
    """IDOL's UV decoder: UV features ``[B, 32, R, R]`` -> attribute maps ``[B, 13, R, R]`` (yiyuzhuang/IDOL, 69b6df7).

    The channels split into geometry (first ``geometry_channels``) and texture (the rest). Geometry:
    conv3x3 -> ``geometry_hidden`` + BatchNorm + SiLU, then a 1x1 offset head whose weights start at
    U(+-``offset_init``) (bias 0), so offsets are ~0 at initialisation. Texture: conv3x3 -> ``texture_hidden``
    + BatchNorm + SiLU, then 1x1 -> 9 with a sigmoid: rgb, radius, rotation. Opacity is 1 (IDOL's Gaussians
    are opaque).

    Args:
        in_channels: feature channels (IDOL 32).
        geometry_channels: how many of them feed the geometry branch (IDOL 16; the texture branch gets the rest).
        geometry_hidden: geometry branch width (IDOL 64).
        texture_hidden: texture branch width (IDOL 128).
        offset_init: half-width of the offset head's uniform weight initialisation (IDOL 1e-5).
        norm: ``"batch"`` (IDOL's BatchNorm) or ``"group"`` (GroupNorm, 8 groups: per-avatar statistics, so
            training and inference behave the same when avatars are decoded one at a time).
    """

    def __init__(
        self,
        in_channels: int = 32,
        geometry_channels: int = 16,
        geometry_hidden: int = 64,
        texture_hidden: int = 128,
        offset_init: float = 1e-5,
        norm: str = "batch",
    ):
        super().__init__()
        if norm not in ("batch", "group"):
            raise InputError(f"unknown norm {norm!r}", "use 'batch' (IDOL) or 'group'")
        if not 0 < geometry_channels < in_channels:
            raise InputError(f"geometry_channels must be in (0, {in_channels}), got {geometry_channels}",
                             "IDOL splits 32 channels 16 / 16")
        self.in_channels = in_channels
        self.geometry_channels = geometry_channels
        tex_in = in_channels - geometry_channels
        self.geometry = nn.Sequential(
            nn.Conv2d(geometry_channels, geometry_hidden, 3, padding=1), _norm(norm, geometry_hidden), nn.SiLU())
        self.offset_head = nn.Conv2d(geometry_hidden, 3, 1)
        self.texture = nn.Sequential(
            nn.Conv2d(tex_in, texture_hidden, 3, padding=1), _norm(norm, texture_hidden), nn.SiLU())
        self.texture_head = nn.Conv2d(texture_hidden, 9, 1)
        nn.init.uniform_(self.offset_head.weight, -offset_init, offset_init)
        nn.init.zeros_(self.offset_head.bias)

    def forward(self, features: Tensor) -> Tensor:  # [B, C, R, R] -> [B, 13, R, R]
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise InputError(f"UV features must be [B, {self.in_channels}, R, R], got {tuple(features.shape)}",
                             "check the teacher features' channel count")
        g, t = features.split([self.geometry_channels, self.in_channels - self.geometry_channels], 1)
        offset = self.offset_head(self.geometry(g))
        tex = torch.sigmoid(self.texture_head(self.texture(t)))
        opacity = torch.ones_like(offset[:, :1])
        return torch.cat([offset, tex, opacity], 1)


class UVGaussianAvatar(nn.Module):
    """Attribute maps ``[B, 13, R, R]`` -> Gaussians at fixed UV points on the body (TeRA / IDOL).

    Args:
        body: the body model (Anny by default in the toolkit; SMPL-X in the paper).
        num_points: Gaussians per avatar, sampled uniformly over the UV layout (paper ~100_000; tiny 5_000-20_000),
            or ``"texels"`` for one point per valid texel of ``uv_mapper``.
        seed: fixes the point set, so avatars saved with one seed decode the same way later.
        knn_k: neighbours averaged for the per-point base scale (3, as 3DGS initialises scales).
        uv_mapper: the body's rasterised UV layout; built at resolution 64 when None (only ``"texels"`` and
            texture editing depend on its resolution).
    """

    def __init__(
        self,
        body: BodyModel,
        num_points: int | str = 100_000,
        seed: int = 0,
        knn_k: int = 3,
        uv_mapper: UVMapper | None = None,
    ):
        super().__init__()
        self.body = body
        self.uv_mapper = uv_mapper if uv_mapper is not None else UVMapper(body, 64)
        self.seed = seed
        self.knn_k = knn_k
        self.layout = num_points if isinstance(num_points, str) else int(num_points)
        face_idx, bary, uv = self.uv_mapper.sample_points(num_points, seed)
        dtype = body.template_vertices.dtype
        self.register_buffer("face_idx", face_idx.long(), persistent=False)  # [N]
        self.register_buffer("bary", bary.to(dtype), persistent=False)  # [N, 3]
        self.register_buffer("uv", uv.to(dtype), persistent=False)  # [N, 2]
        template = body.points_on_surface(body.template_vertices[None], face_idx, bary)[0]
        self.register_buffer("template_points", template, persistent=False)  # [N, 3]
        self.register_buffer("knn", knn_distance(template, knn_k), persistent=False)  # [N]
        self.register_buffer("skin_weights", body.surface_skinning_weights(face_idx, bary).to(dtype),
                             persistent=False)  # [N, J]

    @property
    def num_points(self) -> int:
        return self.face_idx.shape[0]

    def spec(self) -> dict:
        """What fixes the point set (store it with saved maps; a mismatch means another avatar layout)."""
        spec = {"body": self.body.name, "points": self.layout, "seed": self.seed, "knn_k": self.knn_k}
        if self.layout == "texels":
            spec["uv_resolution"] = self.uv_mapper.resolution
        return spec

    # ---- surface ---------------------------------------------------------------------------------

    def surface_points(self, vertices: Tensor) -> Tensor:  # [B, V, 3] -> [B, N, 3]
        """The UV points on (posed or reshaped) meshes: barycentric re-evaluation, exactly on the surface."""
        return self.body.points_on_surface(vertices, self.face_idx, self.bary)

    def surface_normals(self, vertices: Tensor) -> Tensor:  # [B, V, 3] -> [B, N, 3]
        """Unit normals of (posed or reshaped) meshes at the UV points: vertex normals, barycentrically blended."""
        normals = self.body.vertex_normals(vertices)
        return F.normalize(self.body.points_on_surface(normals, self.face_idx, self.bary), dim=-1)

    def rest_points(self, shape: Tensor | None = None) -> Tensor:  # -> [B, N, 3]
        """The UV points on the canonical (unposed) body of the given shape parameters (None: the template)."""
        if shape is None:
            return self.template_points[None]
        out = self.body(shape=shape)
        return self.surface_points(out.vertices)

    # ---- maps <-> Gaussians ---------------------------------------------------------------------

    def sample(self, maps: Tensor) -> Tensor:  # [B, 13, R, R] -> [B, N, 13]
        """Per-Gaussian attributes read from the attribute maps at the points' UVs."""
        if maps.dim() != 4 or maps.shape[1] != NUM_ATTRIBUTES:
            raise InputError(f"attribute maps must be [B, {NUM_ATTRIBUTES}, R, R], got {tuple(maps.shape)}",
                             "decode UV features with a UVDecoder / DistillationDecoder first")
        return sample_maps(maps, self.uv)

    def decode_points(self, attributes: Tensor, base_points: Tensor) -> GaussianBatch:
        """Per-point attributes ``[B, N, 13]`` on surface points ``[B|1, N, 3]`` -> canonical Gaussians (IDOL)."""
        a = attributes
        offsets = a[..., ATTRIBUTE_SLICES["offset"]]
        means = base_points.to(a) + offsets
        scales = (a[..., ATTRIBUTE_SLICES["radius"]] + 1.0) * self.knn.to(a)[None, :, None]
        quats = axis_angle_to_quaternion((a[..., ATTRIBUTE_SLICES["rotation"]] - 0.5) * math.pi)
        opacities = a[..., ATTRIBUTE_SLICES["opacity"]][..., 0]
        colors = a[..., ATTRIBUTE_SLICES["rgb"]]
        return GaussianBatch(means, quats, scales, opacities, colors, offsets)

    def forward(self, maps: Tensor, shape: Tensor | None = None) -> GaussianBatch:
        """Canonical Gaussians of attribute maps ``[B, 13, R, R]`` on the body of ``shape`` (None: template)."""
        return self.decode_points(self.sample(maps), self.rest_points(shape))

    def attributes_from_gaussians(self, gaussians: GaussianBatch, base_points: Tensor | None = None) -> Tensor:
        """The inverse of :meth:`decode_points` for canonical Gaussians: ``[B, N, 13]`` attributes.

        Exact while the activations are in range (radius in [0, 1], rotation angle below pi / 2 per axis).
        """
        base = self.template_points[None] if base_points is None else base_points
        rgb = gaussians.colors
        radius = gaussians.scales / self.knn.to(rgb)[None, :, None] - 1.0
        rotation = quaternion_to_axis_angle(gaussians.quats) / math.pi + 0.5
        offset = gaussians.means - base.to(rgb)
        return torch.cat([offset, rgb, radius, rotation, gaussians.opacities[..., None]], -1)

    def maps_from_points(self, attributes: Tensor, resolution: int) -> Tensor:  # [B, N, C] -> [B, C, R, R]
        """Per-point attributes splatted back into UV maps (see :func:`splat_to_maps`)."""
        return splat_to_maps(attributes, self.uv, resolution)

    # ---- rendering -------------------------------------------------------------------------------

    def render(
        self,
        gaussians: GaussianBatch,
        cameras: Cameras | Sequence[Cameras],
        background: Sequence[float] | Tensor = (1.0, 1.0, 1.0),
        backend: str = "auto",
    ) -> tuple[Tensor, Tensor]:
        """RGB ``[B, C, H, W, 3]`` and alpha ``[B, C, H, W, 1]`` of every avatar in every camera.

        ``cameras`` is one batch of C cameras shared by all avatars, or one Cameras per avatar (same C, size).
        """
        B = len(gaussians)
        cams = [cameras] * B if isinstance(cameras, Cameras) else list(cameras)
        if len(cams) != B:
            raise InputError(f"{len(cams)} camera batches for {B} avatars", "give one Cameras per avatar, or one for all")
        rgbs, alphas = [], []
        for b, cam in enumerate(cams):
            dt, dev = gaussians.means.dtype, gaussians.means.device
            cam = cam.to(dev, dt)
            bg = torch.as_tensor(background, dtype=dt, device=dev).reshape(1, 3).expand(len(cam), 3)
            rgb, alpha, _ = rasterize_gaussians(
                gaussians.means[b], gaussians.quats[b], gaussians.scales[b], gaussians.opacities[b],
                gaussians.colors[b], cam.viewmats, cam.Ks, cam.width, cam.height,
                backgrounds=bg.contiguous(), backend=backend,
            )
            rgbs.append(rgb)
            alphas.append(alpha)
        return torch.stack(rgbs), torch.stack(alphas)

    def render_maps(
        self,
        maps: Tensor,  # [B, 13, R, R]
        cameras: Cameras | Sequence[Cameras],
        background: Sequence[float] | Tensor = (1.0, 1.0, 1.0),
    ) -> tuple[Tensor, Tensor, GaussianBatch]:
        """Attribute maps -> canonical Gaussians -> images: ``(rgb [B,C,H,W,3], alpha [B,C,H,W,1], gaussians)``."""
        g = self(maps)
        rgb, alpha = self.render(g, cameras, background)
        return rgb, alpha, g


def lit(gaussians: GaussianBatch, normals: Tensor, viewmats: Tensor, ambient: float) -> GaussianBatch:
    """Gaussians whose colours (an albedo) are lit in each of C cameras by the dataset's light rig
    (:func:`avatar_core.render.lighting.lambert_shading` of the surface ``normals`` ``[B, N, 3]`` under them):
    colours ``[B, C, N, 3]``, which :meth:`UVGaussianAvatar.render` rasterises camera by camera."""
    from avatar_core.render.lighting import lambert_shading

    if gaussians.colors.dim() != 3:
        raise InputError(f"expected unlit colours [B, N, 3], got {tuple(gaussians.colors.shape)}",
                         "light the Gaussians once, right before rendering")
    shade = lambert_shading(normals.to(gaussians.colors), viewmats, ambient)  # [B, C, N]
    return GaussianBatch(gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities,
                         gaussians.colors[:, None] * shade[..., None], gaussians.offsets)


def composite(images: Tensor, background: Sequence[float] | Tensor = (1.0, 1.0, 1.0)) -> Tensor:
    """RGBA ``[..., H, W, 4]`` over a constant background -> RGB ``[..., H, W, 3]`` (targets for render losses)."""
    if images.shape[-1] == 3:
        return images
    if images.shape[-1] != 4:
        raise InputError(f"images must be RGB or RGBA channels-last, got {tuple(images.shape)}",
                         "pass [V, H, W, 4] views in [0, 1]")
    bg = torch.as_tensor(background, dtype=images.dtype, device=images.device)
    a = images[..., 3:]
    return images[..., :3] * a + bg * (1 - a)


def resize_mask(mask: Tensor, resolution: int) -> Tensor:  # [R0, R0] bool -> [R, R] bool
    """A UV mask at another resolution (nearest texel centre), e.g. part masks for a map or latent."""
    if mask.shape[-1] == resolution:
        return mask.bool()
    m = F.interpolate(mask[None, None].float(), size=(resolution, resolution), mode="nearest")
    return m[0, 0] > 0.5


__all__ = [
    "ATTRIBUTE_SLICES",
    "NUM_ATTRIBUTES",
    "GaussianBatch",
    "UVDecoder",
    "UVGaussianAvatar",
    "attributes_from_texture",
    "axis_angle_to_quaternion",
    "composite",
    "default_attributes",
    "knn_distance",
    "lit",
    "matrix_to_quaternion",
    "quaternion_multiply",
    "quaternion_to_axis_angle",
    "quaternion_to_matrix",
    "resize_mask",
    "sample_maps",
    "splat_to_maps",
    "uv_to_grid",
]
