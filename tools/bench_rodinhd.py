"""Benchmarks of the RodinHD package at the tiny scale (CPU), printed as a table.

* ``train-all``: the tiny ``make train-rodinhd`` end to end (dataset -> stage 1 -> stage 2 -> base -> upsample ->
  one sample), target <= 20 min on two cores. Skipped with ``--run DIR`` (then read from DIR/train_all.json).
* ``sample``: one avatar from a portrait, base + upsample with 10 steps each, plus 36 renders at 256^2,
  target <= 30 s.
* ``render``: one 256^2 view of a triplane (occupancy grid built once, then reused), target <= 1 s.

Sampling and rendering cost does not depend on what the weights learned, so with ``--untrained`` they are timed on
freshly initialised tiny models (no training run needed).

    python tools/bench_rodinhd.py                  # full: trains the tiny pipeline first (minutes)
    python tools/bench_rodinhd.py --run outputs/rodinhd-tiny
    python tools/bench_rodinhd.py --untrained      # sample and render only, about a minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from avatar_core.cameras import orbit_cameras
from rodinhd import pipeline
from rodinhd.conditioning import PortraitVAE
from rodinhd.config import load_rodinhd_config
from rodinhd.renderer import TriplaneField, build_occupancy_grid, render_views


class _UntrainedCascade(pipeline.TriplaneSampler):
    """The tiny cascade with freshly initialised weights (same shapes and cost as a trained one)."""

    def __init__(self, cfg):  # deliberately not calling the parent: nothing is loaded from disk
        self.cfg, self.device = cfg, torch.device("cpu")
        self.decoder = pipeline.build_decoder(cfg).eval().requires_grad_(False)
        c = cfg.conditioning
        self.encoder = PortraitVAE(c.vae_base_channels, c.vae_latent_channels).eval()
        fc = tuple(self.encoder.feature_channels)
        C, r, R = cfg.triplane.channels, cfg.base.resolution, cfg.triplane.resolution
        self.base = pipeline.build_base(cfg, fc).eval()
        self.base.normalizer.fit(torch.randn(4, C, r, 3 * r) * 0.3)
        self.upsample = pipeline.build_upsample(cfg, fc).eval()
        self.upsample.normalizer.fit(torch.randn(4, C, R, 3 * R) * 0.3)


def _portrait(size: int) -> torch.Tensor:  # [S, S, 4]: an opaque disc on a transparent background
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    alpha = ((xx**2 + yy**2) < 0.6).float()[..., None]
    return torch.cat([torch.rand(size, size, 3) * 0.2 + 0.5, alpha], -1)


def bench_sample(cfg, gen, views: int = 36, res: int = 256, steps: int = 10) -> dict:
    portrait = _portrait(cfg.conditioning.portrait_size)
    gen(portrait, 0, 2, 2)  # warm-up: first calls allocate and pick kernels (a 1-step chain is refused)
    t0 = time.perf_counter()
    planes, info = gen(portrait, 0, steps, steps, 1.3)
    t1 = time.perf_counter()
    r = cfg.render
    field = TriplaneField(planes, gen.decoder, cfg.triplane.bound, cfg.triplane.center)
    grid = build_occupancy_grid(field, r.grid_resolution, r.num_samples, r.grid_updates)
    cams = orbit_cameras(views, cfg.sample.radius, 0.0, cfg.sample.fov_deg, res, res)
    with torch.no_grad():
        for i in range(0, views, 8):
            render_views(planes, gen.decoder, cams[i:i + 8], cfg.triplane.bound, cfg.triplane.center,
                         r.num_samples, grid, background=r.background, early_stop_eps=r.early_stop_eps)
    t2 = time.perf_counter()
    return {"base_s": info["base_seconds"], "upsample_s": info["upsample_seconds"], "renders_s": t2 - t1,
            "total_s": t2 - t0, "planes": planes}


def bench_render(cfg, planes: torch.Tensor, decoder, res: int = 256, repeats: int = 5) -> dict:
    r = cfg.render
    field = TriplaneField(planes, decoder, cfg.triplane.bound, cfg.triplane.center)
    t0 = time.perf_counter()
    grid = build_occupancy_grid(field, r.grid_resolution, r.num_samples, r.grid_updates)
    t_grid = time.perf_counter() - t0
    cams = orbit_cameras(repeats, cfg.sample.radius, 0.0, cfg.sample.fov_deg, res, res)
    times = []
    with torch.no_grad():
        for i in range(repeats):
            t = time.perf_counter()
            render_views(planes, decoder, cams[i], cfg.triplane.bound, cfg.triplane.center, r.num_samples, grid,
                         background=r.background, early_stop_eps=r.early_stop_eps)
            times.append(time.perf_counter() - t)
    return {"view_s": statistics.median(times), "grid_s": t_grid}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="an existing tiny run folder (skips the train-all timing)")
    ap.add_argument("--untrained", action="store_true", help="time sample/render on untrained tiny models only")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_rodinhd_config(args.config, args.overrides)
    rows = []
    if args.untrained:
        gen = _UntrainedCascade(cfg)
    else:
        run = Path(args.run) if args.run else Path(tempfile.mkdtemp(prefix="rodinhd_bench_"))
        if args.run is None:
            t0 = time.perf_counter()
            pipeline.train_all(cfg, run, progress=False)
            rows.append(("tiny train-all end to end", time.perf_counter() - t0, 20 * 60.0))
        else:
            info = json.loads((run / "train_all.json").read_text())
            rows.append(("tiny train-all end to end (from run)", sum(info["seconds"].values()), 20 * 60.0))
        gen = pipeline.TriplaneSampler(cfg, run)
    s = bench_sample(cfg, gen)
    rows.append(("sample: base 10 + upsample 10 steps + 36 x 256^2", s["total_s"], 30.0))
    rows.append(("  of which base", s["base_s"], None))
    rows.append(("  of which upsample", s["upsample_s"], None))
    rows.append(("  of which 36 renders (grid incl.)", s["renders_s"], None))
    rr = bench_render(cfg, s["planes"], gen.decoder)
    rows.append(("render one 256^2 view (median of 5)", rr["view_s"], 1.0))
    rows.append(("  occupancy grid, 16 updates (once)", rr["grid_s"], None))
    print(f"{'benchmark':<52} {'seconds':>9} {'target':>8}  ok")
    for name, sec, target in rows:
        ok = "" if target is None else ("yes" if sec <= target else "NO")
        tgt = "" if target is None else f"{target:.0f}"
        print(f"{name:<52} {sec:>9.2f} {tgt:>8}  {ok}")
    print(f"torch threads: {torch.get_num_threads()}, config: {args.config}")


if __name__ == "__main__":
    main()
