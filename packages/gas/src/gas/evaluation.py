"""Held-out evaluation: PSNR / SSIM (LPIPS with local weights) against the true renders, and a flicker measure.

For every held-out clip the reference frame is the input and the clip's own cameras (novel view) or poses (novel
pose) are the targets. Compared: the NeRF renders alone, and every trained video variant (``<run>/video_<name>``:
``full``, ``no_nerf`` = normals only, ``no_switcher`` = joint training without labels).

Flicker (temporal / view consistency) uses the known geometry: a body-surface point seen at pixel ``p`` of frame
``k + 1`` (its triangle and barycentrics from the true mesh) is placed on frame ``k``'s posed mesh and projected;
where it is visible there too (depth test), the colour difference between frame ``k + 1`` at ``p`` and frame
``k`` at the projection is the warping error. Its mean over visible pixels and frame pairs is reported for the
predictions and for the true renders (the floor set by shading changing with the view / pose).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from avatar_core.cameras import Cameras
from avatar_core.metrics import psnr, ssim
from avatar_core.render.conditions import rasterize_body


@torch.no_grad()
def warp_error(frames: Tensor, body, vertices: Tensor, cameras: Cameras, depth_tol: float = 0.03) -> Tensor:
    """Mean absolute colour difference between consecutive frames after geometric warping (module docstring).

    ``frames [T, H, W, 3]``, ``vertices [T, V, 3]`` the true posed meshes, ``cameras`` T cameras.
    """
    T, H, W = frames.shape[:3]
    frags = rasterize_body(vertices, body, cameras)
    errs = []
    for k in range(T - 1):
        nxt = frags.face_idx[k + 1]  # [H, W]
        vis = nxt >= 0
        if not bool(vis.any()):
            continue
        face = nxt[vis]
        bary = frags.bary[k + 1][vis]
        corners = vertices[k][body.faces[face]]  # [n, 3, 3] same surface point on frame k's mesh
        pts = (corners * bary[..., None]).sum(1)
        px, z = cameras[k:k + 1].project(pts)
        px, z = px[0], z[0]
        col = px[:, 0].floor().long().clamp(0, W - 1)
        row = px[:, 1].floor().long().clamp(0, H - 1)
        inside = (px[:, 0] >= 0) & (px[:, 0] < W) & (px[:, 1] >= 0) & (px[:, 1] < H)
        seen = inside & ((frags.depth[k][row, col] - z).abs() < depth_tol)
        if not bool(seen.any()):
            continue
        grid = torch.stack([px[:, 0] / W * 2 - 1, px[:, 1] / H * 2 - 1], -1)[None, :, None]
        prev = F.grid_sample(frames[k].permute(2, 0, 1)[None], grid, align_corners=False)[0, :, :, 0].T
        cur = frames[k + 1][vis]
        errs.append((prev - cur).abs().mean(-1)[seen])
    if not errs:
        return torch.tensor(float("nan"))
    return torch.cat(errs).mean()


def image_metrics(pred: Tensor, target: Tensor, perceptual=None) -> dict[str, float]:
    """Mean PSNR / SSIM (and LPIPS) of frames ``[T, H, W, 3]``."""
    out = {"psnr": float(psnr(pred, target).mean()), "ssim": float(ssim(pred, target).mean())}
    if perceptual is not None:
        out["lpips"] = float(perceptual(pred, target).mean())
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Average per (method, task) over clips."""
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in rows:
        cell = table.setdefault(r["method"], {}).setdefault(r["task"], {})
        for k, v in r.items():
            if isinstance(v, float):
                cell.setdefault(k, []).append(v)
    return {m: {t: {k: sum(v) / len(v) for k, v in c.items()} for t, c in ts.items()} for m, ts in table.items()}


def markdown_table(summary: dict, metrics: tuple[str, ...] = ("psnr", "ssim", "lpips", "flicker", "flicker_true")) -> str:
    present = [m for m in metrics if any(m in c for ts in summary.values() for c in ts.values())]
    lines = ["| method | task | " + " | ".join(present) + " |", "|---|---|" + "---|" * len(present)]
    for method, ts in summary.items():
        for task, c in sorted(ts.items()):
            lines.append(f"| {method} | {task} | " + " | ".join(f"{c[m]:.4f}" if m in c else "-" for m in present) + " |")
    return "\n".join(lines)
