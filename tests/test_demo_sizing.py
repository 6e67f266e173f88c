"""The kernel demo's body Gaussians are sized to their own texel: flat, in the surface, as large as the surface
patch the texel stands for (the UV map samples the head about three times as densely as the shins)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from gsplat.cuda._torch_impl import _quat_to_rotmat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from demo import texel_footprints  # noqa: E402

from avatar_core.body import UVMapper, load_body_model  # noqa: E402
from avatar_core.body.model import PART_NAMES  # noqa: E402


def test_footprints_tile_the_surface_and_lie_in_it():
    body = load_body_model("anny")
    res = 128
    mapper = UVMapper(body, res)
    face_idx, _, _ = mapper.sample_points("texels")
    rest = body().vertices[0]
    quats, scales = texel_footprints(body, rest, face_idx, res, coverage=1.0)
    # Footprints add up to the body's surface area (texels tile the UV charts; the charts cover every triangle).
    tri = rest[body.faces]
    area = 0.5 * torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).norm(dim=-1).sum()
    assert abs((scales[:, 0] * scales[:, 1]).sum() / area - 1) < 0.1
    # The thin axis is the face normal.
    normal = torch.nn.functional.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), dim=-1)
    thin = _quat_to_rotmat(quats)[..., 2]  # gsplat's rotation (columns are the axes)
    assert ((thin * normal[face_idx]).sum(-1).abs() > 0.99).float().mean() > 0.99
    assert (scales[:, 2] < 0.2 * scales[:, 1]).all()
    # Sparse parts get larger splats than dense ones.
    labels = mapper.part_label_map()[mapper.mask]
    size = (scales[:, 0] * scales[:, 1]).sqrt()
    legs, head = size[labels == PART_NAMES.index("legs")], size[labels == PART_NAMES.index("head")]
    assert legs.median() > 1.8 * head.median()
