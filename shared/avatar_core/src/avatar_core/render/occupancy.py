"""Empty-space skipping with an occupancy grid (Instant-NGP style), on any device.

:class:`OccupancyGrid` keeps the state of ``nerfacc.OccGridEstimator`` under the same buffer names (``occs``,
``binaries``, ``aabbs``, ``resolution``) and updates it by the same rule: every ``n`` steps, evaluate
``density * step_size`` at one random point in each chosen cell, ``occs = max(occs * decay, occ)``, then
``binaries = occs > min(mean(occs >= 0), occ_thre)``; during warm-up all cells are chosen, afterwards a quarter
of the cells uniformly plus up to as many occupied ones. Cells marked ``-1`` (unseen by any camera) are never
updated. Its marcher is vectorised PyTorch: samples lie on the lattice ``t_k = near + k * step`` (growing as
``max(step, t * cone_angle)`` with a cone angle), one is kept when its midpoint lies in the grid and in an
occupied cell, and the result is ``(ray_indices, t_starts, t_ends)`` grouped by ray, the contract of
``OccGridEstimator.sampling``. nerfacc's own marcher (``traverse_grids``) needs its CUDA extension;
:func:`occupancy_estimator` hands out nerfacc's estimator on CUDA and this grid elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from avatar_core.errors import InputError
from avatar_core.render.compositing import render_visibility

__all__ = ["OccupancyGrid", "occupancy_estimator", "fill_occupancy_grid"]

#: Upper bound on lattice points examined at once by the CPU marcher (memory, not correctness).
_MARCH_CHUNK = 1 << 20


class OccupancyGrid(nn.Module):
    """Multi-level binary occupancy grid with nerfacc's update rule and a PyTorch ray marcher.

    Level ``i`` covers ``roi_aabb`` enlarged ``2**i`` times about its centre, at the same ``resolution``.
    """

    DIM = 3

    def __init__(
        self,
        roi_aabb: Sequence[float] | Tensor,  # [6] xmin ymin zmin xmax ymax zmax
        resolution: int | Sequence[int] = 128,
        levels: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(resolution, int):
            resolution = [resolution] * 3
        resolution = torch.as_tensor(resolution, dtype=torch.int32).reshape(-1)
        roi_aabb = torch.as_tensor(roi_aabb, dtype=torch.float32).reshape(-1)
        if resolution.shape[0] != 3 or bool((resolution <= 0).any()):
            raise InputError(f"grid resolution must be 3 positive ints, got {resolution.tolist()}",
                             "pass an int or [rx, ry, rz]")
        if roi_aabb.shape[0] != 6 or bool((roi_aabb[3:] <= roi_aabb[:3]).any()):
            raise InputError(f"roi_aabb must be [xmin, ymin, zmin, xmax, ymax, zmax], got {roi_aabb.tolist()}",
                             "give a box with max > min on every axis")
        if levels < 1:
            raise InputError(f"levels must be >= 1, got {levels}", "use levels=1 for a bounded scene")
        center, half = (roi_aabb[:3] + roi_aabb[3:]) / 2, (roi_aabb[3:] - roi_aabb[:3]) / 2
        aabbs = torch.stack([torch.cat([center - half * 2**i, center + half * 2**i]) for i in range(levels)])
        self.levels = levels
        self.cells_per_lvl = int(resolution.prod())
        self.register_buffer("resolution", resolution)
        self.register_buffer("aabbs", aabbs)
        self.register_buffer("occs", torch.zeros(levels * self.cells_per_lvl))
        self.register_buffer("binaries", torch.zeros([levels] + resolution.tolist(), dtype=torch.bool))
        res = resolution.tolist()
        coords = torch.stack(torch.meshgrid(*[torch.arange(r) for r in res], indexing="ij"), dim=-1)
        self.register_buffer("grid_coords", coords.reshape(-1, 3), persistent=False)
        self.register_buffer("grid_indices", torch.arange(self.cells_per_lvl), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.occs.device

    # -- update rule (nerfacc.OccGridEstimator._update) --------------------------------------------
    @torch.no_grad()
    def _all_cells(self) -> list[Tensor]:
        """Per level, the cells not marked invisible (occs >= 0)."""
        return [self.grid_indices[self.occs[lvl * self.cells_per_lvl + self.grid_indices] >= 0]
                for lvl in range(self.levels)]

    @torch.no_grad()
    def _uniform_and_occupied_cells(self, n: int, generator: torch.Generator | None) -> list[Tensor]:
        """Per level, ``n`` uniformly drawn visible cells plus up to ``n`` occupied ones (drawn with repetition)."""
        out = []
        for lvl in range(self.levels):
            uniform = torch.randint(self.cells_per_lvl, (n,), device=self.device, generator=generator)
            uniform = uniform[self.occs[lvl * self.cells_per_lvl + uniform] >= 0]
            occupied = torch.nonzero(self.binaries[lvl].flatten())[:, 0]
            if n < occupied.shape[0]:
                occupied = occupied[torch.randint(occupied.shape[0], (n,), device=self.device, generator=generator)]
            out.append(torch.cat([uniform, occupied]))
        return out

    @torch.no_grad()
    def _update(
        self,
        step: int,
        occ_eval_fn: Callable[[Tensor], Tensor],
        occ_thre: float = 0.01,
        ema_decay: float = 0.95,
        warmup_steps: int = 256,
        generator: torch.Generator | None = None,
    ) -> None:
        """One EMA update of the occupancy values and the binary grid.

        With ``generator=None`` the random draws come from the global generator in the same order and shapes
        as nerfacc's, so a seeded run reproduces ``OccGridEstimator``'s state exactly.
        """
        if step < warmup_steps:
            lvl_indices = self._all_cells()
        else:
            lvl_indices = self._uniform_and_occupied_cells(self.cells_per_lvl // 4, generator)
        res = self.resolution.to(torch.float32)
        for lvl, indices in enumerate(lvl_indices):
            coords = self.grid_coords[indices]
            jitter = torch.rand(coords.shape, dtype=torch.float32, device=self.device, generator=generator)
            x = (coords + jitter) / res
            x = self.aabbs[lvl, :3] + x * (self.aabbs[lvl, 3:] - self.aabbs[lvl, :3])
            occ = occ_eval_fn(x).reshape(-1)
            cell_ids = lvl * self.cells_per_lvl + indices
            self.occs[cell_ids] = torch.maximum(self.occs[cell_ids] * ema_decay, occ.to(self.occs.dtype))
        thre = torch.clamp(self.occs[self.occs >= 0].mean(), max=occ_thre)
        self.binaries = (self.occs > thre).view(self.binaries.shape)

    @torch.no_grad()
    def update_every_n_steps(
        self,
        step: int,
        occ_eval_fn: Callable[[Tensor], Tensor],
        occ_thre: float = 1e-2,
        ema_decay: float = 0.95,
        warmup_steps: int = 256,
        n: int = 16,
        generator: torch.Generator | None = None,
    ) -> None:
        """Update when ``step % n == 0``; training mode only, as nerfacc (use :func:`fill_occupancy_grid` at test time).

        ``occ_eval_fn(x [N, 3]) -> [N] or [N, 1]`` returns ``density * render_step_size``.
        """
        if not self.training:
            raise RuntimeError("OccupancyGrid.update_every_n_steps runs in training mode only; "
                               "call .train() first, or fill_occupancy_grid() to build a grid for inference")
        if step % n == 0:
            self._update(step, occ_eval_fn, occ_thre, ema_decay, warmup_steps, generator)

    @torch.no_grad()
    def mark_invisible_cells(self, K: Tensor, c2w: Tensor, width: int, height: int, near_plane: float = 0.0) -> None:
        """Set ``occs = -1`` for cells that no camera sees (K ``[N|1, 3, 3]``, OpenCV c2w ``[N, 3|4, 4]``)."""
        R = c2w[:, :3, :3].transpose(1, 2)
        T = -R @ c2w[:, :3, 3:]
        for lvl, indices in enumerate(self._all_cells()):
            x = self.grid_coords[indices] / (self.resolution - 1)
            pts = (self.aabbs[lvl, :3] + x * (self.aabbs[lvl, 3:] - self.aabbs[lvl, :3])).T  # [3, n]
            uvd = K @ (R @ pts + T)  # [N, 3, n]
            uv = uvd[:, :2] / uvd[:, 2:]
            in_image = (uvd[:, 2] >= 0) & (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
            seen = ((uvd[:, 2] >= near_plane) & in_image).any(0)
            too_near = ((uvd[:, 2] < near_plane) & in_image).any(0)
            self.occs[lvl * self.cells_per_lvl + indices] = torch.where(seen & ~too_near, 0.0, -1.0)

    # -- ray marching --------------------------------------------------------------------------------
    @torch.no_grad()
    def sampling(
        self,
        rays_o: Tensor,  # [n_rays, 3]
        rays_d: Tensor,  # [n_rays, 3] unit
        sigma_fn: Callable | None = None,
        alpha_fn: Callable | None = None,
        near_plane: float = 0.0,
        far_plane: float = 1e10,
        t_min: Tensor | None = None,  # [n_rays]
        t_max: Tensor | None = None,  # [n_rays]
        render_step_size: float = 1e-3,
        early_stop_eps: float = 1e-4,
        alpha_thre: float = 0.0,
        stratified: bool = False,
        cone_angle: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Samples in occupied space: ``ray_indices`` (long), ``t_starts``, ``t_ends``, each ``[S]``, grouped by ray.

        Same arguments and meaning as ``nerfacc.OccGridEstimator.sampling``; ``sigma_fn(t_starts, t_ends,
        ray_indices) -> [S]`` (or ``alpha_fn``) additionally drops samples behind opaque space and, with
        ``alpha_thre``, nearly transparent ones. Not differentiable.
        """
        if render_step_size <= 0:
            raise InputError(f"render_step_size must be positive, got {render_step_size}",
                             "use (far - near) / samples_per_ray")
        n_rays = rays_o.shape[0]
        near = torch.full((n_rays,), float(near_plane), device=rays_o.device)
        far = torch.full((n_rays,), float(far_plane), device=rays_o.device)
        if t_min is not None:
            near = torch.clamp(near, min=t_min)
        if t_max is not None:
            far = torch.clamp(far, max=t_max)
        if stratified:
            near = near + torch.rand(n_rays, generator=generator, device=rays_o.device) * render_step_size
        ray_indices, t_starts, t_ends = self._march(rays_o.float(), rays_d.float(), near, far,
                                                    float(render_step_size), float(cone_angle))
        if (alpha_thre > 0 or early_stop_eps > 0) and (sigma_fn is not None or alpha_fn is not None):
            alpha_thre = min(alpha_thre, self.occs.mean().item())
            if sigma_fn is not None:
                sigmas = sigma_fn(t_starts, t_ends, ray_indices) if t_starts.numel() else t_starts.new_zeros(0)
                keep = render_visibility(t_starts, t_ends, sigmas.reshape(-1), ray_indices, n_rays,
                                         early_stop_eps, alpha_thre)
            else:
                alphas = alpha_fn(t_starts, t_ends, ray_indices) if t_starts.numel() else t_starts.new_zeros(0)
                # -log(1 - alpha) over a unit interval is the density giving that alpha.
                sig = -torch.log1p(-alphas.reshape(-1).clamp(max=1 - 1e-7))
                keep = render_visibility(torch.zeros_like(sig), torch.ones_like(sig), sig, ray_indices, n_rays,
                                         early_stop_eps, alpha_thre)
            ray_indices, t_starts, t_ends = ray_indices[keep], t_starts[keep], t_ends[keep]
        return ray_indices, t_starts, t_ends

    def _march(self, rays_o: Tensor, rays_d: Tensor, near: Tensor, far: Tensor, step: float, cone: float):
        outer = self.aabbs[-1]
        # Slab test against the outermost box (it contains every level).
        with torch.no_grad():
            inv = 1.0 / torch.where(rays_d == 0, torch.full_like(rays_d, 1e-12), rays_d)
            t1 = (outer[:3] - rays_o) * inv
            t2 = (outer[3:] - rays_o) * inv
            tmin = torch.minimum(t1, t2).amax(-1)
            tmax = torch.maximum(t1, t2).amin(-1)
        hit = (tmax > tmin) & (tmax > 0)
        t0 = torch.maximum(tmin, near)
        t1_ = torch.minimum(tmax, far)
        valid = hit & (t1_ > t0)
        k_lo = _lattice_index(near, t0, step, cone)  # first k with midpoint >= t0
        k_hi = _lattice_index(near, t1_, step, cone)  # first k with midpoint >= t1 (excluded)
        counts = torch.where(valid, (k_hi - k_lo).clamp_min(0), torch.zeros_like(k_lo))
        out_r, out_s, out_e = [], [], []
        # Chunk over rays so that the examined lattice points stay bounded.
        cum = torch.cumsum(counts, 0)
        start_ray = 0
        while start_ray < rays_o.shape[0]:
            base = int(cum[start_ray - 1]) if start_ray > 0 else 0
            end_ray = int(torch.searchsorted(cum, torch.tensor(base + _MARCH_CHUNK, device=cum.device),
                                             right=True))
            end_ray = max(end_ray, start_ray + 1)
            sl = slice(start_ray, end_ray)
            c = counts[sl]
            ridx = torch.repeat_interleave(torch.arange(start_ray, end_ray, device=rays_o.device), c)
            if ridx.numel():
                offsets = torch.cumsum(c, 0) - c
                k = k_lo[ridx] + (torch.arange(ridx.shape[0], device=rays_o.device) - offsets[ridx - start_ray])
                ts = _lattice_t(near[ridx], k, step, cone)
                te = _lattice_t(near[ridx], k + 1, step, cone)
                mid = rays_o[ridx] + rays_d[ridx] * ((ts + te) / 2)[:, None]
                keep = self._occupied(mid)
                out_r.append(ridx[keep])
                out_s.append(ts[keep])
                out_e.append(te[keep])
            start_ray = end_ray
        if not out_r:
            empty = rays_o.new_zeros(0)
            return torch.zeros(0, dtype=torch.long, device=rays_o.device), empty, empty.clone()
        return torch.cat(out_r), torch.cat(out_s), torch.cat(out_e)

    def _occupied(self, x: Tensor) -> Tensor:  # [N, 3] -> [N] bool
        """Binary occupancy at points, read from the finest level whose box contains them."""
        res = self.resolution.to(x.device)
        occ = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        done = torch.zeros_like(occ)
        for lvl in range(self.levels):
            lo, hi = self.aabbs[lvl, :3], self.aabbs[lvl, 3:]
            u = (x - lo) / (hi - lo)
            inside = ((u >= 0) & (u <= 1)).all(-1) & ~done
            idx = (u[inside] * res).long()
            idx = torch.minimum(idx.clamp_min(0), res.long() - 1)
            occ[inside] = self.binaries[lvl, idx[:, 0], idx[:, 1], idx[:, 2]]
            done |= inside
        return occ


