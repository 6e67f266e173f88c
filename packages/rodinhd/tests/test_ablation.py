"""Table 4(a) small (``rodinhd ablate-fitting``): the five rows, their resolutions and schedules, scoring on views
no row fitted; and the perceptual weights a config requires follow the perceptual term it configures."""

from __future__ import annotations

import math

import pytest
import torch

import rodinhd.ablation as ablation
from avatar_core.cameras import orbit_cameras
from avatar_core.errors import InputError, MissingWeightsError
from avatar_core.perceptual import RandomFeaturePerceptual
from rodinhd.ablation import (
    PAPER_ROWS,
    ablate_fitting,
    ablation_row_settings,
    format_table,
    row_resolution,
    split_views,
    summarize_seeds,
)
from rodinhd.config import AblationConfig, DecoderConfig, Stage1Config, load_rodinhd_config
from rodinhd.streaming import resolve_standins
from rodinhd.triplane import TriplaneStore

VIEWS, SIZE = 8, 16


def _views():
    """Two avatars whose view ``k`` is a flat image of grey level (k + 1) / 10 with a centred opaque square, so a
    view read anywhere says which dataset view it is."""
    cams = orbit_cameras(VIEWS, radius=2.5, elevation_deg=10, fov_deg=50, width=SIZE, height=SIZE)
    images = torch.zeros(VIEWS, SIZE, SIZE, 4)
    for k in range(VIEWS):
        images[k, ..., :3] = (k + 1) / 10
    images[:, 4:12, 4:12, 3] = 1.0
    return (lambda aid: (images, cams)), ["a0", "a1"]


def _view_ids(images: torch.Tensor) -> set[int]:
    return {round(float(v) * 10) - 1 for v in images[:, 0, 0, 0]}


def test_the_five_rows_are_table_4a_with_row_a_at_half_resolution_and_rodins_schedule():
    assert PAPER_ROWS == ("Rodin (256)", "Rodin (512)", "+ Task replay", "+ Weight decay", "+ Consolidation")
    for name in ("tiny", "paper", "authors_code"):
        assert tuple(load_rodinhd_config(name).ablation.rows) == PAPER_ROWS, name
    assert tuple(AblationConfig().rows) == PAPER_ROWS
    # Table 5 at the paper's scale (64 avatars, 30 x 5000): Rodin's rows 1 x 15000, the others 30 x 5000.
    paper = {row: ablation_row_settings(row, 64, 64 * 30 * 5000, 30) for row in PAPER_ROWS}
    for row in ("Rodin (256)", "Rodin (512)"):
        assert (paper[row]["outer_loops"], paper[row]["inner_iterations"]) == (1, 15000)
    for row in PAPER_ROWS[2:]:
        assert (paper[row]["outer_loops"], paper[row]["inner_iterations"]) == (30, 5000)
    assert paper["Rodin (256)"] == paper["Rodin (512)"]  # A differs from B only in resolution
    assert [paper[r]["weight_decay"] for r in PAPER_ROWS] == [0, 0, 0, 1e-4, 0]
    assert [paper[r]["iwc_weight"] for r in PAPER_ROWS] == [0, 0, 0, 0, 0.1]
    assert row_resolution("Rodin (256)", 512) == 256
    assert [row_resolution(r, 32) for r in PAPER_ROWS] == [16, 32, 32, 32, 32]
    with pytest.raises(InputError, match="unknown ablation row 'naive'"):
        ablation_row_settings("naive", 3, 120, 4)


def test_split_views_holds_out_every_kth_view():
    fitted, held = split_views(12, 4)
    assert held == [3, 7, 11] and fitted == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    with pytest.raises(InputError):
        split_views(12, 1)
    with pytest.raises(InputError):
        split_views(2, 4)


