"""Pinhole camera batches: world-to-camera matrices, intrinsics, orbits and random views.

The convention is written once, here and in :mod:`avatar_core.conventions`:

* ``viewmats`` map **world to camera** in the **OpenCV** frame (camera +X right, +Y down, +Z forward), so a
  point is in front of a camera when its camera-space ``z > 0``.
* ``Ks`` are pixel-space intrinsics; pixel ``(row i, column j)`` has its centre at ``(j + 0.5, i + 0.5)``.
* OpenGL/Blender camera-to-world matrices (+Y up, looking down -Z) convert by a right multiplication with
  :data:`~avatar_core.conventions.OPENGL_TO_OPENCV` (its own inverse).
* Spherical placement around a target: **azimuth 0 is in front of the body, on +Z**; azimuth grows by a
  right-handed rotation about +Y (azimuth 90 is on +X, the body's left side); elevation is positive above
  the target. A camera at ``(azimuth, elevation, radius)`` sits at
  ``target + radius * (cos(el) sin(az), sin(el), cos(el) cos(az))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from avatar_core.conventions import BODY_FORWARD, OPENGL_TO_OPENCV, WORLD_UP
from avatar_core.errors import InputError

__all__ = [
    "Cameras",
    "look_at",
    "intrinsics_from_fov",
    "spherical_to_position",
    "spherical_coordinates",
    "orbit_cameras",
    "random_cameras",
]


def _as_tensor(x, device=None, dtype: torch.dtype | None = None) -> Tensor:
    """Float tensor from a tensor or sequence; keeps a tensor's floating dtype unless one is given."""
    if isinstance(x, Tensor):
        if dtype is None:
            dtype = x.dtype if x.is_floating_point() else torch.float32
        return x.to(device=device if device is not None else x.device, dtype=dtype)
    return torch.as_tensor(x, dtype=dtype or torch.float32, device=device)


def intrinsics_from_fov(
    fov_y_deg: float | Tensor,  # scalar or [C]
    width: int,
    height: int,
    fov_x_deg: float | Tensor | None = None,  # scalar or [C]; square pixels from fov_y when None
) -> Tensor:  # [C, 3, 3] (C = 1 for scalars)
    """Pinhole intrinsics with the principal point at the image centre ``(W / 2, H / 2)``."""
    fov_y = _as_tensor(fov_y_deg).reshape(-1)
    if not torch.all((fov_y > 0) & (fov_y < 180)):
        raise InputError(f"field of view must be in (0, 180) degrees, got {fov_y.tolist()}",
                         "pass the vertical field of view in degrees, e.g. 40")
    fy = 0.5 * height / torch.tan(torch.deg2rad(fov_y) / 2)
    if fov_x_deg is None:
        fx = fy
    else:
        fov_x = _as_tensor(fov_x_deg, device=fov_y.device).reshape(-1)
        fx = 0.5 * width / torch.tan(torch.deg2rad(fov_x) / 2)
    fx, fy = torch.broadcast_tensors(fx, fy)
    Ks = torch.zeros(fx.shape[0], 3, 3, dtype=fx.dtype, device=fx.device)
    Ks[:, 0, 0] = fx
    Ks[:, 1, 1] = fy
    Ks[:, 0, 2] = width / 2
    Ks[:, 1, 2] = height / 2
    Ks[:, 2, 2] = 1
    return Ks


def look_at(
    eye: Tensor,  # [C, 3] or [3]
    target: Tensor | Sequence[float] = (0.0, 0.0, 0.0),  # [C, 3] or [3]
    up: Tensor | Sequence[float] = WORLD_UP,  # [C, 3] or [3]
) -> Tensor:  # [C, 4, 4] world-to-camera, OpenCV
    """World-to-camera matrices of cameras at ``eye`` looking at ``target`` with ``up`` towards the image top.

    When the view direction is parallel to ``up`` (a camera straight above or below), the image top is taken
    towards -Z looking down and +Z looking up, i.e. the limit of an orbit that starts in front of the body.
    """
    eye = _as_tensor(eye)
    eye = eye.reshape(-1, 3)
    target = _as_tensor(target, device=eye.device, dtype=eye.dtype).reshape(-1, 3)
    up = _as_tensor(up, device=eye.device, dtype=eye.dtype).reshape(-1, 3)
    eye, target, up = torch.broadcast_tensors(eye, target, up)
    forward = target - eye
    dist = forward.norm(dim=-1, keepdim=True)
    if torch.any(dist < 1e-9):
        raise InputError("look_at: the camera position equals the target",
                         "place the camera at a positive distance from the point it looks at")
    forward = forward / dist
    up = up / up.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    right = torch.cross(forward, up, dim=-1)
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    if torch.any(degenerate):
        # Up parallel to the view direction: continue the frontal orbit over the pole.
        fwd_body = torch.tensor(BODY_FORWARD, dtype=eye.dtype, device=eye.device).expand_as(up)
        sign = torch.sign((forward * up).sum(-1, keepdim=True))
        alt_right = torch.cross(forward, sign * fwd_body, dim=-1)
        right = torch.where(degenerate, alt_right, right)
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.cross(forward, right, dim=-1)
    R_c2w = torch.stack([right, down, forward], dim=-1)  # columns are the camera axes in world space
    viewmats = torch.zeros(eye.shape[0], 4, 4, dtype=eye.dtype, device=eye.device)
    R_w2c = R_c2w.transpose(-1, -2)
    viewmats[:, :3, :3] = R_w2c
    viewmats[:, :3, 3] = -(R_w2c @ eye[..., None])[..., 0]
    viewmats[:, 3, 3] = 1
    return viewmats


