"""TeRA stage 2 (Sec. 3.4): the text-conditioned structured latent diffusion trained on the distilled latents;
``tera train``. Writes ``diffusion/model/`` (config.json + model.safetensors)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avatar_core.config import config_to_dict
from avatar_core.env import resolve_device
from avatar_core.errors import ConfigError, MissingFileError
from avatar_core.io import load_tensors, save_json
from avatar_core.train import Trainer, global_batches, run_lock, seeded, shard_batch
from tera.config import TeraConfig
from tera.data import caption_choice
from tera.latent_diffusion import StructuredLatentDiffusion
from tera.runs import load_dataset, run_paths, stage_signature, train_device
from tera.text import TextCondition, TextConditioner

__all__ = ["load_latents", "load_model", "text_conditioner", "train", "unet_config"]


def text_conditioner(cfg: TeraConfig, device: torch.device) -> TextConditioner:
    return TextConditioner(cfg.text.encoder, cfg.text.path, cfg.text.max_length, device=device)


def unet_config(cfg: TeraConfig, channels: int, resolution: int, text_dim: int) -> dict[str, Any]:
    u = cfg.diffusion.unet
    if len(u.down_block_types) != len(u.block_out_channels) or len(u.up_block_types) != len(u.block_out_channels):
        raise ConfigError("diffusion.unet: block_out_channels, down_block_types and up_block_types need one entry "
                          "per resolution level", "give lists of equal length")
    return {"sample_size": resolution, "in_channels": channels, "out_channels": channels,
            "block_out_channels": list(u.block_out_channels), "down_block_types": list(u.down_block_types),
            "up_block_types": list(u.up_block_types), "layers_per_block": u.layers_per_block,
            "cross_attention_dim": text_dim, "attention_head_dim": u.attention_head_dim,
            "norm_num_groups": u.norm_num_groups}


def load_latents(cfg: TeraConfig) -> tuple[Tensor, list[str]]:
    """The distilled latents ``[A, C, r, r]`` of stage 1 and their avatar ids."""
    path = run_paths(cfg).distill / "latents.safetensors"
    if not path.is_file():
        raise MissingFileError(f"no distilled latents at {path}", "run `tera distill` first")
    tensors, meta = load_tensors(path)
    return tensors["latents"], list(meta["ids"])


def train(cfg: TeraConfig, progress: bool = True, resume: str | None = "auto") -> dict[str, Any]:
    """Stage 2: the text-conditioned latent diffusion on the distilled latents (shared Trainer; EMA; resume)."""
    start = time.perf_counter()
    dc = cfg.diffusion
    device = train_device(cfg)
    latents, ids = load_latents(cfg)
    ds = load_dataset(cfg)
    index = {a: i for i, a in enumerate(ds.ids)}
    unknown = [a for a in ids if a not in index]
    if unknown:
        raise ConfigError(f"the latents come from avatars not in {ds.root} (e.g. {unknown[0]})",
                          "point data.root at the dataset the run was distilled from")
    captions = [ds.captions(index[a]) for a in ids]
    ncap = len(captions[0])
    text = text_conditioner(cfg, device)
    cond = text([c for caps in captions for c in caps])
    states = cond.states.reshape(len(ids), ncap, *cond.states.shape[1:]).cpu()  # [A, K, L, D]
    masks = cond.mask.reshape(len(ids), ncap, -1).cpu()  # [A, K, L]
    C, r = latents.shape[1], latents.shape[-1]
    with seeded(cfg.seed):  # the initial weights depend on the seed only: runs are reproducible
        model = StructuredLatentDiffusion(
            unet_config(cfg, C, r, text.dim), text=text, num_train_timesteps=dc.num_train_timesteps,
            schedule=dc.schedule, prediction=dc.prediction, text_dropout=dc.text_dropout,
            guidance_scale=dc.guidance_scale, sample_steps=dc.sample_steps, ddim_steps=dc.ddim_steps)
    model.set_latent_stats(latents, per_channel=dc.per_channel_stats)
    bs = min(dc.batch_size, len(ids))
    seed = cfg.seed

    def data(epoch: int) -> list[dict[str, Tensor]]:
        order = np.random.default_rng([seed, 1, epoch]).permutation(len(ids))
        out = []
        for idx in global_batches(order, bs):
            k = [caption_choice(ncap, seed, epoch, int(i), dc.caption_variant) for i in idx]
            out.append(shard_batch({"latents": latents[idx], "states": states[idx, k], "mask": masks[idx, k]}))
        return out

    def step_fn(m, batch):
        return m(batch["latents"], TextCondition(batch["states"], batch["mask"].bool())), {}

    tc = config_to_dict(dc.train)
    out = run_paths(cfg).diffusion
    tc["output_dir"] = str(out)
    tc["progress_bar"] = bool(progress and tc.get("progress_bar", True))
    with run_lock(out):  # one run per folder, held until the model is written
        trainer = Trainer(tc, model,
                          lambda p: torch.optim.AdamW(p, lr=dc.lr, weight_decay=dc.weight_decay), step_fn, data,
                          run_config={**stage_signature(cfg, "diffusion"), "latent_shape": [C, r, r]},
                          config_key="diffusion.train")
        last = trainer.train(resume=resume)
        model = trainer.unwrapped_model
        if trainer.ema is not None:
            trainer.ema.copy_to(model)
        if not trainer.accelerator.is_main_process:
            return {"steps": trainer.step}
        model.save(out / "model")
        result = {"steps": trainer.step, "final_loss": last.get("loss"), "latent_shape": [C, r, r],
                  "avatars": len(ids), "seconds": time.perf_counter() - start}
        save_json(out / "summary.json", result)
    return result


def load_model(cfg: TeraConfig, device: torch.device | None = None) -> StructuredLatentDiffusion:
    """The trained latent diffusion model of the run."""
    path = run_paths(cfg).diffusion / "model"
    if not (path / "config.json").is_file():
        raise MissingFileError(f"no trained latent diffusion model at {path}", "run `tera train` first")
    device = device or resolve_device(cfg.device, cfg.threads)
    return StructuredLatentDiffusion.load(path, device=device).eval()

