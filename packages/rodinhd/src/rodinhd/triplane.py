"""Triplane avatars (RodinHD Sec. 3.1): three planes ``xy, xz, yz`` of ``[C, H, W]``, their roll-out, and an
on-disk store of one safetensors file per avatar.

The roll-out places the three planes side by side, ``[C, H, 3W]`` (``avatar_core.conventions``), the layout the
diffusion models see; :func:`unroll` is its exact inverse.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

from avatar_core.errors import CorruptFileError, InputError, MissingFileError
from avatar_core.io import load_tensors, save_tensors

__all__ = ["rollout", "unroll", "as_planes", "init_triplane", "TriplaneStore"]

#: Tensor name of the planes inside a store file.
PLANES_KEY = "planes"


def rollout(
    planes: Tensor,  # [..., 3, C, H, W]
) -> Tensor:  # [..., C, H, 3W]
    """Planes side by side along the width (xy | xz | yz), the roll-out the diffusion UNet works on."""
    if planes.ndim < 4 or planes.shape[-4] != 3:
        raise InputError(f"triplane must be [..., 3, C, H, W], got {tuple(planes.shape)}",
                         "stack the xy, xz, yz planes on the fourth-to-last dimension")
    return rearrange(planes, "... p c h w -> ... c h (p w)")


def unroll(
    rolled: Tensor,  # [..., C, H, 3W]
) -> Tensor:  # [..., 3, C, H, W]
    """Inverse of :func:`rollout`: split the width into the three planes."""
    if rolled.ndim < 3 or rolled.shape[-1] % 3 != 0:
        raise InputError(f"rolled-out triplane must be [..., C, H, 3W], got {tuple(rolled.shape)}",
                         "the last dimension must hold three planes side by side")
    return rearrange(rolled, "... c h (p w) -> ... p c h w", p=3).contiguous()


def as_planes(
    triplane: Tensor,  # [3, C, H, W] or rolled-out [C, H, 3W]
) -> Tensor:  # [3, C, H, W]
    """One triplane in plane layout, accepting either layout (a 3-dim tensor is taken as a roll-out)."""
    if triplane.ndim == 4 and triplane.shape[0] == 3:
        return triplane
    if triplane.ndim == 3:
        return unroll(triplane)
    raise InputError(f"expected one triplane [3, C, H, W] or [C, H, 3W], got {tuple(triplane.shape)}",
                     "pass a single avatar's triplane (index the batch first)")


def init_triplane(
    channels: int,
    resolution: int,
    std: float = 0.1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:  # [3, C, R, R]
    """A fresh triplane with small Gaussian features, so every cell starts with a little density to grow from.

    Args: channels (paper 32), resolution (paper 512), std of the initial features (0.1).
    """
    return (torch.randn(3, channels, resolution, resolution, generator=generator) * std).to(device)


_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class TriplaneStore:
    """A directory of triplanes, ``<root>/<avatar_id>.safetensors``, each ``[3, C, R, R]`` (Algorithm 1, line 2).

    Args:
        root: directory of the files (created on first save).
        channels: C (paper 32).
        resolution: R (paper 512).

    Every load checks the shape against (channels, resolution) so that a triplane fitted with another
    configuration is refused instead of silently resampled.
    """

    def __init__(self, root: str | Path, channels: int, resolution: int):
        self.root = Path(root)
        self.channels = int(channels)
        self.resolution = int(resolution)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (3, self.channels, self.resolution, self.resolution)

    def path(self, avatar_id: str) -> Path:
        """The file of one avatar."""
        if not _SAFE_ID.match(str(avatar_id)):
            raise InputError(f"avatar id {avatar_id!r} cannot be used as a file name",
                             "use letters, digits, '_', '-' and '.' only")
        return self.root / f"{avatar_id}.safetensors"

    def exists(self, avatar_id: str) -> bool:
        return self.path(avatar_id).is_file()

    def ids(self) -> list[str]:
        """Avatar ids with a stored triplane, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name[: -len(".safetensors")] for p in self.root.glob("*.safetensors"))

    def save(self, avatar_id: str, planes: Tensor, metadata: dict | None = None) -> Path:
        """Write one avatar's triplane (``[3, C, R, R]`` or its roll-out) atomically, with JSON ``metadata``."""
        planes = as_planes(planes.detach())
        self._check(planes.shape, f"triplane for {avatar_id!r}", InputError)
        meta = {"channels": self.channels, "resolution": self.resolution, **(metadata or {})}
        return save_tensors(self.path(avatar_id), {PLANES_KEY: planes.float()}, meta)

    def load(self, avatar_id: str, device: torch.device | str = "cpu") -> Tensor:  # [3, C, R, R]
        """Read one avatar's triplane, checking its shape."""
        return self.load_with_metadata(avatar_id, device)[0]

    def load_with_metadata(self, avatar_id: str, device: torch.device | str = "cpu") -> tuple[Tensor, dict]:
        """Read one avatar's triplane and the metadata stored with it."""
        path = self.path(avatar_id)
        if not path.is_file():
            raise MissingFileError(f"no triplane stored for avatar {avatar_id!r} at {path}",
                                   "fit it first (rodinhd fit-shared / fit), or check the triplane directory")
        tensors, meta = load_tensors(path, device=device)
        if PLANES_KEY not in tensors:
            raise CorruptFileError(f"{path} holds no {PLANES_KEY!r} tensor (found {sorted(tensors)})",
                                   "delete the file and fit this avatar again")
        self._check(tensors[PLANES_KEY].shape, str(path), CorruptFileError)
        return tensors[PLANES_KEY], meta if isinstance(meta, dict) else {}

    def _check(self, shape, what: str, error: type) -> None:
        if tuple(shape) != self.shape:
            raise error(f"{what} has shape {tuple(shape)}, expected {self.shape} (3 planes x C={self.channels} x "
                        f"{self.resolution} x {self.resolution})",
                        "use the triplane channels/resolution it was fitted with, or refit it with this "
                        "configuration into a fresh directory")
