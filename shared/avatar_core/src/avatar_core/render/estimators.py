"""The interface a ray-sample estimator offers the volume renderer (nerfacc's ``OccGridEstimator`` contract).

:func:`avatar_core.render.volume.render_rays` accepts any object with this ``sampling`` method:
``nerfacc.OccGridEstimator`` (CUDA marcher) and the kernel's :class:`~avatar_core.render.occupancy.OccupancyGrid`
(PyTorch marcher, any device) both satisfy it, structurally, with no common base class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["RayEstimator"]


@runtime_checkable
class RayEstimator(Protocol):
    """Samples along rays in occupied space: ``(ray_indices [S] long, t_starts [S], t_ends [S])``, grouped by ray.

    ``sigma_fn(t_starts, t_ends, ray_indices) -> sigmas [S]`` (or ``alpha_fn``) lets the estimator drop samples
    behind opaque space (transmittance below ``early_stop_eps``) and, with ``alpha_thre``, nearly transparent
    ones. An implementation may take further keywords (the kernel's grid takes ``generator``).
    """

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
    ) -> tuple[Tensor, Tensor, Tensor]: ...
