"""Triplane layout, the on-disk store and the renderer."""

import pytest
import torch

from avatar_core.cameras import orbit_cameras
from avatar_core.errors import CorruptFileError, InputError, MissingFileError
from avatar_core.io import save_tensors
from rodinhd.decoder import TriplaneDecoder
from rodinhd.renderer import TriplaneField, build_occupancy_grid, render_views
from rodinhd.triplane import TriplaneStore, init_triplane, rollout, unroll


def test_rollout_round_trip_and_layout():
    planes = torch.randn(2, 3, 5, 6, 7)  # [B, 3, C, H, W]
    rolled = rollout(planes)
    assert rolled.shape == (2, 5, 6, 21)
    # Side by side in xy, xz, yz order (avatar_core.conventions).
    for k in range(3):
        torch.testing.assert_close(rolled[..., 7 * k:7 * (k + 1)], planes[:, k], rtol=0, atol=0)
    torch.testing.assert_close(unroll(rolled), planes, rtol=0, atol=0)
    torch.testing.assert_close(rollout(unroll(rolled[0])), rolled[0], rtol=0, atol=0)
    with pytest.raises(InputError):
        unroll(torch.zeros(5, 6, 20))


def test_store_round_trip_and_wrong_shape(tmp_path):
    store = TriplaneStore(tmp_path, channels=4, resolution=8)
    planes = init_triplane(4, 8, generator=torch.Generator().manual_seed(0))
    store.save("avatar_0", rollout(planes), {"stage": 1})  # the roll-out is accepted too
    loaded, meta = store.load_with_metadata("avatar_0")
    torch.testing.assert_close(loaded, planes, rtol=0, atol=0)
    assert meta["stage"] == 1 and store.ids() == ["avatar_0"]
    with pytest.raises(InputError, match="expected"):
        store.save("avatar_1", torch.zeros(3, 4, 8, 9))
    save_tensors(store.path("bad"), {"planes": torch.zeros(3, 4, 16, 16)})  # fitted at another resolution
    with pytest.raises(CorruptFileError, match=r"\(3, 4, 16, 16\).*expected \(3, 4, 8, 8\)"):
        store.load("bad")
    with pytest.raises(MissingFileError):
        store.load("nobody")
    with pytest.raises(InputError):
        store.path("../escape")


@pytest.mark.parametrize("reduce", ["sum", "concat"])
def test_occupancy_grid_rendering_matches_uniform_marching(reduce):
    """Empty-space skipping (grid of 16 updates from zero, dilated) must not change the image of a fixed field."""
    torch.manual_seed(0)
    decoder = TriplaneDecoder(4, reduce=reduce, hidden_dim=16, density_layers=1)
    # A blob: features large near the centre and raw density = their 3 * sum - 36: a sharp surface, so most of the cube is empty.
    u = torch.linspace(-1, 1, 16)
    blob = torch.exp(-(u[:, None] ** 2 + u[None] ** 2) / 0.3)
    planes = 0.3 * torch.randn(3, 4, 16, 16) + 1.5 * blob
    with torch.no_grad():
        decoder.density_net[-1].weight[0].fill_(3.0)
        decoder.density_net[-1].bias[0].fill_(-36.0)
    cams = orbit_cameras(2, radius=2.5, elevation_deg=15, fov_deg=45, width=20, height=20)
    rgb_u, a_u = render_views(planes, decoder, cams, num_samples=48, occupancy=False)
    grid = build_occupancy_grid(TriplaneField(planes, decoder), resolution=16, num_samples=48)
    assert 0.0 < grid.binaries.float().mean() < 0.9  # the grid really skips something
    rgb_g, a_g = render_views(planes, decoder, cams, num_samples=48, occupancy=grid, chunk=97)
    assert rgb_u.shape == (2, 20, 20, 3) and a_u.shape == (2, 20, 20, 1)
    assert 0.05 < a_u.mean() < 0.95
    # Skipped cells hold at most occ_thre = 0.01 opacity per step, so only rare pixels may differ, and slightly.
    for grid_img, uniform_img in ((a_g, a_u), (rgb_g, rgb_u)):
        diff = (grid_img - uniform_img).abs()
        assert diff.max() < 0.02 and diff.mean() < 1e-3
