"""Shared fixtures of RodinHD's tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avatar_core.cameras import Cameras, look_at, orbit_cameras
from avatar_core.data.generate import FORMAT
from avatar_core.io import save_image, save_json
from rodinhd.decoder import TriplaneDecoder
from rodinhd.renderer import render_views


def write_triplane_dataset(root: Path, num: int, res: int, views: int, num_samples: int = 32) -> None:
    """``num`` avatars in the kernel's dataset layout: RGBA views of a random triplane and a front RGBA portrait."""
    torch.manual_seed(0)
    decoder = TriplaneDecoder(4, hidden_dim=16, density_bias=-1.0)
    cams = orbit_cameras(views, 2.8, 0.0, 40.0, res, res)
    portrait_cam = Cameras.from_fov(look_at(torch.tensor([[0.0, 0.3, 1.5]]), torch.tensor([[0.0, 0.3, 0.0]])),
                                    40.0, res, res)
    settings = {"num": num, "views": views, "res": res, "seed": 0, "body": "anny", "uv_res": 64}
    save_json(root / "meta.json", {"format": FORMAT, "settings": settings})
    for i in range(num):
        d = root / "avatars" / f"{i:06d}"
        (d / "views").mkdir(parents=True)
        planes = torch.randn(3, 4, 8, 8) * 0.8
        with torch.no_grad():
            rgb, alpha = render_views(planes, decoder, Cameras.cat([cams, portrait_cam]), num_samples=num_samples,
                                      occupancy=False)
        rgba = torch.cat([torch.where(alpha > 1e-3, rgb / alpha.clamp_min(1e-3), rgb).clamp(0, 1), alpha], -1)
        for v in range(views):
            save_image(d / "views" / f"{v:03d}.png", rgba[v])
        save_image(d / "portrait.png", rgba[-1])
        frame = lambda c, f: {"file": f, "viewmat": c.viewmats[0].tolist(), "K": c.Ks[0].tolist()}  # noqa: E731
        save_json(d / "cameras.json", {"width": res, "height": res,
                                       "views": [frame(cams[v], f"views/{v:03d}.png") for v in range(views)],
                                       "portrait": frame(portrait_cam, "portrait.png")})
        save_json(d / "attributes.json", {"index": i})


@pytest.fixture(scope="session")
def triplane_dataset():
    """:func:`write_triplane_dataset`, for module-scoped fixtures."""
    return write_triplane_dataset
