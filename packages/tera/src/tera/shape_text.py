"""Body shape from text: a small head on the text condition that predicts the body model's shape vector, and the
words a shape reads as (stature, build, age group), to measure generated shape against the asked words.

Why a head on the text rather than shape channels in the latent: the UV latent is the avatar's appearance on
the canonical body (stage 1 skins it onto each avatar's own body), and its caches (teacher features, latents,
their statistics) are all keyed without shape. A head on the pooled token states the diffusion model already
reads needs none of them to change, trains in seconds on the cached caption states and the dataset's body
parameters, and gives one shape per prompt that generation, animation and evaluation can pose the decoded
Gaussians on (:func:`tera.animate.reshape_gaussians`). Shape is then a function of the text only (not of the
sampled appearance), which is what a caption's "tall" / "heavy-set" / "elderly" asks for.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from avatar_core.data.appearance import _AGE_ANNY, _AGE_YEARS, describe_body
from tera.text import TextCondition

__all__ = ["SHAPE_HEAD_FILE", "ShapeHead", "fit_shape_head", "gaussian_height", "load_shape_head", "parse_shape_words",
           "pooled", "shape_table", "shape_words", "train_shape_head"]


def pooled(cond: TextCondition) -> Tensor:  # [B, L, D] -> [B, D]: mean over the real tokens
    m = cond.mask.to(cond.states.dtype)[..., None]
    return (cond.states * m).sum(1) / m.sum(1).clamp_min(1.0)


class ShapeHead(nn.Module):
    """Pooled token states ``[B, D]`` -> body shape vector ``[B, S]`` (a two-layer MLP)."""

    def __init__(self, text_dim: int, shape_dim: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, shape_dim))

    def forward(self, cond: TextCondition) -> Tensor:
        return self.net(pooled(cond).float())


def fit_shape_head(head: ShapeHead, cond: TextCondition, shapes: Tensor, steps: int = 300, lr: float = 3e-3,
                   batch: int = 64, seed: int = 0) -> list[float]:
    """Fit ``head`` to map each caption's states (``cond``, N captions) to its avatar's shape ``[N, S]`` (MSE)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(shapes), (min(batch, len(shapes)),), generator=g)
        loss = torch.nn.functional.mse_loss(head(TextCondition(cond.states[idx], cond.mask[idx])), shapes[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def gaussian_height(means: Tensor) -> float:  # [N, 3] -> the vertical (y) extent of an avatar's Gaussian centres
    return float(means[:, 1].max() - means[:, 1].min())


def shape_words(body, shape: Tensor, height: float | None = None) -> dict[str, str]:
    """The stature / build / age words the dataset's captions would give a body of ``shape`` ``[S]`` (Anny's
    phenotype: gender, age, muscle, weight, height, proportions), from its standing height: ``height`` (metres,
    e.g. a generated avatar's :func:`gaussian_height`) or, when None, the height of the body mesh of ``shape``."""
    names = list(body.shape_names)
    s = shape.detach().float().cpu().clamp(0, 1)
    if height is None:
        with torch.no_grad():
            v = body(shape=s[None].to(body.template_vertices))
        height = float(v.vertices[0, :, 1].max() - v.vertices[0, :, 1].min())
    p = {n: float(s[i]) for i, n in enumerate(names)}
    years = float(np.interp(p["age"], _AGE_ANNY, _AGE_YEARS))
    attrs = {"gender": "woman" if p["gender"] >= 0.5 else "man", "phenotype": p, "age_years": years}
    return {**describe_body(attrs, height), "height_m": f"{height:.3f}"}


SHAPE_HEAD_FILE = "shape_head.safetensors"
SHAPE_HEAD_FORMAT = "tera.shape_head/1"


def train_shape_head(text_cache, ids, ds, text_dim: int, steps: int = 400, seed: int = 0,
                     max_avatars: int | None = 4096) -> tuple[ShapeHead, dict]:
    """Fit a :class:`ShapeHead` on stage 2's cached caption states (every caption of a seeded subset of at most
    ``max_avatars`` avatars, pooled, so memory is ``captions x D``) against each avatar's body shape."""
    from avatar_core.data.stats import seeded_subset

    index = {a: i for i, a in enumerate(ds.ids)}
    chosen = [ids[i] for i in seeded_subset(len(ids), max_avatars or None, seed)]
    feats, shapes = [], []
    for a in chosen:
        item = text_cache.get(a)
        feats.append(pooled(TextCondition(item["states"].float(), item["mask"].bool())))  # [K, D]
        shapes.append(ds.body_params(index[a])["shape"].float().expand(feats[-1].shape[0], -1))
    x, y = torch.cat(feats), torch.cat(shapes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = ShapeHead(text_dim, y.shape[1])
    # Pooled vectors as one-token conditions: the head pools them to themselves.
    losses = fit_shape_head(head, TextCondition(x[:, None], torch.ones(len(x), 1, dtype=torch.bool)), y,
                            steps=steps, seed=seed)
    info = {"format": SHAPE_HEAD_FORMAT, "text_dim": text_dim, "shape_dim": int(y.shape[1]), "hidden": 128,
            "avatars": len(chosen), "captions": len(x), "final_loss": float(np.mean(losses[-20:]))}
    return head.eval(), info


_WORDS = {"stature": ("tall", "short"), "build": ("heavy-set", "slim", "muscular"),
          "age": ("young", "middle-aged", "elderly")}


def parse_shape_words(prompt: str) -> dict[str, str]:
    """The stature / build / age words a prompt asks for ('' where it names none, which asks for the middle)."""
    words = prompt.lower().replace(",", " ").split()
    return {k: next((w for w in words if w in options), "") for k, options in _WORDS.items()}


def load_shape_head(folder) -> ShapeHead | None:
    """The run's shape head (``<diffusion>/shape_head.safetensors``), or None for runs trained before it."""
    from pathlib import Path

    from avatar_core.io import load_tensors

    path = Path(folder) / SHAPE_HEAD_FILE
    if not path.is_file():
        return None
    tensors, info = load_tensors(path)
    head = ShapeHead(int(info["text_dim"]), int(info["shape_dim"]), int(info["hidden"]))
    head.load_state_dict(tensors)
    return head.eval()


@torch.no_grad()
def shape_table(head: ShapeHead, text, body, prompts, baseline_shape: Tensor, generate=None) -> dict:
    """Per prompt the asked and generated words; per word kind the match rate of the head's shape (its body mesh),
    of one fixed ``baseline_shape`` (the training mean) and, with ``generate``, of the generated avatars.

    ``generate(prompt) -> (shape [S], Gaussian centres [N, 3])`` makes the avatar the way ``tera generate``
    does (shape from the prompt, Gaussians decoded on that body); its words read the build and age from the
    stored shape and the stature from the measured height of the decoded Gaussians (:func:`gaussian_height`)."""
    kinds = ("head", "mean_shape") + (("avatar",) if generate is not None else ())
    rows, hits = [], {kind: {k: [] for k in _WORDS} for kind in kinds}
    fixed = shape_words(body, baseline_shape)
    for prompt in prompts:
        asked = parse_shape_words(prompt)
        got = {"head": shape_words(body, head(text([prompt]))[0]), "mean_shape": fixed}
        row = {"prompt": prompt, "asked": asked, "generated": got["head"]}
        if generate is not None:
            shape, means = generate(prompt)
            got["avatar"] = shape_words(body, shape, gaussian_height(means))
            row["avatar"] = got["avatar"]
        rows.append(row)
        for kind in kinds:
            for k in _WORDS:
                hits[kind][k].append(float(got[kind][k] == asked[k]))
    return {"per_prompt": rows, **{kind: {k: float(np.mean(v)) for k, v in h.items()} for kind, h in hits.items()}}
