"""Rotation conversions, written once for the kernel and every method package.

Quaternions are (w, x, y, z) (see :mod:`avatar_core.conventions`) and need not be unit where they are
inputs; axis-angle vectors carry the angle in radians as their norm. Every function is batched over
leading dimensions and differentiable, with series expansions near zero angle so gradients stay
finite at the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def axis_angle_to_matrix(axis_angle: Tensor) -> Tensor:  # [..., 3] -> [..., 3, 3]
    """Rodrigues' formula, with Taylor expansions near zero so gradients stay finite at the rest pose."""
    theta2 = (axis_angle * axis_angle).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
    small = theta2 < 1e-8
    theta = torch.sqrt(theta2.clamp_min(1e-8))
    sin_over = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    one_minus_cos_over = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2.clamp_min(1e-8))
    x, y, z = axis_angle.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(axis_angle.shape + (3,))
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + sin_over * k + one_minus_cos_over * (k @ k)


def axis_angle_to_quaternion(axis_angle: Tensor) -> Tensor:  # [..., 3] -> [..., 4] wxyz
    """Unit quaternion of an axis-angle vector; sin(x/2)/x by its Taylor series near zero for finite gradients."""
    theta2 = (axis_angle * axis_angle).sum(-1, keepdim=True)
    theta = theta2.clamp_min(1e-12).sqrt()
    small = theta2 < 1e-8
    half_sinc = torch.where(small, 0.5 - theta2 / 48.0, torch.sin(0.5 * theta) / theta)
    w = torch.where(small, 1.0 - theta2 / 8.0, torch.cos(0.5 * theta))
    return torch.cat([w, axis_angle * half_sinc], -1)


def quaternion_to_axis_angle(quats: Tensor) -> Tensor:  # [..., 4] wxyz -> [..., 3]
    """Axis-angle of a (not necessarily unit) quaternion, angle in [0, pi]."""
    q = F.normalize(quats, dim=-1)
    q = torch.where(q[..., :1] < 0, -q, q)  # the same rotation with w >= 0: angle <= pi
    xyz = q[..., 1:]
    s = xyz.norm(dim=-1, keepdim=True)
    angle = 2.0 * torch.atan2(s, q[..., :1])
    scale = torch.where(s < 1e-6, 2.0 / q[..., :1].clamp_min(1e-6), angle / s.clamp_min(1e-12))
    return xyz * scale


def quaternion_multiply(a: Tensor, b: Tensor) -> Tensor:  # [..., 4] x [..., 4] -> [..., 4]
    """Hamilton product ``a * b`` (rotation b first, then a)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], -1)


def quaternion_to_matrix(quats: Tensor) -> Tensor:  # [..., 4] wxyz -> [..., 3, 3]
    """Rotation matrix of a (not necessarily unit) quaternion."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).unflatten(-1, (3, 3))


def matrix_to_quaternion(matrix: Tensor) -> Tensor:  # [..., 3, 3] -> [..., 4] wxyz, w >= 0
    """Unit quaternion of a rotation matrix (Shepperd's method: the largest of the four candidates)."""
    m = matrix
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # 4 q_k^2 for k = w, x, y, z; each row below is 4 q_k q and is accurate where q_k is large.
    sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    root = sq.clamp_min(1e-12).sqrt()  # 2 |q_k|
    cand = torch.stack([
        torch.stack([sq[..., 0], m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], sq[..., 1], m[..., 1, 0] + m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] + m[..., 0, 1], sq[..., 2], m[..., 2, 1] + m[..., 1, 2]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 2, 1] + m[..., 1, 2], sq[..., 3]], -1),
    ], -2) / (2.0 * root[..., None])  # [..., 4 candidates, 4]
    best = sq.argmax(-1)
    q = torch.gather(cand, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    q = F.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


def matrix_to_axis_angle(matrix: Tensor) -> Tensor:  # [..., 3, 3] -> [..., 3]
    """Axis-angle of a rotation matrix, angle in [0, pi] (through the quaternion, stable near 0 and pi)."""
    return quaternion_to_axis_angle(matrix_to_quaternion(matrix))


def nearest_rotation(matrix: Tensor) -> Tensor:  # [..., 3, 3] -> [..., 3, 3]
    """The rotation closest to a 3x3 matrix in Frobenius norm (its polar factor, by SVD), det = +1.

    Blended skinning transforms are slightly non-orthonormal; this is the rotation part to apply to
    oriented primitives such as Gaussians.
    """
    u, _, vh = torch.linalg.svd(matrix)
    d = torch.det(u @ vh)
    fix = torch.ones_like(matrix[..., 0])
    fix[..., 2] = torch.sign(d) + (d == 0).to(d.dtype)  # keep det = +1 where the blend flips an axis
    return (u * fix[..., None, :]) @ vh


def rotate_quaternions(rotations: Tensor, quats: Tensor) -> Tensor:  # [..., 3, 3], [..., 4] -> [..., 4]
    """Quaternions ``quats`` (wxyz) rotated by rotation matrices: the quaternion of ``R @ rot(q)``, unit."""
    return quaternion_multiply(matrix_to_quaternion(rotations), F.normalize(quats, dim=-1))


__all__ = [
    "axis_angle_to_matrix",
    "axis_angle_to_quaternion",
    "matrix_to_axis_angle",
    "matrix_to_quaternion",
    "nearest_rotation",
    "quaternion_multiply",
    "quaternion_to_axis_angle",
    "quaternion_to_matrix",
    "rotate_quaternions",
]
