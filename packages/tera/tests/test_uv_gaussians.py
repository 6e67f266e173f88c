"""UV-structured Gaussians and their animation: UV convention, render round trips, posing, shape and texture edits."""

from __future__ import annotations

import pytest
import torch

from avatar_core.body import UVMapper, axis_angle_to_matrix, load_body_model
from avatar_core.cameras import Cameras, orbit_cameras
from avatar_core.errors import InputError
from tera.animate import animate, builtin_motion, edit_texture, pose_gaussians, reshape_gaussians
from tera.uv_gaussians import (
    ATTRIBUTE_SLICES,
    NUM_ATTRIBUTES,
    UVGaussianAvatar,
    attributes_from_texture,
    default_attributes,
    quaternion_to_matrix,
    sample_maps,
    splat_to_maps,
)

R = 32


@pytest.fixture(scope="module")
def body():
    return load_body_model("anny")


@pytest.fixture(scope="module")
def mapper(body):
    return UVMapper(body, R)


@pytest.fixture(scope="module")
def avatar(body, mapper):
    return UVGaussianAvatar(body, num_points=3000, seed=0, uv_mapper=mapper)


def random_attributes(avatar, batch=1, offset=0.01, seed=0):
    """Per-point attributes in the activations' ranges (rotation kept within +-pi/4 per axis)."""
    g = torch.Generator().manual_seed(seed)
    n = avatar.num_points
    a = torch.rand(batch, n, NUM_ATTRIBUTES, generator=g)
    a[..., ATTRIBUTE_SLICES["offset"]] = offset * (2 * a[..., ATTRIBUTE_SLICES["offset"]] - 1)
    a[..., ATTRIBUTE_SLICES["rotation"]] = 0.25 + 0.5 * a[..., ATTRIBUTE_SLICES["rotation"]]
    return a


def barycentric_residual(points, vertices, faces, face_idx):
    """Distance of each point to the plane of its triangle and its barycentrics there (least squares)."""
    tri = vertices[faces[face_idx]].double()  # [N, 3, 3]
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    m = torch.stack([b - a, c - a], -1)  # [N, 3, 2]
    rhs = (points.double() - a)[..., None]
    st = torch.linalg.lstsq(m, rhs).solution  # [N, 2, 1]
    dist = (m @ st - rhs)[..., 0].norm(dim=-1)
    s, t = st[:, 0, 0], st[:, 1, 0]
    return dist, torch.stack([1 - s - t, s, t], -1)


def test_texel_points_read_their_own_texels(body, mapper):
    """With one point per texel, bilinear sampling returns that texel's value: the UV convention is the kernel's."""
    av = UVGaussianAvatar(body, num_points="texels", uv_mapper=mapper)
    maps = torch.rand(2, NUM_ATTRIBUTES, R, R, generator=torch.Generator().manual_seed(1))
    got = av.sample(maps)  # [2, M, 13]
    want = maps.permute(0, 2, 3, 1)[:, mapper.mask]  # row-major valid texels, the points' order
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # Row 0 of a map is the top of the UV image: v close to 1.
    ramp = torch.arange(R, dtype=torch.float32)[None, None, :, None].expand(1, 1, R, R)
    top = sample_maps(ramp, torch.tensor([[0.5, 1 - 0.5 / R], [0.5, 0.5 / R]]))
    assert top[0, :, 0].tolist() == [0.0, R - 1.0]


def test_constant_colour_map_renders_that_colour(avatar):
    """Attribute maps -> Gaussians -> render: where alpha is 1 the image is the map's colour, elsewhere the background."""
    colour = torch.tensor([0.9, 0.25, 0.1])
    cams = orbit_cameras(2, radius=2.6, width=40, height=40)
    rgb, alpha, _ = avatar.render_maps(default_attributes(1, R, rgb=colour), cams, background=(0.0, 0.0, 1.0))
    solid = alpha[..., 0] > 0.999
    empty = alpha[..., 0] < 1e-4
    assert solid.float().mean() > 0.08 and empty.float().mean() > 0.3  # a silhouette, not an empty or full frame
    assert (rgb[solid] - colour).abs().max() < 2e-3
    assert (rgb[empty] - torch.tensor([0.0, 0.0, 1.0])).abs().max() < 1e-3


