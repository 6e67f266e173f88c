"""UV mapping: texel lookup, position maps, part masks and UV point sets on Anny and a synthetic SMPL-X."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from avatar_core.body import PART_NAMES, load_body_model
from avatar_core.body.uv import UVMapper

R = 256


@pytest.fixture(scope="module")
def anny():
    return load_body_model("anny")


@pytest.fixture(scope="module")
def mapper(anny):
    return UVMapper(anny, R, use_cache=False)


def test_texel_barycentrics_reproduce_texel_centres(anny, mapper):
    """Each valid texel's (triangle, barycentrics) interpolate the UV corners back to the texel centre."""
    uv_corners = anny.uv_coords[anny.uv_faces[mapper.texel_face[mapper.mask]]]  # [M, 3, 2]
    uv = (uv_corners * mapper.texel_bary[mapper.mask][..., None]).sum(1)
    torch.testing.assert_close(uv, mapper.texel_uv()[mapper.mask], atol=1e-5, rtol=0)
    assert (mapper.texel_bary[mapper.mask] >= 0).all()
    assert 0.5 < mapper.mask.float().mean() < 0.8  # Anny's layout fills ~63% of the square


def test_vertex_uv_lookup_reproduces_vertex(anny, mapper):
    """The position map at the texel holding a vertex's UV is that vertex, to within the texel's size."""
    verts = anny().vertices  # rest pose
    pos = mapper.position_map(verts)[0]
    faces, uv_faces = anny.faces, anny.uv_faces
    corner_uv = anny.uv_coords[uv_faces.flatten()]
    corner_vid = faces.flatten()
    rc = mapper.uv_to_texel(corner_uv)
    valid = mapper.mask[rc[:, 0], rc[:, 1]]
    assert valid.float().mean() > 0.9  # the rest sit on chart borders, their texel centre outside
    # A texel's size on the body: UV-to-surface stretch of the triangles around the vertex, over R.
    v = anny.template_vertices
    area3 = 0.5 * torch.linalg.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]]).norm(dim=-1)
    t = anny.uv_coords[uv_faces]
    e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    area_uv = 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).abs()
    stretch = (area3 / area_uv.clamp_min(1e-12)).sqrt()  # metres per UV unit
    face_of_corner = torch.arange(len(faces)).repeat_interleave(3)
    vert_stretch = torch.zeros(anny.num_vertices).scatter_reduce(0, corner_vid, stretch[face_of_corner], "amax")
    texel_diag = math.sqrt(2.0) * vert_stretch[corner_vid] / R
    dist = (pos[rc[:, 0], rc[:, 1]] - verts[0, corner_vid]).norm(dim=-1)
    assert (dist[valid] <= texel_diag[valid]).all(), float((dist / texel_diag)[valid].max())


def test_posed_point_sets_stay_on_posed_surface(anny, mapper):
    """UV point sets re-evaluated on posed triangles lie on the posed mesh (Warp's closest-point query).

    Points follow the body by barycentric re-evaluation on the posed triangles, not by skinning them
    with interpolated weights: LBS is not linear across a triangle, so interpolated-weight skinning
    drifts off the surface (~0.1% of body height at 0.2 rad joint noise, ~0.3% at 0.4 rad on Anny).
    """
    from anny.utils.warp_mesh_utils import point_to_mesh_distance

    g = torch.Generator().manual_seed(0)
    out = anny(shape=torch.rand(1, 6, generator=g), pose=0.3 * torch.randn(1, anny.num_joints - 1, 3, generator=g),
               global_orient=torch.randn(1, 3, generator=g), transl=torch.randn(1, 3, generator=g))
    tol = 1e-4 * anny.height()
    faces = anny.faces.int()
    for num in ("texels", 20000):
        face_idx, bary, uv = mapper.sample_points(num, seed=1)
        pts = mapper.points_on_surface(out.vertices, face_idx, bary)[0]
        dist = point_to_mesh_distance(pts.float().contiguous(), out.vertices[0].float().contiguous(), faces, 1.0)
        assert dist.max() < tol, float(dist.max())
    # The texel point set is the position map, texel for texel.
    face_idx, bary, uv = mapper.sample_points("texels")
    torch.testing.assert_close(mapper.points_on_surface(out.vertices, face_idx, bary)[0],
                               mapper.position_map(out.vertices)[0][mapper.mask])
    # Interpolated skinning weights are convex combinations; skinning the rest points with them stays
    # close to the surface points (the drift bound measured above).
    w = mapper.skinning_weights(face_idx, bary)
    torch.testing.assert_close(w.sum(-1), torch.ones(len(w)), atol=1e-5, rtol=0)
    lbs = anny.skin_points(mapper.points_on_surface(out.rest_vertices, face_idx, bary), w, out.transforms)
    assert (lbs[0] - mapper.points_on_surface(out.vertices, face_idx, bary)[0]).norm(dim=-1).max() < 0.01 * anny.height()
    # A fixed sample list is deterministic by seed.
    a, b = mapper.sample_points(500, seed=3), mapper.sample_points(500, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[2], mapper.sample_points(500, seed=4)[2])


def test_part_masks_partition_valid_texels(anny, mapper):
    masks = mapper.part_masks()
    assert tuple(masks) == PART_NAMES
    stack = torch.stack([masks[n] for n in PART_NAMES]).int()
    assert torch.equal(stack.sum(0) == 1, mapper.mask) and (stack.sum(0) <= 1).all()
    assert all(m.any() for m in masks.values())
    # The parts sit where they should on the rest body (+Y up, left at +X).
    pos = mapper.position_map(anny().vertices)[0]
    y = {n: float(pos[masks[n]][:, 1].mean()) for n in PART_NAMES}
    assert y["hair"] > y["upper_body"] > y["lower_body"] > y["legs"] > y["feet"]
    assert pos[masks["hands"]][:, 0].abs().min() > 0.3  # hands beside the hips in the A-pose


def test_smplx_uv_layout_and_dominant_joint_parts(tmp_path):
    """The SMPL-X path: UVs read from smplx_uv.obj, parts from dominant joints still partition the layout."""
    spec = importlib.util.spec_from_file_location("_avatar_test_body", Path(__file__).with_name("test_body.py"))
    test_body = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_body)  # the synthetic SMPL-X file writer lives beside its LBS test

    test_body.write_synthetic_smplx(tmp_path)
    body = load_body_model("smplx", model_dir=tmp_path)
    m = UVMapper(body, 64, use_cache=False)
    # The synthetic layout is a grid over [0.05, 0.95]^2: texel centres inside it are all covered.
    uv = m.texel_uv()
    inside = ((uv > 0.05 + 1e-6) & (uv < 0.95 - 1e-6)).all(-1)
    assert torch.equal(m.mask, inside)
    pos = m.position_map(body.template_vertices[None])[0]
    # Grid UV is affine in the sheet's x and y: the position map recovers them.
    expect_x = (uv[..., 0] - 0.05) / 0.9 * 0.5 - 0.25
    expect_y = (uv[..., 1] - 0.05) / 0.9 * 1.7 - 1.1
    torch.testing.assert_close(pos[..., 0][m.mask], expect_x[m.mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(pos[..., 1][m.mask], expect_y[m.mask], atol=1e-4, rtol=0)
    stack = torch.stack(list(m.part_masks().values())).int()
    assert torch.equal(stack.sum(0) == 1, m.mask)
