"""The RodinHD stages as commands over one output folder (Sec. 3 end to end; what ``rodinhd`` and ``make`` run).

Layout of ``out``::

    data/                      the synthetic dataset (unless data.root points elsewhere)
    stage1/                    stage-1 state (decoder, Adam, IWC) and triplanes/ (Algorithm 1)
    decoder.safetensors        the shared decoder after stage 1
    triplanes/                 stage-2 triplanes, one safetensors file per avatar
    portrait_vae.safetensors   the embedded portrait VAE (when no pretrained VAE folder is configured)
    base/, upsample/           Trainer runs: checkpoints/, metrics.jsonl, config.yaml
    samples/NAME/              triplane.safetensors, views/, views.png, turntable.mp4, settings.json
    eval.json, ablation/       evaluation and the Table 4(a) ablation

Every stage takes the run's :class:`rodinhd.config.RodinHDConfig`. The networks are built in
:mod:`rodinhd.models`, sampling and rendering are :mod:`rodinhd.sample`, evaluation :mod:`rodinhd.evaluate`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from avatar_core.cameras import Cameras
from avatar_core.config import save_config, to_settings
from avatar_core.env import resolve_device
from avatar_core.errors import ConfigError
from avatar_core.io import save_json
from avatar_core.train import TrainConfig, Trainer, config_signature, latest_checkpoint, run_lock, seeded
from rodinhd.config import DiffusionTrainConfig, RodinHDConfig
from rodinhd.data import open_data, prepare_data
from rodinhd.evaluate import ablate, evaluate
from rodinhd.fitting import fit_shared, fit_triplanes
from rodinhd.image_loss import VGGPerceptual
from rodinhd.models import (
    DECODER_FILE,
    build_base,
    build_decoder,
    build_upsample,
    feature_channels,
    get_encoder,
    load_decoder,
    make_render_patch,
    save_decoder,
    triplane_kwargs,
)
from rodinhd.sample import TriplaneSampler, render_file, sample
from rodinhd.streaming import (
    feature_cache,
    low_res_cache,
    resolve_standins,
    stats_batches,
    training_ids,
    training_loader,
)
from rodinhd.triplane import TriplaneStore, rollout

log = logging.getLogger("rodinhd")

__all__ = [
    "TriplaneSampler", "ablate", "build_base", "build_decoder", "build_upsample", "evaluate", "fit_shared_stage",
    "fit_stage", "fmt_paths", "get_encoder", "latest_checkpoint", "load_decoder", "open_data", "prepare_data",
    "render_file", "sample", "train_all", "train_base", "train_upsample",
]

#: Keys of a diffusion stage's loop settings that may change between a run and its resumption.
_RESUMABLE = ("max_steps", "checkpoint_every", "log_every", "progress_bar", "keep_last_checkpoints", "allow_config_change")


def _loop_config(loop: DiffusionTrainConfig, run_dir: Path, seed: int) -> TrainConfig:
    """The kernel loop's settings of one diffusion stage: its ``train`` section in the run's folder and seed."""
    if loop.output_dir and Path(loop.output_dir).resolve() != run_dir.resolve():
        raise ConfigError(f"train.output_dir={loop.output_dir} but this stage's run folder is {run_dir}",
                          "leave train.output_dir empty and choose the run folder with --out")
    settings = {f.name: getattr(loop, f.name) for f in dataclasses.fields(TrainConfig)}
    settings.update(output_dir=str(run_dir), seed=seed if loop.seed is None else loop.seed)
    return TrainConfig(**settings)


def _optimizer(loop: DiffusionTrainConfig) -> Callable:
    if loop.optimizer not in ("adam", "adamw"):
        raise ConfigError(f"unknown optimizer {loop.optimizer!r}", "use 'adam' or 'adamw'")
    cls = torch.optim.AdamW if loop.optimizer == "adamw" else torch.optim.Adam
    return lambda params: cls([p for p in params if p.requires_grad], lr=loop.lr, weight_decay=loop.weight_decay)


#: Settings no diffusion stage trains on: sampling, evaluation, the ablation, how data items are read (not which).
_MAY_CHANGE = ("name", "sample", "evaluate", "ablation", "data.num_workers", "data.view_cache")
#: Per stage, the other settings it does not read (the upsample model reads the base model's resolution only).
_STAGE_MAY_CHANGE = {
    "base": ("upsample", "render"),
    "upsample": ("base.train", "base.unet", "base.context_resolutions", "base.num_steps", "base.schedule",
                 "base.vlb_weight", "base.cond_drop_prob", "base.guidance_scale", "base.sample_steps"),
}


def _run_signature(cfg: RodinHDConfig, section: str) -> dict:
    """The settings a resumed diffusion run must share with its checkpoint: the whole config (fitting, data,
    conditioning, this stage's model and optimiser) minus an explicit allow-list."""
    allow = _MAY_CHANGE + _STAGE_MAY_CHANGE[section] + tuple(f"{section}.train.{k}" for k in _RESUMABLE)
    return config_signature(cfg, allow=allow)


def _stage_seed(cfg: RodinHDConfig, loop: DiffusionTrainConfig) -> int:
    """The seed of a diffusion stage: its weights are built under it, and the Trainer draws from it."""
    return cfg.seed if loop.seed is None else loop.seed


def fit_shared_stage(cfg: RodinHDConfig, out: str | os.PathLike = "outputs/rodinhd", progress: bool = True) -> dict:
    """``rodinhd fit-shared``: stage 1 (Algorithm 1) on the first ``stage1.num_avatars`` training avatars."""
    out = Path(out)
    data = open_data(cfg, out)
    s = cfg.stage1
    ids = data.train_ids[: s.num_avatars] if s.num_avatars > 0 else data.train_ids
    device = resolve_device(cfg.device)
    decoder = build_decoder(cfg).to(device)
    store = TriplaneStore(out / "stage1" / "triplanes", cfg.triplane.channels, cfg.triplane.resolution)
    t0 = time.perf_counter()
    result = fit_shared(data.get_views, ids, decoder, store, out / "stage1", to_settings(s), seed=cfg.seed,
                        progress=progress, **triplane_kwargs(cfg))
    path = save_decoder(decoder, out / DECODER_FILE, cfg)
    last = result.history[-len(ids):] if result.history else []
    return {"decoder": str(path), "triplanes": str(store.root), "avatars": ids, "seconds": time.perf_counter() - t0,
            "final_psnr": {h["avatar"]: h["psnr"] for h in last}}


def fit_stage(cfg: RodinHDConfig, out: str | os.PathLike = "outputs/rodinhd", rank: int | None = None,
              world_size: int | None = None, progress: bool = True) -> dict:
    """``rodinhd fit``: stage 2, every training avatar's triplane with the frozen decoder (sharded by rank)."""
    out = Path(out)
    data = open_data(cfg, out)
    device = resolve_device(cfg.device)
    decoder = load_decoder(cfg, out, device)
    s = cfg.stage2
    C, R = cfg.triplane.channels, cfg.triplane.resolution
    store = TriplaneStore(out / "triplanes", C, R)
    init = TriplaneStore(out / "stage1" / "triplanes", C, R) if s.init_from_stage1 else None
    t0 = time.perf_counter()
    done = fit_triplanes(data.get_views, data.train_ids, decoder, store, init, to_settings(s), seed=cfg.seed,
                         rank=rank, world_size=world_size, progress=progress, **triplane_kwargs(cfg))
    return {"triplanes": str(store.root), "fitted": done, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------------
# Diffusion training
# ---------------------------------------------------------------------------------------------------------------
def train_base(cfg: RodinHDConfig, out: str | os.PathLike = "outputs/rodinhd", resume: bool = True,
               progress: bool = True) -> dict:
    """``rodinhd train-base``: the base model on the fitted triplanes area-downsampled to ``base.resolution``.

    Runs on :class:`avatar_core.train.Trainer` (checkpoints, exact resume, EMA, ``accelerate launch``); with
    ``resume`` an existing run continues, and a run whose settings differ from its checkpoint's is refused. The data
    streams from disk (:mod:`rodinhd.streaming`): downsampled triplanes and portrait features are cached once.
    """
    out = Path(out)
    standins = resolve_standins(cfg, ("encoder",))  # before any work
    data = open_data(cfg, out)
    device = resolve_device(cfg.device)
    ids = training_ids(cfg, out, data)
    encoder = get_encoder(cfg, out, data, device, progress)
    n = len(cfg.base.context_resolutions)
    feats, ids = feature_cache(cfg, out, encoder, data, ids, device, progress)
    low, ids = low_res_cache(cfg, out, ids, progress)
    with seeded(_stage_seed(cfg, cfg.base.train)):  # reproducible initial weights (the Trainer seeds only later)
        model = build_base(cfg, feature_channels(encoder))
    model.normalizer.fit(rollout(p) for p in stats_batches(cfg, out, ids, low))
    loop = cfg.base.train
    loader = training_loader(cfg, out, data, ids, low, feats, n, loop.batch_size)

    def step(m: nn.Module, batch: dict) -> tuple[Tensor, dict]:
        o = m(rollout(batch["low"]), [batch[f"f{k}"] for k in range(n)])
        return o["loss"], {"mse": o["mse"].detach(), "vlb": o["vlb"].detach()}

    result = _train_stage(cfg, out, "base", loop, model, step, loader, resume)
    save_json(out / "base" / "standins.json", standins.settings())
    return {**result, "standins": standins.names()}


def _train_stage(cfg: RodinHDConfig, out: Path, name: str, loop: DiffusionTrainConfig, model: nn.Module, step: Callable, data_fn: Callable,
                 resume: bool) -> dict:
    """Run one diffusion stage on the kernel's Trainer in ``out/name`` (exact resume; a changed config is refused)."""
    run_dir = out / name
    t0 = time.perf_counter()
    with run_lock(run_dir):  # one run per folder, held until its config is written
        trainer = Trainer(_loop_config(loop, run_dir, cfg.seed), model, _optimizer(loop), step, data_fn,
                          run_config=_run_signature(cfg, name), config_key=f"{name}.train",
                          run_defaults=_run_signature(RodinHDConfig(), name))
        last = trainer.train(resume="auto" if resume else None)  # not resume (--restart): the old run moves aside
        save_config(cfg, run_dir / "config.yaml")
    return {"run": str(run_dir), "checkpoint": str(latest_checkpoint(run_dir)), "last": last,
            "seconds": time.perf_counter() - t0}


def train_upsample(cfg: RodinHDConfig, out: str | os.PathLike = "outputs/rodinhd", resume: bool = True,
                   progress: bool = True) -> dict:
    """``rodinhd train-upsample``: the upsample model (x0, Eq. 5) plus the image-level loss (Eq. 6) on patches
    rendered through the frozen decoder from a random training view per sample."""
    out = Path(out)
    u = cfg.upsample
    standins = resolve_standins(cfg, ("encoder", "perceptual"))  # before any work
    data = open_data(cfg, out)
    device = resolve_device(cfg.device)
    ids = training_ids(cfg, out, data)
    encoder = get_encoder(cfg, out, data, device, progress)
    n = len(u.context_resolutions)
    feats, ids = feature_cache(cfg, out, encoder, data, ids, device, progress)
    low, ids = low_res_cache(cfg, out, ids, progress)
    decoder = load_decoder(cfg, out, device)
    render_patch = make_render_patch(decoder, cfg.triplane.bound, cfg.triplane.center, u.render_num_samples,
                                     cfg.render.background) if u.image_loss_weight > 0 else None
    heads = u.lpips_path if u.perceptual == "lpips" else None  # Eq. 6: VGG features; the code: LPIPS
    perceptual = VGGPerceptual.from_local(u.vgg_path, heads) if u.vgg_path else None
    with seeded(_stage_seed(cfg, u.train)):
        model = build_upsample(cfg, feature_channels(encoder), render_patch, perceptual)
    model.normalizer.fit(rollout(p) for p in stats_batches(cfg, out, ids, None))
    loop = u.train
    loader = training_loader(cfg, out, data, ids, low, feats, n, loop.batch_size, full=True,
                             view=render_patch is not None)

    def step(m: nn.Module, batch: dict) -> tuple[Tensor, dict]:
        # Eq. 6's target: one ground-truth view per sample (its image and camera, chosen per epoch by the loader)
        cameras = images = None
        if "view_image" in batch:
            cameras = Cameras(batch["view_viewmat"], batch["view_K"], int(batch["width"][0]),
                              int(batch["height"][0]))
            images = batch["view_image"]
        o = m(rollout(batch["planes"]), rollout(batch["low"]), [batch[f"f{k}"] for k in range(n)], cameras=cameras,
              images=images)
        metrics = {k: o[k].detach() for k in ("mse", "pixel", "perceptual") if k in o}
        return o["loss"], metrics

    result = _train_stage(cfg, out, "upsample", loop, model, step, loader, resume)
    save_json(out / "upsample" / "standins.json", standins.settings())
    return {**result, "standins": standins.names()}



def train_all(cfg: RodinHDConfig, out: str | os.PathLike = "outputs/rodinhd", progress: bool = True,
              evaluate_after: bool = False) -> dict:
    """``rodinhd train-all`` (``make train-rodinhd``): dataset -> stage 1 -> stage 2 -> base -> upsample -> one
    sample from a held-out portrait. Each step resumes what an interrupted run left."""
    out = Path(out)
    standins = resolve_standins(cfg)  # the paper's networks or the allowed stand-ins, before any work
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def timed(key: str, fn: Callable, *args, **kwargs) -> Any:
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        times[key] = round(time.perf_counter() - t0, 2)
        log.info("%s done in %.1f s", key, times[key])
        return result

    timed("dataset", prepare_data, cfg, out, progress)
    save_config(cfg, out / "config.yaml")
    data = open_data(cfg, out)
    s1 = timed("fit_shared", fit_shared_stage, cfg, out, progress)
    timed("fit", fit_stage, cfg, out, progress=progress)
    timed("train_base", train_base, cfg, out, progress=progress)
    timed("train_upsample", train_upsample, cfg, out, progress=progress)
    held = data.held_out_ids[0] if data.held_out_ids else data.train_ids[-1]
    # The run's own held-out sample: a rerun of train-all replaces it (and only it: it carries its result marker).
    smp = timed("sample", sample, cfg, out, data.portrait_path(held), name=f"heldout_{held}", overwrite=True)
    result = {"out": str(out), "config": str(out / "config.yaml"), "dataset": str(data.root),
              "decoder": s1["decoder"], "triplanes": str(out / "triplanes"), "base": str(out / "base"),
              "upsample": str(out / "upsample"), "sample": smp, "seconds": times, **standins.settings()}
    if evaluate_after:
        result["eval"] = timed("evaluate", evaluate, cfg, out, progress)
    save_json(out / "train_all.json", result)
    return result


def fmt_paths(result: dict, indent: str = "  ") -> str:
    """The paths in a stage's result, one per line (what the CLI prints at the end)."""
    lines = []
    for k, v in result.items():
        if isinstance(v, dict):
            sub = fmt_paths(v, indent + "  ")
            if sub:
                lines.append(f"{indent}{k}:")
                lines.append(sub)
        elif isinstance(v, str) and (os.sep in v or v.endswith((".safetensors", ".json", ".mp4", ".png"))):
            lines.append(f"{indent}{k}: {v}")
    return "\n".join(lines)
