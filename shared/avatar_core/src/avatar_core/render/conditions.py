"""Conditioning images of a posed body for diffusion models: normals, silhouettes, depth, part labels and
OpenPose skeletons, batched over cameras.

Every function takes the posed body (a :class:`~avatar_core.body.BodyOutput` or world-space vertices
``[V, 3]`` / ``[C, V, 3]``), the :class:`~avatar_core.body.BodyModel` it came from, and
:class:`~avatar_core.cameras.Cameras`; each accepts ``fragments`` from an earlier
:func:`rasterize_body` so that one rasterization serves several maps (:func:`render_conditions` does
that for you). Images are float ``[C, H, W, ch]`` in ``[0, 1]``, channels last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from avatar_core.body.model import OPENPOSE_18, PART_NAMES, BodyModel, BodyOutput
from avatar_core.cameras import Cameras
from avatar_core.errors import InputError
from avatar_core.render.mesh import MeshFragments, interpolate, rasterize_mesh

__all__ = [
    "DepthMap",
    "OPENPOSE_LIMBS",
    "OPENPOSE_COLORS",
    "PART_COLORS",
    "rasterize_body",
    "silhouette",
    "normal_map",
    "depth_map",
    "part_label_map",
    "keypoint_visibility",
    "openpose_image",
    "render_conditions",
]

Body = BodyOutput | Tensor

#: The 17 limbs drawn by ControlNet's OpenPose annotator (``util.draw_bodypose``), as pairs of indices
#: into :data:`~avatar_core.body.model.OPENPOSE_18`; limb ``k`` is drawn in colour ``k``.
OPENPOSE_LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)


def _hue_wheel(n: int) -> Tensor:  # [n, 3] in [0, 1]
    """Fully saturated colours at hues ``360 k / n`` degrees (HSV with S = V = 1)."""
    h = torch.arange(n, dtype=torch.float64) * (6.0 / n)  # hue in sextants
    # Each channel is a trapezoid in hue: full within one sextant of its centre, ramping over the next.
    centres = torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64)
    d = (h[:, None] - centres[None]).remainder(6.0)
    d = torch.minimum(d, 6.0 - d)
    return (2.0 - d).clamp(0.0, 1.0).float()


#: The 18 keypoint / limb colours of the OpenPose annotator: a hue wheel in 20-degree steps starting at
#: red ((255, 0, 0), (255, 85, 0), (255, 170, 0), ... (255, 0, 85)), as floats in [0, 1].
OPENPOSE_COLORS: Tensor = _hue_wheel(18)

#: One colour per body part of :data:`~avatar_core.body.model.PART_NAMES` (RGB in [0, 1]).
PART_COLORS: Tensor = torch.tensor([
    [0.95, 0.80, 0.60],  # head
    [0.45, 0.25, 0.10],  # hair
    [0.20, 0.45, 0.90],  # upper_body
    [0.10, 0.70, 0.35],  # lower_body
    [0.95, 0.55, 0.10],  # arms
    [0.90, 0.20, 0.25],  # hands
    [0.60, 0.30, 0.80],  # legs
    [0.95, 0.90, 0.15],  # feet
])
assert PART_COLORS.shape[0] == len(PART_NAMES)


@dataclass
class DepthMap:
    """Depth of the visible surface: normalised for conditioning, and in metres."""

    normalized: Tensor  # [C, H, W, 1] in [0, 1]; near = 1, far = 0 (or the reverse, see depth_map), 0 off-body
    metric: Tensor  # [C, H, W] camera-space z in metres, 0 off-body
    mask: Tensor  # [C, H, W] bool
    near: Tensor  # [C] the depth mapped to 1 (or 0 when not inverted)
    far: Tensor  # [C]


# ----------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------


def _vertices(body: Body, cameras: Cameras) -> Tensor:  # [V, 3] or [C, V, 3]
    verts = body.vertices if isinstance(body, BodyOutput) else body
    if not isinstance(verts, Tensor) or verts.shape[-1] != 3 or verts.ndim not in (2, 3):
        raise InputError(f"expected a BodyOutput or vertices [V, 3] / [C, V, 3], got {type(body).__name__}"
                         f"{'' if not isinstance(verts, Tensor) else tuple(verts.shape)}",
                         "pass model(...) output or its .vertices")
    if verts.ndim == 3:
        if verts.shape[0] == 1:
            return verts[0]
        if verts.shape[0] != len(cameras):
            raise InputError(f"{verts.shape[0]} bodies for {len(cameras)} cameras",
                             "pose one body for all cameras, or one body per camera")
    return verts


def rasterize_body(body: Body, model: BodyModel, cameras: Cameras) -> MeshFragments:
    """Visible triangle, barycentrics and depth of the posed body at every pixel (one z-buffer pass)."""
    verts = _vertices(body, cameras)
    return rasterize_mesh(verts, model.faces.to(verts.device), cameras.to(verts.device))


def _fragments(body: Body, model: BodyModel, cameras: Cameras, fragments: MeshFragments | None) -> MeshFragments:
    if fragments is None:
        return rasterize_body(body, model, cameras)
    if fragments.face_idx.shape != (len(cameras), cameras.height, cameras.width):
        raise InputError(f"fragments of shape {tuple(fragments.face_idx.shape)} do not match "
                         f"{len(cameras)} cameras of {cameras.width}x{cameras.height}",
                         "rasterize with the same cameras, or pass fragments=None")
    return fragments


def _background(value: float | Tensor | tuple, channels: int, like: Tensor) -> Tensor:  # [C?, ch]
    bg = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if bg.ndim == 0:
        bg = bg.expand(channels)
    if bg.shape[-1] != channels:
        raise InputError(f"background has {bg.shape[-1]} channels, the image {channels}",
                         f"pass a scalar or {channels} values")
    return bg


def _composite(values: Tensor, mask: Tensor, background) -> Tensor:  # [C, H, W, ch]
    bg = _background(background, values.shape[-1], values)
    bg = bg.reshape(-1, 1, 1, values.shape[-1]) if bg.ndim == 2 else bg
    return torch.where(mask[..., None], values, bg)


# ----------------------------------------------------------------------------------------------------
# Surface maps
# ----------------------------------------------------------------------------------------------------


def silhouette(body: Body, model: BodyModel, cameras: Cameras,
               fragments: MeshFragments | None = None) -> Tensor:  # [C, H, W, 1]
    """1 where the body covers the pixel centre, 0 elsewhere (not anti-aliased)."""
    frags = _fragments(body, model, cameras, fragments)
    return frags.mask[..., None].float()


def normal_map(
    body: Body,
    model: BodyModel,
    cameras: Cameras,
    space: Literal["world", "camera", "camera_opengl"] = "world",
    background: float | tuple[float, float, float] | Tensor = 0.0,
    fragments: MeshFragments | None = None,
    encode: bool = True,
) -> Tensor:  # [C, H, W, 3]
    """Smooth (vertex-interpolated) surface normals, encoded to RGB as ``(n + 1) / 2``.

    ``space``: ``"world"`` (canonical axes, +Y up); ``"camera"`` (OpenCV: +X right, +Y down, +Z into
    the scene, so visible surfaces have ``n_z < 0``); ``"camera_opengl"`` (+X right, +Y up, +Z towards
    the viewer: visible surfaces are bluish, the look of most normal-map conditioning images).
    ``encode=False`` returns the unit normals themselves (``background`` then fills empty pixels as is).
    """
    frags = _fragments(body, model, cameras, fragments)
    verts = _vertices(body, cameras)
    normals = model.vertex_normals(verts if verts.ndim == 3 else verts[None])  # [1 or C, V, 3]
    n = interpolate(frags, normals)  # [C, H, W, 3]
    if space in ("camera", "camera_opengl"):
        R = cameras.viewmats[:, :3, :3].to(n)  # [C, 3, 3]
        n = torch.einsum("cab,chwb->chwa", R, n)
        if space == "camera_opengl":
            n = n * torch.tensor([1.0, -1.0, -1.0], dtype=n.dtype, device=n.device)
    elif space != "world":
        raise InputError(f"unknown normal space {space!r}", "use 'world', 'camera' or 'camera_opengl'")
    n = torch.nn.functional.normalize(n, dim=-1, eps=1e-12)
    if encode:
        n = (n + 1.0) * 0.5
    return _composite(n, frags.mask, background)


def depth_map(
    body: Body,
    model: BodyModel,
    cameras: Cameras,
    near: float | Tensor | None = None,  # scalar or [C]; default: nearest visible depth per view
    far: float | Tensor | None = None,  # scalar or [C]; default: farthest visible depth per view
    invert: bool = True,
    fragments: MeshFragments | None = None,
) -> DepthMap:
    """Camera-space depth in metres and a copy mapped to ``[0, 1]`` between ``near`` and ``far``.

    With ``invert`` (default) near surfaces are bright, as in the depth images ControlNet-style models
    are conditioned on; the background is 0 in both maps. Depths outside ``[near, far]`` are clamped.
    """
    frags = _fragments(body, model, cameras, fragments)
    mask = frags.mask
    C = mask.shape[0]
    metric = torch.where(mask, frags.depth, torch.zeros_like(frags.depth))
    flat = frags.depth.reshape(C, -1)
    any_hit = mask.reshape(C, -1).any(-1)
    if near is None:
        near_t = torch.where(any_hit, flat.amin(-1), torch.zeros(C, device=flat.device))
    else:
        near_t = torch.as_tensor(near, dtype=flat.dtype, device=flat.device).expand(C)
    if far is None:
        far_t = torch.where(any_hit, torch.where(mask.reshape(C, -1), flat, torch.zeros_like(flat)).amax(-1),
                            torch.ones(C, device=flat.device))
    else:
        far_t = torch.as_tensor(far, dtype=flat.dtype, device=flat.device).expand(C)
    if torch.any(far_t < near_t):
        raise InputError(f"depth range far={far_t.tolist()} is below near={near_t.tolist()}",
                         "pass near < far (metres along the camera axis)")
    span = (far_t - near_t).clamp_min(1e-6)[:, None, None]
    t = ((frags.depth - near_t[:, None, None]) / span).clamp(0.0, 1.0)
    if invert:
        t = 1.0 - t
    normalized = torch.where(mask, t, torch.zeros_like(t))[..., None]
    return DepthMap(normalized, metric, mask, near_t, far_t)


def part_label_map(
    body: Body,
    model: BodyModel,
    cameras: Cameras,
    background: float | tuple[float, float, float] | Tensor = 0.0,
    fragments: MeshFragments | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-pixel body-part index into :data:`PART_NAMES` (``[C, H, W]`` long, -1 off the body) and the
    same labels as a colour image ``[C, H, W, 3]`` (:data:`PART_COLORS`)."""
    frags = _fragments(body, model, cameras, fragments)
    parts = model.face_parts().to(frags.face_idx.device)  # [F]
    labels = torch.where(frags.mask, parts[frags.face_idx.clamp_min(0)], torch.full_like(frags.face_idx, -1))
    colours = PART_COLORS.to(frags.face_idx.device)[labels.clamp_min(0)]
    return labels, _composite(colours, frags.mask, background)


