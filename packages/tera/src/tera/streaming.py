"""TeRA's training data streamed from disk (:mod:`avatar_core.data.stream`), and its paper networks or stand-ins.

At the paper's scale (HuGe100K, 100K avatars) the latents alone are 840 GB (32 x 256^2 float32 each) and the CLIP
token states of their captions 95 GB; nothing here holds more than a batch of either:

* stage 1 turns each avatar's teacher UV features into its latent once, into ``distill/latents/<key>/items/``
  (a :class:`~avatar_core.data.cache.FeatureCache` keyed by the teacher files and the latent resolution);
  ``distill/latents.json`` names that folder and the avatars for stage 2;
* stage 2 encodes every avatar's captions once into ``<run_dir>/cache/text_states/<key>/`` (keyed by the text
  encoder's weights and settings and the captions' files) and streams latents and token states per item; the
  epoch's order and caption choices stay pure functions of seed and epoch, as before;
* the latent scale is a streaming pass over all avatars or a seeded subset of ``data.stats_items``.

"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avatar_core.data.cache import FeatureCache, files_fingerprint, module_fingerprint
from avatar_core.data.stats import ChannelMoments, seeded_subset
from avatar_core.data.stream import RecordField, RecordFolder, StreamDataset, StreamLoader
from avatar_core.errors import AvatarError, ConfigError, CorruptFileError, MissingFileError
from avatar_core.io import load_json, save_json
from tera.config import TeraConfig
from tera.data import TeraDataset, caption_choice
from tera.distill import features_to_latent
from tera.runs import run_paths
from tera.teacher import TeacherFeatureStore

log = logging.getLogger("tera")

__all__ = ["LatentSet", "diffusion_loader", "latent_moments", "latent_set", "teacher_latent_cache", "text_state_cache",
           "write_latent_index"]

#: Avatars encoded at once while filling a cache.
CACHE_BATCH = 16
LATENT_INDEX = "latents.json"


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: teacher features -> latents, one file per avatar
# ---------------------------------------------------------------------------------------------------------------
def _kept(cfg: TeraConfig, ids: Sequence[str], bad: Sequence[str], why: str, hint: str) -> list[str]:
    if bad and cfg.data.on_error == "stop":
        raise MissingFileError(f"{why} for {len(bad)} of {len(ids)} avatars (first: {bad[0]})",
                               f"{hint}, or set data.on_error=skip to train without them")
    for a in bad:
        log.warning("skipping avatar %s: %s", a, why)
    return [a for a in ids if a not in set(bad)]


def teacher_latent_cache(cfg: TeraConfig, ds: TeraDataset, latent_resolution: int,
                         progress: bool = False) -> tuple[FeatureCache, list[str]]:
    """Every avatar's teacher features brought to the latent resolution (what stage 1 distils), one file each;
    returns the cache and the avatars it holds (a missing or corrupt one stops the run, or is skipped)."""
    store = TeacherFeatureStore(run_paths(cfg).teacher, cfg.teacher.channels)
    ids = _kept(cfg, ds.ids, [a for a in ds.ids if not store.exists(a)], f"teacher UV features missing in {store.root}",
                "run `tera fit-teacher` first (or point teacher.features_dir at IDOL features)")
    r = int(latent_resolution)
    ident = {"teacher": cfg.teacher.source, "channels": cfg.teacher.channels, "latent_resolution": r,
             "sources": files_fingerprint([store.path(a) for a in ids])}
    cache = FeatureCache(run_paths(cfg).distill, "latents", ident)

    def one(a: str) -> dict | None:
        try:
            f = store.load(a)
        except AvatarError as e:
            if cfg.data.on_error == "stop":
                raise CorruptFileError(f"teacher features of avatar {a}: {e.message}", e.hint) from e
            log.warning("skipping avatar %s: %s", a, e.message)
            return None
        if f.shape[-1] % r:
            raise ConfigError(f"teacher features are {f.shape[-1]}^2, not a multiple of the latent resolution {r}",
                              "pick distill.latent_resolution dividing teacher.resolution")
        return {"latent": features_to_latent(f, r)[0]}

    done = cache.build(ids, lambda chunk: [one(a) for a in chunk], CACHE_BATCH, progress)
    return cache, [a for a in ids if a not in set(done["failed"])]


def write_latent_index(cfg: TeraConfig, cache: FeatureCache, ids: Sequence[str], latent_resolution: int,
                       out: str | os.PathLike | None = None) -> Path:
    """``distill/latents.json``: the latent folder stage 1 distilled and its avatars (stage 2's input)."""
    out = Path(out) if out is not None else run_paths(cfg).distill
    return save_json(out / LATENT_INDEX, {"folder": str(cache.folder.root), "key": cache.key, "ids": list(ids),
                                          "latent_resolution": int(latent_resolution)})


class LatentSet:
    """The distilled latents of a run: ``ids`` and one ``latent [C, r, r]`` file per avatar in ``folder``."""

    def __init__(self, folder: RecordFolder, ids: list[str], latent_resolution: int):
        self.folder, self.ids, self.latent_resolution = folder, ids, latent_resolution

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, avatar_id: str) -> torch.Tensor:  # [C, r, r]
        return self.folder.load(avatar_id, ["latent"])["latent"]

    def field(self) -> RecordField:
        return RecordField(self.folder, {"latent": "latents"})