def spherical_to_position(
    azimuth_deg: Tensor | float,  # [C] or scalar
    elevation_deg: Tensor | float,  # [C] or scalar
    radius: Tensor | float,  # [C] or scalar
    target: Tensor | Sequence[float] = (0.0, 0.0, 0.0),  # [3] or [C, 3]
) -> Tensor:  # [C, 3]
    """Camera centres at (azimuth, elevation, radius) around ``target``; azimuth 0 on +Z (module docstring)."""
    az, el, r = torch.broadcast_tensors(
        _as_tensor(azimuth_deg).reshape(-1), _as_tensor(elevation_deg).reshape(-1), _as_tensor(radius).reshape(-1)
    )
    az, el = torch.deg2rad(az), torch.deg2rad(el)
    offset = torch.stack([torch.cos(el) * torch.sin(az), torch.sin(el), torch.cos(el) * torch.cos(az)], dim=-1)
    return _as_tensor(target, device=offset.device).reshape(-1, 3) + r[:, None] * offset


@dataclass
class Cameras:
    """A batch of ``C`` pinhole cameras sharing one image size (OpenCV convention, module docstring)."""

    viewmats: Tensor  # [C, 4, 4] world-to-camera
    Ks: Tensor  # [C, 3, 3]
    width: int
    height: int

    def __post_init__(self):
        if self.viewmats.ndim == 2:
            self.viewmats = self.viewmats[None]
        if self.Ks.ndim == 2:
            self.Ks = self.Ks[None]
        if self.viewmats.shape[-2:] != (4, 4) or self.Ks.shape[-2:] != (3, 3):
            raise InputError(
                f"Cameras expects viewmats [C,4,4] and Ks [C,3,3], got {tuple(self.viewmats.shape)} and "
                f"{tuple(self.Ks.shape)}", "pass world-to-camera 4x4 matrices and 3x3 pixel intrinsics")
        if self.Ks.shape[0] == 1 and self.viewmats.shape[0] > 1:
            self.Ks = self.Ks.expand(self.viewmats.shape[0], 3, 3)
        if self.Ks.shape[0] != self.viewmats.shape[0]:
            raise InputError(f"{self.viewmats.shape[0]} viewmats but {self.Ks.shape[0]} intrinsics",
                             "give one K per camera, or a single K shared by all")
        self.width, self.height = int(self.width), int(self.height)
        if self.width <= 0 or self.height <= 0:
            raise InputError(f"image size must be positive, got {self.width}x{self.height}",
                             "pass width and height in pixels")
        self.Ks = self.Ks.to(device=self.viewmats.device, dtype=self.viewmats.dtype)

    # -- batch behaviour -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.viewmats.shape[0]

    def __getitem__(self, index) -> Cameras:
        """Sub-batch; an integer index keeps the batch dimension (a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Cameras(self.viewmats[index], self.Ks[index], self.width, self.height)

    def to(self, device=None, dtype: torch.dtype | None = None) -> Cameras:
        return Cameras(self.viewmats.to(device=device, dtype=dtype), self.Ks.to(device=device, dtype=dtype),
                       self.width, self.height)

    @property
    def device(self) -> torch.device:
        return self.viewmats.device

    @staticmethod
    def cat(cameras: Sequence[Cameras]) -> Cameras:
        sizes = {(c.width, c.height) for c in cameras}
        if len(sizes) != 1:
            raise InputError(f"cannot concatenate cameras of different image sizes {sorted(sizes)}",
                             "resize them first with Cameras.resized")
        return Cameras(torch.cat([c.viewmats for c in cameras]), torch.cat([c.Ks for c in cameras]),
                       cameras[0].width, cameras[0].height)

    # -- derived quantities ----------------------------------------------------------------------
    @property
    def c2w(self) -> Tensor:  # [C, 4, 4] camera-to-world, OpenCV axes
        R = self.viewmats[:, :3, :3]
        t = self.viewmats[:, :3, 3:]
        out = torch.zeros_like(self.viewmats)
        out[:, :3, :3] = R.transpose(-1, -2)
        out[:, :3, 3:] = -R.transpose(-1, -2) @ t
        out[:, 3, 3] = 1
        return out

    @property
    def centers(self) -> Tensor:  # [C, 3] camera centres in world space
        return self.c2w[:, :3, 3]

    @property
    def forward(self) -> Tensor:  # [C, 3] viewing directions (camera +Z) in world space
        return self.viewmats[:, 2, :3]

    @property
    def fov_x(self) -> Tensor:  # [C] radians
        return 2 * torch.atan(self.width / (2 * self.Ks[:, 0, 0]))

    @property
    def fov_y(self) -> Tensor:  # [C] radians
        return 2 * torch.atan(self.height / (2 * self.Ks[:, 1, 1]))

    def fov_deg(self) -> tuple[Tensor, Tensor]:
        """(horizontal, vertical) field of view in degrees, each ``[C]``."""
        return torch.rad2deg(self.fov_x), torch.rad2deg(self.fov_y)

    def project(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Pixel coordinates ``[C, N, 2]`` (continuous, centre of pixel (i, j) at (j + .5, i + .5)) and
        camera-space depth ``[C, N]`` of world points ``[N, 3]`` or ``[C, N, 3]``."""
        if points.ndim == 2:
            points = points[None].expand(len(self), -1, -1)
        cam = points @ self.viewmats[:, :3, :3].transpose(-1, -2) + self.viewmats[:, None, :3, 3]
        depth = cam[..., 2]
        uvw = cam @ self.Ks.transpose(-1, -2)
        return uvw[..., :2] / uvw[..., 2:3], depth

    def resized(self, width: int, height: int) -> Cameras:
        """Same views at another image size (intrinsics scaled per axis)."""
        Ks = self.Ks.clone()
        Ks[:, 0] *= width / self.width
        Ks[:, 1] *= height / self.height
        Ks[:, 2] = self.Ks[:, 2]
        return Cameras(self.viewmats, Ks, width, height)

    # -- constructors and conversions ------------------------------------------------------------
    @classmethod
    def from_fov(cls, viewmats: Tensor, fov_y_deg: float | Tensor, width: int, height: int) -> Cameras:
        """Cameras from world-to-camera matrices ``[C, 4, 4]`` and a vertical field of view in degrees."""
        viewmats = viewmats if viewmats.ndim == 3 else viewmats[None]
        Ks = intrinsics_from_fov(fov_y_deg, width, height).to(viewmats)
        return cls(viewmats, Ks.expand(viewmats.shape[0], 3, 3) if Ks.shape[0] == 1 else Ks, width, height)

    @classmethod
    def from_c2w(cls, c2w: Tensor, Ks: Tensor, width: int, height: int) -> Cameras:
        """From OpenCV camera-to-world matrices ``[C, 4, 4]`` (or ``[C, 3, 4]``)."""
        c2w = c2w if c2w.ndim == 3 else c2w[None]
        R = c2w[:, :3, :3]
        t = c2w[:, :3, 3:]
        viewmats = torch.zeros(c2w.shape[0], 4, 4, dtype=c2w.dtype, device=c2w.device)
        viewmats[:, :3, :3] = R.transpose(-1, -2)
        viewmats[:, :3, 3:] = -R.transpose(-1, -2) @ t
        viewmats[:, 3, 3] = 1
        return cls(viewmats, Ks, width, height)

    @classmethod
    def from_opengl_c2w(cls, c2w_gl: Tensor, Ks: Tensor, width: int, height: int) -> Cameras:
        """From OpenGL/Blender camera-to-world matrices ``[C, 4, 4]`` (+Y up, looking down -Z)."""
        c2w_gl = c2w_gl if c2w_gl.ndim == 3 else c2w_gl[None]
        if c2w_gl.shape[-2] == 3:
            bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=c2w_gl.dtype, device=c2w_gl.device)
            c2w_gl = torch.cat([c2w_gl, bottom.expand(c2w_gl.shape[0], 1, 4)], dim=1)
        return cls.from_c2w(c2w_gl @ OPENGL_TO_OPENCV.to(c2w_gl), Ks, width, height)

    def to_opengl(self) -> Tensor:  # [C, 4, 4] OpenGL camera-to-world
        """OpenGL/Blender camera-to-world matrices of these cameras."""
        return self.c2w @ OPENGL_TO_OPENCV.to(self.viewmats)

    @classmethod
    def look_at(
        cls,
        eye: Tensor,  # [C, 3]
        target: Tensor | Sequence[float] = (0.0, 0.0, 0.0),
        fov_y_deg: float | Tensor = 40.0,
        width: int = 512,
        height: int = 512,
        up: Tensor | Sequence[float] = WORLD_UP,
    ) -> Cameras:
        return cls.from_fov(look_at(eye, target, up), fov_y_deg, width, height)


