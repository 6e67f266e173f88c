"""Stage 1: the 3D Gaussian human optimised by HDS with the adaptive timestep schedule (GaussianIP Sec. 3.1-3.2)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from avatar_core.body.model import OPENPOSE_18
from gaussianip.gaussians import BodyFrame, Densifier, optimizer_step, optimizers, render
from gaussianip.hds import HDSConditions, hds_step
from gaussianip.prior import FaceIdentity, Prior
from gaussianip.prior_train import pose_images
from gaussianip.timesteps import TimestepSchedule
from gaussianip.views import sample_views, view_prompts


def body_keypoints(frame: BodyFrame) -> Tensor:  # [18, 3] in the normalised frame
    with torch.no_grad():
        out = frame.body()
        kp = frame.body.keypoints(out, OPENPOSE_18)[0].float()
    return (kp + frame.offset) * frame.scale


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size:
        return x
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class PromptCache:
    """Token states of prompts, encoded once each."""

    def __init__(self, prior: Prior):
        self.prior, self.cache = prior, {}

    def __call__(self, prompts: list[str]) -> Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if new:
            for p, tok in zip(new, self.prior.encode_text(new)):
                self.cache[p] = tok
        return torch.stack([self.cache[p] for p in prompts])


def sparsity_loss(depth: Tensor, alpha: Tensor, opacities: Tensor, kind: str) -> Tensor:
    """mean(sqrt(x^2 + 0.01)) on depth / max(depth) (official code) or on the opacities."""
    if kind == "depth":
        x = depth / depth.detach().amax().clamp_min(1e-6)
    elif kind == "opacity":
        x = opacities
    else:
        from avatar_core.errors import ConfigError

        raise ConfigError(f"unknown stage1.sparsity {kind!r}", "use 'depth' (official code) or 'opacity'")
    return torch.sqrt(x ** 2 + 0.01).mean()


def run_stage1(prior: Prior, frame: BodyFrame, params: nn.ParameterDict, prompt: str, identity: FaceIdentity,
               null_identity: FaceIdentity, cfg, preview_dir: Path | None = None, progress: bool = True,
               log: list | None = None) -> nn.ParameterDict:
    """Optimise ``params`` for ``cfg.stage1.steps`` HDS steps; returns them (densified / pruned in place)."""
    from avatar_core.io import image_grid, save_image

    s1 = cfg.stage1
    opts = optimizers(params, s1.optim)
    dens = Densifier(params, opts, s1.densify, s1.steps, s1.densify.extent)
    schedule = TimestepSchedule(kind=s1.timesteps, num_steps=s1.steps)
    g = torch.Generator().manual_seed(cfg.seed)
    kp = body_keypoints(frame)
    texts = PromptCache(prior)
    text_neg = prior.encode_text([cfg.prior.negative_prompt])
    text_null = prior.null_text(1)
    id_neg = prior.zero_identity()
    prior.set_ip_scale(s1.ip_scale, s1.structure_scale)
    B, S = s1.batch_size, prior.image_size
    ref = s1.densify.reference_steps
    for step in tqdm(range(s1.steps), desc="stage 1 (HDS)", disable=not progress):
        views = sample_views(s1.cameras, int(step * ref / s1.steps), B, s1.render_size, g)
        rgb, depth, alpha, meta = render(params, views.cameras, s1.background)
        dens.pre_backward(step, meta)
        latents = prior.encode(_resize(rgb.permute(0, 3, 1, 2), S))
        poses = _resize(pose_images(kp, views.cameras, views.azimuth, views.kind), S)
        cond = HDSConditions(text_neg.expand(B, -1, -1), texts(view_prompts(prompt, views)), text_null.expand(B, -1, -1),
                             id_neg.expand(B), identity.expand(B), null_identity.expand(B), poses)
        t = schedule.sample(step, g)
        loss, info = hds_step(prior, latents, t, cond, s1.guidance_scale, s1.denoiser_switch_t, s1.grad_clip,
                              s1.controlnet_scale, generator=g)
        if s1.sparsity_weight > 0:
            loss = loss + s1.sparsity_weight * sparsity_loss(depth, alpha, torch.sigmoid(params["opacities"]), s1.sparsity)
        loss.backward()
        optimizer_step(opts, dens, meta, s1.optim, step, s1.steps)
        if log is not None:
            log.append({"step": step, "t": t, "loss": float(loss.detach()), "gaussians": int(params["means"].shape[0]),
                        "view": views.kind})
        if preview_dir is not None and (step + 1) % max(s1.preview_every, 1) == 0:
            save_image(Path(preview_dir) / f"stage1_{step + 1:05d}.png", image_grid(list(rgb.detach().clamp(0, 1)), nrow=B))
    return params
