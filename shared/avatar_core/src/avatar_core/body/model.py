"""The body-model interface and the linear-blend-skinning maths every body model shares.

Canonical frame (see :mod:`avatar_core.conventions`): metres, +Y up, the body faces +Z, its left side
at +X. Each wrapper converts its model's native axes into this frame once, when it is loaded.

Pose convention, the same for every model: ``pose[:, k]`` is the rotation of joint ``k + 1`` about its
rest position, expressed in canonical (world-aligned) axes and composed down the kinematic tree, as
in SMPL (Loper et al. 2015, Sec. 3); ``global_orient`` rotates the root joint. A zero pose gives the
rest mesh with identity transforms.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from avatar_core.errors import InputError
from avatar_core.rotations import axis_angle_to_matrix

#: OpenPose's 18 COCO keypoints, in OpenPose's order.
OPENPOSE_18: tuple[str, ...] = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)

#: Body parts in UV space; together they partition the surface. ``head`` is the head without the
#: hair region (face, ears, neck-top); ``hair`` is the scalp where hair grows.
PART_NAMES: tuple[str, ...] = (
    "head", "hair", "upper_body", "lower_body", "arms", "hands", "legs", "feet",
)


@dataclass
class BodyOutput:
    """A batch of posed bodies.

    ``vertices == skin_points(rest_vertices, skinning_weights, transforms)`` exactly: ``rest_vertices``
    carry the shape, expression and (for SMPL-X) pose-corrective blend shapes, before skinning.
    """

    vertices: Tensor  # [B, V, 3] posed, world frame
    joints: Tensor  # [B, J, 3] posed joint positions
    transforms: Tensor  # [B, J, 4, 4] world from canonical (rest), translation included
    rest_vertices: Tensor  # [B, V, 3] canonical frame, before skinning
    rest_joints: Tensor  # [B, J, 3] canonical joint positions


# --------------------------------------------------------------------------------------------------
# Shared maths
# --------------------------------------------------------------------------------------------------


def rotations_from_pose(pose: Tensor, matrices: bool) -> Tensor:
    """Axis-angle ``[..., 3]`` (``matrices=False``) or rotation matrices ``[..., 3, 3]`` -> ``[..., 3, 3]``."""
    return pose if matrices else axis_angle_to_matrix(pose)


def forward_kinematics(
    rotations: Tensor,  # [B, J, 3, 3] per-joint rotations in world-aligned rest axes
    rest_joints: Tensor,  # [B, J, 3]
    parents: Sequence[int],  # [J], parents[0] < 0, parents[j] < j
) -> tuple[Tensor, Tensor]:
    """Posed joints ``[B, J, 3]`` and skinning transforms ``[B, J, 4, 4]`` (SMPL, Loper et al. 2015, Eq. 4)."""
    B, J = rest_joints.shape[:2]
    rel = rest_joints.clone()
    parent_idx = torch.as_tensor(list(parents[1:]), device=rest_joints.device)
    rel[:, 1:] = rest_joints[:, 1:] - rest_joints[:, parent_idx]
    local = torch.zeros(B, J, 4, 4, dtype=rest_joints.dtype, device=rest_joints.device)
    local[..., :3, :3] = rotations
    local[..., :3, 3] = rel
    local[..., 3, 3] = 1.0
    world = [local[:, 0]]
    for j in range(1, J):
        world.append(world[parents[j]] @ local[:, j])
    world = torch.stack(world, 1)  # [B, J, 4, 4] joint frames
    posed_joints = world[..., :3, 3]
    # World from rest: undo the rest joint offset before applying the joint frame.
    offset = (world[..., :3, :3] @ rest_joints[..., None])[..., 0]
    transforms = world.clone()
    transforms[..., :3, 3] = posed_joints - offset
    return posed_joints, transforms


def blend_transforms(weights: Tensor, transforms: Tensor) -> Tensor:
    """Per-point blended 3x4 transforms ``[B, N, 3, 4]`` from weights ``[N, J]`` or ``[B, N, J]``."""
    rows = transforms[..., :3, :]  # [B, J, 3, 4]
    if weights.dim() == 2:
        return torch.einsum("nj,bjrc->bnrc", weights.to(rows.dtype), rows)
    return torch.einsum("bnj,bjrc->bnrc", weights.to(rows.dtype), rows)


def skin_points(points: Tensor, weights: Tensor, transforms: Tensor) -> Tensor:
    """Linear blend skinning of canonical points ``[N, 3]`` or ``[B, N, 3]`` -> posed ``[B, N, 3]``."""
    m = blend_transforms(weights, transforms)  # [B, N, 3, 4]
    if points.dim() == 2:
        points = points[None]
    return (m[..., :3] @ points[..., None].to(m.dtype))[..., 0] + m[..., 3]


def unskin_points(points: Tensor, weights: Tensor, transforms: Tensor) -> Tensor:
    """Inverse LBS: posed points ``[B, N, 3]`` back to canonical, inverting each point's blended transform."""
    m = blend_transforms(weights, transforms)  # [B, N, 3, 4]
    if points.dim() == 2:
        points = points[None]
    rhs = (points.to(m.dtype) - m[..., 3])[..., None]
    return torch.linalg.solve(m[..., :3], rhs)[..., 0]


