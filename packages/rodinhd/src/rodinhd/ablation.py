"""The fitting ablation of RodinHD Table 4(a) / Table 5, reproduced small: the five training strategies as settings of
the one :func:`fit_shared`, each scored on views of its avatars that no row fitted.

Rows (Table 4(a), names as printed):

* A. Rodin (256): Rodin's fitting (Wang et al. 2023), one avatar after another with the shared decoder, at half
  the triplane resolution of B (the paper's 256 vs 512); Table 5's "Rodin (512)" iterations (1 visit).
* B. Rodin (512): the same with the resolution doubled (``ablation.resolution``).
* C. + Task replay, D. + Weight decay, E. + Consolidation: Table 5's other columns (30 visits x 5000 per avatar;
  D adds weight decay 1e-4 on the decoder, E identity-aware weight consolidation with lambda 0.1).

Table 5 gives the task-replay rows 30 visits x 5000 iterations per avatar and Rodin's rows one visit of 15000: the
one-visit rows train each avatar a tenth as long. Here ``total_iterations`` is the task-replay rows' total; the
one-visit rows get 3x one replay visit's iterations per avatar (:data:`NAIVE_INNER_RATIO`), so the rows keep
Table 5's visit lengths at any scale.

Each avatar's dataset views are split (:func:`split_views`): every ``held_out_every``-th view is held out of every
row's fitting, and the rows are scored on those held-out views (PSNR / LPIPS / SSIM), with the fitted views' PSNR /
SSIM as extra columns and the held-out PSNR of the first-fitted avatars (where forgetting shows) apart."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from avatar_core.cameras import Cameras
from avatar_core.errors import InputError
from rodinhd.config import AblationConfig, DecoderConfig, Stage1Config
from rodinhd.decoder import TriplaneDecoder
from rodinhd.fitting import GetViews, evaluate_fit, fit_shared
from rodinhd.triplane import TriplaneStore

__all__ = ["ABLATION_ROWS", "AblationRow", "NAIVE_INNER_RATIO", "PAPER_ROWS", "ablation_row_settings",
           "ablate_fitting", "format_sweep", "format_table", "row_resolution", "split_views", "summarize_seeds",
           "triplane_sweep"]

#: Table 5: Rodin's single visit (15000) over a task-replay visit (5000).
NAIVE_INNER_RATIO = 15000 // 5000


@dataclass(frozen=True)
class AblationRow:
    """One training strategy of Table 4(a): its letter, whether it replays tasks (else one visit per avatar, Rodin's
    avatar-by-avatar fitting), the triplane resolution divisor (A: 2) and its :class:`Stage1Config` regularisers."""

    letter: str
    replay: bool
    resolution_divisor: int = 1
    weight_decay: float = 0.0
    iwc_weight: float = 0.0
    iwc_normalize: bool = False


#: The rows of Table 4(a) (Table 5's columns: weight decay 1e-4, IWC lambda 0.1), by the names the paper prints.
ABLATION_ROWS: dict[str, AblationRow] = {
    "Rodin (256)": AblationRow("A", replay=False, resolution_divisor=2),
    "Rodin (512)": AblationRow("B", replay=False),
    "+ Task replay": AblationRow("C", replay=True),
    "+ Weight decay": AblationRow("D", replay=True, weight_decay=1e-4),
    "+ Consolidation": AblationRow("E", replay=True, iwc_weight=0.1),
    # Not a paper row: E with the Fisher diagonal divided by its mean, so that lambda acts at small scale.
    "+ Consolidation (normalised)": AblationRow("E'", replay=True, iwc_weight=0.1, iwc_normalize=True),
}

#: Table 4(a) A-E, run by default.
PAPER_ROWS = ("Rodin (256)", "Rodin (512)", "+ Task replay", "+ Weight decay", "+ Consolidation")


def _row(row: str) -> AblationRow:
    if row not in ABLATION_ROWS:
        raise InputError(f"unknown ablation row {row!r}", f"use one of {list(ABLATION_ROWS)}")
    return ABLATION_ROWS[row]


def ablation_row_settings(row: str, num_avatars: int, total_iterations: int, outer_loops: int) -> dict:
    """The :class:`Stage1Config` overrides of one row: the task-replay rows split ``total_iterations`` over
    ``num_avatars x outer_loops`` visits; Rodin's rows (A, B) visit each avatar once for :data:`NAIVE_INNER_RATIO`
    replay visits' worth (Table 5: 15000 vs 30 x 5000)."""
    r = _row(row)
    inner = total_iterations // (num_avatars * outer_loops)
    loops = outer_loops if r.replay else 1
    if not r.replay:
        inner *= NAIVE_INNER_RATIO
    if inner < 1:
        raise InputError(f"{total_iterations} iterations cannot give {num_avatars} avatars x {loops} loops a step each",
                         "raise total_iterations or lower outer_loops")
    return dict(outer_loops=loops, inner_iterations=inner, weight_decay=r.weight_decay, iwc_weight=r.iwc_weight,
                iwc_normalize=r.iwc_normalize)


