"""Temporal tiling for sequences longer than the video model's frame count (GAS's official ``tile`` option).

A sequence of ``N`` frames is covered by tiles of ``T`` frames: every tile holds frame 0 (the frame at the
reference, which anchors appearance) plus ``T - 1`` consecutive frames; consecutive tiles start
``T - overlap`` frames apart and one extra tile is placed flush with the end. At every denoising step each tile is
denoised on its own and the predictions are blended per frame with triangular weights
``w_k = min((k + 0.5) 2 / T, 2 - (k + 0.5) 2 / T)`` of the frame's position ``k`` in the tile, normalised so the
weights of every frame sum to one. A sequence that fits one tile is one tile, so the result is exactly the untiled
model's (tested). The official demo sets ``T = N = 20``, so it never tiles.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from avatar_core.errors import InputError


def tile_indices(num_frames: int, tile: int, overlap: int) -> list[Tensor]:
    """Frame indices of every tile (each ``[min(tile, num_frames)]``, frame 0 first)."""
    if num_frames < 1 or tile < 2:
        raise InputError(f"need num_frames >= 1 and tile >= 2, got {num_frames} and {tile}",
                         "use the model's frame count as the tile size")
    if not 0 <= overlap < tile - 1:
        raise InputError(f"overlap {overlap} must be in [0, tile - 1) = [0, {tile - 1})",
                         "e.g. overlap = tile // 4")
    if num_frames <= tile:
        return [torch.arange(num_frames)]
    body = tile - 1  # frames 1..N-1 are tiled; frame 0 joins every tile
    n = num_frames - 1
    stride = body - overlap
    starts = list(range(0, n - body + 1, stride))
    if starts[-1] + body < n:
        starts.append(n - body)  # the extra tile flush with the end
    return [torch.cat([torch.zeros(1, dtype=torch.long), 1 + s + torch.arange(body)]) for s in starts]


def tile_weights(length: int) -> Tensor:  # [length]
    """Triangular blending weights of positions 0..length-1 in a tile (positive, peak in the middle)."""
    k = torch.arange(length, dtype=torch.float64) + 0.5
    return torch.minimum(k * 2 / length, 2 - k * 2 / length)


def blend_weights(num_frames: int, tiles: list[Tensor]) -> list[Tensor]:
    """Per tile, the normalised weight of each of its frames; the weights of every frame sum to one."""
    total = torch.zeros(num_frames, dtype=torch.float64)
    raw = [tile_weights(len(t)) for t in tiles]
    for t, w in zip(tiles, raw):
        total.index_add_(0, t, w)
    return [w / total[t] for t, w in zip(tiles, raw)]


def tiled(fn: Callable[[Tensor], Tensor], num_frames: int, tile: int, overlap: int,
          frame_dim: int = 1) -> Tensor:
    """Blend ``fn(frame_indices) -> prediction`` (frames along ``frame_dim``) over the tiles of a sequence."""
    tiles = tile_indices(num_frames, tile, overlap)
    weights = blend_weights(num_frames, tiles)
    out = None
    for idx, w in zip(tiles, weights):
        pred = fn(idx)
        if pred.shape[frame_dim] != len(idx):
            raise InputError(f"the tile function returned {pred.shape[frame_dim]} frames for {len(idx)}")
        shape = [1] * pred.ndim
        shape[frame_dim] = len(idx)
        contrib = pred * w.to(pred.dtype).to(pred.device).reshape(shape)
        if out is None:
            full = list(pred.shape)
            full[frame_dim] = num_frames
            out = pred.new_zeros(full)
        out = out.index_add(frame_dim, idx.to(pred.device), contrib)
    return out
