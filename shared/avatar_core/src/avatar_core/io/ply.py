"""3D Gaussians as PLY in the layout of the reference 3DGS code (Kerbl et al. 2023), read by common splat viewers.

One ``vertex`` element, binary little endian, every property ``float`` (float32), in this order::

    x y z  nx ny nz  f_dc_0 f_dc_1 f_dc_2  f_rest_0 .. f_rest_{3(K-1)-1}  opacity  scale_0 scale_1 scale_2
    rot_0 rot_1 rot_2 rot_3

``f_dc_c`` is the degree-0 SH coefficient of channel ``c``; ``f_rest`` holds the higher-degree coefficients
channel-major (all of red's ``K - 1`` coefficients, then green's, then blue's), ``K = (degree + 1)^2``.
``opacity`` is stored as a logit, ``scale_*`` as natural logs, ``rot_*`` as the quaternion (w, x, y, z) as
given (viewers normalise it). Normals are written as zeros unless given.

Compatibility with third-party readers: ``f_rest`` is written for SH degree 3 by default (45 fields, zero beyond
the Gaussians' own degree), because the reference reader expects exactly ``3 * (3 + 1)^2 - 3`` of them; a
``comment sh_degree D`` header line records the true degree, and :func:`load_ply` trims to it.

Orientation: the kernel's world is +y up with the body facing +z (:mod:`avatar_core.conventions`); a header line
``comment convention opengl: +y up, facing +z`` says so. ``convention="opencv"`` writes the Gaussians rotated
180 degrees about x (-y up, facing -z), as viewers built around COLMAP / OpenCV scenes (gsplat.js) expect:
positions and normals become ``(x, -y, -z)``, rotations are composed with that rotation and the SH coefficients
change sign where their basis function is odd in ``(y, z)``. :func:`load_ply` turns such a file back into the
kernel's convention.
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

__all__ = ["SH_C0", "CONVENTIONS", "REQUIRED_PROPERTIES", "rgb_to_sh", "sh_to_rgb", "PlyGaussians",
           "ply_property_names", "PlyHeader", "read_ply_header", "to_opencv", "save_ply", "load_ply", "convert_ply"]

#: Degree-0 real spherical harmonic, 1 / (2 sqrt(pi)).
SH_C0 = 0.28209479177387814


#: World conventions a file can be written in, with the header comment that names each.
CONVENTIONS = {
    "opengl": "convention opengl: +y up, facing +z (right-handed, metres)",
    "opencv": "convention opencv: -y up (+y down), facing -z (right-handed, metres)",
}

#: Properties every 3DGS reader needs; a file without one of them is not a Gaussian splat file.
REQUIRED_PROPERTIES = ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
                       "rot_0", "rot_1", "rot_2", "rot_3")

# Sign of each SH basis function (3DGS / gsplat order, coefficient 1..15) under (x, y, z) -> (x, -y, -z).
# Degree 1: y, z, x; degree 2: xy, yz, 2zz-xx-yy, xz, xx-yy; degree 3: y(3xx-yy), xyz, y(4zz-xx-yy),
# z(2zz-3xx-3yy), x(4zz-xx-yy), z(xx-yy), x(xx-3yy).
_SH_SIGN_X180 = (1, -1, -1, 1, -1, 1, 1, -1, 1, -1, 1, -1, -1, 1, -1, 1)


def to_opencv(means: np.ndarray, quats: np.ndarray, sh: np.ndarray, normals: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rotate Gaussians 180 degrees about x; the map is its own inverse up to the sign of the quaternion.

    ``means``/``normals`` [N, 3], ``quats`` [N, 4] wxyz, ``sh`` [N, K, 3]. The rotation's quaternion is
    ``(0, 1, 0, 0)``; ``(0, 1, 0, 0) * (w, x, y, z) = (-x, w, -z, y)``.
    """
    flip = np.array([1.0, -1.0, -1.0])
    w, x, y, z = quats.T
    q = np.stack([-x, w, -z, y], axis=1)
    signs = np.asarray(_SH_SIGN_X180[: sh.shape[1]], dtype=sh.dtype)
    return means * flip, q, sh * signs[None, :, None], normals * flip


