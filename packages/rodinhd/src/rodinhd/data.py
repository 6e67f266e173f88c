"""Adapters from the kernel's synthetic avatar dataset (:mod:`avatar_core.data`) to what RodinHD's modules take.

* :class:`AvatarViews` -- ``get_views(avatar_id) -> (images [V, H, W, 4], Cameras)`` for fitting (straight-alpha
  RGBA in [0, 1]), ``portrait(avatar_id) -> [H, W, 4]``, and the split into training and held-out avatars.
* :func:`load_portrait` -- a user's portrait file, validated (an image, square, RGBA) with errors that say what
  to do.
* :func:`downsample_triplanes` -- the low-resolution triplanes the base model learns (area average per plane).
* :func:`prepare_data` / :func:`open_data` -- a run's dataset (``data.root``, else ``<out>/data``), written when
  missing and opened with its training / held-out split.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from avatar_core.cameras import Cameras
from avatar_core.data import AvatarDataset
from avatar_core.data.stream import ViewsField
from avatar_core.errors import InputError, MissingFileError
from avatar_core.io import load_image

if TYPE_CHECKING:
    from rodinhd.config import RodinHDConfig

__all__ = ["AvatarViews", "load_portrait", "downsample_triplanes", "MIN_PORTRAIT_SIZE", "open_data", "prepare_data"]

#: Smallest portrait side accepted (the three feature scales H/2, H/4, H/8 need at least 8 px per patch row).
MIN_PORTRAIT_SIZE = 32


class AvatarViews:
    """Read access to a dataset folder in the kernel's format, keyed by avatar id (the folder name, ``000012``).

    Args:
        root: the dataset folder (holds ``meta.json``).
        held_out: how many avatars at the end of the sorted ids are kept out of fitting and training.
        views: view indices to use for fitting (None: all).
        cache: how many avatars' views to keep in memory (the fitting loop revisits avatars).
    """

    def __init__(self, root: str | os.PathLike, held_out: int = 0, views: list[int] | None = None, cache: int = 64):
        self.dataset = AvatarDataset(root)  # validates the folder: meta.json, format, complete avatars
        self.root = Path(root)
        self.ids = [d.name for d in self.dataset.dirs]
        if not 0 <= held_out < len(self.ids):
            raise InputError(f"held_out={held_out} leaves no training avatars among {len(self.ids)}",
                             f"use held_out < {len(self.ids)} or generate more avatars (data.num_avatars)")
        self.held_out = int(held_out)
        self.views = views
        self._cache: OrderedDict[str, tuple[Tensor, Cameras]] = OrderedDict()
        self._cache_size = cache

    @property
    def train_ids(self) -> list[str]:
        return self.ids[: len(self.ids) - self.held_out]

    @property
    def held_out_ids(self) -> list[str]:
        return self.ids[len(self.ids) - self.held_out:]

    @property
    def resolution(self) -> int:
        return int(self.dataset.settings["res"])

    def _dir(self, avatar_id: str) -> Path:
        d = self.root / "avatars" / str(avatar_id)
        if str(avatar_id) not in self.ids:
            raise MissingFileError(f"avatar {avatar_id!r} is not in the dataset {self.root}",
                                   f"use one of its ids ({self.ids[0]} ... {self.ids[-1]})")
        return d

    def cameras_json(self, avatar_id: str) -> dict:
        return json.loads((self._dir(avatar_id) / "cameras.json").read_text())

    def get_views(self, avatar_id: str) -> tuple[Tensor, Cameras]:  # images [V, H, W, 4] straight alpha
        """The avatar's calibrated views as fitting targets (:data:`rodinhd.fitting.GetViews`)."""
        aid = str(avatar_id)
        if aid in self._cache:
            self._cache.move_to_end(aid)
            return self._cache[aid]
        self._dir(aid)  # an unknown id is named with the dataset's ids
        v = ViewsField(self.root, self.views)(aid)  # the kernel's reader: cameras.json + RGBA views
        images = v["images"]
        cameras = Cameras(v["viewmats"], v["Ks"], v["width"], v["height"])
        self._cache[aid] = (images, cameras)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return images, cameras

    def portrait_path(self, avatar_id: str) -> Path:
        return self._dir(avatar_id) / self.cameras_json(avatar_id)["portrait"]["file"]

    def portrait(self, avatar_id: str) -> Tensor:  # [H, W, 4]
        """The avatar's RGBA front portrait (the condition of the diffusion models)."""
        return load_portrait(self.portrait_path(avatar_id))


