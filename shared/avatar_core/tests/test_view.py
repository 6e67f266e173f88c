"""The results viewer without a browser: discovery rules, scene arrays against independent references, bad input,
and the viewer's controls driven in-process."""

import json
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

from avatar_core.errors import CorruptFileError, InputError, MissingFileError
from avatar_core.io import save_json, save_ply
from avatar_core.view import discover, free_port, read_metrics, splats_from_tensors
from avatar_core.view.scene import density_points, front_camera, metrics_table


def _ply(path, n=64, colour=(0.8, 0.2, 0.2), shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([0.4, 1.6, 0.2]) + shift
    return save_ply(path, means, torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4), torch.full((n, 3), 0.02),
                    torch.full((n,), 0.9), colors=torch.tensor([colour]).expand(n, 3))


def _png(path, rgb=(10, 200, 30), size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


@pytest.fixture
def run_dir(tmp_path):
    """A run with a generated avatar, its try-on edit, an exported motion, a clip, a mesh PLY and a training log."""
    run = tmp_path / "run"
    gen = run / "avatars" / "red_dress_s0"
    _ply(gen / "avatar.ply")
    save_json(gen / "settings.json", {"prompt": "a woman in a red dress", "kind": "generate"})
    _png(gen / "preview.png")
    edit = run / "avatars" / "red_dress_s0__upper_clothes_blue"
    _ply(edit / "avatar.ply", colour=(0.1, 0.2, 0.9))
    save_json(edit / "settings.json", {"prompt": "a blue shirt", "kind": "edit", "region": "upper_clothes",
                                       "source": str(gen / "avatar.safetensors")})
    exp = run / "export"
    _ply(exp / "canonical.ply")
    for t in range(3):
        _ply(exp / f"walk_{t:03d}.ply", shift=0.1 * t)
    clip = run / "gas" / "sample0"
    for t in range(4):
        _png(clip / "frames" / f"{t:04d}.png", (40 * t, 0, 0))
    _png(clip / "reference.png", (0, 0, 255))
    mesh = run / "meshes"
    mesh.mkdir(parents=True)
    (mesh / "body.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\n"
                                    b"property float y\nproperty float z\nend_header\n" + np.zeros(3, "<f4").tobytes())
    (run / "diffusion").mkdir()
    lines = [json.dumps({"step": s, "epoch": 0, "loss": 1.0 / s, "lr": 1e-4}) for s in range(1, 6)]
    (run / "diffusion" / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')  # cut short
    return run


def test_discovery_finds_every_kind_and_its_relations(run_dir):
    found = discover(run_dir)
    by = {r.name: r for r in found.results}
    assert sorted(by) == ["avatars/red_dress_s0", "avatars/red_dress_s0__upper_clothes_blue", "export",
                          "gas/sample0"]
    gen, edit = by["avatars/red_dress_s0"], by["avatars/red_dress_s0__upper_clothes_blue"]
    assert gen.kind == "splats" and gen.prompt == "a woman in a red dress" and gen.thumbnail.name == "preview.png"
    assert edit.source == gen.path and found.edits_of(gen) == [edit]
    exp = by["export"]
    assert exp.ply.name == "canonical.ply" and [p.name for p in exp.motions["walk"]] == [
        "walk_000.ply", "walk_001.ply", "walk_002.ply"]
    clip = by["gas/sample0"]
    assert clip.kind == "clip" and len(clip.frames) == 4 and clip.reference.name == "reference.png"
    assert found.metrics == [run_dir / "diffusion" / "metrics.jsonl"]
    assert any("body.ply" in s and "f_dc_0" in s for s in found.skipped)  # the mesh is named, with why


def test_dataset_folder_lists_avatars_with_captions(tmp_path):
    root = tmp_path / "ds"
    save_json(root / "meta.json", {"format": 1})
    for i, caption in enumerate(["a man in a green jacket", "a girl in a yellow skirt"]):
        a = root / "avatars" / f"{i:06d}"  # the layout avatar-core make-dataset writes
        save_json(a / "attributes.json", {"caption": caption})
        _png(a / "views" / "000.png")
        _png(a / "views" / "001.png")
        _png(a / "portrait.png")
    found = discover(root)
    assert [(r.name, r.kind, r.prompt, len(r.views)) for r in found.results] == [
        ("000000", "dataset", "a man in a green jacket", 2), ("000001", "dataset", "a girl in a yellow skirt", 2)]


@pytest.mark.slow  # starts the console script once (a few seconds of imports)
def test_bad_paths_say_what_was_looked_for(tmp_path):
    from avatar_core.view import serve

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MissingFileError, match="3DGS .ply.*triplane.safetensors.*frames"):
        serve(tmp_path, block=False)
    mesh = tmp_path / "mesh.ply"
    mesh.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
                     b"property float z\nend_header\n" + np.zeros(3, "<f4").tobytes())
    with pytest.raises(CorruptFileError, match="lacks f_dc_0, f_dc_1, f_dc_2, opacity"):
        discover(mesh)
    with pytest.raises(MissingFileError, match="nothing at"):
        discover(tmp_path / "absent")
    # Through the console script: the error and what to do, no traceback, exit code 2.
    proc = subprocess.run([sys.executable, "-m", "avatar_core.cli", "view", str(mesh)], capture_output=True,
                          text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[0].startswith("error: ") and "f_dc_0" in lines[0]
    assert len(lines) == 2 and "Traceback" not in proc.stderr


def test_port_in_use_takes_the_next_free_one(capsys):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        got = free_port(busy)
        assert got > busy
        assert f"port {busy} is in use; serving on {got}" in capsys.readouterr().err
    with pytest.raises(InputError):
        free_port(0)


def test_splat_covariances_match_gsplat():
    from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci

    g = torch.Generator().manual_seed(2)
    n = 50
    quats, scales = torch.randn(n, 4, generator=g), torch.rand(n, 3, generator=g) * 0.1 + 0.01
    s = splats_from_tensors(torch.randn(n, 3, generator=g), quats, scales, torch.rand(n, generator=g),
                            torch.rand(n, 3, generator=g) * 1.4 - 0.2)
    ref = _quat_scale_to_covar_preci(quats.double(), scales.double(), compute_preci=False)[0]
    np.testing.assert_allclose(s.covariances, ref.numpy(), rtol=1e-5, atol=1e-9)
    assert s.rgbs.min() >= 0 and s.rgbs.max() <= 1 and s.opacities.shape == (n, 1)


def test_density_points_lie_on_the_surface_of_a_ball():
    radius = 0.5

    def ball(points):  # an opaque ball, coloured by height
        inside = (points.norm(dim=-1) < radius).float()
        return points.clamp(0, 1), 1e3 * inside

    pts, rgb, cell = density_points(ball, [-1, -1, -1, 1, 1, 1], resolution=32)
    r = np.linalg.norm(pts, axis=1)
    assert len(pts) > 500
    assert r.max() < radius and r.min() > radius - 2 * cell  # the shell only: no interior points
    np.testing.assert_allclose(rgb, np.clip(pts, 0, 1), atol=1e-6)


def test_front_camera_frames_the_box():
    lo, hi = np.array([-0.2, -0.8, -0.1]), np.array([0.2, 0.8, 0.1])
    pos, look = front_camera(lo, hi, 40.0)
    np.testing.assert_allclose(look, 0, atol=1e-7)
    # The top edge of the box's front face lies inside the vertical field of view, with the margin.
    half_angle = np.degrees(np.arctan(0.8 / (pos[2] - 0.1)))
    assert pos[2] > 0 and 20 / 1.2 < half_angle < 20


def test_metrics_jsonl_series_and_table(run_dir):
    series = read_metrics(run_dir / "diffusion" / "metrics.jsonl")
    assert sorted(series) == ["loss", "lr"]
    np.testing.assert_array_equal(series["loss"][0], [1, 2, 3, 4, 5])
    np.testing.assert_allclose(series["loss"][1], [1, 0.5, 1 / 3, 0.25, 0.2])
    table = metrics_table(series)
    assert "| loss | 5 | 1 | 0.2 | 0.2 |" in table


def test_viewer_controls_in_process(run_dir):
    """The viewer's own handlers: the list, before / after of an edit, a motion's time slider, a clip's frames."""
    from avatar_core.view.server import ViewerApp

    found = discover(run_dir)
    app = ViewerApp(found, free_port(18700))
    try:
        by = {r.name: r for r in found.results}
        assert app.pick.options == tuple(by) and "red_dress_s0" in app.listing.content
        assert "a woman in a red dress" in app.listing.content
        app._pick("avatars/red_dress_s0__upper_clothes_blue")
        assert app.before_after.visible and "edit of" in app.info.content
        app._before_after("before")
        assert app._current is by["avatars/red_dress_s0"]
        app._before_after("after")
        assert app._current is by["avatars/red_dress_s0__upper_clothes_blue"]
        app._pick("export")
        assert app.motion.visible and app.frame.max == 2 and app.play.visible
        app._show_frame(2)
        s = app._splats(by["export"].motions["walk"][2])
        assert np.allclose(s.centers.mean(0)[0], 0.2, atol=0.05)  # the third posed frame, shifted by 0.2
        app._pick("gas/sample0")
        assert app.clip_image.visible and app.reference.visible and app.frame.max == 3
        app._show_frame(3)
        assert tuple(app.clip_image.image[0, 0]) == (120, 0, 0)
        assert "| loss | 5 |" in app.log_table.content and len(app._plots) == 2
    finally:
        app.stop()


class _Ball:
    """A radiance field standing in for a method's decoded triplane: an opaque green ball of radius 0.3."""

    aabb = [-0.5, -0.5, -0.5, 0.5, 0.5, 0.5]

    def __call__(self, points, directions=None):
        inside = (points.norm(dim=-1) < 0.3).float()
        return torch.tensor([0.1, 0.8, 0.2]).expand(len(points), 3), 500 * inside


def test_triplane_results_as_density_point_cloud_or_views(tmp_path):
    from avatar_core.io import save_tensors
    from avatar_core.view.server import ViewerApp

    sample = tmp_path / "samples" / "s0"
    save_tensors(sample / "triplane.safetensors", {"planes": torch.zeros(4, 8, 24)})
    for i in range(3):
        _png(sample / "views" / f"{i:03d}.png", (0, 60 * i, 0))
    found = discover(tmp_path)
    assert [(r.name, r.kind, len(r.views)) for r in found.results] == [("samples/s0", "triplane", 3)]
    loaded = []
    app = ViewerApp(found, free_port(18750), triplane_field=lambda p: loaded.append(p) or _Ball())
    try:
        app._triplane_job.join(timeout=60)  # extracted in the background, coarse then fine
        assert loaded == [sample / "triplane.safetensors"]
        pts, rgb = app.points
        r = np.linalg.norm(pts, axis=1)
        assert len(pts) > 100 and r.max() < 0.3 and r.min() > 0.3 - 2 * (1.0 / 96)
        np.testing.assert_allclose(rgb, [[0.1, 0.8, 0.2]] * len(pts), atol=1e-6)
    finally:
        app.stop()
    app = ViewerApp(found, free_port(18760))  # without a method's field: the rendered views, and how to see more
    try:
        assert app.points is None and app.frame.max == 2 and "rodinhd view" in app.info.content
    finally:
        app.stop()


class _Sway:
    """A method's animator standing in for TeRA's: poses a result by shifting it sideways, frame t by 0.1 t."""

    motions = ("sway",)

    def __init__(self):
        self.calls = []

    def can_animate(self, result):
        return (result.path / "avatar.safetensors").is_file()

    def __call__(self, result, motion):
        self.calls.append((result.name, motion))
        from avatar_core.view import splats_from_ply

        base = splats_from_ply(result.ply)
        return [type(base)(base.centers + [0.1 * t, 0, 0], base.covariances, base.rgbs, base.opacities)
                for t in range(5)]


def test_animator_poses_results_on_demand(run_dir):
    from avatar_core.io import save_tensors
    from avatar_core.view.server import ViewerApp

    gen = run_dir / "avatars" / "red_dress_s0"
    save_tensors(gen / "avatar.safetensors", {"latent": torch.zeros(1)})
    sway = _Sway()
    app = ViewerApp(discover(run_dir), free_port(18780), animator=sway)
    try:
        assert "red_dress_s0** (splats, animatable)" in app.listing.content
        assert "upper_clothes_blue** (splats):" in app.listing.content  # no latent beside it: not animatable
        app._pick("avatars/red_dress_s0")
        assert app.motion.visible and app.motion.options == ("sway",)
        app.motion_job.join(timeout=30)
        assert sway.calls == [("avatars/red_dress_s0", "sway")]
        assert app.frame.max == 4 and app.frame.visible
        app._show_frame(4)
        assert np.isclose(app._motion_frames[4].centers.mean(0)[0], 0.4, atol=0.05)
        app._pick("export")  # exported frames and the animator's motion side by side
        assert app.motion.options == ("walk",)  # export has no latent: only its own frames
    finally:
        app.stop()


def test_volume_rendered_at_the_browser_camera_coarse_to_fine(tmp_path):
    """The kernel's volume renderer at the viewer's camera: the ball's silhouette where a pinhole projects it, and
    the passes arrive coarse to fine, a stale pose abandoned."""
    from avatar_core.io import save_tensors
    from avatar_core.view.progressive import ProgressiveRenderer
    from avatar_core.view.server import ViewerApp

    got = []
    done = __import__("threading").Event()

    def show(frame, width):
        got.append((width, frame))
        if width == 96:
            done.set()

    r = ProgressiveRenderer(_Ball(), _Ball.aabb, show, widths=(24, 96), num_samples=96)
    try:
        fov = np.radians(40.0)
        r.request((0.0, 0.0, 2.0), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0), fov, 1.0)
        assert done.wait(60)
    finally:
        r.stop()
    assert [w for w, _ in got] == [24, 96]
    img = got[-1][1].astype(float)
    assert img.shape == (96, 96, 3)
    # Projected radius of a ball of radius 0.3 at distance 2: f * tan(asin(0.3 / 2)), f = 48 / tan(20 deg).
    f = 48 / np.tan(fov / 2)
    rad = f * np.tan(np.arcsin(0.3 / 2))
    yy, xx = np.mgrid[:96, :96] + 0.5
    d = np.hypot(xx - 48, yy - 48)
    green = (img[..., 1] - img[..., 0]) > 100  # the ball is (0.1, 0.8, 0.2) on white
    assert green[d < rad - 1.5].all() and not green[d > rad + 1.5].any()

    sample = tmp_path / "s0"
    save_tensors(sample / "triplane.safetensors", {"planes": torch.zeros(1)})
    app = ViewerApp(discover(tmp_path), free_port(18790), triplane_field=lambda p: _Ball())
    try:
        app._triplane_job.join(timeout=60)
        assert app.volume_box.visible and app.points is not None
        app.volume_box.value = True
        app._toggle_volume()

        cam = types.SimpleNamespace(position=(0, 0, 2), look_at=(0, 0, 0), up_direction=(0, 1, 0), fov=fov,
                                    image_width=160, image_height=100)  # a browser camera as viser reports it
        app._camera_moved(cam)
        deadline = time.time() + 60
        while len(app.volume_frames) < 3 and time.time() < deadline:
            time.sleep(0.1)
        assert app.volume_frames[:3] == [64, 160, 320]
        app.volume_box.value = False
        app._toggle_volume()
        assert app.volume is None
    finally:
        app.stop()


def test_view_command_tells_overrides_from_the_path(tmp_path, monkeypatch):
    """`NAME view [PATH] key=value ...`: a config override is never taken for the PATH."""
    import argparse

    import avatar_core.view as view
    from avatar_core.cli import add_config_arguments, make_parser

    seen = []
    monkeypatch.setattr(view, "serve", lambda path, **kw: seen.append((str(path), kw)))
    parser, sub = make_parser("m", "a method", "0")
    p = view.add_view_command(sub, default_path="outputs/m", configure=lambda a: {"body": ",".join(a.overrides)})
    add_config_arguments(p)
    for argv, want in ((["view", "seed=1"], ("outputs/m", "seed=1")),
                       (["view", str(tmp_path), "seed=1", "a.b=2"], (str(tmp_path), "seed=1,a.b=2")),
                       (["view", "--port", "9000"], ("outputs/m", ""))):
        args = parser.parse_args(argv)
        assert isinstance(args, argparse.Namespace) and args.func(args) == 0
        assert (seen[-1][0], seen[-1][1]["body"]) == want
