"""The per-region garment text score: the prompt parser on the dataset's caption styles, and the scorer against textures
painted by the dataset's own painter for sampled attributes (its ceiling), and against other avatars' captions."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from avatar_core.data.appearance import sample_attributes
from avatar_core.data.captions import make_captions
from avatar_core.data.garment_score import garment_scorer, parse_garments


def test_parse_garments_reads_every_garment_attribute():
    assert parse_garments("a woman with long brown hair and brown skin wearing a sleeveless red dress and white "
                          "shoes") == {"top_type": "dress", "top_colour": "red", "sleeves": "none",
                                       "bottom_type": "dress", "shoes_colour": "white"}
    assert parse_garments("a grey jacket over a green checked shirt, light blue shorts and black shoes") == {
        "top_type": "jacket", "top_colour": "grey", "inner_colour": "green", "bottom_type": "shorts",
        "bottom_colour": "light blue", "shoes_colour": "black"}
    assert parse_garments("a short-sleeved navy striped shirt on a tall man, full body") == {
        "top_type": "shirt", "top_colour": "navy", "sleeves": "short"}
    assert parse_garments("long grey hair, a pink skirt and beige shoes") == {
        "bottom_type": "skirt", "bottom_colour": "pink", "shoes_colour": "beige"}


def test_scorer_reads_painted_textures_and_rejects_other_captions():
    scorer = garment_scorer("anny", None, 64)
    from avatar_core.body import load_body_model
    from avatar_core.data.appearance import TexturePainter

    painter = TexturePainter(load_body_model("anny"), 64)
    rng = np.random.default_rng(3)
    attrs = [sample_attributes(rng) for _ in range(16)]
    own, other = defaultdict(list), defaultdict(list)
    for k, a in enumerate(attrs):
        tex, _ = painter.paint(a, np.random.default_rng(k))
        rgb = tex.permute(2, 0, 1)
        for caption in [make_captions(a)["caption"], *make_captions(a)["phrases"]]:
            for key, v in scorer.score(rgb, parse_garments(caption)).items():
                own[key].append(v)
        for key, v in scorer.score(rgb, parse_garments(make_captions(attrs[k - 1])["caption"])).items():
            other[key].append(v)
    for key in ("top_type", "top_colour", "bottom_type", "bottom_colour", "shoes_colour"):
        assert np.mean(own[key]) >= 0.85, (key, np.mean(own[key]))
    for key in ("top_colour", "bottom_colour", "shoes_colour"):  # 17 palette colours: a wrong caption rarely fits
        assert np.mean(other[key]) <= 0.3, (key, np.mean(other[key]))
    assert np.mean(own["sleeves"]) >= 0.6  # the weakest reading: skin-toned sleeves look bare


def test_views_of_the_textured_body_read_as_its_texture():
    """The body mesh rendered with its own texture (per-pixel surface UV, nearest texel) from the front, sides and
    back reads the same garment colours and types through ``view_regions`` as the texture itself, for solid
    outfits; a vertex array of another body is refused."""
    import pytest
    import torch

    from avatar_core.body import load_body_model
    from avatar_core.cameras import orbit_cameras
    from avatar_core.data.appearance import TexturePainter
    from avatar_core.errors import InputError
    from avatar_core.render.mesh import interpolate, rasterize_mesh

    R = 64
    scorer = garment_scorer("anny", None, R)
    body = load_body_model("anny")
    painter = TexturePainter(body, R)
    with torch.no_grad():
        verts = body().vertices[0].float()
    cams = orbit_cameras(4, 3.0, 0.0, 40.0, 96, 96, target=tuple(((verts.min(0).values + verts.max(0).values) / 2).tolist()))
    frags = rasterize_mesh(verts, body.faces, cams)
    uv = interpolate(frags, body.uv_coords.float()[body.uv_faces], per="corner")
    col = (uv[..., 0] * R).floor().long().clamp(0, R - 1)
    row = ((1.0 - uv[..., 1]) * R).floor().long().clamp(0, R - 1)
    regions = scorer.view_regions(verts, cams)
    assert all(bool(m.any()) for m in regions.values())
    assert all(not bool((m & ~frags.mask).any()) for m in regions.values())  # only body pixels
    rng = np.random.default_rng(5)
    agree = []
    for k in range(6):
        a = sample_attributes(rng)
        for g in a["garments"]:
            g["pattern"] = "solid"
        tex, _ = painter.paint(a, np.random.default_rng(k))
        rgb = torch.where(frags.mask[..., None], tex[row, col], torch.ones(3))
        uv_seen, seen = scorer.read(tex.permute(2, 0, 1)), scorer.read_views(rgb, regions)
        agree += [seen[key] == uv_seen[key] for key in uv_seen]
    assert np.mean(agree) >= 0.9, agree
    with pytest.raises(InputError):
        scorer.view_regions(verts[:-1], cams)
