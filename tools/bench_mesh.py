"""Triangle-rasterizer benchmark: avatar_core.render.rasterize_mesh on the Anny body, one table.

Rows: 256^2 and 512^2 images, 1 and 8 views on an orbit around the default Anny body (13,718 vertices,
27,420 triangles), plus all conditioning images (render_conditions) for the same views. Times are the
best and the median of ``--repeats`` runs after one warm-up, in milliseconds.

    python tools/bench_mesh.py [--repeats 7] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from benchlib import print_table

COLUMNS = ("case", "views", "best_ms", "median_ms", "best_ms_per_view", "target_ms_per_view", "covered")
TARGET_MS = {256: 30.0, 512: 80.0}


def _times(fn, repeats: int, device: torch.device) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def rows(repeats: int, device: torch.device) -> list[dict]:
    from avatar_core.body import load_body_model
    from avatar_core.cameras import orbit_cameras
    from avatar_core.render.conditions import render_conditions
    from avatar_core.render.mesh import rasterize_mesh

    model = load_body_model("anny", device=device)
    body = model()
    verts, faces = body.vertices[0], model.faces
    result = []
    for res in (256, 512):
        for views in (1, 8):
            cams = orbit_cameras(views, radius=2.6, fov_deg=40.0, width=res, height=res, device=device)
            frags = rasterize_mesh(verts, faces, cams)
            ts = _times(lambda cams=cams: rasterize_mesh(verts, faces, cams), repeats, device)
            result.append({"case": f"rasterize_mesh {res}^2", "views": views, "best_ms": 1e3 * min(ts),
                           "median_ms": 1e3 * statistics.median(ts), "best_ms_per_view": 1e3 * min(ts) / views,
                           "target_ms_per_view": TARGET_MS[res], "covered": f"{frags.mask.float().mean():.3f}"})
    for res in (256, 512):
        cams = orbit_cameras(8, radius=2.6, fov_deg=40.0, width=res, height=res, device=device)
        ts = _times(lambda cams=cams: render_conditions(body, model, cams), max(1, repeats // 2), device)
        result.append({"case": f"render_conditions {res}^2 (5 maps)", "views": 8, "best_ms": 1e3 * min(ts),
                       "median_ms": 1e3 * statistics.median(ts), "best_ms_per_view": 1e3 * min(ts) / 8,
                       "target_ms_per_view": None, "covered": ""})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    print_table(rows(args.repeats, device), COLUMNS, digits=1)


if __name__ == "__main__":
    main()
