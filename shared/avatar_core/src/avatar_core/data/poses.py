"""Body poses for the synthetic avatars: a straight-armed A-pose and natural poses sampled around it.

Poses follow the kernel's convention (:mod:`avatar_core.body.model`): ``pose[k]`` is the axis-angle
rotation of joint ``k + 1`` in world-aligned rest axes, composed down the kinematic tree. The canonical
frame has +Y up, the body facing +Z and its left side at +X. Angles are kept moderate (no collision
tests), so limbs do not pass through the body.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from avatar_core.body.model import BodyModel
from avatar_core.errors import InputError

#: The named bones each body model uses for the pose library (left side; right mirrors ``.L`` / ``left``).
BONES: dict[str, dict[str, str | tuple[str, ...]]] = {
    "anny": {
        "upper_arm": "upperarm01.{s}", "forearm": "lowerarm01.{s}", "wrist": "wrist.{s}",
        "thigh": "upperleg01.{s}", "shin": "lowerleg01.{s}", "ankle": "foot.{s}",
        "spine": ("spine05", "spine04", "spine03", "spine02", "spine01"), "neck": "neck01", "head": "head",
    },
    "smplx": {
        "upper_arm": "{side}_shoulder", "forearm": "{side}_elbow", "wrist": "{side}_wrist",
        "thigh": "{side}_hip", "shin": "{side}_knee", "ankle": "{side}_ankle",
        "spine": ("spine1", "spine2", "spine3"), "neck": "neck", "head": "head",
    },
}

#: Arm angle below the horizontal in the A-pose, degrees.
A_POSE_ARM_DEG = 50.0


def _bone(body: BodyModel, role: str, side: str | None = None) -> int:
    names = BONES.get(body.name)
    if names is None:
        raise InputError(f"no pose library for body model {body.name!r}", f"use one of: {', '.join(BONES)}")
    pattern = names[role]
    assert isinstance(pattern, str)
    s = {"left": "L", "right": "R"}.get(side or "", "")
    return body.joint_index(pattern.format(s=s, side=side))


def _rot(axis: np.ndarray, angle: float) -> np.ndarray:  # [3], rad -> [3, 3]
    axis = np.asarray(axis, np.float64)
    n = np.linalg.norm(axis)
    if n < 1e-12 or abs(angle) < 1e-12:
        return np.eye(3)
    k = axis / n
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * (K @ K)


def _align(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation taking direction ``a`` to direction ``b``."""
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    axis = np.cross(a, b)
    angle = math.atan2(np.linalg.norm(axis), float(a @ b))
    return _rot(axis, angle)


def _to_axis_angle(R: np.ndarray) -> np.ndarray:  # [3, 3] -> [3]
    angle = math.acos(max(-1.0, min(1.0, (np.trace(R) - 1) / 2)))
    if angle < 1e-9:
        return np.zeros(3)
    axis = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]) / (2 * math.sin(angle))
    return axis * angle


def _rest_joints(body: BodyModel, shape: Tensor | None) -> np.ndarray:  # [J, 3]
    with torch.no_grad():
        _, joints = body.rest_state(None if shape is None else shape.reshape(1, -1), None, 1)
    return joints[0].double().cpu().numpy()