def row_resolution(row: str, resolution: int) -> int:
    """The triplane side of ``row`` when row B's is ``resolution`` (row A: half of it, the paper's 256 vs 512)."""
    r = _row(row)
    if resolution % r.resolution_divisor or resolution // r.resolution_divisor < 2:
        raise InputError(f"row {row!r} needs a triplane resolution divisible by {r.resolution_divisor} (got "
                         f"{resolution})", "set ablation.resolution to an even number of at least 4")
    return resolution // r.resolution_divisor


def split_views(num_views: int, held_out_every: int) -> tuple[list[int], list[int]]:
    """``(fitted, held_out)`` view indices: every ``held_out_every``-th view (indices k-1, 2k-1, ...) is held out,
    so the held-out cameras lie between fitted ones around the orbit."""
    if held_out_every < 2:
        raise InputError(f"ablation.held_out_every={held_out_every} leaves no views to fit",
                         "use 2 or more (every k-th view is held out of fitting and scored)")
    held = [i for i in range(num_views) if i % held_out_every == held_out_every - 1]
    if not held:
        raise InputError(f"{num_views} views per avatar leave none held out with held_out_every={held_out_every}",
                         f"use held_out_every <= {num_views} or render more views (data.views)")
    return [i for i in range(num_views) if i not in held], held


def _view_subset(get_views: GetViews, held_out_every: int, held: bool) -> GetViews:
    def views(avatar_id: str) -> tuple[Tensor, Cameras]:
        images, cameras = get_views(avatar_id)
        fitted, held_out = split_views(len(cameras), held_out_every)
        idx = torch.tensor(held_out if held else fitted)
        return images[idx], cameras[idx]

    return views


def _dir_name(row: str) -> str:
    name = "".join(c if c.isalnum() else "_" for c in f"{_row(row).letter}_{row.replace('+ ', '')}")
    return "_".join(p for p in name.split("_") if p)


