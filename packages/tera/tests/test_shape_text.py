"""Body shape from text: pooling over real tokens only, the head fits caption -> shape, and the words a shape
reads as follow the measured body (taller phenotype -> taller body -> 'tall')."""

from __future__ import annotations

import torch

from avatar_core.body import load_body_model
from tera.shape_text import ShapeHead, fit_shape_head, pooled, shape_words
from tera.text import TextCondition


def test_pooling_ignores_padding_and_the_head_fits():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(4, 7, 16, generator=g)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[:, 5:] = False
    other = states.clone()
    other[:, 5:] = 100.0  # padded tokens changed: the pooled vector is not
    torch.testing.assert_close(pooled(TextCondition(states, mask)), pooled(TextCondition(other, mask)))
    torch.testing.assert_close(pooled(TextCondition(states, mask)), states[:, :5].mean(1))
    targets = torch.rand(4, 6, generator=g)
    head = ShapeHead(16, 6, hidden=32)
    losses = fit_shape_head(head, TextCondition(states, mask), targets, steps=300, lr=1e-2)
    assert losses[-1] < 0.02 * losses[0]


def test_shape_words_follow_the_measured_body():
    body = load_body_model("anny")
    base = torch.tensor([0.0, 0.8, 0.5, 0.5, 0.5, 0.5])  # a man of about 40 (Anny's gender, age, ..., height)
    short, tall = base.clone(), base.clone()
    short[4], tall[4] = 0.0, 1.0
    ws, wt = shape_words(body, short), shape_words(body, tall)
    assert float(wt["height_m"]) > float(ws["height_m"]) + 0.1
    assert (ws["stature"], wt["stature"]) == ("short", "tall")
    heavy, slim = base.clone(), base.clone()
    heavy[3], slim[3] = 0.9, 0.1
    assert (shape_words(body, heavy)["build"], shape_words(body, slim)["build"]) == ("heavy-set", "slim")
    old = base.clone()
    old[1] = 0.95
    assert shape_words(body, old)["age"] == "elderly" and shape_words(body, base)["age"] == "middle-aged"
