"""Differentiable rasterization of 3D Gaussians (3D Gaussian Splatting, Kerbl et al. 2023).

One entry point, :func:`rasterize_gaussians`, with the signature and semantics of
``gsplat.rasterization`` for the subset the toolkit uses. On CUDA tensors it calls gsplat; on CPU
tensors it runs the project's own tile rasterizer (``_gaussians_cpu``), since gsplat's kernels need
a GPU. Both return the non-packed layout: per-camera tensors ``[C, N, ...]`` in the meta dict.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..errors import BackendUnavailableError, InputError
from . import _gaussians_cpu

RenderMode = Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"]
Backend = Literal["auto", "gsplat", "torch"]

_RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")


def rasterize_gaussians(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz, need not be normalised
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [(C,) N, D] or SH coefficients [(C,) N, K, 3]
    viewmats: Tensor,  # [C, 4, 4] world-to-camera, OpenCV
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,  # [C, D]
    render_mode: RenderMode = "RGB",
    backend: Backend = "auto",
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
    tile_size: int = 16,
) -> tuple[Tensor, Tensor, dict]:
    """Render N Gaussians into C cameras (3DGS Sec. 4-6); gradients reach every tensor input.

    Args:
        means, quats, scales, opacities: the Gaussians (opacities already activated, in [0, 1]).
        colors: activated colours ``[N, D]`` / ``[C, N, D]`` when ``sh_degree`` is None, otherwise SH
            coefficients ``[N, K, 3]`` / ``[C, N, K, 3]`` with ``(sh_degree + 1) ** 2 <= K``; SH
            colours are offset by 0.5 and clamped at 0 as in 3DGS.
        viewmats, Ks: world-to-camera matrices and pixel intrinsics of C pinhole cameras.
        width, height: image size in pixels.
        near_plane, far_plane: Gaussians whose camera depth is outside are culled.
        eps2d: screen-space low-pass added to every 2D covariance (pixels^2).
        backgrounds: colour behind the Gaussians per camera, ``[C, D]``.
        render_mode: "RGB", "D" (accumulated depth), "ED" (expected depth) or "RGB+D" / "RGB+ED".
        backend: "auto" (gsplat for CUDA tensors, the project's own for CPU tensors), "gsplat" or
            "torch" (the project's own CPU rasterizer).
        rasterize_mode: "classic", or "antialiased" to scale opacities by the low-pass compensation.

    Returns:
        colors ``[C, H, W, X]`` (X = D, 1 or D + 1 by mode), alphas ``[C, H, W, 1]`` and a meta
        dict with gsplat's non-packed keys on every backend: ``radii`` ``[C, N, 2]`` (int32,
        0 = culled), ``means2d`` ``[C, N, 2]`` in pixels (its ``.grad`` is kept after backward),
        ``depths`` ``[C, N]``, ``conics`` ``[C, N, 3]``, ``opacities`` ``[C, N]``, ``width``,
        ``height``, ``n_cameras``, ``n_batches`` and ``batch_ids`` / ``camera_ids`` /
        ``gaussian_ids`` = None (not packed), plus ``backend``. These are the keys that
        ``gsplat.strategy.DefaultStrategy`` reads, so it densifies and prunes with this meta on the
        CPU as on CUDA (call it with ``packed=False``). gsplat's ``MCMCStrategy`` reads no meta, but its
        relocation and noise ops are CUDA kernels: on the CPU use
        :class:`avatar_core.render.strategies.MCMCStrategy` (the same strategy with those ops in PyTorch).
    """
    C, N = _check_inputs(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane,
        eps2d, sh_degree, backgrounds, render_mode, rasterize_mode, tile_size,
    )
    use_gsplat = _choose_backend(backend, means)
    if not use_gsplat and means.dtype not in (torch.float32, torch.float64):
        raise InputError(f"the CPU rasterizer computes in float32 or float64, got {means.dtype}",
                         hint="cast the inputs with .float()")
    if N == 0:  # an empty scene is the background on any backend; no kernel needs to see it
        return _empty_render(C, N, colors, sh_degree, backgrounds, render_mode, width, height, means)
    if use_gsplat:
        return _rasterize_gsplat(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane,
            eps2d, sh_degree, backgrounds, render_mode, rasterize_mode, tile_size,
        )
    return _gaussians_cpu.rasterize_cpu(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane,
        eps2d, sh_degree, backgrounds, render_mode, rasterize_mode, tile_size,
    )


def _choose_backend(backend: str, means: Tensor) -> bool:
    """True for gsplat, False for the project's own rasterizer."""
    if backend == "auto":
        return means.is_cuda
    if backend == "gsplat":
        if not means.is_cuda:
            raise BackendUnavailableError(
                "backend='gsplat' needs CUDA tensors: gsplat's rasterization kernels only run on a GPU, "
                f"but the Gaussians are on {means.device}.",
                hint="move the inputs to a CUDA device, or use backend='auto' or 'torch' on the CPU",
            )
        return True
    if backend == "torch":
        if means.device.type != "cpu":
            raise BackendUnavailableError(
                f"backend='torch' (the project's CPU rasterizer) runs on CPU tensors, got {means.device}.",
                hint="move the inputs to the CPU with .cpu(), or use backend='auto' to pick gsplat on CUDA",
            )
        return False
    raise InputError(f"unknown backend {backend!r}", hint="use 'auto', 'gsplat' or 'torch'")


def _rasterize_gsplat(
    means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane,
    eps2d, sh_degree, backgrounds, render_mode, rasterize_mode, tile_size,
):
    """gsplat on CUDA, imported only here so that importing the toolkit never needs it."""
    try:
        import gsplat
    except Exception as exc:  # ImportError, or a broken CUDA build
        raise BackendUnavailableError(
            f"gsplat could not be imported ({type(exc).__name__}: {exc}).",
            hint="install gsplat with CUDA support (pip install gsplat), or render on the CPU with backend='torch'",
        ) from exc
    render, alphas, meta = gsplat.rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, sh_degree=sh_degree,
        packed=False, tile_size=tile_size, backgrounds=backgrounds, render_mode=render_mode,
        rasterize_mode=rasterize_mode,
    )
    meta["backend"] = "gsplat"
    return render, alphas, meta