def test_part_colours_land_on_their_body_parts(body, mapper, avatar):
    """A UV texture red on head and hair, blue elsewhere: the nose pixel is red, the chest pixel blue."""
    head = mapper.part_masks()["head"] | mapper.part_masks()["hair"]
    tex = torch.where(head[..., None], torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]))
    cams = Cameras.look_at(torch.tensor([[0.0, 0.1, 2.6]]), (0.0, 0.1, 0.0), 40.0, 64, 64)
    rgb, _, _ = avatar.render_maps(attributes_from_texture(tex), cams, background=(1.0, 1.0, 1.0))
    out = body()
    kp = body.keypoints(out, ["nose", "neck", "right_hip", "left_hip"])[0]
    chest = 0.5 * kp[1] + 0.25 * (kp[2] + kp[3])
    pix, _ = cams.project(torch.stack([kp[0], chest]))
    (nx, ny), (cx, cy) = pix[0].floor().long().tolist()
    assert rgb[0, 0, ny, nx, 0] > 0.9 and rgb[0, 0, ny, nx, 2] < 0.1
    assert rgb[0, 0, cy, cx, 2] > 0.9 and rgb[0, 0, cy, cx, 0] < 0.1


def test_attributes_gaussians_round_trip(avatar):
    """decode_points and attributes_from_gaussians invert each other; splatting inverts sampling of a ramp."""
    attrs = random_attributes(avatar, batch=2)
    g = avatar.decode_points(attrs, avatar.template_points[None])
    torch.testing.assert_close(avatar.attributes_from_gaussians(g), attrs, atol=2e-5, rtol=0)
    assert (g.scales >= avatar.knn[None, :, None] - 1e-7).all() and (g.scales <= 2 * avatar.knn[None, :, None] + 1e-7).all()
    # A map linear in the texel coordinates, sampled at the points and splatted back: error below one texel's step.
    yy, xx = torch.meshgrid(torch.arange(R, dtype=torch.float32), torch.arange(R, dtype=torch.float32), indexing="ij")
    ramp = torch.stack([xx, yy])[None] / R  # [1, 2, R, R], step 1/R per texel
    back = splat_to_maps(sample_maps(ramp, avatar.uv), avatar.uv, R, fill=False)
    reached = back.abs().sum(1)[0] > 0
    assert reached.sum() > 0.3 * R * R
    assert (back - ramp)[0][:, reached].abs().max() < 1.0 / R


def test_posed_gaussians_stay_on_the_posed_surface(body, avatar):
    """Zero offsets: every posed Gaussian lies in its own posed triangle at its own barycentrics (< 1e-4 height)."""
    g = avatar(default_attributes(1, R))
    poses = builtin_motion(body, "walk", 8)[[2, 5]]
    frames = animate(avatar, g, poses)
    out = body(pose=poses)
    for t in range(2):
        dist, bary = barycentric_residual(frames.means[t], out.vertices[t], body.faces, avatar.face_idx)
        assert dist.max() < 1e-4 * body.height()
        torch.testing.assert_close(bary, avatar.bary.double(), atol=2e-3, rtol=0)
    # The pose moved the body: the frames differ from the rest pose by centimetres, not by nothing.
    assert (frames.means - g.means).norm(dim=-1).max() > 0.05


