"""The teacher UV feature store: one file of UV features per avatar in one folder, IDOL's or the fitted teacher's
(the on-disk layout is :mod:`tera.teacher`'s docstring), and the names of the fit's files in it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avatar_core.body import BodyOutput
from avatar_core.cameras import Cameras
from avatar_core.errors import CorruptFileError, InputError, MissingFileError
from avatar_core.io import load_tensors, save_tensors

FEATURE_KEY = "uv_features"
FEATURE_CHANNELS = 32
DECODER_FILE = "decoder.safetensors"
#: The settings the fitted teacher's features were made under (written before the first avatar is fitted).
FIT_SETTINGS_FILE = "fit_settings.json"
FIT_FORMAT = "tera.teacher_fit/1"
#: The joint fit's state after its last finished epoch (features, Adam moments, decoder, its optimizer).
FIT_STATE_FILE = "fit_state.pt"
#: The fitted features' reconstruction through the final decoder, per avatar in fit order (:func:`teacher_consistency`).
CONSISTENCY_FILE = "consistency.json"

#: Views for one avatar: RGBA images ``[V, H, W, 4]`` in [0, 1], their V cameras, and the posed body the
#: views show (None: the canonical body).
ViewsFn = Callable[[str], tuple[Tensor, Cameras] | tuple[Tensor, Cameras, BodyOutput | None]]


class TeacherFeatureStore:
    """A folder of per-avatar teacher UV features in the layout of the module docstring.

    Args:
        root: the folder.
        channels: expected feature channels (IDOL 32).
    """

    def __init__(self, root: str | os.PathLike, channels: int = FEATURE_CHANNELS):
        self.root = Path(root)
        self.channels = channels

    def path(self, avatar_id: str) -> Path | None:
        """The avatar's feature file (safetensors preferred), or None."""
        for suffix in (".safetensors", ".npy"):
            p = self.root / f"{avatar_id}{suffix}"
            if p.is_file():
                return p
        return None

    def exists(self, avatar_id: str) -> bool:
        return self.path(avatar_id) is not None

    def ids(self) -> list[str]:
        """Avatar ids with features, sorted."""
        if not self.root.is_dir():
            return []
        return sorted({p.stem for p in self.root.iterdir()
                       if p.suffix in (".safetensors", ".npy") and p.name != DECODER_FILE})

    def load(self, avatar_id: str) -> Tensor:  # [C, H, W] float32
        """The avatar's features, validated: [channels, H, W], square, finite."""
        path = self.path(avatar_id)
        if path is None:
            raise MissingFileError(
                f"no teacher UV features for avatar {avatar_id!r} in {self.root} "
                f"(looked for {avatar_id}.safetensors and {avatar_id}.npy)",
                "fit them with `tera fit-teacher` (the project's own teacher), or export IDOL's features as "
                f"{self.root}/<avatar_id>.safetensors with key '{FEATURE_KEY}' [{self.channels}, H, W]")
        if path.suffix == ".npy":
            try:
                feats = torch.from_numpy(np.load(path, allow_pickle=False))
            except (OSError, ValueError) as exc:
                raise CorruptFileError(f"cannot read teacher features {path}: {exc}",
                                       "re-export the file as a plain [C, H, W] float array") from exc
        else:
            tensors, _ = load_tensors(path)
            if FEATURE_KEY not in tensors:
                raise CorruptFileError(f"{path} has no '{FEATURE_KEY}' tensor (keys: {sorted(tensors)})",
                                       f"store the features under the key '{FEATURE_KEY}'")
            feats = tensors[FEATURE_KEY]
        return self._validate(feats, path)

    def _validate(self, feats: Tensor, path: Path) -> Tensor:
        if not feats.is_floating_point():
            raise CorruptFileError(f"{path}: features have dtype {feats.dtype}, expected float16/32",
                                   "store the encoder's float output")
        if feats.dim() == 4 and feats.shape[0] == 1:
            feats = feats[0]
        if feats.dim() != 3 or feats.shape[0] != self.channels:
            hint = ("the file looks channels-last: transpose it to [C, H, W]"
                    if feats.dim() == 3 and feats.shape[-1] == self.channels else
                    f"IDOL's features are [{self.channels}, 1536, 1536]; check the export")
            raise CorruptFileError(f"{path}: features have shape {tuple(feats.shape)}, expected "
                                   f"[{self.channels}, H, W]", hint)
        if feats.shape[1] != feats.shape[2]:
            raise CorruptFileError(f"{path}: UV features must be square, got {feats.shape[1]}x{feats.shape[2]}",
                                   "export the full UV map")
        feats = feats.float()
        if not torch.isfinite(feats).all():
            raise CorruptFileError(f"{path}: features contain NaN or infinite values", "re-run the encoder / fit")
        return feats

    def save(self, avatar_id: str, features: Tensor, metadata: dict | None = None,
             dtype: torch.dtype = torch.float16) -> Path:
        """Write ``features [C, H, W]`` as ``<avatar_id>.safetensors`` (atomically)."""
        if features.dim() != 3 or features.shape[0] != self.channels:
            raise InputError(f"features must be [{self.channels}, H, W], got {tuple(features.shape)}",
                             "save one avatar's UV feature map")
        self.root.mkdir(parents=True, exist_ok=True)
        return save_tensors(self.root / f"{avatar_id}.safetensors", {FEATURE_KEY: features.detach().to(dtype)},
                            metadata or {})




__all__ = ["CONSISTENCY_FILE", "DECODER_FILE", "FEATURE_CHANNELS", "FEATURE_KEY", "FIT_FORMAT", "FIT_SETTINGS_FILE",
           "FIT_STATE_FILE", "TeacherFeatureStore", "ViewsFn"]
