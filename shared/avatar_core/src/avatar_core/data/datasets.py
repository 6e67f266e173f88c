"""Torch ``Dataset`` views of a synthetic avatar folder, one per use.

* :class:`MultiViewDataset` -- calibrated views, masks and cameras (GaussianIP, GAS, RodinHD fitting).
* :class:`PortraitDataset` -- the front portrait as input with the avatar's views and texture as targets
  (RodinHD's portrait-conditioned diffusion).
* :class:`CaptionDataset` -- caption variants with the UV texture and attribute targets (TeRA).

Images are float ``[H, W, C]`` in ``[0, 1]`` (channels last, :mod:`avatar_core.conventions`); masks are the
renders' alpha. Every item is a dict of tensors, strings and ints, so torch's default collate batches it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from avatar_core.data.appearance import GARMENT_COLOURS, HAIR_COLOURS, HAIR_STYLES, SKIN_TONES
from avatar_core.data.generate import FORMAT
from avatar_core.errors import CorruptFileError, InputError, MissingFileError
from avatar_core.io import load_image, load_tensors

_HINT = "create one with `avatar-core make-dataset --out DIR --num N`, or pass the folder that holds meta.json"


class AvatarDataset(Dataset):
    """The complete avatars of a dataset folder (validated on construction)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"dataset folder not found: {self.root}", _HINT)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise MissingFileError(f"{self.root} is not an avatar dataset (no meta.json)", _HINT)
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CorruptFileError(f"{meta_path} is not valid JSON ({e})", "regenerate the dataset") from e
        if self.meta.get("format") != FORMAT:
            raise CorruptFileError(f"{self.root} holds format {self.meta.get('format')!r}, expected {FORMAT!r}",
                                   "regenerate it with this version's `avatar-core make-dataset`")
        avatars = self.root / "avatars"
        self.dirs = sorted(p for p in avatars.iterdir() if p.is_dir() and not p.name.startswith(".")
                           and (p / "attributes.json").is_file()) if avatars.is_dir() else []
        if not self.dirs:
            raise MissingFileError(f"{self.root} has no complete avatars yet",
                                   "run (or finish) `avatar-core make-dataset` for this folder")
        self.settings = self.meta["settings"]

    def __len__(self) -> int:
        return len(self.dirs)

    def attributes(self, i: int) -> dict[str, Any]:
        """Avatar ``i``'s attributes, caption and phrases."""
        return json.loads((self.dirs[i] / "attributes.json").read_text())

    def cameras(self, i: int) -> dict[str, Any]:
        return json.loads((self.dirs[i] / "cameras.json").read_text())

    def body(self, i: int) -> dict[str, Tensor]:
        """Body parameters: shape, pose, global_orient, transl, joints, keypoints."""
        return load_tensors(self.dirs[i] / "body.safetensors")[0]

    def _views(self, i: int, which: list[int] | None) -> dict[str, Tensor]:
        cams = self.cameras(i)
        frames = cams["views"] if which is None else [cams["views"][k] for k in which]
        rgba = torch.stack([load_image(self.dirs[i] / f["file"]) for f in frames])  # [V, H, W, 4]
        return {
            "images": rgba[..., :3] * rgba[..., 3:],  # black background, premultiplied
            "masks": rgba[..., 3],
            "viewmats": torch.tensor([f["viewmat"] for f in frames]),
            "Ks": torch.tensor([f["K"] for f in frames]),
        }

    def _texture(self, i: int) -> dict[str, Tensor]:
        tex = load_image(self.dirs[i] / "texture.png")[..., :3]
        seg = torch.from_numpy(np.asarray(Image.open(self.dirs[i] / "segments.png"), dtype=np.int64))
        return {"texture": tex, "segments": seg, "uv_mask": seg > 0}

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"avatar {i} out of range for {len(self)} avatars")
        return {"index": int(self.dirs[i].name)}