def build_pose(body: BodyModel, shape: Tensor | None = None, params: dict[str, float] | None = None) -> Tensor:
    """Axis-angle pose ``[J - 1, 3]`` of the A-pose, changed by the named joint angles in ``params`` (degrees).

    Keys (all default 0): ``arm_raise_{l,r}`` (abduction above the A-pose), ``arm_forward_{l,r}`` (swing
    forward), ``elbow_{l,r}`` (flexion), ``hip_forward_{l,r}``, ``hip_out_{l,r}``, ``knee_{l,r}``,
    ``spine_bend``, ``spine_twist``, ``spine_side``, ``head_turn``, ``head_nod``.
    """
    p = dict(params or {})
    J = body.num_joints
    rots = [np.eye(3) for _ in range(J)]
    rest = _rest_joints(body, shape)
    rad = math.radians
    x, y, z = np.eye(3)
    for side, sign, tag in (("left", 1.0, "l"), ("right", -1.0, "r")):
        ua, fa, wr = _bone(body, "upper_arm", side), _bone(body, "forearm", side), _bone(body, "wrist", side)
        d_up = rest[fa] - rest[ua]
        d_fore = rest[wr] - rest[fa]
        # A-pose: the arm straight, in the frontal plane, A_POSE_ARM_DEG below the horizontal.
        a = rad(A_POSE_ARM_DEG)
        target = np.array([sign * math.cos(a), -math.sin(a), 0.0])
        R_up = _align(d_up, target)
        R_fore = _align(d_fore, d_up)  # straighten the elbow (in the parent's rest axes)
        # Abduction about the body's forward axis (raises towards +Y on either side), then a forward swing.
        R_up = _rot(x, -rad(p.get(f"arm_forward_{tag}", 0.0))) @ _rot(z, sign * rad(p.get(f"arm_raise_{tag}", 0.0))) @ R_up
        flex_axis = np.cross(d_up / np.linalg.norm(d_up), z)  # flexion moves the forearm towards +Z
        R_fore = _rot(flex_axis, rad(p.get(f"elbow_{tag}", 0.0))) @ R_fore
        rots[ua], rots[fa] = R_up, R_fore
        th, sh = _bone(body, "thigh", side), _bone(body, "shin", side)
        rots[th] = _rot(x, -rad(p.get(f"hip_forward_{tag}", 0.0))) @ _rot(z, sign * rad(p.get(f"hip_out_{tag}", 0.0)))
        rots[sh] = _rot(x, rad(p.get(f"knee_{tag}", 0.0)))  # the shin folds backwards
    spine = BONES[body.name]["spine"]
    per = 1.0 / len(spine)
    R_spine = (_rot(y, per * rad(p.get("spine_twist", 0.0))) @ _rot(x, per * rad(p.get("spine_bend", 0.0)))
               @ _rot(z, per * rad(p.get("spine_side", 0.0))))
    for name in spine:
        rots[body.joint_index(name)] = R_spine
    rots[_bone(body, "head")] = _rot(y, rad(p.get("head_turn", 0.0))) @ _rot(x, rad(p.get("head_nod", 0.0)))
    pose = np.stack([_to_axis_angle(R) for R in rots[1:]])
    return torch.as_tensor(pose, dtype=body.template_vertices.dtype)


#: Ranges (degrees) of the natural-pose angles, sampled uniformly and independently per side.
POSE_RANGES: dict[str, tuple[float, float]] = {
    "arm_raise": (-30.0, 25.0), "arm_forward": (-20.0, 35.0), "elbow": (0.0, 70.0),
    "hip_forward": (-15.0, 25.0), "hip_out": (0.0, 8.0), "knee": (0.0, 35.0),
    "spine_bend": (-5.0, 12.0), "spine_twist": (-15.0, 15.0), "spine_side": (-6.0, 6.0),
    "head_turn": (-25.0, 25.0), "head_nod": (-10.0, 15.0),
}


def sample_pose_params(rng: np.random.Generator) -> dict[str, float]:
    """Joint angles of one natural standing pose: arms and legs vary per side, a knee bends with its hip."""
    out: dict[str, float] = {}
    for key, (lo, hi) in POSE_RANGES.items():
        if key.startswith(("arm", "elbow", "hip", "knee")):
            for tag in ("l", "r"):
                out[f"{key}_{tag}"] = float(rng.uniform(lo, hi))
        else:
            out[key] = float(rng.uniform(lo, hi))
    for tag in ("l", "r"):
        # A leg swung forward bends its knee a little (a step), never hyper-extends it.
        out[f"knee_{tag}"] = max(out[f"knee_{tag}"] * 0.5, 0.8 * max(out[f"hip_forward_{tag}"], 0.0))
    return out
