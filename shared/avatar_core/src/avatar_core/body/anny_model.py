"""The Anny body model (Apache-2.0, NAVER; the ``anny`` wheel): the default body everywhere.

Anny is modelled Z-up with the body facing -Y; it is rotated once here into the canonical frame
(+Y up, facing +Z, left at +X). Shape parameters are Anny's phenotypes in ``[0, 1]``
(gender, age, muscle, weight, height, proportions; 0.5 is the average). Pose rotates Anny's 104
bones about their rest heads with the kernel's SMPL-style convention (see :mod:`.model`), so a zero
pose is Anny's rest mesh (its modelled A-pose) rather than Anny's own reference pose.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch
from torch import Tensor

from avatar_core.body.model import PART_NAMES, BodyModel, parts_from_dominant_joint, split_hair_region

log = logging.getLogger(__name__)

#: Anny's phenotypes that make up ``shape``, in order.
ANNY_SHAPE_NAMES: tuple[str, ...] = ("gender", "age", "muscle", "weight", "height", "proportions")

#: Canonical from Anny axes: (x, y, z)_anny -> (x, z, -y). A proper rotation (det +1).
ANNY_TO_CANONICAL = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]], dtype=torch.float64)

# Joints standing in for OpenPose keypoints: each bone's head (its rest joint position).
_JOINT_KEYPOINTS = {
    "neck": "neck01",
    "right_shoulder": "upperarm01.R", "right_elbow": "lowerarm01.R", "right_wrist": "wrist.R",
    "left_shoulder": "upperarm01.L", "left_elbow": "lowerarm01.L", "left_wrist": "wrist.L",
    "right_hip": "upperleg01.R", "right_knee": "lowerleg01.R", "right_ankle": "foot.R",
    "left_hip": "upperleg01.L", "left_knee": "lowerleg01.L", "left_ankle": "foot.L",
}
# Face keypoints Anny has no bone for: Anny's own COCO vertex regressor (data/keypoints/coco.pth).
_VERTEX_KEYPOINTS = ("nose", "right_eye", "left_eye", "right_ear", "left_ear")

_cache: dict[tuple, object] = {}
_lock = threading.Lock()
_announced = False


def _anny_module():
    """Anny's own model, built once per process (the first build on a machine compiles Warp kernels)."""
    global _announced
    key = ("anny",)
    with _lock:
        if key not in _cache:
            import anny

            if not _announced:
                # Loud only when Anny's data cache is cold, i.e. when the slow build will really happen.
                from anny.paths import get_anny_cache_path

                root = get_anny_cache_path()
                warm = root is not None and any(root.glob("v*/build_compact_model_data_*.safetensors"))
                log.log(
                    logging.INFO if warm else logging.WARNING,
                    "Loading the Anny body model: its first use on a machine builds the model data and "
                    "compiles Warp kernels (about a minute, cached under ~/.cache/anny and ~/.cache/warp).",
                )
                _announced = True
            # Dense LBS path: the kernel skins with its own maths, so Anny's Warp skinning is not needed.
            _cache[key] = anny.Anny(skinning_method="lbs")
        return _cache[key]


def _part_of_bone(name: str) -> str:
    if name.startswith(("wrist", "finger", "metacarpal")):
        return "hands"
    if name.startswith(("foot", "toe")):
        return "feet"
    if name.startswith(("upperleg", "lowerleg")):
        return "legs"
    if name.startswith(("shoulder", "upperarm", "lowerarm")):
        return "arms"
    if name.startswith(("root", "pelvis", "spine05")):
        return "lower_body"
    if name.startswith(("head", "eye", "jaw", "tongue")):
        return "head"
    return "upper_body"  # spine04..01, clavicles, neck