def ablate_fitting(
    get_views: GetViews,
    avatar_ids: Sequence[str],
    out_dir: str | os.PathLike,
    settings: AblationConfig | None = None,
    stage1: Stage1Config | None = None,
    decoder: DecoderConfig | None = None,
    *,
    perceptual: nn.Module | None = None,
    bound: float = 1.0,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Run the Table 4(a) rows (``settings.rows``) with one seed; one result dict per row.

    Args:
        get_views, avatar_ids: the data, as for :func:`fit_shared` (the caller picks ``settings.num_avatars``); each
            avatar's views are split by ``settings.held_out_every`` (:func:`split_views`): rows fit the others and
            are scored on the held-out ones.
        out_dir: each row writes its triplanes and state under ``out_dir/<letter>_<row>`` (rerunning resumes).
        settings: the ablation (:class:`rodinhd.config.AblationConfig`): total iterations of a task-replay row
            (split evenly over avatars and visits; paper 64 avatars x 30 x 5000), B's triplane size (A: half),
            task-replay passes, rows, how many of the first-fitted avatars are scored apart (forgetting), rays /
            samples / occupancy of the fits and the evaluation's samples per ray. None: the defaults.
        stage1: the fitting settings every row starts from (learning rates, regularisers); the ablation's rays,
            samples and occupancy and each row's overrides replace theirs. None: the defaults.
        decoder: the decoder's settings; every row starts from the same seeded decoder. None: the defaults.
        perceptual: ``(pred [V, H, W, 3], target) -> distance`` for the LPIPS column (None: no LPIPS).
        bound, center, seed, progress: as in :func:`fit_shared`.

    Returns ``[{"row", "letter", "resolution", "outer_loops", "inner_iterations", "psnr", "ssim", "lpips",
    "fit_psnr", "fit_ssim", "psnr_earliest", "ssim_earliest", "seed", "per_avatar"}]``; ``psnr`` / ``ssim`` /
    ``lpips`` are on the held-out views (``lpips`` only with ``perceptual``).
    """
    a = settings if settings is not None else AblationConfig()
    base = replace(stage1 if stage1 is not None else Stage1Config(), rays_per_step=a.rays_per_step,
                   num_samples=a.num_samples, occupancy=a.occupancy)
    fit_views = _view_subset(get_views, a.held_out_every, held=False)
    held_views = _view_subset(get_views, a.held_out_every, held=True)
    ids = [str(x) for x in avatar_ids]
    first = ids[:a.earliest]
    results = []
    for row in a.rows:
        row_settings = replace(base, **ablation_row_settings(row, len(ids), a.total_iterations, a.outer_loops))
        resolution = row_resolution(row, a.resolution)
        torch.manual_seed(seed)
        net = TriplaneDecoder.from_config(a.channels, decoder if decoder is not None else DecoderConfig())
        row_dir = Path(out_dir) / _dir_name(row)
        store = TriplaneStore(row_dir / "triplanes", a.channels, resolution)
        fit_shared(fit_views, ids, net, store, row_dir, row_settings, bound=bound, center=center, seed=seed,
                   progress=progress)
        held = evaluate_fit(held_views, ids, net, store, bound=bound, center=center, num_samples=a.eval_num_samples,
                            perceptual=perceptual)
        fitted = evaluate_fit(fit_views, ids, net, store, bound=bound, center=center, num_samples=a.eval_num_samples)

        def mean(scores: dict, key: str, which: Sequence[str] = ids) -> float:
            return sum(scores[x][key] for x in which) / len(which)

        result = dict(row=row, letter=_row(row).letter, resolution=resolution, seed=seed,
                      outer_loops=row_settings.outer_loops, inner_iterations=row_settings.inner_iterations,
                      psnr=mean(held, "psnr"), ssim=mean(held, "ssim"),
                      fit_psnr=mean(fitted, "psnr"), fit_ssim=mean(fitted, "ssim"),
                      psnr_earliest=mean(held, "psnr", first), ssim_earliest=mean(held, "ssim", first),
                      per_avatar={x: {"held_out": held[x], "fitted": fitted[x]} for x in ids})
        if perceptual is not None:
            result["lpips"] = mean(held, "lpips")
        results.append(result)
    return results


#: Columns of :func:`format_table`: (key, header, format); the held-out views' first (Table 4(a)'s order).
_COLUMNS = (("psnr", "PSNR", ".2f"), ("lpips", "LPIPS", ".3f"), ("ssim", "SSIM", ".3f"),
            ("fit_psnr", "fit PSNR", ".2f"), ("fit_ssim", "fit SSIM", ".3f"), ("psnr_earliest", "early PSNR", ".2f"))
_METRICS = tuple(c[0] for c in _COLUMNS)


def summarize_seeds(per_seed: Sequence[Sequence[dict]]) -> list[dict]:
    """Per row, the mean over seeds of each metric and its spread (half the range, ``<key>_spread``);
    ``per_seed`` is one :func:`ablate_fitting` result list per seed, rows in the same order."""
    if not per_seed:
        raise InputError("no ablation results to summarise", "run at least one seed")
    out = []
    for rows in zip(*per_seed):
        r = {k: v for k, v in rows[0].items() if k not in _METRICS + ("per_avatar", "seed")}
        r["seeds"] = [x["seed"] for x in rows]
        for key in _METRICS:
            vals = [x[key] for x in rows if key in x]
            if vals:
                r[key] = sum(vals) / len(vals)
                r[f"{key}_spread"] = (max(vals) - min(vals)) / 2
        out.append(r)
    return out


def format_table(results: Sequence[dict], lpips_note: str = "") -> str:
    """Table 4(a)'s layout (PSNR / LPIPS / SSIM on held-out views), plus the triplane side, the schedule, the
    fitted views' PSNR / SSIM and the first-fitted avatars' held-out PSNR; ``+-`` half the range over seeds when
    ``results`` come from :func:`summarize_seeds` with several. ``lpips_note`` (else the rows' ``lpips_note``) is
    printed under the table: what the LPIPS column is."""
    multi = any(len(r.get("seeds", [])) > 1 for r in results)
    names = [f"{r['letter']}. {r['row']}" for r in results]
    width = max([len("training strategy")] + [len(n) for n in names])
    cell = 13 if multi else 8

    def fmt(r: dict, key: str, spec: str) -> str:
        if key not in r or (isinstance(r[key], float) and math.isnan(r[key])):
            return "-"
        text = format(r[key], spec)
        return f"{text}+-{format(r[key + '_spread'], spec)}" if multi and f"{key}_spread" in r else text

    head = (f"{'training strategy':<{width}} {'res':>4} {'loops x iters':>13} "
            + " ".join(f"{h:>{max(cell, len(h))}}" for _, h, _ in _COLUMNS))
    lines = [head, "-" * len(head)]
    for name, r in zip(names, results):
        sched = f"{r['outer_loops']} x {r['inner_iterations']}"
        lines.append(f"{name:<{width}} {r['resolution']:>4} {sched:>13} "
                     + " ".join(f"{fmt(r, k, s):>{max(cell, len(h))}}" for k, h, s in _COLUMNS))
    seeds = sorted({s for r in results for s in r.get("seeds", [r.get("seed", 0)])})
    lines.append("PSNR / LPIPS / SSIM: held-out views (never fitted); fit: the fitted views; early: the first-fitted "
                 f"avatars' held-out PSNR. Seeds {seeds}" + (" (mean +- half range)." if multi else "."))
    note = lpips_note or next((r["lpips_note"] for r in results if r.get("lpips_note")), "")
    if note:
        lines.append(note)
    return "\n".join(lines)


def triplane_sweep(
    get_views: GetViews,
    avatar_id: str,
    out_dir: str | os.PathLike,
    resolutions: Sequence[int],
    channels: Sequence[int],
    iterations: int,
    stage1: Stage1Config | None = None,
    decoder: DecoderConfig | None = None,
    *,
    eval_num_samples: int = 128,
    bound: float = 1.0,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """Table 6 small: fit one avatar's views with a triplane of each resolution x channel count (triplane and a
    fresh seeded decoder jointly, one visit of ``iterations``) and score the fit on those views (PSNR / SSIM).
    Returns ``[{"resolution", "channels", "psnr", "ssim"}]``; each cell writes under ``out_dir/r<res>_c<ch>``."""
    base = replace(stage1 if stage1 is not None else Stage1Config(), outer_loops=1, inner_iterations=int(iterations),
                   iwc_weight=0.0, weight_decay=0.0)
    results = []
    for res in resolutions:
        for ch in channels:
            torch.manual_seed(seed)
            net = TriplaneDecoder.from_config(int(ch), decoder if decoder is not None else DecoderConfig())
            cell = Path(out_dir) / f"r{int(res)}_c{int(ch)}"
            store = TriplaneStore(cell / "triplanes", int(ch), int(res))
            fit_shared(get_views, [avatar_id], net, store, cell, base, bound=bound, center=center, seed=seed,
                       progress=progress)
            score = evaluate_fit(get_views, [avatar_id], net, store, bound=bound, center=center,
                                 num_samples=eval_num_samples)[str(avatar_id)]
            results.append({"resolution": int(res), "channels": int(ch), "psnr": score["psnr"], "ssim": score["ssim"]})
    return results


def format_sweep(results: Sequence[dict]) -> str:
    """Table 6's layout: PSNR by resolution (rows) and channels (columns)."""
    chans = sorted({r["channels"] for r in results})
    lines = ["Res. \\ Ch. " + " ".join(f"{c:>7d}" for c in chans)]
    for res in sorted({r["resolution"] for r in results}):
        cells = {r["channels"]: r["psnr"] for r in results if r["resolution"] == res}
        lines.append(f"{res:<11d} " + " ".join(f"{cells[c]:7.2f}" if c in cells else f"{'-':>7s}" for c in chans))
    return "\n".join(lines)
