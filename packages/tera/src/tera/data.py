"""The synthetic avatar dataset (avatar_core.data) as TeRA needs it: posed multi-view targets and captions.

TeRA's Gaussians live in the body's canonical space (Sec. 3.1); the dataset's avatars are rendered on bodies of
their own shape and pose. Each avatar therefore comes with its posed body (:meth:`TeraDataset.body_output`), and
the canonical Gaussians are skinned onto it before they are compared with the views (as IDOL does with the
SMPL-X parameters of HuGe100K). Captions: the long sentence and the three phrase variants the generator writes
(TeRA's long description plus phrase-level ones).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from avatar_core.body import BodyModel, BodyOutput
from avatar_core.cameras import Cameras
from avatar_core.data.datasets import AvatarDataset
from avatar_core.errors import InputError
from avatar_core.io import load_image


def ensure_dataset(root: str | os.PathLike, num: int, views: int, res: int, uv_res: int, seed: int,
                   body: str = "anny", progress: bool = True) -> Path:
    """The dataset at ``root``, written with ``avatar_core.data.generate_dataset`` when it is missing or short."""
    from avatar_core.data.generate import generate_dataset, is_complete

    root = Path(root)
    if (root / "meta.json").is_file() and all(is_complete(root, i) for i in range(num)):
        return root
    return generate_dataset(root, num=num, views=views, res=res, seed=seed, body=body, uv_res=uv_res,
                            progress=progress)


class TeraDataset:
    """Avatars of a dataset folder: RGBA views + cameras, posed bodies, captions, attributes, UV textures.

    Args:
        root: the dataset folder (``avatar-core make-dataset --out root``).
        image_size: views are resized to this square size (cameras follow).
        max_avatars: keep only the first N avatars (0: all).
        view_cache, body_cache: how many avatars' decoded views / posed bodies stay in memory (least recently
            used ones are dropped and read again when needed), so memory does not grow with the dataset.
    """

    def __init__(self, root: str | os.PathLike, image_size: int | None = None, max_avatars: int = 0,
                 view_cache: int = 64, body_cache: int = 64):
        self.base = AvatarDataset(root)
        self.root = self.base.root
        n = len(self.base) if max_avatars <= 0 else min(max_avatars, len(self.base))
        self.dirs = self.base.dirs[:n]
        self.ids = [d.name for d in self.dirs]
        self.image_size = int(image_size or self.base.settings["res"])
        self.num_views = int(self.base.settings["views"])
        self._bodies: OrderedDict[int, BodyOutput] = OrderedDict()
        self._views: OrderedDict[int, tuple[Tensor, Cameras]] = OrderedDict()
        self._sizes = {"views": int(view_cache), "bodies": int(body_cache)}

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, avatar_id: str) -> int:
        try:
            return self.ids.index(avatar_id)
        except ValueError:
            raise InputError(f"avatar {avatar_id!r} is not in {self.root}", f"use one of {self.ids[:8]}...") from None

    def attributes(self, i: int) -> dict[str, Any]:
        return self.base.attributes(i)

    def captions(self, i: int) -> list[str]:
        """The long caption and the phrase-level ones (five in datasets written since TeRA's counts)."""
        a = self.attributes(i)
        return [a["caption"], *a["phrases"]]

    def texture(self, i: int) -> Tensor:  # [R, R, 3]
        return load_image(self.dirs[i] / "texture.png")[..., :3]

    def _all_views(self, i: int) -> tuple[Tensor, Cameras]:
        if i in self._views:
            self._views.move_to_end(i)
            return self._views[i]
        out = self._read_views(i)
        _remember(self._views, i, out, self._sizes["views"])
        return out

    def _read_views(self, i: int) -> tuple[Tensor, Cameras]:
        cams = self.base.cameras(i)
        frames = cams["views"]
        rgba = torch.stack([load_image(self.dirs[i] / f["file"]) for f in frames])  # [V, H, W, 4]
        cameras = Cameras(torch.tensor([f["viewmat"] for f in frames]), torch.tensor([f["K"] for f in frames]),
                          cams["width"], cams["height"])
        s = self.image_size
        if (cameras.width, cameras.height) != (s, s):
            # Premultiplied area resize keeps edges right; colour is divided back by the resized alpha.
            pm = torch.cat([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], -1).permute(0, 3, 1, 2)
            pm = F.interpolate(pm, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            a = pm[:, 3:].clamp(0, 1)
            rgb = (pm[:, :3] / a.clamp_min(1e-6)).clamp(0, 1)
            rgba = torch.cat([rgb, a], 1).permute(0, 2, 3, 1)
            cameras = cameras.resized(s, s)
        return rgba.float(), cameras

    def views(self, i: int, which: list[int] | None = None) -> tuple[Tensor, Cameras]:
        """RGBA views ``[V, H, W, 4]`` in [0, 1] (not premultiplied) and their cameras."""
        rgba, cams = self._all_views(i)
        if which is None:
            return rgba, cams
        idx = torch.as_tensor(which, dtype=torch.long)
        return rgba[idx], Cameras(cams.viewmats[idx], cams.Ks[idx], cams.width, cams.height)

    def body_params(self, i: int) -> dict[str, Tensor]:
        return self.base.body(i)

    def body_output(self, i: int, body: BodyModel) -> BodyOutput:
        """Avatar ``i``'s posed body (its shape, pose and translation), kept while among the recently used."""
        if i in self._bodies:
            self._bodies.move_to_end(i)
            return self._bodies[i]
        p = self.body_params(i)
        ref = body.template_vertices  # the body's dtype and device (a GPU body takes GPU parameters)
        with torch.no_grad():
            out = body(shape=p["shape"][None].to(ref), pose=p["pose"][None].to(ref),
                       global_orient=p["global_orient"][None].to(ref), transl=p["transl"][None].to(ref))
        _remember(self._bodies, i, out, self._sizes["bodies"])
        return out


def _remember(cache: OrderedDict, key: int, value: Any, size: int) -> None:
    """Keep ``value`` in an LRU ``cache`` of ``size`` entries (0: keep nothing)."""
    if size <= 0:
        return
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)


def training_views(num_views: int, eval_views: list[int]) -> list[int]:
    """View indices used for fitting: all but the held-out ones."""
    keep = [v for v in range(num_views) if v not in set(eval_views)]
    if not keep:
        raise InputError(f"all {num_views} views are held out (data.eval_views={eval_views})",
                         "hold out fewer views")
    return keep


def caption_choice(num_captions: int, seed: int, epoch: int, index: int, variant: str = "random") -> int:
    """Which caption avatar ``index`` trains with in ``epoch``: a pure function of its arguments (exact resume)."""
    if variant == "full":
        return 0
    if variant != "random":
        raise InputError(f"unknown caption variant {variant!r}", "use 'random' or 'full'")
    return int(np.random.default_rng([seed, epoch, index]).integers(num_captions))


__all__ = ["TeraDataset", "caption_choice", "ensure_dataset", "training_views"]
