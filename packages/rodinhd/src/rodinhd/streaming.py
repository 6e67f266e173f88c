"""RodinHD's training data streamed from disk (:mod:`avatar_core.data.stream`), and its paper networks or stand-ins.

The paper trains on 46K fitted triplanes of 3 x 32 x 512^2 (about 100 MB each, Sec. 4.1); nothing here holds more
than a batch of them. Per training avatar:

* the stage-2 triplane, ``<out>/triplanes/<id>.safetensors`` (upsample target);
* its area-downsampled base-resolution triplane and the portrait's multi-scale encoder features, each computed once
  into the run's feature cache ``<out>/cache/`` (:mod:`avatar_core.data.cache`), keyed by the encoder's weights and
  settings and by the stage-2 files they come from;
* the view cameras, from ``cameras.json`` (never by decoding the views).

The normaliser's per-channel statistics are a streaming pass over all training avatars, or over a seeded subset of
``data.stats_items`` of them; they are buffers of the model, saved in its checkpoints.

Paper networks (Sec. 3.2, App. A): the SDXL VAE encoder for the portrait features and, for the upsampler's
image-level perceptual term, what ``upsample.perceptual`` says it is: ``vgg`` (Eq. 6's VGG-16 features, the
paper) needs VGG-16 only; ``lpips`` (the authors' code) needs VGG-16 and LPIPS's linear heads. A config that leaves
them empty must name the embedded stand-ins under ``standins`` (``portrait_vae``, ``ssim_perceptual``,
``vgg_feature_distance``); ``paper.yaml`` names none and so fails before any work naming the files it needs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from avatar_core.config import config_to_dict
from avatar_core.data.cache import FeatureCache, files_fingerprint, module_fingerprint
from avatar_core.data.stats import seeded_subset
from avatar_core.data.stream import CameraField, StreamDataset, StreamLoader
from avatar_core.errors import AvatarError, ConfigError, MissingFileError
from avatar_core.io import save_json
from avatar_core.standins import Component, Requirement, StandIn, StandInRecord, registry_source, resolve
from rodinhd.conditioning import portrait_features, prepare_portrait
from rodinhd.config import RodinHDConfig
from rodinhd.data import AvatarViews, downsample_triplanes
from rodinhd.image_loss import TrainingView
from rodinhd.triplane import TriplaneStore

log = logging.getLogger("rodinhd")

__all__ = ["PERCEPTUAL_TERMS", "PORTRAIT_VAE", "SSIM_PERCEPTUAL", "VGG_DISTANCE", "feature_cache", "low_res_cache", "resolve_standins", "stage2_store",
           "stats_batches", "training_ids", "training_loader"]

PORTRAIT_VAE = StandIn("portrait_vae", "the SDXL VAE encoder (conditioning.vae_path)",
                       "the embedded portrait VAE, trained on the training portraits")
SSIM_PERCEPTUAL = StandIn("ssim_perceptual", "the VGG-16 / LPIPS perceptual term (upsample.vgg_path)",
                          "an SSIM + image-gradient distance")
VGG_DISTANCE = StandIn("vgg_feature_distance", "LPIPS's learned linear heads (upsample.lpips_path)",
                       "an unweighted distance of unit-normalised VGG-16 features")
#: ``upsample.perceptual``: Eq. 6's sum over VGG-16 layers of feature distances (the paper: "Psi^l ... a
#: pre-trained VGG"), or LPIPS over VGG-16 with its learned linear heads (the authors' code: LPIPS, weight 0.5).
PERCEPTUAL_TERMS = ("vgg", "lpips")
#: Portraits encoded at once while filling the feature cache.
CACHE_BATCH = 16


def resolve_standins(cfg: RodinHDConfig, parts: Sequence[str] = ("encoder", "perceptual"),
                     run_dir: str | os.PathLike | None = None) -> StandInRecord:
    """Paper network or allowed stand-in for each of ``parts`` (checked before any work); the record is logged once
    and, with ``run_dir``, written to ``<run_dir>/standins.json``."""
    c, u = cfg.conditioning, cfg.upsample
    components = []
    if "encoder" in parts:
        components.append(Component(Requirement("SDXL VAE encoder (portrait features, Sec. 3.2)",
                                                "conditioning.vae_path", c.vae_path, kind="sd_vae",
                                                source=registry_source("sd_vae")), PORTRAIT_VAE))
    if "perceptual" in parts:
        if u.perceptual not in PERCEPTUAL_TERMS:
            raise ConfigError(f"upsample.perceptual={u.perceptual!r} is not a perceptual term",
                              f"use one of {list(PERCEPTUAL_TERMS)} (vgg: Eq. 6's VGG-16 features; lpips: LPIPS, "
                              "the authors' code)")
        components.append(Component(Requirement("VGG-16 weights (image-level loss, Eq. 6)", "upsample.vgg_path",
                                                u.vgg_path, source="torchvision's vgg16 state dict"),
                                    SSIM_PERCEPTUAL))
        # LPIPS's heads only when the configured term is LPIPS (the authors' code), over real VGG-16 features.
        if u.perceptual == "lpips" and (u.vgg_path or SSIM_PERCEPTUAL.name not in cfg.standins):
            components.append(Component(Requirement("LPIPS linear heads (vgg.pth; upsample.perceptual: lpips)",
                                                    "upsample.lpips_path", u.lpips_path,
                                                    source="the lpips package's weights/v0.1/vgg.pth"),
                                        VGG_DISTANCE))
    record = resolve(components, list(cfg.standins), known=[PORTRAIT_VAE.name, SSIM_PERCEPTUAL.name, VGG_DISTANCE.name])
    record.log_once("rodinhd")
    if run_dir is not None:
        save_json(Path(run_dir) / "standins.json", record.settings())
    return record


def stage2_store(cfg: RodinHDConfig, out: str | os.PathLike) -> TriplaneStore:
    return TriplaneStore(Path(out) / "triplanes", cfg.triplane.channels, cfg.triplane.resolution)


def training_ids(cfg: RodinHDConfig, out: str | os.PathLike, data: AvatarViews) -> list[str]:
    """The training avatars with a complete stage-2 triplane; a missing one stops the run (``data.on_error:
    stop``, naming it) or is left out with a warning (``skip``)."""
    store = stage2_store(cfg, out)
    bad = [a for a in data.train_ids if not store.exists(a)]
    if bad and cfg.data.on_error == "stop":
        raise MissingFileError(f"{len(bad)} training avatars have no stage-2 triplane (e.g. {bad[0]}, in {store.root})",
                               f"run `rodinhd fit --out {out}` first, or set data.on_error=skip to train without them")
    for a in bad:
        log.warning("skipping avatar %s: no stage-2 triplane in %s", a, store.root)
    ids = [a for a in data.train_ids if a not in bad]
    if not ids:
        raise MissingFileError(f"no training avatar has a stage-2 triplane in {store.root}",
                               f"run `rodinhd fit --out {out}` first")
    return ids


def _guarded(cfg: RodinHDConfig, what: str, fn):
    """``fn(item_id)`` for a cache build: None (skip) or the error (stop) when the item cannot be read."""

    def call(item_id: str):
        try:
            return fn(item_id)
        except AvatarError as e:
            if cfg.data.on_error == "stop":
                raise type(e)(f"{what} of avatar {item_id}: {e.message}", e.hint) from e
            log.warning("skipping avatar %s: %s", item_id, e.message)
            return None

    return call


def low_res_cache(cfg: RodinHDConfig, out: str | os.PathLike, ids: Sequence[str],
                  progress: bool = False) -> tuple[FeatureCache, list[str]]:
    """The base-resolution triplanes of ``ids`` (area average, Sec. 3.2) in the run's cache; returns the cache and
    the ids it holds. Keyed by the resolution and by the stage-2 files (a refit avatar is recomputed)."""
    store = stage2_store(cfg, out)
    r = cfg.base.resolution
    ident = {"what": "stage-2 triplanes, area-downsampled", "resolution": r,
             "triplane": config_to_dict(cfg.triplane), "sources": files_fingerprint([store.path(a) for a in ids])}
    cache = FeatureCache(Path(out) / "cache", "triplanes_low", ident)
    one = _guarded(cfg, "stage-2 triplane", lambda a: {"planes": downsample_triplanes(store.load(a)[None], r)[0]})
    done = cache.build(ids, lambda chunk: [one(a) for a in chunk], CACHE_BATCH, progress)
    return cache, [a for a in ids if a not in set(done["failed"])]


def feature_cache(cfg: RodinHDConfig, out: str | os.PathLike, encoder: nn.Module, data: AvatarViews,
                  ids: Sequence[str], device: torch.device | str, progress: bool = False
                  ) -> tuple[FeatureCache, list[str]]:
    """Every scale of the portrait encoder's features for ``ids``, in the run's cache, keyed by the encoder's
    weights and the portrait size (another VAE or size reads and writes another folder)."""
    c = cfg.conditioning
    ident = {"encoder": type(encoder).__name__, "weights": module_fingerprint(encoder),
             "portrait_size": c.portrait_size}
    cache = FeatureCache(Path(out) / "cache", "portrait_features", ident)
    load = _guarded(cfg, "portrait", lambda a: prepare_portrait(data.portrait(a), c.portrait_size))

    def compute(chunk: list[str]) -> list:
        images = {a: im for a in chunk if (im := load(a)) is not None}
        if not images:
            return [None] * len(chunk)
        feats = portrait_features(encoder, torch.cat(list(images.values())).to(device))
        row = {a: j for j, a in enumerate(images)}
        return [{f"f{k}": f[row[a]].cpu() for k, f in enumerate(feats)} if a in row else None for a in chunk]

    done = cache.build(ids, compute, CACHE_BATCH, progress)
    return cache, [a for a in ids if a not in set(done["failed"])]


class _Stage2Triplane:
    """Field: the full-resolution stage-2 triplane ``planes [3, C, R, R]`` (shape checked by the store)."""

    def __init__(self, store: TriplaneStore):
        self.store = store

    def __call__(self, item_id: str) -> dict:
        return {"planes": self.store.load(item_id)}


def training_loader(cfg: RodinHDConfig, out: str | os.PathLike, data: AvatarViews, ids: Sequence[str],
                    low: FeatureCache, feats: FeatureCache, scales: int, batch_size: int, full: bool = False,
                    cameras: bool = False, view: bool = False) -> StreamLoader:
    """Batches ``low [B, 3, C, r, r]``, ``f0..f{scales-1}`` and, with ``full``, ``planes [B, 3, C, R, R]``; with
    ``cameras``, ``viewmats [B, V, 4, 4]``, ``Ks [B, V, 3, 3]``, ``width``, ``height``; with ``view``, one
    ground-truth view per item and epoch (:class:`rodinhd.image_loss.TrainingView`: ``view_image [B, H, W, 4]``,
    ``view_viewmat``, ``view_K``, ``width``, ``height``). Order: a seeded permutation per epoch (``seed``, epoch),
    the global batch split among processes."""
    fields = [low.field({"planes": "low"}), feats.field([f"f{k}" for k in range(scales)])]
    if full:
        fields.append(_Stage2Triplane(stage2_store(cfg, out)))
    if cameras:
        fields.append(CameraField(data.root, data.views))
    transform = TrainingView(data.root, data.views, cfg.seed) if view else None
    ds = StreamDataset(list(ids), fields, on_error=cfg.data.on_error, transform=transform)
    return StreamLoader(ds, batch_size, cfg.seed, num_workers=cfg.data.num_workers,
                        pin_memory=torch.cuda.is_available())


def stats_batches(cfg: RodinHDConfig, out: str | os.PathLike, ids: Sequence[str], low: FeatureCache | None):
    """Triplanes for the normaliser, streamed in index order over all of ``ids`` or a seeded subset of
    ``data.stats_items`` (the same on every process): base-resolution from ``low``, else the stage-2 files."""
    chosen = [ids[i] for i in seeded_subset(len(ids), cfg.data.stats_items or None, cfg.seed)]
    field = low.field({"planes": "planes"}) if low is not None else _Stage2Triplane(stage2_store(cfg, out))
    loader = StreamLoader(StreamDataset(chosen, [field], on_error=cfg.data.on_error), CACHE_BATCH, cfg.seed,
                          shuffle=False, num_workers=cfg.data.num_workers, rank=0, world_size=1)
    yield from (b["planes"] for b in loader(0))
    # The loader keeps whole batches only; the remainder is read here.
    for i in range(loader.batches_per_epoch() * min(CACHE_BATCH, len(chosen)), len(chosen)):
        item = loader.dataset[i]
        if item is not None:
            yield item["planes"][None]