def test_micro_ablation_fits_the_fit_views_and_scores_held_out_views(tmp_path, monkeypatch):
    get_views, ids = _views()
    fitted_seen, scored = set(), {}
    real_fit, real_eval = ablation.fit_shared, ablation.evaluate_fit

    def fit(gv, avatar_ids, *args, **kw):
        for a in avatar_ids:
            fitted_seen.update(_view_ids(gv(a)[0]))
        return real_fit(gv, avatar_ids, *args, **kw)

    def evaluate(gv, avatar_ids, *args, **kw):
        kind = "held" if kw.get("perceptual") is not None else "fit"
        scored.setdefault(kind, set()).update(_view_ids(gv(avatar_ids[0])[0]))
        return real_eval(gv, avatar_ids, *args, **kw)

    monkeypatch.setattr(ablation, "fit_shared", fit)
    monkeypatch.setattr(ablation, "evaluate_fit", evaluate)
    settings = AblationConfig(num_avatars=2, total_iterations=8, outer_loops=2, earliest=1, channels=2, resolution=8,
                              held_out_every=4, rays_per_step=32, num_samples=8, eval_num_samples=8)
    stage1 = Stage1Config(occupancy=False)
    results = ablate_fitting(get_views, ids, tmp_path, settings, stage1, DecoderConfig(hidden_dim=8),
                             perceptual=RandomFeaturePerceptual(), progress=False)
    assert fitted_seen == {0, 1, 2, 4, 5, 6} and scored["held"] == {3, 7} and scored["fit"] == fitted_seen
    assert [r["row"] for r in results] == list(PAPER_ROWS)
    a, b = results[0], results[1]
    assert (a["resolution"], b["resolution"]) == (4, 8)
    assert (a["outer_loops"], a["inner_iterations"]) == (b["outer_loops"], b["inner_iterations"]) == (1, 6)
    assert all((r["outer_loops"], r["inner_iterations"]) == (2, 2) for r in results[2:])
    assert TriplaneStore(tmp_path / "A_Rodin_256" / "triplanes", 2, 4).load("a0").shape == (3, 2, 4, 4)
    assert TriplaneStore(tmp_path / "B_Rodin_512" / "triplanes", 2, 8).load("a0").shape == (3, 2, 8, 8)
    for r in results:
        for key in ("psnr", "ssim", "lpips", "fit_psnr", "fit_ssim", "psnr_earliest"):
            assert math.isfinite(r[key]), (r["row"], key)
    table = format_table(summarize_seeds([results]), "LPIPS column is a stand-in")
    for letter, row in zip("ABCDE", PAPER_ROWS):
        assert f"{letter}. {row}" in table
    assert "stand-in" in table


def test_seed_summary_is_the_mean_and_half_range():
    rows = [[dict(row="Rodin (512)", letter="B", resolution=8, outer_loops=1, inner_iterations=3, seed=s,
                  psnr=p, ssim=0.5, fit_psnr=p + 1, fit_ssim=0.6, psnr_earliest=p, ssim_earliest=0.5)]
            for s, p in ((0, 20.0), (1, 21.0))]
    (r,) = summarize_seeds(rows)
    assert r["seeds"] == [0, 1] and r["psnr"] == 20.5 and r["psnr_spread"] == 0.5 and r["ssim_spread"] == 0.0
    assert "20.50+-0.50" in format_table([r])


def test_perceptual_requirement_follows_the_configured_term(tmp_path):
    # paper.yaml: Eq. 6's perceptual term is VGG features (Psi^l), so VGG-16 is required and LPIPS's heads are not.
    with pytest.raises(MissingWeightsError) as err:
        resolve_standins(load_rodinhd_config("paper"), ("perceptual",))
    assert "upsample.vgg_path" in str(err.value) and "lpips" not in str(err.value).lower()
    # authors_code.yaml: the code's term is LPIPS (weight 0.5): its heads are required too.
    with pytest.raises(MissingWeightsError) as err:
        resolve_standins(load_rodinhd_config("authors_code"), ("perceptual",))
    assert "upsample.vgg_path" in str(err.value) and "upsample.lpips_path" in str(err.value)
    vgg = tmp_path / "vgg16.pth"
    vgg.write_bytes(b"weights")
    resolve_standins(load_rodinhd_config("paper", [f"upsample.vgg_path={vgg}"]), ("perceptual",))  # complete
    with pytest.raises(MissingWeightsError, match="upsample.lpips_path"):
        resolve_standins(load_rodinhd_config("authors_code", [f"upsample.vgg_path={vgg}"]), ("perceptual",))