class MultiViewDataset(AvatarDataset):
    """Item: ``images [V, H, W, 3]``, ``masks [V, H, W]``, ``viewmats [V, 4, 4]``, ``Ks [V, 3, 3]`` and the
    body parameters (``shape``, ``pose``, ``global_orient``, ``transl``, ``joints``, ``keypoints``)."""

    def __init__(self, root: str | os.PathLike, views: list[int] | None = None):
        super().__init__(root)
        if views is not None:
            bad = [v for v in views if not 0 <= v < self.settings["views"]]
            if bad:
                raise InputError(f"views {bad} do not exist; the dataset has {self.settings['views']} per avatar",
                                 f"pick indices in [0, {self.settings['views']})")
        self.views = views

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = super().__getitem__(i)
        return {**item, **self._views(i, self.views), **self.body(i)}


class PortraitDataset(AvatarDataset):
    """Item: ``portrait [H, W, 3]`` (on black), ``portrait_mask``, its camera, and the targets: the
    avatar's views, masks, cameras and UV texture."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = super().__getitem__(i)
        cams = self.cameras(i)["portrait"]
        p = load_image(self.dirs[i] / cams["file"])
        return {
            **item,
            "portrait": p[..., :3] * p[..., 3:],
            "portrait_mask": p[..., 3],
            "portrait_viewmat": torch.tensor(cams["viewmat"]),
            "portrait_K": torch.tensor(cams["K"]),
            **self._views(i, None),
            **self._texture(i),
        }


#: Categorical attribute targets of :class:`CaptionDataset` and their classes.
ATTRIBUTE_CLASSES: dict[str, tuple[str, ...]] = {
    "gender": ("man", "woman"),
    "skin_tone": tuple(SKIN_TONES),
    "hair_style": HAIR_STYLES,
    "hair_colour": tuple(HAIR_COLOURS),
    "top_type": ("shirt", "jacket", "dress"),
    "top_colour": tuple(GARMENT_COLOURS),
    "bottom_type": ("none", "trousers", "shorts", "skirt"),
    "bottom_colour": ("none",) + tuple(GARMENT_COLOURS),
}


def attribute_targets(attributes: dict[str, Any]) -> dict[str, int]:
    """Class indices (see :data:`ATTRIBUTE_CLASSES`) of an avatar's main attributes."""
    gs = attributes["garments"]
    top = gs[0]  # a jacket, a shirt or a dress comes first
    bottom = next((g for g in gs if g["type"] in ("trousers", "shorts", "skirt")), None)
    values = {
        "gender": attributes["gender"], "skin_tone": attributes["skin_tone"],
        "hair_style": attributes["hair"]["style"], "hair_colour": attributes["hair"]["colour"],
        "top_type": top["type"], "top_colour": top["colour"],
        "bottom_type": bottom["type"] if bottom else "none", "bottom_colour": bottom["colour"] if bottom else "none",
    }
    return {k: ATTRIBUTE_CLASSES[k].index(v) for k, v in values.items()}


class CaptionDataset(AvatarDataset):
    """Item: ``caption`` (one text, chosen by ``variant``), ``captions`` (the full caption and the three
    phrases), ``texture [R, R, 3]``, ``segments [R, R]``, ``uv_mask [R, R]`` and integer attribute targets.

    ``variant``: ``"full"`` (the sentence), ``"random"`` (any of the four, drawn with ``seed`` and the
    index, so epochs differ only through ``set_epoch``), or an index 0-3.
    """

    def __init__(self, root: str | os.PathLike, variant: str | int = "random", seed: int = 0):
        super().__init__(root)
        if variant not in ("full", "random") and variant not in (0, 1, 2, 3):
            raise InputError(f"unknown caption variant {variant!r}", "use 'full', 'random' or 0-3")
        self.variant, self.seed, self.epoch = variant, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = super().__getitem__(i)
        attrs = self.attributes(i)
        texts = [attrs["caption"], *attrs["phrases"]]
        if self.variant == "full":
            k = 0
        elif self.variant == "random":
            k = int(np.random.default_rng([self.seed, self.epoch, item["index"]]).integers(len(texts)))
        else:
            k = int(self.variant)
        return {**item, "caption": texts[k], "captions": texts, **self._texture(i),
                "targets": attribute_targets(attrs)}