def interpolate_on_faces(
    values: Tensor,  # [..., V, C]
    faces: Tensor,  # [F, 3]
    face_idx: Tensor,  # [N]
    bary: Tensor,  # [N, 3]
) -> Tensor:  # [..., N, C]
    """Barycentric interpolation of per-vertex values at surface points."""
    corners = faces[face_idx]  # [N, 3]
    gathered = values[..., corners, :]  # [..., N, 3, C]
    return (gathered * bary.to(values.dtype)[..., None]).sum(-2)


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals ``[B, V, 3]`` of a batch of meshes ``[B, V, 3]``."""
    tri = vertices[:, faces]  # [B, F, 3, 3]
    face_n = torch.linalg.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0])  # [B, F, 3]
    normals = torch.zeros_like(vertices)
    for k in range(3):
        normals = normals.index_add(1, faces[:, k], face_n)
    return torch.nn.functional.normalize(normals, dim=-1, eps=1e-12)


# --------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------


class BodyModel(torch.nn.Module, abc.ABC):
    """A parametric body: mesh, UV layout, skeleton, skinning, and a batched differentiable forward.

    Subclasses fill the buffers in ``__init__`` (all in the canonical frame) and implement
    :meth:`rest_state` (shape/expression blend shapes and rest joints) and may add pose correctives
    through :meth:`pose_correctives`.
    """

    name: str = "body"
    joint_names: list[str]
    parents: list[int]
    shape_dim: int
    shape_names: tuple[str, ...]
    expression_dim: int

    # Buffers every subclass registers.
    template_vertices: Tensor  # [V, 3]
    faces: Tensor  # [F, 3] long
    skinning_weights: Tensor  # [V, J]
    keypoint_joint_weights: Tensor  # [K, J]
    keypoint_vertex_weights: Tensor  # [K, V]
    keypoint_names: tuple[str, ...]

    # ---- abstract pieces -------------------------------------------------------------------------

    @abc.abstractmethod
    def rest_state(self, shape: Tensor | None, expression: Tensor | None, batch: int) -> tuple[Tensor, Tensor]:
        """Canonical vertices ``[B, V, 3]`` and joints ``[B, J, 3]`` for shape and expression parameters."""

    @property
    @abc.abstractmethod
    def uv_coords(self) -> Tensor:  # [T, 2]
        """UV coordinates (v = 0 at the bottom)."""

    @property
    @abc.abstractmethod
    def uv_faces(self) -> Tensor:  # [F, 3]
        """Per-triangle indices into :attr:`uv_coords`, aligned with :attr:`faces`."""

    @abc.abstractmethod
    def face_parts(self) -> Tensor:  # [F] long, index into PART_NAMES
        """Body-part label of every triangle (see :data:`PART_NAMES`)."""

    def pose_correctives(self, rotations: Tensor) -> Tensor | None:  # [B, J, 3, 3] -> [B, V, 3]
        """Pose-dependent vertex offsets in the rest frame, or None (Anny has none)."""
        return None

    # ---- forward --------------------------------------------------------------------------------

    @property
    def num_joints(self) -> int:
        return len(self.parents)

    @property
    def num_vertices(self) -> int:
        return self.template_vertices.shape[0]

    def joint_index(self, name: str) -> int:
        """Index of a named joint; raises InputError listing the names when unknown."""
        try:
            return self.joint_names.index(name)
        except ValueError:
            raise InputError(
                f"{self.name} has no joint named {name!r}",
                f"use one of: {', '.join(self.joint_names)}",
            ) from None

    def _batch_size(self, *tensors: Tensor | None) -> int:
        sizes = {t.shape[0] for t in tensors if t is not None}
        if len(sizes) > 1 and len(sizes - {1}) > 1:
            raise InputError(f"batch sizes disagree: {sorted(sizes)}", "give every parameter the same batch size B")
        return max(sizes, default=1)

    def _check(self, value: Tensor | None, name: str, trailing: tuple[int, ...]) -> Tensor | None:
        if value is None:
            return None
        value = torch.as_tensor(value, dtype=self.template_vertices.dtype, device=self.template_vertices.device)
        if value.dim() == len(trailing):
            value = value[None]
        if tuple(value.shape[1:]) != trailing:
            raise InputError(
                f"{name} has shape {tuple(value.shape)}, expected [B, {', '.join(map(str, trailing))}]",
                f"see {type(self).__name__}.forward for the parameter layout",
            )
        if not torch.isfinite(value).all():
            raise InputError(f"{name} contains NaN or infinite values", "check the parameters fed to the body model")
        return value

    def forward(
        self,
        shape: Tensor | None = None,  # [B, shape_dim]
        pose: Tensor | None = None,  # [B, J-1, 3] axis-angle or [B, J-1, 3, 3]
        expression: Tensor | None = None,  # [B, expression_dim]
        global_orient: Tensor | None = None,  # [B, 3] axis-angle or [B, 3, 3]
        transl: Tensor | None = None,  # [B, 3]
    ) -> BodyOutput:
        """Posed vertices, joints and world-from-rest transforms of a batch of bodies (batched, differentiable).

        Args:
            shape: SMPL-X betas, or Anny's phenotypes in [0, 1] (see the model's ``shape_names``); None: average.
            pose: rotation of joints 1..J-1 (``joint_names[1:]``) about their rest positions, in canonical
                axes, composed down the tree; rotation matrices are recognised by rank (4-D).
            expression: SMPL-X expression coefficients; None for Anny.
            global_orient: rotation of the root joint about its rest position.
            transl: translation added after posing.
        Any of them may have batch size 1 and broadcast against the others.
        """
        J = self.num_joints
        shape = self._check(shape, "shape", (self.shape_dim,))
        if expression is not None and self.expression_dim == 0:
            raise InputError(f"{self.name} has no expression parameters", "pass expression=None")
        expression = self._check(expression, "expression", (self.expression_dim,))
        # Rotation matrices are told apart from axis-angle by rank only: [B, 3] with B = 3 is axis-angle.
        if pose is not None:
            pose = self._check(pose, "pose", (J - 1, 3, 3) if pose.dim() == 4 else (J - 1, 3))
        if global_orient is not None:
            global_orient = self._check(global_orient, "global_orient", (3, 3) if global_orient.dim() == 3 else (3,))
        transl = self._check(transl, "transl", (3,))
        B = self._batch_size(shape, pose, expression, global_orient, transl)

        dtype, device = self.template_vertices.dtype, self.template_vertices.device
        eye = torch.eye(3, dtype=dtype, device=device)
        body_rot = rotations_from_pose(pose, pose.dim() == 4) if pose is not None else eye.expand(B, J - 1, 3, 3)
        root_rot = (rotations_from_pose(global_orient, global_orient.dim() == 3) if global_orient is not None
                    else eye.expand(B, 3, 3))
        rotations = torch.cat([root_rot.expand(B, 3, 3)[:, None], body_rot.expand(B, J - 1, 3, 3)], 1)

        rest_vertices, rest_joints = self.rest_state(shape, expression, B)
        rest_vertices = rest_vertices.expand(B, -1, -1)
        rest_joints = rest_joints.expand(B, -1, -1)
        correctives = self.pose_correctives(rotations)
        if correctives is not None:
            rest_vertices = rest_vertices + correctives

        joints, transforms = forward_kinematics(rotations, rest_joints, self.parents)
        if transl is not None:
            joints = joints + transl[:, None]
            transforms = transforms.clone()
            transforms[..., :3, 3] = transforms[..., :3, 3] + transl[:, None]
        vertices = skin_points(rest_vertices, self.skinning_weights, transforms)
        return BodyOutput(vertices, joints, transforms, rest_vertices, rest_joints)

    # ---- canonical <-> posed --------------------------------------------------------------------

    def skin_points(self, points: Tensor, weights: Tensor, transforms: Tensor) -> Tensor:
        """Canonical points ``[B?, N, 3]`` with weights ``[N, J]`` -> posed ``[B, N, 3]``."""
        return skin_points(points, weights, transforms)

    def unskin_points(self, points: Tensor, weights: Tensor, transforms: Tensor) -> Tensor:
        """Posed points ``[B, N, 3]`` -> canonical (inverse LBS with the given weights)."""
        return unskin_points(points, weights, transforms)

    def surface_skinning_weights(self, face_idx: Tensor, bary: Tensor) -> Tensor:  # [N], [N, 3] -> [N, J]
        """Skinning weights at surface points, interpolated barycentrically from the triangle's vertices."""
        return interpolate_on_faces(self.skinning_weights, self.faces, face_idx.to(self.faces.device), bary.to(self.skinning_weights.device))

    def points_on_surface(self, vertices: Tensor, face_idx: Tensor, bary: Tensor) -> Tensor:
        """Surface points ``[B, N, 3]`` of meshes ``[B, V, 3]`` at (triangle, barycentric) locations."""
        return interpolate_on_faces(vertices, self.faces.to(vertices.device), face_idx.to(vertices.device), bary.to(vertices.device))

    def vertex_normals(self, vertices: Tensor) -> Tensor:  # [B, V, 3] -> [B, V, 3]
        """Unit area-weighted vertex normals of posed meshes."""
        return vertex_normals(vertices, self.faces.to(vertices.device))

    # ---- keypoints ------------------------------------------------------------------------------

    def keypoints(self, output: BodyOutput, names: Sequence[str] = OPENPOSE_18) -> Tensor:  # -> [B, K, 3]
        """Named keypoints (by default OpenPose's 18) as fixed combinations of joints and vertices."""
        idx = []
        for n in names:
            if n not in self.keypoint_names:
                raise InputError(f"{self.name} defines no keypoint {n!r}", f"use one of: {', '.join(self.keypoint_names)}")
            idx.append(self.keypoint_names.index(n))
        idx_t = torch.as_tensor(idx, device=output.joints.device)
        jw = self.keypoint_joint_weights[idx_t].to(output.joints.dtype)
        vw = self.keypoint_vertex_weights[idx_t].to(output.vertices.dtype)
        return torch.einsum("kj,bjc->bkc", jw, output.joints) + torch.einsum("kv,bvc->bkc", vw, output.vertices)

    def height(self) -> float:
        """Extent of the template along +Y, in metres."""
        y = self.template_vertices[:, 1]
        return float(y.max() - y.min())

    # ---- helpers for subclasses -----------------------------------------------------------------

    def _register_keypoints(self, joint_keypoints: dict[str, str], vertex_keypoints: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Keypoints as joints (name -> joint name) or vertex combinations (name -> (indices, weights))."""
        names = tuple(joint_keypoints) + tuple(vertex_keypoints)
        V, J = self.num_vertices, self.num_joints
        jw = torch.zeros(len(names), J, dtype=self.template_vertices.dtype)
        vw = torch.zeros(len(names), V, dtype=self.template_vertices.dtype)
        for k, n in enumerate(names):
            if n in joint_keypoints:
                jw[k, self.joint_index(joint_keypoints[n])] = 1.0
            else:
                ids, w = vertex_keypoints[n]
                vw[k].index_add_(0, torch.as_tensor(ids).long(), torch.as_tensor(w, dtype=vw.dtype))
        self.keypoint_names = names
        self.register_buffer("keypoint_joint_weights", jw.to(self.template_vertices.device), persistent=False)
        self.register_buffer("keypoint_vertex_weights", vw.to(self.template_vertices.device), persistent=False)


def parts_from_dominant_joint(
    faces: Tensor,  # [F, 3]
    skinning_weights: Tensor,  # [V, J]
    joint_part: Sequence[int],  # [J] index into PART_NAMES for every joint
) -> Tensor:  # [F]
    """Triangle part labels from the joint that dominates the summed weights of its three vertices."""
    face_w = skinning_weights[faces].sum(1)  # [F, J]
    return torch.as_tensor(list(joint_part), device=faces.device)[face_w.argmax(-1)]


def split_hair_region(
    face_part: Tensor,  # [F] labels
    centroids: Tensor,  # [F, 3] canonical rest triangle centroids
    eye_y: float,
    ear_z: float,
    ear_y: float,
) -> Tensor:  # [F]
    """Relabel the scalp of the head as ``hair``: above the brow, or behind the ears above the ear lobes.

    The brow sits ~4 cm above the eye centres; behind the ear plane the hairline drops to ~3 cm below the
    ear keypoint (nape). Geometric rules on the rest template, so they hold for any shape in the layout.
    """
    head, hair = PART_NAMES.index("head"), PART_NAMES.index("hair")
    y, z = centroids[:, 1], centroids[:, 2]
    scalp = (y > eye_y + 0.04) | ((z < ear_z) & (y > ear_y - 0.03))
    out = face_part.clone()
    out[(face_part == head) & scalp] = hair
    return out