def _from_opencv_quats(q: np.ndarray) -> np.ndarray:  # the exact inverse of to_opencv's quaternion map
    w, x, y, z = q.T
    return np.stack([x, -w, z, -y], axis=1)


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
    convention: str = "opengl",
    sh_degree_fields: int | None = 3,
) -> Path:
    """Write Gaussians as a standard 3DGS PLY, atomically (a temporary file in the same folder, then replace).

    Inputs are activated values by default: scales are stored as ``log(scales)`` and opacities as
    ``logit(opacities)`` (clamped to ``[1e-6, 1 - 1e-6]`` so that fully opaque ones stay finite). With
    ``activated=False`` scales and opacities are taken as the stored log-scales and logits. Give either RGB
    ``colors`` (stored as the DC term ``(c - 0.5) / C0``) or ``sh``.

    ``convention``: ``"opengl"`` (the kernel's world, +y up, facing +z) or ``"opencv"`` (rotated 180 degrees
    about x: -y up, facing -z). ``sh_degree_fields``: the SH degree the ``f_rest`` fields are written for (zero
    padded; 3 by default, as the reference reader expects), or ``None`` for exactly the Gaussians' own degree.
    """
    path = Path(path)
    if convention not in CONVENTIONS:
        raise InputError(f"save_ply: unknown convention {convention!r}", f"use one of: {', '.join(CONVENTIONS)}")
    if sh_degree_fields is not None and sh_degree_fields not in (0, 1, 2, 3):
        raise InputError(f"save_ply: sh_degree_fields must be 0-3 or None, got {sh_degree_fields!r}",
                         "pass 3 (the reference layout) or None (the Gaussians' own degree)")
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
    degree = int(math.isqrt(sh_np.shape[1])) - 1
    fields = degree if sh_degree_fields is None else max(degree, sh_degree_fields)
    if convention == "opencv":
        m, q, sh_np, nrm = to_opencv(m, q, sh_np, nrm)
    k = (fields + 1) ** 2
    if k > sh_np.shape[1]:  # zero-valued higher bands so that fixed-degree readers find every field
        sh_np = np.concatenate([sh_np, np.zeros((n, k - sh_np.shape[1], 3))], axis=1)
    rest = sh_np[:, 1:, :].transpose(0, 2, 1).reshape(n, 3 * (k - 1))  # channel-major
    data = np.concatenate([m, nrm, sh_np[:, 0, :], rest, o[:, None], s, q], axis=1).astype("<f4")
    names = ply_property_names(fields)
    header = "ply\nformat binary_little_endian 1.0\n"
    header += f"comment {CONVENTIONS[convention]}\ncomment sh_degree {degree}\n"
    header += f"element vertex {n}\n"
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


@dataclass
class PlyHeader:
    """The parts of a PLY header a 3DGS reader needs."""

    format: str | None
    count: int | None  # vertices
    properties: list[tuple[str, str]]  # (name, numpy dtype string) of the vertex element, in file order
    comments: list[str]
    body_offset: int  # bytes before the vertex data

    @property
    def missing(self) -> list[str]:
        """Required 3DGS properties this file lacks (empty for a Gaussian splat file)."""
        names = {p for p, _ in self.properties}
        return [p for p in REQUIRED_PROPERTIES if p not in names]

    def comment_value(self, key: str) -> str | None:
        for c in self.comments:
            if c.split(maxsplit=1)[:1] == [key]:
                return c[len(key):].strip()
        return None


