"""View-dependent skeleton cropping hides the right joints per view."""

import torch

from avatar_core.cameras import Cameras, look_at, spherical_to_position
from gaussianip.views import HEAD_KEEP, KP, ViewBatch, skeleton_visibility, view_direction, view_prompts


def _keypoints():
    """A frontal skeleton: face at +z (nose ahead of the ears), body below."""
    kp = torch.zeros(18, 3)
    kp[KP["nose"]] = torch.tensor([0.0, 0.6, 0.10])
    kp[KP["right_eye"]], kp[KP["left_eye"]] = torch.tensor([-0.03, 0.62, 0.08]), torch.tensor([0.03, 0.62, 0.08])
    kp[KP["right_ear"]], kp[KP["left_ear"]] = torch.tensor([-0.07, 0.6, 0.0]), torch.tensor([0.07, 0.6, 0.0])
    kp[KP["neck"]] = torch.tensor([0.0, 0.45, 0.0])
    for name, x, y in (("shoulder", 0.18, 0.42), ("elbow", 0.3, 0.2), ("wrist", 0.35, 0.0), ("hip", 0.1, 0.0),
                       ("knee", 0.1, -0.35), ("ankle", 0.1, -0.7)):
        kp[KP[f"right_{name}"]] = torch.tensor([-x, y, 0.0])
        kp[KP[f"left_{name}"]] = torch.tensor([x, y, 0.0])
    return kp


def _vis(azimuth, kind="full", elevation=0.0):
    a = torch.tensor([float(azimuth)], dtype=torch.float64)
    eye = spherical_to_position(a, torch.tensor([elevation], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64),
                                torch.zeros(1, 3, dtype=torch.float64))
    cams = Cameras.from_fov(look_at(eye, torch.zeros(1, 3, dtype=torch.float64)).float(), 50.0, 128, 128)
    px, z = cams.project(_keypoints()[None])
    return skeleton_visibility(px, z, a.float(), kind, 128, 128)[0]


def test_front_back_and_profiles():
    front = _vis(0)
    assert bool(front.all())
    back = _vis(180)
    assert not back[KP["nose"]] and not back[KP["right_eye"]] and not back[KP["left_eye"]]
    assert back[KP["right_ear"]] and back[KP["left_ear"]] and back[KP["neck"]]
    left = _vis(90)  # camera on the body's left: the right eye and ear are far
    assert not left[KP["right_eye"]] and not left[KP["right_ear"]] and left[KP["left_eye"]] and left[KP["left_ear"]]
    right = _vis(-90)
    assert not right[KP["left_eye"]] and not right[KP["left_ear"]] and right[KP["right_eye"]]


def test_head_zoom_keeps_head_joints_only():
    vis = _vis(20, kind="head")
    keep = {KP[k] for k in HEAD_KEEP}
    assert all(not vis[k] for k in range(18) if k not in keep)
    assert vis[KP["nose"]] and vis[KP["neck"]]


def test_view_prompts():
    assert view_direction(torch.tensor([0.0, 90.0, 180.0, -170.0, -30.0])) == ["front", "side", "back", "back", "front"]
    vb = ViewBatch(None, torch.tensor([0.0, 180.0]), torch.zeros(2), "head")
    assert view_prompts("a man", vb) == ["the face of a man, front view", "a man, back view"]


def test_cropped_skeleton_is_drawn_without_the_hidden_joints():
    from avatar_core.render.conditions import openpose_image

    a = torch.tensor([180.0], dtype=torch.float64)
    eye = spherical_to_position(a, torch.zeros(1, dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64),
                                torch.zeros(1, 3, dtype=torch.float64))
    cams = Cameras.from_fov(look_at(eye, torch.zeros(1, 3, dtype=torch.float64)).float(), 50.0, 128, 128)
    kp = _keypoints()
    px, z = cams.project(kp[None])
    vis = skeleton_visibility(px, z, a.float(), "full", 128, 128)
    img, _, shown = openpose_image(None, None, cams, occlusion=False, keypoints=kp, visibility=vis)
    assert torch.equal(shown, vis)
    assert not shown[0, KP["nose"]] and img.abs().sum() > 0  # the back view: a skeleton, but no nose
    none, _, _ = openpose_image(None, None, cams, occlusion=False, keypoints=kp, visibility=torch.zeros_like(vis))
    assert none.abs().sum() == 0
