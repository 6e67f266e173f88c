"""Motions for any body model: built-in loops and SMPL-X / AMASS-style ``.npz`` pose sequences.

A motion is per-joint rotations in the kernel's pose convention (:mod:`avatar_core.body.model`: rotation of
joint k + 1 about its rest position, in world-aligned rest axes, composed down the tree), so it feeds
``body(pose=motion.poses, global_orient=..., transl=...)`` directly.

Sequence files (:func:`load_motion`): the layouts written by SMPL-X fitting code and by AMASS (Mahmood et al.
2019): ``poses`` ``[T, 165]`` (SMPL-X, 55 joints), ``[T, 156]`` (SMPL+H, 52 joints; AMASS's default release) or
``[T, 72]`` (SMPL, 24 joints), or AMASS's split SMPL-X keys ``root_orient`` / ``pose_body`` / ``pose_hand`` /
``pose_jaw`` / ``pose_eye``; ``trans`` ``[T, 3]``; ``betas`` (not used: the avatar keeps its own shape);
``mocap_framerate`` / ``mocap_frame_rate`` / ``fps``. The first 22 joints (pelvis, legs, spine, neck, head,
collars, arms) are defined alike in the three models, hands alike in SMPL+H and SMPL-X.

Onto SMPL-X the rotations map one to one by joint name. Onto Anny (the default body) each SMPL-X joint drives
the Anny bone at the same place (:data:`ANNY_FROM_SMPLX`: hips -> ``upperleg01``, knees -> ``lowerleg01``,
ankles -> ``foot``, the toe joint -> the five ``toe*-1``, spine1/2/3 -> ``spine03`` / ``spine02`` /
``spine01`` (by height above the pelvis), neck -> ``neck01``, head -> ``head``, collars -> ``clavicle``,
shoulders -> ``upperarm01``, elbows -> ``lowerarm01``, wrists -> ``wrist``, fingers index / middle / ring /
pinky / thumb 1-3 -> ``finger2`` / ``3`` / ``4`` / ``5`` / ``1`` ``-1..3``, eyes -> ``eye``; the jaw has no Anny
bone), and Anny's twist and intermediate bones stay at rest. SMPL-X's rest pose is a T-pose, Anny's an
A-pose with the forearms bent forward, so the rotations are retargeted: with ``C_j`` the rotation that turns
Anny's rest upper arm, forearm and hand onto the T-pose's horizontal line (identity for the other bones; the
fingers inherit the hand's), Anny's bone gets ``C_parent^-1 R_j C_j``. A bone then points, in the world,
where the SMPL-X bone points: a zero pose gives Anny in a T-pose, and every posed arm, leg and spine bone
follows the file's forward kinematics (checked in the tests).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from avatar_core.errors import CorruptFileError, InputError, MissingFileError
from avatar_core.rotations import axis_angle_to_matrix

#: Names of the built-in motions (:func:`builtin_motion`).
MOTIONS = ("walk", "wave")

#: SMPL-X's 55 joints (the ``smplx`` package's JOINT_NAMES[:55]) and kinematic tree.
SMPLX_JOINTS: tuple[str, ...] = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2", "left_ankle", "right_ankle",
    "spine3", "left_foot", "right_foot", "neck", "left_collar", "right_collar", "head", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "jaw", "left_eye_smplhf",
    "right_eye_smplhf",
    *(f"{s}_{f}{i}" for s in ("left", "right") for f in ("index", "middle", "pinky", "ring", "thumb") for i in (1, 2, 3)),
)
SMPLX_PARENTS: tuple[int, ...] = (
    -1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 15, 15, 15,
    20, 25, 26, 20, 28, 29, 20, 31, 32, 20, 34, 35, 20, 37, 38,
    21, 40, 41, 21, 43, 44, 21, 46, 47, 21, 49, 50, 21, 52, 53,
)
_HANDS = SMPLX_JOINTS[25:]
#: Joint order of each ``poses`` width.
LAYOUTS: dict[int, tuple[str, tuple[str, ...]]] = {
    165: ("SMPL-X", SMPLX_JOINTS),
    156: ("SMPL+H", SMPLX_JOINTS[:22] + _HANDS),
    72: ("SMPL", SMPLX_JOINTS[:22] + ("left_hand", "right_hand")),
}

#: SMPL-X joint -> the Anny bone(s) it drives (see the module docstring).
ANNY_FROM_SMPLX: dict[str, tuple[str, ...]] = {
    "spine1": ("spine03",), "spine2": ("spine02",), "spine3": ("spine01",), "neck": ("neck01",), "head": ("head",),
    **{f"{s}_{j}": (f"{a}.{S}",) for s, S in (("left", "L"), ("right", "R")) for j, a in (
        ("hip", "upperleg01"), ("knee", "lowerleg01"), ("ankle", "foot"), ("collar", "clavicle"),
        ("shoulder", "upperarm01"), ("elbow", "lowerarm01"), ("wrist", "wrist"))},
    **{f"{s}_foot": tuple(f"toe{t}-1.{S}" for t in range(1, 6)) for s, S in (("left", "L"), ("right", "R"))},
    **{f"{s}_{f}{i}": (f"finger{n}-{i}.{S}",) for s, S in (("left", "L"), ("right", "R"))
       for f, n in (("thumb", 1), ("index", 2), ("middle", 3), ("ring", 4), ("pinky", 5)) for i in (1, 2, 3)},
    "left_eye_smplhf": ("eye.L",), "right_eye_smplhf": ("eye.R",),
}
# Anny bones turned onto the T-pose line (+X for the left side), by the point their direction is taken to.
_ANNY_TPOSE_BONES = {"upperarm01": "lowerarm01", "lowerarm01": "wrist", "wrist": "finger3-1"}

#: Z-up (AMASS's mocap frame) to the kernel's Y-up: a -90 degree turn about X.
Z_UP_TO_Y_UP = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]], dtype=torch.float64)


@dataclass
class Motion:
    """A pose sequence on one body model, ready for ``body(pose=..., global_orient=..., transl=...)``."""

    poses: Tensor  # [T, J-1, 3, 3]
    global_orient: Tensor  # [T, 3, 3]
    transl: Tensor  # [T, 3], relative to the first frame
    fps: float
    source: str  # e.g. "SMPL-X npz: walk.npz" or "builtin: walk"

    def __len__(self) -> int:
        return self.poses.shape[0]

    def to(self, *args, **kw) -> Motion:
        return Motion(self.poses.to(*args, **kw), self.global_orient.to(*args, **kw), self.transl.to(*args, **kw),
                      self.fps, self.source)


# --------------------------------------------------------------------------------------------------
# Built-in motions
# --------------------------------------------------------------------------------------------------

# Joint roles for the built-in motions, resolved per body model (Anny's names first, then SMPL-X's).
_ROLES: dict[str, tuple[str, ...]] = {
    "hip.L": ("upperleg01.L", "left_hip"),
    "hip.R": ("upperleg01.R", "right_hip"),
    "knee.L": ("lowerleg01.L", "left_knee"),
    "knee.R": ("lowerleg01.R", "right_knee"),
    "shoulder.L": ("upperarm01.L", "left_shoulder"),
    "shoulder.R": ("upperarm01.R", "right_shoulder"),
    "elbow.L": ("lowerarm01.L", "left_elbow"),
    "elbow.R": ("lowerarm01.R", "right_elbow"),
}


def _joint(body, role: str) -> int:
    for name in _ROLES[role]:
        if name in body.joint_names:
            return body.joint_index(name)
    raise InputError(f"{body.name} has none of the joints {_ROLES[role]} that the built-in motions use",
                     "pass your own pose sequence (avatar_core.body.load_motion)")


def _rot(axis: str, deg: Tensor) -> Tensor:  # [T] -> [T, 3, 3]
    aa = torch.zeros(deg.shape[0], 3, dtype=torch.float64)
    aa[:, "xyz".index(axis)] = torch.deg2rad(deg)
    return axis_angle_to_matrix(aa)


def _arm_drop_deg(body, side: str) -> float:
    """Angle of the rest upper arm below the horizontal (about 45 for Anny's A-pose, 0 for a T-pose)."""
    joints = body().rest_joints[0].double()
    d = joints[_joint(body, f"elbow.{side}")] - joints[_joint(body, f"shoulder.{side}")]
    return math.degrees(math.atan2(-float(d[1]), abs(float(d[0]))))


def builtin_motion(body, name: str = "walk", num_frames: int = 32) -> Tensor:  # [T, J-1, 3, 3]
    """A short looping motion for demos, as per-joint rotation matrices ``[T, J-1, 3, 3]``.

    ``"walk"``: walking in place (legs swing +-25 degrees about the left-right axis, knees bend on the forward
    swing, arms hang at 70 degrees and swing against the legs). ``"wave"``: the right arm raised to 30 degrees
    above the horizontal, its forearm waving in the frontal plane twice per loop; the left arm hangs.
    Angles are relative to the body's rest pose, measured on its rest joints, so Anny's A-pose and SMPL-X's
    T-pose give the same motion. The last frame flows back into the first.
    """
    if name not in MOTIONS:
        raise InputError(f"unknown motion {name!r}", f"use one of: {', '.join(MOTIONS)}, or load a .npz sequence")
    if num_frames < 1:
        raise InputError(f"a motion needs at least one frame, got {num_frames}", "pass e.g. num_frames=32")
    J = body.num_joints
    T = num_frames
    phase = 2 * math.pi * torch.arange(T, dtype=torch.float64) / T
    rots = torch.eye(3, dtype=torch.float64).expand(T, J, 3, 3).clone()  # index 0 is the root (unused)
    drop_l, drop_r = _arm_drop_deg(body, "L"), _arm_drop_deg(body, "R")
    zero = torch.zeros(T, dtype=torch.float64)

    def lower(side: str, target_deg: float) -> Tensor:  # rotation taking the arm to target_deg below horizontal
        delta = target_deg - (drop_l if side == "L" else drop_r)
        # About +Z a negative angle lowers the left arm (+X side) and raises the right one.
        return _rot("z", zero + (-delta if side == "L" else delta))

    if name == "walk":
        s = torch.sin(phase)
        # About +X a negative angle swings a hanging limb forward (+Z): the body faces +Z.
        rots[:, _joint(body, "hip.L")] = _rot("x", -25 * s)
        rots[:, _joint(body, "hip.R")] = _rot("x", 25 * s)
        rots[:, _joint(body, "knee.L")] = _rot("x", 30 * s.clamp_min(0))
        rots[:, _joint(body, "knee.R")] = _rot("x", 30 * (-s).clamp_min(0))
        rots[:, _joint(body, "shoulder.L")] = _rot("x", 20 * s) @ lower("L", 70)
        rots[:, _joint(body, "shoulder.R")] = _rot("x", -20 * s) @ lower("R", 70)
        rots[:, _joint(body, "elbow.L")] = _rot("x", zero - 10)
        rots[:, _joint(body, "elbow.R")] = _rot("x", zero - 10)
    else:
        rots[:, _joint(body, "shoulder.R")] = lower("R", -30)
        rots[:, _joint(body, "elbow.R")] = _rot("z", -(40 + 25 * torch.sin(2 * phase)))
        rots[:, _joint(body, "shoulder.L")] = lower("L", 75)
    return rots[:, 1:].to(body.template_vertices)


# --------------------------------------------------------------------------------------------------
# Sequence files
# --------------------------------------------------------------------------------------------------


def _read_layout(data: dict, path: str) -> tuple[str, dict[str, np.ndarray], np.ndarray]:
    """(model name, SMPL-X joint name -> axis-angle [T, 3], root first) of an SMPL-family pose file."""
    keys = ", ".join(sorted(data)) or "none"
    hint = ("expected an SMPL-X / AMASS-style .npz: poses [T, 165] (SMPL-X), [T, 156] (SMPL+H) or [T, 72] (SMPL), "
            "or root_orient + pose_body [+ pose_hand], with trans [T, 3]")
    if "v_template" in data or "shapedirs" in data:
        raise InputError(f"{path} is a body model file, not a motion (keys: {keys})", hint)
    kind = str(data.get("surface_model_type", data.get("model_type", ""))).lower()
    if kind and not kind.startswith(("smplx", "smplh", "smpl")):
        raise InputError(f"{path} holds poses of a {kind!r} body, not SMPL-X / SMPL+H / SMPL (keys: {keys})", hint)
    if "poses" in data:
        poses = np.asarray(data["poses"], dtype=np.float64)
        if poses.ndim == 3 and poses.shape[-1] == 3:
            poses = poses.reshape(poses.shape[0], -1)
        if poses.ndim != 2 or poses.shape[1] not in LAYOUTS:
            raise InputError(f"{path} has poses of shape {list(poses.shape)}, which is no SMPL-family layout "
                             f"(keys: {keys})", hint)
        model, names = LAYOUTS[poses.shape[1]]
        aa = poses.reshape(len(poses), -1, 3)
        return model, {n: aa[:, i] for i, n in enumerate(names)}, aa[:, 0]
    if "root_orient" in data and "pose_body" in data:
        parts = {"root_orient": 3, "pose_body": 63, "pose_hand": 90, "pose_jaw": 3, "pose_eye": 6}
        arrays = {}
        for k, width in parts.items():
            if k in data:
                a = np.asarray(data[k], dtype=np.float64)
                if a.ndim != 2 or a.shape[1] != width:
                    raise InputError(f"{path}: {k} has shape {list(a.shape)}, expected [T, {width}] (keys: {keys})", hint)
                arrays[k] = a.reshape(len(a), -1, 3)
        names = {"root_orient": SMPLX_JOINTS[:1], "pose_body": SMPLX_JOINTS[1:22], "pose_hand": _HANDS,
                 "pose_jaw": ("jaw",), "pose_eye": SMPLX_JOINTS[23:25]}
        out = {n: arrays[k][:, i] for k in arrays for i, n in enumerate(names[k])}
        return "SMPL-X", out, out["pelvis"]
    raise InputError(f"{path} has no SMPL-family poses (keys: {keys})", hint)


def _align(a: Tensor, b: Tensor) -> Tensor:  # unit [3], [3] -> [3, 3] with R a = b, minimal angle
    axis = torch.linalg.cross(a, b)
    s, c = axis.norm(), torch.dot(a, b)
    if float(s) < 1e-9:
        return torch.eye(3, dtype=a.dtype)
    return axis_angle_to_matrix(axis / s * torch.atan2(s, c))


def _anny_corrections(body) -> dict[str, Tensor]:
    """Rest-pose retargeting rotations C_j (Anny bone name -> [3, 3]) for the T-pose-referenced SMPL-X poses."""
    rest = body().rest_joints[0].double()
    out: dict[str, Tensor] = {}
    for side, sign in (("L", 1.0), ("R", -1.0)):
        target = torch.tensor([sign, 0.0, 0.0], dtype=torch.float64)
        for bone, child in _ANNY_TPOSE_BONES.items():
            d = rest[body.joint_index(f"{child}.{side}")] - rest[body.joint_index(f"{bone}.{side}")]
            out[f"{bone}.{side}"] = _align(d / d.norm(), target)
    return out


def _smplx_rotations_onto(body, rot: dict[str, Tensor], T: int) -> Tensor:  # -> [T, J, 3, 3]
    """Per-joint rotations of an SMPL-X-named sequence on ``body`` (root included at index 0)."""
    J = body.num_joints
    eye = torch.eye(3, dtype=torch.float64)
    out = eye.expand(T, J, 3, 3).clone()
    names = list(body.joint_names)
    if all(n in names for n in SMPLX_JOINTS[:22]):  # an SMPL-X body: one to one by name
        for n, r in rot.items():
            if n in names:
                out[:, names.index(n)] = r
        return out
    if not all(b in names for bones in ANNY_FROM_SMPLX.values() for b in bones):
        raise InputError(f"no mapping of SMPL-X joints onto the {body.name} body",
                         "use the 'anny' or 'smplx' body model for .npz motions")
    corr = _anny_corrections(body)
    out[:, 0] = rot["pelvis"]  # Anny's root joint sits at the pelvis: the global orientation
    smplx_index = {n: i for i, n in enumerate(SMPLX_JOINTS)}
    for n, bones in ANNY_FROM_SMPLX.items():
        r = rot.get(n)
        if r is None:
            continue
        parent = SMPLX_JOINTS[SMPLX_PARENTS[smplx_index[n]]]
        for b in bones:
            side = b[-1] if b[-2:] in (".L", ".R") else ""
            c = corr.get(b, _inherited(b, side, corr))
            p_bones = ANNY_FROM_SMPLX.get(parent, ())
            cp = corr.get(p_bones[0], _inherited(p_bones[0], side, corr)) if p_bones else eye
            out[:, names.index(b)] = cp.T @ r @ c
    return out


def _inherited(bone: str, side: str, corr: dict[str, Tensor]) -> Tensor:
    """Fingers and thumbs keep their rest pose relative to the hand: they inherit the wrist's correction."""
    if bone.startswith("finger") and side:
        return corr[f"wrist.{side}"]
    return torch.eye(3, dtype=torch.float64)


def load_motion(
    path: str | os.PathLike,
    body,
    up: str | None = None,
    fps: float | None = None,
    frames: slice | None = None,
) -> Motion:
    """A pose sequence from an SMPL-X / AMASS-style ``.npz``, mapped onto ``body`` (see the module docstring).

    Args:
        path: the ``.npz`` file.
        body: the kernel body the avatar uses (Anny or SMPL-X).
        up: ``"z"`` for sequences in a Z-up world (AMASS's mocap frame) or ``"y"``; None: ``"z"`` when the
            file carries AMASS's ``mocap_framerate`` / ``mocap_frame_rate``, else ``"y"``.
        fps: resample to this frame rate by nearest frames (None keeps the file's).
        frames: a slice of the (resampled) frames to keep.
    Returns a :class:`Motion`; ``transl`` is relative to the first kept frame (the body starts where it
    stands at rest); betas are ignored (the avatar keeps its own shape).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"no motion file at {path}", "pass the path of an SMPL-X / AMASS .npz pose sequence")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as exc:  # not a zip / npz, truncated, or pickled objects
        raise CorruptFileError(f"{path} is not a readable .npz ({type(exc).__name__}: {exc})",
                               "pass an SMPL-X / AMASS .npz pose sequence") from exc
    model, aa, root = _read_layout(data, path)
    T = root.shape[0]
    if T == 0:
        raise InputError(f"{path} holds no frames", "pass a sequence with at least one frame")
    trans = np.asarray(data.get("trans", np.zeros((T, 3))), dtype=np.float64)
    if trans.shape != (T, 3):
        raise InputError(f"{path}: trans has shape {list(trans.shape)}, expected [{T}, 3]",
                         "trans holds one root translation per frame")
    src_fps = next((float(data[k]) for k in ("mocap_framerate", "mocap_frame_rate", "fps") if k in data), 30.0)
    if up is None:
        up = "z" if ("mocap_framerate" in data or "mocap_frame_rate" in data) else "y"
    if up not in ("y", "z"):
        raise InputError(f"up must be 'y' or 'z', got {up!r}", "AMASS sequences are Z-up")

    idx = np.arange(T)
    if fps is not None:
        if fps <= 0:
            raise InputError(f"fps must be positive, got {fps}", "e.g. fps=30")
        n = max(1, int(math.floor((T - 1) * fps / src_fps)) + 1)
        idx = np.minimum(np.round(np.arange(n) * src_fps / fps).astype(int), T - 1)
    if frames is not None:
        idx = idx[frames]
        if len(idx) == 0:
            raise InputError(f"frames={frames} keeps no frame of {path}", f"the file has {T} frames")
    rot = {n: axis_angle_to_matrix(torch.as_tensor(a[idx])) for n, a in aa.items()}
    rotations = _smplx_rotations_onto(body, rot, len(idx))
    transl = torch.as_tensor(trans[idx])
    if up == "z":
        rotations[:, 0] = Z_UP_TO_Y_UP @ rotations[:, 0]
        transl = transl @ Z_UP_TO_Y_UP.T
    dtype = body.template_vertices.dtype
    device = body.template_vertices.device
    return Motion(rotations[:, 1:].to(device, dtype), rotations[:, 0].to(device, dtype),
                  (transl - transl[:1]).to(device, dtype), float(fps or src_fps),
                  f"{model} npz: {os.path.basename(path)}")


__all__ = [
    "ANNY_FROM_SMPLX",
    "LAYOUTS",
    "MOTIONS",
    "SMPLX_JOINTS",
    "SMPLX_PARENTS",
    "Motion",
    "builtin_motion",
    "load_motion",
]
