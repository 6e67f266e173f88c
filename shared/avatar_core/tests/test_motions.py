"""Motions: built-in loops, and SMPL-X / AMASS .npz sequences checked against smplx's LBS and SMPL-X's own FK."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from avatar_core.body import load_body_model
from avatar_core.body.motions import SMPLX_JOINTS, SMPLX_PARENTS, builtin_motion, load_motion
from avatar_core.errors import CorruptFileError, InputError, MissingFileError

T = 4


@pytest.fixture(scope="module")
def anny():
    return load_body_model("anny", dtype=torch.float64)


def _sequence(seed=0, T=T, hands=True):
    rng = np.random.default_rng(seed)
    poses = 0.4 * rng.standard_normal((T, 55, 3))
    poses[:, 22:25] = 0.0  # jaw and eyes still
    if not hands:
        poses[:, 25:] = 0.0
    return poses, 0.3 * rng.standard_normal((T, 3))


def _world_rotations(poses):  # [T, 55, 3] axis-angle -> [T, 55, 3, 3] SMPL-X FK rotations (scipy)
    local = Rotation.from_rotvec(poses.reshape(-1, 3)).as_matrix().reshape(*poses.shape[:2], 3, 3)
    world = np.zeros_like(local)
    for j, p in enumerate(SMPLX_PARENTS):
        world[:, j] = local[:, j] if p < 0 else world[:, p] @ local[:, j]
    return torch.as_tensor(world)


def test_builtin_motions_do_what_they_say(anny):
    """Walk: the left foot is forward when the left hip swings forward; wave: the right hand is above the head."""
    out = anny(pose=builtin_motion(anny, "walk", 8))
    foot_l, foot_r = anny.joint_index("foot.L"), anny.joint_index("foot.R")
    assert out.joints[2, foot_l, 2] > out.joints[2, foot_r, 2] + 0.1  # sin(phase) = 1 at frame T / 4
    assert out.joints[6, foot_r, 2] > out.joints[6, foot_l, 2] + 0.1
    wave = anny(pose=builtin_motion(anny, "wave", 8))
    assert (wave.joints[:, anny.joint_index("wrist.R"), 1] > wave.joints[:, anny.joint_index("head"), 1]).all()
    with pytest.raises(InputError, match="walk"):
        builtin_motion(anny, "moonwalk")


def test_smplx_sequence_on_smplx_matches_smplx_lbs(tmp_path):
    """An SMPL-X .npz played on the SMPL-X body gives smplx.lbs's vertices for the same parameters."""
    from smplx.lbs import lbs

    spec = importlib.util.spec_from_file_location("_avatar_test_body", Path(__file__).with_name("test_body.py"))
    test_body = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_body)
    data = test_body.write_synthetic_smplx(tmp_path)
    body = load_body_model("smplx", model_dir=tmp_path, dtype=torch.float64)
    poses, trans = _sequence()
    np.savez(tmp_path / "seq.npz", poses=poses.reshape(T, 165), trans=trans, betas=np.zeros(10))
    m = load_motion(tmp_path / "seq.npz", body)
    assert len(m) == T and m.source.startswith("SMPL-X")
    out = body(pose=m.poses, global_orient=m.global_orient, transl=m.transl)

    t = lambda a: torch.as_tensor(np.asarray(a, np.float64))  # noqa: E731
    shapedirs = torch.cat([t(data["shapedirs"][:, :, :10]), t(data["shapedirs"][:, :, 300:310])], -1)
    posedirs = t(data["posedirs"]).reshape(-1, 486).T
    ref, _ = lbs(torch.zeros(T, 20, dtype=torch.float64), t(poses.reshape(T, -1)), t(data["v_template"]), shapedirs,
                 posedirs, t(data["J_regressor"]), torch.tensor(SMPLX_PARENTS), t(data["weights"]))
    torch.testing.assert_close(out.vertices, ref + t(trans - trans[:1])[:, None], atol=1e-6, rtol=0)


