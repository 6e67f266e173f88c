"""The 3D Gaussian human (GaussianIP Sec. 3.1): body-surface initialisation, per-attribute Adam, rendering,
densification and pruning by gsplat's DefaultStrategy on the kernel rasterizer, and PLY export."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from avatar_core.body import UVMapper, load_body_model
from avatar_core.cameras import Cameras
from avatar_core.io import load_tensors, save_ply, save_tensors
from avatar_core.io.ply import rgb_to_sh
from avatar_core.render import rasterize_gaussians

KEYS = ("means", "scales", "quats", "opacities", "sh0")


@dataclass
class BodyFrame:
    """The posed rest body scaled to ``height`` and centred at the origin: the frame all cameras live in."""

    body: object
    vertices: Tensor  # [V, 3] normalised
    scale: float
    offset: Tensor  # [3]; normalised = (metres + offset) * scale


def body_frame(cfg) -> BodyFrame:
    body = load_body_model(cfg.body, model_dir=cfg.body_dir)
    with torch.no_grad():
        v = body().vertices[0].float()
    lo, hi = v.min(0).values, v.max(0).values
    offset = -(lo + hi) / 2
    scale = cfg.body_height / float(hi[1] - lo[1])
    return BodyFrame(body, (v + offset) * scale, scale, offset)


def init_from_body(frame: BodyFrame, cfg, seed: int = 0) -> nn.ParameterDict:
    """``num_points`` Gaussians sampled uniformly on the body surface (paper 100K), opacity 0.1, SH degree 0."""
    mapper = UVMapper(frame.body, 128)
    face_idx, bary, _ = mapper.sample_points(int(cfg.num_points), seed=seed)
    means = mapper.points_on_surface(frame.vertices[None], face_idx, bary)[0].float()
    n = means.shape[0]
    g = torch.Generator().manual_seed(seed)
    rgb = 0.5 + 0.05 * torch.randn(n, 3, generator=g)
    return nn.ParameterDict({
        "means": nn.Parameter(means),
        "scales": nn.Parameter(torch.full((n, 3), float(cfg.init_scale)).log()),
        "quats": nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1)),
        "opacities": nn.Parameter(torch.logit(torch.full((n,), float(cfg.init_opacity)))),
        "sh0": nn.Parameter(rgb_to_sh(rgb.clamp(0, 1))[:, None, :]),
    })


def optimizers(params: nn.ParameterDict, ocfg) -> dict[str, torch.optim.Optimizer]:
    """One Adam per attribute (eps 1e-15), the official code's learning rates; gsplat's strategies need this layout."""
    lrs = {"means": ocfg.xyz_lr[0], "sh0": ocfg.color_lr, "opacities": ocfg.opacity_lr, "scales": ocfg.scaling_lr,
           "quats": ocfg.rotation_lr}
    return {k: torch.optim.Adam([{"params": [params[k]], "lr": lrs[k], "name": k}], eps=ocfg.eps) for k in KEYS}


def set_xyz_lr(opts: dict, ocfg, step: int, steps: int) -> None:
    """Exponential decay of the position learning rate from xyz_lr[0] to xyz_lr[1] over the stage."""
    a, b = ocfg.xyz_lr
    frac = min(max(step / max(steps - 1, 1), 0.0), 1.0)
    for group in opts["means"].param_groups:
        group["lr"] = a * (b / a) ** frac


def optimizer_step(opts: dict, dens: Densifier, meta: dict, ocfg, step: int, steps: int) -> None:
    """After ``loss.backward()``: densify / prune on this step's gradients (gsplat's post-backward), decay the
    position learning rate (:func:`set_xyz_lr`), then one Adam step per attribute and clear the gradients."""
    dens.post_backward(step, meta)
    set_xyz_lr(opts, ocfg, step, steps)
    for opt in opts.values():
        opt.step()
        opt.zero_grad(set_to_none=True)


def render(params: nn.ParameterDict, cams: Cameras, background: Tensor | list[float]) -> tuple[Tensor, Tensor, Tensor, dict]:
    """RGB ``[C, H, W, 3]``, expected depth ``[C, H, W, 1]``, alpha and the rasterizer meta (for densification)."""
    bg = torch.as_tensor(background, dtype=torch.float32).reshape(1, 3).expand(len(cams), 3)
    cams = cams.to(params["means"].device, torch.float32)
    out, alpha, meta = rasterize_gaussians(
        params["means"], params["quats"], params["scales"].exp(), torch.sigmoid(params["opacities"]), params["sh0"],
        cams.viewmats, cams.Ks, cams.width, cams.height, sh_degree=0, backgrounds=bg, render_mode="RGB+ED")
    return out[..., :3], out[..., 3:], alpha, meta


class Densifier:
    """gsplat's DefaultStrategy fired at chosen steps only (the paper's or the code's schedule), plus the
    official prune-only pass (low opacity or large scale)."""

    def __init__(self, params, opts, dcfg, steps: int, scene_scale: float):
        from gsplat.strategy import DefaultStrategy

        f = steps / dcfg.reference_steps
        if dcfg.schedule == "paper":
            ref = list(range(200, 1701, 800))
        elif dcfg.schedule == "code":
            ref = [500, 1000, 1500]
        else:
            from avatar_core.errors import ConfigError

            raise ConfigError(f"unknown densify schedule {dcfg.schedule!r}", "use 'paper' or 'code'")
        self.refine_at = {max(int(round(s * f)), 1) for s in ref}
        self.prune_at = max(int(round(dcfg.prune_only_step * f)), 1)
        self.cfg = dcfg
        # Refinement happens when the strategy sees an even step; every other call only accumulates gradients.
        self.strategy = DefaultStrategy(prune_opa=dcfg.min_opacity, grow_grad2d=dcfg.grad_threshold,
                                        grow_scale3d=0.01, refine_start_iter=0, refine_stop_iter=10**9,
                                        refine_every=2, reset_every=10**9, refine_scale2d_stop_iter=0, verbose=False)
        self.state = self.strategy.initialize_state(scene_scale=scene_scale)
        self.params, self.opts = params, opts

    def pre_backward(self, step: int, meta: dict) -> None:
        self.strategy.step_pre_backward(self.params, self.opts, self.state, 1, meta)

    def post_backward(self, step: int, meta: dict) -> None:
        s = 2 if step in self.refine_at else 1
        self.strategy.step_post_backward(self.params, self.opts, self.state, s, meta, packed=False)
        if step == self.prune_at:
            from gsplat.strategy.ops import remove

            with torch.no_grad():
                bad = (torch.sigmoid(self.params["opacities"]) < self.cfg.prune_only_opacity) | \
                      (self.params["scales"].exp().amax(-1) > self.cfg.prune_only_scale)
            if bool(bad.any()) and not bool(bad.all()):
                remove(self.params, self.opts, self.state, bad)


def save_gaussians(path, params: nn.ParameterDict, meta: dict | None = None) -> None:
    save_tensors(path, {k: params[k].detach() for k in KEYS}, metadata=meta or {})


def load_gaussians(path) -> nn.ParameterDict:
    t, _ = load_tensors(path)
    return nn.ParameterDict({k: nn.Parameter(t[k]) for k in KEYS})


def export_ply(path, params: nn.ParameterDict):
    """The standard 3DGS PLY (opens in splat viewers)."""
    return save_ply(path, params["means"].detach(), params["quats"].detach(), params["scales"].detach(),
                    params["opacities"].detach(), sh=params["sh0"].detach(), activated=False)
