"""The decoder variants: ours (summed planes, view-independent) and the authors' (averaged planes, colour/density
channel split, view-dependent colour through a frequency encoding)."""

from __future__ import annotations

import math

import pytest
import torch

from avatar_core.errors import InputError
from rodinhd.config import load_rodinhd_config
from rodinhd.decoder import TriplaneDecoder, frequency_encoding
from rodinhd.renderer import TriplaneField


def test_frequency_encoding_closed_form():
    x = torch.tensor([[0.25, -0.5, 1.0]])
    enc = frequency_encoding(x, 2)
    expected = [0.25, -0.5, 1.0]
    expected += [math.sin(math.pi * 0.25), math.sin(-math.pi * 0.5), math.sin(math.pi),
                 math.sin(2 * math.pi * 0.25), math.sin(-2 * math.pi * 0.5), math.sin(2 * math.pi)]
    expected += [math.cos(math.pi * 0.25), math.cos(-math.pi * 0.5), math.cos(math.pi),
                 math.cos(2 * math.pi * 0.25), math.cos(-2 * math.pi * 0.5), math.cos(2 * math.pi)]
    torch.testing.assert_close(enc[0], torch.tensor(expected), atol=1e-6, rtol=0)


def test_authors_decoder_splits_channels_averages_planes_and_reads_the_view():
    torch.manual_seed(0)
    dec = TriplaneDecoder(8, reduce="mean", hidden_dim=16, color_channels=6, view_dependent=True)
    planes, pts = torch.randn(3, 8, 6, 6), torch.rand(50, 3) * 2 - 1
    feats = dec.features(planes, pts)
    torch.testing.assert_close(feats, TriplaneDecoder(8, reduce="sum").features(planes, pts) / 3)
    feats.requires_grad_(True)
    d1, d2 = torch.nn.functional.normalize(torch.randn(50, 3), dim=-1), torch.nn.functional.normalize(
        torch.randn(50, 3), dim=-1)
    rgb1, sigma = dec(feats, d1)
    rgb2, _ = dec(feats, d2)
    assert (rgb1 - rgb2).abs().max() > 1e-4  # colour depends on the view direction
    (g,) = torch.autograd.grad(sigma.sum(), feats)
    assert g[:, :6].abs().max() == 0 and g[:, 6:].abs().max() > 0  # density reads only the last 2 channels
    with pytest.raises(InputError):
        dec(feats)  # a view-dependent decoder needs the directions
    # Through the renderer's field the ray directions reach it; our decoder ignores them.
    field = TriplaneField(planes, dec)
    a, _ = field(pts * 0.5, d1)
    b, _ = field(pts * 0.5, d2)
    assert (a - b).abs().max() > 1e-4
    ours = TriplaneField(planes, TriplaneDecoder(8, hidden_dim=16))
    torch.testing.assert_close(ours(pts * 0.5, d1)[0], ours(pts * 0.5, d2)[0])


def test_authors_code_config_builds_the_authors_decoder():
    cfg = load_rodinhd_config("authors_code")
    dec = TriplaneDecoder.from_config(cfg.triplane.channels, cfg.decoder)
    assert (dec.reduce, dec.color_channels, dec.view_dependent) == ("mean", 24, True)
    assert dec.density_net[0].in_features == 8 and dec.density_net[0].out_features == 128
    ours = TriplaneDecoder.from_config(8, load_rodinhd_config("tiny").decoder)
    assert (ours.reduce, ours.color_channels, ours.view_dependent) == ("sum", 0, False)
