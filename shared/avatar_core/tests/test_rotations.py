"""avatar_core.rotations against scipy's Rotation (scalar-last quaternions) and scipy.linalg.polar."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.linalg import polar
from scipy.spatial.transform import Rotation

from avatar_core import rotations as R


def _rotvecs(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    aa = torch.randn(n, 3, generator=g, dtype=torch.float64)
    aa = aa / aa.norm(dim=-1, keepdim=True) * torch.rand(n, 1, generator=g, dtype=torch.float64) * 3.1
    aa[0] = 0.0  # the identity
    aa[1] = torch.tensor([1e-5, -2e-5, 0.0])  # near it
    aa[2] = torch.tensor([math.pi - 1e-3, 0.0, 0.0])  # near pi, where w ~ 0
    return aa


def _wxyz(xyzw: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.concatenate([xyzw[:, 3:], xyzw[:, :3]], 1))


def test_conversions_match_scipy():
    aa = _rotvecs()
    ref = Rotation.from_rotvec(aa.numpy())
    torch.testing.assert_close(R.axis_angle_to_matrix(aa), torch.as_tensor(ref.as_matrix()), atol=1e-12, rtol=0)
    q_ref = _wxyz(ref.as_quat())
    q_ref = torch.where(q_ref[:, :1] < 0, -q_ref, q_ref)
    torch.testing.assert_close(R.axis_angle_to_quaternion(aa), q_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(R.matrix_to_quaternion(torch.as_tensor(ref.as_matrix())), q_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(R.quaternion_to_matrix(3.0 * q_ref), torch.as_tensor(ref.as_matrix()), atol=1e-12, rtol=0)
    torch.testing.assert_close(R.quaternion_to_axis_angle(q_ref), aa, atol=1e-9, rtol=0)
    torch.testing.assert_close(R.matrix_to_axis_angle(R.axis_angle_to_matrix(aa)), aa, atol=1e-9, rtol=0)


def test_products_match_scipy():
    a, b = Rotation.from_rotvec(_rotvecs(seed=1).numpy()), Rotation.from_rotvec(_rotvecs(seed=2).numpy())
    prod = R.quaternion_multiply(_wxyz(a.as_quat()), _wxyz(b.as_quat()))
    torch.testing.assert_close(R.quaternion_to_matrix(prod), torch.as_tensor((a * b).as_matrix()), atol=1e-12, rtol=0)
    rotated = R.rotate_quaternions(torch.as_tensor(a.as_matrix()), 2.0 * _wxyz(b.as_quat()))
    torch.testing.assert_close(rotated.norm(dim=-1), torch.ones(len(rotated), dtype=torch.float64))
    torch.testing.assert_close(R.quaternion_to_matrix(rotated), torch.as_tensor((a * b).as_matrix()), atol=1e-12, rtol=0)


def test_nearest_rotation_is_the_polar_factor():
    g = torch.Generator().manual_seed(3)
    m = R.axis_angle_to_matrix(_rotvecs(seed=3)) + 0.2 * torch.randn(64, 3, 3, generator=g, dtype=torch.float64)
    ours = R.nearest_rotation(m)
    ref = torch.stack([torch.as_tensor(polar(x)[0]) for x in m.numpy()])
    pos = torch.det(ref) > 0  # polar's factor is orthogonal; where it reflects, ours keeps det = +1
    assert pos.sum() > 50
    torch.testing.assert_close(ours[pos], ref[pos], atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.det(ours), torch.ones(64, dtype=torch.float64))


def test_gradients_are_finite_at_the_identity():
    aa = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    (R.axis_angle_to_matrix(aa).sum() + R.axis_angle_to_quaternion(aa).sum()).backward()
    assert torch.isfinite(aa.grad).all()
