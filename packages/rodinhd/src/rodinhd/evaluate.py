"""RodinHD's evaluation (``rodinhd evaluate``): fitting and generation PSNR / SSIM (LPIPS when weights are
configured), the 3D-consistency refit, and the Table 4(a) fitting ablation (``rodinhd ablate-fitting``)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from avatar_core.cameras import orbit_cameras
from avatar_core.config import to_settings
from avatar_core.env import resolve_device
from avatar_core.io import save_json
from avatar_core.metrics import psnr as psnr_fn
from avatar_core.metrics import ssim as ssim_fn
from avatar_core.perceptual import PerceptualLoss
from rodinhd.config import RodinHDConfig
from rodinhd.data import open_data
from rodinhd.decoder import TriplaneDecoder
from rodinhd.fitting import evaluate_fit, fit_triplanes
from rodinhd.image_loss import VGGPerceptual
from rodinhd.models import load_decoder, triplane_kwargs
from rodinhd.renderer import render_views
from rodinhd.sample import TriplaneSampler
from rodinhd.triplane import TriplaneStore

__all__ = ["ablate", "ablate_triplane", "ablation_lpips", "evaluate", "format_eval", "refit_consistency"]


def _on(bg: Tensor, rgba: Tensor) -> Tensor:  # [..., 4] straight alpha -> [..., 3]
    return rgba[..., :3] * rgba[..., 3:] + bg * (1 - rgba[..., 3:])


def _scores(pred: Tensor, target: Tensor, lpips: nn.Module | None) -> dict[str, float]:
    out = {"psnr": float(psnr_fn(pred, target).mean())}
    if min(pred.shape[1:3]) >= 11:
        out["ssim"] = float(ssim_fn(pred, target).mean())
    if lpips is not None:
        with torch.no_grad():
            out["lpips"] = float(lpips(pred, target))
    return out


def _mean(rows: list[dict]) -> dict[str, float]:
    keys = rows[0].keys() if rows else []
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def refit_consistency(cfg: RodinHDConfig, planes: Tensor, decoder: TriplaneDecoder, work: Path, iterations: int,
                      views: int, res: int, rays_per_step: int) -> dict:
    """The 3D-consistency check: render ``views`` orbit views of a generated triplane, fit a fresh triplane to them
    with the frozen decoder (stage 2's fitting), and score the refit's renders against those views."""
    r = cfg.render
    cams = orbit_cameras(views, cfg.sample.radius, cfg.sample.elevation, cfg.sample.fov_deg, res, res)
    rgb, alpha = render_views(planes, decoder, cams, cfg.triplane.bound, cfg.triplane.center, r.num_samples,
                              r.occupancy, r.grid_resolution, r.grid_updates, background=None)
    straight = torch.where(alpha > 1e-4, rgb / alpha.clamp_min(1e-4), torch.zeros_like(rgb)).clamp(0, 1)
    target = torch.cat([straight, alpha], dim=-1)  # [V, H, W, 4]
    store = TriplaneStore(work, cfg.triplane.channels, cfg.triplane.resolution)
    settings = replace(to_settings(cfg.stage2), iterations=iterations, rays_per_step=rays_per_step)
    fit_triplanes(lambda _: (target, cams), ["refit"], decoder, store, None, settings, seed=cfg.seed, rank=0,
                  world_size=1, progress=False, **triplane_kwargs(cfg))
    scores = evaluate_fit(lambda _: (target, cams), ["refit"], decoder, store, num_samples=r.num_samples,
                          occupancy=r.occupancy, grid_resolution=r.grid_resolution,
                          background=list(r.background), **triplane_kwargs(cfg))["refit"]
    return {"refit_psnr": scores["psnr"], "refit_ssim": scores["ssim"], "views": views, "res": res,
            "iterations": iterations}


def evaluate(cfg: RodinHDConfig, out: str | os.PathLike = "outputs/rodinhd", progress: bool = True) -> dict:
    """``rodinhd evaluate``: fitting PSNR/SSIM (stage-2 triplanes vs their views), generation PSNR/SSIM (a sample
    from each scored avatar's portrait vs its ground-truth views), LPIPS when weights are configured, and the
    refit PSNR of the 3D-consistency check. Written to ``<out>/eval.json``.

    Generation is scored on held-out avatars only (``generation.held_out``: portraits the models never saw); the
    same scores on training avatars are a separate row (``generation.training``), a measure of memorisation, never
    averaged with the held-out one. Each row takes up to ``evaluate.num_avatars`` avatars."""
    out = Path(out)
    e, r = cfg.evaluate, cfg.render
    data = open_data(cfg, out)
    device = resolve_device(cfg.device)
    decoder = load_decoder(cfg, out, device)
    lpips = VGGPerceptual.from_local(e.vgg_path, e.lpips_path).to(device) if (e.vgg_path and e.lpips_path) else None
    bg = torch.as_tensor(list(r.background), dtype=torch.float32, device=device)
    fit_ids = data.train_ids[: e.num_avatars]
    store = TriplaneStore(out / "triplanes", cfg.triplane.channels, cfg.triplane.resolution)
    fit_rows = []
    for a in fit_ids:
        images, cams = data.get_views(a)
        rgb, _ = render_views(store.load(a, device), decoder, cams, cfg.triplane.bound, cfg.triplane.center,
                              r.num_samples, r.occupancy, r.grid_resolution, r.grid_updates, background=bg)
        fit_rows.append(_scores(rgb, _on(bg, images.to(device)), lpips))
    gen = TriplaneSampler(cfg, out, device)
    held_ids, train_ids = data.held_out_ids[: e.num_avatars], data.train_ids[: e.num_avatars]
    gen_rows, first = [], None
    for a in held_ids + train_ids:
        images, cams = data.get_views(a)
        planes, _ = gen(data.portrait(a), cfg.sample.seed, cfg.sample.base_steps, cfg.sample.upsample_steps,
                        cfg.sample.guidance_scale)
        first = planes if first is None else first  # the first held-out avatar's, if there is one
        rgb, _ = render_views(planes, decoder, cams, cfg.triplane.bound, cfg.triplane.center, r.num_samples,
                              r.occupancy, r.grid_resolution, r.grid_updates, background=bg)
        gen_rows.append({"avatar": a, "held_out": a in data.held_out_ids,
                         **_scores(rgb, _on(bg, images.to(device)), lpips)})
    consistency = refit_consistency(cfg, first, decoder, out / "eval" / "refit", e.refit_iterations, e.refit_views,
                                    e.refit_res, e.refit_rays_per_step)
    def row(held: bool) -> dict:
        rows = [g for g in gen_rows if g["held_out"] == held]
        return {"avatars": [g["avatar"] for g in rows],
                **_mean([{k: v for k, v in g.items() if k not in ("avatar", "held_out")} for g in rows])}

    result = {"fitting": {"avatars": fit_ids, **_mean(fit_rows)},
              "generation": {"held_out": row(True), "training": row(False), "per_avatar": gen_rows},
              "consistency": consistency,
              "lpips": "reported" if lpips is not None else "not reported (set evaluate.vgg_path and lpips_path)"}
    save_json(out / "eval.json", result)
    return result


def format_eval(result: dict) -> str:
    """The evaluation as a table: fitting, generation on held-out avatars, and (labelled apart) on training ones."""
    metrics = ["psnr", "ssim", "lpips"]
    g = result["generation"]
    rows = [("fitting (stage-2 triplanes, training avatars)", result["fitting"]),
            ("generation, held-out avatars", g["held_out"]),
            ("generation, training avatars (seen in training)", g["training"])]
    lines = [f"{'':50s} {'n':>3s} " + " ".join(f"{m.upper():>7s}" for m in metrics)]
    for name, r in rows:
        vals = " ".join(f"{r[m]:7.3f}" if m in r else f"{'-':>7s}" for m in metrics)
        lines.append(f"{name:50s} {len(r.get('avatars', [])):3d} {vals}")
    c = result.get("consistency", {})
    if c:
        lines.append(f"3D consistency refit of a held-out sample: PSNR {c['refit_psnr']:.2f}, SSIM {c['refit_ssim']:.3f}")
    return "\n".join(lines)


def ablation_lpips(cfg: RodinHDConfig) -> tuple[nn.Module, str]:
    """The LPIPS column of ``rodinhd ablate-fitting`` and a line saying what it is: LPIPS (the kernel's
    :class:`avatar_core.perceptual.PerceptualLoss`) over the VGG-16 state dict ``evaluate.vgg_path`` with the lpips
    package's linear heads (``evaluate.lpips_path``, else the installed package's ``weights/v0.1/vgg.pth``); without
    VGG-16 weights, the kernel's random-feature stand-in, named as such in the table."""
    e = cfg.evaluate
    if e.vgg_path:
        metric = PerceptualLoss(e.vgg_path, e.lpips_path or "auto", net="vgg")
        heads = metric.describe().get("lin_weights") or e.lpips_path
        return metric, f"LPIPS: VGG-16 {e.vgg_path} with the linear heads {heads}."
    metric = PerceptualLoss(None)
    return metric, ("LPIPS column is a STAND-IN: no VGG-16 weights (evaluate.vgg_path), so it is the kernel's "
                    "random-feature distance compared like LPIPS (lower = closer), not LPIPS.")


def ablate(cfg: RodinHDConfig, out: str | os.PathLike = "outputs/rodinhd", progress: bool = True) -> list[dict]:
    """``rodinhd ablate-fitting``: the Table 4(a) rows A-E (:mod:`rodinhd.ablation`) for each of ``ablation.seeds``
    (empty: the run's seed), scored on every avatar's held-out views; returns per row the mean over seeds and the
    half range (:func:`rodinhd.ablation.summarize_seeds`). Writes ``<out>/ablation/seed<k>/<row>/`` (resumable),
    ``table.txt`` and ``results.json`` (the summary, every seed's rows and what the LPIPS column is)."""
    from rodinhd.ablation import ablate_fitting, format_table, summarize_seeds

    out = Path(out)
    a = cfg.ablation
    data = open_data(cfg, out)
    ids = data.train_ids[: a.num_avatars]
    perceptual, note = ablation_lpips(cfg)
    per_seed = [ablate_fitting(data.get_views, ids, out / "ablation" / f"seed{seed}", to_settings(a),
                               to_settings(cfg.stage1), to_settings(cfg.decoder), perceptual=perceptual, seed=seed,
                               progress=progress, **triplane_kwargs(cfg))
                for seed in (list(a.seeds) or [cfg.seed])]
    results = [dict(r, lpips_note=note) for r in summarize_seeds(per_seed)]
    (out / "ablation").mkdir(parents=True, exist_ok=True)
    (out / "ablation" / "table.txt").write_text(format_table(results) + "\n", encoding="utf-8")
    save_json(out / "ablation" / "results.json", {"rows": results, "per_seed": per_seed, "lpips": note,
                                                  "lpips_metric": perceptual.describe()})
    return results


def ablate_triplane(cfg: RodinHDConfig, out: str | os.PathLike = "outputs/rodinhd", progress: bool = True) -> list[dict]:
    """``rodinhd ablate-triplane``: Table 6 small, the fitting PSNR of one training avatar for each triplane
    resolution x channel count of ``ablation.sweep_*`` (:func:`rodinhd.ablation.triplane_sweep`)."""
    from rodinhd.ablation import format_sweep, triplane_sweep

    out = Path(out)
    a = cfg.ablation
    data = open_data(cfg, out)
    stage1 = replace(to_settings(cfg.stage1), rays_per_step=a.rays_per_step, num_samples=a.num_samples,
                     occupancy=a.occupancy)
    results = triplane_sweep(data.get_views, data.train_ids[0], out / "ablation_triplane", list(a.sweep_resolutions),
                             list(a.sweep_channels), a.sweep_iterations, stage1, to_settings(cfg.decoder),
                             eval_num_samples=a.eval_num_samples, seed=cfg.seed, progress=progress,
                             **triplane_kwargs(cfg))
    (out / "ablation_triplane").mkdir(parents=True, exist_ok=True)
    (out / "ablation_triplane" / "table.txt").write_text(format_sweep(results) + "\n", encoding="utf-8")
    save_json(out / "ablation_triplane" / "results.json", results)
    return results