def test_global_rotation_moves_gaussians_rigidly(body, avatar):
    """A root rotation plus translation rotates means and covariances rigidly (offsets and rotations included)."""
    g = avatar.decode_points(random_attributes(avatar, offset=0.02, seed=3), avatar.template_points[None])
    aa = torch.tensor([[0.3, -1.1, 0.4]])
    transl = torch.tensor([[0.2, -0.1, 0.5]])
    posed = pose_gaussians(avatar, g, body(global_orient=aa, transl=transl))
    rot = axis_angle_to_matrix(aa)[0]
    root = body().rest_joints[0, 0]
    want = (g.means[0] - root) @ rot.T + root + transl
    torch.testing.assert_close(posed.means[0], want, atol=2e-5, rtol=0)

    def cov(q, s):
        m = quaternion_to_matrix(q)
        return m @ torch.diag_embed(s**2) @ m.transpose(-1, -2)

    torch.testing.assert_close(cov(posed.quats[0], posed.scales[0]), rot @ cov(g.quats[0], g.scales[0]) @ rot.T,
                               atol=1e-8, rtol=1e-4)


def test_shape_edit_follows_the_body(body, avatar):
    """New shape parameters: the avatar's Gaussians sit on the reshaped surface and its height follows the body's."""
    g = avatar(default_attributes(1, R))
    shape = torch.full((1, body.shape_dim), 0.5)
    shape[0, list(body.shape_names).index("height")] = 1.0
    tall = reshape_gaussians(avatar, g, shape)
    verts = body(shape=shape).vertices[0]
    dist, _ = barycentric_residual(tall.means[0], verts, body.faces, avatar.face_idx)
    assert dist.max() < 1e-4 * body.height()
    body_ratio = float(verts[:, 1].max() - verts[:, 1].min()) / body.height()
    avatar_ratio = float(tall.means[0, :, 1].max() - tall.means[0, :, 1].min()) / float(
        g.means[0, :, 1].max() - g.means[0, :, 1].min())
    assert body_ratio > 1.05 and abs(avatar_ratio - body_ratio) < 0.01


def test_texture_edit_changes_only_the_region(mapper, avatar):
    """Recolouring a part: Gaussians away from it keep their colour exactly, those inside get the new colour."""
    maps = attributes_from_texture(torch.rand(R, R, 3, generator=torch.Generator().manual_seed(2)))
    edited = edit_texture(maps, mapper, "upper_body", color=(0.0, 1.0, 0.0))
    before, after = avatar(maps).colors[0], avatar(edited).colors[0]
    region = mapper.part_masks()["upper_body"].float()[None, None]
    near = torch.nn.functional.max_pool2d(region, 3, 1, 1)[0, 0] > 0  # bilinear reads one texel around a point
    deep = -torch.nn.functional.max_pool2d(-region, 3, 1, 1)[0, 0] > 0
    texel = mapper.uv_to_texel(avatar.uv)
    far_pts, deep_pts = ~near[texel[:, 0], texel[:, 1]], deep[texel[:, 0], texel[:, 1]]
    assert far_pts.sum() > 100 and deep_pts.sum() > 20
    assert torch.equal(after[far_pts], before[far_pts])
    torch.testing.assert_close(after[deep_pts], torch.tensor([0.0, 1.0, 0.0]).expand(int(deep_pts.sum()), 3))
    torch.testing.assert_close(edited[:, ATTRIBUTE_SLICES["offset"]], maps[:, ATTRIBUTE_SLICES["offset"]])
    with pytest.raises(InputError, match="upper_body"):
        edit_texture(maps, mapper, "shirt", color=(0.0, 1.0, 0.0))


def test_texture_edit_regions_are_the_try_on_regions(mapper):
    """Texture edits name regions as try-on does: 'upper_clothes' is upper_body + arms, '+' joins names."""
    maps = attributes_from_texture(torch.rand(R, R, 3, generator=torch.Generator().manual_seed(3)))
    one = edit_texture(maps, mapper, "upper_clothes", color=(1.0, 0.0, 0.0))
    parts = edit_texture(maps, mapper, ["upper_body", "arms"], color=(1.0, 0.0, 0.0))
    joined = edit_texture(maps, mapper, "upper_body+arms", color=(1.0, 0.0, 0.0))
    assert torch.equal(one, parts) and torch.equal(one, joined) and not torch.equal(one, maps)
