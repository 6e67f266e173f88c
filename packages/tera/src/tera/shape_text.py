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

__all__ = ["ShapeHead", "fit_shape_head", "pooled", "shape_words"]


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


def shape_words(body, shape: Tensor) -> dict[str, str]:
    """The stature / build / age words the dataset's captions would give a body of ``shape`` ``[S]`` (Anny's
    phenotype: gender, age, muscle, weight, height, proportions), from its measured standing height."""
    names = list(body.shape_names)
    s = shape.detach().float().cpu().clamp(0, 1)
    with torch.no_grad():
        v = body(shape=s[None].to(body.template_vertices))
    height = float(v.vertices[0, :, 1].max() - v.vertices[0, :, 1].min())
    p = {n: float(s[i]) for i, n in enumerate(names)}
    years = float(np.interp(p["age"], _AGE_ANNY, _AGE_YEARS))
    attrs = {"gender": "woman" if p["gender"] >= 0.5 else "man", "phenotype": p, "age_years": years}
    return {**describe_body(attrs, height), "height_m": f"{height:.3f}"}
