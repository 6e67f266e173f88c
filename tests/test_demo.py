"""`make demo` end to end at its smallest size: every part runs (the kernel's and each installed package's
``NAME.demo.run``), and every promised output exists and reads back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest

from avatar_core.io import load_image, load_ply, load_tensors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from demo import PACKAGES, package_demo  # noqa: E402


def _frames(path: Path):
    frames = iio.imread(path)
    # Something was drawn: the subject covers part of the white background in some frame.
    assert (frames.reshape(frames.shape[0], -1, frames.shape[-1]).min(-1) < 200).mean() > 0.01, path
    return frames


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    done = subprocess.run([sys.executable, ROOT / "tools" / "demo.py", "--out", out, "--smallest"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_every_installed_part_ran(demo):
    _, summary = demo
    for name in PACKAGES:
        if package_demo(name) is not None:
            assert isinstance(summary[name], dict), (name, summary[name])


@pytest.mark.slow
def test_kernel_part(demo):
    out, summary = demo
    n = int(summary["kernel"]["gaussians"])
    assert n > 1000
    ply = load_ply(out / "body_avatar.ply")
    assert ply.means.shape == (n, 3)
    views = load_image(out / "body_views.png")
    assert views.shape[-1] in (3, 4) and views.shape[1] > views.shape[0]  # four views side by side
    for name in ("body_turntable", "body_animation"):
        (video,) = [p for p in out.iterdir() if p.stem == name]
        assert _frames(video).shape[0] == 4


@pytest.mark.slow
def test_tera_part(demo):
    out, summary = demo
    if package_demo("tera") is None:
        pytest.skip("tera is not installed")
    tera = summary["tera"]
    assert len(tera["generated"]) == 3
    for d in tera["generated"].values():
        latent, meta = load_tensors(Path(d) / "avatar.safetensors")
        assert meta["kind"] == "generate" and latent["latent"].ndim == 3
        assert load_ply(Path(d) / "avatar.ply").means.shape[0] > 0
    for video in tera["turntables"]:
        _frames(Path(video))
    assert (Path(tera["edit"]["dir"]) / "avatar.safetensors").is_file()
    assert _frames(Path(tera["animation"])).shape[0] == 2


@pytest.mark.slow
def test_rodinhd_part(demo):
    out, summary = demo
    if package_demo("rodinhd") is None:
        pytest.skip("rodinhd is not installed")
    r = summary["rodinhd"]
    planes, _ = load_tensors(r["triplane"])
    assert planes["planes"].shape == (3, 4, 16, 16)
    for grid in (r["views"], r["fitted_views"]):  # one row of 32 px views (with the grid's padding)
        image = load_image(grid)
        assert 32 <= image.shape[0] < 64 and image.shape[1] >= 3 * 32
    assert Path(r["turntable"]).is_file()
