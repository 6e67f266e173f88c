"""The data-scaling study's machinery (tera.scaling) at a micro scale: nested subsets and disjoint held-out avatars,
steps scaled to the data, a finished size reused, the chance row scoring against a different prompt, the table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar_core.data.garment_score import garment_scorer, parse_garments
from avatar_core.errors import ConfigError
from tera import pipeline as P
from tera import scaling as S
from tera.config import load_config
from tera.teacher import TeacherFeatureStore

MICRO = ["threads=1", "data.num=6", "data.max_avatars=4", "data.views=3", "data.res=32", "data.image_size=32",
         "data.uv_res=64", "data.eval_views=[1]", "body.num_points=800", "teacher.resolution=16", "teacher.feature_levels=[]", "teacher.steps=2",
         "distill.latent_resolution=8", "distill.upsample_factor=2", "distill.train.max_steps=2",
         "distill.train.progress_bar=false", "diffusion.train.max_steps=2", "diffusion.train.progress_bar=false",
         "diffusion.batch_size=2", "evaluate.data_sizes=[2,4]", "evaluate.heldout_avatars=2",
         "evaluate.base_steps=2", "evaluate.base_avatars=2"]
SAMPLING = {"sampler": "ddim", "steps": 2, "guidance": None}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    cfg = load_config(None, MICRO + [f"run_dir={root / 'run'}", f"data.root={root / 'data'}"])
    P.run_all(cfg, progress=False)  # the shared teacher and stage-1 decoder, on the largest subset (4 avatars)
    return cfg


def _scorer(cfg):
    return garment_scorer(cfg.body.name, cfg.body.model_dir, cfg.data.uv_res)


def test_plan_nests_subsets_holds_out_the_rest_and_scales_steps(run):
    plan = S.plan_study(run)
    everything = P.load_dataset(load_config(None, MICRO + [f"data.root={run.data.root}", "data.max_avatars=0"])).ids
    assert plan.sizes == [2, 4] and plan.steps == {2: 2, 4: 4}  # base_steps x N / base_avatars
    assert plan.training[2] == plan.training[4][:2] == everything[:2]  # nested: the first N avatars
    assert len(plan.heldout) == 2 and not set(plan.heldout) & set(plan.training[4])  # in no training subset
    assert set(plan.heldout) <= set(everything)  # dataset avatars: novel combinations of its attributes
    store = TeacherFeatureStore(P.run_paths(run).teacher, run.teacher.channels)
    assert all(store.exists(a) for a in plan.training[4]) and not any(store.exists(a) for a in plan.heldout)
    # Fewer sizes on the same run: the same held-out avatars (after the run's data.max_avatars, unseen by the teacher).
    fewer = load_config(None, MICRO + [f"run_dir={run.run_dir}", f"data.root={run.data.root}", "evaluate.data_sizes=[2]"])
    assert S.plan_study(fewer).heldout == plan.heldout


def test_plan_rejects_a_run_or_dataset_that_cannot_hold_the_study(run):
    with pytest.raises(ConfigError, match="max_avatars"):
        S.plan_study(load_config(None, MICRO + [f"data.root={run.data.root}", "data.max_avatars=2"]))
    with pytest.raises(ConfigError, match="max_avatars"):  # 0: every avatar, none left to hold out
        S.plan_study(load_config(None, MICRO + [f"data.root={run.data.root}", "data.max_avatars=0"]))
    with pytest.raises(ConfigError, match="needs 8 avatars"):
        S.plan_study(load_config(None, MICRO + [f"data.root={run.data.root}", "evaluate.heldout_avatars=4"]))
    with pytest.raises(ConfigError, match="increasing"):
        S.plan_study(load_config(None, MICRO + [f"data.root={run.data.root}", "evaluate.data_sizes=[4,2]"]))


def test_chance_prompt_is_always_a_different_text():
    prompts = ["a", "a", "b", "a", "c"]
    other = S.other_prompt(prompts)
    assert all(prompts[j] != prompts[k] for k, j in enumerate(other))
    with pytest.raises(ConfigError, match="same text"):
        S.other_prompt(["a", "a"])


def test_study_trains_each_size_reuses_finished_ones_and_prints_the_table(run):
    study = S.run_study(run, P.load_models(run, with_diffusion=False).decoder, _scorer(run), SAMPLING, progress=False)
    rows = {r["avatars"]: r for r in study["sizes"]}
    assert set(rows) == {2, 4} and rows[2]["diffusion_steps"] == 2 and rows[4]["diffusion_steps"] == 4
    assert not any(r["reused"] for r in rows.values())
    for r in rows.values():
        for k in ("held_out_prompts", "chance_other_held_out_prompt", "training_captions"):
            assert 0.0 <= r[k] <= 1.0
    model = S.size_folder(run, 4) / "diffusion" / "model" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    again = S.run_study(run, P.load_models(run, with_diffusion=False).decoder, _scorer(run), SAMPLING, progress=False)
    assert all(r["reused"] for r in again["sizes"]) and model.stat().st_mtime_ns == stamp  # nothing trained again
    assert [r["held_out_prompts"] for r in again["sizes"]] == [r["held_out_prompts"] for r in study["sizes"]]
    md = "\n".join(S.format_scaling(again))
    assert "| training avatars | 2 | 4 |" in md and "| diffusion steps | 2 | 4 |" in md
    assert "chance: same avatars vs another held-out prompt" in md and "Per attribute at 4 training avatars" in md
    # Other settings are a new size: the record no longer matches, so it is not reused.
    changed = load_config(None, MICRO + [f"run_dir={run.run_dir}", f"data.root={run.data.root}",
                                         "evaluate.base_steps=3"])
    assert S.plan_study(changed).steps == {2: 3, 4: 6}


def test_scorer_reads_real_textures_as_their_own_captions(run):
    """The kernel scorer the study uses, on the dataset's own UV textures: their own captions score higher than
    another avatar's (the real-texture row is the scorer's ceiling, the shuffled one its chance)."""
    ds = P.load_dataset(load_config(None, MICRO + [f"data.root={run.data.root}", "data.max_avatars=0"]))
    scorer = _scorer(run)
    caps = [ds.captions(i)[0] for i in range(len(ds))]
    maps = torch.stack([ds.texture(i).permute(2, 0, 1) for i in range(len(ds))])
    own = S.score_prompts(maps, caps, scorer)
    other = S.score_prompts(maps, [caps[j] for j in S.other_prompt(caps)], scorer)
    mean = lambda rows: float(np.mean([v for r in rows for v in r.values()]))  # noqa: E731
    assert mean(own) >= 0.8 and mean(own) > mean(other)
    assert all(set(r) == set(parse_garments(c)) for r, c in zip(own, caps))  # every asked attribute is scored


def test_pooled_text_reaches_the_unet_and_survives_save_load(tmp_path):
    """diffusion.pooled_text: the prompt's pooled states enter the timestep embedding (its projection gets a
    gradient from the loss; padding tokens do not change it) and a saved model rebuilds with it."""
    from tera.latent_diffusion import StructuredLatentDiffusion
    from tera.stage2 import unet_config
    from tera.text import TextCondition

    torch.manual_seed(0)
    cfg = load_config(None, ["diffusion.pooled_text=true", "diffusion.unet.block_out_channels=[8,16]",
                             "diffusion.unet.norm_num_groups=4"])
    null = TextCondition(torch.zeros(1, 6, 12), torch.tensor([[True, False, False, False, False, False]]))
    model = StructuredLatentDiffusion(unet_config(cfg, 4, 8, 12), null_text=null)
    assert model.pooled_text
    model.set_latent_stats(torch.randn(4, 4, 8, 8))
    states, mask = torch.randn(2, 6, 12), torch.tensor([[True] * 3 + [False] * 3] * 2)
    model.training_loss(torch.randn(2, 4, 8, 8), TextCondition(states, mask), drop=torch.zeros(2, dtype=torch.bool)).backward()
    assert model.unet.class_embedding.linear_1.weight.grad.abs().sum() > 0
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    padded = states.clone()
    padded[:, 3:] = 100.0  # padding tokens: masked out of cross-attention and of the pooled mean
    with torch.no_grad():
        out = model.denoise(x, t, TextCondition(states, mask))
        torch.testing.assert_close(model.denoise(x, t, TextCondition(padded, mask)), out)
        other = model.denoise(x, t, TextCondition(states + 1.0, mask))
    assert (other - out).abs().max() > 1e-4
    loaded = StructuredLatentDiffusion.load(model.save(tmp_path / "m"))
    assert loaded.pooled_text
    with torch.no_grad():
        torch.testing.assert_close(loaded.denoise(x, t, TextCondition(states, mask)), out)


def test_loo_ridge_r2_finds_linear_structure_and_none_in_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    y = x @ torch.randn(5, 30, generator=g) + 0.1 * torch.randn(60, 30, generator=g)
    assert S.loo_ridge_r2(x, y, lam=1e-3) > 0.95
    assert S.loo_ridge_r2(x, torch.randn(60, 30, generator=g), lam=1e-3) < 0.0  # held-out items: nothing to predict


def test_evaluation_prints_the_teachers_consistency(run):
    from tera.evaluate import format_teacher_consistency
    from tera.teacher import teacher_consistency

    c = teacher_consistency(run)
    lines = format_teacher_consistency(c)
    row = next(x for x in lines if x.startswith("| fitted |"))
    assert np.isfinite([float(v) for v in row.strip("|").split("|")[1:]]).all() and c["avatars"] == 4
    assert "not measured" in format_teacher_consistency(None)[-1]
