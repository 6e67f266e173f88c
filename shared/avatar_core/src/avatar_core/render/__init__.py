"""Differentiable rendering: 3D Gaussians, radiance fields, triangle meshes and conditioning images.

Heavy backends (gsplat's CUDA kernels, nerfacc's CUDA estimator, the CPU rasterizer's compiled kernel) load
on first use, so importing this package works on any machine.
"""

from avatar_core.render.compositing import composite, packed_exclusive_sum, render_visibility, render_weights
from avatar_core.render.estimators import RayEstimator
from avatar_core.render.gaussians import rasterize_gaussians
from avatar_core.render.mesh import MeshFragments, interpolate, rasterize_mesh
from avatar_core.render.occupancy import OccupancyGrid, fill_occupancy_grid, occupancy_estimator
from avatar_core.render.rays import generate_rays
from avatar_core.render.triplane_sampling import sample_triplane
from avatar_core.render.turntable import gaussian_render_fn, turntable, volume_render_fn
from avatar_core.render.volume import VolumeRender, render_cameras, render_rays

__all__ = [
    "MeshFragments",
    "OccupancyGrid",
    "RayEstimator",
    "VolumeRender",
    "composite",
    "fill_occupancy_grid",
    "gaussian_render_fn",
    "generate_rays",
    "interpolate",
    "occupancy_estimator",
    "packed_exclusive_sum",
    "rasterize_gaussians",
    "rasterize_mesh",
    "render_cameras",
    "render_rays",
    "render_visibility",
    "render_weights",
    "sample_triplane",
    "turntable",
    "volume_render_fn",
]
