"""The body-anchored branch as dense 3D convolution: a replacement for SHERF's spconv network that runs anywhere.

SHERF voxelises the visible body vertices' pixel features (5 mm voxels) into a sparse tensor and runs a 4-level
sparse conv net (``spconv``'s ``SubMConv3d`` / strided ``SparseConv3d``, CUDA only); it then densifies each level
and samples it trilinearly at the query points. Here the grid is dense from the start:

* ``masked=True`` ("submanifold"): after every stride-1 conv the output is multiplied by the level's active-site
  mask, so inactive voxels stay exactly zero as in a submanifold sparse conv (a sparse conv sums over active
  neighbours only, and the inactive ones hold zeros here); a strided conv's active set is the max-pool of the
  finer one (spconv's ``SparseConv3d`` rule). Normalisation is per-site (GroupNorm over channels, one group per
  site is what a LayerNorm is), so statistics never mix active and inactive sites. This reproduces spconv's
  outputs at the active sites; the cost is memory and compute on the whole box instead of the active sites.
* ``masked=False`` ("dense"): plain dense convolutions (features spread into empty space).

Both are measured against each other and against no branch in the package README.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _SiteNorm(nn.Module):
    """LayerNorm over channels at every voxel independently (never mixes sites)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, D, H, W]
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class VoxelNet(nn.Module):
    """Multi-level 3D conv net over a dense voxel grid of scattered point features."""

    def __init__(self, in_channels: int, channels: list[int], out_channels: int, masked: bool = True):
        super().__init__()
        self.masked = masked
        self.levels = nn.ModuleList()
        prev = in_channels
        for k, c in enumerate(channels):
            stride = 1 if k == 0 else 2
            self.levels.append(nn.ModuleDict({
                "down": nn.Conv3d(prev, c, 3, stride, 1),
                "conv": nn.Conv3d(c, c, 3, 1, 1),
                "norm1": _SiteNorm(c), "norm2": _SiteNorm(c),
            }))
            prev = c
        self.out = nn.Linear(sum(channels), out_channels)
        self.factor = 2 ** (len(channels) - 1)

    def build(self, points: Tensor, feats: Tensor, lo: Tensor, hi: Tensor, voxel_size: float) -> list[Tensor]:
        """Scatter-mean ``feats [N, C]`` at canonical ``points [N, 3]`` into the box, run the net: per-level volumes."""
        extent = (hi - lo).tolist()
        # Grid dims (x, y, z), multiples of the total stride; torch's [D, H, W] is (z, y, x).
        dims = [max(self.factor, int(round(e / voxel_size / self.factor)) * self.factor) for e in extent]
        cell = (hi - lo) / torch.tensor(dims, dtype=lo.dtype, device=lo.device)
        ijk = ((points - lo) / cell).floor().long()
        for a in range(3):
            ijk[:, a] = ijk[:, a].clamp(0, dims[a] - 1)
        flat = (ijk[:, 2] * dims[1] + ijk[:, 1]) * dims[0] + ijk[:, 0]
        n = dims[0] * dims[1] * dims[2]
        C = feats.shape[1]
        grid = feats.new_zeros(n, C).index_add(0, flat, feats)
        count = feats.new_zeros(n).index_add(0, flat, torch.ones_like(flat, dtype=feats.dtype))
        grid = grid / count.clamp_min(1)[:, None]
        x = grid.T.reshape(1, C, dims[2], dims[1], dims[0])
        mask = (count > 0).to(feats.dtype).reshape(1, 1, dims[2], dims[1], dims[0])
        outs = []
        for k, lvl in enumerate(self.levels):
            if k > 0:
                mask = F.max_pool3d(mask, 3, 2, 1)
            x = self._masked(F.silu(lvl["norm1"](lvl["down"](x))), mask)
            x = self._masked(F.silu(lvl["norm2"](lvl["conv"](x))), mask) + x
            outs.append(x)
        return outs

    def _masked(self, x: Tensor, mask: Tensor) -> Tensor:
        return x * mask if self.masked else x

    def query(self, volumes: list[Tensor], unit: Tensor) -> Tensor:  # unit [N, 3] in [-1, 1] -> [N, out]
        """Trilinear features of every level at canonical points (normalised box coordinates)."""
        grid = unit.reshape(1, -1, 1, 1, 3).to(volumes[0].dtype)  # grid_sample's (x, y, z) = (W, H, D)
        feats = [F.grid_sample(v, grid, align_corners=False)[0, :, :, 0, 0].T for v in volumes]
        return self.out(torch.cat(feats, -1))
