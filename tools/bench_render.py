"""Rendering benchmark on the CPU: forward and forward+backward time and peak memory, one table.

Rows: the project's Gaussian rasterizer (avatar_core.render.rasterize_gaussians, CPU backend) on a
body-sized cloud, the dense every-Gaussian-against-every-pixel reference, and, when
tools/bench_volume.py exists, its rows (``bench_volume.rows()`` returns dicts with the same columns).

    python tools/bench_render.py [--repeats 3] [--threads N] [--pytorch-rasterizer] [--no-volume]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import torch
from benchlib import PeakRSS, print_table

COLUMNS = ("case", "forward_s", "fwd_bwd_s", "peak_mem_mb", "note")


def look_at(eye, target=(0.0, 0.9, 0.0)) -> torch.Tensor:
    """World-to-camera matrix (OpenCV: +x right, +y down, +z forward) of a camera at ``eye`` looking at ``target``."""
    eye, target = torch.tensor(eye), torch.tensor(target)
    fwd = target - eye
    fwd = fwd / fwd.norm()
    right = torch.linalg.cross(fwd, torch.tensor([0.0, 1.0, 0.0]))
    right = right / right.norm()
    down = torch.linalg.cross(fwd, right)
    R = torch.stack([right, down, fwd])
    M = torch.eye(4)
    M[:3, :3] = R
    M[:3, 3] = -R @ eye
    return M


def body_cloud(n: int, seed: int = 0):
    """Gaussians on the surface of a 1.7 m tall figure (ellipsoids for torso, head, limbs), 3-12 mm scales."""
    g = torch.Generator().manual_seed(seed)
    # (centre, semi-axes) of the parts, metres, body standing on y = 0 and facing +z.
    parts = torch.tensor([
        [0.0, 1.20, 0.0, 0.18, 0.30, 0.11],   # torso
        [0.0, 1.58, 0.0, 0.09, 0.12, 0.10],   # head
        [-0.10, 0.45, 0.0, 0.07, 0.45, 0.07],  # legs
        [0.10, 0.45, 0.0, 0.07, 0.45, 0.07],
        [-0.26, 1.15, 0.0, 0.05, 0.32, 0.05],  # arms
        [0.26, 1.15, 0.0, 0.05, 0.32, 0.05],
    ])
    area = (parts[:, 3:] ** 2).sum(-1)
    which = torch.multinomial(area / area.sum(), n, replacement=True, generator=g)
    dirs = torch.randn(n, 3, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    means = parts[which, :3] + dirs * parts[which, 3:]
    quats = torch.randn(n, 4, generator=g)
    scales = 0.003 + 0.009 * torch.rand(n, 3, generator=g)
    opacities = 0.3 + 0.7 * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    return means, quats, scales, opacities, colors


def cameras(n_cams: int, size: int, distance: float = 2.5, fov_deg: float = 45.0):
    """Cameras on a circle ``distance`` metres from the body's centre, square images of ``size`` pixels."""
    viewmats = torch.stack([
        look_at((distance * math.sin(a), 1.0, distance * math.cos(a)))
        for a in [2 * math.pi * k / n_cams for k in range(n_cams)]
    ])
    f = 0.5 * size / math.tan(math.radians(fov_deg) / 2)
    K = torch.tensor([[f, 0.0, size / 2], [0.0, f, size / 2], [0.0, 0.0, 1.0]])
    return viewmats, K.expand(n_cams, 3, 3).clone()


def time_render(render, inputs, repeats: int) -> tuple[float, float, float]:
    """Best-of-``repeats`` forward and forward+backward seconds, and peak MiB of one forward+backward."""
    def fwd():
        with torch.no_grad():
            render(*inputs)

    def fwd_bwd():
        xs = [x.detach().requires_grad_(True) for x in inputs]
        colors, alphas = render(*xs)[:2]
        (colors.sum() + alphas.sum()).backward()

    fwd()  # warm-up (and, on a fresh machine, the one-off kernel build)
    t_f = min(_timed(fwd) for _ in range(repeats))
    gc.collect()
    with PeakRSS() as mem:
        fwd_bwd()
    t_fb = min(_timed(fwd_bwd) for _ in range(repeats))
    return t_f, t_fb, mem.mib


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gaussian_rows(repeats: int) -> list[dict]:
    from avatar_core.render import _gaussians_cpu
    from avatar_core.render._gaussians_dense import render_dense
    from avatar_core.render.gaussians import rasterize_gaussians

    backend = "C++ kernel" if _gaussians_cpu.load_kernel() is not None else "PyTorch fallback"
    rows = []
    for n, size, n_cams in ((30_000, 256, 1), (100_000, 512, 4)):
        cloud = body_cloud(n)
        viewmats, Ks = cameras(n_cams, size)

        def render(m, q, s, o, c, v, k, size=size):
            return rasterize_gaussians(m, q, s, o, c, v, k, size, size)

        t_f, t_fb, mib = time_render(render, (*cloud, viewmats, Ks), repeats)
        rows.append({"case": f"gaussians {n // 1000}k, {size}^2, {n_cams} cam", "forward_s": t_f,
                     "fwd_bwd_s": t_fb, "peak_mem_mb": mib, "note": backend})

    n, size = 5_000, 128
    cloud = body_cloud(n)
    viewmats, Ks = cameras(1, size)

    def dense(m, q, s, o, c, v, k):
        return render_dense(m, q, s, o, c, v, k, size, size, pixel_chunk=2048)

    def ours(m, q, s, o, c, v, k):
        return rasterize_gaussians(m, q, s, o, c, v, k, size, size)

    t_f, t_fb, mib = time_render(dense, (*cloud, viewmats, Ks), 1)
    rows.append({"case": "dense reference 5k, 128^2, 1 cam", "forward_s": t_f, "fwd_bwd_s": t_fb,
                 "peak_mem_mb": mib, "note": "every Gaussian x every pixel"})
    o_f, o_fb, o_mib = time_render(ours, (*cloud, viewmats, Ks), repeats)
    rows.append({"case": "gaussians 5k, 128^2, 1 cam", "forward_s": o_f, "fwd_bwd_s": o_fb,
                 "peak_mem_mb": o_mib, "note": f"{backend}; {t_fb / o_fb:.0f}x faster than dense (fwd+bwd)"})
    return rows


def volume_rows() -> list[dict]:
    """Rows from tools/bench_volume.py, if that benchmark exists."""
    path = Path(__file__).with_name("bench_volume.py")
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location("bench_volume", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.rows())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per row (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--pytorch-rasterizer", action="store_true",
                        help="time the pure-PyTorch fallback instead of the compiled kernel")
    parser.add_argument("--no-volume", action="store_true", help="leave out the rows of tools/bench_volume.py")
    args = parser.parse_args(argv)
    if args.pytorch_rasterizer:
        os.environ["AVATAR_GAUSSIANS_CPU_KERNEL"] = "0"
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    rows = gaussian_rows(args.repeats) + ([] if args.no_volume else volume_rows())
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
