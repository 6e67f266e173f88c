"""TeRA stage 2 (Sec. 3.4): the text-conditioned structured latent diffusion trained on the distilled latents;
``tera train``. Writes ``diffusion/model/`` (config.json + model.safetensors)."""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from avatar_core.config import config_to_dict
from avatar_core.env import resolve_device
from avatar_core.errors import ConfigError, MissingFileError
from avatar_core.io import save_json, save_tensors
from avatar_core.train import Trainer, run_lock, seeded
from tera.config import TeraConfig
from tera.latent_diffusion import StructuredLatentDiffusion
from tera.runs import load_dataset, run_paths, stage_signature, train_device
from tera.shape_text import SHAPE_HEAD_FILE, train_shape_head
from tera.standins import resolve_standins
from tera.streaming import diffusion_loader, latent_moments, latent_set, text_state_cache
from tera.text import TextCondition, TextConditioner

__all__ = ["CAPTION_LOG", "load_model", "text_conditioner", "train", "unet_config"]


def text_conditioner(cfg: TeraConfig, device: torch.device) -> TextConditioner:
    return TextConditioner(cfg.text.encoder, cfg.text.path, cfg.text.max_length, device=device)


def unet_config(cfg: TeraConfig, channels: int, resolution: int, text_dim: int) -> dict[str, Any]:
    u = cfg.diffusion.unet
    if len(u.down_block_types) != len(u.block_out_channels) or len(u.up_block_types) != len(u.block_out_channels):
        raise ConfigError("diffusion.unet: block_out_channels, down_block_types and up_block_types need one entry "
                          "per resolution level", "give lists of equal length")
    pooled = {"class_embed_type": "projection", "projection_class_embeddings_input_dim": text_dim} \
        if cfg.diffusion.pooled_text else {}
    return {"sample_size": resolution, "in_channels": channels, "out_channels": channels,
            "block_out_channels": list(u.block_out_channels), "down_block_types": list(u.down_block_types),
            "up_block_types": list(u.up_block_types), "layers_per_block": u.layers_per_block,
            "cross_attention_dim": text_dim, "attention_head_dim": u.attention_head_dim,
            "norm_num_groups": u.norm_num_groups, **pooled}


def train(cfg: TeraConfig, progress: bool = True, resume: str | None = "auto") -> dict[str, Any]:
    """Stage 2: the text-conditioned latent diffusion on the distilled latents (shared Trainer; EMA; resume).

    Latents and caption token states stream from disk per avatar (:mod:`tera.streaming`); the token states are
    computed once into the run's cache, keyed by the text encoder."""
    start = time.perf_counter()
    standins = resolve_standins(cfg, ("text",))  # before any work
    dc = cfg.diffusion
    device = train_device(cfg)
    latents = latent_set(cfg)
    ds = load_dataset(cfg)
    index = {a: i for i, a in enumerate(ds.ids)}
    unknown = [a for a in latents.ids if a not in index]
    if unknown:
        raise ConfigError(f"the latents come from avatars not in {ds.root} (e.g. {unknown[0]})",
                          "point data.root at the dataset the run was distilled from")
    text = text_conditioner(cfg, device)
    states, ids = text_state_cache(cfg, text, ds, latents.ids, progress)
    C, r = latents.get(ids[0]).shape[0], latents.latent_resolution
    with seeded(cfg.seed):  # the initial weights depend on the seed only: runs are reproducible
        model = StructuredLatentDiffusion(
            unet_config(cfg, C, r, text.dim), text=text, num_train_timesteps=dc.num_train_timesteps,
            schedule=dc.schedule, prediction=dc.prediction, text_dropout=dc.text_dropout,
            guidance_scale=dc.guidance_scale, sample_steps=dc.sample_steps, ddim_steps=dc.ddim_steps)
    model.set_latent_stats_from_moments(latent_moments(cfg, latents, ids), per_channel=dc.per_channel_stats)
    bs = min(dc.batch_size, len(ids))
    data = diffusion_loader(cfg, latents, ids, states, bs)

    log_path = run_paths(cfg).diffusion / CAPTION_LOG
    logged: list[dict] = []

    def step_fn(m, batch):
        # Which caption (0: the long description, 1..: the phrases) each avatar of the step trained with.
        logged.append({"step": trainer.step, "epoch": int(batch["epoch"][0]), "avatars": list(batch["item_id"]),
                       "captions": [int(k) for k in batch["caption"]]})
        return m(batch["latents"], TextCondition(batch["states"], batch["mask"].bool())), {}

    tc = config_to_dict(dc.train)
    out = run_paths(cfg).diffusion
    tc["output_dir"] = str(out)
    tc["progress_bar"] = bool(progress and tc.get("progress_bar", True))
    with run_lock(out):  # one run per folder, held until the model is written
        trainer = Trainer(tc, model,
                          lambda p: torch.optim.AdamW(p, lr=dc.lr, weight_decay=dc.weight_decay), step_fn, data,
                          run_config={**stage_signature(cfg, "diffusion"), "latent_shape": [C, r, r]},
                          config_key="diffusion.train", run_defaults=stage_signature(TeraConfig(), "diffusion"))
        try:
            last = trainer.train(resume=resume)
        finally:
            _write_caption_log(log_path, logged)
        model = trainer.unwrapped_model
        if trainer.ema is not None:
            trainer.ema.copy_to(model)
        if not trainer.accelerator.is_main_process:
            return {"steps": trainer.step}
        model.save(out / "model")
        # Body shape from text (tera.shape_text): a head on the same cached caption states.
        head, head_info = train_shape_head(states, ids, ds, text.dim, seed=cfg.seed,
                                           max_avatars=cfg.data.stats_items or None)
        save_tensors(out / SHAPE_HEAD_FILE, head.state_dict(), head_info)
        save_json(out / "standins.json", standins.settings())
        result = {"steps": trainer.step, "final_loss": last.get("loss"), "latent_shape": [C, r, r],
                  "avatars": len(ids), "standins": standins.names(), "seconds": time.perf_counter() - start}
        save_json(out / "summary.json", result)
    return result


#: One JSON line per training step call: the step, its avatars and the caption index each trained with.
CAPTION_LOG = "captions.jsonl"


def _write_caption_log(path, rows: list[dict]) -> None:
    """The steps this call ran replace the log from its first step on (a resumed run repeats no step)."""
    if not rows:
        return
    first = rows[0]["step"]
    old = []
    if path.is_file():
        old = [r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if r["step"] < first]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in old + rows), encoding="utf-8")


def load_model(cfg: TeraConfig, device: torch.device | None = None) -> StructuredLatentDiffusion:
    """The trained latent diffusion model of the run."""
    path = run_paths(cfg).diffusion / "model"
    if not (path / "config.json").is_file():
        raise MissingFileError(f"no trained latent diffusion model at {path}", "run `tera train` first")
    device = device or resolve_device(cfg.device, cfg.threads)
    return StructuredLatentDiffusion.load(path, device=device).eval()

