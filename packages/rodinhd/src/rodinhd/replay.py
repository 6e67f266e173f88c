"""Task replay and identity-aware weight consolidation (RodinHD Sec. 3.1, Algorithm 1, Eq. 3): the visit schedule,
the learning-rate rules and the loss terms that :func:`rodinhd.fitting.fit_shared` runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from avatar_core.errors import InputError

__all__ = ["Visit", "decoder_lr_at", "fisher_diagonal", "iwc_penalty", "task_replay_schedule", "triplane_lr_at",
           "tv_loss"]


@dataclass(frozen=True)
class Visit:
    """One visit of Algorithm 1's outer loop: avatar ``avatar_id`` in pass ``loop`` for ``iterations`` steps."""

    index: int
    loop: int
    avatar_id: str
    iterations: int


def task_replay_schedule(
    avatar_ids: Sequence[str],
    outer_loops: int,
    inner_iterations: int,
    shuffle: bool = False,
    seed: int = 0,
) -> list[Visit]:
    """Task replay (Sec. 3.1): ``outer_loops`` passes over all avatars, ``inner_iterations`` steps a visit.

    ``outer_loops=1`` with all iterations in one visit is the naive sequential fitting. ``shuffle`` reorders the
    avatars in each pass (seeded), the authors' code visits them in order.
    """
    if outer_loops < 1 or inner_iterations < 1:
        raise InputError(f"outer_loops and inner_iterations must be >= 1, got {outer_loops}, {inner_iterations}",
                         "set both to positive integers")
    if len(avatar_ids) == 0:
        raise InputError("task replay needs at least one avatar", "pass the avatar ids to fit")
    if len(set(avatar_ids)) != len(avatar_ids):
        raise InputError("avatar ids are not unique", "remove duplicate ids")
    visits, g = [], torch.Generator().manual_seed(seed)
    for loop in range(outer_loops):
        order = torch.randperm(len(avatar_ids), generator=g).tolist() if shuffle else range(len(avatar_ids))
        for s in order:
            visits.append(Visit(len(visits), loop, str(avatar_ids[s]), inner_iterations))
    return visits


def triplane_lr_at(loop: int, base: float = 2e-2, loop_decay: float = 10.0) -> float:
    """Triplane learning rate in outer loop ``loop`` (authors' code): ``base / (loop_decay * loop + 1)``."""
    return base / (loop_decay * loop + 1.0)


def decoder_lr_at(step: int, inner_iterations: int, base: float = 2e-3, decay_visits: float = 50.0) -> float:
    """Decoder learning rate at global step ``step`` (authors' code): ``base * 0.1^(step / (decay_visits * inner))``."""
    return base * 0.1 ** (step / (decay_visits * inner_iterations))


def tv_loss(planes: Tensor) -> Tensor:  # [3, C, H, W] -> scalar
    """Total variation of the planes: mean squared difference of neighbouring texels along H and W."""
    dh = (planes[..., 1:, :] - planes[..., :-1, :]).pow(2).mean()
    dw = (planes[..., :, 1:] - planes[..., :, :-1]).pow(2).mean()
    return dh + dw


def iwc_penalty(
    params: dict[str, Tensor],
    fisher: dict[str, Tensor],
    snapshot: dict[str, Tensor],
    weight: float,
    half: bool = True,
) -> Tensor:
    """Identity-aware weight consolidation (Eq. 3): ``weight/2 * sum_i Omega_i (w_i - w*_i)^2``.

    Its gradient is ``weight * Omega * (w - w*)``; ``half=False`` drops the 1/2 as the authors' code does.
    """
    scale = weight / 2.0 if half else weight
    total = None
    for name, p in params.items():
        term = (fisher[name] * (p - snapshot[name]).pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        raise InputError("IWC penalty over no parameters", "pass the decoder's consolidated parameters")
    return scale * total


def fisher_diagonal(loss: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diagonal Fisher estimate ``(d loss / d w)^2`` per parameter (Algorithm 1, line 9), graph kept."""
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return {n: (g.detach() ** 2 if g is not None else torch.zeros_like(p))
            for (n, p), g in zip(params.items(), grads)}
