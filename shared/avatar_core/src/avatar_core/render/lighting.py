"""The synthetic dataset's light rig: Lambert shading from a light above and to the right of each camera.

:func:`avatar_core.data.generate.render_textured` lights every view this way, and the dataset records it in
``meta.json`` (:data:`DATASET_LIGHTING` under ``"lighting"``), so a method that fits unlit colours to the views
(an albedo) can light its own renders the same way before comparing them. Shading of a surface point with unit
normal ``n`` seen by camera ``c``:

    shade = ambient + (1 - ambient) * max(0, n' . l_c)

with ``l_c`` the unit light direction of camera ``c`` (:func:`camera_lights`: towards the camera, up and right of
it, in world coordinates) and ``n'`` the normal flipped to face the camera when it faces away (two-sided
shading: inner mouth, eyelids, the back of a Gaussian splat). Rendered colour = albedo x shade.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from avatar_core.errors import ConfigError

__all__ = ["DATASET_LIGHTING", "LIGHTING_MODEL", "camera_lights", "lambert_shading", "lighting_ambient", "shade"]

#: The lighting model's name in a dataset's ``meta.json``.
LIGHTING_MODEL = "lambert_camera_light"
#: The dataset generator's lighting, as written to ``meta.json``.
DATASET_LIGHTING: dict[str, Any] = {"model": LIGHTING_MODEL, "ambient": 0.4}


def camera_lights(viewmats: Tensor) -> Tensor:  # [C, 4, 4] world-to-camera (OpenCV) -> [C, 3]
    """Unit light direction per camera in world coordinates: back towards the camera, up and to its right."""
    R = viewmats[:, :3, :3]  # rows: camera right, down, forward in world coordinates
    return torch.nn.functional.normalize(-R[:, 2] - 0.6 * R[:, 1] + 0.3 * R[:, 0], dim=-1)


def shade(normals: Tensor, forward: Tensor, light: Tensor, ambient: float) -> Tensor:  # [..., 3] x3 -> [...]
    """The shade of unit ``normals`` seen along camera ``forward`` directions and lit from unit ``light``
    directions (broadcast against each other; module docstring), two-sided."""
    facing = (normals * -forward).sum(-1, keepdim=True)
    n = torch.where(facing < 0, -normals, normals)
    return ambient + (1.0 - ambient) * (n * light).sum(-1).clamp_min(0.0)


def lambert_shading(normals: Tensor, viewmats: Tensor, ambient: float) -> Tensor:  # [..., N, 3], [C, 4, 4] -> [..., C, N]
    """The shade of surface points with unit ``normals`` in every camera of ``viewmats``."""
    lights = camera_lights(viewmats).to(normals)[:, None, :]  # [C, 1, 3]
    forward = viewmats[:, 2, :3].to(normals)[:, None, :]  # [C, 1, 3] camera forward in world coordinates
    return shade(normals.unsqueeze(-3), forward, lights, ambient)


def lighting_ambient(meta: dict[str, Any], where: str) -> float:
    """The ambient term of a dataset's recorded lighting (``meta.json``'s ``"lighting"``); a clear error when the
    dataset records none or another model."""
    light = meta.get("lighting")
    if not isinstance(light, dict) or light.get("model") != LIGHTING_MODEL:
        raise ConfigError(f"{where} records no {LIGHTING_MODEL!r} lighting (its meta.json has {light!r})",
                          "rewrite the dataset with `avatar-core make-dataset` (it records its lighting), or "
                          "compare unlit renders with data.lit_renders=false")
    ambient = float(light["ambient"])
    if not 0.0 <= ambient <= 1.0:
        raise ConfigError(f"{where}: lighting ambient {ambient} is outside [0, 1]", "rewrite the dataset")
    return ambient
