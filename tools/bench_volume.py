"""Triplane volume-rendering benchmark: rays per second at 128x128 with 64 samples per ray, occupancy grid on/off.

The field is a RodinHD-style triplane (3 planes of 32 x 128 x 128, features summed) decoded by a small MLP
(32 -> 64 -> 4). Its density is made a ball of radius 0.5 inside the [-1, 1]^3 box (about 6.5 % of the
volume, roughly a body's share of its bounding box): channel 0 of the planes holds (u^2 + v^2) / 2 so the
summed feature is |x|^2, and the density unit reads it. The grid row fills an OccupancyGrid (32^3) by 16
updates first (not timed, reported in the note), then marches with the same step as the uniform row.

    python tools/bench_volume.py [--repeats 3] [--threads N]

``rows()`` returns dicts with the columns of tools/bench_render.py (case, forward_s, fwd_bwd_s, peak_mem_mb,
note) plus rays_per_s.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from benchlib import PeakRSS, print_table
from torch import nn

from avatar_core.cameras import orbit_cameras
from avatar_core.render.occupancy import OccupancyGrid, fill_occupancy_grid
from avatar_core.render.rays import generate_rays
from avatar_core.render.triplane_sampling import sample_triplane
from avatar_core.render.volume import render_rays

COLUMNS = ("case", "forward_s", "fwd_bwd_s", "peak_mem_mb", "rays_per_s", "note")
SIZE, SAMPLES, NEAR, FAR = 128, 64, 1.0, 4.0


class TriplaneField(nn.Module):
    """Triplane + MLP decoder returning (rgb, sigma) for world points in [-1, 1]^3."""

    def __init__(self, channels: int = 32, res: int = 128, hidden: int = 64, radius: float = 0.5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        planes = torch.randn(1, 3, channels, res, res, generator=g) * 0.1
        u = (torch.arange(res) + 0.5) / res * 2 - 1  # texel centres (align_corners=False)
        vv, uu = torch.meshgrid(u, u, indexing="ij")
        planes[:, :, 0] = (uu**2 + vv**2) / 2  # summed over the three planes: |x|^2
        self.planes = nn.Parameter(planes)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, 4))
        with torch.no_grad():  # hidden unit 0 = relu(50 (r^2 - |x|^2)); density reads only that unit
            self.mlp[0].weight[0].zero_()
            self.mlp[0].weight[0, 0] = -50.0
            self.mlp[0].bias[0] = 50.0 * radius**2
            self.mlp[2].weight[3].zero_()
            self.mlp[2].weight[3, 0] = 1.0
            self.mlp[2].bias[3] = 0.0

    def density(self, x: torch.Tensor) -> torch.Tensor:  # [N, 3] -> [N]
        return self(x, x)[1]

    def forward(self, x: torch.Tensor, d: torch.Tensor):
        out = self.mlp(sample_triplane(self.planes, x[None], reduce="sum")[0])
        return torch.sigmoid(out[:, :3]), torch.relu(out[:, 3])


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def rows(repeats: int = 3) -> list[dict]:
    field = TriplaneField()
    cams = orbit_cameras(1, radius=2.5, elevation_deg=10.0, fov_deg=40.0, width=SIZE, height=SIZE)
    o, d = generate_rays(cams)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    n_rays = o.shape[0]
    step = (FAR - NEAR) / SAMPLES
    grid = OccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=32)
    t_fill = time.perf_counter()
    with torch.no_grad():
        fill_occupancy_grid(grid, lambda x: field.density(x) * step, num_updates=16, dilate=1)
    t_fill = time.perf_counter() - t_fill

    out = []
    for name, estimator in (("grid off", None), ("grid on", grid)):
        def forward(estimator=estimator):
            with torch.no_grad():
                return render_rays(field, o, d, NEAR, FAR, num_samples=SAMPLES, estimator=estimator)

        def forward_backward(estimator=estimator):
            field.zero_grad(set_to_none=True)
            render_rays(field, o, d, NEAR, FAR, num_samples=SAMPLES, estimator=estimator).rgb.mean().backward()

        forward()  # warm-up
        with PeakRSS() as mem:
            t_f = _time(forward, repeats)
            t_fb = _time(forward_backward, repeats)
        evaluated = forward().num_evaluated
        # rays/s also goes into the note: tools/bench_render.py prints only its own columns.
        note = f"{n_rays / t_f:,.0f} rays/s fwd; {evaluated / n_rays:.1f} field evals/ray"
        if estimator is not None:
            note += f"; grid 32^3 fill (16 updates) {t_fill:.2f} s, {grid.binaries.float().mean():.1%} occupied"
        out.append({"case": f"triplane volume 128^2 x 64 spp, {name}", "forward_s": t_f, "fwd_bwd_s": t_fb,
                    "peak_mem_mb": mem.mib, "rays_per_s": n_rays / t_f, "note": note})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per row (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.2f}' for x in __import__('os').getloadavg())}", file=sys.stderr)
    print_table(rows(args.repeats), COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
