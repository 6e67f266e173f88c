"""`avatar-core view` in a real browser: headless Chromium (WebGL through SwiftShader) opens the served page on a
tiny splat result; the screenshot must show the avatar where the viewer's camera projects it, and the page must
list the result. `.ci/run` installs Debian's chromium when it is missing, so this test runs everywhere.

The screenshot is kept under the test's tmp folder and copied to ``outputs/test-artifacts/view_browser.png``.
"""

import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avatar_core.io import save_json, save_ply
from avatar_core.view.scene import front_camera, splats_from_ply

REPO = Path(__file__).resolve().parents[3]
WIDTH, HEIGHT, FOV_DEG = 1280, 800, 40.0  # the viewer's field of view (avatar_core.view.server.FOV_DEG)
COLOUR = (0.15, 0.35, 0.95)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader",
                  "--enable-unsafe-swiftshader", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic", "--disable-extensions",
                  "--disable-default-apps", f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars"]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert exe, "no chromium on PATH: install it (apt-get install -y chromium; .ci/run does this)"
    return exe


def _tiny_result(root: Path) -> Path:
    """A 0.4 x 1.6 x 0.2 m block of 4000 blue Gaussians, standing like a body, with its prompt."""
    res = root / "tiny_avatar"
    g = torch.Generator().manual_seed(0)
    n = 4000
    means = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([0.4, 1.6, 0.2])
    save_ply(res / "avatar.ply", means, torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4), torch.full((n, 3), 0.02),
             torch.full((n,), 0.95), colors=torch.tensor([COLOUR]).expand(n, 3))
    save_json(res / "settings.json", {"prompt": "a blue block person", "kind": "generate"})
    return res


@pytest.fixture
def viewer(tmp_path, request):
    """The viewer as a user starts it, on a port that is taken (it must move to the next free one); always stopped."""
    run = tmp_path / "run"
    result = _tiny_result(run)
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    busy = held.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "avatar_core.cli", "view", str(run), "--port", str(busy)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop():
        held.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    request.addfinalizer(stop)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, url = [], None
    while url is None:
        try:
            line = lines.get(timeout=max(0.1, 60 - (time.perf_counter() - t0)))
        except queue.Empty:
            pytest.fail(f"the viewer printed no URL within 60 s: {''.join(seen)}")
        seen.append(line)
        if line.startswith("viewer on http://"):
            url = line.split()[2]
    return {"url": url, "startup_s": time.perf_counter() - t0, "busy": busy, "log": "".join(seen),
            "result": result}


def _run_chromium(url: str, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=6000",
                           *mode, url], capture_output=True, text=True, timeout=90)


def _project(points: np.ndarray, cam: np.ndarray, look: np.ndarray) -> np.ndarray:
    """Pixel coordinates of world points for a pinhole camera at ``cam`` looking at ``look`` (+y up, vertical
    field of view FOV_DEG) in a WIDTH x HEIGHT image."""
    fwd = (look - cam) / np.linalg.norm(look - cam)
    right = np.cross(fwd, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    rel = points - cam
    x, y, z = rel @ right, rel @ up, rel @ fwd
    f = (HEIGHT / 2) / np.tan(np.radians(FOV_DEG) / 2)
    return np.stack([WIDTH / 2 + f * x / z, HEIGHT / 2 - f * y / z], axis=1)


@pytest.mark.slow
def test_viewer_shows_the_avatar_in_headless_chromium(viewer, tmp_path):
    url = viewer["url"]
    assert f"port {viewer['busy']} is in use; serving on" in viewer["log"]
    assert not url.endswith(f":{viewer['busy']}")
    assert viewer["startup_s"] < 10, f"viewer took {viewer['startup_s']:.1f} s to start"

    shot = tmp_path / "view_browser.png"
    proc = _run_chromium(url, tmp_path / "profile-shot", f"--screenshot={shot}")
    assert shot.is_file(), f"chromium wrote no screenshot: {proc.stderr[-2000:]}"
    artefacts = REPO / "outputs" / "test-artifacts"
    artefacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, artefacts / "view_browser.png")
    dom = _run_chromium(url, tmp_path / "profile-dom", "--dump-dom").stdout
    assert "tiny_avatar" in dom and "a blue block person" in dom, "the result list does not show the result"

    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
    assert img.shape == (HEIGHT, WIDTH, 3)
    splats = splats_from_ply(viewer["result"] / "avatar.ply")
    lo, hi = splats.bounds
    cam, look = front_camera(lo, hi, FOV_DEG)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    px = _project(corners, cam, look)
    (u0, v0), (u1, v1) = px.min(0), px.max(0)
    assert 0 < u0 < u1 < WIDTH and 0 < v0 < v1 < HEIGHT, f"the avatar projects outside the image: {px}"
    du, dv = (u1 - u0) / 4, (v1 - v0) / 4  # the inner half of the box: covered whatever the splats' footprint
    inner = img[int(v0 + dv):int(v1 - dv), int(u0 + du):int(u1 - du)]
    # Background: a band left of the avatar's box (the panels sit at the top corners), away from its splats.
    band = img[int(v0 + dv):int(v1 - dv), max(0, int(u0) - 220):int(u0) - 60]
    bg = np.median(band.reshape(-1, 3), axis=0)
    assert np.abs(band - bg).max(axis=-1).mean() < 10, "the background beside the avatar is not uniform"
    diff = np.abs(inner - bg).max(axis=-1)
    assert (diff > 60).mean() > 0.9, f"avatar box barely differs from the background ({(diff > 60).mean():.2f})"
    mean = inner.reshape(-1, 3).mean(0)  # shown in its own (sRGB) colour (overlapping splats are opaque)
    expect = 255 * np.array(COLOUR)
    assert np.abs(mean - expect).max() < 30, f"the avatar shows as RGB {mean.round()}, not {expect.round()}"
