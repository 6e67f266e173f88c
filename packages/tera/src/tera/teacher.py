"""Teacher UV features for TeRA's distilled latent space: IDOL's, read from disk, or the project's fitted teacher.

On-disk layout (one file per avatar, in one folder)::

    FEATURES_DIR/
        <avatar_id>.safetensors   key "uv_features": [32, H, W], float16 / bfloat16 / float32
        <avatar_id>.npy           or a NumPy array [32, H, W] of the same meaning
        decoder.safetensors       (fitted teacher only) its UV decoder (the final one once the joint fit's
                                  first phase is done)
        fit_state.pt              (joint fit, while it runs) features, Adam moments, decoder + optimizer, epoch
        consistency.json          (fitted teacher) every avatar's PSNR through the final decoder

IDOL (Zhuang et al. 2025, github.com/yiyuzhuang/IDOL @ 69b6df7) writes 32 x 1536 x 1536 tanh-bounded UV features from its Sapiens encoder; export them
per avatar under the avatar's id in this layout. Rows follow the kernel's UV convention (row 0 is v = 1, the top
of the UV image). Without IDOL, :class:`TeacherFitter` produces the same layout by auto-decoding: per-avatar UV
feature maps optimised jointly with an IDOL-style UV decoder (:class:`tera.uv_gaussians.UVDecoder`) to reproduce
the avatar's multi-view renders with IDOL's losses (lambda_mse 20, lambda_lpips 10, lambda_offset 1; the
joint schedule of :meth:`TeacherFitter.fit_joint`, then a refit against the frozen decoder). The
dataset's views show each avatar in its own shape and pose, so each fit takes that avatar's posed body: the
canonical Gaussians are skinned onto it before rendering. :func:`fit_teacher` is the ``tera fit-teacher`` stage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avatar_core.body import BodyOutput
from avatar_core.cameras import Cameras
from avatar_core.errors import ConfigError, MissingFileError
from avatar_core.io import load_json, load_tensors, save_json
from avatar_core.train import move_aside, run_lock, signature_diff
from tera.config import TeraConfig
from tera.data import TeraDataset, training_views
from tera.runs import (
    build_avatar,
    dataset_ambient,
    load_dataset,
    perceptual,
    posed_render,
    run_paths,
    stage_signature,
    train_device,
    uv_decoder,
)
from tera.standins import resolve_standins
from tera.teacher_fit import (
    PosedSurface,
    TeacherFitter,
    feature_mask,
    feature_regulariser,
)
from tera.teacher_store import (
    CONSISTENCY_FILE,
    DECODER_FILE,
    FEATURE_CHANNELS,
    FEATURE_KEY,
    FIT_FORMAT,
    FIT_SETTINGS_FILE,
    FIT_STATE_FILE,
    TeacherFeatureStore,
)
from tera.uv_gaussians import UVDecoder, UVGaussianAvatar, composite


def check_fit_settings(root: Path, signature: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
    """Refuse to add to features fitted under other settings (or unknown ones): one store, one set of settings.

    ``defaults`` (the signature of the schema's defaults) forgives settings added to the config since the fit."""
    path = root / FIT_SETTINGS_FILE
    fitted = root.is_dir() and any(p.suffix in (".safetensors", ".npy") for p in root.iterdir())
    hint = (f"run `tera fit-teacher --restart` to fit every avatar again (the old features are kept as "
            f"{root}.old-<time>), or restore the settings they were fitted with")
    if path.is_file():
        stored = load_json(path)
        diff = signature_diff(stored.get("signature", {}), signature, defaults) if stored.get("format") == FIT_FORMAT else [
            f"{path.name} is not a teacher-fit record"]
        if diff:
            raise ConfigError(f"the teacher features in {root} were fitted with other settings: " + "; ".join(diff), hint)
    elif fitted:
        raise ConfigError(f"{root} holds teacher features without a record of the settings they were fitted with "
                          f"({FIT_SETTINGS_FILE})", hint)


def fit_teacher(cfg: TeraConfig, progress: bool = True, create_dataset: bool = False,
                restart: bool = False) -> dict[str, Any]:
    """``tera fit-teacher``: teacher UV features for every dataset avatar (fitted, or IDOL's checked on disk);
    resumes where it stopped, under the same settings only (others are refused; ``restart`` moves the old
    features aside to ``<teacher>.old-<time>`` and fits every avatar again)."""
    start = time.perf_counter()
    t = cfg.teacher
    if t.source not in ("fit", "idol"):  # before the dataset is written (create_dataset)
        raise ConfigError(f"teacher.source={t.source!r}", "use 'fit' (own teacher) or 'idol' (features on disk)")
    standins = resolve_standins(cfg, ("body", "teacher") if t.source == "idol" else ("body", "perceptual", "teacher"))
    # (the paper's files or the allowed stand-ins, checked before any work)
    store = TeacherFeatureStore(run_paths(cfg).teacher, t.channels)
    device = train_device(cfg)
    ds = load_dataset(cfg, create=create_dataset)
    if t.source == "fit":
        dataset_ambient(cfg, ds)  # a dataset without recorded lighting is refused before the store is written
    if t.source == "idol":
        missing = [a for a in ds.ids if not store.exists(a)]
        if missing:
            raise MissingFileError(
                f"IDOL features missing for {len(missing)} of {len(ds)} avatars in {store.root} (first: {missing[0]})",
                f"export IDOL's UV features as {store.root}/<avatar_id>.safetensors (key 'uv_features', "
                f"[{t.channels}, H, W]) or set teacher.source=fit")
        return {"source": "idol", "avatars": len(ds), "seconds": time.perf_counter() - start}
    with run_lock(store.root):  # one fit per folder
        if restart:
            move_aside(store.root)
        signature = stage_signature(cfg, "teacher")
        check_fit_settings(store.root, signature, stage_signature(TeraConfig(), "teacher"))
        save_json(store.root / FIT_SETTINGS_FILE, {"format": FIT_FORMAT, "signature": signature})
        save_json(store.root / "standins.json", standins.settings())
        return _fit(cfg, store, ds, progress, start, device)


def _fit(cfg: TeraConfig, store: TeacherFeatureStore, ds: TeraDataset, progress: bool, start: float,
         device: torch.device) -> dict[str, Any]:
    t = cfg.teacher
    if t.mode not in ("joint", "sequential"):
        raise ConfigError(f"teacher.mode={t.mode!r}", "use 'joint' (mini-batches over epochs, then a refit with the "
                          "decoder frozen) or 'sequential' (the original one-avatar-after-another fitter)")
    avatar = build_avatar(cfg, device)  # the fitter runs where the avatar's buffers are
    fitter = TeacherFitter(
        avatar, store, feature_resolution=t.resolution, decoder=uv_decoder(cfg), lr=t.lr, feature_lr=t.feature_lr,
        lambda_mse=t.lambda_mse, lambda_lpips=t.lambda_lpips, lambda_offset=t.lambda_offset,
        perceptual=perceptual(cfg), views_per_step=t.views_per_step, grad_clip=t.grad_clip,
        background=tuple(cfg.data.background), seed=cfg.seed, init_scale=t.init_scale, lambda_l2=t.lambda_l2,
        lambda_tv=t.lambda_tv, levels=list(t.feature_levels) or None,
        random_background=t.random_background, ambient=dataset_ambient(cfg, ds))
    train_v = training_views(ds.num_views, list(cfg.data.eval_views))
    index = {a: i for i, a in enumerate(ds.ids)}

    def views(avatar_id: str) -> tuple[Tensor, Cameras, BodyOutput]:
        k = index[avatar_id]
        images, cams = ds.views(k, train_v)
        return images, cams, ds.body_output(k, avatar.body)

    todo = [a for a in ds.ids if not store.exists(a)]
    fit_start = time.perf_counter()
    if t.mode == "joint":
        if t.epochs < 0 or t.refit_steps < 0 or t.batch_avatars < 1:
            raise ConfigError(f"teacher.epochs={t.epochs}, refit_steps={t.refit_steps}, batch_avatars={t.batch_avatars}",
                              "use epochs >= 0, refit_steps >= 0 and batch_avatars >= 1")
        losses = fitter.fit_joint(ds.ids, views, t.epochs, t.batch_avatars, t.refit_steps, progress=progress)
    else:
        losses = fitter.fit(ds.ids, views, t.steps, progress=progress)
    fit_seconds = time.perf_counter() - fit_start
    summary: dict[str, Any] = {
        "source": "fit", "mode": t.mode, "avatars": len(ds), "fitted": len(todo),
        "mean_final_loss": float(np.mean(list(losses.values()))) if losses else None,
        "seconds_per_avatar": fit_seconds / len(todo) if todo else None}
    if todo or not (store.root / CONSISTENCY_FILE).is_file():
        consistency = measure_consistency(cfg, ds, store, avatar, fitter.decoder)
    else:
        consistency = load_json(store.root / CONSISTENCY_FILE)
    summary["consistency"] = {k: v for k, v in consistency.items() if k != "per_avatar"}
    summary["seconds"] = time.perf_counter() - start
    return summary


# --------------------------------------------------------------------------------------------------
# Cross-avatar consistency of the fitted features
# --------------------------------------------------------------------------------------------------


def measure_consistency(cfg: TeraConfig, ds: TeraDataset, store: TeacherFeatureStore, avatar: UVGaussianAvatar,
                        decoder: UVDecoder, quantile: float = 0.25) -> dict[str, Any]:
    """How well every avatar's stored features reproduce its views through the FINAL decoder (inference mode),
    in fit order (the dataset's order): PSNR (dB) on the fitted views and on the held-out ``data.eval_views``, the
    mean over the first and the last ``quantile`` of the avatars and their gap (``first - last``). A teacher whose
    decoder drifted while it fitted avatars one after another decodes its early avatars worse (a negative gap);
    one whose features all mean the same through the final decoder has a gap near zero. Written to
    ``<teacher>/consistency.json``."""
    from avatar_core.metrics import psnr

    device = avatar.template_points.device
    train_v = training_views(ds.num_views, list(cfg.data.eval_views))
    held = [v for v in cfg.data.eval_views if 0 <= v < ds.num_views]
    bg = tuple(cfg.data.background)
    ambient = dataset_ambient(cfg, ds)
    was_training = decoder.training
    decoder.eval()
    rows = []
    with torch.no_grad():
        for k, a in enumerate(ds.ids):
            if not store.exists(a):
                continue
            g = avatar(decoder(store.load(a)[None].to(device)))
            body = ds.body_output(k, avatar.body)
            row: dict[str, Any] = {"id": a}
            for name, which in (("psnr", train_v), ("psnr_heldout", held)):
                if which:
                    images, cams = ds.views(k, which)
                    pred = posed_render(avatar, g, body, cams.to(device), bg, ambient)[0]
                    row[name] = float(psnr(pred.clamp(0, 1), composite(images.to(pred), bg)).mean())
            rows.append(row)
    decoder.train(was_training)
    if not rows:
        raise MissingFileError(f"no fitted teacher features in {store.root}", "run `tera fit-teacher` first")
    n = max(1, int(round(quantile * len(rows))))
    out: dict[str, Any] = {"mode": cfg.teacher.mode, "avatars": len(rows), "quantile": n}
    for key in ("psnr", "psnr_heldout"):
        vals = [r[key] for r in rows if key in r]
        if vals:
            first, last = float(np.mean(vals[:n])), float(np.mean(vals[-n:]))
            out.update({f"{key}_mean": float(np.mean(vals)), f"{key}_std": float(np.std(vals)),
                        f"{key}_first": first, f"{key}_last": last, f"{key}_gap": first - last})
    out["per_avatar"] = rows
    save_json(store.root / CONSISTENCY_FILE, out)
    return out


def teacher_consistency(cfg: TeraConfig, recompute: bool = False) -> dict[str, Any]:
    """The run's teacher consistency (:func:`measure_consistency`): ``<teacher>/consistency.json`` as
    ``tera fit-teacher`` wrote it, measured now from the store and its decoder when missing or ``recompute``."""
    store = TeacherFeatureStore(run_paths(cfg).teacher, cfg.teacher.channels)
    path = store.root / CONSISTENCY_FILE
    if path.is_file() and not recompute:
        return load_json(path)
    if cfg.teacher.source != "fit":
        raise ConfigError("teacher consistency is measured on the fitted teacher (teacher.source=fit)",
                          "IDOL's features come without the decoder they were trained with")
    decoder_path = store.root / DECODER_FILE
    if not decoder_path.is_file():
        raise MissingFileError(f"no fitted teacher decoder at {decoder_path}", "run `tera fit-teacher` first")
    device = train_device(cfg)
    avatar = build_avatar(cfg, device)
    decoder = uv_decoder(cfg).to(device)
    decoder.load_state_dict(load_tensors(decoder_path, device=device)[0])
    return measure_consistency(cfg, load_dataset(cfg), store, avatar, decoder)


def format_consistency(c: dict[str, Any]) -> str:
    """A small table of :func:`teacher_consistency`: PSNR through the final decoder, first vs last fitted."""
    lines = [f"teacher consistency ({c.get('mode', '?')}, {c['avatars']} avatars; first / last = "
             f"{c['quantile']} avatars in fit order)",
             f"{'views':<10}{'mean':>8}{'std':>8}{'first':>8}{'last':>8}{'gap':>8}"]
    for key, name in (("psnr", "fitted"), ("psnr_heldout", "held-out")):
        if f"{key}_mean" in c:
            lines.append(f"{name:<10}" + "".join(f"{c[f'{key}_{s}']:>8.2f}" for s in ("mean", "std", "first", "last",
                                                                                    "gap")))
    return "\n".join(lines)


__all__ = ["CONSISTENCY_FILE", "DECODER_FILE", "FEATURE_CHANNELS", "FEATURE_KEY", "FIT_SETTINGS_FILE",
           "FIT_STATE_FILE", "PosedSurface", "TeacherFeatureStore", "TeacherFitter", "check_fit_settings",
           "feature_mask", "feature_regulariser", "fit_teacher", "format_consistency", "measure_consistency",
           "teacher_consistency"]

