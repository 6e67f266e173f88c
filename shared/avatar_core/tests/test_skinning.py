"""Free-point / Gaussian skinning against the body's own LBS, brute-force closest points and rigid motions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from avatar_core.body import load_body_model
from avatar_core.body.skinning import (
    bind_to_surface,
    closest_point_barycentric,
    nearest_surface,
    pose_correctives,
    skin_gaussians,
    unskin_gaussians,
)
from avatar_core.errors import InputError
from avatar_core.rotations import axis_angle_to_matrix, quaternion_to_matrix


@pytest.fixture(scope="module")
def anny():
    return load_body_model("anny", dtype=torch.float64)


def _posed(body, seed=0, B=2, amount=0.35):
    g = torch.Generator().manual_seed(seed)
    pose = amount * torch.randn(B, body.num_joints - 1, 3, generator=g, dtype=torch.float64)
    orient = 0.5 * torch.randn(B, 3, generator=g, dtype=torch.float64)
    transl = torch.randn(B, 3, generator=g, dtype=torch.float64)
    return body(pose=pose, global_orient=orient, transl=transl)


def test_closest_point_on_triangle_matches_dense_search():
    """Every Voronoi region (vertices, edges, face) against the best of a fine barycentric grid."""
    g = torch.Generator().manual_seed(0)
    n = 400
    a, b, c = (torch.randn(n, 3, generator=g, dtype=torch.float64) for _ in range(3))
    p = 1.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    bary = closest_point_barycentric(p, a, b, c)
    assert (bary >= -1e-12).all() and torch.allclose(bary.sum(-1), torch.ones(n, dtype=torch.float64))
    ours = ((bary[:, 0:1] * a + bary[:, 1:2] * b + bary[:, 2:3] * c) - p).norm(dim=-1)
    steps = 120
    i, j = torch.meshgrid(torch.arange(steps + 1), torch.arange(steps + 1), indexing="ij")
    keep = i + j <= steps
    u, v = i[keep].double() / steps, j[keep].double() / steps
    grid = (1 - u - v)[None, :, None] * a[:, None] + u[None, :, None] * b[:, None] + v[None, :, None] * c[:, None]
    dense = (grid - p[:, None]).norm(dim=-1).min(1).values
    assert (ours <= dense + 1e-12).all()  # never worse than any sampled point
    edge = torch.stack([(b - a).norm(dim=-1), (c - a).norm(dim=-1), (c - b).norm(dim=-1)]).max(0).values
    assert (dense - ours <= edge / steps).all()  # and within the grid spacing of the best one
    # A point straight above the interior: its own barycentrics back, distance = height.
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    normal = torch.linalg.cross(b - a, c - a)
    normal = normal / normal.norm(dim=-1, keepdim=True)
    q = w[0] * a + w[1] * b + w[2] * c + 0.07 * normal
    torch.testing.assert_close(closest_point_barycentric(q, a, b, c), w.expand(n, 3))


def test_nearest_surface_matches_brute_force_on_anny(anny):
    g = torch.Generator().manual_seed(1)
    verts, faces = anny.template_vertices, anny.faces
    n = 150
    f = torch.randint(0, faces.shape[0], (n,), generator=g)
    w = torch.distributions.Dirichlet(torch.ones(3, dtype=torch.float64)).sample((n,))
    normals = anny.vertex_normals(verts[None])[0]
    surf = anny.points_on_surface(verts[None], f, w)[0]
    nrm = torch.nn.functional.normalize(anny.points_on_surface(normals[None], f, w)[0], dim=-1)
    pts = surf + nrm * 0.03 * torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.005 * torch.randn(
        n, 3, generator=g, dtype=torch.float64)
    face_idx, bary, dist = nearest_surface(pts, verts, faces)
    tri = verts[faces]  # [F, 3, 3]
    brute = []
    for p in pts:  # every triangle of the mesh
        b = closest_point_barycentric(p.expand(len(tri), 3), tri[:, 0], tri[:, 1], tri[:, 2])
        brute.append(((b[..., None] * tri).sum(1) - p).norm(dim=-1).min())
    brute = torch.stack(brute)
    torch.testing.assert_close(dist, brute, atol=1e-9, rtol=0)
    closest = anny.points_on_surface(verts[None], face_idx, bary)[0]
    torch.testing.assert_close((closest - pts).norm(dim=-1), dist)
    # Nearest vertex (SHERF's rule): one-hot barycentrics at the closest vertex.
    fv, bv, dv = nearest_surface(pts, verts, faces, vertex_only=True)
    vid = (faces[fv] * bv.long()).sum(-1)
    torch.testing.assert_close(dv, (verts[vid] - pts).norm(dim=-1))
    assert (dv >= dist - 1e-12).all()


def test_surface_points_follow_the_bodys_lbs(anny):
    """Points bound to the rest mesh and skinned move with the posed mesh: exactly at vertices, to < 1 cm inside
    triangles (LBS of a blended point vs the blend of skinned vertices differs at second order)."""
    out = _posed(anny)
    rest = out.rest_vertices[0]
    ids = torch.arange(0, anny.num_vertices, 7)
    binding = bind_to_surface(anny, rest[ids], rest)
    torch.testing.assert_close(binding.weights, anny.skinning_weights[ids], atol=1e-9, rtol=0)
    posed, _ = skin_gaussians(binding, out.transforms, rest[ids])
    torch.testing.assert_close(posed, out.vertices[:, ids], atol=1e-9, rtol=0)

    g = torch.Generator().manual_seed(2)
    f = torch.randint(0, anny.faces.shape[0], (500,), generator=g)
    w = torch.distributions.Dirichlet(torch.ones(3, dtype=torch.float64)).sample((500,))
    pts = anny.points_on_surface(rest[None], f, w)[0]
    binding = bind_to_surface(anny, pts, rest)
    assert binding.distance.max() < 1e-9
    posed, _ = skin_gaussians(binding, out.transforms, pts)
    on_mesh = anny.points_on_surface(out.vertices, f, w)
    err = (posed - on_mesh).norm(dim=-1)
    assert err.median() < 1e-3 and err.max() < 1e-2


def test_rigid_motion_rotates_gaussians_exactly(anny):
    """A root rotation + translation only: every Gaussian's mean and orientation move rigidly."""
    R_aa = torch.tensor([[0.3, -1.1, 0.4]], dtype=torch.float64)
    t = torch.tensor([[0.2, -0.1, 1.5]], dtype=torch.float64)
    out = anny(global_orient=R_aa, transl=t)
    g = torch.Generator().manual_seed(3)
    means = anny.template_vertices[::50] + 0.05 * torch.randn(len(anny.template_vertices[::50]), 3, generator=g,
                                                               dtype=torch.float64)
    quats = torch.randn(len(means), 4, generator=g, dtype=torch.float64)
    binding = bind_to_surface(anny, means)
    posed_m, posed_q = skin_gaussians(binding, out.transforms, means, quats)
    R = axis_angle_to_matrix(R_aa)[0]
    root = out.rest_joints[0, 0]
    torch.testing.assert_close(posed_m[0], (means - root) @ R.T + root + t[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(quaternion_to_matrix(posed_q[0]), R @ quaternion_to_matrix(quats), atol=1e-9, rtol=0)


def test_rotations_follow_rigidly_skinned_triangles(anny):
    """On triangles whose three vertices follow one bone, the Gaussian rotation maps rest edges to posed edges."""
    out = _posed(anny, seed=4, B=1)
    Wf = anny.skinning_weights[anny.faces]  # [F, 3, J]
    dom = Wf.argmax(-1)  # [F, 3]
    rigid = (Wf.max(-1).values > 0.999).all(-1) & (dom == dom[:, :1]).all(-1)
    faces = anny.faces[rigid][:200]
    assert len(faces) > 50
    centre = torch.full((len(faces), 3), 1.0 / 3, dtype=torch.float64)
    rest = out.rest_vertices[0]
    pts = (rest[faces] * centre[..., None]).sum(1)
    binding = bind_to_surface(anny, pts, rest)
    identity = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64).expand(len(pts), 4)
    _, q = skin_gaussians(binding, out.transforms, pts, identity)
    Rg = quaternion_to_matrix(q[0])  # [n, 3, 3]
    rest_edges = rest[faces[:, 1:]] - rest[faces[:, :1]]  # [n, 2, 3]
    posed_edges = out.vertices[0][faces[:, 1:]] - out.vertices[0][faces[:, :1]]
    torch.testing.assert_close(rest_edges @ Rg.transpose(-1, -2), posed_edges, atol=1e-5, rtol=0)


def test_unskin_inverts_skin(anny):
    out = _posed(anny, seed=5)
    g = torch.Generator().manual_seed(5)
    means = anny.template_vertices[::40] + 0.02 * torch.randn(len(anny.template_vertices[::40]), 3, generator=g,
                                                               dtype=torch.float64)
    quats = torch.nn.functional.normalize(torch.randn(len(means), 4, generator=g, dtype=torch.float64), dim=-1)
    binding = bind_to_surface(anny, means)
    pm, pq = skin_gaussians(binding, out.transforms, means, quats)
    cm, cq = unskin_gaussians(binding, out.transforms, pm, pq)
    torch.testing.assert_close(cm, means.expand_as(cm), atol=1e-9, rtol=0)
    torch.testing.assert_close(quaternion_to_matrix(cq), quaternion_to_matrix(quats).expand(2, -1, 3, 3),
                               atol=1e-9, rtol=0)
    with pytest.raises(InputError, match="skinning weights"):
        skin_gaussians(binding.weights[:3], out.transforms, means)


def test_smplx_pose_correctives_travel_with_the_points(tmp_path):
    """SMPL-X (synthetic model file): with its pose correctives as vertex offsets, vertices skin exactly."""
    spec = importlib.util.spec_from_file_location("_avatar_test_body", Path(__file__).with_name("test_body.py"))
    test_body = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_body)
    test_body.write_synthetic_smplx(tmp_path)
    body = load_body_model("smplx", model_dir=tmp_path, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    shape = torch.randn(1, 10, generator=g, dtype=torch.float64)
    out = body(shape=shape, pose=0.3 * torch.randn(2, 54, 3, generator=g, dtype=torch.float64))
    rest0 = body(shape=shape).rest_vertices[0]  # canonical mesh of this shape, zero pose
    ids = torch.arange(0, body.num_vertices, 13)
    binding = bind_to_surface(body, rest0[ids], rest0)
    offsets = pose_correctives(body, out, shape=shape)
    assert offsets.abs().max() > 1e-4  # the synthetic posedirs are not zero
    posed, _ = skin_gaussians(binding, out.transforms, rest0[ids], vertex_offsets=offsets, faces=body.faces)
    torch.testing.assert_close(posed, out.vertices[:, ids], atol=1e-8, rtol=0)
    back, _ = unskin_gaussians(binding, out.transforms, posed, vertex_offsets=offsets, faces=body.faces)
    torch.testing.assert_close(back, rest0[ids].expand_as(back), atol=1e-8, rtol=0)
