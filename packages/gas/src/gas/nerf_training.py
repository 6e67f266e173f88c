"""Stage 1 training and use: the human NeRF learns reference view -> other views and other poses (SHERF's losses).

Each step takes one training clip, encodes its reference image and renders ``targets_per_step`` of its frames
(other views on a view clip, other poses on a pose clip) with stratified samples; the loss is SHERF's
``100 MSE + 10 mask MSE + (1 - SSIM) + perceptual``. The loop is the kernel's :class:`~avatar_core.train.Trainer`
(checkpoints, exact resume, run lock). Once trained, :func:`cache_renders` renders every frame of every clip
from its reference and caches the renders for stage 2.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from avatar_core.body import load_body_model
from avatar_core.errors import MissingFileError
from avatar_core.io import load_tensors
from avatar_core.metrics import ssim
from avatar_core.train import Trainer, config_signature, latest_checkpoint
from gas.body_warp import BodyWarp
from gas.data import ClipStore, dataset_sources, ensure_clips, load_render, render_cache_path, save_render, split
from gas.human_nerf import HumanNeRF, NeRFConfig

log = logging.getLogger(__name__)

#: Settings that may change when stage 1 resumes (everything downstream of it).
NERF_MAY_CHANGE = ("video", "video.*", "video_train", "video_train.*", "sample", "sample.*", "run")


def nerf_dir(cfg: Any) -> Path:
    return Path(cfg.run) / "nerf"


def body_for(cfg: Any):
    kw = {"model_dir": cfg.body_dir} if cfg.body_dir else {}
    return load_body_model(cfg.body, **kw)


def build_nerf(cfg: Any, body=None) -> HumanNeRF:
    body = body if body is not None else body_for(cfg)
    ncfg = NeRFConfig(**OmegaConf.to_container(cfg.nerf, resolve=True)) if not isinstance(cfg.nerf, NeRFConfig) else cfg.nerf
    return HumanNeRF(BodyWarp(body, ncfg.anchor_stride), ncfg)


def perceptual_loss_fn(cfg: Any):
    """SHERF's LPIPS term: the kernel's perceptual module (LPIPS from local VGG-16 weights, else its named
    random-feature stand-in, logged); None at weight 0."""
    if cfg.nerf_train.perceptual_weight <= 0:
        return None
    from avatar_core.perceptual import PerceptualLoss

    return PerceptualLoss(cfg.nerf_train.perceptual_weights or None)


def nerf_losses(model: HumanNeRF, clip, bodies, frames: torch.Tensor, cfg: Any,
                perceptual=None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    code = model.encode(clip.ref_rgba, clip.ref_camera, bodies.ref, bodies.big)
    preds, alphas = [], []
    for k in frames.tolist():
        rgb, a = model.render(code, bodies.frames[k], clip.cameras[k:k + 1], stratified=True, generator=generator)
        preds.append(rgb)
        alphas.append(a)
    rgb, alpha = torch.cat(preds), torch.cat(alphas)
    tgt = clip.rgba[frames]
    t_rgb, t_a = tgt[..., :3] * tgt[..., 3:], tgt[..., 3:]
    t = cfg.nerf_train
    mse = ((rgb - t_rgb) ** 2).mean()
    mask = ((alpha - t_a) ** 2).mean()
    s = ssim(rgb, t_rgb).mean()
    loss = t.mse_weight * mse + t.mask_weight * mask + t.ssim_weight * (1 - s)
    metrics = {"mse": mse.detach(), "mask": mask.detach(), "ssim": s.detach()}
    if perceptual is not None:
        p = perceptual(rgb.clamp(0, 1), t_rgb).mean()
        loss = loss + t.perceptual_weight * p
        metrics["perceptual"] = p.detach()
    return loss, metrics


def train_nerf(cfg: Any, resume: str | None = "auto", progress: bool = True) -> Path:
    """Train stage 1 into ``<run>/nerf``; returns the last checkpoint folder."""
    root = ensure_clips(cfg, progress)
    train_clips, _ = split(cfg, root)
    train_clips = train_clips + dataset_sources(cfg)
    body = body_for(cfg)
    store = ClipStore(BodyWarp(body, cfg.nerf.anchor_stride))
    frames = cfg.data.frames
    k = min(cfg.nerf_train.targets_per_step, frames)
    seed = cfg.nerf_train.train.seed

    def data(epoch: int):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(train_clips))
        return [{"clip": torch.tensor(int(i)), "frames": torch.as_tensor(rng.choice(frames, k, replace=False))}
                for i in order]

    perceptual = perceptual_loss_fn(cfg)

    def step(model: HumanNeRF, batch: dict) -> tuple[torch.Tensor, dict]:
        clip, bodies = store.get(train_clips[int(batch["clip"])])
        return nerf_losses(model, clip, bodies, batch["frames"].cpu(), cfg, perceptual)

    tcfg = OmegaConf.to_container(cfg.nerf_train.train, resolve=True)
    tcfg["output_dir"] = str(nerf_dir(cfg))
    tcfg["progress_bar"] = bool(tcfg.get("progress_bar", True) and progress)
    trainer = Trainer(tcfg, lambda: build_nerf(cfg, body), lambda p: torch.optim.Adam(p, cfg.nerf_train.lr), step,
                      data, run_config=config_signature(_stage1_view(cfg), allow=NERF_MAY_CHANGE),
                      config_key="nerf_train.train")
    trainer.train(resume=resume)
    return latest_checkpoint(nerf_dir(cfg))


def _stage1_view(cfg: Any) -> dict:
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in ("body", "data", "nerf", "nerf_train")}


def load_nerf(cfg: Any, body=None) -> tuple[HumanNeRF, str]:
    """The trained stage-1 model (latest checkpoint) and the checkpoint's path as its identity."""
    ckpt = latest_checkpoint(nerf_dir(cfg))
    if ckpt is None:
        raise MissingFileError(f"no stage-1 checkpoint in {nerf_dir(cfg)}", "run `gas train-nerf` first")
    model = build_nerf(cfg, body)
    state, _ = load_tensors(Path(ckpt) / "model.safetensors")
    model.load_state_dict(state)
    return model.eval(), str(Path(ckpt).resolve())


@torch.no_grad()
def render_clip(model: HumanNeRF, clip, bodies) -> tuple[torch.Tensor, torch.Tensor]:
    """NeRF renders of every frame of a clip from its reference: premultiplied rgb [T,H,W,3], alpha [T,H,W,1]."""
    code = model.encode(clip.ref_rgba, clip.ref_camera, bodies.ref, bodies.big)
    outs = [model.render(code, bodies.frames[k], clip.cameras[k:k + 1]) for k in range(clip.num_frames)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def cache_renders(cfg: Any, progress: bool = True) -> list[Path]:
    """Render and cache every clip (training and held-out) once stage 1 is trained; reuses fresh entries."""
    from tqdm.auto import tqdm

    root = ensure_clips(cfg, progress)
    model, source = load_nerf(cfg)
    store = ClipStore(model.warp)
    train_clips, held = split(cfg, root)
    paths = []
    for p in tqdm(train_clips + held, desc="nerf renders", unit="clip", disable=not progress):
        out = render_cache_path(cfg, p)
        if load_render(out, source) is None:
            clip, bodies = store.get(p)
            rgb, alpha = render_clip(model, clip, bodies)
            save_render(out, rgb, alpha, source)
        paths.append(out)
    return paths
