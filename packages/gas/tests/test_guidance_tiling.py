"""Guidance scales (the official 20-frame list, the symmetric triangle, pose ramps) and temporal tiling."""

from __future__ import annotations

import pytest
import torch

from avatar_core.errors import InputError
from gas.guidance import guidance_scales
from gas.tiling import blend_weights, tile_indices, tiled

#: The authors' hard-coded novel-view list: linspace(1, 2, 11) then linspace(2, 1, 11)[1:10].
OFFICIAL_20 = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1]


def test_official_list_at_20_frames():
    torch.testing.assert_close(guidance_scales("view", 20, "official"), torch.tensor(OFFICIAL_20), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [2, 3, 7, 20, 33, 64])
def test_triangle_min_at_ends_max_in_the_middle_symmetric(n):
    s = guidance_scales("view", n, "triangular", 1.0, 2.0)
    assert s.shape == (n,)
    assert float(s[0]) == 1.0 and float(s[-1]) == 1.0
    torch.testing.assert_close(s, s.flip(0))
    if n > 2:
        assert float(s.max()) == pytest.approx(2.0) and float(s[n // 2]) == pytest.approx(2.0)
        d = s[1:] - s[:-1]
        assert bool((d[: (n - 1) // 2] > 0).all())  # rises to the middle


def test_pose_schedules_and_bad_names():
    torch.testing.assert_close(guidance_scales("pose", 5, "constant", max_scale=2.0), torch.full((5,), 2.0))
    torch.testing.assert_close(guidance_scales("pose", 3, "linear", 1.0, 3.0), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(InputError):
        guidance_scales("view", 5, "linear")
    with pytest.raises(InputError):
        guidance_scales("pose", 5, "official")


def test_one_tile_reproduces_the_untiled_prediction_exactly():
    x = torch.randn(1, 7, 4, 3, 3)
    fn = lambda idx: torch.tanh(x[:, idx] * 3.7) + idx.float().reshape(1, -1, 1, 1, 1)  # noqa: E731
    out = tiled(fn, 7, tile=8, overlap=2)
    assert torch.equal(out, fn(torch.arange(7)))


@pytest.mark.parametrize("n,tile,overlap", [(24, 8, 2), (60, 20, 5), (25, 8, 0), (9, 8, 3)])
def test_tiles_cover_the_sequence_with_weights_summing_to_one(n, tile, overlap):
    tiles = tile_indices(n, tile, overlap)
    assert all(int(t[0]) == 0 and len(t) == tile for t in tiles)  # every tile holds the reference frame 0
    covered = torch.zeros(n, dtype=torch.long)
    for t in tiles:
        covered[t] += 1
    assert bool((covered > 0).all())
    total = torch.zeros(n, dtype=torch.float64)
    for t, w in zip(tiles, blend_weights(n, tiles)):
        assert bool((w > 0).all())
        total.index_add_(0, t, w)
    torch.testing.assert_close(total, torch.ones(n, dtype=torch.float64))


def test_three_times_the_tile_length_blends_a_per_frame_signal_exactly():
    n, tile = 24, 8
    signal = torch.randn(1, n, 2)
    out = tiled(lambda idx: signal[:, idx], n, tile, overlap=3)  # a prediction every tile agrees on
    torch.testing.assert_close(out, signal, atol=1e-6, rtol=0)
    assert len(tile_indices(n, tile, 3)) >= 3


def test_bad_tiling_arguments():
    with pytest.raises(InputError):
        tile_indices(10, 8, 7)
    with pytest.raises(InputError):
        tile_indices(10, 1, 0)