def _lattice_t(near: Tensor, k: Tensor, step: float, cone: float) -> Tensor:
    """Start of lattice interval ``k`` from ``near``: ``t_{k+1} = t_k + max(step, t_k * cone)``."""
    kf = k.to(near.dtype)
    if cone <= 0:
        return near + kf * step
    # Linear until t * cone exceeds step, geometric (ratio 1 + cone) after.
    k1 = torch.clamp(torch.floor((step / cone - near) / step) + 1, min=0)
    t_k1 = near + k1 * step
    geo = t_k1 * torch.pow(torch.tensor(1.0 + cone, dtype=near.dtype, device=near.device), kf - k1)
    return torch.where(kf < k1, near + kf * step, geo)


def _lattice_index(near: Tensor, t: Tensor, step: float, cone: float) -> Tensor:
    """Smallest ``k`` whose interval midpoint lies at or beyond ``t`` (long)."""
    lin = torch.ceil((t - near) / step - 0.5)
    if cone <= 0:
        return lin.clamp_min(0).long()
    k1 = torch.clamp(torch.floor((step / cone - near) / step) + 1, min=0)
    t_k1 = near + k1 * step
    mid_scale = 1.0 + cone / 2
    geo = k1 + torch.ceil(torch.log(torch.clamp(t / (t_k1 * mid_scale), min=1e-30)) / math.log1p(cone))
    geo = torch.maximum(geo, k1)
    return torch.where(lin < k1, lin, geo).clamp_min(0).long()


