"""The fitting ablation of RodinHD Table 4(a) / Table 5, reproduced small: the same :func:`fit_shared` run four
times with the rows' settings and the same total number of iterations, then the final shared decoder is scored on
every avatar's stored triplane (forgetting shows on the avatars fitted earliest)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from avatar_core.errors import InputError
from rodinhd.decoder import TriplaneDecoder
from rodinhd.fitting import GetViews, evaluate_fit, fit_shared
from rodinhd.triplane import TriplaneStore

__all__ = ["ABLATION_ROWS", "PAPER_ROWS", "ablation_row_settings", "ablate_fitting", "format_table"]

#: Table 5's columns as :func:`fit_shared` settings. ``outer_loops=None`` means "the task-replay loop count
#: passed to :func:`ablate_fitting`"; iterations per visit follow from the shared total.
ABLATION_ROWS: dict[str, dict] = {
    "naive": dict(outer_loops=1, weight_decay=0.0, iwc_weight=0.0),
    "+ task replay": dict(outer_loops=None, weight_decay=0.0, iwc_weight=0.0),
    "+ weight decay": dict(outer_loops=None, weight_decay=1e-4, iwc_weight=0.0),
    "+ consolidation": dict(outer_loops=None, weight_decay=0.0, iwc_weight=0.1),
    # Not a paper row: the same with the Fisher diagonal divided by its mean, so that lambda acts at small scale.
    "+ consolidation (normalised)": dict(outer_loops=None, weight_decay=0.0, iwc_weight=0.1, iwc_normalize=True),
}

#: The four rows of Table 4(a) B-E (Table 5's columns), run by default.
PAPER_ROWS = ("naive", "+ task replay", "+ weight decay", "+ consolidation")


def ablation_row_settings(row: str, num_avatars: int, total_iterations: int, outer_loops: int) -> dict:
    """Keyword settings of :func:`fit_shared` for one row, with ``total_iterations`` split over the visits."""
    if row not in ABLATION_ROWS:
        raise InputError(f"unknown ablation row {row!r}", f"use one of {list(ABLATION_ROWS)}")
    settings = dict(ABLATION_ROWS[row])
    loops = settings["outer_loops"] or outer_loops
    inner = total_iterations // (num_avatars * loops)
    if inner < 1:
        raise InputError(f"{total_iterations} iterations cannot give {num_avatars} avatars x {loops} loops a step each",
                         "raise total_iterations or lower outer_loops")
    settings.update(outer_loops=loops, inner_iterations=inner)
    return settings


def ablate_fitting(
    get_views: GetViews,
    avatar_ids: Sequence[str],
    total_iterations: int,
    out_dir: str | os.PathLike,
    channels: int = 8,
    resolution: int = 32,
    outer_loops: int = 10,
    earliest: int = 2,
    rows: Sequence[str] = PAPER_ROWS,
    decoder_kwargs: dict | None = None,
    eval_kwargs: dict | None = None,
    seed: int = 0,
    progress: bool = True,
    **fit_kwargs,
) -> list[dict]:
    """Run the Table 4(a) rows with the same total iterations; one result dict per row.

    Args:
        get_views, avatar_ids: the data, as for :func:`fit_shared`.
        total_iterations: steps per row, split evenly over avatars and visits (paper: 64 avatars x 30 x 5000).
        out_dir: each row writes its triplanes and state under ``out_dir/<row>`` (rerunning resumes).
        channels, resolution: triplane size (paper 32 x 512; tiny 8 x 32).
        outer_loops: task-replay passes of the replay rows (paper 30).
        rows: which rows of :data:`ABLATION_ROWS` to run (the paper's four).
        earliest: how many of the first-fitted avatars are also scored separately, to show forgetting.
        decoder_kwargs: extra :class:`TriplaneDecoder` arguments; every row starts from the same seeded decoder.
        eval_kwargs: extra :func:`evaluate_fit` arguments (bound, num_samples, ...).
        fit_kwargs: further :func:`fit_shared` arguments shared by all rows (rays_per_step, num_samples, ...).

    Returns ``[{"row", "psnr", "ssim", "psnr_earliest", "ssim_earliest", "outer_loops", "inner_iterations",
    "per_avatar"}]``.
    """
    results = []
    for row in rows:
        settings = ablation_row_settings(row, len(avatar_ids), total_iterations, outer_loops)
        torch.manual_seed(seed)
        decoder = TriplaneDecoder(channels, **(decoder_kwargs or {}))
        row_dir = Path(out_dir) / "".join(c if c.isalnum() else "_" for c in row.replace("+ ", "")).strip("_")
        store = TriplaneStore(row_dir / "triplanes", channels, resolution)
        fit_shared(get_views, avatar_ids, decoder, store, row_dir, seed=seed, progress=progress,
                   **{**fit_kwargs, **settings})
        ev_kwargs = {k: fit_kwargs[k] for k in ("bound", "center") if k in fit_kwargs}
        scores = evaluate_fit(get_views, avatar_ids, decoder, store, **{**ev_kwargs, **(eval_kwargs or {})})
        first = [str(a) for a in avatar_ids[:earliest]]

        def mean(key: str, ids: Sequence[str], scores: dict = scores) -> float:
            return sum(scores[a][key] for a in ids) / len(ids)

        all_ids = [str(a) for a in avatar_ids]
        results.append(dict(row=row, psnr=mean("psnr", all_ids), ssim=mean("ssim", all_ids),
                            psnr_earliest=mean("psnr", first), ssim_earliest=mean("ssim", first),
                            outer_loops=settings["outer_loops"], inner_iterations=settings["inner_iterations"],
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
