"""Stage 2 training: the video UNet on clips with their cached NeRF renders, view and pose clips in one batch.

Embedded default: the tiny VAE is fitted to the clip frames first (``<run>/vae``; a pretrained SVD VAE skips
this), then frozen; every clip's encodings are computed once -- frame latents (scaled), the reference latent
(unscaled mode) and CLIP embedding, the NeRF renders' latents (unscaled mode), the normal maps -- and every step
draws ``batch_size`` clips, half novel-view and half novel-pose, each with its switcher label, and takes SVD's EDM
loss (:mod:`gas.objective`). Ablation variants (``video.conditioning.nerf=false``, ``...switcher=false``) train
into their own folders, ``<run>/video_<video_train.name>``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from avatar_core.errors import MissingFileError
from avatar_core.io import load_tensors
from avatar_core.train import Trainer, config_signature, latest_checkpoint, seeded
from gas.data import ensure_clips, kind_of, load_render, on_white, premultiplied_on_white, render_cache_path, split
from gas.objective import EDMConfig, edm_loss
from gas.svd_parts import (
    VideoParts,
    added_time_ids,
    build_tiny_parts,
    clip_embedding,
    load_paper_parts,
    vae_latents,
    vae_mode,
)
from gas.video_unet import ConditioningConfig, task_labels

log = logging.getLogger(__name__)

VIDEO_MAY_CHANGE = ("sample", "sample.*", "run", "nerf_train", "nerf_train.*")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def conditioning(cfg: Any) -> ConditioningConfig:
    return ConditioningConfig(**_plain(cfg.video.conditioning))


def video_dir(cfg: Any) -> Path:
    return Path(cfg.run) / f"video_{cfg.video_train.name}"


def vae_dir(cfg: Any) -> Path:
    return Path(cfg.run) / "vae"


def build_parts(cfg: Any) -> VideoParts:
    """Fresh parts: SVD from the local folder (paper) or tiny seeded random-weight parts (embedded default)."""
    v = cfg.video
    if v.pretrained:
        return load_paper_parts(v.pretrained, conditioning(cfg), dtype=getattr(torch, v.dtype))
    with seeded(cfg.video_train.train.seed):
        return build_tiny_parts(_plain(v.unet), _plain(v.vae), _plain(v.image_encoder), _plain(v.scheduler),
                                conditioning(cfg))


# ------------------------------------------------------------------------------------------------ tiny VAE
def fit_vae(cfg: Any, parts: VideoParts, clips: list[Path], resume: str | None = "auto", progress: bool = True) -> None:
    """Fit the tiny VAE to clip frames (reconstruction + a light KL), then load it into ``parts``."""
    from avatar_core.data.clips import load_clip

    frames = [on_white(load_clip(p).rgba) for p in clips]  # each [T, H, W, 3]
    seed = cfg.video_train.train.seed

    def data(epoch: int):
        rng = np.random.default_rng([seed, epoch, 1])
        return [{"clip": torch.tensor(int(i))} for i in rng.permutation(len(frames))]

    def step(vae, batch):
        x = frames[int(batch["clip"])].permute(0, 3, 1, 2) * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(), num_frames=x.shape[0]).sample
        mse = ((rec - x) ** 2).mean()
        kl = post.kl().mean() / x[0].numel()
        return mse + 1e-3 * kl, {"mse": mse.detach(), "kl": kl.detach()}

    out = vae_dir(cfg)
    tcfg = {"output_dir": str(out), "max_steps": int(cfg.video_train.vae_steps), "seed": seed,
            "checkpoint_every": 10**9, "log_every": 25, "progress_bar": progress}
    vae = parts.vae
    trainer = Trainer(tcfg, vae, lambda p: torch.optim.Adam(p, cfg.video_train.vae_lr), step, data,
                      run_config={"vae": _plain(cfg.video.vae),
                                  # fitted on the clips only: the stage-1 multi-view dataset does not change it
                                  "data": {k: v for k, v in _plain(cfg.data).items() if k != "dataset"}})
    if cfg.video_train.vae_steps > 0:
        trainer.train(resume=resume)
    load_vae(cfg, parts)


def load_vae(cfg: Any, parts: VideoParts) -> None:
    if cfg.video.pretrained:
        return
    ckpt = latest_checkpoint(vae_dir(cfg))
    if ckpt is None:
        raise MissingFileError(f"no tiny VAE in {vae_dir(cfg)}", "run `gas train-video` first")
    state, _ = load_tensors(Path(ckpt) / "model.safetensors")
    parts.vae.load_state_dict(state)
    parts.vae.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ encodings
@torch.no_grad()
def encode_clip(cfg: Any, parts: VideoParts, path: Path, nerf_source: str | None = None) -> dict[str, torch.Tensor]:
    """Everything stage 2 needs of one clip, encoded once (batch dim 1)."""
    from avatar_core.data.clips import load_clip

    clip = load_clip(path)
    cached = load_render(render_cache_path(cfg, path), nerf_source)
    if cached is None:
        raise MissingFileError(f"no (fresh) NeRF renders for {path.name}",
                               "run `gas train-video`, which caches them from the trained stage-1 model")
    rgb, alpha = cached
    ref = on_white(clip.ref_rgba)[None]
    return {
        "latents": vae_latents(parts, on_white(clip.rgba)[None]),
        "ref_latent": vae_mode(parts, ref),
        "context": clip_embedding(parts, ref)[0],
        "nerf_latents": vae_mode(parts, premultiplied_on_white(rgb, alpha)[None]),
        "normals": clip.normals.permute(0, 3, 1, 2)[None],
        "task": task_labels([kind_of(path)]),
    }


def conditions(cfg: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = cfg.video.conditioning
    kw = {}
    if g.nerf:
        kw["nerf_latents"] = batch["nerf_latents"]
    if g.normal:
        kw["normal_maps"] = batch["normals"]
    if g.switcher:
        kw["task"] = batch["task"]
    return kw


def train_video(cfg: Any, resume: str | None = "auto", progress: bool = True) -> Path:
    """Stage 2 into ``<run>/video_<name>`` (needs stage 1: its renders are cached first)."""
    from gas.nerf_training import cache_renders, load_nerf

    root = ensure_clips(cfg, progress)
    cache_renders(cfg, progress)
    _, source = load_nerf(cfg)
    train_clips, _ = split(cfg, root)
    parts = build_parts(cfg)
    if not cfg.video.pretrained:
        fit_vae(cfg, parts, train_clips, resume, progress)
    parts.vae.requires_grad_(False)
    parts.image_encoder.requires_grad_(False)
    enc = [encode_clip(cfg, parts, p, source) for p in train_clips]
    views = [i for i, p in enumerate(train_clips) if kind_of(p) == "view"]
    poses = [i for i, p in enumerate(train_clips) if kind_of(p) == "pose"]
    B = cfg.video_train.batch_size
    seed = cfg.video_train.train.seed
    s = cfg.sample

    def data(epoch: int):
        rng = np.random.default_rng([seed, epoch, 2])
        n = max(len(train_clips) // B, 1)
        batches = []
        for _ in range(n):
            # Joint training: half novel-view, half novel-pose clips in every batch.
            ids = list(rng.choice(views, (B + 1) // 2)) + list(rng.choice(poses, B // 2)) if views and poses \
                else list(rng.choice(len(train_clips), B))
            batches.append({k: torch.cat([enc[int(i)][k] for i in ids]) for k in enc[0]})
        return batches

    edm = EDMConfig(**_plain(cfg.video_train.edm))
    gen = torch.Generator().manual_seed(seed)

    def step(unet, batch):
        ids = added_time_ids(s.fps, s.motion_bucket_id, s.noise_aug, batch["latents"].shape[0], batch["latents"].device)
        return edm_loss(unet, batch["latents"], batch["ref_latent"], batch["context"], ids, edm, gen,
                        **conditions(cfg, batch))

    tcfg = _plain(cfg.video_train.train)
    tcfg["output_dir"] = str(video_dir(cfg))
    tcfg["progress_bar"] = bool(tcfg.get("progress_bar", True) and progress)
    view = {k: _plain(cfg[k]) for k in ("body", "data", "nerf", "video", "video_train")}
    trainer = Trainer(tcfg, parts.unet, lambda p: torch.optim.AdamW(p, cfg.video_train.lr, weight_decay=0.0), step,
                      data, run_config=config_signature(view, allow=VIDEO_MAY_CHANGE),
                      config_key="video_train.train")
    trainer.train(resume=resume)
    return latest_checkpoint(video_dir(cfg))


def load_video(cfg: Any) -> VideoParts:
    """Parts with the trained UNet (and tiny VAE) of ``<run>/video_<name>``."""
    parts = build_parts(cfg)
    load_vae(cfg, parts)
    ckpt = latest_checkpoint(video_dir(cfg))
    if ckpt is None:
        raise MissingFileError(f"no video model in {video_dir(cfg)}", "run `gas train-video` first")
    state, _ = load_tensors(Path(ckpt) / "model.safetensors")
    parts.unet.load_state_dict(state)
    parts.unet.eval()
    return parts
