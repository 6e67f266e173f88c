"""Animation, shape editing and texture editing of UV-structured Gaussian avatars (TeRA's driving and editing).

Gaussians are anchored at (triangle, barycentric) locations, so posing re-evaluates their surface points on the
posed triangles (they stay exactly on the posed body) and rotates their canonical offsets by the point's blended
skinning transform (linear blend skinning, as the mesh itself is skinned); each Gaussian's rotation is composed
with the nearest rotation to that blended transform. Changing the body's shape parameters moves the anchors the
same way, so the avatar follows a shape edit. Texture editing rewrites the colour channels of the attribute map.
Motions (built-in loops, SMPL-X / AMASS sequences) are the kernel's (:mod:`avatar_core.body.motions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from avatar_core.body import BodyOutput, UVMapper
from avatar_core.body.model import blend_transforms
from avatar_core.body.motions import MOTIONS, builtin_motion  # the kernel's motions, for TeRA's callers
from avatar_core.cameras import Cameras
from avatar_core.errors import InputError
from avatar_core.rotations import nearest_rotation, rotate_quaternions
from tera.edit import region_parts
from tera.uv_gaussians import ATTRIBUTE_SLICES, GaussianBatch, UVGaussianAvatar, resize_mask

# --------------------------------------------------------------------------------------------------
# Posing
# --------------------------------------------------------------------------------------------------


def pose_gaussians(avatar: UVGaussianAvatar, gaussians: GaussianBatch, body_output: BodyOutput) -> GaussianBatch:
    """Canonical Gaussians (batch B or 1) -> Gaussians on the posed / reshaped bodies of ``body_output`` (batch T).

    Means: surface point re-evaluated on the posed triangles + offset rotated by the point's blended skinning
    transform. Rotations: composed with the nearest rotation to that transform. Scales, colours and opacities
    are unchanged. One canonical avatar against T bodies gives T frames.
    """
    T = body_output.vertices.shape[0]
    B = len(gaussians)
    if B not in (1, T) and T != 1:
        raise InputError(f"{B} avatars but {T} posed bodies", "pose one avatar over T frames, or B avatars with B bodies")
    surf = avatar.surface_points(body_output.vertices)  # [T, N, 3]
    linear = blend_transforms(avatar.skin_weights, body_output.transforms)[..., :3]  # [T, N, 3, 3]
    dt = gaussians.means.dtype
    linear = linear.to(dt)
    means = surf.to(dt) + (linear @ gaussians.offsets[..., None])[..., 0]
    quats = rotate_quaternions(nearest_rotation(linear), gaussians.quats)
    n = means.shape[0]
    expand = lambda t: t.expand(n, *t.shape[1:])  # noqa: E731
    return GaussianBatch(means, quats, expand(gaussians.scales), expand(gaussians.opacities),
                         expand(gaussians.colors), expand(gaussians.offsets))


def animate(
    avatar: UVGaussianAvatar,
    gaussians: GaussianBatch,
    poses: Tensor,  # [T, J-1, 3] axis-angle or [T, J-1, 3, 3]
    shape: Tensor | None = None,  # [shape_dim] or [1, shape_dim]
    global_orient: Tensor | None = None,  # [T, 3]
    transl: Tensor | None = None,  # [T, 3]
) -> GaussianBatch:
    """One canonical avatar (B = 1) posed by a pose sequence: T frames of Gaussians (any pose sequence)."""
    if len(gaussians) != 1:
        raise InputError(f"animate poses one avatar, got a batch of {len(gaussians)}", "select one with gaussians[i]")
    body = avatar.body
    if shape is not None and shape.dim() == 1:
        shape = shape[None]
    out = body(shape=shape, pose=poses, global_orient=global_orient, transl=transl)
    return pose_gaussians(avatar, gaussians, out)


def reshape_gaussians(avatar: UVGaussianAvatar, gaussians: GaussianBatch, shape: Tensor) -> GaussianBatch:
    """Shape editing: the avatar on the body of new shape parameters ``[B|1, shape_dim]``, rest pose."""
    if shape.dim() == 1:
        shape = shape[None]
    return pose_gaussians(avatar, gaussians, avatar.body(shape=shape))


def render_frames(
    avatar: UVGaussianAvatar,
    frames: GaussianBatch,  # T frames
    cameras: Cameras,  # 1 camera for every frame, or T cameras (one each)
    background: Sequence[float] = (1.0, 1.0, 1.0),
) -> Tensor:  # [T, H, W, 3]
    """Render an animation: one image per frame (for clips through avatar_core.io.write_video)."""
    T = len(frames)
    if len(cameras) not in (1, T):
        raise InputError(f"{len(cameras)} cameras for {T} frames", "pass one camera, or one per frame")
    images = []
    with torch.no_grad():
        for t in range(T):
            cam = cameras[0] if len(cameras) == 1 else cameras[t]
            rgb, _ = avatar.render(frames[t], cam, background)
            images.append(rgb[0, 0])
    return torch.stack(images)


# --------------------------------------------------------------------------------------------------
# Texture editing
# --------------------------------------------------------------------------------------------------


def region_mask(uv_mapper: UVMapper, region: str | Sequence[str] | Tensor, resolution: int) -> Tensor:  # [R, R]
    """A UV region as a boolean mask at ``resolution``: region names (body parts or try-on regions, parsed by
    :func:`tera.edit.region_parts`, e.g. ``"upper_clothes+shoes"``) or a square mask."""
    if isinstance(region, Tensor):
        if region.dim() != 2 or region.shape[0] != region.shape[1]:
            raise InputError(f"a region mask must be square [R, R], got {tuple(region.shape)}", "pass a UV mask")
        return resize_mask(region.bool().cpu(), resolution)
    masks = uv_mapper.part_masks()
    mask = torch.stack([masks[p].bool() for p in region_parts(region)]).any(0)
    return resize_mask(mask, resolution)


def edit_texture(
    maps: Tensor,  # [B, 13, R, R]
    uv_mapper: UVMapper,
    region: str | Sequence[str] | Tensor | None = None,
    color: Sequence[float] | Tensor | None = None,  # RGB in [0, 1]
    texture: Tensor | None = None,  # [H, W, 3] UV image in [0, 1], row 0 = top
    strength: float = 1.0,
) -> Tensor:  # [B, 13, R, R]
    """Texture editing: recolour (``color``) or re-texture (``texture``) the colour map inside a UV region.

    ``region`` None edits the whole map. ``strength`` in [0, 1] blends with the old colours (1 replaces).
    Geometry channels are left untouched, so the avatar's shape does not move.
    """
    if (color is None) == (texture is None):
        raise InputError("edit_texture needs exactly one of color= or texture=", "pass an RGB colour or a UV image")
    R = maps.shape[-1]
    rgb = maps[:, ATTRIBUTE_SLICES["rgb"]]
    if color is not None:
        new = torch.as_tensor(color, dtype=maps.dtype, device=maps.device).reshape(1, 3, 1, 1).expand_as(rgb)
    else:
        if texture.dim() != 3 or texture.shape[-1] != 3:
            raise InputError(f"texture must be [H, W, 3], got {tuple(texture.shape)}", "pass an RGB UV image")
        new = F.interpolate(texture.permute(2, 0, 1)[None].to(maps), size=(R, R), mode="bilinear",
                            align_corners=False, antialias=True).clamp(0, 1).expand_as(rgb)
    if not (0.0 <= strength <= 1.0):
        raise InputError(f"strength must be in [0, 1], got {strength}", "1 replaces the colours, 0 keeps them")
    if region is None:
        weight = torch.ones(1, 1, R, R, dtype=maps.dtype, device=maps.device)
    else:
        weight = region_mask(uv_mapper, region, R).to(maps)[None, None]
    weight = weight * strength
    out = maps.clone()
    out[:, ATTRIBUTE_SLICES["rgb"]] = rgb * (1 - weight) + new * weight
    return out


__all__ = [
    "MOTIONS",
    "animate",
    "builtin_motion",
    "edit_texture",
    "pose_gaussians",
    "region_mask",
    "render_frames",
    "reshape_gaussians",
]
