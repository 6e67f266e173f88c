"""`avatar-core view` in a real browser: headless Chromium (WebGL through SwiftShader) opens the served page on a
tiny splat result (driven over the DevTools protocol); the screenshot must show the avatar where the viewer's
camera projects it, and the page must list the result. `.ci/run` installs Debian's chromium when it is missing, so this test runs everywhere.

The screenshot is kept under the test's tmp folder and copied to ``outputs/test-artifacts/view_browser.png``.
"""

import base64
import contextlib
import json
import os
import queue
import shutil
import signal
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


class Browser:
    """Headless Chromium driven over the DevTools protocol (one launch; the page is polled, not waited for)."""

    def __init__(self, profile: Path):
        # Its own process group: Debian's `chromium` is a wrapper script, the browser and its helpers are children.
        self.proc = subprocess.Popen([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        ws = None
        for line in self.proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
            if "DevTools listening on" in line:
                ws = line.split()[-1]
                break
        assert ws, "chromium did not start its DevTools endpoint"
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()  # keep it drained
        from websockets.sync.client import connect

        self.ws, self.next_id = connect(ws, max_size=None), 0

    def call(self, method: str, session: str | None = None, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def open(self, url: str) -> str:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", session, width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                  mobile=False)
        self.call("Page.navigate", session, url=url)
        return session

    def text(self, session: str) -> str:
        res = self.call("Runtime.evaluate", session, expression="document.body ? document.body.innerText : ''")
        return res["result"].get("value", "")

    def screenshot(self, session: str) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", session, format="png")["data"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the whole group: wrapper, browser, renderer, GPU process
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.perf_counter() + 10
            while time.perf_counter() < deadline:
                try:
                    os.killpg(self.proc.pid, 0)  # anyone left in the group?
                except ProcessLookupError:
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.2)  # reap the wrapper
            else:
                continue
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


@pytest.fixture
def browser(tmp_path, request):
    b = Browser(tmp_path / "profile")
    request.addfinalizer(b.close)
    return b


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
def test_viewer_shows_the_avatar_in_headless_chromium(viewer, browser, tmp_path):
    url = viewer["url"]
    assert f"port {viewer['busy']} is in use; serving on" in viewer["log"]
    assert not url.endswith(f":{viewer['busy']}")
    # A guard against gross regressions only (the suite runs on a loaded machine); idle, it starts in 2-3 s.
    assert viewer["startup_s"] < 30, f"viewer took {viewer['startup_s']:.1f} s to start"

    splats = splats_from_ply(viewer["result"] / "avatar.ply")
    lo, hi = splats.bounds
    cam, look = front_camera(lo, hi, FOV_DEG)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    px = _project(corners, cam, look)
    (u0, v0), (u1, v1) = px.min(0), px.max(0)
    assert 0 < u0 < u1 < WIDTH and 0 < v0 < v1 < HEIGHT, f"the avatar projects outside the image: {px}"
    du, dv = (u1 - u0) / 4, (v1 - v0) / 4  # the inner half of the box: covered whatever the splats' footprint

    session = browser.open(url)
    deadline = time.perf_counter() + 60
    text = ""
    while "tiny_avatar" not in text and time.perf_counter() < deadline:  # the page connected and built its panel
        time.sleep(0.25)
        text = browser.text(session)
    assert "tiny_avatar" in text and "a blue block person" in text, f"the result list does not show it: {text!r}"
    shot = tmp_path / "view_browser.png"
    while True:  # until the avatar is drawn (the splats arrive and sort after the panel)
        shot.write_bytes(browser.screenshot(session))
        img = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
        inner = img[int(v0 + dv):int(v1 - dv), int(u0 + du):int(u1 - du)]
        # Background: a band left of the avatar's box (the panels sit at the top corners), away from its splats.
        band = img[int(v0 + dv):int(v1 - dv), max(0, int(u0) - 220):int(u0) - 60]
        bg = np.median(band.reshape(-1, 3), axis=0)
        diff = np.abs(inner - bg).max(axis=-1)
        mean = inner.reshape(-1, 3).mean(0)  # splats fade in: wait for their own (sRGB) colour, opaque where they overlap
        if ((diff > 60).mean() > 0.9 and np.abs(mean - 255 * np.array(COLOUR)).max() < 12) or time.perf_counter() > deadline:
            break
        time.sleep(0.5)
    artefacts = REPO / "outputs" / "test-artifacts"
    artefacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, artefacts / "view_browser.png")
    assert img.shape == (HEIGHT, WIDTH, 3)
    assert np.abs(band - bg).max(axis=-1).mean() < 10, "the background beside the avatar is not uniform"
    assert (diff > 60).mean() > 0.9, f"avatar box barely differs from the background ({(diff > 60).mean():.2f})"
    expect = 255 * np.array(COLOUR)
    assert np.abs(mean - expect).max() < 12, f"the avatar shows as RGB {mean.round()}, not {expect.round()}"
