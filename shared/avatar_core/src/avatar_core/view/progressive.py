"""A radiance field rendered by the kernel's volume renderer at the browser's camera, progressively: a coarse frame
within a fraction of a second, then finer ones, each abandoned as soon as the camera moves again."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from avatar_core.cameras import Cameras, look_at
from avatar_core.render.volume import render_cameras

__all__ = ["ProgressiveRenderer", "VOLUME_WIDTHS"]

#: Image widths of the successive passes (pixels); the height follows the browser's aspect ratio.
VOLUME_WIDTHS = (64, 160, 320)


class ProgressiveRenderer:
    """Render ``field`` (points, directions -> rgb, sigma) inside ``aabb`` for camera poses as they come.

    :meth:`request` returns at once; a worker thread renders the latest pose at each width of ``widths`` in turn
    and hands every finished frame (uint8 RGB, white background) to ``show``, dropping a pass when a newer pose
    arrives. ``num_samples`` uniform samples per ray between the box's near and far faces."""

    def __init__(self, field: Callable, aabb: Sequence[float], show: Callable[[np.ndarray, int], None],
                 widths: Sequence[int] = VOLUME_WIDTHS, num_samples: int = 64):
        self.field, self.show, self.widths, self.num_samples = field, show, tuple(widths), num_samples
        lo, hi = np.asarray(aabb[:3], np.float64), np.asarray(aabb[3:], np.float64)
        self.centre, self.radius = (lo + hi) / 2, float(np.linalg.norm(hi - lo) / 2)
        self._pose: tuple | None = None
        self._version = 0
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def request(self, position: Sequence[float], target: Sequence[float], up: Sequence[float], fov_y: float,
                aspect: float) -> None:
        """A new camera (``fov_y`` in radians, ``aspect`` = width / height): render it from the coarsest pass."""
        with self._wake:
            self._pose = (tuple(map(float, position)), tuple(map(float, target)), tuple(map(float, up)),
                          float(fov_y), float(aspect))
            self._version += 1
            self._wake.notify()

    def render(self, pose: tuple, width: int) -> np.ndarray:
        """One frame of ``pose`` at ``width`` pixels: uint8 RGB [H, W, 3] on white."""
        position, target, up, fov_y, aspect = pose
        height = max(1, round(width / aspect))
        eye = torch.tensor(position, dtype=torch.float32)
        cams = Cameras.from_fov(look_at(eye[None], torch.tensor([target]), torch.tensor(up)),
                                math.degrees(fov_y), width, height)
        dist = float(np.linalg.norm(np.asarray(position) - self.centre))
        near, far = max(1e-3, dist - self.radius), dist + self.radius
        with torch.no_grad():
            rgb, _, _ = render_cameras(self.field, cams, near, far, num_samples=self.num_samples,
                                       background=torch.ones(3))
        return (rgb[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()

    def _run(self) -> None:
        done = 0
        while True:
            with self._wake:
                while not self._stopped and self._version == done:
                    self._wake.wait()
                if self._stopped:
                    return
                version, pose = self._version, self._pose
            for width in self.widths:
                frame = self.render(pose, width)
                if self._version != version:  # the camera moved: start again from the coarse pass
                    break
                self.show(frame, width)
            done = version

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
