"""The dataset's light rig: closed-form shades, two-sided normals, and the lighting a dataset records."""

from __future__ import annotations

import pytest
import torch

from avatar_core.cameras import look_at
from avatar_core.errors import ConfigError
from avatar_core.render.lighting import DATASET_LIGHTING, camera_lights, lambert_shading, lighting_ambient


def _camera() -> torch.Tensor:  # one camera on +z looking at the origin, y up
    return look_at(torch.tensor([[0.0, 0.0, 3.0]]), torch.zeros(1, 3), torch.tensor([0.0, 1.0, 0.0]))


def test_light_comes_from_above_right_of_the_camera_towards_the_scene():
    light = camera_lights(_camera())[0]
    assert torch.isclose(light.norm(), torch.tensor(1.0))
    assert light[2] > 0.7 and light[1] > 0 and light[0] > 0  # back towards the camera (+z), up, to its right


def test_shades_in_closed_form_and_two_sided():
    view = _camera()
    light = camera_lights(view)[0]
    side = torch.linalg.cross(light, torch.tensor([0.0, 0.0, 1.0]))
    side = side / side.norm()  # perpendicular to the light
    normals = torch.stack([light, side, -light, torch.tensor([0.0, 0.0, 1.0])])
    s = lambert_shading(normals, view, 0.4)[0]  # [N]
    assert torch.allclose(s[0], torch.tensor(1.0))  # facing the light
    assert torch.allclose(s[1], torch.tensor(0.4))  # lit edge-on: the ambient term only
    assert torch.allclose(s[2], s[0])  # facing away from the camera: flipped towards it (two-sided)
    assert torch.allclose(s[3], torch.tensor(0.4) + 0.6 * light[2])
    assert torch.allclose(lambert_shading(normals, view, 1.0), torch.ones(1, 4))  # all ambient: unlit


def test_recorded_lighting_is_read_and_its_absence_is_a_clear_error():
    assert lighting_ambient({"lighting": dict(DATASET_LIGHTING)}, "ds") == DATASET_LIGHTING["ambient"]
    with pytest.raises(ConfigError, match="records no"):
        lighting_ambient({}, "old dataset")
    with pytest.raises(ConfigError, match="outside"):
        lighting_ambient({"lighting": {**DATASET_LIGHTING, "ambient": 2.0}}, "ds")