def load_portrait(path: str | os.PathLike) -> Tensor:  # [H, W, 4] float in [0, 1]
    """Read a portrait file and check it is what the conditioning expects: a square RGBA image.

    Raises MissingFileError (no file), CorruptFileError (not an image) or InputError (no alpha, not square,
    too small, fully transparent: nothing to condition on); the portrait is resized to the model's
    ``portrait_size`` later.
    """
    img = load_image(path)  # MissingFileError / CorruptFileError with a hint
    if img.shape[-1] != 4:
        raise InputError(f"portrait {path} has no alpha channel ({img.shape[-1]} channels)",
                         "save the front portrait as an RGBA PNG with a transparent background, like the dataset's "
                         "avatars/NNNNNN/portrait.png")
    h, w = img.shape[:2]
    if h != w:
        raise InputError(f"portrait {path} is {w}x{h} pixels; it must be square",
                         "crop it to a square around the head and shoulders")
    if h < MIN_PORTRAIT_SIZE:
        raise InputError(f"portrait {path} is only {w}x{h} pixels", f"use at least {MIN_PORTRAIT_SIZE}x"
                         f"{MIN_PORTRAIT_SIZE} (the paper uses 256x256)")
    if not (img[..., 3] >= 1 / 255).any():  # composited on white, it would be a blank image
        raise InputError(f"portrait {path} is fully transparent: there is no person to condition on",
                         "pass the RGBA portrait with the person opaque (alpha > 0), or use --unconditional")
    return img


def downsample_triplanes(
    planes: Tensor,  # [N, 3, C, R, R]
    resolution: int,
) -> Tensor:  # [N, 3, C, r, r]
    """Area-average each plane down to ``resolution`` (the base model's low-res targets, Sec. 3.2)."""
    R = planes.shape[-1]
    if resolution == R:
        return planes
    if resolution > R:
        raise InputError(f"base resolution {resolution} exceeds the fitted triplanes' {R}",
                         "set base.resolution <= triplane.resolution")
    x = F.interpolate(rearrange(planes, "n three c h w -> (n three) c h w"), size=(resolution, resolution), mode="area")
    return rearrange(x, "(n three) c h w -> n three c h w", three=3)


def _data_root(cfg: RodinHDConfig, out: Path) -> Path:
    return Path(cfg.data.root) if cfg.data.root else out / "data"


def prepare_data(cfg: RodinHDConfig, out: str | os.PathLike, progress: bool = True) -> Path:
    """Write the synthetic dataset described by ``cfg.data`` unless it is already complete (the generator resumes)."""
    from avatar_core.data import generate_dataset

    root = _data_root(cfg, Path(out))
    d = cfg.data
    return generate_dataset(root, num=d.num_avatars, views=d.views, res=d.res, seed=d.seed, uv_res=d.uv_res,
                            progress=progress)


def open_data(cfg: RodinHDConfig, out: str | os.PathLike) -> AvatarViews:
    """The dataset of this run (``data.root``, else ``<out>/data``), split into training and held-out avatars."""
    root = _data_root(cfg, Path(out))
    if not (root / "meta.json").is_file():
        raise MissingFileError(f"no avatar dataset at {root}",
                               f"run `rodinhd train-all --out {out}` (it writes one), or `avatar-core make-dataset "
                               f"--out {root} --num N`, or set data.root=DIR")
    return AvatarViews(root, held_out=cfg.data.held_out, cache=cfg.data.view_cache)