def _empty_render(C, N, colors, sh_degree, backgrounds, render_mode, width, height, means):
    """Images of a scene without Gaussians: background colour, zero alpha, still attached to the graph."""
    D = 3 if sh_degree is not None else colors.shape[-1]
    X = {"RGB": D, "D": 1, "ED": 1, "RGB+D": D + 1, "RGB+ED": D + 1}[render_mode]
    dt, dev = means.dtype, means.device
    render = torch.zeros(C, height, width, X, dtype=dt, device=dev)
    if backgrounds is not None and render_mode in ("RGB", "RGB+D", "RGB+ED"):
        render[..., :D] = backgrounds[:, None, None, :]
    means2d = torch.zeros(C, N, 2, dtype=dt, device=dev, requires_grad=means.requires_grad)
    # A zero-valued link to the (empty) inputs keeps backward() valid when a loss uses the image, and
    # gives means2d a (zero) gradient, as a densification strategy expects.
    render = render + 0.0 * (means.sum() + colors.sum() + means2d.sum())
    alphas = torch.zeros(C, height, width, 1, dtype=dt, device=dev)
    meta = {
        "batch_ids": None,
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": torch.zeros(C, N, 2, dtype=torch.int32, device=dev),
        "means2d": means2d,
        "depths": torch.zeros(C, N, dtype=dt, device=dev),
        "conics": torch.zeros(C, N, 3, dtype=dt, device=dev),
        "opacities": torch.zeros(C, N, dtype=dt, device=dev),
        "width": width,
        "height": height,
        "tile_size": 16,
        "n_batches": 1,
        "n_cameras": C,
        "backend": "empty",
    }
    return render, alphas, meta


