"""Animation, shape editing and texture editing of UV-structured Gaussian avatars (TeRA's driving and editing).

Gaussians are anchored at (triangle, barycentric) locations, so posing re-evaluates their surface points on the
posed triangles (they stay exactly on the posed body) and rotates their canonical offsets by the point's blended
skinning transform (linear blend skinning, as the mesh itself is skinned); each Gaussian's rotation is composed
with the nearest rotation to that blended transform. Changing the body's shape parameters moves the anchors the
same way, so the avatar follows a shape edit. Texture editing rewrites the colour channels of the attribute map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from avatar_core.body import BodyOutput, UVMapper
from avatar_core.body.model import axis_angle_to_matrix, blend_transforms
from avatar_core.cameras import Cameras
from avatar_core.errors import InputError
from tera.uv_gaussians import (
    ATTRIBUTE_SLICES,
    GaussianBatch,
    UVGaussianAvatar,
    matrix_to_quaternion,
    quaternion_multiply,
    resize_mask,
)

#: Names of the built-in motions (:func:`builtin_motion`).
MOTIONS = ("walk", "wave")

# Joint roles for the built-in motions, resolved per body model (Anny's names first, then SMPL-X's).
_ROLES: dict[str, tuple[str, ...]] = {
    "hip.L": ("upperleg01.L", "left_hip"),
    "hip.R": ("upperleg01.R", "right_hip"),
    "knee.L": ("lowerleg01.L", "left_knee"),
    "knee.R": ("lowerleg01.R", "right_knee"),
    "shoulder.L": ("upperarm01.L", "left_shoulder"),
    "shoulder.R": ("upperarm01.R", "right_shoulder"),
    "elbow.L": ("lowerarm01.L", "left_elbow"),
    "elbow.R": ("lowerarm01.R", "right_elbow"),
}


# --------------------------------------------------------------------------------------------------
# Posing
# --------------------------------------------------------------------------------------------------


def nearest_rotation(matrix: Tensor) -> Tensor:  # [..., 3, 3] -> [..., 3, 3]
    """The rotation closest to a (blended, slightly non-orthonormal) 3x3 matrix: the polar factor by SVD."""
    u, _, vh = torch.linalg.svd(matrix)
    d = torch.det(u @ vh)
    fix = torch.ones_like(matrix[..., 0])
    fix[..., 2] = torch.sign(d) + (d == 0).to(d.dtype)  # keep det = +1 where the blend flips an axis
    return (u * fix[..., None, :]) @ vh


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
    rot_q = matrix_to_quaternion(nearest_rotation(linear))
    quats = quaternion_multiply(rot_q, F.normalize(gaussians.quats, dim=-1))
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
# Built-in motions
# --------------------------------------------------------------------------------------------------


def _joint(body, role: str) -> int:
    for name in _ROLES[role]:
        if name in body.joint_names:
            return body.joint_index(name)
    raise InputError(f"{body.name} has none of the joints {_ROLES[role]} that the built-in motions use",
                     "pass your own pose sequence to animate()")


def _rot(axis: str, deg: Tensor) -> Tensor:  # [T] -> [T, 3, 3]
    aa = torch.zeros(deg.shape[0], 3, dtype=torch.float64)
    aa[:, "xyz".index(axis)] = torch.deg2rad(deg)
    return axis_angle_to_matrix(aa)


def _arm_drop_deg(body, side: str) -> float:
    """Angle of the rest upper arm below the horizontal (about 45 for Anny's A-pose, 0 for a T-pose)."""
    joints = body().rest_joints[0].double()
    d = joints[_joint(body, f"elbow.{side}")] - joints[_joint(body, f"shoulder.{side}")]
    return math.degrees(math.atan2(-float(d[1]), abs(float(d[0]))))


def builtin_motion(body, name: str = "walk", num_frames: int = 32) -> Tensor:  # [T, J-1, 3, 3]
    """A short looping motion for demos, as per-joint rotation matrices ``[T, J-1, 3, 3]``.

    ``"walk"``: walking in place (legs swing +-25 degrees about the left-right axis, knees bend on the forward
    swing, arms hang at 70 degrees and swing against the legs). ``"wave"``: the right arm raised to 30 degrees
    above the horizontal, its forearm waving in the frontal plane twice per loop; the left arm hangs.
    Angles are relative to the body's rest pose, measured on its rest joints, so Anny's A-pose and SMPL-X's
    T-pose give the same motion. The last frame flows back into the first.
    """
    if name not in MOTIONS:
        raise InputError(f"unknown motion {name!r}", f"use one of: {', '.join(MOTIONS)}, or pass your own poses")
    if num_frames < 1:
        raise InputError(f"a motion needs at least one frame, got {num_frames}", "pass e.g. num_frames=32")
    J = body.num_joints
    T = num_frames
    phase = 2 * math.pi * torch.arange(T, dtype=torch.float64) / T
    rots = torch.eye(3, dtype=torch.float64).expand(T, J, 3, 3).clone()  # index 0 is the root (unused)
    drop_l, drop_r = _arm_drop_deg(body, "L"), _arm_drop_deg(body, "R")
    zero = torch.zeros(T, dtype=torch.float64)

    def lower(side: str, target_deg: float) -> Tensor:  # rotation taking the arm to target_deg below horizontal
        delta = target_deg - (drop_l if side == "L" else drop_r)
        # About +Z a negative angle lowers the left arm (+X side) and raises the right one.
        return _rot("z", zero + (-delta if side == "L" else delta))

    if name == "walk":
        s = torch.sin(phase)
        # About +X a negative angle swings a hanging limb forward (+Z): the body faces +Z.
        rots[:, _joint(body, "hip.L")] = _rot("x", -25 * s)
        rots[:, _joint(body, "hip.R")] = _rot("x", 25 * s)
        rots[:, _joint(body, "knee.L")] = _rot("x", 30 * s.clamp_min(0))
        rots[:, _joint(body, "knee.R")] = _rot("x", 30 * (-s).clamp_min(0))
        rots[:, _joint(body, "shoulder.L")] = _rot("x", 20 * s) @ lower("L", 70)
        rots[:, _joint(body, "shoulder.R")] = _rot("x", -20 * s) @ lower("R", 70)
        rots[:, _joint(body, "elbow.L")] = _rot("x", zero - 10)
        rots[:, _joint(body, "elbow.R")] = _rot("x", zero - 10)
    else:
        rots[:, _joint(body, "shoulder.R")] = lower("R", -30)
        rots[:, _joint(body, "elbow.R")] = _rot("z", -(40 + 25 * torch.sin(2 * phase)))
        rots[:, _joint(body, "shoulder.L")] = lower("L", 75)
    return rots[:, 1:].to(body.template_vertices)


# --------------------------------------------------------------------------------------------------
# Texture editing
# --------------------------------------------------------------------------------------------------


def region_mask(uv_mapper: UVMapper, region: str | Sequence[str] | Tensor, resolution: int) -> Tensor:  # [R, R]
    """A UV region as a boolean mask at ``resolution``: part names (``UVMapper.part_masks``) or a mask."""
    if isinstance(region, Tensor):
        if region.dim() != 2 or region.shape[0] != region.shape[1]:
            raise InputError(f"a region mask must be square [R, R], got {tuple(region.shape)}", "pass a UV mask")
        return resize_mask(region.bool().cpu(), resolution)
    names = [region] if isinstance(region, str) else list(region)
    parts = uv_mapper.part_masks()
    unknown = [n for n in names if n not in parts]
    if unknown or not names:
        raise InputError(f"unknown body region(s) {unknown or names}", f"use one or more of: {', '.join(parts)}")
    mask = torch.zeros_like(parts[names[0]])
    for n in names:
        mask |= parts[n]
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
    "nearest_rotation",
    "pose_gaussians",
    "region_mask",
    "render_frames",
    "reshape_gaussians",
]
