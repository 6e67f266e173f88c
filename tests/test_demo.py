"""`make demo` end to end at a tiny size: every promised output exists and reads back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio

from avatar_core.io import load_image, load_ply

ROOT = Path(__file__).resolve().parents[1]


def test_demo_writes_viewable_results(tmp_path):
    out = tmp_path / "demo"
    subprocess.run([sys.executable, ROOT / "tools" / "demo.py", "--out", out, "--uv-res", "64", "--size", "64",
                    "--frames", "4", "--parts", "kernel"], check=True, capture_output=True, text=True)
    summary = json.loads((out / "summary.json").read_text())
    n = int(summary["kernel"]["gaussians"])
    assert n > 1000
    ply = load_ply(out / "body_avatar.ply")
    assert ply.means.shape == (n, 3)
    views = load_image(out / "body_views.png")
    assert views.shape[-1] in (3, 4) and views.shape[1] > views.shape[0]  # four views side by side
    for name in ("body_turntable", "body_animation"):
        (video,) = [p for p in out.iterdir() if p.stem == name]
        frames = iio.imread(video)
        assert frames.shape[0] == 4
        # Something was drawn: the avatar covers part of the white background.
        assert (frames.reshape(4, -1, frames.shape[-1]).min(-1)[0] < 200).mean() > 0.02
