"""Inverse LBS to the big pose: round trips on surface points, and the canonical image of a vertex is that vertex of
the body posed in the big pose by the body model itself."""

from __future__ import annotations

import torch

from avatar_core.data.poses import build_pose, sample_pose_params
from gas.body_warp import BodyWarp


def _posed(warp, body, seed=0):
    import numpy as np

    shape = torch.full((body.shape_dim,), 0.5)
    pose = build_pose(body, shape, sample_pose_params(np.random.default_rng(seed)))
    return shape, warp.pose(shape, pose, torch.tensor([0.0, 0.3, 0.0]), torch.tensor([0.1, 0.0, -0.2]))


def test_vertices_map_to_the_big_pose_body_and_back(body):
    warp = BodyWarp(body, anchor_stride=3)
    shape, posed = _posed(warp, body)
    big = warp.pose(shape, warp.big_pose(shape))
    ids = torch.arange(warp.num_anchors)
    canon = warp.warp(posed.vertices, ids, posed, big)
    # The body model's own big-pose vertices are the oracle.
    truth = body.forward(shape=shape[None], pose=warp.big_pose(shape)[None]).vertices[0, warp.anchor_idx]
    torch.testing.assert_close(canon, truth, atol=2e-5, rtol=0)
    torch.testing.assert_close(warp.warp(canon, ids, big, posed), posed.vertices, atol=2e-5, rtol=0)


def test_round_trip_of_surface_points_inside_triangles(body):
    warp = BodyWarp(body, anchor_stride=2)
    shape, posed = _posed(warp, body, seed=3)
    big = warp.pose(shape, warp.big_pose(shape))
    full = body.forward(shape=shape[None], pose=None).vertices  # any mesh: points on its triangles
    g = torch.Generator().manual_seed(0)
    f = torch.randint(body.faces.shape[0], (500,), generator=g)
    b = torch.rand(500, 3, generator=g)
    b = b / b.sum(-1, keepdim=True)
    pts = body.points_on_surface(full, f, b)[0] + (posed.vertices.mean(0) - full[0].mean(0))
    ids, _ = warp.nearest(pts, posed)
    back = warp.warp(warp.warp(pts, ids, posed, big), ids, big, posed)
    torch.testing.assert_close(back, pts, atol=2e-5, rtol=0)


def test_nearest_matches_brute_force(body):
    warp = BodyWarp(body, anchor_stride=4)
    _, posed = _posed(warp, body)
    pts = posed.vertices[::7] + 0.03 * torch.randn(posed.vertices[::7].shape, generator=torch.Generator().manual_seed(1))
    ids, d = warp.nearest(pts, posed)
    exact = (pts.double()[:, None] - posed.vertices.double()[None]).norm(dim=-1)  # [N, V]
    chosen = (pts.double() - posed.vertices.double()[ids]).norm(dim=-1)
    torch.testing.assert_close(chosen, exact.min(-1).values, atol=1e-6, rtol=0)
    torch.testing.assert_close(d.double(), exact.min(-1).values, atol=1e-5, rtol=0)


def test_every_vertex_anchors_equal_the_kernel_nearest_vertex_skinning(body):
    """With every vertex an anchor, the warp is the kernel's k = 1 binding (bind_to_surface(vertex_only=True)) with
    unskin in the source pose and skin in the destination, the rest vertices travelling as vertex offsets."""
    from avatar_core.body.skinning import bind_to_surface, skin_gaussians, unskin_gaussians

    warp = BodyWarp(body, anchor_stride=1)
    shape, posed = _posed(warp, body, seed=3)
    big = warp.pose(shape, warp.big_pose(shape))
    g = torch.Generator().manual_seed(2)
    pts = posed.vertices[torch.randint(body.num_vertices, (2000,), generator=g)] + 0.03 * torch.randn(2000, 3, generator=g)
    ids, _ = warp.nearest(pts, posed)
    ours = warp.warp(pts, ids, posed, big)

    import numpy as np

    pose = build_pose(body, shape, sample_pose_params(np.random.default_rng(3)))
    src = body.forward(shape=shape[None], pose=pose[None], global_orient=torch.tensor([[0.0, 0.3, 0.0]]),
                       transl=torch.tensor([[0.1, 0.0, -0.2]]))
    dst = body.forward(shape=shape[None], pose=warp.big_pose(shape)[None])
    binding = bind_to_surface(body, pts, src.vertices[0], vertex_only=True)
    canon, _ = unskin_gaussians(binding, src.transforms, pts[None], vertex_offsets=src.rest_vertices, faces=body.faces)
    kernel, _ = skin_gaussians(binding, dst.transforms, canon, vertex_offsets=dst.rest_vertices, faces=body.faces)
    torch.testing.assert_close(ours, kernel[0].to(ours.dtype), atol=1e-6, rtol=0)