def spherical_coordinates(
    cameras: Cameras, target: Tensor | Sequence[float] = (0.0, 0.0, 0.0)
) -> tuple[Tensor, Tensor, Tensor]:
    """(azimuth_deg, elevation_deg, radius), each ``[C]``, of the camera centres around ``target``.

    The inverse of :func:`spherical_to_position`; used for view-dependent prompts (front / side / back).
    """
    offset = cameras.centers - _as_tensor(target, device=cameras.device, dtype=cameras.viewmats.dtype)
    radius = offset.norm(dim=-1)
    elevation = torch.rad2deg(torch.asin((offset[:, 1] / radius.clamp_min(1e-12)).clamp(-1, 1)))
    azimuth = torch.rad2deg(torch.atan2(offset[:, 0], offset[:, 2]))
    return azimuth, elevation, radius


def orbit_cameras(
    num: int,
    radius: float = 2.5,
    elevation_deg: float = 0.0,
    fov_deg: float = 40.0,
    width: int = 512,
    height: int = 512,
    target: Sequence[float] | Tensor = (0.0, 0.0, 0.0),
    start_azimuth: float = 0.0,
    device: torch.device | str | None = None,
) -> Cameras:
    """``num`` cameras evenly spaced on a full circle (no repeated end frame), for turntables.

    Frame 0 sits at ``start_azimuth`` (0 = in front of the body, on +Z); azimuth increases about +Y.
    """
    if num < 1:
        raise InputError(f"orbit_cameras needs at least one camera, got num={num}", "pass num >= 1")
    if radius <= 0:
        raise InputError(f"orbit radius must be positive, got {radius}", "pass the camera distance in metres")
    azimuth = start_azimuth + 360.0 * torch.arange(num, dtype=torch.float64) / num
    eye = spherical_to_position(azimuth, elevation_deg, radius, _as_tensor(target, dtype=torch.float64))
    cams = Cameras.look_at(eye.float(), _as_tensor(target), fov_deg, width, height)
    return cams.to(device) if device is not None else cams


