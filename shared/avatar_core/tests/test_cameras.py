"""Cameras: look-at geometry, OpenGL/OpenCV conversion, orbits, random views and rays."""

import math

import pytest
import torch

from avatar_core.cameras import (
    Cameras,
    intrinsics_from_fov,
    look_at,
    orbit_cameras,
    random_cameras,
    spherical_coordinates,
)
from avatar_core.conventions import OPENGL_TO_OPENCV
from avatar_core.errors import InputError
from avatar_core.render.rays import generate_rays, sample_pixels


def _random_rotation(g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def test_look_at_centres_target_in_front_and_up_is_image_top():
    g = torch.Generator().manual_seed(0)
    eye = torch.randn(16, 3, generator=g, dtype=torch.float64) * 3
    target = torch.randn(16, 3, generator=g, dtype=torch.float64) * 0.3
    cams = Cameras.look_at(eye, target, fov_y_deg=50, width=96, height=64)
    uv, depth = cams.project(target[:, None])
    torch.testing.assert_close(uv[:, 0], torch.tensor([48.0, 32.0], dtype=torch.float64).expand(16, 2))
    torch.testing.assert_close(depth[:, 0], (eye - target).norm(dim=-1))
    assert bool((depth > 0).all())
    # World +Y (up) appears towards the top of the image (smaller row), unless the view is nearly vertical.
    uv_up, _ = cams.project((target + torch.tensor([0.0, 0.05, 0.0], dtype=torch.float64))[:, None])
    vertical = ((target - eye) / (target - eye).norm(dim=-1, keepdim=True))[:, 1].abs() > 0.99
    assert bool((uv_up[~vertical, 0, 1] < 32).all())
    # Rotation part is orthonormal with determinant +1 (right-handed OpenCV frame).
    R = cams.viewmats[:, :3, :3]
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(16, 3, 3))
    torch.testing.assert_close(torch.det(R), torch.ones(16, dtype=torch.float64))
    # Straight above: well defined, continues the frontal orbit (image top towards -Z).
    top = look_at(torch.tensor([0.0, 3.0, 0.0]))
    cam_top = Cameras.from_fov(top, 40, 64, 64)
    uv_back, depth_top = cam_top.project(torch.tensor([[0.0, 0.0, -0.2]]))
    assert depth_top.item() > 0 and uv_back[0, 0, 1] < 32


def test_opengl_round_trip_and_axis_flip():
    g = torch.Generator().manual_seed(1)
    c2w_gl = torch.eye(4, dtype=torch.float64).repeat(5, 1, 1)
    for i in range(5):
        c2w_gl[i, :3, :3] = _random_rotation(g)
        c2w_gl[i, :3, 3] = torch.randn(3, generator=g, dtype=torch.float64)
    Ks = intrinsics_from_fov(45.0, 80, 60).to(torch.float64)
    cams = Cameras.from_opengl_c2w(c2w_gl, Ks, 80, 60)
    torch.testing.assert_close(cams.to_opengl(), c2w_gl)
    torch.testing.assert_close(cams.centers, c2w_gl[:, :3, 3])
    # An OpenGL camera looks down its -Z axis with +Y up: a point 2 units ahead is at the image centre,
    # 2 units deep, and a point along its +Y shows above the centre.
    ahead = c2w_gl[:, :3, 3] - 2 * c2w_gl[:, :3, 2]
    up = ahead + 0.1 * c2w_gl[:, :3, 1]
    uv, depth = cams.project(torch.stack([ahead, up], dim=1))
    torch.testing.assert_close(uv[:, 0], torch.tensor([40.0, 30.0], dtype=torch.float64).expand(5, 2))
    torch.testing.assert_close(depth[:, 0], torch.full((5,), 2.0, dtype=torch.float64))
    assert bool((uv[:, 1, 1] < 30).all())
    assert torch.equal(OPENGL_TO_OPENCV @ OPENGL_TO_OPENCV, torch.eye(4))


