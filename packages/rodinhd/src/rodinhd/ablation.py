"""The fitting ablation of RodinHD Table 4(a) / Table 5, reproduced small: the same :func:`fit_shared` run four
times with the rows' settings at Table 5's iteration counts, scaled down together, then the final shared decoder is
scored on every avatar's stored triplane (forgetting shows on the avatars fitted earliest).

Table 5 gives the task-replay rows 30 visits x 5000 iterations per avatar and the naive row ("Rodin (512)") one
visit of 15000: the naive row trains each avatar a tenth as long. Here ``total_iterations`` is the task-replay
rows' total; the naive row gets 3x one replay visit's iterations per avatar (:data:`NAIVE_INNER_RATIO`), so the
rows keep Table 5's ratio at any scale."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from avatar_core.errors import InputError
from rodinhd.config import AblationConfig, DecoderConfig, Stage1Config
from rodinhd.decoder import TriplaneDecoder
from rodinhd.fitting import GetViews, evaluate_fit, fit_shared
from rodinhd.triplane import TriplaneStore

__all__ = ["ABLATION_ROWS", "NAIVE_INNER_RATIO", "PAPER_ROWS", "ablation_row_settings", "ablate_fitting",
           "format_sweep", "format_table", "triplane_sweep"]

#: Table 5: the naive row's single visit (15000) over a task-replay visit (5000).
NAIVE_INNER_RATIO = 15000 // 5000

#: Table 5's columns as :class:`Stage1Config` overrides. ``outer_loops=None`` means "the task-replay loop count
#: passed to :func:`ablate_fitting`"; iterations per visit follow from the shared total.
ABLATION_ROWS: dict[str, dict] = {
    "naive": dict(outer_loops=1, weight_decay=0.0, iwc_weight=0.0, iwc_normalize=False),
    "+ task replay": dict(outer_loops=None, weight_decay=0.0, iwc_weight=0.0, iwc_normalize=False),
    "+ weight decay": dict(outer_loops=None, weight_decay=1e-4, iwc_weight=0.0, iwc_normalize=False),
    "+ consolidation": dict(outer_loops=None, weight_decay=0.0, iwc_weight=0.1, iwc_normalize=False),
    # Not a paper row: the same with the Fisher diagonal divided by its mean, so that lambda acts at small scale.
    "+ consolidation (normalised)": dict(outer_loops=None, weight_decay=0.0, iwc_weight=0.1, iwc_normalize=True),
}

#: The four rows of Table 4(a) B-E (Table 5's columns), run by default.
PAPER_ROWS = ("naive", "+ task replay", "+ weight decay", "+ consolidation")


def ablation_row_settings(row: str, num_avatars: int, total_iterations: int, outer_loops: int) -> dict:
    """The :class:`Stage1Config` overrides of one row: the task-replay rows split ``total_iterations`` over
    ``num_avatars x outer_loops`` visits; the naive row visits each avatar once for :data:`NAIVE_INNER_RATIO`
    replay visits' worth (Table 5: 15000 vs 30 x 5000)."""
    if row not in ABLATION_ROWS:
        raise InputError(f"unknown ablation row {row!r}", f"use one of {list(ABLATION_ROWS)}")
    settings = dict(ABLATION_ROWS[row])
    inner = total_iterations // (num_avatars * outer_loops)
    loops = settings["outer_loops"] or outer_loops
    if settings["outer_loops"] == 1:
        inner *= NAIVE_INNER_RATIO
    if inner < 1:
        raise InputError(f"{total_iterations} iterations cannot give {num_avatars} avatars x {loops} loops a step each",
                         "raise total_iterations or lower outer_loops")
    settings.update(outer_loops=loops, inner_iterations=inner)
    return settings


def ablate_fitting(
    get_views: GetViews,
    avatar_ids: Sequence[str],
    out_dir: str | os.PathLike,
    settings: AblationConfig | None = None,
    stage1: Stage1Config | None = None,
    decoder: DecoderConfig | None = None,
    *,
    bound: float = 1.0,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Run the Table 4(a) rows with the same total iterations; one result dict per row.

    Args:
        get_views, avatar_ids: the data, as for :func:`fit_shared` (the caller picks ``settings.num_avatars``).
        out_dir: each row writes its triplanes and state under ``out_dir/<row>`` (rerunning resumes).
        settings: the ablation (:class:`rodinhd.config.AblationConfig`): total iterations per row (split evenly over
            avatars and visits; paper 64 avatars x 30 x 5000), triplane size, task-replay passes, rows, how many of
            the first-fitted avatars are scored separately (forgetting), rays / samples / occupancy of the fits and
            the evaluation's samples per ray. None: the defaults.
        stage1: the fitting settings every row starts from (learning rates, regularisers); the ablation's rays,
            samples and occupancy and each row's overrides replace theirs. None: the defaults.
        decoder: the decoder's settings; every row starts from the same seeded decoder. None: the defaults.
        bound, center, seed, progress: as in :func:`fit_shared`.

    Returns ``[{"row", "psnr", "ssim", "psnr_earliest", "ssim_earliest", "outer_loops", "inner_iterations",
    "per_avatar"}]``.
    """
    a = settings if settings is not None else AblationConfig()
    base = replace(stage1 if stage1 is not None else Stage1Config(), rays_per_step=a.rays_per_step,
                   num_samples=a.num_samples, occupancy=a.occupancy)
    results = []
    for row in a.rows:
        row_settings = replace(base, **ablation_row_settings(row, len(avatar_ids), a.total_iterations, a.outer_loops))
        torch.manual_seed(seed)
        net = TriplaneDecoder.from_config(a.channels, decoder if decoder is not None else DecoderConfig())
        row_dir = Path(out_dir) / "".join(c if c.isalnum() else "_" for c in row.replace("+ ", "")).strip("_")
        store = TriplaneStore(row_dir / "triplanes", a.channels, a.resolution)
        fit_shared(get_views, avatar_ids, net, store, row_dir, row_settings, bound=bound, center=center, seed=seed,
                   progress=progress)
        scores = evaluate_fit(get_views, avatar_ids, net, store, bound=bound, center=center,
                              num_samples=a.eval_num_samples)
        first = [str(x) for x in avatar_ids[:a.earliest]]

        def mean(key: str, ids: Sequence[str], scores: dict = scores) -> float:
            return sum(scores[x][key] for x in ids) / len(ids)

        all_ids = [str(x) for x in avatar_ids]
        results.append(dict(row=row, psnr=mean("psnr", all_ids), ssim=mean("ssim", all_ids),
                            psnr_earliest=mean("psnr", first), ssim_earliest=mean("ssim", first),
                            outer_loops=row_settings.outer_loops, inner_iterations=row_settings.inner_iterations,
                            per_avatar=scores))
    return results


def format_table(results: Sequence[dict]) -> str:
    """The ablation as a text table (Table 4(a) layout plus the earliest avatars' columns)."""
    width = max([len("training strategy")] + [len(r["row"]) for r in results])
    head = f"{'training strategy':<{width}} {'loops x iters':>13} {'PSNR':>7} {'SSIM':>6} {'PSNR(early)':>11} {'SSIM(early)':>11}"
    lines = [head, "-" * len(head)]
    for r in results:
        sched = f"{r['outer_loops']} x {r['inner_iterations']}"
        lines.append(f"{r['row']:<{width}} {sched:>13} {r['psnr']:>7.2f} {r['ssim']:>6.3f} {r['psnr_earliest']:>11.2f} "
                     f"{r['ssim_earliest']:>11.3f}")
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
