"""Defects found in review of the TeRA package, one test each: the device of fit-teacher and distill, the shared
avatar never moved in place, the latent-resolution ablation's arithmetic, avatar files of another point set,
``tera recolour`` and ``animate --motion FILE.npz``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from avatar_core.errors import ConfigError, InputError, MissingFileError
from avatar_core.io import load_tensors, save_tensors
from avatar_core.results import ResultExistsError
from tera import cli
from tera import pipeline as P
from tera.avatars import AVATAR_FORMAT, load_avatar
from tera.config import load_config
from tera.recolour import parse_colour
from tera.uv_gaussians import ATTRIBUTE_SLICES

TOY = ["threads=1", "data.num=2", "data.views=3", "data.res=32", "data.image_size=32", "data.uv_res=64",
       "data.eval_views=[1]", "body.num_points=800", "teacher.resolution=16", "teacher.feature_levels=[]", "teacher.steps=2",
       "distill.latent_resolution=8", "distill.upsample_factor=2", "distill.train.max_steps=2",
       "distill.train.progress_bar=false", "diffusion.train.max_steps=2", "diffusion.train.progress_bar=false",
       "diffusion.batch_size=2", "generate.sampler=ddim", "generate.steps=2", "generate.render_size=32",
       "generate.turntable_frames=2", "animate.frames=3", "animate.render_size=32"]


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tera_defects")
    cfg = load_config(None, TOY + [f"run_dir={root / 'run'}", f"data.root={root / 'data'}"])
    P.run_all(cfg, progress=False)
    models = P.load_models(cfg)
    gen = P.generate(cfg, "a woman in a red dress", seed=1, models=models, video=False)
    return cfg, models, gen, root


def test_build_avatar_per_device_leaves_the_shared_cpu_avatar_alone():
    cfg = load_config(None, ["body.num_points=800"])
    cpu = P.build_avatar(cfg)
    other = P.build_avatar(cfg, "meta")
    assert other is not cpu and other.template_points.device.type == "meta"
    assert cpu.template_points.device.type == "cpu" and cpu.body.template_vertices.device.type == "cpu"
    assert P.build_avatar(cfg) is cpu and P.build_avatar(cfg, "meta") is other


def test_fit_teacher_fits_on_the_configured_device(run, monkeypatch):
    """fit-teacher resolved the device and dropped it: the fitter always got the CPU avatar."""
    cfg, _, _, root = run
    seen = {}

    def fitter(avatar, *args, **kw):
        seen["device"] = avatar.template_points.device.type
        raise _Stop

    monkeypatch.setattr("tera.teacher.TeacherFitter", fitter)
    sub = load_config(None, TOY + [f"run_dir={root / 'meta_run'}", f"data.root={cfg.data.root}", "device=meta"])
    with pytest.raises(_Stop):
        P.fit_teacher(sub, progress=False)
    assert seen["device"] == "meta"


def test_distill_does_not_move_the_shared_avatar(run, monkeypatch):
    """distill moved the process-wide cached avatar with .to(device): every later CPU caller got a GPU avatar."""
    cfg, *_ = run
    ids = P.load_dataset(cfg).ids
    monkeypatch.setattr("tera.stage1.teacher_latent_cache", lambda *a, **k: (SimpleNamespace(folder=None), ids))
    monkeypatch.setattr("tera.stage1.LatentSet", lambda *a, **k: None)
    seen = {}

    def perceptual(c):  # called right after the stage's avatar is built
        raise _Stop

    real = P.build_avatar
    monkeypatch.setattr("tera.stage1.build_avatar", lambda c, *a: seen.setdefault("avatar", real(c, *a)))
    monkeypatch.setattr("tera.stage1.perceptual", perceptual)
    sub = load_config(None, TOY + [f"run_dir={cfg.run_dir}", f"data.root={cfg.data.root}", "device=meta"])
    with pytest.raises(_Stop):
        P.distill(sub, progress=False, out_dir=Path(cfg.run_dir) / "meta_distill")
    assert seen["avatar"].template_points.device.type == "meta"
    assert P.build_avatar(cfg).template_points.device.type == "cpu"


def test_ablation_arms_decode_to_the_main_runs_resolution():
    from tera.evaluate import ablation_arms

    paper = load_config("paper")
    # 1024 = 256 x 4 in the paper; 1536 // 128 = 12 is no power of two (the decoder refused it)
    assert ablation_arms(paper) == [(128, 8), (256, 4)]
    assert ablation_arms(load_config(None)) == [(8, 8), (16, 4)]  # tiny: UV 64
    with pytest.raises(ConfigError, match="power of two"):
        ablation_arms(load_config(None, ["evaluate.ablation_resolutions=[12]"]))
    with pytest.raises(ConfigError, match="multiple"):
        ablation_arms(load_config(None, ["evaluate.ablation_resolutions=[16]", "teacher.resolution=40"]))


def test_avatar_of_another_point_set_is_an_error(tmp_path):
    settings = {"body": "anny", "latent_channels": 8, "latent_resolution": 4, "upsample_factor": 2,
                "num_points": 800, "point_seed": 0}
    models = SimpleNamespace(decoder_settings=settings)
    meta = {"format": AVATAR_FORMAT, "body": "anny", "map_resolution": 8, "num_points": 800, "point_seed": 0}
    path = save_tensors(tmp_path / "a.safetensors", {"latent": torch.zeros(8, 4, 4)}, meta)
    assert load_avatar(path, models)[0].shape == (8, 4, 4)
    for change in ({"num_points": 900}, {"point_seed": 1}):
        save_tensors(path, {"latent": torch.zeros(8, 4, 4)}, {**meta, **change})
        with pytest.raises(InputError, match="Gaussians"):
            load_avatar(path, models)


def test_parse_colour():
    assert parse_colour("Light Blue") == pytest.approx((0.55, 0.72, 0.90))
    assert parse_colour("#ff8000") == pytest.approx((1.0, 128 / 255, 0.0))
    assert parse_colour("0.1, 0.2,0.3") == pytest.approx((0.1, 0.2, 0.3))
    for bad in ("mauve-ish", "#ff80", "1,2,3"):
        with pytest.raises(InputError):
            parse_colour(bad)


def _cli(cfg, *argv):
    return cli.main([*argv, f"run_dir={cfg.run_dir}", f"data.root={cfg.data.root}", *TOY])


def test_cli_recolour(run, tmp_path, capsys):
    cfg, models, gen, _ = run
    out = tmp_path / "rec"
    assert _cli(cfg, "recolour", gen["dir"], "--region", "upper_clothes+shoes", "--colour", "green",
                "--out", str(out)) == 0
    res = json.loads(capsys.readouterr().out)
    maps = load_tensors(out / "maps.safetensors")[0]["maps"]
    src = load_tensors(Path(gen["files"]["maps"]))[0]["maps"]
    mask = P.build_avatar(cfg).uv_mapper.part_masks()
    R = maps.shape[-1]
    from tera.animate import region_mask

    inside = region_mask(P.build_avatar(cfg).uv_mapper, "upper_clothes+shoes", R)
    assert 0 < int(inside.sum()) < R * R and res["texels_changed"] == int(inside.sum()) and mask
    rgb = ATTRIBUTE_SLICES["rgb"]
    torch.testing.assert_close(maps[rgb][:, inside], torch.tensor([0.18, 0.55, 0.24])[:, None].expand(3, int(inside.sum())))
    torch.testing.assert_close(maps[rgb][:, ~inside], src[rgb][:, ~inside])
    geo = [i for i in range(maps.shape[0]) if i not in range(rgb.start, rgb.stop)]
    torch.testing.assert_close(maps[geo], src[geo])  # geometry untouched
    assert (out / "avatar.ply").is_file() and (out / "preview.png").is_file()
    # the result rule: no replacement without --overwrite; bad arguments fail before anything is written
    with pytest.raises(ResultExistsError):
        P_ = __import__("tera.recolour", fromlist=["recolour"])
        P_.recolour(cfg, gen["dir"], "shoes", "red", out_dir=out, models=models)
    assert _cli(cfg, "recolour", gen["dir"], "--region", "shoes", "--colour", "red", "--out", str(out),
                "--overwrite") == 0
    capsys.readouterr()
    assert _cli(cfg, "recolour", gen["dir"], "--region", "hat", "--colour", "red", "--out", str(tmp_path / "x")) == 2
    assert _cli(cfg, "recolour", gen["dir"], "--region", "shoes", "--colour", "mauve", "--out",
                str(tmp_path / "y")) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_animate_motion_file(run, tmp_path):
    """``animate --motion FILE.npz``: an SMPL-X sequence through the kernel's load_motion; its root turn is kept."""
    cfg, models, gen, _ = run
    T = 5
    poses = np.zeros((T, 55, 3))
    poses[:, 0, 1] = np.linspace(0, np.pi / 2, T)  # the root turns a quarter about the vertical
    np.savez(tmp_path / "turn.npz", poses=poses.reshape(T, 165), trans=np.zeros((T, 3)),
             fps=np.array(float(cfg.animate.fps)))
    res = P.animate(cfg, gen["dir"], out=tmp_path / "anim", motion=str(tmp_path / "turn.npz"), models=models)
    assert res["frames"] == cfg.animate.frames and Path(res["video"]).name == "turn.mp4"
    exp = P.export(cfg, gen["dir"], tmp_path / "exp", motion=str(tmp_path / "turn.npz"))
    from avatar_core.io import load_ply

    first, last = (load_ply(tmp_path / "exp" / f"turn_{t:03d}.ply").means for t in (0, cfg.animate.frames - 1))
    assert "turn_NNN" in exp["posed"]
    # the first animate.frames frames: the body turned about Y between the first and the last
    assert not np.allclose(first, last, atol=1e-3)
    np.testing.assert_allclose(np.sort(first[:, 1]), np.sort(last[:, 1]), atol=2e-2)  # heights kept by a Y turn
    with pytest.raises(MissingFileError):
        P.animate(cfg, gen["dir"], out=tmp_path / "a2", motion=str(tmp_path / "missing.npz"), models=models)
    assert not (tmp_path / "a2").exists()