def read_ply_header(path: str | os.PathLike, max_bytes: int = 1 << 16) -> PlyHeader:
    """Parse a PLY header (only the first ``max_bytes`` are read)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no PLY file at {path}", "check the path, or export the Gaussians with save_ply")
    with open(path, "rb") as f:
        raw = f.read(max_bytes)
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply") or end < 0:
        raise CorruptFileError(f"{path} is not a PLY file (no ply/end_header)", "re-export it with save_ply")
    lines = raw[:end].decode("ascii", errors="replace").splitlines()
    fmt, n, props, comments, in_vertex, vertex_seen = None, None, [], [], False, False
    for line in lines[1:]:
        tok = line.split()
        if not tok or tok[0] == "obj_info":
            continue
        if tok[0] == "comment":
            comments.append(line.split(maxsplit=1)[1] if len(tok) > 1 else "")
        elif tok[0] == "format":
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
    return PlyHeader(fmt, n, props, comments, end + len(b"end_header\n"))


def load_ply(path: str | os.PathLike, as_stored: bool = False) -> PlyGaussians:
    """Read a 3DGS PLY (binary little endian; extra properties are ignored).

    The SH degree follows a ``comment sh_degree D`` line (zero padding beyond it is dropped), else the number of
    ``f_rest`` fields. A file written in the opencv convention is turned back into the kernel's (+y up, facing
    +z) unless ``as_stored``.
    """
    path = Path(path)
    head = read_ply_header(path)
    if head.format != "binary_little_endian":
        raise CorruptFileError(f"{path}: PLY format {head.format!r} is not supported",
                               "convert it to binary_little_endian (e.g. re-save with save_ply)")
    n = head.count
    if n is None:
        raise CorruptFileError(f"{path}: no vertex element", "this is not a Gaussian splat file")
    if head.missing:
        raise CorruptFileError(f"{path} is not a 3DGS file: it lacks the properties {', '.join(head.missing)}",
                               "it is probably a point cloud or mesh; export Gaussians with save_ply")
    dtype = np.dtype(head.properties)
    size = path.stat().st_size
    if size - head.body_offset < n * dtype.itemsize:
        raise CorruptFileError(f"{path} is truncated: {n} vertices need {n * dtype.itemsize} bytes, "
                               f"{size - head.body_offset} present", "re-export the file")
    with open(path, "rb") as f:
        f.seek(head.body_offset)
        arr = np.frombuffer(f.read(n * dtype.itemsize), dtype=dtype, count=n)
    names = set(dtype.names)
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
    stated = head.comment_value("sh_degree")
    if stated is not None and stated.isdigit() and (int(stated) + 1) ** 2 <= k:
        sh = sh[:, : (int(stated) + 1) ** 2]
    normals = cols(["nx", "ny", "nz"]) if {"nx", "ny", "nz"} <= names else torch.zeros(n, 3)
    means, quats = cols(["x", "y", "z"]), cols(["rot_0", "rot_1", "rot_2", "rot_3"])
    convention = (head.comment_value("convention") or "opengl").split(":")[0].strip()
    if convention == "opencv" and not as_stored:  # back to the kernel's world (the map is an involution)
        m, _, sh_np, nrm = to_opencv(means.numpy(), quats.numpy(), sh.numpy(), normals.numpy())
        means, sh, normals = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (m, sh_np, nrm))
        quats = torch.from_numpy(_from_opencv_quats(quats.numpy()).astype(np.float32))
    log_scales = cols(["scale_0", "scale_1", "scale_2"])
    logits = cols(["opacity"])[:, 0]
    return PlyGaussians(
        means=means,
        quats=quats,
        # Activated in float64 so that save -> load returns the saved float32 values (to rounding).
        scales=torch.exp(log_scales.double()).float(),
        opacities=torch.sigmoid(logits.double()).float(),
        sh=sh.contiguous(),
        normals=normals,
        log_scales=log_scales,
        opacity_logits=logits,
    )


def convert_ply(src: str | os.PathLike, dst: str | os.PathLike, convention: str = "opencv",
                overwrite: bool = False) -> list[Path]:
    """Re-export 3DGS PLY files in ``convention`` (``avatar-core convert-ply``): one file, or every splat PLY of a
    folder into the folder ``dst``. Values are carried over exactly (log-scales, logits, all SH bands, normals)."""
    src, dst = Path(src), Path(dst)
    if convention not in CONVENTIONS:
        raise InputError(f"unknown convention {convention!r}", f"use one of: {', '.join(CONVENTIONS)}")
    if src.is_dir():
        pairs = [(p, dst / p.name) for p in sorted(src.glob("*.ply")) if not read_ply_header(p).missing]
        if not pairs:
            raise MissingFileError(f"no 3DGS PLY files in {src}", "pass a .ply file or a folder that holds some")
    else:
        pairs = [(src, dst)]
    heads = [read_ply_header(s) for s, _ in pairs]  # every input checked before anything is written
    bad = [f"{s}: lacks {', '.join(h.missing)}" for (s, _), h in zip(pairs, heads) if h.missing]
    if bad:
        raise CorruptFileError(f"not a 3DGS file: {bad[0]}", "convert Gaussian splat PLYs (the 3DGS layout)")
    clash = [d for s, d in pairs if d.exists() and (not overwrite or d.resolve() == s.resolve())]
    if clash:
        raise InputError(f"{clash[0]} exists", "pass another destination, or --overwrite to replace it "
                         "(a file is never converted onto itself)")
    out = []
    for s, d in pairs:
        g = load_ply(s)
        out.append(save_ply(d, g.means, g.quats, g.log_scales, g.opacity_logits, sh=g.sh, normals=g.normals,
                            activated=False, convention=convention))
    return out