def test_orbit_front_first_then_counter_clockwise_about_up():
    cams = orbit_cameras(8, radius=2.0, elevation_deg=15.0, fov_deg=40, width=64, height=64,
                         target=(0.0, 1.0, 0.0))
    az, el, r = spherical_coordinates(cams, target=(0.0, 1.0, 0.0))
    torch.testing.assert_close(az, torch.tensor([0.0, 45, 90, 135, 180, -135, -90, -45]), atol=1e-4, rtol=0)
    torch.testing.assert_close(el, torch.full((8,), 15.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(r, torch.full((8,), 2.0))
    c0 = cams.centers[0]
    assert c0[2] > 1.8 and abs(c0[0]) < 1e-5  # frame 0 in front of the body (+Z)
    assert cams.centers[2, 0] > 1.8  # azimuth 90 on +X
    # Seen from the front, +X is on the image's right; seen from the back, on its left.
    uv, _ = cams.project(torch.tensor([[0.3, 1.0, 0.0]]))
    assert uv[0, 0, 0] > 32 and uv[4, 0, 0] < 32
    fx, fy = cams.fov_deg()
    torch.testing.assert_close(fy, torch.full((8,), 40.0))


def test_random_cameras_ranges_and_reproducible():
    kw = dict(width=32, height=32, radius_range=(1.5, 2.0), elevation_range_deg=(-5.0, 30.0),
              azimuth_range_deg=(-90.0, 90.0), fov_range_deg=(30.0, 60.0))
    a = random_cameras(200, generator=torch.Generator().manual_seed(3), **kw)
    b = random_cameras(200, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.viewmats, b.viewmats) and torch.equal(a.Ks, b.Ks)
    az, el, r = spherical_coordinates(a)
    assert az.min() >= -90 - 1e-3 and az.max() <= 90 + 1e-3 and az.max() - az.min() > 150
    assert el.min() >= -5 - 1e-3 and el.max() <= 30 + 1e-3
    assert r.min() >= 1.5 - 1e-5 and r.max() <= 2.0 + 1e-5
    fov = a.fov_deg()[1]
    assert fov.min() >= 30 - 1e-3 and fov.max() <= 60 + 1e-3
    uv, depth = a.project(torch.zeros(1, 3))
    torch.testing.assert_close(uv[:, 0], torch.full((200, 2), 16.0), atol=1e-3, rtol=0)
    with pytest.raises(InputError):
        random_cameras(2, radius_range=(2.0, 1.0))


def test_rays_pass_through_pixel_centres():
    cams = random_cameras(3, width=20, height=12, generator=torch.Generator().manual_seed(4))
    origins, dirs = generate_rays(cams)
    assert origins.shape == dirs.shape == (3, 12, 20, 3)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(3, 12, 20))
    torch.testing.assert_close(origins[:, 0, 0], cams.centers)
    pts = (origins + 1.7 * dirs).reshape(3, -1, 3)
    uv, depth = cams.project(pts)
    jj, ii = torch.meshgrid(torch.arange(20) + 0.5, torch.arange(12) + 0.5, indexing="xy")
    expected = torch.stack([jj, ii], dim=-1).reshape(1, -1, 2).expand(3, -1, -1)
    torch.testing.assert_close(uv, expected, atol=1e-4, rtol=0)
    assert bool((depth > 0).all())
    # A sampled subset equals the full-image rays at those pixels.
    cam_ids, rows, cols = sample_pixels(cams, 50, generator=torch.Generator().manual_seed(5))
    o_sub, d_sub = generate_rays(cams, cam_ids, rows, cols)
    torch.testing.assert_close(o_sub, origins[cam_ids, rows, cols])
    torch.testing.assert_close(d_sub, dirs[cam_ids, rows, cols])


def test_camera_batch_ops():
    cams = orbit_cameras(6, width=40, height=30)
    assert len(cams) == 6 and len(cams[2]) == 1 and len(cams[1:4]) == 3
    both = Cameras.cat([cams[:2], cams[4:]])
    assert torch.equal(both.viewmats, cams.viewmats[[0, 1, 4, 5]])
    half = cams.resized(20, 15)
    torch.testing.assert_close(half.fov_y, cams.fov_y)
    assert math.isclose(half.Ks[0, 0, 2].item(), 10.0)
    assert cams.to(dtype=torch.float64).viewmats.dtype == torch.float64
    with pytest.raises(InputError):
        Cameras(torch.eye(4)[None].repeat(2, 1, 1), torch.eye(3)[None].repeat(3, 1, 1), 8, 8)
