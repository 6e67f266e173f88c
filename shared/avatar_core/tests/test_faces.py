"""Faces that differ by more than colour: painted brows, lips, nose shading, facial hair and glasses, recorded as
attributes, drawn from a child stream (no other draw of the avatar moves) and absent from the captions."""

import numpy as np
import torch

import avatar_core.data.appearance as A
from avatar_core.body import load_body_model
from avatar_core.data.captions import make_captions


def test_face_features_recorded_independent_and_not_captioned(monkeypatch):
    faces = [A.sample_attributes(np.random.default_rng([0, i])) for i in range(40)]
    kinds = {f["face"]["facial_hair"] for f in faces} | {f["face"]["glasses"] for f in faces}
    assert {"none", "round", "square"} & kinds and len({f["face"]["lip_fullness"] for f in faces}) > 1
    assert all(f["face"]["facial_hair"] == "none" for f in faces if f["gender"] == "woman")
    monkeypatch.setattr(A, "sample_face", lambda rng, gender: {})
    for i, f in enumerate(faces):
        g = A.sample_attributes(np.random.default_rng([0, i]))
        assert {k: v for k, v in f.items() if k != "face"} == {k: v for k, v in g.items() if k != "face"}
        f.setdefault("body_words", {"stature": "", "build": "", "age": "young"})
        g.setdefault("body_words", {"stature": "", "build": "", "age": "young"})
        assert make_captions(f) == make_captions(g)


def test_glasses_and_beard_are_painted():
    painter = A.TexturePainter(load_body_model("anny"), 256)
    base = A.sample_attributes(np.random.default_rng([1, 0]))
    base["gender"] = "man"
    plain = {**base, "face": {**base["face"], "facial_hair": "none", "glasses": "none"}}
    styled = {**base, "face": {**base["face"], "facial_hair": "beard", "glasses": "round", "glasses_colour": "black"}}
    tex0, seg0 = painter.paint(plain, np.random.default_rng(0))
    tex1, seg1 = painter.paint(styled, np.random.default_rng(0))
    for name in ("glasses", "facial_hair"):
        label = A.SEGMENT_NAMES.index(name)
        assert int((seg1 == label).sum()) > 20 and int((seg0 == label).sum()) == 0
    assert torch.equal(tex0[seg1 == A.SEGMENT_NAMES.index("shirt")], tex1[seg1 == A.SEGMENT_NAMES.index("shirt")])
