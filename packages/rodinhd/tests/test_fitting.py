"""Stage-1/2 fitting: IWC, the task-replay schedule, resuming, and fitting to a known triplane."""

import dataclasses

import pytest
import torch

from avatar_core.cameras import orbit_cameras
from avatar_core.errors import ConfigError
from avatar_core.train import process_shard
from rodinhd.ablation import ABLATION_ROWS, ablation_row_settings
from rodinhd.config import Stage1Config, Stage2Config
from rodinhd.decoder import TriplaneDecoder
from rodinhd.fitting import PAPER_TABLE5, evaluate_fit, fit_shared, fit_triplanes
from rodinhd.renderer import render_views
from rodinhd.replay import iwc_penalty, task_replay_schedule
from rodinhd.triplane import TriplaneStore, init_triplane

C, R = 4, 16


def _known_views(num_avatars: int, size: int = 16, views: int = 4):
    """RGBA views of random ground-truth triplanes rendered by a random decoder with high-contrast colour."""
    torch.manual_seed(123)
    gt_decoder = TriplaneDecoder(C, hidden_dim=16, density_bias=-1.0)
    with torch.no_grad():
        gt_decoder.color_net[-1].weight.mul_(6.0)
    cams = orbit_cameras(views, radius=2.5, elevation_deg=20, fov_deg=50, width=size, height=size)
    data = {}
    for i in range(num_avatars):
        planes = init_triplane(C, R, std=2.0, generator=torch.Generator().manual_seed(i))
        rgb, alpha = render_views(planes, gt_decoder, cams, num_samples=24, occupancy=False)
        data[f"av{i}"] = torch.cat([rgb / alpha.clamp_min(1e-6), alpha], -1).clamp(0, 1)
    return (lambda aid: (data[aid], cams)), list(data)


SMALL = dict(rays_per_step=32, num_samples=16, occupancy=False, triplane_lr=5e-2, decoder_lr=1e-2)


def _stage1(**kw) -> Stage1Config:
    return Stage1Config(**{**SMALL, **kw})


def _stage2(**kw) -> Stage2Config:
    return Stage2Config(**{**{k: v for k, v in SMALL.items() if k != "decoder_lr"}, **kw})


def test_iwc_penalty_zero_at_snapshot_and_closed_form_gradient():
    torch.manual_seed(0)
    decoder = TriplaneDecoder(C, hidden_dim=8)
    params = decoder.consolidated_parameters()
    assert set(params) == {n for n, _ in decoder.named_parameters()}  # colour and density nets, all of them
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    fisher = {n: torch.rand_like(p) for n, p in params.items()}
    assert iwc_penalty(params, fisher, snapshot, 0.1).item() == 0.0
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p))
    lam = 0.1
    names = list(params)
    grads = torch.autograd.grad(iwc_penalty(params, fisher, snapshot, lam), [params[n] for n in names])
    for n, g in zip(names, grads):
        torch.testing.assert_close(g, lam * fisher[n] * (params[n].detach() - snapshot[n]))
    # The authors' code drops Eq. 3's 1/2: exactly twice the penalty.
    torch.testing.assert_close(iwc_penalty(params, fisher, snapshot, lam, half=False),
                               2 * iwc_penalty(params, fisher, snapshot, lam))


def test_task_replay_schedule_and_ablation_rows():
    ids = ["a", "b", "c"]
    visits = task_replay_schedule(ids, outer_loops=4, inner_iterations=7, shuffle=True, seed=3)
    assert len(visits) == 12 and [v.index for v in visits] == list(range(12))
    for aid in ids:
        mine = [v for v in visits if v.avatar_id == aid]
        assert [v.loop for v in mine] == [0, 1, 2, 3] and all(v.iterations == 7 for v in mine)
    for loop in range(4):  # every pass visits every avatar once before the next pass starts
        assert sorted(v.avatar_id for v in visits[3 * loop:3 * loop + 3]) == ids
    naive = task_replay_schedule(ids, 1, 21)
    assert [(v.avatar_id, v.iterations) for v in naive] == [("a", 21), ("b", 21), ("c", 21)]
    # Table 4(a) rows at Table 5's iteration counts: replay rows 30 x 5000 per avatar, Rodin's rows 1 x 15000.
    totals = set()
    for row, spec in ABLATION_ROWS.items():  # the paper rows and the extra one
        if not spec.replay:
            continue
        s = ablation_row_settings(row, num_avatars=3, total_iterations=120, outer_loops=4)
        totals.add(3 * s["outer_loops"] * s["inner_iterations"])
    assert totals == {120}
    paper_naive = ablation_row_settings("Rodin (512)", 64, 64 * 30 * 5000, 30)
    assert (paper_naive["outer_loops"], paper_naive["inner_iterations"]) == (1, 15000)  # Table 5, typed
    small_naive = ablation_row_settings("Rodin (512)", 3, 120, 4)
    assert (small_naive["outer_loops"], small_naive["inner_iterations"]) == (1, 30)  # 120 / (3 x 4) x 3
    assert ablation_row_settings("+ Consolidation", 3, 120, 4)["iwc_weight"] == 0.1
    # Every row and the paper's Table 5 preset are settings of the one fitting function's Stage1Config.
    paper = dataclasses.replace(Stage1Config(), **PAPER_TABLE5)
    assert (paper.tv_weight, paper.l2_weight, paper.decoder_lr) == (1e-2, 1e-4, 2e-4)
    for row in ABLATION_ROWS:
        dataclasses.replace(Stage1Config(), **ablation_row_settings(row, 3, 120, 4))


