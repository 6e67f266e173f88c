"""The triangle rasterizer against closed forms: coverage, plane depth, occlusion, barycentrics."""

from __future__ import annotations

import pytest
import torch

from avatar_core.cameras import Cameras, intrinsics_from_fov, look_at
from avatar_core.errors import InputError
from avatar_core.render.mesh import interpolate, rasterize_mesh


def _identity_camera(width: int = 64, height: int = 48, fov: float = 60.0) -> Cameras:
    """A camera at the origin looking down +Z (world == camera frame)."""
    return Cameras(torch.eye(4)[None], intrinsics_from_fov(fov, width, height), width, height)


def _pixel_rays(cams: Cameras) -> torch.Tensor:  # [C, H, W, 3] camera-space directions with z = 1
    H, W = cams.height, cams.width
    i, j = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                          indexing="ij")
    pix = torch.stack([j, i, torch.ones_like(i)], -1)  # [H, W, 3]
    Kinv = torch.linalg.inv(cams.Ks.double())  # [C, 3, 3]
    return torch.einsum("cab,hwb->chwa", Kinv, pix)


def _dense_coverage(verts: torch.Tensor, cams: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge-function test of one triangle at every pixel centre, in float64: (inside [C,H,W], min |l|)."""
    uv, _ = cams.to(dtype=torch.float64).project(verts.double())  # [C, 3, 2]
    H, W = cams.height, cams.width
    i, j = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                          indexing="ij")
    out, margin = [], []
    for c in range(len(cams)):
        (x0, y0), (x1, y1), (x2, y2) = uv[c].tolist()
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        e0 = ((x2 - x1) * (i - y1) - (y2 - y1) * (j - x1)) / area
        e1 = ((x0 - x2) * (i - y2) - (y0 - y2) * (j - x2)) / area
        e2 = ((x1 - x0) * (i - y0) - (y1 - y0) * (j - x0)) / area
        e = torch.stack([e0, e1, e2], -1)
        out.append((e >= 0).all(-1))
        margin.append(e.abs().amin(-1))
    return torch.stack(out), torch.stack(margin)


def test_single_triangle_coverage_matches_dense_edge_test():
    g = torch.Generator().manual_seed(0)
    eye = torch.tensor([[0.3, 0.2, 2.0], [-1.5, 0.5, 1.0], [0.0, -0.4, -2.2]])
    cams = Cameras.look_at(eye, (0.0, 0.0, 0.0), 50.0, 80, 60)
    covered_small = 0
    for trial in range(12):
        # Large triangles take the pair-list path, small ones (a few pixels) the dense size classes.
        scale = 1.0 if trial < 4 else 0.15
        verts = scale * (torch.rand(3, 3, generator=g) - 0.5) + 0.2 * (torch.rand(3, generator=g) - 0.5)
        faces = torch.tensor([[0, 1, 2]] if trial % 2 == 0 else [[0, 2, 1]])  # both windings
        frags = rasterize_mesh(verts, faces, cams)
        expected, margin = _dense_coverage(verts, cams)
        sure = margin > 1e-4  # pixel centres not within rounding of an edge
        covered_small += int(expected.sum()) if scale < 1 else 0
        assert expected.any() or scale < 1
        assert torch.equal(frags.mask[sure], expected[sure])
        assert torch.equal(frags.face_idx[frags.mask], torch.zeros_like(frags.face_idx[frags.mask]))
        assert (frags.face_idx[~frags.mask] == -1).all() and torch.isinf(frags.depth[~frags.mask]).all()
    assert covered_small > 20


def _plane_grid(p0: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, half: float, n: int):
    """An n x n grid of squares (two triangles each) spanning p0 + [-half, half]^2 in the (t1, t2) plane."""
    s = torch.linspace(-half, half, n + 1)
    a, b = torch.meshgrid(s, s, indexing="ij")
    verts = p0 + a.reshape(-1, 1) * t1 + b.reshape(-1, 1) * t2
    idx = torch.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    q00, q10, q01, q11 = idx[:-1, :-1], idx[1:, :-1], idx[:-1, 1:], idx[1:, 1:]
    faces = torch.cat([torch.stack([q00, q10, q11], -1).reshape(-1, 3), torch.stack([q00, q11, q01], -1).reshape(-1, 3)])
    return verts, faces


def test_plane_depth_closed_form_watertight_and_chunking():
    """A tilted plane n.X = h filling the view: depth along each pixel ray is h / (n . ray), and a finely
    tessellated copy covers every pixel (no cracks along shared edges)."""
    cams = _identity_camera(64, 48, 60.0)
    n = torch.nn.functional.normalize(torch.tensor([0.2, -0.15, 1.0]), dim=0)
    h = 2.0
    t1 = torch.nn.functional.normalize(torch.linalg.cross(n, torch.tensor([0.0, 1.0, 0.0])), dim=0)
    t2 = torch.linalg.cross(n, t1)
    rays = _pixel_rays(cams)[0]  # [H, W, 3]
    expected = h / (rays @ n.double())
    # 2 huge triangles (the pair-list path) and 5,000 of 1-10 px (the dense size classes).
    for cells in (1, 50):
        verts, faces = _plane_grid(h * n, t1, t2, 4.0, cells)
        assert verts[:, 2].min() > 0.1  # wholly in front of the camera
        for max_pairs in (1 << 22, 300):  # the second forces many chunks
            frags = rasterize_mesh(verts, faces, cams, max_pairs=max_pairs)
            assert frags.mask.all()
            torch.testing.assert_close(frags.depth[0].double(), expected, rtol=2e-6, atol=0)
            world = interpolate(frags, verts)[0].double()
            torch.testing.assert_close(world @ n.double(), torch.full_like(expected, h), rtol=0, atol=2e-6)


def test_nearer_triangle_wins_in_either_order():
    cams = _identity_camera(32, 32, 60.0)
    far = torch.tensor([[-1.0, -1.0, 3.0], [1.0, -1.0, 3.0], [0.0, 1.0, 3.0]])
    near = torch.tensor([[-0.5, -0.5, 2.0], [0.5, -0.5, 2.0], [0.0, 0.5, 2.0]])
    verts = torch.cat([far, near])
    for faces, near_id in ((torch.tensor([[0, 1, 2], [3, 4, 5]]), 1), (torch.tensor([[3, 4, 5], [0, 1, 2]]), 0)):
        frags = rasterize_mesh(verts, faces, cams)
        near_only = rasterize_mesh(near, torch.tensor([[0, 1, 2]]), cams).mask[0]
        far_only = rasterize_mesh(far, torch.tensor([[0, 1, 2]]), cams).mask[0]
        assert near_only.any() and (far_only & ~near_only).any()
        assert (frags.face_idx[0][near_only] == near_id).all()
        assert (frags.face_idx[0][far_only & ~near_only] == 1 - near_id).all()
        torch.testing.assert_close(frags.depth[0][near_only], torch.full_like(frags.depth[0][near_only], 2.0))


def test_perspective_correct_barycentrics_put_points_on_pixel_rays():
    """Interpolated world positions lie on each pixel centre's ray, at the rasterized depth."""
    g = torch.Generator().manual_seed(1)
    eye = torch.tensor([[0.5, 0.3, 2.0], [2.0, -0.5, 0.5]])
    viewmats = look_at(eye, (0.0, 0.0, 0.0))
    cams = Cameras.from_fov(viewmats, 55.0, 48, 40)
    verts = torch.tensor([[-0.8, -0.6, -0.5], [0.9, -0.4, 0.6], [0.0, 0.8, 0.1], [0.5, 0.5, -0.7]])
    verts = verts + 0.05 * torch.randn(4, 3, generator=g)
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    frags = rasterize_mesh(verts, faces, cams)
    world = interpolate(frags, verts)  # [C, H, W, 3]
    cam_pts = torch.einsum("cab,chwb->chwa", viewmats[:, :3, :3].double(), world.double()) + \
        viewmats[:, None, None, :3, 3].double()
    rays = _pixel_rays(cams)
    m = frags.mask
    assert m.sum() > 200
    expected = rays * frags.depth.double()[..., None]
    torch.testing.assert_close(cam_pts[m], expected[m], rtol=0, atol=2e-5)
    # Per-corner attributes give the same result as per-vertex ones; per-camera vertices too.
    torch.testing.assert_close(interpolate(frags, verts[faces]), world)
    frags_b = rasterize_mesh(verts.expand(2, 4, 3), faces, cams)
    assert torch.equal(frags_b.face_idx, frags.face_idx)
    torch.testing.assert_close(interpolate(frags_b, verts.expand(2, 4, 3).clone()), world)
    assert (world[~m] == 0).all()


def test_interpolate_gradient_is_barycentric_weight_sum():
    cams = _identity_camera(24, 24)
    verts = torch.tensor([[-1.0, -1.0, 3.0], [1.0, -1.0, 3.0], [0.0, 1.0, 2.0]])
    frags = rasterize_mesh(verts, torch.tensor([[0, 1, 2]]), cams)
    attr = torch.zeros(3, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(interpolate(frags, attr).sum(), attr)
    expected = frags.bary[frags.mask].sum(0)
    torch.testing.assert_close(grad, expected[:, None].expand(3, 2))


def test_near_plane_and_backface_culling():
    cams = _identity_camera(32, 32)
    front = torch.tensor([[-1.0, -1.0, 3.0], [1.0, -1.0, 3.0], [0.0, 1.0, 3.0]])
    # Normal of (v1 - v0) x (v2 - v0) for this order is +Z (away from the camera at the origin).
    ccw_away = torch.tensor([[0, 1, 2]])
    towards = torch.tensor([[0, 2, 1]])
    assert rasterize_mesh(front, ccw_away, cams).mask.any()
    assert not rasterize_mesh(front, ccw_away, cams, cull_backfaces=True).mask.any()
    assert rasterize_mesh(front, towards, cams, cull_backfaces=True).mask.any()
    crossing = front.clone()
    crossing[2, 2] = -0.5  # one corner behind the camera: the whole triangle is dropped
    assert not rasterize_mesh(crossing, ccw_away, cams).mask.any()


def test_bad_inputs_raise():
    cams = _identity_camera(8, 8)
    with pytest.raises(InputError):
        rasterize_mesh(torch.zeros(3, 2), torch.tensor([[0, 1, 2]]), cams)
    with pytest.raises(InputError):
        rasterize_mesh(torch.zeros(3, 3), torch.tensor([[0, 1, 3]]), cams)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    """The same code on CUDA (int64 scatter_reduce amin included) gives the CPU's fragments."""
    g = torch.Generator().manual_seed(3)
    verts = torch.rand(300, 3, generator=g) * torch.tensor([2.0, 2.0, 1.0]) + torch.tensor([-1.0, -1.0, 2.0])
    faces = torch.randint(0, 300, (200, 3), generator=g)
    cams = _identity_camera(96, 80)
    cpu = rasterize_mesh(verts, faces, cams)
    gpu = rasterize_mesh(verts.cuda(), faces.cuda(), cams.to("cuda"))
    assert torch.equal(gpu.face_idx.cpu(), cpu.face_idx)
    torch.testing.assert_close(gpu.depth.cpu(), cpu.depth)
    torch.testing.assert_close(gpu.bary.cpu(), cpu.bary, atol=1e-5, rtol=1e-5)
