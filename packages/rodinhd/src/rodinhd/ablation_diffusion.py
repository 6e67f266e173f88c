"""The diffusion ablation of RodinHD Table 4(b), reproduced small (``rodinhd ablate-diffusion``).

Five base models, each trained with the same budget (``ablation.diffusion.max_steps`` of ``base.train``'s batch,
rate and EMA) on the run's stage-2 triplanes, differ only in the row's factors (:data:`DIFFUSION_ROWS`):

==  =========================  ==========================  =====================  ==================
row  Tab. 4(b)                  triplane (base resolution)  noise schedule         portrait condition
==  =========================  ==========================  =====================  ==================
A   Rodin (256)                low: half of B's            default (linear)       one global token
B   + naively scale to 512     ``base.resolution``         default (linear)       one global token
C   + strong noise schedule    ``base.resolution``         ``base.schedule``      one global token
D   + single-scale cond.       ``base.resolution``         ``base.schedule``      one VAE scale
E   + multi-scale cond.        ``base.resolution``         ``base.schedule``      multi-scale (paper)
==  =========================  ==========================  =====================  ==================

Row A is B's network on planes of half the side: every resolution list of ``base`` (self- and cross-attention,
3D-aware convolution, context resolutions) is halved with it, so the same levels see the same relative sizes.

Each row's model is trained on the training avatars' triplanes *fitted* at its resolution (:func:`row_triplanes`:
the run's frozen decoder, stage 2's settings, started from the stage-2 triplanes area-downsampled), as Rodin fits
its triplanes at 256: the area-downsampled triplanes themselves are not ones the decoder renders (the body's thin
dense layer averages away). Each model samples triplanes from held-out portraits (avatars no model saw), which the
run's frozen stage-1 decoder renders at their side (it reads planes of any side) at the avatar's ground-truth
cameras. The upsample model is not part of the ablation: it would need retraining per row, and the rows differ in
the base model. Scores: PSNR, SSIM and a perceptual distance (LPIPS from ``evaluate.vgg_path`` /
``lpips_path``, else the kernel's random-feature stand-in, named in the results), plus how often a sample is
closer (PSNR) to its own avatar's views than to every other held-out avatar's (``match``: the portrait's hold on
the sample; chance is 1 / held-out avatars). FID is not computed: with a few dozen renders it is not a meaningful
number. ``ceiling_psnr`` is the PSNR of the training avatars' triplanes at the row's resolution: what the
resolution alone allows.

Layout: ``<dest>/seed<S>/<row>/train`` (the Trainer run: checkpoints, resumable) and ``result.json`` (a finished
row is read back, never recomputed, when its settings match); ``<dest>/results.json`` and ``table.md``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from avatar_core.config import config_to_dict
from avatar_core.env import resolve_device
from avatar_core.errors import ConfigError, InputError
from avatar_core.io import load_json, save_json
from avatar_core.metrics import psnr as psnr_fn
from avatar_core.metrics import ssim as ssim_fn
from avatar_core.perceptual import PerceptualLoss
from avatar_core.train import TrainConfig, Trainer
from rodinhd.cascade import BaseDiffusion
from rodinhd.conditioning import portrait_features, prepare_portrait
from rodinhd.config import RodinHDConfig
from rodinhd.data import AvatarViews, downsample_triplanes, open_data
from rodinhd.decoder import TriplaneDecoder
from rodinhd.models import build_base, feature_channels, get_encoder, load_decoder, load_trained
from rodinhd.renderer import render_views
from rodinhd.streaming import stage2_store, training_ids
from rodinhd.triplane import rollout, unroll

log = logging.getLogger("rodinhd")

__all__ = ["DIFFUSION_ROWS", "DiffusionRow", "ablate_diffusion", "format_diffusion_table", "row_config",
           "row_settings", "row_triplanes"]


@dataclass(frozen=True)
class DiffusionRow:
    """One row of Tab. 4(b): its label and factors (``schedule``: "default" or "optimized")."""

    label: str
    low_res: bool
    schedule: str
    condition: str


#: Tab. 4(b)'s rows, each adding one factor to the row above it.
DIFFUSION_ROWS: dict[str, DiffusionRow] = {
    "A": DiffusionRow("A. Rodin (low-res)", True, "default", "global"),
    "B": DiffusionRow("B. + naively scale resolution", False, "default", "global"),
    "C": DiffusionRow("C. + strong noise schedule", False, "optimized", "global"),
    "D": DiffusionRow("D. + single-scale cond.", False, "optimized", "single_scale"),
    "E": DiffusionRow("E. + multi-scale cond.", False, "optimized", "multi_scale"),
}

_RES_LISTS = ("attention_resolutions", "cross_attn_resolutions", "conv3d_resolutions")


def _low_resolution(cfg: RodinHDConfig) -> int:
    d, r = cfg.ablation.diffusion, int(cfg.base.resolution)
    low = int(d.low_resolution) or r // 2
    if low >= r or r % low or (r // low) & (r // low - 1):
        raise ConfigError(f"ablation.diffusion.low_resolution={low} must be base.resolution ({r}) divided by a "
                          "power of two", f"e.g. ablation.diffusion.low_resolution={r // 2} (or 0 for half)")
    return low


def row_config(cfg: RodinHDConfig, row: str) -> RodinHDConfig:
    """``cfg`` with ``base`` set to the row's factors (a copy; ``cfg`` is not changed)."""
    if row not in DIFFUSION_ROWS:
        raise InputError(f"unknown Tab. 4(b) row {row!r}", f"use some of {list(DIFFUSION_ROWS)} (ablation.diffusion.rows)")
    spec = DIFFUSION_ROWS[row]
    out = copy.deepcopy(cfg)
    b = out.base
    if spec.low_res:
        high, low = int(b.resolution), _low_resolution(cfg)
        f = high // low
        b.resolution = low
        for key in _RES_LISTS:
            setattr(b.unet, key, [int(x) // f for x in getattr(b.unet, key) if int(x) // f >= 1])
        b.context_resolutions = [int(x) // f for x in b.context_resolutions]
    b.schedule = cfg.ablation.diffusion.default_schedule if spec.schedule == "default" else cfg.base.schedule
    b.condition = spec.condition
    return out


def row_settings(cfg: RodinHDConfig, row: str) -> dict:
    """What the row trains with (recorded in its result and checked on resume): the base section after
    :func:`row_config` and the ablation's budget."""
    b = row_config(cfg, row).base
    base = config_to_dict(b)
    base.pop("train")
    t = cfg.base.train
    return {"row": row, "label": DIFFUSION_ROWS[row].label, "base": base,
            "train": {"max_steps": int(cfg.ablation.diffusion.max_steps), "batch_size": int(t.batch_size),
                      "optimizer": t.optimizer, "lr": float(t.lr), "weight_decay": float(t.weight_decay),
                      "ema_decay": t.ema_decay, "max_grad_norm": t.max_grad_norm},
            "conditioning": config_to_dict(cfg.conditioning), "triplane": config_to_dict(cfg.triplane),
            "triplanes": ("stage 2" if int(b.resolution) == int(cfg.triplane.resolution) else
                          {"fitted_at": int(b.resolution), "stage2": config_to_dict(cfg.stage2)})}


def row_triplanes(cfg: RodinHDConfig, out: str | os.PathLike, dest: str | os.PathLike, resolution: int,
                  ids: Sequence[str], data: AvatarViews, decoder: TriplaneDecoder, rank: int | None = None,
                  world_size: int | None = None, progress: bool = False) -> Tensor:  # [N, 3, C, r, r]
    """The training avatars' triplanes at ``resolution``: the run's stage-2 triplanes at their own side, else fitted
    at that side with the run's frozen decoder by stage 2's settings, starting from the stage-2 triplanes
    area-downsampled (``<dest>/fits/r<res>``, resumable per avatar; ``rank`` / ``world_size`` shard the fits).

    Fitting rather than downsampling, as Rodin fits its triplanes at 256: an area-downsampled triplane is not one
    the decoder renders (its thin dense structures average away; measured at the tiny scale: mean alpha 0.12 of the
    32^2 fits, 0.04 at 16^2, 0.00 at 8^2)."""
    from dataclasses import replace

    from avatar_core.config import to_settings
    from rodinhd.fitting import fit_triplanes
    from rodinhd.models import triplane_kwargs
    from rodinhd.triplane import TriplaneStore

    full = stage2_store(cfg, out)
    C, R = int(cfg.triplane.channels), int(cfg.triplane.resolution)
    if int(resolution) == R:
        return torch.stack([full.load(a) for a in ids])
    root = Path(dest) / "fits" / f"r{int(resolution)}"
    init = TriplaneStore(root / "init", C, int(resolution))
    for a in ids:  # an avatar without a stage-2 triplane (a held-out one) starts from noise
        if not init.exists(a) and full.exists(a):
            init.save(a, downsample_triplanes(full.load(a)[None], int(resolution))[0])
    store = TriplaneStore(root / "triplanes", C, int(resolution))
    settings = replace(to_settings(cfg.stage2), init_from_stage1=True)
    fit_triplanes(data.get_views, list(ids), decoder, store, init, settings, seed=int(cfg.seed), rank=rank,
                  world_size=world_size, progress=progress, **triplane_kwargs(cfg))
    return torch.stack([store.load(a) for a in ids])


def _slug(row: str) -> str:
    return "row_" + "".join(c if c.isalnum() else "_" for c in row)


def _batches(planes: Tensor, feats: Sequence[Tensor], batch_size: int, seed: int):
    """``epoch -> batches``: a seeded permutation of the training set in batches of ``batch_size``."""
    def data(epoch: int) -> list[dict]:
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(planes.shape[0], generator=g)
        out = []
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            out.append({"low": planes[idx], **{f"f{k}": f[idx] for k, f in enumerate(feats)}})
        return out

    return data


def _train_row(cfg: RodinHDConfig, settings: dict, planes: Tensor, feats: Sequence[Tensor], channels: Sequence[int],
               run_dir: Path, seed: int, device: torch.device, progress: bool) -> BaseDiffusion:
    """The row's base model trained for ``max_steps`` on the low-res triplanes (resumes an interrupted run)."""
    t = cfg.base.train
    n = len(cfg.base.context_resolutions)
    torch.manual_seed(seed)
    model = build_base(cfg, channels)
    if planes.shape[-1] != int(cfg.base.resolution):
        raise InputError(f"triplanes of side {planes.shape[-1]} for a base model of {cfg.base.resolution}",
                         "pass the row's triplanes (row_triplanes)")
    x = rollout(planes)  # [N, C, r, 3r]
    model.normalizer.fit([x])
    steps = int(settings["train"]["max_steps"])
    loop = TrainConfig(output_dir=str(run_dir), max_steps=steps, seed=seed, mixed_precision="no",
                       gradient_accumulation_steps=1, max_grad_norm=t.max_grad_norm, ema_decay=t.ema_decay,
                       checkpoint_every=max(1, min(int(t.checkpoint_every), steps)), keep_last_checkpoints=1,
                       log_every=int(t.log_every), progress_bar=progress)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam

    def step(m: nn.Module, batch: dict) -> tuple[Tensor, dict]:
        o = m(batch["low"].to(device), [batch[f"f{k}"].to(device) for k in range(n)])
        return o["loss"], {"mse": o["mse"].detach(), "vlb": o["vlb"].detach()}

    # A finished run returns at once; an interrupted one continues from its checkpoint (same settings only; a
    # larger max_steps extends a finished run).
    run_config = {**settings, "train": {k: v for k, v in settings["train"].items() if k != "max_steps"}}
    Trainer(loop, model.to(device),
            lambda ps: cls([p for p in ps if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay),
            step, _batches(x, feats, int(t.batch_size), seed), run_config=run_config,
            config_key="ablation.diffusion").train(resume="auto")
    model = model.to(device).eval()
    load_trained(model, run_dir, True, "base")
    return model


def _on(bg: Tensor, rgba: Tensor) -> Tensor:  # [..., 4] straight alpha -> [..., 3]
    return rgba[..., :3] * rgba[..., 3:] + bg * (1 - rgba[..., 3:])


def _render(cfg: RodinHDConfig, roll: Tensor, decoder: TriplaneDecoder, cams, num_samples: int,
            bg: Tensor) -> Tensor:  # raw roll-out [C, r, 3r] at any side r -> rgb [V, H, W, 3]
    """Render a roll-out through the decoder (which reads planes of any side by bilinear sampling)."""
    r = cfg.render
    rgb, _ = render_views(unroll(roll), decoder, cams, cfg.triplane.bound, cfg.triplane.center, num_samples,
                          r.occupancy, r.grid_resolution, r.grid_updates, background=bg)
    return rgb


def _score_row(cfg: RodinHDConfig, model: BaseDiffusion, decoder: TriplaneDecoder, held: list[dict],
               perceptual: nn.Module, seed: int, device: torch.device, progress: bool) -> dict:
    """Sample each held-out portrait and score the renders against every held-out avatar's views."""
    d = cfg.ablation.diffusion
    bg = torch.as_tensor(list(cfg.render.background), dtype=torch.float32, device=device)
    steps = int(d.sample_steps) or int(cfg.base.sample_steps)
    per = []
    from tqdm.auto import tqdm

    for i, h in enumerate(tqdm(held, desc="sample + score", disable=not progress, leave=False)):
        for k in range(int(d.samples_per_portrait)):
            gen = torch.Generator().manual_seed(seed * 7919 + 1000 * i + k)
            x = model.sample([f.to(device) for f in h["features"]], steps=steps, generator=gen)[0]
            rgb = _render(cfg, x, decoder, h["cams"], int(d.eval_num_samples), bg)
            target = _on(bg, h["images"].to(device))
            with torch.no_grad():
                row = {"avatar": h["id"], "sample": k, "psnr": float(psnr_fn(rgb, target).mean()),
                       "ssim": float(ssim_fn(rgb, target).mean()), "perceptual": float(perceptual(rgb, target).mean())}
            # the portrait's hold on the sample: is it closer to its own avatar than to any other held-out one?
            others = [float(psnr_fn(rgb, _on(bg, o["images"].to(device))).mean()) for o in held if o["id"] != h["id"]
                      and o["images"].shape == h["images"].shape]
            row["match"] = float(all(row["psnr"] > o for o in others)) if others else float("nan")
            per.append(row)
    keys = ("psnr", "ssim", "perceptual", "match")
    return {"per_sample": per, **{k: sum(p[k] for p in per) / len(per) for k in keys}}


#: Noise levels (alpha_bar) of the held-out denoising error: logSNR +2.2, 0, -2.2, the same for every schedule.
DENOISE_LEVELS = (0.9, 0.5, 0.1)


@torch.no_grad()
def heldout_denoising(model: BaseDiffusion, planes: Tensor, features: Sequence[Tensor], seed: int = 0,
                      levels: Sequence[float] = DENOISE_LEVELS) -> dict:
    """The model's x0 error on held-out triplanes (fitted at its resolution) at matched noise levels.

    For each ``alpha_bar`` level the step of the model's own schedule closest to it is used, so rows with different
    schedules are asked the same question; x_t = sqrt(ab) x0 + sqrt(1 - ab) eps with one seeded eps, x0 predicted
    from the model's eps, error = mean squared difference in the normalised units. ``cond`` reads the held-out
    portraits' features, ``null`` the null condition; ``null - cond`` is what the portrait tells the model about an
    avatar it never saw (0: nothing). Returns ``{"cond": [per level], "null": [...], "levels", "gain"}``.
    """
    x0 = model.normalizer.normalize(rollout(planes))
    ac = model.alphas_cumprod.to(torch.float64).cpu()
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g).to(x0)
    null = model.tokenizer.null_features(x0.shape[0], x0.device)
    out = {"levels": [float(v) for v in levels], "cond": [], "null": [], "steps": []}
    for ab in levels:
        t = int((ac - ab).abs().argmin())
        a = float(ac[t])
        x_t = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
        tt = torch.full((x0.shape[0],), t, device=x0.device)
        for key, feats in (("cond", features), ("null", null)):
            e = model.unet(x_t, tt, model.context(list(feats)))[:, : x0.shape[1]]
            x0_pred = (x_t - (1 - a) ** 0.5 * e) / a ** 0.5
            out[key].append(float(((model.normalizer.clip(x0_pred) - x0) ** 2).mean()))
        out["steps"].append(t)
    out["gain"] = [n - c for n, c in zip(out["null"], out["cond"])]
    return out


def _ceiling(cfg: RodinHDConfig, planes: Tensor, ids: Sequence[str], data: AvatarViews, decoder: TriplaneDecoder,
             device: torch.device) -> float:
    """PSNR of training avatars' triplanes at the row's base resolution (what the model is trained to produce)."""
    bg = torch.as_tensor(list(cfg.render.background), dtype=torch.float32, device=device)
    low = rollout(planes)
    vals = []
    for j, a in enumerate(ids):
        images, cams = data.get_views(a)
        rgb = _render(cfg, low[j].to(device), decoder, cams, int(cfg.ablation.diffusion.eval_num_samples), bg)
        vals.append(float(psnr_fn(rgb, _on(bg, images.to(device))).mean()))
    return sum(vals) / len(vals)


def ablate_diffusion(cfg: RodinHDConfig, out: str | os.PathLike = "outputs/rodinhd", dest: str | os.PathLike | None = None,
                     progress: bool = True) -> dict:
    """``rodinhd ablate-diffusion``: train and score the Tab. 4(b) rows of ``ablation.diffusion.rows`` for each seed
    of ``ablation.diffusion.seeds`` on run ``out``'s stage-2 triplanes (``rodinhd fit`` first) and held-out portraits.

    Writes ``<dest>/results.json`` and ``<dest>/table.md`` (``dest`` default ``<out>/ablation_diffusion``); a finished
    row of a seed is read back from its ``result.json``, an interrupted one resumes from its checkpoint. Returns
    ``{"rows": [...], "seeds": [...], "perceptual": {...}, ...}`` (one entry per row, means and spreads over seeds).
    """
    out = Path(out)
    dest = Path(dest) if dest is not None else out / "ablation_diffusion"
    d = cfg.ablation.diffusion
    rows = [str(r) for r in d.rows]
    for r in rows:
        row_config(cfg, r)  # unknown rows and a bad low resolution fail before any work
    if not rows or not list(d.seeds):
        raise ConfigError("ablation.diffusion needs at least one row and one seed",
                          "e.g. ablation.diffusion.rows=[A,B,C,D,E] ablation.diffusion.seeds=[0]")
    data = open_data(cfg, out)
    held_ids = data.held_out_ids[: int(d.num_held_out)] if int(d.num_held_out) > 0 else data.held_out_ids
    if not held_ids:
        raise ConfigError("the run has no held-out avatars to score generation on",
                          "set data.held_out >= 1 (the avatars at the end of the dataset) and rerun fit")
    device = resolve_device(cfg.device)
    ids = training_ids(cfg, out, data)
    decoder = load_decoder(cfg, out, device)
    encoder = get_encoder(cfg, out, data, device, progress)
    channels = feature_channels(encoder)
    size = cfg.conditioning.portrait_size

    def feats_of(avatar_ids: Sequence[str]) -> list[Tensor]:
        x = torch.cat([prepare_portrait(data.portrait(a), size) for a in avatar_ids]).to(device)
        return [f.cpu() for f in portrait_features(encoder, x)]

    planes: dict[int, Tensor] = {}
    held_planes: dict[int, Tensor] = {}
    train_feats = feats_of(ids)
    held = []
    for a in held_ids:
        images, cams = data.get_views(a)
        held.append({"id": a, "images": images, "cams": cams, "features": feats_of([a])})
    e = cfg.evaluate
    perceptual = PerceptualLoss(e.vgg_path or None, e.lpips_path or "auto").to(device)
    pdesc = perceptual.describe()
    ceil_ids = ids[: min(4, len(ids))]
    ceilings: dict[int, float] = {}
    per_seed: dict[str, list[dict]] = {r: [] for r in rows}
    for seed in [int(s) for s in d.seeds]:
        for r in rows:
            rcfg = row_config(cfg, r)
            settings = row_settings(cfg, r)
            scoring = {"held_out": list(held_ids), "samples_per_portrait": int(d.samples_per_portrait),
                       "sample_steps": int(d.sample_steps) or int(cfg.base.sample_steps),
                       "eval_num_samples": int(d.eval_num_samples), "guidance_scale": float(cfg.base.guidance_scale),
                       "perceptual": pdesc, "denoise_levels": list(DENOISE_LEVELS)}
            row_dir = dest / f"seed{seed}" / _slug(r)
            done = row_dir / "result.json"
            if done.is_file():
                res = load_json(done)
                if res.get("settings") == json_clean(settings) and res.get("scoring") == json_clean(scoring):
                    log.info("Tab. 4(b) row %s, seed %d: finished, read back from %s", r, seed, done)
                    per_seed[r].append(res)
                    continue
            log.info("Tab. 4(b) row %s (%s), seed %d", r, DIFFUSION_ROWS[r].label, seed)
            rr = int(rcfg.base.resolution)
            if rr not in planes:
                planes[rr] = row_triplanes(cfg, out, dest, rr, ids, data, decoder, progress=progress)
                held_planes[rr] = row_triplanes(cfg, out, dest, rr, held_ids, data, decoder, progress=progress)
            model = _train_row(rcfg, settings, planes[rr], train_feats, channels, row_dir / "train", seed, device,
                               progress)
            res = {"row": r, "label": DIFFUSION_ROWS[r].label, "seed": seed, "settings": settings,
                   "scoring": scoring, **_score_row(rcfg, model, decoder, held, perceptual, seed, device, progress)}
            held_feats = [torch.cat([h["features"][k] for h in held]).to(device) for k in range(len(held[0]["features"]))]
            den = heldout_denoising(model, held_planes[rr].to(device), held_feats[: len(rcfg.base.context_resolutions)],
                                    seed)
            res.update(denoise=den, x0_mse=sum(den["cond"]) / len(den["cond"]),
                       portrait_gain=sum(den["gain"]) / len(den["gain"]))
            if rr not in ceilings:
                ceilings[rr] = _ceiling(rcfg, planes[rr][: len(ceil_ids)], ceil_ids, data, decoder, device)
            res["ceiling_psnr"] = ceilings[rr]
            save_json(done, res)
            per_seed[r].append(res)
    table_rows = []
    for r in rows:
        runs = per_seed[r]
        entry = {"row": r, "label": DIFFUSION_ROWS[r].label, "settings": runs[0]["settings"],
                 "seeds": [x["seed"] for x in runs], "ceiling_psnr": runs[0].get("ceiling_psnr")}
        for k in ("psnr", "ssim", "perceptual", "match", "x0_mse", "portrait_gain"):
            vals = [float(x[k]) for x in runs]
            m = sum(vals) / len(vals)
            entry[k] = m
            entry[f"{k}_spread"] = (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0
            entry[f"{k}_per_seed"] = vals
        table_rows.append(entry)
    result = {"rows": table_rows, "seeds": [int(s) for s in d.seeds], "held_out": list(held_ids),
              "training_avatars": len(ids), "perceptual": pdesc, "fid": "not computed (a few dozen renders)",
              "per_seed": per_seed}
    dest.mkdir(parents=True, exist_ok=True)
    save_json(dest / "results.json", result)
    (dest / "table.md").write_text(format_diffusion_table(result) + "\n", encoding="utf-8")
    return result


def json_clean(x):
    """``x`` as it reads back from JSON (tuples become lists), for comparing settings with a stored result."""
    import json

    return json.loads(json.dumps(x))


def format_diffusion_table(result: dict) -> str:
    """Tab. 4(b) as Markdown: one line per row, means over seeds (± half the range when there are several)."""
    kind = result.get("perceptual", {}).get("kind", "")
    pname = "LPIPS" if kind == "lpips" else f"perc. ({kind})" if kind else "perc."
    several = len(result.get("seeds", [])) > 1

    def cell(r: dict, k: str, fmt: str) -> str:
        v = r[k]
        if isinstance(v, float) and math.isnan(v):
            return "-"
        s = format(v, fmt)
        return f"{s} ± {format(r[f'{k}_spread'], fmt)}" if several else s

    head = ["Model configuration", "res.", "schedule", "condition", "PSNR ↑", "SSIM ↑", f"{pname} ↓",
            "match ↑", "ceiling PSNR", "held-out x0 MSE ↓", "portrait gain ↑"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in result["rows"]:
        b = r["settings"]["base"]
        ceiling = r.get("ceiling_psnr")
        lines.append("| " + " | ".join([
            r["label"], str(b["resolution"]), str(b["schedule"]), str(b["condition"]), cell(r, "psnr", ".2f"),
            cell(r, "ssim", ".3f"), cell(r, "perceptual", ".3f"), cell(r, "match", ".2f"),
            f"{ceiling:.2f}" if ceiling is not None else "-", cell(r, "x0_mse", ".4f"),
            cell(r, "portrait_gain", ".4f")]) + " |")
    n = len(result.get("held_out", []))
    lines.append("")
    lines.append(f"Base-model samples from {n} held-out portraits, rendered at their side by the frozen decoder; "
                 f"seeds {result.get('seeds')}. FID is not reported: it is not meaningful "
                 "with a few dozen renders. match: fraction of samples closer (PSNR) to their own avatar than to any "
                 f"other held-out one (chance {1 / n if n else float('nan'):.2f}). ceiling PSNR: training "
                 "avatars' triplanes fitted at the row's resolution. held-out x0 MSE: the model's x0 error on the "
                 "held-out avatars' triplanes (fitted at its resolution) at alpha_bar 0.9 / 0.5 / 0.1 of its own "
                 "schedule, normalised units; portrait gain: that error with the null condition minus with the "
                 "portrait.")
    return "\n".join(lines)