def latent_set(cfg: TeraConfig) -> LatentSet:
    """The latents ``tera distill`` wrote (``distill/latents.json``)."""
    path = run_paths(cfg).distill / LATENT_INDEX
    if not path.is_file():
        raise MissingFileError(f"no distilled latents at {path}", "run `tera distill` first")
    index = load_json(path)
    return LatentSet(RecordFolder(index["folder"], what="latent"), list(index["ids"]), int(index["latent_resolution"]))


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: text token states cached per avatar, latents and states streamed
# ---------------------------------------------------------------------------------------------------------------
def text_state_cache(cfg: TeraConfig, text: Any, ds: TeraDataset, ids: Sequence[str],
                     progress: bool = False) -> tuple[FeatureCache, list[str]]:
    """Token states ``[K, L, D]`` and masks ``[K, L]`` of every avatar's K captions, computed once per encoder."""
    index = {a: i for i, a in enumerate(ds.ids)}
    ident = {"encoder": text.name, "path": text.path, "max_length": text.max_length,
             "weights": module_fingerprint(text.encoder),
             "captions": files_fingerprint([ds.dirs[index[a]] / "attributes.json" for a in ids])}
    cache = FeatureCache(run_paths(cfg).run / "cache", "text_states", ident)

    def compute(chunk: list[str]) -> list[dict]:
        caps = [ds.captions(index[a]) for a in chunk]
        cond = text([c for cs in caps for c in cs])
        k = len(caps[0])
        states = cond.states.reshape(len(chunk), k, *cond.states.shape[1:]).cpu()
        mask = cond.mask.reshape(len(chunk), k, -1).cpu()
        return [{"states": states[j], "mask": mask[j]} for j in range(len(chunk))]

    done = cache.build(ids, compute, CACHE_BATCH, progress)
    return cache, [a for a in ids if a not in set(done["failed"])]


class _CaptionChoice:
    """Transform: the caption an avatar trains with in an epoch (:func:`tera.data.caption_choice`)."""

    def __init__(self, seed: int, variant: str):
        self.seed, self.variant = seed, variant

    def __call__(self, item: dict, epoch: int) -> dict:
        k = caption_choice(item["states"].shape[0], self.seed, epoch, item["index"], self.variant)
        return {**item, "states": item["states"][k], "mask": item["mask"][k], "caption": k}  # k: which caption


def _diffusion_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 1, epoch]).permutation(n)


def diffusion_loader(cfg: TeraConfig, latents: LatentSet, ids: Sequence[str], text: FeatureCache,
                     batch_size: int) -> StreamLoader:
    """Batches ``latents [B, C, r, r]``, ``states [B, L, D]``, ``mask [B, L]`` of stage 2 from disk."""
    ds = StreamDataset(list(ids), [latents.field(), text.field(["states", "mask"])], on_error=cfg.data.on_error,
                       transform=_CaptionChoice(cfg.seed, cfg.diffusion.caption_variant))
    return StreamLoader(ds, batch_size, cfg.seed, num_workers=cfg.data.num_workers, order=_diffusion_order,
                        pin_memory=torch.cuda.is_available())


def latent_moments(cfg: TeraConfig, latents: LatentSet, ids: Sequence[str]) -> ChannelMoments:
    """Per-channel moments of the training latents, streamed over all or a seeded ``data.stats_items`` subset."""
    chosen = [ids[i] for i in seeded_subset(len(ids), cfg.data.stats_items or None, cfg.seed)]
    m: ChannelMoments | None = None
    for a in chosen:
        z = latents.get(a)[None]
        m = (m or ChannelMoments(z.shape[1])).update(z)
    if m is None:
        raise MissingFileError("no latents to measure the latent scale on", "run `tera distill` first")
    return m
