"""The render-based garment text score of a GaussianIP result: Gaussians on the body frame's body coloured from a
dataset avatar's own painted texture read as that avatar's caption, and unlike other avatars' captions."""

import numpy as np
import torch
from torch import nn

from avatar_core.body import UVMapper
from avatar_core.data.appearance import TexturePainter, sample_attributes
from avatar_core.data.captions import make_captions
from avatar_core.data.garment_score import garment_scorer, parse_garments
from avatar_core.io.ply import rgb_to_sh
from gaussianip import gaussians as G
from gaussianip.config import load_gaussianip_config
from gaussianip.evaluate import garment_views, text_faithfulness

R = 64


def _textured_result(frame, texture: torch.Tensor, n: int = 30000) -> nn.ParameterDict:
    """Small opaque Gaussians sampled on the body frame's body surface, each the colour of its UV texel."""
    mapper = UVMapper(frame.body, R)
    face_idx, bary, uv = mapper.sample_points(n, seed=0)
    means = mapper.points_on_surface(frame.vertices[None], face_idx, bary)[0].float()
    rc = mapper.uv_to_texel(uv)
    rgb = texture[rc[:, 0], rc[:, 1]].float()
    return nn.ParameterDict({
        "means": nn.Parameter(means), "scales": nn.Parameter(torch.full((n, 3), 0.012).log()),
        "quats": nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1)),
        "opacities": nn.Parameter(torch.logit(torch.full((n,), 0.95))),
        "sh0": nn.Parameter(rgb_to_sh(rgb.clamp(0, 1))[:, None, :])})


def test_renders_of_a_textured_result_score_its_own_caption_above_others():
    cfg = load_gaussianip_config("tiny")
    frame = G.body_frame(cfg.gaussians)
    scorer = garment_scorer(cfg.gaussians.body, cfg.gaussians.body_dir, R)
    painter = TexturePainter(frame.body, R)
    rng = np.random.default_rng(7)
    attrs = [sample_attributes(rng) for _ in range(4)]
    caps = [make_captions(a)["caption"] for a in attrs]
    own, other, same = [], [], []
    for k, a in enumerate(attrs):
        tex, _ = painter.paint(a, np.random.default_rng(k))
        params = _textured_result(frame, tex)
        rgb, regions = garment_views(params, frame, scorer, size=96)
        assert all(bool(m.any()) for m in regions.values())  # every region is seen from some view
        uv_seen = scorer.read(tex.permute(2, 0, 1))
        seen = scorer.read_views(rgb, regions)
        # The colours the renders show are the colours the texture shows (a patterned garment's blend may not be).
        same += [seen.get(key) == uv_seen.get(key) for key in ("top_colour", "bottom_colour", "shoes_colour")
                 if key in uv_seen]
        rep = text_faithfulness(params, frame, scorer, caps[k], [c for j, c in enumerate(caps) if j != k], size=96)
        own.append(rep["prompt"])
        other.append(rep["other_captions_mean"])
        assert rep["per_attribute"].keys() <= parse_garments(caps[k]).keys()
    assert np.mean(same) >= 0.75, same
    assert np.mean(own) >= 0.8, own
    assert np.mean(other) < np.mean(own) - 0.3, (own, other)