def occupancy_estimator(
    roi_aabb: Sequence[float] | Tensor,
    resolution: int | Sequence[int] = 128,
    levels: int = 1,
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> nn.Module:
    """An occupancy-grid estimator for ``device``: ``nerfacc.OccGridEstimator`` on CUDA (``backend="auto"`` or
    ``"nerfacc"``), :class:`OccupancyGrid` elsewhere (or with ``backend="torch"``). Both share one API."""
    device = torch.device(device)
    if backend not in ("auto", "nerfacc", "torch"):
        raise InputError(f"unknown occupancy backend {backend!r}", "use auto, nerfacc or torch")
    if backend == "nerfacc" or (backend == "auto" and device.type == "cuda"):
        if device.type != "cuda":
            from avatar_core.errors import BackendUnavailableError

            raise BackendUnavailableError("nerfacc's occupancy-grid marcher needs a CUDA device",
                                          "use backend='torch' (or 'auto') on this machine")
        from nerfacc import OccGridEstimator

        return OccGridEstimator(roi_aabb=roi_aabb, resolution=resolution, levels=levels).to(device)
    return OccupancyGrid(roi_aabb, resolution, levels).to(device)


@torch.no_grad()
def fill_occupancy_grid(
    estimator: nn.Module,
    occ_eval_fn: Callable[[Tensor], Tensor],
    num_updates: int = 16,
    occ_thre: float = 0.01,
    ema_decay: float = 0.95,
    dilate: int = 0,
) -> nn.Module:
    """Build a grid from zero for a fixed field: reset the EMA and run ``num_updates`` all-cell updates.

    RodinHD renders each generated triplane after 16 such updates (torch-ngp's full-grid refresh). Each update
    probes one random point per cell, so a cell that the field only grazes can be missed; ``dilate`` grows the
    occupied set by that many cells (a 3D max filter) to keep rendering of a fixed field conservative. Works
    with :class:`OccupancyGrid` and ``nerfacc.OccGridEstimator``; cells marked invisible (-1) stay so.
    """
    estimator.occs.copy_(torch.where(estimator.occs < 0, estimator.occs, torch.zeros_like(estimator.occs)))
    for i in range(num_updates):
        estimator._update(step=i, occ_eval_fn=occ_eval_fn, occ_thre=occ_thre, ema_decay=ema_decay,
                          warmup_steps=num_updates)
    if dilate > 0:
        grown = torch.nn.functional.max_pool3d(estimator.binaries[:, None].float(), 2 * dilate + 1, stride=1,
                                               padding=dilate)
        estimator.binaries = grown[:, 0] > 0
    return estimator
