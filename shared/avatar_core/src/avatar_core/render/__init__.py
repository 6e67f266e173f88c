"""Differentiable rendering: 3D Gaussians, radiance fields, triangle meshes and conditioning images.

Heavy backends (gsplat's CUDA kernels, nerfacc's CUDA estimator, the CPU rasterizer's compiled kernel) load
on first use, so importing this package works on any machine.
"""

from avatar_core.render.gaussians import rasterize_gaussians
from avatar_core.render.mesh import MeshFragments, interpolate, rasterize_mesh
from avatar_core.render.occupancy import OccupancyGrid, fill_occupancy_grid, occupancy_estimator
from avatar_core.render.rays import generate_rays
from avatar_core.render.turntable import gaussian_render_fn, turntable, volume_render_fn
from avatar_core.render.volume import VolumeRender, render_cameras, render_rays, sample_triplane

__all__ = [
    "MeshFragments",
    "OccupancyGrid",
    "VolumeRender",
    "fill_occupancy_grid",
    "gaussian_render_fn",
    "generate_rays",
    "interpolate",
    "occupancy_estimator",
    "rasterize_gaussians",
    "rasterize_mesh",
    "render_cameras",
    "render_rays",
    "sample_triplane",
    "turntable",
    "volume_render_fn",
]
