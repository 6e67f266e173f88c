"""Conditioning images of the Anny body on known views: mirroring, coverage, normals, occlusion, colours."""

from __future__ import annotations

import pytest
import torch

from avatar_core.body import OPENPOSE_18, PART_NAMES, load_body_model
from avatar_core.cameras import orbit_cameras
from avatar_core.render.conditions import (
    OPENPOSE_COLORS,
    OPENPOSE_LIMBS,
    depth_map,
    normal_map,
    openpose_image,
    part_label_map,
    rasterize_body,
    render_conditions,
    silhouette,
)

KP = {name: k for k, name in enumerate(OPENPOSE_18)}


@pytest.fixture(scope="module")
def body():
    model = load_body_model("anny")
    return model, model()


@pytest.fixture(scope="module")
def views():
    """Front (camera on +Z), subject's left (+X), back (-Z), subject's right (-X)."""
    return orbit_cameras(4, radius=2.6, fov_deg=40, width=192, height=192)


@pytest.fixture(scope="module")
def frags(body, views):
    model, out = body
    return rasterize_body(out, model, views)


def test_openpose_colours_and_limbs_are_the_annotators():
    expected = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
                [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
                [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]
    assert (OPENPOSE_COLORS * 255).round().int().tolist() == expected
    # ControlNet's limbSeq, 1-based: [2,3],[2,6],[3,4],[4,5],[6,7],[7,8],[2,9],[9,10],[10,11],[2,12],[12,13],
    # [13,14],[2,1],[1,15],[15,17],[1,16],[16,18].
    one_based = [[a + 1, b + 1] for a, b in OPENPOSE_LIMBS]
    assert one_based == [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12],
                         [12, 13], [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18]]


def test_front_and_back_views_mirror_left_and_right(body, views):
    model, out = body
    cams = views[[0, 2]]
    image, px, visible = openpose_image(out, model, cams)
    for part in ("shoulder", "elbow", "wrist", "hip", "knee", "ankle", "eye", "ear"):
        left, right = KP[f"left_{part}"], KP[f"right_{part}"]
        assert px[0, left, 0] > px[0, right, 0]  # front: the subject's left is on the image right
        assert px[1, left, 0] < px[1, right, 0]  # back: on the image left
    assert visible[0].all()
    assert visible[1, [KP["left_shoulder"], KP["right_shoulder"], KP["left_hip"], KP["right_hip"]]].all()
    # Limb k's midpoint (on black, away from discs and other limbs) carries 60 % of colour k.
    for k in (0, 1, 2, 5):
        a, b = OPENPOSE_LIMBS[k]
        j, i = ((px[0, a] + px[0, b]) / 2).floor().long().tolist()
        torch.testing.assert_close(image[0, i, j], 0.6 * OPENPOSE_COLORS[k], atol=1e-5, rtol=0)


def test_side_view_hides_far_limbs_and_face_keypoints(body, views, frags):
    model, out = body
    order = [1, 3, 2]  # from the subject's left, right, and from behind
    cams = views[order]
    sub = type(frags)(*(getattr(frags, k)[order] for k in ("face_idx", "bary", "depth", "mask")), frags.faces)
    _, _, visible = openpose_image(out, model, cams, fragments=sub)
    near_far = [("left", "right"), ("right", "left")]
    for c, (near, far) in enumerate(near_far):
        for part in ("shoulder", "elbow", "knee", "ankle", "eye", "ear"):
            assert visible[c, KP[f"{near}_{part}"]], f"{near}_{part} in view {c}"
            assert not visible[c, KP[f"{far}_{part}"]], f"{far}_{part} in view {c}"
        assert visible[c, KP["nose"]] and visible[c, KP["neck"]]
    back = visible[2]
    assert not back[[KP["nose"], KP["left_eye"], KP["right_eye"]]].any()
    assert back[[KP["left_ear"], KP["right_ear"], KP["left_shoulder"], KP["right_ankle"]]].all()
    # Without occlusion handling every keypoint in the image is drawn.
    assert openpose_image(out, model, cams, occlusion=False)[2].all()


def test_silhouette_depth_and_parts_cover_the_same_pixels(body, views, frags):
    model, out = body
    sil = silhouette(out, model, views)
    assert torch.equal(sil[..., 0] > 0, frags.mask) and set(sil.unique().tolist()) == {0.0, 1.0}
    labels, colours = part_label_map(out, model, views, fragments=frags)
    assert torch.equal(labels >= 0, frags.mask)
    assert labels.max() < len(PART_NAMES)
    # Every part shows up in the front view; colours are zero exactly off the body.
    assert set(labels[0][frags.mask[0]].unique().tolist()) == set(range(len(PART_NAMES)))
    assert (colours[~frags.mask] == 0).all() and (colours[frags.mask].sum(-1) > 0).all()
    d = depth_map(out, model, views, fragments=frags)
    torch.testing.assert_close(d.metric[frags.mask], frags.depth[frags.mask])
    assert (d.metric[~frags.mask] == 0).all() and (d.normalized[~frags.mask] == 0).all()
    # Inverted normalisation: the nearest visible point maps to 1, the farthest to 0.
    for c in range(len(views)):
        vals = d.normalized[c, ..., 0][frags.mask[c]]
        assert vals.max() == 1.0 and vals.min() == 0.0
        nearest = frags.depth[c].argmin()
        assert d.normalized[c, ..., 0].reshape(-1)[nearest] == 1.0


def test_normals_face_the_camera(body, views, frags):
    model, out = body
    n_cv = normal_map(out, model, views, space="camera", encode=False, fragments=frags)  # OpenCV: +Z forward
    nz = n_cv[..., 2][frags.mask]
    # A visible surface's normal points back at the viewer, against the +Z viewing direction; smooth
    # normals may tip over only in a thin band at the silhouette.
    assert (nz < 0).float().mean() > 0.97 and nz.mean() < -0.6
    torch.testing.assert_close(n_cv[frags.mask].norm(dim=-1), torch.ones_like(nz))
    n_gl = normal_map(out, model, views, space="camera_opengl", fragments=frags)
    torch.testing.assert_close(n_gl[..., 2][frags.mask], (1 - nz) / 2)
    # World space, front view: the body faces +Z, so the encoded blue channel is mostly above 0.5.
    n_w = normal_map(out, model, views[0], background=(0.5, 0.5, 1.0))
    assert (n_w[0, ..., 2][frags.mask[0]] > 0.5).float().mean() > 0.9
    assert torch.equal(n_w[0][~frags.mask[0]][0], torch.tensor([0.5, 0.5, 1.0]))


def test_render_conditions_matches_the_single_maps(body, views):
    model, out = body
    cams = views[0]
    maps = render_conditions(out, model, cams)
    torch.testing.assert_close(maps["normal"], normal_map(out, model, cams))
    torch.testing.assert_close(maps["openpose"], openpose_image(out, model, cams)[0])
    assert maps["silhouette"].shape == (1, 192, 192, 1) and maps["parts"].shape == (1, 192, 192, 3)
