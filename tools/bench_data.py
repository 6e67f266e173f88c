"""Synthetic-dataset benchmark: time to write avatars with avatar_core.data, and where the time goes.

The target is 100 avatars x 36 views at 256x256 in at most 10 minutes on 2 cores. ``--num`` smaller than
100 gives a quick estimate: the per-avatar time is measured on ``--num`` avatars and extrapolated to 100
(the printout says so). One-off costs (loading the body, building the UV painter) are listed apart.

    python tools/bench_data.py [--num 100] [--views 36] [--res 256] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

TARGET_S = 600.0
TARGET_NUM = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=TARGET_NUM)
    parser.add_argument("--views", type=int, default=36)
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--uv-res", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="dataset folder (default: a temporary one, deleted after)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from avatar_core.body import load_body_model
    from avatar_core.data.generate import AvatarGenerator, default_settings

    t0 = time.perf_counter()
    body = load_body_model("anny")
    t_body = time.perf_counter() - t0
    settings = default_settings(args.num, args.views, args.res, 0, "anny", args.uv_res)
    t0 = time.perf_counter()
    gen = AvatarGenerator(settings, body)
    t_setup = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        (root / "avatars").mkdir(parents=True, exist_ok=True)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(args.num):
            gen.write(i, root)
        total, total_cpu = time.perf_counter() - t0, time.process_time() - c0

    wall, cpu = gen.timer.total, gen.timer.cpu
    stages = [
        ("body forward + pose + height solve", "body"),
        ("texture painting", "texture"),
        ("rasterization", "rasterize"),
        ("shading + texture lookup", "shade"),
        ("PNG encoding", "png"),
    ]
    rows = [(name, wall.get(key, 0.0), cpu.get(key, 0.0)) for name, key in stages]
    rows.append(("other (json, tensors, renames, glue)", total - sum(r[1] for r in rows),
                 total_cpu - sum(r[2] for r in rows)))
    per = total / args.num
    # Wall time depends on what else runs on the machine; process CPU time (summed over threads) does not.
    print(f"{args.num} avatars x {args.views} views at {args.res}x{args.res}, UV {args.uv_res}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"one-off: body load {t_body:.1f} s, painter setup {t_setup:.1f} s")
    print(f"{'stage':40s} {'wall_s':>8s} {'wall/avatar':>12s} {'cpu_s':>8s} {'cpu/avatar':>11s} {'share':>6s}")
    for name, t, c in rows:
        print(f"{name:40s} {t:8.2f} {t / args.num:12.3f} {c:8.2f} {c / args.num:11.3f} {100 * t / total:5.1f}%")
    print(f"{'total':40s} {total:8.2f} {per:12.3f} {total_cpu:8.2f} {total_cpu / args.num:11.3f} {100.0:5.1f}%")
    projected = per * TARGET_NUM + t_body + t_setup
    how = "measured" if args.num >= TARGET_NUM else f"extrapolated from {args.num} avatars"
    verdict = "meets" if projected <= TARGET_S else "misses"
    print(f"100 avatars: {projected / 60:.1f} min wall ({how}); target {TARGET_S / 60:.0f} min: {verdict} it")
    # On an otherwise idle machine the wall time lies between CPU time / threads and CPU time.
    cpu100 = total_cpu / args.num * TARGET_NUM
    print(f"100 avatars from CPU time (contention-free): {cpu100 / args.threads / 60:.1f} to {cpu100 / 60:.1f} min")


if __name__ == "__main__":
    main()