def test_smplx_sequence_on_anny_follows_smplx_forward_kinematics(anny, tmp_path):
    """Each mapped Anny bone points where SMPL-X's FK sends it: T-pose line for arms and hands, rest for the rest."""
    poses, trans = _sequence(seed=1)
    poses[0] = 0.0  # frame 0: SMPL-X's T-pose
    np.savez(tmp_path / "seq.npz", poses=poses.reshape(T, 165), trans=trans)
    m = load_motion(tmp_path / "seq.npz", anny)
    out = anny(pose=m.poses, global_orient=m.global_orient, transl=m.transl)
    W = _world_rotations(poses)
    rest = anny().rest_joints[0]
    j = {n: anny.joint_index(n) for n in anny.joint_names}
    x = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)

    def direction(joints, a, b):
        d = joints[..., j[b], :] - joints[..., j[a], :]
        return d / d.norm(dim=-1, keepdim=True)

    for side, sign, S in (("left", 1.0, "L"), ("right", -1.0, "R")):
        for smplx_joint, a, b in ((f"{side}_shoulder", f"upperarm01.{S}", f"lowerarm01.{S}"),
                                  (f"{side}_elbow", f"lowerarm01.{S}", f"wrist.{S}"),
                                  (f"{side}_wrist", f"wrist.{S}", f"finger3-1.{S}")):
            expect = W[:, SMPLX_JOINTS.index(smplx_joint)] @ (sign * x)
            torch.testing.assert_close(direction(out.joints, a, b), expect, atol=1e-9, rtol=0)
        for smplx_joint, a, b in ((f"{side}_hip", f"upperleg01.{S}", f"lowerleg01.{S}"),
                                  (f"{side}_knee", f"lowerleg01.{S}", f"foot.{S}"),
                                  ("spine3", "spine01", "neck01"), ("neck", "neck01", "head")):
            expect = W[:, SMPLX_JOINTS.index(smplx_joint)] @ direction(rest, a, b)
            torch.testing.assert_close(direction(out.joints, a, b), expect, atol=1e-9, rtol=0)
    # The pelvis moves by the file's translation, relative to the first frame.
    torch.testing.assert_close(out.joints[:, 0] - out.joints[:1, 0], torch.as_tensor(trans - trans[:1]))


def test_layouts_and_up_axis_agree(anny, tmp_path):
    """AMASS split keys (Z-up, 60 fps) = 'poses' with up='z'; SMPL+H = SMPL-X without jaw/eyes; fps resampling."""
    poses, trans = _sequence(seed=2, T=6)
    np.savez(tmp_path / "x.npz", poses=poses.reshape(6, 165), trans=trans)
    body_hands = np.concatenate([poses[:, :22], poses[:, 25:]], 1).reshape(6, 156)
    np.savez(tmp_path / "h.npz", poses=body_hands, trans=trans, mocap_framerate=np.array(60.0), betas=np.zeros(16))
    np.savez(tmp_path / "a.npz", root_orient=poses[:, 0], pose_body=poses[:, 1:22].reshape(6, 63),
             pose_hand=poses[:, 25:].reshape(6, 90), trans=trans, mocap_frame_rate=np.array(60.0),
             surface_model_type=np.array("smplx"))
    ref = load_motion(tmp_path / "x.npz", anny, up="z")
    for name in ("h.npz", "a.npz"):
        m = load_motion(tmp_path / name, anny)  # AMASS's frame-rate key: Z-up by default
        torch.testing.assert_close(m.poses, ref.poses)
        torch.testing.assert_close(m.global_orient, ref.global_orient)
        torch.testing.assert_close(m.transl, ref.transl)
        assert m.fps == 60.0
    half = load_motion(tmp_path / "a.npz", anny, fps=30)
    assert len(half) == 3 and half.fps == 30.0
    torch.testing.assert_close(half.poses, ref.poses[[0, 2, 4]])
    # A body standing up in a Z-up world (pelvis turned +90 degrees about X) stands upright in the kernel's frame.
    up = np.zeros((1, 55, 3))
    up[0, 0] = [np.pi / 2, 0.0, 0.0]
    np.savez(tmp_path / "up.npz", poses=up.reshape(1, 165), trans=np.zeros((1, 3)))
    torch.testing.assert_close(load_motion(tmp_path / "up.npz", anny, up="z").global_orient[0],
                               torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_files_of_other_layouts_say_what_they_hold(anny, tmp_path):
    np.savez(tmp_path / "odd.npz", poses=np.zeros((3, 99)), trans=np.zeros((3, 3)))
    with pytest.raises(InputError, match=r"poses of shape \[3, 99\].*keys: poses, trans"):
        load_motion(tmp_path / "odd.npz", anny)
    np.savez(tmp_path / "mano.npz", poses=np.zeros((3, 48)), surface_model_type=np.array("mano"))
    with pytest.raises(InputError, match="'mano' body"):
        load_motion(tmp_path / "mano.npz", anny)
    np.savez(tmp_path / "model.npz", v_template=np.zeros((4, 3)), shapedirs=np.zeros((4, 3, 2)))
    with pytest.raises(InputError, match="body model file"):
        load_motion(tmp_path / "model.npz", anny)
    np.savez(tmp_path / "none.npz", joints=np.zeros((3, 24, 3)))
    with pytest.raises(InputError, match="no SMPL-family poses"):
        load_motion(tmp_path / "none.npz", anny)
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(CorruptFileError):
        load_motion(tmp_path / "bad.npz", anny)
    with pytest.raises(MissingFileError):
        load_motion(tmp_path / "missing.npz", anny)
