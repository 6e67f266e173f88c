"""GAS end to end: what each CLI command runs (orchestration only; the parts live in their modules).

``train-nerf`` (stage 1) -> ``train-video`` (caches the NeRF renders, fits the tiny VAE, trains the video UNet)
-> ``novel-view`` / ``novel-pose`` (one reference image + parameters file) -> ``evaluate`` (held-out clips).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from avatar_core.config import config_to_dict
from avatar_core.errors import InputError
from avatar_core.results import check_result_dir, prepare_result_dir
from avatar_core.train import run_lock
from gas import evaluation, inference
from gas.config import load_gas_config
from gas.data import ensure_clips, kind_of, on_white, split
from gas.reference import Reference, load_reference

log = logging.getLogger(__name__)

#: Ablation variants of stage 2 and the settings that make them (paper Sec. 4.3).
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "no_nerf": ["video.conditioning.nerf=false"],
    "no_switcher": ["video.conditioning.switcher=false"],
}


def config(name: str = "tiny", overrides: list[str] | tuple[str, ...] = (), variant: str = "full") -> Any:
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}", f"use one of {sorted(VARIANTS)}")
    cfg = load_gas_config(name, [*VARIANTS[variant], f"video_train.name={variant}", *overrides])
    if cfg.threads > 0:
        torch.set_num_threads(int(cfg.threads))
    return cfg


def train_nerf(cfg: Any, restart: bool = False, progress: bool = True) -> Path:
    from gas.nerf_training import train_nerf as _train

    return _train(cfg, resume=None if restart else "auto", progress=progress)


def train_video(cfg: Any, restart: bool = False, progress: bool = True) -> Path:
    from gas.video_training import train_video as _train

    return _train(cfg, resume=None if restart else "auto", progress=progress)


def _models(cfg: Any, with_video: bool = True):
    from gas.nerf_training import load_nerf
    from gas.video_training import load_video

    nerf, _ = load_nerf(cfg)
    return nerf, (load_video(cfg) if with_video else None)


def _run(cfg: Any, task: str, ref_loader, targets_fn, out: Path, overwrite: bool, inputs: list,
         nerf_only: bool, progress: bool) -> dict[str, Any]:
    kind = f"gas.novel_{task}"
    check_result_dir(out, kind, overwrite, inputs)
    nerf, parts = _models(cfg, with_video=not nerf_only)
    ref = ref_loader(nerf.warp.body)
    targets = targets_fn(ref, nerf)
    t0 = time.perf_counter()
    result = inference.synthesize(nerf, parts, ref, targets, task, cfg.sample, bool(cfg.video.conditioning.nerf),
                                  bool(cfg.video.conditioning.normal), bool(cfg.video.conditioning.switcher), progress)
    seconds = time.perf_counter() - t0
    settings = {"task": task, "reference": ref.source, "frames": len(targets), "seconds": round(seconds, 3),
                "guidance_scales": [round(float(s), 4) for s in result["scales"]],
                "config": config_to_dict(cfg), "nerf_only": nerf_only}
    out = prepare_result_dir(out, kind, overwrite, inputs)
    files = inference.write_outputs(out, result, settings, cfg.sample.video_fps)
    return {"out": str(out), "seconds": seconds, **files}


def novel_view(cfg: Any, image: str, out: str, params: str | None = None, mask: str | None = None,
               frames: int | None = None, overwrite: bool = False, nerf_only: bool = False,
               progress: bool = True) -> dict[str, Any]:
    n = frames or cfg.sample.frames
    return _run(cfg, "view", lambda body: load_reference(image, body, params, mask, cfg.data.res),
                lambda ref, nerf: inference.orbit_targets(ref, nerf.warp, n), Path(out), overwrite,
                [image, params, mask], nerf_only, progress)


def novel_pose(cfg: Any, image: str, motion: str, out: str, params: str | None = None, mask: str | None = None,
               frames: int | None = None, overwrite: bool = False, nerf_only: bool = False,
               progress: bool = True) -> dict[str, Any]:
    return _run(cfg, "pose", lambda body: load_reference(image, body, params, mask, cfg.data.res),
                lambda ref, nerf: inference.motion_targets(ref, nerf.warp.body, motion, frames or cfg.sample.frames),
                Path(out), overwrite, [image, params, mask, motion if Path(motion).exists() else None], nerf_only,
                progress)


def export_held_out(cfg: Any, out: str, index: int = 0, overwrite: bool = False) -> tuple[Path, Path]:
    """Write the reference image + parameters file of held-out view clip ``index`` (an input for novel-view/-pose)."""
    from avatar_core.data.clips import load_clip
    from avatar_core.results import check_result_file
    from gas.nerf_training import body_for
    from gas.reference import export_reference, params_path_for

    out_p = Path(out)
    check_result_file(out_p, overwrite)
    check_result_file(params_path_for(out_p), overwrite)
    _, held = split(cfg, ensure_clips(cfg, progress=False), kind="view")
    if not 0 <= index < len(held):
        raise InputError(f"held-out clip {index} does not exist ({len(held)} held-out view clips)",
                         f"pass --clip between 0 and {len(held) - 1}")
    clip = load_clip(held[index])
    out_p.parent.mkdir(parents=True, exist_ok=True)
    return export_reference(out_p, clip.ref_rgba, clip.ref_camera, body_for(cfg), clip.shape, clip.ref_pose,
                            clip.transl[0])


def clip_reference(clip) -> Reference:
    return Reference(clip.ref_rgba, clip.ref_camera, clip.shape, clip.ref_pose, torch.zeros(3), clip.transl[0],
                     f"clip avatar {clip.avatar}")


def clip_targets(clip) -> inference.Targets:
    return inference.Targets(clip.cameras, clip.pose, clip.global_orient, clip.transl)


def evaluate(name: str, overrides: list[str] | tuple[str, ...] = (), variants: tuple[str, ...] = ("full",),
             max_clips: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Metrics on the held-out clips for the NeRF alone and each trained video variant; writes
    ``<run>/evaluation.json`` and ``<run>/evaluation.md``."""
    from avatar_core.data.clips import load_clip
    from avatar_core.io import save_json
    from gas.nerf_training import load_nerf
    from gas.video_training import load_video

    base = config(name, overrides)
    nerf, _ = load_nerf(base)
    body = nerf.warp.body
    _, held = split(base, ensure_clips(base, progress))
    held = held[:max_clips] if max_clips else held
    perceptual, lpips_note = _lpips(base)
    models = {"nerf_only": None}
    for v in variants:
        vcfg = config(name, overrides, v)
        models[v] = (vcfg, load_video(vcfg))
    rows = []
    for p in held:
        clip = load_clip(p)
        truth = on_white(clip.rgba)
        ref, targets = clip_reference(clip), clip_targets(clip)
        with torch.no_grad():
            verts = body.forward(shape=clip.shape[None], pose=clip.pose, global_orient=clip.global_orient,
                                 transl=clip.transl).vertices
        flicker_true = float(evaluation.warp_error(truth, body, verts, clip.cameras))
        if variants:  # the tiny VAE's reconstruction of the truth: the ceiling of every video variant
            from gas.svd_parts import decode, vae_latents

            vparts = next(m for m in models.values() if m is not None)[1]
            with torch.no_grad():
                rec = decode(vparts, vae_latents(vparts, truth[None]))[0]
            rows.append({"clip": p.name, "task": kind_of(p), "method": "vae_reconstruction",
                         **evaluation.image_metrics(rec, truth, perceptual),
                         "flicker": float(evaluation.warp_error(rec, body, verts, clip.cameras)),
                         "flicker_true": flicker_true})
        for method, m in models.items():
            vcfg, parts = (base, None) if m is None else m
            t0 = time.perf_counter()
            res = inference.synthesize(nerf, parts, ref, targets, kind_of(p), vcfg.sample,
                                       bool(vcfg.video.conditioning.nerf), bool(vcfg.video.conditioning.normal),
                                       bool(vcfg.video.conditioning.switcher), progress=False)
            pred = res["nerf"] if parts is None else res["frames"]
            row = {"clip": p.name, "task": kind_of(p), "method": method,
                   **evaluation.image_metrics(pred, truth, perceptual),
                   "flicker": float(evaluation.warp_error(pred, body, verts, clip.cameras)),
                   "flicker_true": flicker_true, "seconds": time.perf_counter() - t0}
            rows.append(row)
    summary = evaluation.summarise(rows)
    run = Path(base.run)
    with run_lock(run):
        save_json(run / "evaluation.json", {"rows": rows, "summary": summary, "lpips": lpips_note,
                                             "held_out_clips": [p.name for p in held]})
        table = evaluation.markdown_table(summary)
        (run / "evaluation.md").write_text(f"Held-out clips: {len(held)}; perceptual: {lpips_note}\n\n{table}\n")
    return {"summary": summary, "table": table, "lpips": lpips_note}


def _lpips(cfg: Any):
    """LPIPS when local VGG weights are configured (``nerf_train.perceptual_weights``); else not reported."""
    path = cfg.nerf_train.perceptual_weights
    if not path:
        return None, "not reported (no local VGG-16 weights configured: nerf_train.perceptual_weights)"
    from avatar_core.perceptual import PerceptualLoss

    p = PerceptualLoss(path)
    return p, p.describe()


def plain(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
