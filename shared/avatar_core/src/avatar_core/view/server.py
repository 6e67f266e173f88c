"""``avatar-core view``: the results under a path in the browser, on viser (nerfstudio's viewer library).

One page: a list of results (name, prompt or caption, thumbnail), the chosen one in the 3D scene -- splats for
Gaussian results (from their PLY), for triplanes whose method supplies the field (``rodinhd view``) a point cloud
extracted from the density or the volume rendered by the kernel at the browser's camera, coarse to fine, the frames
or video beside the reference image for clips and dataset avatars --
with the body mesh as a toggle, a time slider over a motion's posed frames, a before / after switch for edits, and
the run's metrics table and training curves from ``metrics.jsonl``. Serves on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from avatar_core.errors import AvatarError, InputError, MissingFileError
from avatar_core.view.discover import LOOKED_FOR, Found, Result, discover
from avatar_core.view.progressive import ProgressiveRenderer
from avatar_core.view.scene import (
    Splats,
    density_points,
    front_camera,
    load_rgb,
    metrics_table,
    read_metrics,
    splats_from_ply,
    video_frames,
)

__all__ = ["free_port", "ViewerApp", "serve", "TriplaneFieldLoader", "Animator"]

#: Given a triplane file, a radiance field over world points (``rgb [N, 3], sigma [N]``) with an ``aabb``.
TriplaneFieldLoader = Callable[[Path], Any]


class Animator(Protocol):
    """A method's posing of its results (TeRA, GaussianIP): the viewer asks for a motion's frames on demand."""

    motions: Sequence[str]  # the built-in motions it offers

    def can_animate(self, result: Result) -> bool: ...

    def __call__(self, result: Result, motion: str) -> list[Splats]: ...

FOV_DEG = 40.0
FPS = 12.0
TRIPLANE_GRIDS = (48, 96)  # point-cloud extraction: a coarse pass, then the fine one


def free_port(port: int, host: str = "127.0.0.1", tries: int = 100) -> int:
    """``port`` if it can be bound on ``host``, else the next free one (a one-line note says so on stderr)."""
    if not 0 < port < 65536:
        raise InputError(f"port {port} is out of range", "pass --port between 1024 and 65535")
    for p in range(port, min(port + tries, 65536)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As the server binds: a port left in TIME_WAIT by a viewer that just stopped is free, a listening one not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, p))
            except OSError as err:
                if err.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
                continue
        if p != port:
            print(f"port {port} is in use; serving on {p} instead", file=sys.stderr)
        return p
    raise InputError(f"ports {port}-{port + tries - 1} on {host} are all in use", "pass another --port")


class ViewerApp:
    """The viewer's state and GUI over one :class:`Found` (see :mod:`avatar_core.view.discover`)."""

    def __init__(self, found: Found, port: int, host: str = "127.0.0.1",
                 triplane_field: TriplaneFieldLoader | None = None, body: str | None = None,
                 animator: Animator | None = None):
        import viser

        self.found, self.triplane_field, self.body_name, self.animator = found, triplane_field, body, animator
        self._motions: dict[str, list[Path] | None] = {}  # the current result's motions (None: not posed yet)
        self._posed: dict[tuple[Path, str], list[Splats]] = {}
        self.motion_job: threading.Thread | None = None
        self._posing: set[tuple[Path, str]] = set()
        logging.getLogger("websockets").setLevel(logging.WARNING)  # one line per browser connection otherwise
        with contextlib.redirect_stdout(io.StringIO()):  # viser prints its own banner; ours follows
            self.server = viser.ViserServer(host=host, port=port, verbose=False)
        self.host, self.port = host, self.server.get_port()
        self._lock = threading.RLock()
        self._splat_cache: dict[Path, Splats] = {}
        self._clip: list[np.ndarray] = []
        self._motion_frames: list[Path | Splats] = []
        self._current: Result | None = None
        self.points: tuple[np.ndarray, np.ndarray] | None = None  # the last triplane's extracted point cloud
        self._triplane_job: threading.Thread | None = None
        self._field: Any = None  # the current triplane's radiance field, when a method decodes it
        self.volume: ProgressiveRenderer | None = None
        self.volume_frames: list[int] = []  # widths of the volume frames sent, in order
        self._stop = threading.Event()
        self.server.scene.set_up_direction("+y")
        self.server.initial_camera.fov = math.radians(FOV_DEG)
        self._build_gui()
        if found.results:
            self.show(found.results[0])
        threading.Thread(target=self._player, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------------------------------------ GUI
    def _build_gui(self) -> None:
        gui, f = self.server.gui, self.found
        gui.configure_theme(control_width="large")
        gui.add_markdown(f"**avatar-core view** `{f.root}`: {len(f.results)} results, {len(f.metrics)} training logs")
        names = [r.name for r in f.results] or ["(none)"]
        with gui.add_folder("Results"):
            self.pick = gui.add_dropdown("result", tuple(names), initial_value=names[0])
            self.listing = gui.add_markdown(self._listing())
            self.info = gui.add_markdown("")
            self.thumb = gui.add_image(np.full((8, 8, 3), 255, np.uint8), label="thumbnail", visible=False)
        self.pick.on_update(lambda _: self._pick(self.pick.value))
        with gui.add_folder("Display"):
            self.body_box = gui.add_checkbox("body mesh", initial_value=False)
            self.volume_box = gui.add_checkbox("render volume", initial_value=False, visible=False,
                                               hint="the kernel's volume renderer at this camera, coarse to fine")
            self.before_after = gui.add_button_group("edit", ("before", "after"), visible=False)
        self.body_box.on_update(lambda _: self._toggle_body())
        self.volume_box.on_update(lambda _: self._toggle_volume())
        self.server.on_client_connect(lambda client: client.camera.on_update(self._camera_moved))
        self.before_after.on_click(lambda e: self._before_after(e.target.value))
        with gui.add_folder("Playback") as self.playback:
            self.motion = gui.add_dropdown("motion", ("-",), visible=False)
            self.frame = gui.add_slider("frame", 0, 1, 1, 0, visible=False)
            self.play = gui.add_checkbox("play", initial_value=False, visible=False)
            self.clip_image = gui.add_image(np.full((8, 8, 3), 255, np.uint8), label="frame", visible=False)
            self.reference = gui.add_image(np.full((8, 8, 3), 255, np.uint8), label="reference", visible=False)
        self.motion.on_update(lambda _: self._set_motion(self.motion.value))
        self.frame.on_update(lambda _: self._show_frame(int(self.frame.value)))
        if f.metrics:
            with gui.add_folder("Training") as self.training:
                labels = tuple(p.parent.relative_to(f.root).as_posix() or "." for p in f.metrics)
                self.log_pick = gui.add_dropdown("log", labels, initial_value=labels[0])
                self.log_table = gui.add_markdown("")
                self._plots: list[Any] = []
            self.log_pick.on_update(lambda _: self._show_log(labels.index(self.log_pick.value)))
            self._show_log(0)

    def _listing(self) -> str:
        if not self.found.results:
            return "no results here (training logs only)"
        lines = []
        for r in self.found.results[:200]:
            about = f": {r.prompt}" if r.prompt else ""
            moves = r.animatable or (self.animator is not None and r.kind == "splats" and self.animator.can_animate(r))
            lines.append(f"- **{r.name}** ({r.kind}{', animatable' if moves else ''}){about}")
        if len(self.found.results) > 200:
            lines.append(f"- ... and {len(self.found.results) - 200} more (pick them in the list)")
        return "\n".join(lines)

    def _pick(self, name: str) -> None:
        res = next((r for r in self.found.results if r.name == name), None)
        if res is not None:
            self.show(res)

    # ------------------------------------------------------------------------------------------ showing
    def _splats(self, path: Path) -> Splats:
        if path not in self._splat_cache:
            self._splat_cache[path] = splats_from_ply(path)
        return self._splat_cache[path]

    def _add_splats(self, s: Splats) -> None:
        # viser draws splat and point colours as given (no colour management): the kernel's sRGB, unconverted.
        self.server.scene.add_gaussian_splats("/result", s.centers, s.covariances, s.rgbs, s.opacities)

    def _clear_scene(self) -> None:
        self._stop_volume()
        self._field, self.points = None, None
        self.volume_box.visible = False
        if self.volume_box.value:
            self.volume_box.value = False
        for name in ("/result", "/frame", "/reference", "/points"):
            with contextlib.suppress(Exception):
                self.server.scene.remove_by_name(name)

    def show(self, res: Result, framing: bool = True) -> None:
        """Put ``res`` in the scene and fill the panels that concern it."""
        with self._lock:
            self._current = res
            self.play.value = False
            self._clear_scene()
            self.info.content = self._about(res)
            if res.thumbnail is not None:
                self.thumb.image = load_rgb(res.thumbnail, 256)
            self.thumb.visible = res.thumbnail is not None
            edits = self.found.edits_of(res)
            self.before_after.visible = res.source is not None or bool(edits)
            lo, hi = np.array([-0.5, -1.0, -0.3]), np.array([0.5, 1.0, 0.3])
            if res.kind == "splats" and res.ply is not None:
                s = self._splats(res.ply)
                self._add_splats(s)
                lo, hi = s.bounds
            elif res.kind == "triplane" and self.triplane_field is not None and res.triplane is not None:
                self._triplane_job = threading.Thread(target=self._show_triplane, args=(res,), daemon=True)
                self._triplane_job.start()
            self._setup_playback(res, lo, hi)
            if framing:
                self._frame_camera(lo, hi)
            if self.body_box.value:
                self._toggle_body()

    def _about(self, res: Result) -> str:
        rows = [f"**{res.name}**: {res.kind}"]
        if res.prompt:
            rows.append(f"prompt / caption: *{res.prompt}*")
        if res.ply is not None:
            rows.append(f"splats: `{res.ply.name}`")
        if res.kind == "triplane" and self.triplane_field is None:
            rows.append("triplane: its rendered views are shown; open it with `rodinhd view` to see the volume "
                        "(a point cloud from the decoded density, or the volume rendered at this camera)")
        if res.source is not None:
            rows.append(f"edit of `{res.source}`")
        for key in ("kind", "region", "seed", "steps", "method"):
            if key in res.settings and key != "kind":
                rows.append(f"{key}: {res.settings[key]}")
        return "\n\n".join(rows)

    def _show_triplane(self, res: Result) -> None:
        """Decode the triplane's density into a point cloud in the background, coarse first (48^3, then 96^3
        cells), so the page stays responsive and shows something within a second or two."""
        try:
            field = self.triplane_field(res.triplane)
            with self._lock:
                if self._current is res:
                    self._field = field
                    self.volume_box.visible = True
            for resolution in TRIPLANE_GRIDS:
                pts, rgb, cell = density_points(field, field.aabb, resolution=resolution)
                with self._lock:
                    if self._current is not res:
                        return
                    if len(pts) == 0:
                        self.info.content += "\n\nthe decoded density is empty (no cell above 50% opacity)"
                        return
                    self.points, self._point_size = (pts, rgb), cell * 1.5
                    if self.volume is None:
                        self.server.scene.add_point_cloud("/points", pts, rgb, point_size=self._point_size,
                                                          point_shape="circle", point_shading="flat")
                    if resolution == TRIPLANE_GRIDS[0]:
                        self._frame_camera(pts.min(0), pts.max(0))
        except AvatarError as err:  # e.g. the run's decoder is missing: say so, keep serving the views
            self.info.content += f"\n\ncannot decode this triplane: {err}"

    # ------------------------------------------------------------------------------------------ volume
    def _toggle_volume(self) -> None:
        """The triplane's volume at the browser's camera through the kernel renderer (in place of its points)."""
        with self._lock:
            self._stop_volume()
            if not self.volume_box.value or self._field is None:
                return
            with contextlib.suppress(Exception):
                self.server.scene.remove_by_name("/points")
            self.volume = ProgressiveRenderer(self._field, self._field.aabb, self._show_volume)
            for client in self.server.get_clients().values():
                self._camera_moved(client.camera)

    def _camera_moved(self, camera) -> None:
        vol = self.volume
        if vol is not None:
            aspect = camera.image_width / camera.image_height if camera.image_height else 1.0
            vol.request(camera.position, camera.look_at, camera.up_direction, camera.fov, aspect)

    def _show_volume(self, frame: np.ndarray, width: int) -> None:
        self.volume_frames.append(width)
        self.server.scene.set_background_image(frame, format="jpeg")

    def _stop_volume(self) -> None:
        if self.volume is not None:
            self.volume.stop()
            self.volume = None
            with contextlib.suppress(Exception):
                self.server.scene.set_background_image(None)
            if self.points is not None and self._current is not None and self._current.kind == "triplane":
                pts, rgb = self.points
                self.server.scene.add_point_cloud("/points", pts, rgb, point_size=self._point_size,
                                                  point_shape="circle", point_shading="flat")

    def _frame_camera(self, lo: np.ndarray, hi: np.ndarray) -> None:
        pos, look = front_camera(np.asarray(lo, np.float32), np.asarray(hi, np.float32), FOV_DEG)
        self.server.initial_camera.position = tuple(float(v) for v in pos)
        self.server.initial_camera.look_at = tuple(float(v) for v in look)
        for client in self.server.get_clients().values():
            client.camera.fov = math.radians(FOV_DEG)
            client.camera.position = tuple(float(v) for v in pos)
            client.camera.look_at = tuple(float(v) for v in look)

    # ------------------------------------------------------------------------------------------ playback
    def _setup_playback(self, res: Result, lo: np.ndarray, hi: np.ndarray) -> None:
        self._motion_frames, self._clip = [], []
        self._panel_lo_hi = (lo, hi)
        self._motions = dict(res.motions)
        if self.animator is not None and res.kind == "splats" and self.animator.can_animate(res):
            self._motions.update({m: None for m in self.animator.motions if m not in self._motions})
        if self._motions:
            names = tuple(self._motions)
            self.motion.options = names
            self.motion.value = names[0]
            self.motion.visible = True
            self._set_motion(names[0])
        else:
            self.motion.visible = False
            clip = res.frames or (res.views if res.kind in ("dataset", "triplane", "clip") else [])
            if clip:
                self._clip = [load_rgb(p) for p in clip]
            elif res.videos:  # a clip, or a splat result's own video (its animation before its turntable)
                moving = [v for v in res.videos if "turntable" not in v.name]
                self._clip = video_frames((moving or res.videos)[0])
            self._set_range(len(self._clip))
        if res.reference is not None:
            ref = load_rgb(res.reference)
            self.reference.image = ref
            if res.kind != "splats":  # in the scene, left of the clip
                h = 1.0
                w = h * ref.shape[1] / ref.shape[0]
                self.server.scene.add_image("/reference", ref, w, h, position=(-0.6 - w / 2, 0.0, 0.0))
        self.reference.visible = res.reference is not None
        self.clip_image.visible = bool(self._clip)
        self.playback.visible = bool(self._clip or self._motions or res.reference is not None)
        if self._clip:
            self._show_frame(0)
            h = 1.0
            w = h * self._clip[0].shape[1] / self._clip[0].shape[0]
            self._panel_lo_hi = (np.array([-0.6 - (w if res.reference else 0), -h / 2, 0]), np.array([w, h / 2, 0]))
            if res.kind != "splats":
                lo[:], hi[:] = self._panel_lo_hi

    def _set_range(self, n: int) -> None:
        self.frame.max = max(1, n - 1)
        self.frame.value = 0
        self.frame.visible = self.play.visible = n > 1

    def _set_motion(self, name: str) -> None:
        res = self._current
        if res is None or name not in self._motions:
            return
        frames = self._motions[name] or self._posed.get((res.path, name))
        if frames is None:  # the method poses it: in the background, the slider appears when it is done
            self._motion_frames = []
            self._set_range(0)
            if (res.path, name) in self._posing:
                return
            self._posing.add((res.path, name))
            self.motion_job = threading.Thread(target=self._pose, args=(res, name), daemon=True)
            self.motion_job.start()
            return
        self._motion_frames = list(frames)
        self._set_range(len(self._motion_frames))
        self._show_frame(0)

    def _pose(self, res: Result, name: str) -> None:
        try:
            frames = self.animator(res, name)
        except AvatarError as err:
            self.info.content += f"\n\ncannot pose with {name}: {err}"
            return
        finally:
            self._posing.discard((res.path, name))
        self._posed[(res.path, name)] = frames
        if self._current is res and self.motion.value == name:
            self._set_motion(name)

    def _show_frame(self, t: int) -> None:
        with self._lock:
            if self._motion_frames:
                item = self._motion_frames[min(t, len(self._motion_frames) - 1)]
                self._add_splats(item if isinstance(item, Splats) else self._splats(item))
            elif self._clip:
                img = self._clip[min(t, len(self._clip) - 1)]
                self.clip_image.image = img
                res = self._current
                if res is not None and res.kind != "splats":
                    w = img.shape[1] / img.shape[0]
                    self.server.scene.add_image("/frame", img, w, 1.0, position=(w / 2, 0.0, 0.0))

    def _player(self) -> None:
        while not self._stop.is_set():
            time.sleep(1.0 / FPS)
            if self.play.value and self.frame.visible:
                self.frame.value = (int(self.frame.value) + 1) % (int(self.frame.max) + 1)

    # ------------------------------------------------------------------------------------------ toggles
    def _before_after(self, which: str) -> None:
        res = self._current
        if res is None:
            return
        if which == "before" and res.source is not None:
            src = self.found.by_path(res.source)
            if src is None:
                self.info.content += f"\n\nthe source `{res.source}` is not under the opened path"
                return
            self._after = res
            self.show(src, framing=False)
        elif which == "after":
            edits = self.found.edits_of(res)
            target = getattr(self, "_after", None) if getattr(self, "_after", None) in edits else (
                edits[0] if edits else None)
            if target is not None:
                self.show(target, framing=False)

    def _toggle_body(self) -> None:
        if not self.body_box.value:
            with contextlib.suppress(Exception):
                self.server.scene.remove_by_name("/body")
            return
        threading.Thread(target=self._add_body, daemon=True).start()

    def _add_body(self) -> None:
        from avatar_core.body import load_body_model

        res = self._current
        name = self.body_name or (res.settings.get("body") if res and isinstance(res.settings.get("body"), str)
                                  else None) or "anny"
        try:
            body = load_body_model(name)
            verts = body().vertices[0].detach().cpu().numpy()
        except Exception as err:  # a missing licensed model: say so in the panel, keep serving
            self.info.content += f"\n\nbody mesh unavailable: {err}"
            self.body_box.value = False
            return
        self.server.scene.add_mesh_simple("/body", verts, body.faces.cpu().numpy(), color=(200, 200, 210),
                                          opacity=0.45, side="double")

    # ------------------------------------------------------------------------------------------ metrics
    def _show_log(self, i: int) -> None:
        series = read_metrics(self.found.metrics[i])
        self.log_table.content = metrics_table(series)
        for p in self._plots:
            p.remove()
        self._plots = []
        from viser import uplot

        keys = [k for k in ("loss", "psnr", "lr") if k in series] + sorted(set(series) - {"loss", "psnr", "lr"})
        with self.training:
            for key in keys[:6]:
                x, y = series[key]
                self._plots.append(self.server.gui.add_uplot(
                    (x, y), (uplot.Series(label="step"), uplot.Series(label=key, stroke="#d9480f", width=2)),
                    title=key, aspect=2.0))

    def stop(self) -> None:
        self._stop.set()
        self.server.stop()


def serve(path: str | Path, port: int = 8080, host: str = "127.0.0.1", block: bool = True,
          triplane_field: TriplaneFieldLoader | None = None, body: str | None = None,
          animator: Animator | None = None) -> ViewerApp:
    """Discover what is under ``path``, serve it and print the URL; with ``block`` wait until Ctrl-C."""
    t0 = time.perf_counter()
    found = discover(path)
    if not found.results and not found.metrics:
        seen = f" (skipped: {'; '.join(found.skipped[:3])})" if found.skipped else ""
        raise MissingFileError(f"nothing viewable under {found.root}{seen}",
                               f"the viewer looks for: {'; '.join(LOOKED_FOR)}")
    app = ViewerApp(found, free_port(port, host), host, triplane_field=triplane_field, body=body, animator=animator)
    print(f"viewer on {app.url} ({len(found.results)} results, {len(found.metrics)} training logs from "
          f"{found.root}; ready in {time.perf_counter() - t0:.1f} s; Ctrl-C stops it)", flush=True)
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            app.stop()
    return app