def test_resume_mid_schedule_matches_uninterrupted_run(tmp_path):
    """Exact state equality: decoder weights, Adam moments via the next visits, IWC states and triplanes."""
    get_views, ids = _known_views(2, size=8, views=2)
    settings = _stage1(outer_loops=2, inner_iterations=3, iwc_weight=0.1)

    def run(root, splits):
        torch.manual_seed(0)
        dec = TriplaneDecoder(C, hidden_dim=8)
        store = TriplaneStore(root / "tp", C, R)
        result = None
        for max_visits in splits:
            dec = TriplaneDecoder(C, hidden_dim=8)  # a fresh process: everything comes from disk
            result = fit_shared(get_views, ids, dec, store, root, settings, max_visits=max_visits, progress=False)
        return dec, store, result

    dec_a, store_a, res_a = run(tmp_path / "a", [None])
    dec_b, store_b, res_b = run(tmp_path / "b", [1, 2, None])
    assert res_a.done and res_b.done and res_b.next_visit == 4
    assert [h["avatar"] for h in res_a.history] == ["av0", "av1", "av0", "av1"]
    assert res_a.history == res_b.history
    for (n, pa), (_, pb) in zip(dec_a.state_dict().items(), dec_b.state_dict().items()):
        assert torch.equal(pa, pb), n
    for aid in ids:
        assert torch.equal(store_a.load(aid), store_b.load(aid))
    with pytest.raises(ConfigError, match="iwc_weight"):
        fit_shared(get_views, ids, TriplaneDecoder(C, hidden_dim=8), store_b, tmp_path / "b",
                   dataclasses.replace(settings, iwc_weight=0.5), progress=False)


def test_fit_raises_psnr_and_stage2_keeps_decoder_frozen(tmp_path):
    get_views, ids = _known_views(1, size=16, views=4)
    torch.manual_seed(1)
    decoder = TriplaneDecoder(C, hidden_dim=16)
    store = TriplaneStore(tmp_path / "tp", C, R)
    store.save(ids[0], init_triplane(C, R, std=0.1, generator=torch.Generator().manual_seed(9)))
    before = evaluate_fit(get_views, ids, decoder, store, num_samples=24)[ids[0]]["psnr"]
    kw = dict(rays_per_step=64, num_samples=24, occupancy=True, grid_resolution=16)
    fit_shared(get_views, ids, decoder, store, tmp_path, _stage1(outer_loops=1, inner_iterations=150, **kw),
               progress=False)
    after = evaluate_fit(get_views, ids, decoder, store, num_samples=24)[ids[0]]["psnr"]
    print(f"psnr before {before:.2f} after {after:.2f}")
    assert after > before + 6.0, (before, after)

    # Stage 2: the decoder does not move, the triplane does not get worse, and the shard split is by rank.
    frozen = {n: p.clone() for n, p in decoder.state_dict().items()}
    out = TriplaneStore(tmp_path / "stage2", C, R)
    s2 = _stage2(iterations=40, **kw)
    assert fit_triplanes(get_views, ids, decoder, out, store, s2, rank=1, world_size=2, progress=False) == []
    assert fit_triplanes(get_views, ids, decoder, out, store, s2, rank=0, world_size=2, progress=False) == ids
    assert all(torch.equal(p, frozen[n]) for n, p in decoder.state_dict().items())
    assert all(p.requires_grad for p in decoder.parameters())
    refit = evaluate_fit(get_views, ids, decoder, out, num_samples=24)[ids[0]]["psnr"]
    print(f"stage 2 refit {refit:.2f}")
    assert refit > after - 0.5
    # A finished avatar is skipped on rerun.
    assert fit_triplanes(get_views, ids, decoder, out, store, s2, rank=0, world_size=1, progress=False) == []
    assert process_shard(3, 4) == (3, 4)


@pytest.mark.slow
def test_distortion_option_concentrates_the_weights_along_rays(tmp_path):
    """Stage 1's distortion_weight (the authors' code: 2e-5) adds mip-NeRF 360's loss: with a large weight the
    fitted field's rendering weights end up more concentrated along the rays than without it."""
    from avatar_core.render.compositing import distortion_loss
    from avatar_core.render.rays import generate_rays
    from rodinhd.renderer import TriplaneField, render_triplane_rays

    get_views, ids = _known_views(1, size=12, views=3)
    _, cams = get_views(ids[0])
    measured = {}
    for w in (0.0, 1.0):
        torch.manual_seed(1)
        decoder = TriplaneDecoder(C, hidden_dim=16)
        store = TriplaneStore(tmp_path / f"tp{w}", C, R)
        fit_shared(get_views, ids, decoder, store, tmp_path / f"s{w}",
                   _stage1(outer_loops=1, inner_iterations=40, distortion_weight=w), progress=False)
        o, d = (x.reshape(-1, 3) for x in generate_rays(cams[0]))
        with torch.no_grad():
            r = render_triplane_rays(TriplaneField(store.load(ids[0]), decoder), o, d, 16, None, early_stop_eps=0.0)
        measured[w] = float(distortion_loss(r.weights, r.t_starts, r.t_ends, r.ray_indices, o.shape[0]).mean())
    assert measured[1.0] < 0.8 * measured[0.0], measured
