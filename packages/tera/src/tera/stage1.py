"""TeRA stage 1 (Sec. 3.3, Eq. 1): the distillation decoder trained on the teacher's latents to reproduce each
avatar's posed multi-view renders; ``tera distill``. Writes ``distill/decoder.safetensors`` (weights + the
settings that rebuild it) and the latents, one file per avatar (``distill/latents.json`` names them;
:mod:`tera.streaming`), and reports the held-out view PSNR. Latents, views and posed bodies are read per avatar
when a step needs them, never all at once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avatar_core.config import config_to_dict
from avatar_core.errors import ConfigError, CorruptFileError, MissingFileError
from avatar_core.io import load_tensors, save_json, save_tensors
from avatar_core.metrics import psnr
from avatar_core.train import Trainer, global_batches, run_lock, seeded, shard_batch
from tera.config import TeraConfig
from tera.data import TeraDataset, training_views
from tera.distill import DistillationDecoder, render_loss
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
from tera.streaming import LatentSet, teacher_latent_cache, write_latent_index
from tera.teacher import DECODER_FILE
from tera.uv_gaussians import UVGaussianAvatar, composite

__all__ = ["DECODER_FORMAT", "distill", "load_decoder", "reconstruction_psnr"]

DECODER_FORMAT = "tera.distill_decoder/1"


def _decoder_settings(cfg: TeraConfig, latent_resolution: int) -> dict[str, Any]:
    t, d, b = cfg.teacher, cfg.distill, cfg.body
    return {"format": DECODER_FORMAT, "latent_channels": t.channels, "latent_resolution": latent_resolution,
            "upsample_factor": d.upsample_factor, "hidden_channels": d.hidden_channels,
            "geometry_channels": t.geometry_channels, "geometry_hidden": t.geometry_hidden,
            "texture_hidden": t.texture_hidden, "offset_init": t.offset_init,
            "body": b.name, "num_points": b.num_points, "point_seed": b.point_seed}


def _build_decoder(s: dict[str, Any]) -> DistillationDecoder:
    return DistillationDecoder(s["latent_channels"], s["upsample_factor"], s["hidden_channels"], s["geometry_channels"],
                               s["geometry_hidden"], s["texture_hidden"], s["offset_init"])


def distill(cfg: TeraConfig, progress: bool = True, latent_resolution: int | None = None,
            steps: int | None = None, out_dir: str | Path | None = None, resume: str | None = "auto") -> dict[str, Any]:
    """Stage 1 (Eq. 1): train the distillation decoder on the teacher latents; report held-out view PSNR."""
    start = time.perf_counter()
    d = cfg.distill
    r = int(latent_resolution or d.latent_resolution)
    out = Path(out_dir) if out_dir is not None else run_paths(cfg).distill
    standins = resolve_standins(cfg, ("body", "perceptual", "teacher"))  # before any work
    device = train_device(cfg)
    ds = load_dataset(cfg)
    cache, lat_ids = teacher_latent_cache(cfg, ds, r, progress)
    latents = LatentSet(cache.folder, lat_ids, r)
    index = {a: i for i, a in enumerate(ds.ids)}
    kept = np.asarray([index[a] for a in lat_ids])  # dataset indices with a latent (all, unless skipped)
    avatar = build_avatar(cfg, device)  # the device's own copy: the CPU avatar other callers share is not moved
    settings = _decoder_settings(cfg, r)
    with seeded(cfg.seed):  # the initial weights depend on the seed only: runs are reproducible
        decoder = _build_decoder(settings)
    teacher_file = run_paths(cfg).teacher / DECODER_FILE
    if d.init_from_teacher and teacher_file.is_file():
        head = uv_decoder(cfg)
        head.load_state_dict(load_tensors(teacher_file)[0])
        decoder.load_teacher_head(head)
    loss_net = perceptual(cfg).to(device)
    teacher_maps = _teacher_maps(cfg, avatar, r * d.upsample_factor, device) if d.lambda_teacher_maps > 0 else None
    bg = tuple(cfg.data.background)
    ambient = dataset_ambient(cfg, ds)
    train_v = training_views(ds.num_views, list(cfg.data.eval_views))
    seed = cfg.seed

    def data(epoch: int) -> list[dict[str, Tensor]]:
        rng = np.random.default_rng([seed, epoch])
        order = kept[rng.permutation(len(kept))]
        out_b = []
        for idx in global_batches(order, d.batch_size):
            views = np.stack([rng.choice(train_v, size=min(d.views_per_step, len(train_v)), replace=False) for _ in idx])
            out_b.append(shard_batch({"index": torch.as_tensor(idx), "views": torch.as_tensor(views)}))
        return out_b

    def step_fn(model, batch):
        total, parts = 0.0, []
        for i, views in zip(batch["index"].tolist(), batch["views"].tolist()):
            images, cams = ds.views(i, views)
            maps = model(latents.get(ds.ids[i])[None].to(device))
            g = avatar(maps)
            pred = posed_render(avatar, g, ds.body_output(i, avatar.body), cams.to(device), bg, ambient)
            target = composite(images.to(device), bg)[None]
            loss, p = render_loss(pred, target, g.offsets, loss_net, 1.0, d.lambda_vgg, d.lambda_offset, sum_views=True)
            if teacher_maps is not None:
                p["teacher_maps"] = teacher_maps(ds.ids[i], maps)
                loss = loss + d.lambda_teacher_maps * p["teacher_maps"]
                p["teacher_maps"] = p["teacher_maps"].detach()
            total = total + loss / len(batch["index"])
            parts.append(p)
        return total, {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}

    tc = config_to_dict(d.train)
    tc["output_dir"] = str(out)
    tc["progress_bar"] = bool(progress and tc.get("progress_bar", True))
    if steps is not None:
        tc["max_steps"] = int(steps)
    with run_lock(out):  # one run per folder, held until the stage's files are written
        trainer = Trainer(tc, decoder, lambda p: torch.optim.Adam(p, lr=d.lr), step_fn, data,
                          run_config={**stage_signature(cfg, "distill"), "latent_resolution": r},
                          config_key="distill.train", run_defaults=stage_signature(TeraConfig(), "distill"))
        last = trainer.train(resume=resume)
        decoder = trainer.unwrapped_model
        if trainer.ema is not None:
            trainer.ema.copy_to(decoder)
        decoder.eval()
        if not trainer.accelerator.is_main_process:  # other processes of `accelerate launch` stop here
            return {"latent_resolution": r, "steps": trainer.step}
        save_tensors(out / "decoder.safetensors", decoder.state_dict(), settings)
        write_latent_index(cfg, cache, lat_ids, r, out)
        save_json(out / "standins.json", standins.settings())
        recon = reconstruction_psnr(cfg, decoder, latents, ds, avatar)
        result = {"latent_resolution": r, "steps": trainer.step, "final_loss": last.get("loss"),
                  **recon, "seconds": time.perf_counter() - start}
        save_json(out / "summary.json", result)
    return result


def _teacher_maps(cfg: TeraConfig, avatar: UVGaussianAvatar, resolution: int, device: torch.device):
    """``distill.lambda_teacher_maps``' term: ``f(avatar_id, maps [1, 13, R, R]) -> scalar``, the mean squared
    difference inside the UV charts (:func:`tera.teacher_fit.feature_mask`) from the fitted teacher's decoder on the
    avatar's stored full-resolution features, area-resized to the output's ``resolution``."""
    from tera.teacher_fit import feature_mask
    from tera.teacher_store import TeacherFeatureStore

    path = run_paths(cfg).teacher / DECODER_FILE
    if cfg.teacher.source != "fit" or not path.is_file():
        raise ConfigError(f"distill.lambda_teacher_maps={cfg.distill.lambda_teacher_maps} needs the fitted teacher's "
                          f"decoder at {path} (teacher.source={cfg.teacher.source!r})",
                          "run `tera fit-teacher` with teacher.source=fit, or set distill.lambda_teacher_maps=0")
    head = uv_decoder(cfg).to(device)
    head.load_state_dict(load_tensors(path, device=device)[0])
    head.eval().requires_grad_(False)
    store = TeacherFeatureStore(run_paths(cfg).teacher, cfg.teacher.channels)
    mask = feature_mask(avatar, resolution).to(device).float()

    def term(avatar_id: str, maps: Tensor) -> Tensor:
        with torch.no_grad():
            target = head(store.load(avatar_id)[None].to(device))
            if target.shape[-1] != resolution:
                target = torch.nn.functional.interpolate(target, size=(resolution, resolution), mode="area")
        return (((maps - target) ** 2) * mask).sum() / (mask.sum() * maps.shape[1] * maps.shape[0])

    return term


@torch.no_grad()
def reconstruction_psnr(cfg: TeraConfig, decoder: DistillationDecoder, latents: LatentSet, ds: TeraDataset,
                        avatar: UVGaussianAvatar) -> dict[str, float]:
    """PSNR of decoded, posed renders against the dataset's views (held-out and training views), avatar by avatar."""
    bg = tuple(cfg.data.background)
    ambient = dataset_ambient(cfg, ds)
    device = next(decoder.parameters()).device
    held = list(cfg.data.eval_views)
    train_v = training_views(ds.num_views, held)
    decoder.eval()
    res = {"psnr_heldout": [], "psnr_train": []}
    index = {a: i for i, a in enumerate(ds.ids)}
    for a in latents.ids:
        i = index[a]
        g = avatar(decoder(latents.get(a)[None].to(device)))
        for key, views in (("psnr_heldout", held), ("psnr_train", train_v[:2])):
            if not views:
                continue
            images, cams = ds.views(i, views)
            pred = posed_render(avatar, g, ds.body_output(i, avatar.body), cams.to(device), bg, ambient)
            res[key].append(float(psnr(pred[0].cpu(), composite(images, bg)).mean()))
    return {k: float(np.mean(v)) for k, v in res.items() if v}


def load_decoder(cfg: TeraConfig, directory: str | Path | None = None) -> tuple[DistillationDecoder, dict]:
    """The trained distillation decoder and its settings; checked against the config's body."""
    path = Path(directory or run_paths(cfg).distill) / "decoder.safetensors"
    if not path.is_file():
        raise MissingFileError(f"no distillation decoder at {path}", "run `tera distill` first")
    tensors, settings = load_tensors(path)
    if settings.get("format") != DECODER_FORMAT:
        raise CorruptFileError(f"{path} is not a TeRA distillation decoder", "point run_dir at a TeRA run")
    if settings["body"] != cfg.body.name:
        raise ConfigError(f"the decoder in {path} was trained on body {settings['body']!r}, the config says "
                          f"{cfg.body.name!r}", f"set body.name={settings['body']} or train a new run")
    decoder = _build_decoder(settings)
    decoder.load_state_dict(tensors)
    return decoder.eval(), settings

