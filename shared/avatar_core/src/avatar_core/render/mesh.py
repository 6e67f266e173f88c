"""Z-buffer rasterization of triangle meshes, vectorised in PyTorch (the same code on CPU and CUDA).

A sparse rasterizer: every triangle enumerates the pixel centres inside its screen bounding box, keeps
those that pass the edge-function test, and a scatter-min over a packed ``(depth bits << 32) | triangle``
integer key picks the nearest triangle of every pixel in one pass. Only the winners then get their
perspective-correct barycentric coordinates. Triangles are grouped by bounding-box size: the small ones
(nearly all of a body mesh at 256-1024 px) are tested as dense ``[T, K]`` grids of K candidate pixels by
broadcasting, the large ones as an explicit (triangle, pixel) pair list; both are processed in chunks of
at most ``max_pairs`` candidates, so a triangle covering the whole image does not blow up memory.

Conventions (see :mod:`avatar_core.conventions`): OpenCV cameras, pixel ``(i, j)`` has its centre at
``(j + 0.5, i + 0.5)``; a pixel is covered when its centre is inside the triangle or on its edge.

The fragments are **not differentiable** with respect to the vertices (pixel coverage is discrete and
the barycentrics are recomputed without autograd); :func:`interpolate` is differentiable with respect
to the attributes it interpolates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from avatar_core.cameras import Cameras
from avatar_core.errors import InputError

__all__ = ["MeshFragments", "rasterize_mesh", "interpolate", "EMPTY_FACE"]

#: ``face_idx`` of pixels that no triangle covers.
EMPTY_FACE = -1

# Inside test tolerance in barycentric units: pixel centres exactly on an edge shared by two
# triangles are then drawn by both (rounding would otherwise leave pin-hole gaps along some edges).
_INSIDE_EPS = 1e-6
_EMPTY_KEY = torch.iinfo(torch.int64).max
# Size classes (candidate pixels per triangle) rasterized as dense [T, K] grids; larger ones use pair lists.
_DENSE_SLOTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class MeshFragments:
    """Per-pixel result of :func:`rasterize_mesh` for ``C`` cameras of size ``H x W``.

    ``depth`` is camera-space z (metres, > 0) of the visible surface and ``+inf`` where no triangle
    covers the pixel; ``bary`` and ``face_idx`` are 0 and ``-1`` there.
    """

    face_idx: Tensor  # [C, H, W] long, -1 where empty
    bary: Tensor  # [C, H, W, 3] perspective-correct barycentrics of the triangle's corners
    depth: Tensor  # [C, H, W] camera-space z, +inf where empty
    mask: Tensor  # [C, H, W] bool, True where a triangle is visible
    faces: Tensor  # [F, 3] the triangles that were rasterized (for per-vertex interpolation)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.face_idx.shape)


def _check(vertices: Tensor, faces: Tensor, cameras: Cameras) -> tuple[Tensor, Tensor]:
    if vertices.ndim == 2:
        vertices = vertices[None]
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise InputError(f"vertices must be [V, 3] or [C, V, 3], got {tuple(vertices.shape)}",
                         "pass world-space vertex positions")
    C = len(cameras)
    if vertices.shape[0] not in (1, C):
        raise InputError(f"vertices have a batch of {vertices.shape[0]} meshes for {C} cameras",
                         "pass one mesh [V, 3] for every camera, or one per camera [C, V, 3]")
    if faces.ndim != 2 or faces.shape[-1] != 3 or faces.is_floating_point():
        raise InputError(f"faces must be an integer tensor [F, 3], got {tuple(faces.shape)} {faces.dtype}",
                         "pass triangle vertex indices, e.g. body.faces")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[1]):
        raise InputError(f"faces index vertices outside [0, {vertices.shape[1]})",
                         "check that faces belong to this mesh")
    if not torch.isfinite(vertices).all():
        raise InputError("vertices contain NaN or infinite values", "check the posed mesh")
    return vertices, faces.to(device=vertices.device, dtype=torch.long)


@torch.no_grad()
def rasterize_mesh(
    vertices: Tensor,  # [V, 3] or [C, V, 3] world space
    faces: Tensor,  # [F, 3] long
    cameras: Cameras,
    near: float = 1e-2,
    cull_backfaces: bool = False,
    max_pairs: int = 1 << 20,
) -> MeshFragments:
    """Rasterize a triangle mesh into every camera with a z-buffer (nearest triangle wins).

    Args:
        vertices: world-space positions, one mesh shared by all cameras or one per camera.
        faces: triangle corner indices.
        cameras: C pinhole cameras (OpenCV, world-to-camera).
        near: near plane (camera z, metres); a triangle with **any** corner at ``z < near`` is dropped
            whole rather than clipped, which is exact for meshes entirely in front of the camera.
        cull_backfaces: drop triangles whose right-handed normal ``(v1 - v0) x (v2 - v0)`` points
            away from the camera (front faces wind counter-clockwise seen from outside, as the body
            models' do). Off by default: both windings are drawn.
        max_pairs: (triangle, pixel) candidate pairs processed at once; bounds memory for meshes with
            large screen-space triangles.

    Returns:
        :class:`MeshFragments`; ties in depth go to the lower triangle index.
    """
    vertices, faces = _check(vertices, faces, cameras)
    if not near > 0:
        raise InputError(f"near plane must be positive, got {near}", "pass near > 0 (metres), e.g. 0.01")
    C, W, H = len(cameras), cameras.width, cameras.height
    device = vertices.device
    F = faces.shape[0]
    cams = cameras.to(device=device, dtype=torch.float32)
    verts = vertices.to(torch.float32)

    # Camera space and pixel coordinates of every vertex, then of every triangle corner.
    R, t = cams.viewmats[:, :3, :3], cams.viewmats[:, :3, 3]
    cam = torch.baddbmm(t[:, None], verts.expand(C, -1, -1), R.transpose(-1, -2))  # [C, V, 3]
    z = cam[..., 2]
    inv_z = 1.0 / z.clamp_min(1e-12)
    K = cams.Ks
    px = (K[:, None, 0, 0] * cam[..., 0] + K[:, None, 0, 1] * cam[..., 1]) * inv_z + K[:, None, 0, 2]
    py = K[:, None, 1, 1] * cam[..., 1] * inv_z + K[:, None, 1, 2]
    corners = torch.stack([px, py, z, inv_z], -1).index_select(1, faces.reshape(-1)).reshape(C * F, 3, 4)
    x, y = corners[..., 0], corners[..., 1]  # [C*F, 3]
    # Signed doubled area in pixel coordinates; its sign is that of dot(normal, v0) in camera space,
    # so negative means the triangle's normal (v1 - v0) x (v2 - v0) faces the camera.
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])  # [C*F]
    keep = (corners[..., 2].amin(-1) >= near) & (area.abs() > 1e-12)
    if cull_backfaces:
        keep &= area < 0

    # Pixel index ranges whose centres lie in the bounding box (clamped to the image).
    lo, hi = corners[..., :2].amin(1), corners[..., :2].amax(1)  # [C*F, 2] (x, y)
    size = torch.tensor([W, H], dtype=lo.dtype, device=device)
    first = torch.ceil(torch.minimum(lo.clamp_min(-1.0), size + 1) - 0.5).clamp_min(0).long()
    last = torch.minimum(torch.floor(torch.minimum(hi.clamp_min(-1.0), size + 1) - 0.5).long(), (size - 1).long())
    extent = (last - first + 1).clamp_min(0)
    count = torch.where(keep, extent[:, 0] * extent[:, 1], torch.zeros_like(extent[:, 0]))  # [C*F]
    flat_j0, flat_i0, flat_bw = first[:, 0], first[:, 1], extent[:, 0]

    key = torch.full((C * H * W,), _EMPTY_KEY, dtype=torch.int64, device=device)
    cand = torch.nonzero(count, as_tuple=True)[0]  # (camera, face) rows with candidate pixels
    if cand.numel():
        # Group candidates by size class (at most K candidate pixels each), so each class is a slice.
        size_class = torch.bucketize(count[cand], torch.tensor(_DENSE_SLOTS, device=device))
        size_class, order = torch.sort(size_class, stable=True)
        cand = cand[order]
        bounds = [0, *torch.bincount(size_class, minlength=len(_DENSE_SLOTS) + 1).cumsum(0).tolist()]
        coef = _affine_coefficients(corners[cand])  # [T, 11]
        n, j0, i0, bw = count[cand], flat_j0[cand], flat_i0[cand], flat_bw[cand]
        # Small triangles, nearly all of a body mesh: each class is a dense [T, K] grid of candidate
        # pixels computed by broadcasting, without per-pixel gathers.
        for b, slots in enumerate(_DENSE_SLOTS):
            step = max(1, max_pairs // slots)
            for lo in range(bounds[b], bounds[b + 1], step):
                sl = slice(lo, min(lo + step, bounds[b + 1]))
                _scatter_dense(key, cand[sl], n[sl], j0[sl], i0[sl], bw[sl], coef[sl], slots, F, H, W)
        # Large triangles: an explicit (triangle, pixel) pair list, generated and tested in chunks of
        # max_pairs pairs (a chunk may start or end inside a triangle).
        big = slice(bounds[-2], bounds[-1])
        if big.stop > big.start:
            ends = torch.cumsum(n[big], 0)
            total = int(ends[-1])
            for p0 in range(0, total, max_pairs):
                _scatter_pairs(key, p0, min(p0 + max_pairs, total), ends, cand[big], n[big], j0[big], i0[big],
                               bw[big], coef[big], F, H, W)

    # The winning key holds the fragment's depth bits and triangle; only barycentrics are recomputed.
    mask = key != _EMPTY_KEY
    face_idx = torch.where(mask, key & 0xFFFFFFFF, torch.full_like(key, EMPTY_FACE))
    depth = torch.where(mask, (key >> 32).to(torch.int32).view(torch.float32),
                        torch.full((), float("inf"), device=device))
    pix = torch.nonzero(mask, as_tuple=True)[0]
    bary = torch.zeros(C * H * W, 3, dtype=torch.float32, device=device)
    for p0 in range(0, pix.numel(), max_pairs):
        p = pix[p0:p0 + max_pairs]
        cam_idx = torch.div(p, H * W, rounding_mode="floor")
        rem = p - cam_idx * (H * W)
        row = torch.div(rem, W, rounding_mode="floor")
        col = rem - row * W
        coef = _affine_coefficients(corners[cam_idx * F + face_idx[p]])
        bary.index_copy_(0, p, _barycentrics(coef, col, row)[0])
    return MeshFragments(face_idx.reshape(C, H, W), bary.reshape(C, H, W, 3), depth.reshape(C, H, W),
                         mask.reshape(C, H, W), faces)


def _affine_coefficients(corners: Tensor) -> Tensor:  # [T, 3, 4] (x, y, z, 1/z) -> [T, 11]
    """Screen-space barycentrics as affine functions of the pixel centre relative to corner 0,
    ``l_k = a_k (x - x_0) + b_k (y - y_0) + [k = 0]``, normalised by the signed area so that "inside" reads
    ``l >= 0`` for either winding. Relative coordinates keep float32 exact to ~1e-5 px at any image size.

    Columns: ``a_0..a_2, b_0..b_2, x_0, y_0, 1/z_0..1/z_2``."""
    x0, y0 = corners[:, 0, 0], corners[:, 0, 1]
    X1, Y1 = corners[:, 1, 0] - x0, corners[:, 1, 1] - y0
    X2, Y2 = corners[:, 2, 0] - x0, corners[:, 2, 1] - y0
    area = X1 * Y2 - X2 * Y1
    inv = 1.0 / torch.where(area == 0, torch.ones_like(area), area)
    a1, b1 = Y2 * inv, -X2 * inv
    a2, b2 = -Y1 * inv, X1 * inv
    return torch.stack([-(a1 + a2), a1, a2, -(b1 + b2), b1, b2, x0, y0,
                        corners[:, 0, 3], corners[:, 1, 3], corners[:, 2, 3]], -1)


def _screen_barycentrics(cf: Tensor, xr: Tensor, yr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``l_0, l_1, l_2`` from coefficient columns ``[T, 1]`` broadcast against offsets from corner 0."""
    l1 = cf[:, 1, None] * xr + cf[:, 4, None] * yr
    l2 = cf[:, 2, None] * xr + cf[:, 5, None] * yr
    l0 = (cf[:, 0, None] * xr + cf[:, 3, None] * yr) + 1.0
    return l0, l1, l2


def _barycentrics(coef: Tensor, col: Tensor, row: Tensor) -> tuple[Tensor, Tensor]:
    """Perspective-correct barycentrics ``[N, 3]`` and depth ``[N]`` at pixel centres of given triangles.

    Screen barycentrics ``l`` are affine in the pixel; ``1/z`` is too, so the 3D barycentrics are
    ``l_k / z_k`` renormalised and the depth is ``1 / sum_k(l_k / z_k)``.
    """
    xr = ((col.to(coef.dtype) + 0.5) - coef[:, 6])[:, None]
    yr = ((row.to(coef.dtype) + 0.5) - coef[:, 7])[:, None]
    lam = torch.cat(_screen_barycentrics(coef, xr, yr), -1)  # [N, 3]
    w = lam.clamp_min(0) * coef[:, 8:11]
    s = w.sum(-1, keepdim=True)
    return w / s, 1.0 / s[:, 0]


def _pack(depth: Tensor, face: Tensor) -> Tensor:
    """Positive float32 bit patterns order like the floats, so ``(depth bits << 32) | face`` sorts by depth
    first and by triangle index on ties."""
    return (depth.to(torch.float32).view(torch.int32).to(torch.int64) << 32) | face


def _inside_and_inverse_depth(cf: Tensor, xr: Tensor, yr: Tensor) -> tuple[Tensor, Tensor]:
    l0, l1, l2 = _screen_barycentrics(cf, xr, yr)
    inside = (l0 >= -_INSIDE_EPS) & (l1 >= -_INSIDE_EPS) & (l2 >= -_INSIDE_EPS)
    inv_depth = l0.clamp_min(0) * cf[:, 8, None] + l1.clamp_min(0) * cf[:, 9, None] + l2.clamp_min(0) * cf[:, 10, None]
    return inside, inv_depth


def _scatter_dense(key: Tensor, tri: Tensor, n: Tensor, j0: Tensor, i0: Tensor, bw: Tensor, cf: Tensor,
                   slots: int, F: int, H: int, W: int) -> None:
    """Edge-test ``slots`` candidate pixels of every triangle in ``tri`` at once and scatter-min the keys."""
    s = torch.arange(slots, device=key.device, dtype=cf.dtype)  # [K]
    bwf = bw.to(cf.dtype)[:, None]  # [T, 1]
    dy = torch.floor((s + 0.5) / bwf)  # [T, K] row offset inside the bounding box (exact for small ints)
    dx = s - dy * bwf
    xr = dx + (j0.to(cf.dtype) + 0.5 - cf[:, 6])[:, None]
    yr = dy + (i0.to(cf.dtype) + 0.5 - cf[:, 7])[:, None]
    inside, inv_depth = _inside_and_inverse_depth(cf, xr, yr)  # [T, K]
    if slots > 1:
        inside &= s < n[:, None]
    flat = torch.nonzero(inside.reshape(-1), as_tuple=True)[0]
    if flat.numel() == 0:
        return
    t_sel = torch.div(flat, slots, rounding_mode="floor") if slots > 1 else flat
    cam_face = tri[t_sel]
    cam_idx = torch.div(cam_face, F, rounding_mode="floor")
    row = i0[t_sel] + dy.reshape(-1)[flat].long()
    col = j0[t_sel] + dx.reshape(-1)[flat].long()
    pix = cam_idx * (H * W) + row * W + col
    key.scatter_reduce_(0, pix, _pack(1.0 / inv_depth.reshape(-1)[flat], cam_face - cam_idx * F), reduce="amin")


def _scatter_pairs(key: Tensor, p0: int, p1: int, ends: Tensor, tri: Tensor, n: Tensor, j0: Tensor, i0: Tensor,
                   bw: Tensor, coef: Tensor, F: int, H: int, W: int) -> None:
    """Edge-test pairs ``p0 .. p1 - 1`` of the (triangle, pixel) pair list of ``tri`` (triangle ``t`` owns
    pairs ``ends[t] - n[t] .. ends[t] - 1``, its bounding box row by row) and scatter-min their keys."""
    g = torch.arange(p0, p1, device=key.device)
    owner = torch.searchsorted(ends, g, right=True)
    local = g - (ends - n)[owner]
    bwo = bw[owner]
    dy = torch.div(local, bwo, rounding_mode="floor")
    col = j0[owner] + (local - dy * bwo)
    row = i0[owner] + dy
    cf = coef[owner]  # [P, 11]
    xr = (col.to(cf.dtype) + 0.5 - cf[:, 6])[:, None]
    yr = (row.to(cf.dtype) + 0.5 - cf[:, 7])[:, None]
    inside, inv_depth = _inside_and_inverse_depth(cf, xr, yr)  # [P, 1]
    sel = torch.nonzero(inside[:, 0], as_tuple=True)[0]
    cam_face = tri[owner[sel]]
    cam_idx = torch.div(cam_face, F, rounding_mode="floor")
    pix = cam_idx * (H * W) + row[sel] * W + col[sel]
    key.scatter_reduce_(0, pix, _pack(1.0 / inv_depth[sel, 0], cam_face - cam_idx * F), reduce="amin")


def interpolate(
    fragments: MeshFragments,
    attributes: Tensor,  # [V, D], [C, V, D] per vertex, or [F, 3, D] per face corner
    per: Literal["auto", "vertex", "corner"] = "auto",
) -> Tensor:  # [C, H, W, D]
    """Barycentric interpolation of mesh attributes at every covered pixel; zeros where empty.

    ``per="corner"`` takes one value per triangle corner (e.g. ``uv_coords[uv_faces]`` for UV seams);
    ``"auto"`` picks it for any ``[F, 3, D]`` tensor (pass ``per="vertex"`` for a ``[C, V, D]`` batch that
    happens to have that shape).
    Differentiable with respect to ``attributes``.
    """
    C, H, W = fragments.face_idx.shape
    faces = fragments.faces
    F = faces.shape[0]
    if per == "auto":
        per = "corner" if attributes.ndim == 3 and tuple(attributes.shape[:2]) == (F, 3) else "vertex"
    if per not in ("vertex", "corner"):
        raise InputError(f"unknown interpolation mode per={per!r}", "use 'auto', 'vertex' or 'corner'")
    if per == "corner" and (attributes.ndim != 3 or attributes.shape[:2] != (F, 3)):
        raise InputError(f"per-corner attributes must be [F={F}, 3, D], got {tuple(attributes.shape)}",
                         "gather them per triangle, e.g. uv_coords[uv_faces]")
    if per == "vertex" and not (attributes.ndim == 2 or (attributes.ndim == 3 and attributes.shape[0] in (1, C))):
        raise InputError(f"per-vertex attributes must be [V, D] or [C={C}, V, D], got {tuple(attributes.shape)}",
                         "pass one row per mesh vertex")

    device = fragments.face_idx.device
    attributes = attributes.to(device)
    dtype = attributes.dtype if attributes.is_floating_point() else torch.float32
    D = attributes.shape[-1]
    mask = fragments.mask.reshape(-1)
    pix = torch.nonzero(mask, as_tuple=True)[0]
    face = fragments.face_idx.reshape(-1)[pix]
    bary = fragments.bary.reshape(-1, 3)[pix].to(dtype)
    if per == "corner":
        corner_vals = attributes[face]  # [N, 3, D]
    elif attributes.ndim == 2 or attributes.shape[0] == 1:
        corner_vals = attributes.reshape(-1, D)[faces[face]]
    else:
        cam_idx = torch.div(pix, H * W, rounding_mode="floor")
        corner_vals = attributes[cam_idx[:, None], faces[face]]  # [N, 3, D]
    vals = (corner_vals.to(dtype) * bary[..., None]).sum(-2)  # [N, D]
    out = torch.zeros(C * H * W, D, dtype=dtype, device=device)
    out = out.index_put((pix,), vals)
    return out.reshape(C, H, W, D)
