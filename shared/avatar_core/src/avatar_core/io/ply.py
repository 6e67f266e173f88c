"""3D Gaussians as PLY in the layout of the reference 3DGS code (Kerbl et al. 2023), read by common splat viewers.

One ``vertex`` element, binary little endian, every property ``float`` (float32), in this order::

    x y z  nx ny nz  f_dc_0 f_dc_1 f_dc_2  f_rest_0 .. f_rest_{3(K-1)-1}  opacity  scale_0 scale_1 scale_2
    rot_0 rot_1 rot_2 rot_3

``f_dc_c`` is the degree-0 SH coefficient of channel ``c``; ``f_rest`` holds the higher-degree coefficients
channel-major (all of red's ``K - 1`` coefficients, then green's, then blue's), ``K = (degree + 1)^2``.
``opacity`` is stored as a logit, ``scale_*`` as natural logs, ``rot_*`` as the quaternion (w, x, y, z) as
given (viewers normalise it). Normals are written as zeros unless given.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avatar_core.errors import CorruptFileError, InputError, MissingFileError

__all__ = ["SH_C0", "rgb_to_sh", "sh_to_rgb", "PlyGaussians", "ply_property_names", "save_ply", "load_ply"]

#: Degree-0 real spherical harmonic, 1 / (2 sqrt(pi)).
SH_C0 = 0.28209479177387814


def rgb_to_sh(rgb: Tensor) -> Tensor:
    """RGB in [0, 1] to the degree-0 SH coefficient that renders it (3DGS adds 0.5 after evaluating SH)."""
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(sh_dc: Tensor) -> Tensor:
    return sh_dc * SH_C0 + 0.5


def ply_property_names(sh_degree: int) -> list[str]:
    """Vertex property names, in file order, for SH of degree ``sh_degree`` (0 to 3)."""
    k_rest = (sh_degree + 1) ** 2 - 1
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(3 * k_rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


@dataclass
class PlyGaussians:
    """Gaussians read from a PLY file, activated (scales > 0, opacities in (0, 1)); float32 CPU tensors."""

    means: Tensor  # [N, 3]
    quats: Tensor  # [N, 4] wxyz, as stored
    scales: Tensor  # [N, 3]
    opacities: Tensor  # [N]
    sh: Tensor  # [N, K, 3]
    normals: Tensor  # [N, 3]
    log_scales: Tensor  # [N, 3] as stored
    opacity_logits: Tensor  # [N] as stored

    @property
    def sh_degree(self) -> int:
        return int(math.isqrt(self.sh.shape[1])) - 1

    @property
    def colors(self) -> Tensor:  # [N, 3] view-independent colour from the DC term
        return sh_to_rgb(self.sh[:, 0])


def _np(x: Tensor | np.ndarray, name: str, shape_tail: tuple[int, ...], n: int | None) -> np.ndarray:
    a = x.detach().to("cpu", torch.float64).numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if a.shape[1:] != shape_tail or (n is not None and a.shape[0] != n):
        want = "[N" + "".join(f", {d}" for d in shape_tail) + "]"
        raise InputError(f"save_ply: {name} must be {want} with N = {n}, got {list(a.shape)}",
                         f"pass {name} with one row per Gaussian")
    if not np.all(np.isfinite(a)):
        raise InputError(f"save_ply: {name} has non-finite values", "fix or drop those Gaussians before saving")
    return a


def save_ply(
    path: str | os.PathLike,
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz
    scales: Tensor,  # [N, 3] activated (> 0), or log-scales with activated=False
    opacities: Tensor,  # [N] activated (in (0, 1)), or logits with activated=False
    colors: Tensor | None = None,  # [N, 3] RGB in [0, 1]
    sh: Tensor | None = None,  # [N, K, 3] SH coefficients (K = 1, 4, 9, 16)
    normals: Tensor | None = None,  # [N, 3]
    activated: bool = True,
) -> Path:
    """Write Gaussians as a standard 3DGS PLY, atomically (a temporary file in the same folder, then replace).

    Inputs are activated values by default: scales are stored as ``log(scales)`` and opacities as
    ``logit(opacities)`` (clamped to ``[1e-6, 1 - 1e-6]`` so that fully opaque ones stay finite). With
    ``activated=False`` scales and opacities are taken as the stored log-scales and logits. Give either RGB
    ``colors`` (stored as the DC term ``(c - 0.5) / C0``) or ``sh``.
    """
    path = Path(path)
    m = _np(means, "means", (3,), None)
    n = m.shape[0]
    q = _np(quats, "quats", (4,), n)
    s = _np(scales, "scales", (3,), n)
    if getattr(opacities, "ndim", 1) == 2:  # [N, 1] as some trainers keep them
        opacities = opacities[:, 0]
    o = _np(opacities, "opacities", (), n)
    if (colors is None) == (sh is None):
        raise InputError("save_ply needs exactly one of colors [N, 3] or sh [N, K, 3]",
                         "pass RGB colours in [0, 1] or spherical-harmonic coefficients")
    if sh is None:
        sh_np = (_np(colors, "colors", (3,), n) - 0.5)[:, None, :] / SH_C0
    else:
        sh_np = np.asarray(sh.detach().to("cpu", torch.float64).numpy() if isinstance(sh, Tensor) else sh,
                           dtype=np.float64)
        if sh_np.ndim != 3 or sh_np.shape[0] != n or sh_np.shape[2] != 3 or sh_np.shape[1] not in (1, 4, 9, 16):
            raise InputError(f"save_ply: sh must be [N, K, 3] with K in 1, 4, 9, 16 and N = {n}, "
                             f"got {list(sh_np.shape)}", "pass SH coefficients as gsplat takes them")
        if not np.all(np.isfinite(sh_np)):
            raise InputError("save_ply: sh has non-finite values", "fix or drop those Gaussians before saving")
    nrm = np.zeros((n, 3)) if normals is None else _np(normals, "normals", (3,), n)
    if activated:
        if np.any(s <= 0):
            raise InputError("save_ply: scales must be positive (activated)",
                             "pass exp(log_scales), or the log-scales with activated=False")
        if np.any((o < 0) | (o > 1)):
            raise InputError("save_ply: opacities must lie in [0, 1] (activated)",
                             "pass sigmoid(logits), or the logits with activated=False")
        s = np.log(s)
        o = np.clip(o, 1e-6, 1 - 1e-6)
        o = np.log(o) - np.log1p(-o)
    k = sh_np.shape[1]
    rest = sh_np[:, 1:, :].transpose(0, 2, 1).reshape(n, 3 * (k - 1))  # channel-major
    data = np.concatenate([m, nrm, sh_np[:, 0, :], rest, o[:, None], s, q], axis=1).astype("<f4")
    names = ply_property_names(int(math.isqrt(k)) - 1)
    header = "ply\nformat binary_little_endian 1.0\n" f"element vertex {n}\n"
    header += "".join(f"property float {name}\n" for name in names) + "end_header\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.encode("ascii"))
            f.write(np.ascontiguousarray(data).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def load_ply(path: str | os.PathLike) -> PlyGaussians:
    """Read a 3DGS PLY (binary little endian; extra properties are ignored, the SH degree follows f_rest)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no PLY file at {path}", "check the path, or export the Gaussians with save_ply")
    raw = path.read_bytes()
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply") or end < 0:
        raise CorruptFileError(f"{path} is not a PLY file (no ply/end_header)", "re-export it with save_ply")
    lines = raw[:end].decode("ascii", errors="replace").splitlines()
    body = end + len(b"end_header\n")
    fmt, n, props, in_vertex, vertex_seen = None, None, [], False, False
    for line in lines[1:]:
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format":
            fmt = tok[1]
        elif tok[0] == "element":
            # Elements after the vertices are stored after them in the file and are not needed.
            in_vertex = tok[1] == "vertex" and not vertex_seen
            if in_vertex:
                n, vertex_seen = int(tok[2]), True
            elif not vertex_seen:
                raise CorruptFileError(f"{path}: element {tok[1]!r} before the vertices",
                                       "write the Gaussians as the first (vertex) element")
        elif tok[0] == "property" and in_vertex:
            if tok[1] == "list" or tok[1] not in _PLY_TYPES:
                raise CorruptFileError(f"{path}: unsupported vertex property {' '.join(tok[1:])!r}",
                                       "3DGS files store scalar float properties only")
            props.append((tok[2], "<" + _PLY_TYPES[tok[1]]))
    if fmt != "binary_little_endian":
        raise CorruptFileError(f"{path}: PLY format {fmt!r} is not supported",
                               "convert it to binary_little_endian (e.g. re-save with save_ply)")
    if n is None:
        raise CorruptFileError(f"{path}: no vertex element", "this is not a Gaussian splat file")
    dtype = np.dtype(props)
    if len(raw) - body < n * dtype.itemsize:
        raise CorruptFileError(f"{path} is truncated: {n} vertices need {n * dtype.itemsize} bytes, "
                               f"{len(raw) - body} present", "re-export the file")
    arr = np.frombuffer(raw, dtype=dtype, count=n, offset=body)
    names = set(dtype.names)
    need = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
            "rot_0", "rot_1", "rot_2", "rot_3"]
    missing = [p for p in need if p not in names]
    if missing:
        raise CorruptFileError(f"{path} lacks 3DGS properties {missing}",
                               "it is probably a point cloud or mesh, not a Gaussian splat file")
    n_rest = sum(1 for p in names if p.startswith("f_rest_"))
    k = n_rest // 3 + 1
    if n_rest % 3 or math.isqrt(k) ** 2 != k or math.isqrt(k) - 1 > 3:
        raise CorruptFileError(f"{path}: {n_rest} f_rest properties do not match an SH degree 0-3",
                               "expected 0, 9, 24 or 45")

    def cols(keys: list[str]) -> Tensor:
        return torch.from_numpy(np.stack([arr[k_].astype(np.float32) for k_ in keys], axis=-1))

    rest = cols([f"f_rest_{i}" for i in range(n_rest)]) if n_rest else torch.zeros(n, 0)
    sh = torch.cat([cols(["f_dc_0", "f_dc_1", "f_dc_2"])[:, None, :],
                    rest.reshape(n, 3, k - 1).transpose(1, 2)], dim=1)
    normals = cols(["nx", "ny", "nz"]) if {"nx", "ny", "nz"} <= names else torch.zeros(n, 3)
    log_scales = cols(["scale_0", "scale_1", "scale_2"])
    logits = cols(["opacity"])[:, 0]
    return PlyGaussians(
        means=cols(["x", "y", "z"]),
        quats=cols(["rot_0", "rot_1", "rot_2", "rot_3"]),
        # Activated in float64 so that save -> load returns the saved float32 values (to rounding).
        scales=torch.exp(log_scales.double()).float(),
        opacities=torch.sigmoid(logits.double()).float(),
        sh=sh.contiguous(),
        normals=normals,
        log_scales=log_scales,
        opacity_logits=logits,
    )
