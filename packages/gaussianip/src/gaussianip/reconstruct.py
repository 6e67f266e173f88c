"""Stage 3: the Gaussians fitted to the refined views (GaussianIP Sec. 3.3): L1 x 10 + LPIPS x 15, one densification."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from avatar_core.cameras import Cameras
from gaussianip.gaussians import Densifier, optimizer_step, optimizers, render


def reconstruct(params: nn.ParameterDict, cams: Cameras, targets: Tensor, cfg, perceptual,
                progress: bool = True, log: list | None = None) -> nn.ParameterDict:
    """Fit ``params`` to ``targets`` ``[V, H, W, 3]`` seen by ``cams`` (V views); ``perceptual(pred, target)``
    takes ``[B, 3, H, W]`` in [0, 1] and returns a per-image distance ``[B]``."""
    rc, s1 = cfg.recon, cfg.stage1
    opts = optimizers(params, s1.optim)
    from copy import deepcopy

    dcfg = deepcopy(s1.densify)
    dens = Densifier(params, opts, dcfg, rc.steps, dcfg.extent)
    dens.refine_at = {max(int(round(rc.densify_step * rc.steps / rc.reference_steps)), 1)}
    dens.prune_at = -1
    g = torch.Generator().manual_seed(cfg.seed + 3)
    V = len(cams)
    for step in tqdm(range(rc.steps), desc="stage 3 (reconstruction)", disable=not progress):
        idx = torch.randperm(V, generator=g)[: min(rc.batch_size, V)]
        rgb, _, _, meta = render(params, cams[idx], s1.background)
        dens.pre_backward(step, meta)
        pred, tgt = rgb.permute(0, 3, 1, 2), targets[idx].permute(0, 3, 1, 2)
        l1 = (pred - tgt).abs().mean()
        lp = perceptual(pred, tgt).mean()
        loss = rc.l1_weight * l1 + rc.lpips_weight * lp
        loss.backward()
        optimizer_step(opts, dens, meta, s1.optim, step, rc.steps)
        if log is not None:
            log.append({"step": step, "l1": float(l1.detach()), "lpips": float(lp.detach()), "gaussians": int(params["means"].shape[0])})
    return params