def _check_inputs(
    means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane,
    eps2d, sh_degree, backgrounds, render_mode, rasterize_mode, tile_size,
) -> tuple[int, int]:
    """Shapes, dtypes, devices and values, checked up front so no kernel sees bad input."""
    tensors = {"means": means, "quats": quats, "scales": scales, "opacities": opacities, "colors": colors,
               "viewmats": viewmats, "Ks": Ks}
    if backgrounds is not None:
        tensors["backgrounds"] = backgrounds
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}",
                             hint=f"convert it with torch.as_tensor({name}, dtype=torch.float32)")
        if not t.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got {t.dtype}",
                             hint=f"cast it with {name}.float()")
        if t.device != means.device:
            raise InputError(f"{name} is on {t.device} but means is on {means.device}",
                             hint="put every input on the same device")
        if t.dtype != means.dtype:
            raise InputError(f"{name} has dtype {t.dtype} but means has {means.dtype}",
                             hint="cast every input to one floating-point dtype")

    def shape_error(name, want):
        return InputError(f"{name} must have shape {want}, got {list(tensors[name].shape)}",
                          hint="see the shape comments of avatar_core.render.rasterize_gaussians")

    if means.dim() != 2 or means.shape[-1] != 3:
        raise shape_error("means", "[N, 3]")
    N = means.shape[0]
    if viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4):
        raise shape_error("viewmats", "[C, 4, 4]")
    C = viewmats.shape[0]
    if C == 0:
        raise InputError("no cameras were given (viewmats has C = 0)", hint="pass at least one camera")
    if quats.shape != (N, 4):
        raise shape_error("quats", f"[{N}, 4]")
    if scales.shape != (N, 3):
        raise shape_error("scales", f"[{N}, 3]")
    if opacities.shape != (N,):
        raise shape_error("opacities", f"[{N}]")
    if Ks.shape != (C, 3, 3):
        raise shape_error("Ks", f"[{C}, 3, 3]")
    if sh_degree is None:
        if not (colors.dim() == 2 and colors.shape[0] == N) and not (colors.dim() == 3 and colors.shape[:2] == (C, N)):
            raise shape_error("colors", f"[{N}, D] or [{C}, {N}, D] (or pass sh_degree for SH coefficients)")
        D = colors.shape[-1]
    else:
        if not isinstance(sh_degree, int) or not 0 <= sh_degree <= 3:
            raise InputError(f"sh_degree must be an integer 0-3 or None, got {sh_degree!r}",
                             hint="use 0-3 for SH coefficients, None for plain colours")
        ok = (colors.dim() == 3 and colors.shape[0] == N) or (colors.dim() == 4 and colors.shape[:2] == (C, N))
        if not ok or colors.shape[-1] != 3:
            raise shape_error("colors", f"[{N}, K, 3] or [{C}, {N}, K, 3] SH coefficients")
        if colors.shape[-2] < (sh_degree + 1) ** 2:
            raise InputError(
                f"sh_degree={sh_degree} needs {(sh_degree + 1) ** 2} SH coefficients per colour, got {colors.shape[-2]}",
                hint="pass a lower sh_degree or more coefficients",
            )
        D = 3
    if backgrounds is not None and render_mode != "D" and render_mode != "ED" and backgrounds.shape != (C, D):
        raise shape_error("backgrounds", f"[{C}, {D}]")
    if render_mode not in _RENDER_MODES:
        raise InputError(f"render_mode must be one of {_RENDER_MODES}, got {render_mode!r}", hint="pick one of those")
    if rasterize_mode not in ("classic", "antialiased"):
        raise InputError(f"rasterize_mode must be 'classic' or 'antialiased', got {rasterize_mode!r}",
                         hint="pick one of those")
    for name, val in (("width", width), ("height", height), ("tile_size", tile_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise InputError(f"{name} must be a positive int, got {val!r}", hint=f"pass {name} as a Python int")
    for name, val in (("near_plane", near_plane), ("far_plane", far_plane), ("eps2d", eps2d)):
        if not math.isfinite(float(val)) and name != "far_plane":
            raise InputError(f"{name} must be finite, got {val!r}", hint="pass a finite number")
    if not 0 <= near_plane < far_plane:
        raise InputError(f"need 0 <= near_plane < far_plane, got {near_plane} and {far_plane}",
                         hint="use e.g. near_plane=0.01, far_plane=1e10")
    if eps2d < 0:
        raise InputError(f"eps2d must be >= 0, got {eps2d}", hint="use the default 0.3")

    with torch.no_grad():
        for name, t in tensors.items():
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise InputError(
                    f"{name} contains NaN or infinite values",
                    hint="check the optimiser step (learning rate, exploding gradients) that produced them",
                )
        if N and not bool((scales > 0).all()):
            bad = int((scales <= 0).any(-1).sum())
            raise InputError(
                f"{bad} Gaussians have a zero or negative scale",
                hint="scales are standard deviations in metres; store log-scales and pass scales.exp()",
            )
        if N and not bool((quats.norm(dim=-1) > 0).all()):
            raise InputError("some quaternions are all zero and define no rotation",
                             hint="use (1, 0, 0, 0) for no rotation")
        if N and not bool(((opacities >= 0) & (opacities <= 1)).all()):
            raise InputError("opacities must lie in [0, 1]",
                             hint="pass activated opacities, e.g. torch.sigmoid(logits)")
        if not bool((Ks[:, 0, 0] > 0).all() and (Ks[:, 1, 1] > 0).all()):
            raise InputError("focal lengths Ks[:, 0, 0] and Ks[:, 1, 1] must be positive",
                             hint="Ks are pixel intrinsics [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]")
    return C, N
