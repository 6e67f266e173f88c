"""The body's UV map as data: per-texel triangle and barycentrics, position/normal maps, part masks, point sets.

Texel ``(row i, column j)`` of a resolution-``R`` map sits at ``u = (j + 0.5) / R``, ``v = 1 - (i + 0.5) / R``
(:mod:`avatar_core.conventions`). A texel is valid when its centre lies in a UV triangle; where UV
triangles overlap (seams, mirrored charts) the triangle that holds the centre most deeply wins.
UV-structured point sets (one point per texel, or a fixed list as TeRA / IDOL place ~100K Gaussians
on the body's UV map) are (triangle, barycentric) pairs, so they follow the body exactly when posed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avatar_core.body.model import PART_NAMES, BodyModel, interpolate_on_faces, vertex_normals
from avatar_core.errors import InputError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$AVATAR_CACHE_DIR`` or ``~/.cache/avatar_core``."""
    return Path(os.environ.get("AVATAR_CACHE_DIR", Path.home() / ".cache" / "avatar_core"))


def rasterize_uv(
    uv: np.ndarray,  # [T, 2]
    uv_faces: np.ndarray,  # [F, 3]
    resolution: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Covering triangle ``[R, R]`` (-1 outside) and barycentrics ``[R, R, 3]`` of every texel centre.

    Vectorised over (triangle, texel-in-bounding-box) pairs: each triangle lists the texel centres of
    its bounding box, keeps those with non-negative barycentrics, and each texel keeps its deepest pair.
    """
    R = resolution
    uv = np.asarray(uv, np.float64)
    # Texel-centre coordinates: x = column, y = row, so texel (i, j) has its centre at (j, i).
    px = np.stack([uv[:, 0] * R - 0.5, (1.0 - uv[:, 1]) * R - 0.5], 1)
    tri = px[np.asarray(uv_faces, np.int64)]  # [F, 3, 2]
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])  # [F] twice signed
    lo = np.clip(np.ceil(tri.min(1) - 1e-9), 0, R - 1).astype(np.int64)  # [F, 2]
    hi = np.clip(np.floor(tri.max(1) + 1e-9), 0, R - 1).astype(np.int64)
    size = np.maximum(hi - lo + 1, 0)
    count = size[:, 0] * size[:, 1]
    count[np.abs(area) < 1e-12] = 0  # degenerate in UV: covers nothing
    face = np.repeat(np.arange(len(tri)), count)  # [P]
    local = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    w = size[face, 0]
    x = lo[face, 0] + local % w
    y = lo[face, 1] + local // w
    p = np.stack([x, y], 1).astype(np.float64)
    fa, fb, fc = a[face], b[face], c[face]
    inv = 1.0 / area[face]
    # Barycentrics from signed sub-triangle areas (orientation-independent through the division).
    l1 = ((fc[:, 0] - fb[:, 0]) * (p[:, 1] - fb[:, 1]) - (fc[:, 1] - fb[:, 1]) * (p[:, 0] - fb[:, 0])) * inv
    l2 = ((fa[:, 0] - fc[:, 0]) * (p[:, 1] - fc[:, 1]) - (fa[:, 1] - fc[:, 1]) * (p[:, 0] - fc[:, 0])) * inv
    l3 = 1.0 - l1 - l2
    bary = np.stack([l1, l2, l3], 1)
    depth = bary.min(1)
    keep = depth >= -1e-7  # centres on an edge belong to a triangle: no pinholes along shared edges
    face, bary, depth = face[keep], bary[keep], depth[keep]
    texel = y[keep] * R + x[keep]
    order = np.lexsort((depth, texel))  # by texel, deepest last
    texel, face, bary = texel[order], face[order], bary[order]
    last = np.r_[texel[1:] != texel[:-1], True]
    texel_face = np.full(R * R, -1, np.int64)
    texel_bary = np.zeros((R * R, 3), np.float64)
    texel_face[texel[last]] = face[last]
    texel_bary[texel[last]] = np.clip(bary[last], 0.0, 1.0)
    texel_bary[texel[last]] /= texel_bary[texel[last]].sum(1, keepdims=True)
    return texel_face.reshape(R, R), texel_bary.reshape(R, R, 3)


class UVMapper:
    """A body's UV layout rasterised at ``resolution``: the bridge between UV images and the surface."""

    def __init__(self, body: BodyModel, resolution: int = 256, use_cache: bool = True):
        if not isinstance(resolution, int) or resolution < 2:
            raise InputError(f"UV resolution must be an integer >= 2, got {resolution!r}", "use e.g. 256, 512 or 1024")
        self.body = body
        self.resolution = R = resolution
        uv = body.uv_coords.detach().cpu().double().numpy()
        uv_faces = body.uv_faces.detach().cpu().numpy()
        key = hashlib.sha256(uv.tobytes() + uv_faces.astype(np.int64).tobytes()).hexdigest()[:16]
        path = cache_dir() / "uv" / f"{body.name}_{key}_{R}.npz"
        texel_face = texel_bary = None
        if use_cache and path.is_file():
            try:
                with np.load(path) as f:
                    texel_face, texel_bary = f["texel_face"], f["texel_bary"]
            except (OSError, ValueError, KeyError):
                texel_face = None  # unreadable cache entry: rebuild it
        if texel_face is None:
            start = time.perf_counter()
            texel_face, texel_bary = rasterize_uv(uv, uv_faces, R)
            elapsed = time.perf_counter() - start
            if use_cache and elapsed > 1.0:  # worth keeping only when it is slow to redo
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
                np.savez(tmp, texel_face=texel_face, texel_bary=texel_bary.astype(np.float32))
                os.replace(tmp, path)
        dtype = body.template_vertices.dtype
        self.texel_face = torch.as_tensor(texel_face)  # [R, R] long, -1 outside the layout
        self.texel_bary = torch.as_tensor(texel_bary, dtype=dtype)  # [R, R, 3]
        self.mask = self.texel_face >= 0  # [R, R]
        self._valid_face = self.texel_face[self.mask]  # [M]
        self._valid_bary = self.texel_bary[self.mask]  # [M, 3]
        self._parts: dict[str, Tensor] | None = None

    # ---- coordinates ----------------------------------------------------------------------------

    def texel_uv(self) -> Tensor:  # [R, R, 2]
        """UV coordinates of every texel centre (v = 0 at the bottom row)."""
        R = self.resolution
        c = (torch.arange(R, dtype=torch.float64) + 0.5) / R
        u = c[None, :].expand(R, R)
        v = (1.0 - c)[:, None].expand(R, R)
        return torch.stack([u, v], -1).to(self.texel_bary.dtype)

    def uv_to_texel(self, uv: Tensor) -> Tensor:  # [N, 2] -> [N, 2] long (row, column)
        """The texel holding each UV coordinate."""
        R = self.resolution
        col = torch.clamp((uv[:, 0] * R).floor().long(), 0, R - 1)
        row = torch.clamp(((1.0 - uv[:, 1]) * R).floor().long(), 0, R - 1)
        return torch.stack([row, col], -1)

    # ---- maps -----------------------------------------------------------------------------------

    def _scatter(self, values: Tensor) -> Tensor:  # [B, M, C] -> [B, R, R, C], zero outside
        B, _, C = values.shape
        R = self.resolution
        out = values.new_zeros(B, R * R, C)
        idx = self.mask.flatten().nonzero().flatten().to(values.device)
        out = out.index_copy(1, idx, values)
        return out.reshape(B, R, R, C)

    def position_map(self, vertices: Tensor) -> Tensor:  # [B, V, 3] -> [B, R, R, 3]
        """Surface position at every texel (zero outside the layout)."""
        if vertices.dim() == 2:
            vertices = vertices[None]
        pts = self.body.points_on_surface(vertices, self._valid_face, self._valid_bary)
        return self._scatter(pts)

    def normal_map(self, vertices: Tensor) -> Tensor:  # [B, V, 3] -> [B, R, R, 3]
        """Unit surface normal (smooth, from area-weighted vertex normals) at every texel; zero outside."""
        if vertices.dim() == 2:
            vertices = vertices[None]
        faces = self.body.faces.to(vertices.device)
        n = vertex_normals(vertices, faces)
        nt = interpolate_on_faces(n, faces, self._valid_face.to(vertices.device), self._valid_bary.to(vertices.device))
        return self._scatter(torch.nn.functional.normalize(nt, dim=-1, eps=1e-12))

    # ---- part masks -----------------------------------------------------------------------------

    def part_masks(self) -> dict[str, Tensor]:
        """Boolean ``[R, R]`` mask per body part (:data:`PART_NAMES`); they partition the valid texels."""
        if self._parts is None:
            face_part = self.body.face_parts().cpu()
            label = torch.full_like(self.texel_face, -1)
            label[self.mask] = face_part[self._valid_face]
            self._parts = {name: label == k for k, name in enumerate(PART_NAMES)}
        return self._parts

    def part_label_map(self) -> Tensor:  # [R, R] long, -1 outside
        """Index into :data:`PART_NAMES` per texel."""
        label = torch.full_like(self.texel_face, -1)
        for k, name in enumerate(PART_NAMES):
            label[self.part_masks()[name]] = k
        return label

    # ---- UV-structured point sets ----------------------------------------------------------------

    def sample_points(self, num: int | str = "texels", seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Surface points laid out in UV space: ``(face_idx [N], bary [N, 3], uv [N, 2])``.

        ``"texels"``: one point per valid texel, in row-major texel order (so an ``[R, R, C]`` UV image
        indexed by :attr:`mask` gives per-point attributes). An integer: that many points uniform over
        the UV layout's area (triangle by UV area, then uniform barycentrics), fixed by ``seed``.
        """
        if isinstance(num, str):
            if num != "texels":
                raise InputError(f"unknown point-set layout {num!r}", "pass 'texels' or a number of points")
            uv = self.texel_uv()[self.mask]
            return self._valid_face.clone(), self._valid_bary.clone(), uv
        if int(num) <= 0:
            raise InputError(f"number of points must be positive, got {num}", "pass e.g. 100_000")
        g = torch.Generator().manual_seed(int(seed))
        uvc = self.body.uv_coords.detach().cpu().double()
        tri = uvc[self.body.uv_faces.cpu()]  # [F, 3, 2]
        e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
        area = 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).abs()
        face_idx = torch.multinomial(area, int(num), replacement=True, generator=g)
        r1 = torch.rand(int(num), generator=g, dtype=torch.float64).sqrt()
        r2 = torch.rand(int(num), generator=g, dtype=torch.float64)
        bary = torch.stack([1.0 - r1, r1 * (1.0 - r2), r1 * r2], -1)  # uniform on a triangle
        uv = (tri[face_idx] * bary[..., None]).sum(1)
        dtype = self.texel_bary.dtype
        return face_idx, bary.to(dtype), uv.to(dtype)

    def points_on_surface(self, vertices: Tensor, face_idx: Tensor, bary: Tensor) -> Tensor:  # -> [B, N, 3]
        """Positions of a point set on (posed) meshes ``[B, V, 3]``: exact, they stay on the surface."""
        if vertices.dim() == 2:
            vertices = vertices[None]
        return self.body.points_on_surface(vertices, face_idx, bary)

    def skinning_weights(self, face_idx: Tensor, bary: Tensor) -> Tensor:  # -> [N, J]
        """Skinning weights at a point set, for points that leave the surface (offset Gaussians)."""
        return self.body.surface_skinning_weights(face_idx, bary)