def random_cameras(
    num: int,
    width: int = 512,
    height: int = 512,
    radius_range: tuple[float, float] = (1.5, 2.5),
    elevation_range_deg: tuple[float, float] = (-10.0, 45.0),
    azimuth_range_deg: tuple[float, float] = (-180.0, 180.0),
    fov_range_deg: tuple[float, float] = (40.0, 70.0),
    target: Sequence[float] | Tensor = (0.0, 0.0, 0.0),
    target_jitter: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Cameras:
    """Random views for score distillation: azimuth, elevation, radius and fov drawn uniformly from ranges.

    Elevation is drawn uniformly in degrees (as DreamFusion-style pipelines do); ``target_jitter`` adds a
    Gaussian offset (metres, per axis) to the look-at point. Use :func:`spherical_coordinates` to read the
    drawn angles back, e.g. for view-dependent prompts.
    """
    if num < 1:
        raise InputError(f"random_cameras needs at least one camera, got num={num}", "pass num >= 1")
    for name, (lo, hi) in [("radius_range", radius_range), ("elevation_range_deg", elevation_range_deg),
                           ("azimuth_range_deg", azimuth_range_deg), ("fov_range_deg", fov_range_deg)]:
        if hi < lo:
            raise InputError(f"{name} = ({lo}, {hi}) has its upper bound below its lower bound",
                             f"pass {name} as (low, high)")
    if radius_range[0] <= 0:
        raise InputError(f"radius_range must be positive, got {radius_range}", "pass distances in metres > 0")

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(num, generator=generator, dtype=torch.float64)

    azimuth = uniform(*azimuth_range_deg)
    elevation = uniform(*elevation_range_deg)
    radius = uniform(*radius_range)
    fov = uniform(*fov_range_deg)
    center = _as_tensor(target, dtype=torch.float64).reshape(1, 3).expand(num, 3)
    if target_jitter > 0:
        center = center + target_jitter * torch.randn(num, 3, generator=generator, dtype=torch.float64)
    eye = spherical_to_position(azimuth, elevation, radius, center)
    cams = Cameras.from_fov(look_at(eye, center).float(), fov.float(), width, height)
    return cams.to(device) if device is not None else cams