# ----------------------------------------------------------------------------------------------------
# OpenPose skeletons
# ----------------------------------------------------------------------------------------------------

_NOSE, _R_EYE, _L_EYE, _R_EAR, _L_EAR = (OPENPOSE_18.index(n) for n in
                                         ("nose", "right_eye", "left_eye", "right_ear", "left_ear"))
_FACE = (_NOSE, _R_EYE, _L_EYE, _R_EAR, _L_EAR)


def keypoint_visibility(
    keypoints_px: Tensor,  # [C, 18, 2] pixel coordinates
    keypoints_depth: Tensor,  # [C, 18] camera-space z
    width: int,
    height: int,
    depth_buffer: Tensor | None = None,  # [C, H, W] the body's z-buffer (+inf where empty)
    depth_margin: float = 0.2,
    face_rule: bool = True,
) -> Tensor:  # [C, 18] bool
    """Which OpenPose keypoints to draw in each view.

    A keypoint is drawn when it projects inside the image in front of the camera, and:

    * face keypoints follow GaussianIP's rule (``threestudio/utils/poser.py``, ``Skeleton.openpose_draw``),
      which compares the depth of the nose with the depths of the two ears: nose farther than the left ear
      but nearer than the right ear (a view from the subject's left) hides the right eye and right ear;
      the mirror case hides the left eye and left ear; nose farther than both ears (a view from behind)
      hides the nose and both eyes, keeping the ears. (GaussianIP's extra azimuth-range exceptions depend
      on its own camera parameterisation and are not reproduced.)
    * body keypoints (neck to ankles) are tested against the body's depth buffer: keypoints are joint
      centres inside the body, so one is hidden only when it lies more than ``depth_margin`` metres behind
      the visible surface at its pixel (the far arm or leg in a side view, not the near one).
    """
    C, K = keypoints_depth.shape
    x, y = keypoints_px[..., 0], keypoints_px[..., 1]
    vis = (keypoints_depth > 0) & (x >= 0) & (x < width) & (y >= 0) & (y < height)
    if face_rule:
        zn, zre, zle = keypoints_depth[:, _NOSE], keypoints_depth[:, _R_EAR], keypoints_depth[:, _L_EAR]
        from_left = (zn > zle) & (zn < zre)
        from_right = (zn < zle) & (zn > zre)
        from_back = (zn > zle) & (zn > zre)
        hide = torch.zeros_like(vis)
        hide[:, _R_EYE] |= from_left
        hide[:, _R_EAR] |= from_left
        hide[:, _L_EYE] |= from_right
        hide[:, _L_EAR] |= from_right
        for k in (_NOSE, _R_EYE, _L_EYE):
            hide[:, k] |= from_back
        vis &= ~hide
    if depth_buffer is not None:
        body_kp = torch.ones(K, dtype=torch.bool, device=vis.device)
        body_kp[list(_FACE)] = False
        col = x.floor().long().clamp(0, width - 1)
        row = y.floor().long().clamp(0, height - 1)
        cam = torch.arange(C, device=vis.device)[:, None].expand(C, K)
        surface = depth_buffer[cam, row, col]  # [C, K]; +inf where the pixel shows no body
        behind = keypoints_depth > surface + depth_margin
        vis &= ~(behind & body_kp)
    return vis


