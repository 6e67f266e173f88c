"""SMPL-X (Pavlakos et al. 2019) through the ``smplx`` package, from the user's licensed model files.

The files cannot ship: the user downloads them from https://smpl-x.is.tue.mpg.de/ and points the
kernel at their folder (``model_dir=`` / the config, else ``AVATAR_SMPLX_DIR``). SMPL-X is already in
the canonical frame (+Y up, facing +Z, left at +X). Hands are posed joint by joint (no PCA) and a zero
hand pose is the flat hand (``flat_hand_mean=True``), so a zero pose is the T-pose template.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avatar_core.body.model import PART_NAMES, BodyModel, parts_from_dominant_joint, split_hair_region
from avatar_core.errors import ConfigError, CorruptFileError, MissingBodyModelError

SMPLX_URL = "https://smpl-x.is.tue.mpg.de/"
SMPLX_ENV = "AVATAR_SMPLX_DIR"
UV_FILE = "smplx_uv.obj"
NUM_JOINTS = 55
GENDERS = ("neutral", "male", "female")
#: The arrays ``smplx.SMPLX`` reads from a model file (joint-wise hands, no face contour), as in SMPLX_NEUTRAL.npz.
REQUIRED_KEYS = ("v_template", "f", "weights", "J_regressor", "kintree_table", "shapedirs", "posedirs",
                 "hands_componentsl", "hands_componentsr", "hands_meanl", "hands_meanr",
                 "lmk_faces_idx", "lmk_bary_coords")

_JOINT_KEYPOINTS = {
    "neck": "neck",
    "right_shoulder": "right_shoulder", "right_elbow": "right_elbow", "right_wrist": "right_wrist",
    "left_shoulder": "left_shoulder", "left_elbow": "left_elbow", "left_wrist": "left_wrist",
    "right_hip": "right_hip", "right_knee": "right_knee", "right_ankle": "right_ankle",
    "left_hip": "left_hip", "left_knee": "left_knee", "left_ankle": "left_ankle",
}
# Face keypoints: the single vertices smplx itself uses for OpenPose's nose, eyes and ears.
_VERTEX_KEYPOINTS = {"nose": "nose", "right_eye": "reye", "left_eye": "leye", "right_ear": "rear", "left_ear": "lear"}


def _part_of_joint(name: str) -> str:
    if name == "pelvis":
        return "lower_body"
    if name.endswith(("_hip", "_knee")):
        return "legs"
    if name.endswith(("_ankle", "_foot")):
        return "feet"
    if name.endswith(("_shoulder", "_elbow")):
        return "arms"
    if name.endswith("_wrist") or any(f in name for f in ("index", "middle", "pinky", "ring", "thumb")):
        return "hands"
    if name in ("head", "jaw") or "eye" in name:
        return "head"
    return "upper_body"  # spine1-3, neck, collars


def resolve_smplx_dir(model_dir: str | os.PathLike | None) -> Path:
    """The SMPL-X folder from the argument, else ``AVATAR_SMPLX_DIR``."""
    if model_dir is None:
        model_dir = os.environ.get(SMPLX_ENV)
    if not model_dir:
        raise MissingBodyModelError(
            "no SMPL-X model folder given",
            f"download SMPLX_NEUTRAL.npz (and {UV_FILE}) from {SMPLX_URL}, put them in a folder and pass "
            f"model_dir=... (config key body.model_dir) or set {SMPLX_ENV}=/that/folder",
        )
    return Path(model_dir).expanduser()


def find_smplx_file(folder: Path, gender: str) -> Path:
    """``SMPLX_<GENDER>.npz`` (or ``.pkl``) in ``folder`` or ``folder/smplx`` (the download's layout)."""
    stem = f"SMPLX_{gender.upper()}"
    for sub in (folder, folder / "smplx"):
        for ext in ("npz", "pkl"):
            if (sub / f"{stem}.{ext}").is_file():
                return sub / f"{stem}.{ext}"
    raise MissingBodyModelError(
        f"SMPL-X model file {stem}.npz not found in {folder}",
        f"download the SMPL-X model files from {SMPLX_URL} (registration and licence required) and put "
        f"{stem}.npz into {folder} (or set {SMPLX_ENV} to the folder that holds it)",
    )


def smplx_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a usable SMPL-X model file (unreadable, not an archive, missing arrays), or None.

    Reads only the ``.npz``'s zip directory, so it is cheap enough for ``info``; a ``.pkl`` is checked for
    being a pickle at all (its keys need the full unpickling the loader does).
    """
    path = Path(path)
    try:
        if path.suffix == ".pkl":
            with open(path, "rb") as f:
                head = f.read(2)
            return None if head[:1] == b"\x80" else "is not a pickle file"
        if not zipfile.is_zipfile(path):
            return "is not an .npz archive (not a zip file: damaged, truncated or another format)"
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                return "is not an .npz archive"
            keys = set(archive.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        return f"is not a readable .npz archive ({type(e).__name__}: {str(e)[:80]})"
    missing = [k for k in REQUIRED_KEYS if k not in keys]
    return f"lacks the SMPL-X arrays {', '.join(missing)}" if missing else None


def check_smplx_file(path: Path) -> None:
    """Raise a one-line :class:`CorruptFileError` naming ``path`` and what it lacks, unless it is usable."""
    problem = smplx_file_problem(path)
    if problem is not None:
        raise CorruptFileError(f"SMPL-X model file {path} {problem}",
                               f"replace it with the original download from {SMPLX_URL}")


def folder_status(folder: str | os.PathLike) -> tuple[bool, str]:
    """Whether ``folder`` holds a usable SMPL-X model (a valid model file and its UV layout), and why not."""
    folder = Path(folder)
    found, broken = [], []
    for gender in GENDERS:
        try:
            path = find_smplx_file(folder, gender)
        except MissingBodyModelError:
            continue
        problem = smplx_file_problem(path)
        (broken if problem else found).append(f"{path.name} {problem}" if problem else (gender, path))
    if not found and not broken:
        return False, f"{folder} holds no SMPLX_*.npz file"
    if not found:
        return False, f"not usable: {'; '.join(broken)}"
    uv = [p for _, path in found for p in (path.parent / UV_FILE, folder / UV_FILE) if p.is_file()]
    if not uv:
        return False, f"not usable: {UV_FILE} (the UV layout) is missing from {folder}"
    note = f"; broken: {'; '.join(broken)}" if broken else ""
    return True, f"available ({folder}; {', '.join(g for g, _ in found)}{note})"


def read_obj_uv(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Texture coordinates ``[T, 2]``, vertex faces ``[F, 3]`` and UV faces ``[F, 3]`` from an OBJ's vt/f lines."""
    uvs, faces, uv_faces = [], [], []
    with open(path) as f:
        for line in f:
            if line.startswith("vt "):
                uvs.append([float(x) for x in line.split()[1:3]])
            elif line.startswith("f "):
                corners = [c.split("/") for c in line.split()[1:]]
                if len(corners) < 3 or any(len(c) < 2 or not c[1] for c in corners):
                    raise CorruptFileError(f"{path}: face without texture indices: {line.strip()!r}",
                                           f"use the {UV_FILE} from {SMPLX_URL}, whose faces are v/vt[/vn]")
                v = [int(c[0]) - 1 for c in corners]
                t = [int(c[1]) - 1 for c in corners]
                for k in range(1, len(corners) - 1):  # fan-triangulate polygons
                    faces.append([v[0], v[k], v[k + 1]])
                    uv_faces.append([t[0], t[k], t[k + 1]])
    if not uvs or not faces:
        raise CorruptFileError(f"{path} has no texture coordinates or faces", f"re-download {UV_FILE} from {SMPLX_URL}")
    return np.asarray(uvs, np.float64), np.asarray(faces, np.int64), np.asarray(uv_faces, np.int64)


class SMPLXBody(BodyModel):
    """SMPL-X in the kernel's :class:`BodyModel` interface (10,475 vertices, 55 joints)."""

    name = "smplx"

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        gender: str = "neutral",
        num_betas: int = 10,
        num_expression_coeffs: int = 10,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        import smplx
        from smplx.joint_names import JOINT_NAMES
        from smplx.vertex_ids import vertex_ids

        if gender not in GENDERS:
            raise ConfigError(f"unknown SMPL-X gender {gender!r}", f"use one of: {', '.join(GENDERS)}")
        self.folder = resolve_smplx_dir(model_dir)
        path = find_smplx_file(self.folder, gender)
        check_smplx_file(path)
        self.model_file = path
        try:
            m = smplx.SMPLX(
                str(path), gender=gender, ext=path.suffix[1:], num_betas=num_betas,
                num_expression_coeffs=num_expression_coeffs, use_pca=False, flat_hand_mean=True,
                use_face_contour=False, dtype=torch.float64,
            )
        except (KeyError, ValueError, OSError, EOFError, AttributeError, IndexError, TypeError,
                pickle.UnpicklingError, zipfile.BadZipFile, ModuleNotFoundError) as e:
            # ModuleNotFoundError: the original .pkl files pickle chumpy arrays; AttributeError: a missing key.
            raise CorruptFileError(f"cannot read SMPL-X model {path}: {type(e).__name__}: {e}",
                                   f"replace it with the original download from {SMPLX_URL}") from e

        self.joint_names = list(JOINT_NAMES[:NUM_JOINTS])
        self.parents = [int(p) for p in m.parents[:NUM_JOINTS]]
        self.parents[0] = -1
        self.shape_dim = int(m.shapedirs.shape[-1])
        self.expression_dim = int(m.expr_dirs.shape[-1])
        self.shape_names = tuple(f"beta{i}" for i in range(self.shape_dim))
        cast = lambda t: torch.as_tensor(t).detach().to(dtype)  # noqa: E731
        self.register_buffer("template_vertices", cast(m.v_template), persistent=False)  # [V, 3]
        self.register_buffer("shapedirs", cast(m.shapedirs), persistent=False)  # [V, 3, S]
        self.register_buffer("exprdirs", cast(m.expr_dirs), persistent=False)  # [V, 3, E]
        self.register_buffer("posedirs", cast(m.posedirs), persistent=False)  # [(J-1)*9, V*3]
        self.register_buffer("joint_regressor", cast(m.J_regressor), persistent=False)  # [J, V]
        self.register_buffer("skinning_weights", cast(m.lbs_weights), persistent=False)  # [V, J]
        self.register_buffer("faces", torch.as_tensor(np.asarray(m.faces, np.int64)), persistent=False)  # [F, 3]
        ids = vertex_ids["smplx"]
        vertex_kp = {k: (torch.tensor([ids[v]]), torch.tensor([1.0])) for k, v in _VERTEX_KEYPOINTS.items()}
        self._register_keypoints(_JOINT_KEYPOINTS, vertex_kp)
        self._uv: tuple[Tensor, Tensor] | None = None
        self._face_parts: Tensor | None = None
        self.to(device)

    # ---- shape, expression, pose correctives (SMPL-X, Pavlakos et al. 2019, Eq. 1-3) --------------

    def rest_state(self, shape: Tensor | None, expression: Tensor | None, batch: int) -> tuple[Tensor, Tensor]:
        verts = self.template_vertices[None]
        if shape is not None:
            verts = verts + torch.einsum("bs,vcs->bvc", shape, self.shapedirs)
        if expression is not None:
            verts = verts + torch.einsum("be,vce->bvc", expression, self.exprdirs)
        joints = torch.einsum("jv,bvc->bjc", self.joint_regressor, verts)
        return verts, joints

    def pose_correctives(self, rotations: Tensor) -> Tensor:
        eye = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
        feature = (rotations[:, 1:] - eye).reshape(rotations.shape[0], -1)  # [B, (J-1)*9]
        return (feature @ self.posedirs).reshape(rotations.shape[0], -1, 3)

    # ---- UV layout from the user's smplx_uv.obj ----------------------------------------------------

    def _load_uv(self) -> tuple[Tensor, Tensor]:
        if self._uv is None:
            candidates = [self.model_file.parent / UV_FILE, self.folder / UV_FILE]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                raise MissingBodyModelError(
                    f"SMPL-X UV layout {UV_FILE} not found next to {self.model_file.name} in {self.model_file.parent}",
                    f"download {UV_FILE} from {SMPLX_URL} (Downloads: 'SMPL-X UV map') and put it into "
                    f"{self.model_file.parent}",
                )
            uvs, obj_faces, obj_uv_faces = read_obj_uv(path)
            model_faces = self.faces.cpu().numpy()
            if obj_faces.shape == model_faces.shape and np.array_equal(obj_faces, model_faces):
                uv_faces = obj_uv_faces
            else:
                # Same triangles in another order or winding: match them by their sorted vertex triple.
                lookup = {tuple(sorted(f)): (f, t) for f, t in zip(obj_faces.tolist(), obj_uv_faces.tolist())}
                uv_faces = np.empty_like(model_faces)
                for i, f in enumerate(model_faces.tolist()):
                    hit = lookup.get(tuple(sorted(f)))
                    if hit is None:
                        raise CorruptFileError(f"{path}: triangle {f} of the model has no UV triangle",
                                               f"use the {UV_FILE} that matches the SMPL-X model, from {SMPLX_URL}")
                    pos = {v: k for k, v in enumerate(hit[0])}
                    uv_faces[i] = [hit[1][pos[v]] for v in f]
            dev = self.template_vertices.device
            self._uv = (torch.as_tensor(uvs, dtype=self.template_vertices.dtype, device=dev),
                        torch.as_tensor(uv_faces, device=dev))
        return self._uv

    @property
    def uv_coords(self) -> Tensor:
        return self._load_uv()[0]

    @property
    def uv_faces(self) -> Tensor:
        return self._load_uv()[1]

    def face_parts(self) -> Tensor:
        """Parts from each triangle's dominant joint (SMPL-X ships no part segmentation in UV space).

        pelvis -> lower body; hips, knees -> legs; ankles, feet -> feet; shoulders, elbows -> arms;
        wrists, fingers -> hands; head, jaw, eyes -> head (then split into head and hair by
        :func:`split_hair_region`); spine, neck, collars -> upper body.
        """
        if self._face_parts is None:
            joint_part = [PART_NAMES.index(_part_of_joint(n)) for n in self.joint_names]
            faces, weights = self.faces.cpu(), self.skinning_weights.detach().cpu()
            parts = parts_from_dominant_joint(faces, weights, joint_part)
            verts = self.template_vertices.detach().cpu()
            kp = self.keypoint_vertex_weights.cpu() @ verts
            eye_y = float(kp[self.keypoint_names.index("left_eye"), 1])
            ear = kp[self.keypoint_names.index("left_ear")]
            self._face_parts = split_hair_region(parts, verts[faces].mean(1), eye_y, float(ear[2]), float(ear[1]))
            self._face_parts = self._face_parts.to(self.faces.device)
        return self._face_parts
