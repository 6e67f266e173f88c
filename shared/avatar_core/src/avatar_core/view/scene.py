"""Arrays the viewer sends to the browser: splats from PLY files or tensors, points from a density field, images,
video frames and training curves. No viewer library here, so each piece is testable on its own."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avatar_core.errors import CorruptFileError

__all__ = ["Splats", "splats_from_ply", "splats_from_tensors", "density_points", "front_camera", "load_rgb",
           "video_frames", "read_metrics", "metrics_table"]


@dataclass
class Splats:
    """Gaussians as the viewer takes them: float32 arrays, covariances from rotation and scale."""

    centers: np.ndarray  # [N, 3]
    covariances: np.ndarray  # [N, 3, 3]
    rgbs: np.ndarray  # [N, 3] in [0, 1], sRGB as rendered
    opacities: np.ndarray  # [N, 1]

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Box of the Gaussians that show (opacity > 0.1), robust to a few stray ones (0.5 / 99.5 percentiles)."""
        keep = self.opacities[:, 0] > 0.1
        pts = self.centers[keep] if keep.sum() >= 4 else self.centers
        return np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)


def splats_from_tensors(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz, any norm
    scales: Tensor,  # [N, 3] activated
    opacities: Tensor,  # [N] activated
    colors: Tensor,  # [N, 3] RGB (SH DC already evaluated)
) -> Splats:
    """Covariance ``R diag(s^2) R^T`` per Gaussian, as 3DGS renders it."""
    q = torch.nn.functional.normalize(quats.detach().double(), dim=-1)
    w, x, y, z = q.unbind(-1)
    rot = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                       2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                       2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)
    m = rot * scales.detach().double()[:, None, :]
    cov = m @ m.transpose(1, 2)
    return Splats(centers=means.detach().float().cpu().numpy(), covariances=cov.float().cpu().numpy(),
                  rgbs=colors.detach().float().clamp(0, 1).cpu().numpy(),
                  opacities=opacities.detach().float().reshape(-1, 1).cpu().numpy())


def splats_from_ply(path: str | Path) -> Splats:
    """A 3DGS PLY (any SH degree: the view-independent DC colour is shown) in the kernel's convention."""
    from avatar_core.io.ply import load_ply

    g = load_ply(path)
    return splats_from_tensors(g.means, g.quats, g.scales, g.opacities, g.colors)


FieldFn = Callable[[Tensor], tuple[Tensor, Tensor]]  # points [N, 3] -> rgb [N, 3], sigma [N]


@torch.no_grad()
def density_points(field: FieldFn, aabb: Sequence[float], resolution: int = 64, alpha: float = 0.5,
                   chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray, float]:
    """A point cloud of a radiance field: the cell centres of a ``resolution^3`` grid over ``aabb`` whose opacity
    across one cell, ``1 - exp(-sigma * cell)``, exceeds ``alpha`` and that have an empty neighbour (the surface
    shell; the inside is never seen). Returns points [M, 3], colours [M, 3] and the cell size."""
    lo, hi = np.asarray(aabb[:3], np.float32), np.asarray(aabb[3:], np.float32)
    cell = float((hi - lo).max() / resolution)
    axes = [torch.from_numpy(lo[i] + (np.arange(resolution, dtype=np.float32) + 0.5) * (hi[i] - lo[i]) / resolution)
            for i in range(3)]
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    rgb, sigma = [], []
    for i in range(0, len(pts), chunk):
        c, s = field(pts[i:i + chunk])
        rgb.append(c.float().cpu())
        sigma.append(s.float().cpu())
    occ = (1 - torch.exp(-torch.cat(sigma) * cell) > alpha).reshape((resolution,) * 3)
    pad = torch.nn.functional.pad(occ[None, None].float(), (1, 1, 1, 1, 1, 1))
    full = -torch.nn.functional.max_pool3d(-pad, 3, stride=1)[0, 0] > 0.5  # all 26 neighbours occupied
    shell = (occ & ~full).reshape(-1)
    return pts[shell].numpy(), torch.cat(rgb)[shell].clamp(0, 1).numpy(), cell


def front_camera(lo: np.ndarray, hi: np.ndarray, fov_deg: float, aspect: float = 1.0,
                 margin: float = 1.15) -> tuple[np.ndarray, np.ndarray]:
    """Camera position and look-at point that frame the box from the front (+z, the body's forward side)."""
    centre = (lo + hi) / 2
    half = (hi - lo) / 2
    t = math.tan(math.radians(fov_deg) / 2)
    dist = margin * max(half[1] / t, half[0] / (t * aspect)) + half[2]
    return centre + np.array([0.0, 0.0, dist], np.float32), centre


def load_rgb(path: str | Path, max_side: int = 512) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3], alpha composited on white, shrunk to ``max_side``."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGBA")
        im.thumbnail((max_side, max_side))
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, im).convert("RGB"))


def video_frames(path: str | Path, max_frames: int = 120, max_side: int = 512) -> list[np.ndarray]:
    """Frames of an MP4/GIF as uint8 RGB, at most ``max_frames`` (evenly taken)."""
    import imageio.v3 as iio
    from PIL import Image

    try:
        frames = [np.asarray(f)[..., :3] for f in iio.imiter(path)]
    except Exception as err:  # imageio raises many kinds for unreadable media
        raise CorruptFileError(f"cannot read video {path}: {err}", "re-encode it as H.264 MP4 or GIF") from err
    step = max(1, math.ceil(len(frames) / max_frames))
    out = []
    for f in frames[::step]:
        im = Image.fromarray(f)
        im.thumbnail((max_side, max_side))
        out.append(np.asarray(im))
    return out


def read_metrics(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Numeric series of a ``metrics.jsonl`` (one JSON record per line), keyed by name: (steps, values)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, line in enumerate(Path(path).read_text().splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by an interrupted run
        if not isinstance(rec, dict):
            continue
        step = rec.get("step", i)
        for k, v in rec.items():
            if k in ("step", "epoch") or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            s = series.setdefault(k, ([], []))
            s[0].append(float(step))
            s[1].append(float(v))
    return {k: (np.asarray(a), np.asarray(b)) for k, (a, b) in series.items()}


def metrics_table(series: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """A Markdown table: per metric, the number of records, first, last and minimum value."""
    if not series:
        return "no numeric metrics in this log"
    rows = ["| metric | records | first | last | min |", "|---|---|---|---|---|"]
    for k, (_, v) in sorted(series.items()):
        rows.append(f"| {k} | {len(v)} | {v[0]:.4g} | {v[-1]:.4g} | {v.min():.4g} |")
    return "\n".join(rows)