def _window(x0: float, x1: float, y0: float, y1: float, width: int, height: int):
    """Pixel index ranges (rows, cols) whose centres lie in ``[x0, x1] x [y0, y1]``, or None if empty."""
    j0, j1 = max(math.ceil(x0 - 0.5), 0), min(math.floor(x1 - 0.5), width - 1)
    i0, i1 = max(math.ceil(y0 - 0.5), 0), min(math.floor(y1 - 0.5), height - 1)
    if j1 < j0 or i1 < i0:
        return None
    return slice(i0, i1 + 1), slice(j0, j1 + 1)


def _draw_skeleton(
    px: Tensor,  # [C, 18, 2]
    visible: Tensor,  # [C, 18] bool
    width: int,
    height: int,
    stick_width: float,
    radius: float,
) -> Tensor:  # [C, H, W, 3]
    """Paint OpenPose's picture: a filled disc per keypoint, then an ellipse per limb blended 60 % over it.

    This is the drawing of ControlNet's annotator (``annotator/openpose/util.py``, ``draw_bodypose``):
    discs of radius 4 px in the keypoint colours, then for every limb whose two ends are present an ellipse
    with half-axes (half the limb length, stick width 4 px) in the limb colour, composited as
    ``0.4 * canvas + 0.6 * colour``; here both sizes scale with the image. Each shape is tested only on the
    pixels of its bounding box.
    """
    C = px.shape[0]
    device = px.device
    colours = OPENPOSE_COLORS.to(device=device, dtype=px.dtype)
    canvas = torch.zeros(C, height, width, 3, device=device, dtype=px.dtype)
    pts = px.detach().double().cpu().tolist()
    vis = visible.cpu().tolist()

    def grid(win):  # pixel centres of a window, [h, 1] and [1, w]
        rows, cols = win
        ys = torch.arange(rows.start, rows.stop, device=device, dtype=px.dtype)[:, None] + 0.5
        xs = torch.arange(cols.start, cols.stop, device=device, dtype=px.dtype)[None, :] + 0.5
        return xs, ys

    for c in range(C):
        img = canvas[c]
        for k, (cx, cy) in enumerate(pts[c]):
            win = _window(cx - radius, cx + radius, cy - radius, cy + radius, width, height) if vis[c][k] else None
            if win is None:
                continue
            xs, ys = grid(win)
            disc = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2
            img[win][disc] = colours[k]
        for k, (a, b) in enumerate(OPENPOSE_LIMBS):
            if not (vis[c][a] and vis[c][b]):
                continue
            (xa, ya), (xb, yb) = pts[c][a], pts[c][b]
            mx, my = 0.5 * (xa + xb), 0.5 * (ya + yb)
            length = math.hypot(xb - xa, yb - ya)
            ux, uy = ((xb - xa) / length, (yb - ya) / length) if length > 1e-6 else (1.0, 0.0)
            semi = max(0.5 * length, 0.5)
            ex = abs(ux) * semi + abs(uy) * stick_width  # half extents of the ellipse's bounding box
            ey = abs(uy) * semi + abs(ux) * stick_width
            win = _window(mx - ex, mx + ex, my - ey, my + ey, width, height)
            if win is None:
                continue
            xs, ys = grid(win)
            dx, dy = xs - mx, ys - my
            inside = ((dx * ux + dy * uy) / semi) ** 2 + ((dy * ux - dx * uy) / stick_width) ** 2 <= 1.0
            patch = img[win]
            patch[inside] = 0.4 * patch[inside] + 0.6 * colours[k]
    return canvas


