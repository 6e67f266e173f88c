"""Volume rendering of a triplane avatar with the shared decoder, on the kernel's renderer (RodinHD Sec. 3.1, App.).

The triplane spans the cube ``center +- bound`` in world space; a world point ``p`` reads the planes at
``(p - center) / bound`` in ``[-1, 1]^3`` and has zero density outside the cube. Rays are marched either
uniformly (``num_samples`` steps across the cube's diagonal) or through an occupancy grid on the same lattice
(paper 128^3), which for a generated triplane is built by 16 updates from zero (App., "Triplane fitting").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from avatar_core.cameras import Cameras
from avatar_core.errors import InputError
from avatar_core.render.occupancy import OccupancyGrid, fill_occupancy_grid, occupancy_estimator
from avatar_core.render.rays import generate_rays
from avatar_core.render.volume import VolumeRender, render_rays
from rodinhd.decoder import TriplaneDecoder
from rodinhd.triplane import as_planes

__all__ = ["TriplaneField", "build_occupancy_grid", "crop_occupancy_grid", "render_triplane_rays", "render_views",
           "scene_near_far"]


class TriplaneField:
    """One triplane plus the decoder as a radiance field over world points (the kernel's ``FieldFn``).

    Args:
        planes: ``[3, C, H, W]`` (or its roll-out ``[C, H, 3W]``).
        decoder: the shared :class:`~rodinhd.decoder.TriplaneDecoder`.
        bound: half the side of the cube the triplane covers, in world units (1.0).
        center: the cube's centre in world space ((0, 0, 0)).
    """

    def __init__(self, planes: Tensor, decoder: TriplaneDecoder, bound: float = 1.0,
                 center: Sequence[float] | Tensor = (0.0, 0.0, 0.0)):
        if bound <= 0:
            raise InputError(f"triplane bound must be positive, got {bound}", "pass the half side of the cube")
        self.planes = as_planes(planes)
        self.decoder = decoder
        self.bound = float(bound)
        self.center = torch.as_tensor(center, dtype=self.planes.dtype, device=self.planes.device).reshape(3)

    def normalise(self, points: Tensor) -> tuple[Tensor, Tensor]:  # [N, 3] -> [N, 3], [N] bool
        """Triplane coordinates of world points and whether they lie inside the cube."""
        x = (points - self.center) / self.bound
        return x, (x.abs() <= 1.0).all(-1)

    def __call__(self, points: Tensor, directions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``rgb [N, 3]``, ``sigma [N]`` at world points seen along ``directions`` (read only by a decoder with
        view-dependent colour)."""
        x, inside = self.normalise(points)
        rgb, sigma = self.decoder.query(self.planes, x, directions if self.decoder.view_dependent else None)
        return rgb, sigma * inside.to(sigma.dtype)

    def density(self, points: Tensor) -> Tensor:  # [N, 3] -> [N]
        x, inside = self.normalise(points)
        return self.decoder.density(self.decoder.features(self.planes, x)) * inside.to(x.dtype)

    @property
    def aabb(self) -> list[float]:
        c, b = self.center.tolist(), self.bound
        return [c[0] - b, c[1] - b, c[2] - b, c[0] + b, c[1] + b, c[2] + b]

    def step_size(self, num_samples: int) -> float:
        """Marching step giving ``num_samples`` steps across the cube's diagonal."""
        return 2.0 * math.sqrt(3.0) * self.bound / num_samples


def scene_near_far(origins: Tensor, center: Tensor, bound: float) -> tuple[float, float]:  # origins [N, 3]
    """Near and far planes enclosing the cube's circumscribed sphere for every ray origin."""
    dist = (origins - center).norm(dim=-1)
    radius = math.sqrt(3.0) * bound
    near = max(float(dist.min()) - radius, 1e-3)
    return near, max(float(dist.max()) + radius, near + 1e-3)


@torch.no_grad()
def build_occupancy_grid(
    field: TriplaneField,
    resolution: int = 128,
    num_samples: int = 128,
    num_updates: int = 16,
    dilate: int = 1,
    occ_thre: float = 0.01,
    backend: str = "auto",
) -> nn.Module:
    """Occupancy grid of a fixed triplane: ``num_updates`` updates from zero (paper: 128^3, 16 updates), then
    grown by ``dilate`` cells so thin structures the random probes missed are still marched."""
    grid = occupancy_estimator(field.aabb, resolution=resolution, device=field.planes.device, backend=backend)
    step = field.step_size(num_samples)
    fill_occupancy_grid(grid, lambda x: field.density(x) * step, num_updates=num_updates, occ_thre=occ_thre,
                        dilate=dilate)
    return grid


@torch.no_grad()
def crop_occupancy_grid(grid: nn.Module) -> nn.Module:
    """The same single-level CPU grid cut down to the bounding box of its occupied cells.

    The CPU marcher walks every lattice step inside the grid's box, occupied or not; cropping makes rays that
    miss the avatar's box cost nothing and shortens the others, without changing which samples are kept (the
    lattice is anchored at the near plane, not the box). nerfacc's CUDA grid and multi-level grids are returned
    as they are.
    """
    if not isinstance(grid, OccupancyGrid) or grid.levels != 1:
        return grid
    occupied = torch.nonzero(grid.binaries[0])
    if occupied.shape[0] == 0:
        return grid
    lo_idx, hi_idx = occupied.min(0).values, occupied.max(0).values + 1
    res = grid.resolution.to(grid.aabbs.dtype)
    lo, hi = grid.aabbs[0, :3], grid.aabbs[0, 3:]
    cell = (hi - lo) / res
    aabb = torch.cat([lo + lo_idx * cell, lo + hi_idx * cell])
    cropped = OccupancyGrid(aabb.cpu(), (hi_idx - lo_idx).tolist()).to(grid.device)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo_idx, hi_idx))
    cropped.binaries = grid.binaries[(slice(None),) + sl].clone()
    cropped.occs = grid.occs.view(grid.binaries.shape)[(slice(None),) + sl].reshape(-1).clone()
    return cropped


