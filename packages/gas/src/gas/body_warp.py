"""Inverse LBS to the canonical "big pose" (SHERF, Hu et al. 2023, Sec. 3.2; GAS Sec. 3.1).

A point is carried between two posed bodies of the same person through the skinning of its nearest body vertex
(k = 1): undo that vertex's blended world-from-rest transform, swap the vertex's rest offsets (shape and
pose-corrective blend shapes, ``rest_vertices`` of :class:`~avatar_core.body.BodyOutput`) of the source body for
the destination's, and apply the destination's transform. Applied to a posed vertex this gives exactly the same
vertex of the destination body, which is what the round-trip tests check.

The canonical space is SHERF's big pose: legs spread (hips +-45 deg about the forward axis in SMPL's frame; the
same angle here) and arms at +-30 deg from the A-pose's horizontal-ish line, so that limbs never touch and every
canonical point has one clear nearest body part. GAS uses SMPL (6,890 vertices); the kernel's default body is Anny
(13,718 vertices), of which ``anchor_stride`` picks every k-th vertex as the anchors for skinning, nearest-vertex
queries and body-anchored features.

With every vertex an anchor (``anchor_stride=1``) :meth:`BodyWarp.warp` equals the kernel's SHERF rule,
:func:`~avatar_core.body.skinning.bind_to_surface` with ``vertex_only=True`` in the source pose, then
:func:`~avatar_core.body.skinning.unskin_gaussians` / :func:`~avatar_core.body.skinning.skin_gaussians` with the
two bodies' ``rest_vertices`` as vertex offsets (a test checks it). It is kept separate for what the NeRF's
per-step queries need and the kernel does not do: nearest vertex among a subset of anchors (the kernel binds to
the full mesh), one k-d tree per posed body reused across steps and a brute-force search on accelerators (the
kernel builds a CPU tree per call), transforms blended once per anchor and gathered per point (the kernel blends
all joints per point), and view directions carried by the same 3x3 parts (the kernel rotates quaternions by
their polar factor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from avatar_core.body import BodyModel
from avatar_core.body.model import blend_transforms
from avatar_core.data.poses import build_pose
from avatar_core.errors import InputError

#: SHERF's big pose, in the kernel pose library's terms (degrees).
BIG_POSE_PARAMS = {"hip_out_l": 45.0, "hip_out_r": 45.0, "arm_raise_l": 20.0, "arm_raise_r": 20.0}


@dataclass
class PosedAnchors:
    """The anchor vertices of one posed body, with what warping needs."""

    vertices: Tensor  # [V, 3] posed, world
    normals: Tensor  # [V, 3] posed unit normals
    transforms: Tensor  # [V, 3, 4] blended world-from-rest transform of every anchor
    rest: Tensor  # [V, 3] rest vertices (shape + pose-corrective blend shapes included)
    tree: Any = None  # a k-d tree of ``vertices``, built on first use on the CPU


class BodyWarp:
    """Posed anchor states of a body model and the nearest-vertex inverse LBS between them."""

    def __init__(self, body: BodyModel, anchor_stride: int = 2):
        if anchor_stride < 1:
            raise InputError(f"anchor_stride must be >= 1, got {anchor_stride}", "use 1 for every vertex")
        self.body = body
        self.anchor_idx = torch.arange(0, body.num_vertices, anchor_stride)

    @property
    def num_anchors(self) -> int:
        return int(self.anchor_idx.numel())

    def big_pose(self, shape: Tensor | None = None) -> Tensor:  # [J-1, 3]
        return build_pose(self.body, shape, BIG_POSE_PARAMS)

    @torch.no_grad()
    def pose(self, shape: Tensor, pose: Tensor, global_orient: Tensor | None = None,
             transl: Tensor | None = None) -> PosedAnchors:
        """Anchors of the body with ``shape [S]``, ``pose [J-1, 3]``, ``global_orient [3]``, ``transl [3]``."""
        out = self.body.forward(shape=shape[None], pose=pose[None],
                                global_orient=None if global_orient is None else global_orient[None],
                                transl=None if transl is None else transl[None])
        idx = self.anchor_idx
        A = blend_transforms(self.body.skinning_weights[idx], out.transforms)[0]  # [V, 3, 4]
        normals = self.body.vertex_normals(out.vertices)[0, idx]
        return PosedAnchors(out.vertices[0, idx], normals, A, out.rest_vertices[0, idx])

    @staticmethod
    def nearest(points: Tensor, anchors: PosedAnchors, chunk: int = 8192) -> tuple[Tensor, Tensor]:
        """Nearest anchor index ``[N]`` and distance ``[N]`` of points ``[N, 3]`` (exact; no gradient).

        A k-d tree (scipy) on the CPU, chunked brute force on accelerators.
        """
        if points.device.type == "cpu":
            from scipy.spatial import cKDTree

            if anchors.tree is None:
                anchors.tree = cKDTree(anchors.vertices.detach().double().numpy())
            d, i = anchors.tree.query(points.detach().double().numpy(), k=1)
            return torch.from_numpy(i).long(), torch.from_numpy(d).to(points.dtype)
        ids, dists = [], []
        v = anchors.vertices.to(points.dtype)
        for s in range(0, points.shape[0], chunk):
            d = torch.cdist(points[s:s + chunk], v)
            m = d.min(-1)
            ids.append(m.indices)
            dists.append(m.values)
        if not ids:
            return points.new_zeros(0, dtype=torch.long), points.new_zeros(0)
        return torch.cat(ids), torch.cat(dists)

    @staticmethod
    def warp(points: Tensor, ids: Tensor, src: PosedAnchors, dst: PosedAnchors) -> Tensor:  # [N, 3] -> [N, 3]
        """Carry points posed like ``src`` to ``dst`` by the skinning of anchors ``ids``."""
        A_s, A_d = src.transforms[ids], dst.transforms[ids]  # [N, 3, 4]
        rest = torch.linalg.solve(A_s[..., :3], (points - A_s[..., 3])[..., None])[..., 0]
        rest = rest + (dst.rest[ids] - src.rest[ids])
        return (A_d[..., :3] @ rest[..., None])[..., 0] + A_d[..., 3]

    @staticmethod
    def warp_directions(dirs: Tensor, ids: Tensor, src: PosedAnchors, dst: PosedAnchors) -> Tensor:
        """Directions carried by the rotation parts of the same transforms (renormalised)."""
        A_s, A_d = src.transforms[ids, :, :3], dst.transforms[ids, :, :3]
        d = (A_d @ torch.linalg.solve(A_s, dirs[..., None]))[..., 0]
        return torch.nn.functional.normalize(d, dim=-1)