def openpose_image(
    body: BodyOutput,
    model: BodyModel,
    cameras: Cameras,
    occlusion: bool = True,
    depth_margin: float | None = None,
    stick_width: float | None = None,
    keypoints: Tensor | None = None,  # [18, 3] or [C, 18, 3] world space, overrides model.keypoints(body)
    fragments: MeshFragments | None = None,
    visibility: Tensor | None = None,  # [C, 18] bool, ANDed with the computed visibility
) -> tuple[Tensor, Tensor, Tensor]:
    """OpenPose-style skeleton image of the body's 18 COCO keypoints, as ControlNet-openpose expects.

    Returns the image ``[C, H, W, 3]`` (black background), the keypoints' pixel coordinates
    ``[C, 18, 2]`` and their visibility ``[C, 18]`` (see :func:`keypoint_visibility`; with
    ``occlusion=False`` every keypoint inside the image is drawn). ``depth_margin`` defaults to 12 % of
    the body's rest height; ``stick_width`` to 4 px at 512 px, scaled with the image's smaller side.
    ``visibility`` hides further keypoints per camera (a method's own view-dependent skeleton cropping).
    """
    if keypoints is None:
        if not isinstance(body, BodyOutput):
            raise InputError("openpose_image needs the body's joints",
                             "pass the BodyOutput of model(...), or keypoints=[18, 3] world positions")
        keypoints = model.keypoints(body, OPENPOSE_18)  # [B, 18, 3]
    if keypoints.ndim == 2:
        keypoints = keypoints[None]
    C = len(cameras)
    if keypoints.shape[0] not in (1, C) or keypoints.shape[1:] != (len(OPENPOSE_18), 3):
        raise InputError(f"keypoints of shape {tuple(keypoints.shape)} for {C} cameras",
                         "pass [18, 3] or [C, 18, 3] world positions in OpenPose order")
    keypoints = keypoints.expand(C, -1, -1)
    cams = cameras.to(device=keypoints.device, dtype=torch.float32)
    px, z = cams.project(keypoints.float())  # [C, 18, 2], [C, 18]
    H, W = cameras.height, cameras.width
    depth_buffer = None
    if occlusion:
        frags = _fragments(body, model, cameras, fragments)
        depth_buffer = frags.depth
        if depth_margin is None:
            rest = body.rest_vertices if isinstance(body, BodyOutput) else model.template_vertices[None]
            depth_margin = 0.12 * float((rest[..., 1].amax(-1) - rest[..., 1].amin(-1)).max())
        visible = keypoint_visibility(px, z, W, H, depth_buffer.to(px.device), depth_margin, face_rule=True)
    else:
        visible = keypoint_visibility(px, z, W, H, None, face_rule=False)
    if visibility is not None:
        if visibility.shape != visible.shape:
            raise InputError(f"visibility of shape {tuple(visibility.shape)} for keypoints {tuple(visible.shape)}",
                             "pass a [C, 18] boolean mask")
        visible = visible & visibility.to(visible.device, torch.bool)
    scale = min(H, W) / 512.0
    sw = 4.0 * scale if stick_width is None else float(stick_width)
    image = _draw_skeleton(px, visible, W, H, max(sw, 0.75), max(4.0 * scale, 1.0))
    return image, px, visible