def render_triplane_rays(
    field: TriplaneField,
    rays_o: Tensor,  # [N, 3]
    rays_d: Tensor,  # [N, 3] unit
    num_samples: int = 128,
    estimator: nn.Module | None = None,
    background: Tensor | None = None,  # [3] or [N, 3]
    stratified: bool = False,
    generator: torch.Generator | None = None,
    early_stop_eps: float = 1e-4,
) -> VolumeRender:
    """Differentiable render of rays through a triplane field; with ``estimator``, empty space is skipped and,
    when ``early_stop_eps > 0``, samples behind opaque surfaces are dropped by an extra density-only pass."""
    near, far = scene_near_far(rays_o, field.center, field.bound)
    kwargs = {}
    if estimator is not None:
        kwargs = dict(estimator=estimator, render_step_size=field.step_size(num_samples),
                      density_fn=field.density)
    else:
        # Uniform bins spanning [near, far] with the same step as the marcher's lattice.
        num_samples = max(1, math.ceil((far - near) / field.step_size(num_samples)))
    return render_rays(field, rays_o, rays_d, near, far, num_samples=num_samples, stratified=stratified,
                       background=background, generator=generator, early_stop_eps=early_stop_eps, **kwargs)


def render_views(
    triplane: Tensor,  # [3, C, H, W] or [C, H, 3W]
    decoder: TriplaneDecoder,
    cameras: Cameras,
    bound: float = 1.0,
    center: Sequence[float] | Tensor = (0.0, 0.0, 0.0),
    num_samples: int = 128,
    occupancy: bool | nn.Module = True,
    grid_resolution: int = 128,
    grid_updates: int = 16,
    background: Sequence[float] | Tensor | None = None,
    chunk: int = 1 << 15,
    grad: bool = False,
    early_stop_eps: float = 1e-4,
) -> tuple[Tensor, Tensor]:  # rgb [V, H, W, 3], alpha [V, H, W, 1]
    """Render full images of one triplane avatar: RGB (composited over ``background``) and alpha.

    Args:
        triplane, decoder, cameras: what to render, by what, from where.
        bound, center: the world cube the triplane covers (1.0, origin).
        num_samples: marching steps across the cube's diagonal (128).
        occupancy: True builds a ``grid_resolution``^3 grid with ``grid_updates`` updates from zero (paper 128^3,
            16); a prebuilt grid (:func:`build_occupancy_grid`) is reused, the fast path for many views;
            False marches uniformly.
        background: RGB behind the avatar; None is black, i.e. premultiplied colour.
        chunk: rays per pass, which bounds memory (the sample count is at most ``chunk * num_samples``).
        grad: keep the autograd graph (for image-level losses); off by default.
        early_stop_eps: with a grid, drop samples whose transmittance is below this (1e-4, nerfacc); 0 skips
            the extra density pass, which is faster when rays hold few samples (tiny scale on a CPU).
    """
    field = TriplaneField(triplane, decoder, bound, center)
    device, dtype = field.planes.device, field.planes.dtype
    cameras = cameras.to(device)
    bg = None if background is None else torch.as_tensor(background, dtype=dtype, device=device).reshape(3)
    with torch.set_grad_enabled(grad):
        if occupancy is True:
            estimator = build_occupancy_grid(field, grid_resolution, num_samples, grid_updates)
        elif occupancy is False or occupancy is None:
            estimator = None
        else:
            estimator = occupancy
        if estimator is not None:
            estimator = crop_occupancy_grid(estimator)
        rgbs, alphas = [], []
        for v in range(len(cameras)):
            origins, dirs = generate_rays(cameras[v])
            origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
            rgb, alpha = [], []
            for i in range(0, origins.shape[0], chunk):
                out = render_triplane_rays(field, origins[i:i + chunk], dirs[i:i + chunk], num_samples,
                                           estimator, bg, early_stop_eps=early_stop_eps)
                rgb.append(out.rgb)
                alpha.append(out.opacity)
            rgbs.append(torch.cat(rgb).reshape(cameras.height, cameras.width, 3))
            alphas.append(torch.cat(alpha).reshape(cameras.height, cameras.width, 1))
    return torch.stack(rgbs), torch.stack(alphas)
