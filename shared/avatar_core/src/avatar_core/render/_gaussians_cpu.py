"""The project's own differentiable 3D Gaussian splatting on the CPU (Kerbl et al. 2023, Sec. 4-6).

Projection (EWA splatting, Zwicker et al. 2002) and spherical-harmonics colour are PyTorch and
differentiated by autograd; tile binning, depth sorting and compositing run in a small C++ kernel
(``_gaussians_cpu_kernel.cpp``, compiled with g++ on first use, cached under
``~/.cache/avatar_core/kernels`` and called through ctypes) with a hand-written backward. If the
kernel cannot be built, a pair-list rasterizer in PyTorch takes over: same images and gradients,
one to two orders of magnitude slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from avatar_core.rotations import quaternion_to_matrix

log = logging.getLogger(__name__)

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
TRANS_MIN = 1e-4
RADIUS_SIGMAS = 3.33  # extent of the screen-space footprint in standard deviations, as gsplat uses
TILE_SIZE = 16

_KERNEL_SOURCE = Path(__file__).with_name("_gaussians_cpu_kernel.cpp")
_kernel = None
_kernel_tried = False


# ----------------------------------------------------------------------------------------------
# Projection
# ----------------------------------------------------------------------------------------------


def project_gaussians(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    calc_compensations: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """EWA projection of 3D Gaussians to pinhole images (3DGS Sec. 4, Eq. 5; gsplat's clamped Jacobian).

    Returns radii [C, N, 2] (int32, 0 where culled), means2d [C, N, 2], depths [C, N], conics
    [C, N, 3] (upper triangle of the inverse 2D covariance) and compensations [C, N] or None.
    """
    C = viewmats.shape[0]
    rot_c = viewmats[:, :3, :3]  # [C, 3, 3]
    t_c = viewmats[:, :3, 3]  # [C, 3]
    # Covariance R S S^T R^T is carried as its factor M = R S, so the camera-space and screen-space
    # covariances are Gram matrices of (J R_c M) and never need a full 3x3 product chain.
    M = quaternion_to_matrix(quats) * scales[:, None, :]  # [N, 3, 3]
    means_c = torch.einsum("cij,nj->cni", rot_c, means) + t_c[:, None, :]  # [C, N, 3]
    W = torch.einsum("cij,njk->cnik", rot_c, M)  # [C, N, 3, 3]
    x, y, z = means_c.unbind(-1)  # [C, N]

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # Culled Gaussians (behind the near plane) get a harmless depth so nothing downstream divides
    # by zero and backward stays finite; their radii are zeroed below.
    in_depth = (z > near_plane) & (z < far_plane)
    zs = torch.where(in_depth, z, torch.ones_like(z))
    # The Jacobian is evaluated at a point clamped to 1.3x the field of view (3DGS's guard against
    # huge footprints of Gaussians far outside the frustum); the mean itself is not clamped.
    half_x, half_y = 0.3 * 0.5 * width / fx, 0.3 * 0.5 * height / fy
    u = torch.minimum(torch.maximum(x / zs, -(cx / fx + half_x)), (width - cx) / fx + half_x)
    v = torch.minimum(torch.maximum(y / zs, -(cy / fy + half_y)), (height - cy) / fy + half_y)
    row0 = (fx / zs)[..., None] * W[..., 0, :] - (fx * u / zs)[..., None] * W[..., 2, :]  # [C, N, 3]
    row1 = (fy / zs)[..., None] * W[..., 1, :] - (fy * v / zs)[..., None] * W[..., 2, :]
    cxx = (row0 * row0).sum(-1)
    cxy = (row0 * row1).sum(-1)
    cyy = (row1 * row1).sum(-1)

    proj = torch.einsum("cij,cnj->cni", Ks[:, :2, :], means_c)  # [C, N, 2]
    means2d = proj / zs[..., None]

    # Low-pass filter: a fixed eps2d-pixel blur; the compensation keeps the integrated opacity of
    # the unblurred footprint ("antialiased" mode, Mip-Splatting Sec. 5.2).
    det_orig = cxx * cyy - cxy * cxy
    cxx = cxx + eps2d
    cyy = cyy + eps2d
    det = (cxx * cyy - cxy * cxy).clamp(min=1e-10)
    compensations = torch.sqrt(torch.clamp(det_orig / det, min=0.0)) if calc_compensations else None
    conics = torch.stack([cyy / det, -cxy / det, cxx / det], dim=-1)  # [C, N, 3]

    with torch.no_grad():
        radii = torch.ceil(RADIUS_SIGMAS * torch.sqrt(torch.stack([cxx, cyy], dim=-1)))  # [C, N, 2]
        keep = in_depth & (det > 0)
        keep &= (means2d[..., 0] + radii[..., 0] > 0) & (means2d[..., 0] - radii[..., 0] < width)
        keep &= (means2d[..., 1] + radii[..., 1] > 0) & (means2d[..., 1] - radii[..., 1] < height)
        radii = torch.where(keep[..., None], radii, torch.zeros_like(radii)).to(torch.int32)
    assert radii.shape == (C, means.shape[0], 2)
    return radii, means2d, z, conics, compensations


# ----------------------------------------------------------------------------------------------
# Spherical harmonics
# ----------------------------------------------------------------------------------------------

# Real SH basis up to degree 3 in the sign convention of 3DGS and gsplat (Sloan, JCGT 2013).
_SH_C0 = 0.28209479177387814
_SH_C1 = 0.4886025119029199
_SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_SH_C3 = (
    -0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
    -0.4570457994644658, 1.445305721320277, -0.5900435899266435,
)


def sh_basis(degree: int, dirs: Tensor) -> Tensor:  # [..., 3] unit -> [..., (degree + 1) ** 2]
    """Real spherical-harmonics basis functions of unit directions, degrees 0-3."""
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, _SH_C0)]
    if degree >= 1:
        out += [-_SH_C1 * y, _SH_C1 * z, -_SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            _SH_C2[0] * x * y,
            _SH_C2[1] * y * z,
            _SH_C2[2] * (2 * zz - xx - yy),
            _SH_C2[3] * x * z,
            _SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            _SH_C3[0] * y * (3 * xx - yy),
            _SH_C3[1] * x * y * z,
            _SH_C3[2] * y * (4 * zz - xx - yy),
            _SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            _SH_C3[4] * x * (4 * zz - xx - yy),
            _SH_C3[5] * z * (xx - yy),
            _SH_C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, dim=-1)


def eval_sh(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:  # [..., 3], [..., K, 3] -> [..., 3]
    """Colour of SH coefficients seen from directions ``dirs`` (normalised here); bands above ``degree`` unused."""
    n = (degree + 1) ** 2
    basis = sh_basis(degree, F.normalize(dirs, dim=-1))  # [..., n]
    return (basis[..., None] * coeffs[..., :n, :]).sum(-2)


# ----------------------------------------------------------------------------------------------
# Compiled kernel
# ----------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    """Where the compiled kernel lives: $AVATAR_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, under avatar_core/."""
    root = os.environ.get("AVATAR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "avatar_core"
    )
    return Path(root) / "kernels"


def _compile_kernel() -> Path:
    """Build the shared library once per source, compiler and machine; concurrent builds are safe."""
    cxx = os.environ.get("CXX", "g++")
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
    key = hashlib.sha1(_KERNEL_SOURCE.read_bytes())
    key.update(" ".join([cxx, *flags, platform.machine(), platform.system()]).encode())
    out = _cache_dir() / f"gaussians_cpu_{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp.so")
    proc = subprocess.run([cxx, *flags, str(_KERNEL_SOURCE), "-o", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
    os.replace(tmp, out)  # atomic: a reader sees either no file or a complete one
    return out


def _bind(lib: ctypes.CDLL) -> None:
    """Declare the C signatures so ctypes converts (and checks the count of) every argument."""
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in ("f32", "f64"):
        getattr(lib, f"gs_bin_count_{suffix}").argtypes = [p, p, p, p, i64, i64, i64, i64, i64, p, p, c_int]
        getattr(lib, f"gs_bin_fill_{suffix}").argtypes = [p, p, i64, i64, i64, i64, i64, p, p, c_int]
        getattr(lib, f"gs_forward_{suffix}").argtypes = [p, p, p, p, i64, p, p, p, i64, i64, i64, i64, i64, p, p, p, c_int]
        getattr(lib, f"gs_backward_{suffix}").argtypes = [
            p, p, p, p, i64, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, p, c_int,
        ]
        for name in ("bin_count", "bin_fill", "forward", "backward"):
            getattr(lib, f"gs_{name}_{suffix}").restype = None


def load_kernel():
    """The compiled rasterizer (a ctypes library), built with g++ on first use; None if it cannot be built.

    Set ``AVATAR_GAUSSIANS_CPU_KERNEL=0`` to use the pure-PyTorch rasterizer instead.
    """
    global _kernel, _kernel_tried
    if _kernel_tried:
        return _kernel
    _kernel_tried = True
    if os.environ.get("AVATAR_GAUSSIANS_CPU_KERNEL", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_compile_kernel()))
        _bind(lib)
        _kernel = lib
    except Exception as exc:  # any toolchain failure: keep rendering, only slower
        msg = str(exc).strip().splitlines()
        log.warning(
            "Could not build the C++ Gaussian rasterizer (%s: %s); using the slower pure-PyTorch "
            "rasterizer. Install a C++ compiler (g++, or set CXX) to get the fast path.",
            type(exc).__name__,
            msg[-1] if msg else "",
        )
        _kernel = None
    return _kernel


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


def _kernel_forward(means2d, conics, colors, opacities, depths, valid, width, height, tile_size):
    """Binning, depth order and compositing; returns the images and what backward needs."""
    tensors = (means2d, conics, colors, opacities, depths)
    # Raw pointers go to C: wrong dtype, device or layout here would mean reading garbage.
    if not all(t.dtype == means2d.dtype and t.device.type == "cpu" and t.is_contiguous() for t in tensors) or (
        means2d.dtype not in (torch.float32, torch.float64)
    ):
        raise TypeError("the CPU rasterizer takes contiguous float32 or float64 CPU tensors of one dtype")
    lib, sfx = load_kernel(), ("f64" if means2d.dtype == torch.float64 else "f32")
    n_img, N, D = means2d.shape[0], means2d.shape[1], colors.shape[-1]
    tw, th = -(-width // tile_size), -(-height // tile_size)
    threads = torch.get_num_threads()
    bbox = torch.empty(n_img, N, 4, dtype=torch.int32)
    offsets = torch.zeros(n_img * tw * th + 1, dtype=torch.int64)
    valid_u8 = valid.to(torch.uint8).contiguous()
    getattr(lib, f"gs_bin_count_{sfx}")(
        _ptr(means2d), _ptr(conics), _ptr(opacities), _ptr(valid_u8), n_img, N, width, height, tile_size,
        _ptr(bbox), _ptr(offsets), threads,
    )
    isects = torch.empty(int(offsets[-1]), dtype=torch.int32)
    getattr(lib, f"gs_bin_fill_{sfx}")(
        _ptr(depths), _ptr(bbox), n_img, N, width, height, tile_size, _ptr(offsets), _ptr(isects), threads
    )
    render = torch.empty(n_img, height, width, D, dtype=means2d.dtype)
    trans = torch.empty(n_img, height, width, dtype=means2d.dtype)
    stop = torch.empty(n_img, height, width, dtype=torch.int32)
    getattr(lib, f"gs_forward_{sfx}")(
        _ptr(means2d), _ptr(conics), _ptr(colors), _ptr(opacities), D, _ptr(bbox), _ptr(offsets), _ptr(isects),
        n_img, N, width, height, tile_size, _ptr(render), _ptr(trans), _ptr(stop), threads,
    )
    return render, trans, stop, bbox, offsets, isects


class _RasterizeKernel(torch.autograd.Function):
    """Compositing by the C++ kernel with its hand-written backward."""

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, depths, valid, width, height, tile_size):
        render, trans, stop, bbox, offsets, isects = _kernel_forward(
            means2d, conics, colors, opacities, depths, valid, width, height, tile_size
        )
        ctx.save_for_backward(means2d, conics, colors, opacities, bbox, offsets, isects, trans, stop)
        ctx.dims = (width, height, tile_size)
        return render, (1.0 - trans)[..., None]

    @staticmethod
    def backward(ctx, v_render, v_alpha):
        means2d, conics, colors, opacities, bbox, offsets, isects, trans, stop = ctx.saved_tensors
        width, height, tile_size = ctx.dims
        n_img, N, D = means2d.shape[0], means2d.shape[1], colors.shape[-1]
        dtype = means2d.dtype
        v_render = v_render.to(dtype).contiguous()
        v_alpha = v_alpha[..., 0].to(dtype).contiguous()
        threads = torch.get_num_threads()
        grads = torch.zeros(threads, n_img, N, 6 + D, dtype=dtype)
        sfx = "f64" if dtype == torch.float64 else "f32"
        getattr(load_kernel(), f"gs_backward_{sfx}")(
            _ptr(means2d), _ptr(conics), _ptr(colors), _ptr(opacities), D, _ptr(bbox), _ptr(offsets),
            _ptr(isects), _ptr(trans), _ptr(stop), _ptr(v_render), _ptr(v_alpha), n_img, N, width, height,
            tile_size, _ptr(grads), threads,
        )
        g = grads.sum(0) if threads > 1 else grads[0]
        return g[..., 0:2], g[..., 2:5], g[..., 6:], g[..., 5], None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch rasterizer (fallback)
# ----------------------------------------------------------------------------------------------


def _pixel_boxes(means2d: Tensor, conics: Tensor, opacities: Tensor, valid: Tensor, width: int, height: int):
    """Inclusive pixel ranges [N, 4] (x0, x1, y0, y1) where alpha can reach 1/255; empty boxes have x0 > x1."""
    with torch.no_grad():
        m, q, o = means2d.double(), conics.double(), opacities.double()
        det = q[:, 0] * q[:, 2] - q[:, 1] ** 2
        ok = valid & (o * 255.0 >= 1.0) & (det > 0) & (q[:, 0] > 0)
        ext = torch.sqrt(2.0 * torch.log((o.clamp(max=1.0) * 255.0).clamp(min=1.0))).clamp(max=RADIUS_SIGMAS)
        rx = ext * torch.sqrt((q[:, 2] / det).clamp(min=0)) + 0.5
        ry = ext * torch.sqrt((q[:, 0] / det).clamp(min=0)) + 0.5
        x0 = torch.ceil(m[:, 0] - rx - 0.5).clamp(min=0)
        x1 = torch.floor(m[:, 0] + rx - 0.5).clamp(max=width - 1)
        y0 = torch.ceil(m[:, 1] - ry - 0.5).clamp(min=0)
        y1 = torch.floor(m[:, 1] + ry - 0.5).clamp(max=height - 1)
        ok &= (x0 <= x1) & (y0 <= y1)
        box = torch.stack([x0, x1, y0, y1], -1).nan_to_num(0).long()
        box[~ok] = torch.tensor([1, 0, 1, 0])
    return box


def _composite_band(means2d, conics, colors, opacities, g, box, row0: int, rows: int, width: int):
    """Colours [rows * W, D] and alphas [rows * W] of image rows row0.. by a (Gaussian, pixel) pair list.

    ``g`` [M] are Gaussians in depth order and ``box`` [M, 4] their pixel boxes clipped to the band.
    """
    bw = box[:, 1] - box[:, 0] + 1
    n_pix = bw * (box[:, 3] - box[:, 2] + 1)
    pair_g = torch.repeat_interleave(torch.arange(g.shape[0]), n_pix)  # [P] row of g / box per pair
    local = torch.arange(pair_g.shape[0]) - (torch.cumsum(n_pix, 0) - n_pix)[pair_g]
    px = box[pair_g, 0] + local % bw[pair_g]
    py = box[pair_g, 2] + local // bw[pair_g]
    # A stable sort by pixel keeps each pixel's pairs in depth order.
    pix, perm = torch.sort((py - row0) * width + px, stable=True)
    gg, px, py = g[pair_g[perm]], px[perm], py[perm]

    dx = means2d[gg, 0] - (px.to(means2d.dtype) + 0.5)
    dy = means2d[gg, 1] - (py.to(means2d.dtype) + 0.5)
    q = conics[gg]
    sigma = 0.5 * (q[:, 0] * dx * dx + q[:, 2] * dy * dy) + q[:, 1] * dx * dy
    alpha = torch.clamp(opacities[gg] * torch.exp(-sigma), max=ALPHA_MAX)
    alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))

    # Transmittance by a segmented cumulative sum of log(1 - alpha), in float64 because long
    # running sums lose precision in float32.
    la = torch.log1p(-alpha.double())
    excl = torch.cumsum(la, 0) - la
    first = torch.ones_like(pix, dtype=torch.bool)
    first[1:] = pix[1:] != pix[:-1]
    log_T = excl - excl[first][torch.cumsum(first.long(), 0) - 1]
    with torch.no_grad():
        # Stop before the Gaussian that takes T to 1e-4 or below; T only falls, so this keeps a prefix.
        keep = (log_T + la) > math.log(TRANS_MIN)
    w = (torch.exp(torch.where(keep, log_T, torch.zeros_like(log_T))) * (alpha * keep).double()).to(colors.dtype)
    n = rows * width
    render = torch.zeros(n, colors.shape[-1], dtype=colors.dtype).index_add(0, pix, w[:, None] * colors[gg])
    acc = torch.zeros(n, dtype=colors.dtype).index_add(0, pix, w)
    return render, acc


def _rasterize_torch_one(means2d, conics, colors, opacities, depths, valid, width, height, band_rows=32):
    """One image, band of rows by band; each band is checkpointed so memory stays that of one band."""
    box = _pixel_boxes(means2d, conics, opacities, valid, width, height)
    order = torch.argsort(depths.detach(), stable=True)
    order = order[box[order, 0] <= box[order, 1]]
    box = box[order]
    renders, accs = [], []
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (means2d, conics, colors, opacities))
    for row0 in range(0, height, band_rows):
        rows = min(band_rows, height - row0)
        hit = (box[:, 2] < row0 + rows) & (box[:, 3] >= row0)
        b = box[hit].clone()
        b[:, 2].clamp_(min=row0)
        b[:, 3].clamp_(max=row0 + rows - 1)
        args = (means2d, conics, colors, opacities, order[hit], b, row0, rows, width)
        r, a = checkpoint(_composite_band, *args, use_reentrant=False) if grad else _composite_band(*args)
        renders.append(r)
        accs.append(a)
    return torch.cat(renders).view(height, width, -1), torch.cat(accs).view(height, width, 1)


# ----------------------------------------------------------------------------------------------
# Entry point of the CPU backend
# ----------------------------------------------------------------------------------------------


def rasterize_projected(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    colors: Tensor,  # [C, N, D]
    opacities: Tensor,  # [C, N]
    depths: Tensor,  # [C, N]
    valid: Tensor,  # [C, N] bool
    width: int,
    height: int,
    tile_size: int = TILE_SIZE,
    use_kernel: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Composite projected Gaussians front to back; returns colours [C, H, W, D] and alphas [C, H, W, 1]."""
    if use_kernel is None:
        use_kernel = load_kernel() is not None
    if use_kernel:
        if load_kernel() is None:
            raise RuntimeError("the C++ Gaussian rasterizer is not available on this machine")
        render, alphas = _RasterizeKernel.apply(
            means2d.contiguous(), conics.contiguous(), colors.contiguous(), opacities.contiguous(),
            depths.detach().contiguous(), valid.contiguous(), width, height, tile_size,
        )
        return render, alphas
    outs = [
        _rasterize_torch_one(means2d[c], conics[c], colors[c], opacities[c], depths[c], valid[c], width, height)
        for c in range(means2d.shape[0])
    ]
    return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


def rasterize_cpu(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [(C,) N, D] or [(C,) N, K, 3]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near_plane: float,
    far_plane: float,
    eps2d: float,
    sh_degree: int | None,
    backgrounds: Tensor | None,  # [C, D]
    render_mode: str,
    rasterize_mode: str,
    tile_size: int = TILE_SIZE,
    use_kernel: bool | None = None,
) -> tuple[Tensor, Tensor, dict]:
    """The CPU backend of :func:`avatar_core.render.rasterize_gaussians` (inputs already checked)."""
    C, N = viewmats.shape[0], means.shape[0]
    radii, means2d, depths, conics, comp = project_gaussians(
        means, quats, scales, viewmats, Ks, width, height, eps2d, near_plane, far_plane,
        calc_compensations=(rasterize_mode == "antialiased"),
    )
    opac = opacities[None, :].expand(C, N)
    if comp is not None:
        opac = opac * comp
    valid = (radii > 0).all(-1)  # [C, N]

    if sh_degree is None:
        cols = colors if colors.dim() == 3 else colors[None].expand(C, N, colors.shape[-1])
    else:
        # Camera centre from the inverse of the whole 4x4 matrix (not -R^T t): equal for rigid
        # matrices, and this way the gradient w.r.t. every matrix entry matches gsplat's.
        campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
        dirs = means[None, :, :] - campos[:, None, :]  # [C, N, 3]
        coeffs = colors if colors.dim() == 4 else colors[None].expand(C, *colors.shape)
        cols = torch.clamp_min(eval_sh(sh_degree, dirs, coeffs) + 0.5, 0.0)  # [C, N, 3]

    if render_mode in ("RGB+D", "RGB+ED"):
        cols = torch.cat([cols, depths[..., None]], -1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(C, 1)], -1)
    elif render_mode in ("D", "ED"):
        cols = depths[..., None]
        backgrounds = None  # depth images have no background (gsplat uses zeros)

    if use_kernel is None:
        use_kernel = load_kernel() is not None
    if means2d.requires_grad:
        means2d.retain_grad()  # densification reads the screen-space gradient
    render, alphas = rasterize_projected(
        means2d, conics, cols, opac, depths, valid, width, height, tile_size, use_kernel
    )
    if backgrounds is not None:
        render = render + (1.0 - alphas) * backgrounds[:, None, None, :]
    if render_mode in ("ED", "RGB+ED"):
        render = torch.cat([render[..., :-1], render[..., -1:] / alphas.clamp(min=1e-10)], -1)
    meta = {
        # The non-packed layout of gsplat.rasterization: no id lists, per-camera tensors [C, N, ...].
        "batch_ids": None,
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": radii,
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
        "opacities": opac,
        "width": width,
        "height": height,
        "tile_size": tile_size,
        "n_batches": 1,
        "n_cameras": C,
        "backend": "cpu-kernel" if use_kernel else "cpu-torch",
    }
    return render, alphas, meta