def render_conditions(
    body: Body,
    model: BodyModel,
    cameras: Cameras,
    which: tuple[str, ...] = ("normal", "silhouette", "depth", "parts", "openpose"),
    normal_space: Literal["world", "camera", "camera_opengl"] = "world",
) -> dict[str, Tensor]:
    """Several conditioning images from one rasterization: keys ``normal``, ``silhouette``, ``depth``
    (normalised), ``depth_metric``, ``parts`` (colour image), ``part_labels`` and ``openpose``."""
    known = {"normal", "silhouette", "depth", "parts", "openpose"}
    unknown = set(which) - known
    if unknown:
        raise InputError(f"unknown conditioning images {sorted(unknown)}", f"choose from {sorted(known)}")
    frags = rasterize_body(body, model, cameras)
    out: dict[str, Tensor] = {}
    if "normal" in which:
        out["normal"] = normal_map(body, model, cameras, space=normal_space, fragments=frags)
    if "silhouette" in which:
        out["silhouette"] = silhouette(body, model, cameras, fragments=frags)
    if "depth" in which:
        d = depth_map(body, model, cameras, fragments=frags)
        out["depth"], out["depth_metric"] = d.normalized, d.metric
    if "parts" in which:
        out["part_labels"], out["parts"] = part_label_map(body, model, cameras, fragments=frags)
    if "openpose" in which:
        out["openpose"] = openpose_image(body, model, cameras, fragments=frags)[0]
    return out