def test_captions_follow_the_papers_counts_and_each_step_records_its_caption(run):
    """TeRA Sec. 3.1: one long description (<= 40 words) and five phrase-level ones (8-16 words); stage 2 writes
    which one each avatar of each step trained with, the choice tera.data.caption_choice makes."""
    from tera.data import caption_choice
    from tera.stage2 import CAPTION_LOG

    cfg, *_ = run
    ds = P.load_dataset(cfg)
    for i in range(len(ds)):
        caps = ds.captions(i)
        assert len(caps) == 6 and len(caps[0].split()) <= 40 and all(8 <= len(c.split()) <= 16 for c in caps[1:])
    rows = [json.loads(line) for line in (P.run_paths(cfg).diffusion / CAPTION_LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(cfg.diffusion.train.max_steps))
    index = {a: i for i, a in enumerate(ds.ids)}
    for r in rows:
        assert len(r["avatars"]) == cfg.diffusion.batch_size
        assert r["captions"] == [caption_choice(6, cfg.seed, r["epoch"], index[a]) for a in r["avatars"]]


@pytest.mark.slow
def test_evaluate_joined_region_and_both_ablation_arms(run, tmp_path):
    """``tera evaluate`` end to end at toy size: a joined edit region gives a real mask (finite, non-zero change
    inside), and both ablation arms decode to the main run's UV resolution and carry a held-out text score."""
    cfg, *_ = run
    sub = load_config(None, TOY + [f"run_dir={cfg.run_dir}", f"data.root={cfg.data.root}",
                                   "evaluate.data_sizes=[]",  # the scaling study: tests/test_scaling.py
                                   "evaluate.edit_region=upper_clothes+shoes", "evaluate.samples_per_prompt=1",
                                   "evaluate.random_captions=2", "evaluate.ablation_resolutions=[4,8]",
                                   "evaluate.ablation_steps=1", "evaluate.ablation_diffusion_steps=1",
                                   "evaluate.prompts=[a woman in a red dress,a man in a blue shirt and grey shorts]"])
    report = P.evaluate(sub, out_dir=tmp_path / "ev", progress=False)
    for m in ("inpaint", "replace"):
        inside = report["editing"][m]["colour_map_mean_abs_change_inside"]
        assert np.isfinite(inside) and inside > 0
    arms = report["latent_resolution_ablation"]
    uv = cfg.distill.latent_resolution * cfg.distill.upsample_factor
    assert {r: (a["upsample_factor"], a["uv_resolution"]) for r, a in arms.items()} == {"4": (4, uv), "8": (2, uv)}
    assert all(0.0 <= a["held_out_text_score"] <= 1.0 and a["diffusion_steps"] == 1 for a in arms.values())
    md = (tmp_path / "ev" / "evaluation.md").read_text()
    assert "held-out text score" in md and "Body shape from text" in md
    shape = report["shape"]  # stage 2 trained the shape head; every held-out shape prompt is read back as words
    assert set(shape["head"]) == {"stature", "build", "age"} and len(shape["per_prompt"]) == len(sub.evaluate.shape_prompts)
    assert all(0.0 <= v <= 1.0 for v in [*shape["head"].values(), *shape["mean_shape"].values()])
    # ... and the generated avatars' bodies (shape from the prompt, Gaussians decoded on it) are measured too
    assert set(shape["avatar"]) == {"stature", "build", "age"}
    assert all(float(r["avatar"]["height_m"]) > 0.5 for r in shape["per_prompt"])