class AnnyBody(BodyModel):
    """Anny in the kernel's :class:`BodyModel` interface (13,718 vertices, 27,420 triangles, 104 joints)."""

    name = "anny"

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        m = _anny_module()
        C = ANNY_TO_CANONICAL
        to = lambda t: (t.detach().to(torch.float64) @ C.T).to(dtype)  # noqa: E731  (rows are points)

        self.joint_names = list(m.bone_labels)
        self.parents = [int(p) for p in m.bone_parents]
        self.shape_dim, self.expression_dim = len(ANNY_SHAPE_NAMES), 0
        self.shape_names = ANNY_SHAPE_NAMES
        self._anny = [m]  # a list keeps Anny's module out of this module's state_dict / .to()

        # The template is the average body (every phenotype 0.5); blend shapes act on coefficient changes.
        c0 = m.get_phenotype_blendshape_coefficients().detach()[0].to(torch.float64)  # [K]
        base_v = m.template_vertices.double() + torch.einsum("k,kvc->vc", c0, m.blendshapes.double())
        base_j = m.template_bone_heads.double() + torch.einsum("k,kjc->jc", c0, m.bone_heads_blendshapes.double())
        self.register_buffer("template_vertices", to(base_v), persistent=False)  # [V, 3]
        self.register_buffer("blendshapes", to(m.blendshapes), persistent=False)  # [K, V, 3]
        self.register_buffer("template_joints", to(base_j), persistent=False)  # [J, 3]
        self.register_buffer("joint_blendshapes", to(m.bone_heads_blendshapes), persistent=False)  # [K, J, 3]
        self.register_buffer("default_coefficients", c0.to(dtype), persistent=False)  # [K]
        self.register_buffer("faces", m.faces.detach().long().clone(), persistent=False)  # [F, 3]
        self.register_buffer("_uv_coords", m.texture_coordinates.detach().to(dtype).clone(), persistent=False)
        self.register_buffer("_uv_faces", m.face_texture_coordinate_indices.detach().long().clone(), persistent=False)
        dense = torch.zeros(self.template_vertices.shape[0], len(self.parents), dtype=torch.float64)
        dense.scatter_add_(1, m.vertex_bone_indices.long(), m.vertex_bone_weights.to(torch.float64))
        self.register_buffer("skinning_weights", dense.to(dtype), persistent=False)  # [V, J]

        coco = torch.load(_anny_data_path("keypoints", "coco.pth"), weights_only=True, map_location="cpu")
        base = m.base_mesh_vertex_indices.cpu()
        vertex_kp = {}
        for n in _VERTEX_KEYPOINTS:
            w = coco[n][base].to(torch.float64)
            ids = torch.nonzero(w).flatten()
            vertex_kp[n] = (ids, w[ids] / w[ids].sum())
        self._register_keypoints(_JOINT_KEYPOINTS, vertex_kp)
        self._face_parts: Tensor | None = None
        self.to(device)

    # ---- BodyModel pieces ----------------------------------------------------------------------

    @property
    def uv_coords(self) -> Tensor:
        return self._uv_coords

    @property
    def uv_faces(self) -> Tensor:
        return self._uv_faces

    def phenotype_coefficients(self, shape: Tensor) -> Tensor:  # [B, 6] -> [B, K]
        """Anny's blend-shape coefficients for phenotypes (its piecewise-linear phenotype interpolation)."""
        m = self._anny[0]
        kw = {n: shape[:, i].to(device=m.device, dtype=m.dtype) for i, n in enumerate(ANNY_SHAPE_NAMES)}
        coeffs = m.get_phenotype_blendshape_coefficients(**kw)
        return coeffs.to(device=self.template_vertices.device, dtype=self.template_vertices.dtype)

    def rest_state(self, shape: Tensor | None, expression: Tensor | None, batch: int) -> tuple[Tensor, Tensor]:
        if shape is None:
            return self.template_vertices[None], self.template_joints[None]
        coeffs = self.phenotype_coefficients(shape) - self.default_coefficients  # [B, K]
        verts = self.template_vertices + torch.einsum("bk,kvc->bvc", coeffs, self.blendshapes)
        joints = self.template_joints + torch.einsum("bk,kjc->bjc", coeffs, self.joint_blendshapes)
        return verts, joints

    def face_parts(self) -> Tensor:
        """Anny's UV segmentation (head, hands, feet, eyes and mouth as head) refined by dominant bones.

        The segmentation image only separates head, hands and feet from "body"; the body is split into
        upper body, lower body, arms and legs by the bone that dominates each triangle's skinning weights.
        """
        if self._face_parts is None:
            self._face_parts = self._compute_face_parts()
        return self._face_parts

    def _compute_face_parts(self) -> Tensor:
        import yaml
        from PIL import Image

        image = np.asarray(Image.open(_anny_data_path("segmentation", "body_parts_segmentation.png")).convert("RGB"))
        with open(_anny_data_path("segmentation", "body_parts_segmentation.yaml")) as f:
            colours = yaml.safe_load(f)["colors"]
        labels = list(colours)
        palette = np.asarray([colours[k] for k in labels], dtype=np.float64)  # [L, 3]
        uv = self.uv_coords.detach().cpu().double()[self.uv_faces.cpu()].mean(1).numpy()  # [F, 2] UV centroids
        H, W = image.shape[:2]
        col = np.clip((uv[:, 0] * W).astype(np.int64), 0, W - 1)
        row = np.clip(((1.0 - uv[:, 1]) * H).astype(np.int64), 0, H - 1)
        # Nearest palette colour: the image's anti-aliased edges hold blends of two labels.
        seg = np.argmax(-((image[row, col].astype(np.float64)[:, None] - palette[None]) ** 2).sum(-1), axis=1)
        seg_name = [labels[i] for i in seg]

        bone_part = [PART_NAMES.index(_part_of_bone(n)) for n in self.joint_names]
        dominant = parts_from_dominant_joint(self.faces.cpu(), self.skinning_weights.cpu(), bone_part)
        # On the segmentation's "body", a hand/foot/head-dominated triangle is forearm/ankle/neck skin.
        demote = {"hands": "arms", "feet": "legs", "head": "upper_body"}
        parts = dominant.clone()
        for f, name in enumerate(seg_name):
            base = name.split(".")[0]
            if base == "hand":
                parts[f] = PART_NAMES.index("hands")
            elif base == "foot":
                parts[f] = PART_NAMES.index("feet")
            elif base != "body":
                parts[f] = PART_NAMES.index("head")  # head, eyes, mouth cavity, tongue
            else:
                p = PART_NAMES[int(dominant[f])]
                parts[f] = PART_NAMES.index(demote.get(p, p))
        verts = self.template_vertices.detach().cpu()
        centroids = verts[self.faces.cpu()].mean(1)
        kp = self.keypoint_vertex_weights.cpu() @ verts  # [K, 3] rest keypoints (vertex-defined rows)
        eye_y = float(kp[self.keypoint_names.index("left_eye"), 1])
        ear = kp[self.keypoint_names.index("left_ear")]
        return split_hair_region(parts, centroids, eye_y, float(ear[2]), float(ear[1])).to(self.faces.device)


def _anny_data_path(*parts: str):
    from anny.paths import get_anny_root_dir

    return get_anny_root_dir().joinpath("data", *parts)


def load_anny(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> AnnyBody:
    """The Anny body, cached per process, device and dtype (construction is the slow part)."""
    key = ("wrapper", str(device), dtype)
    with _lock:
        cached = _cache.get(key)
    if cached is None:
        cached = AnnyBody(device=device, dtype=dtype)
        with _lock:
            _cache[key] = cached
    return cached  # type: ignore[return-value]
