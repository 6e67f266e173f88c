"""Nothing a TeRA user made is lost or silently replaced: result folders, argument checks before writing, --restart,
the full resume signature, the teacher's fit settings, reproducible training, one run per folder, odd prompts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from avatar_core.errors import ConfigError, InputError
from avatar_core.io import load_tensors
from avatar_core.results import ResultExistsError
from avatar_core.train import RunLockedError, list_checkpoints
from avatar_core.train.lock import LOCK_FILE
from tera import pipeline as P
from tera.cli import main as tera_main
from tera.config import load_config

TOY = ["threads=1", "data.num=2", "data.views=3", "data.res=32", "data.image_size=32", "data.uv_res=64",
       "data.eval_views=[1]", "body.num_points=800", "teacher.resolution=16", "teacher.feature_levels=[]", "teacher.steps=2",
       "distill.latent_resolution=8", "distill.upsample_factor=2", "distill.train.max_steps=2",
       "distill.train.progress_bar=false", "diffusion.train.max_steps=3", "diffusion.train.progress_bar=false",
       "diffusion.batch_size=2", "generate.sampler=ddim", "generate.steps=2", "generate.render_size=32",
       "generate.turntable_frames=2", "animate.frames=2", "animate.render_size=32"]


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tera_safety")
    overrides = TOY + [f"run_dir={root / 'run'}", f"data.root={root / 'data'}"]
    cfg = load_config(None, overrides)
    P.run_all(cfg, progress=False)
    return cfg, overrides, P.load_models(cfg), root


def test_generate_names_are_unique_and_results_never_replaced_unasked(run, caplog):
    """Issue case 2: prompts sharing 40 characters, or without letters, get their own folders."""
    cfg, _, models, _ = run
    stem = "a woman in a red dress with long black hair and "
    a = P.generate(cfg, stem + "white shoes", models=models, video=False)
    b = P.generate(cfg, stem + "black boots", models=models, video=False)
    with caplog.at_level(logging.WARNING):
        c = P.generate(cfg, "!!!???", models=models, video=False)
        d = P.generate(cfg, "\U0001F600\U0001F483", models=models, video=False)
    assert len({a["dir"], b["dir"], c["dir"], d["dir"]}) == 4
    assert "no known tokens" in caplog.text  # case 11: the emoji prompt is flagged
    before = _tree(Path(a["dir"]))
    with pytest.raises(ResultExistsError, match="--overwrite"):
        P.generate(cfg, stem + "white shoes", models=models, video=False)
    assert _tree(Path(a["dir"])) == before
    again = P.generate(cfg, stem + "white shoes", models=models, video=False, overwrite=True)
    assert again["dir"] == a["dir"]
    assert load_tensors(Path(a["dir"]) / "avatar.safetensors")[1]["prompt"] == stem + "white shoes"


def test_edit_export_animate_never_write_into_inputs_or_other_results(run, tmp_path):
    """Issue cases 3 and 4."""
    cfg, _, models, _ = run
    src = Path(P.generate(cfg, "a man in a blue shirt", seed=5, models=models, video=False)["dir"])
    other = Path(P.generate(cfg, "a woman in a green dress", seed=5, models=models, video=False)["dir"])
    src_files, other_files = _tree(src), _tree(other)
    with pytest.raises(ResultExistsError):  # onto another avatar's folder
        P.edit(cfg, src, "upper_clothes", "a red shirt", out_dir=other, models=models, video=False)
    with pytest.raises(InputError, match="input"):  # onto its own source, even when asked to overwrite
        P.edit(cfg, src, "upper_clothes", "a red shirt", out_dir=src, models=models, video=False, overwrite=True)
    with pytest.raises(InputError, match="input"):
        P.export(cfg, src, src, overwrite=True)
    with pytest.raises(InputError, match="input"):
        P.export(cfg, src, src / "export")
    with pytest.raises(InputError, match="dance"):  # an unknown motion, before anything is written
        P.export(cfg, src, tmp_path / "exp", motion="dance")
    assert not (tmp_path / "exp").exists()
    clip = P.animate(cfg, src, models=models)  # the default goes beside the avatar, not into it
    assert Path(clip["video"]).parent != src and Path(clip["video"]).is_file()
    assert _tree(src) == src_files and _tree(other) == other_files
    # --overwrite clears the old result first: a posed export then a plain one leaves no stale frames.
    P.export(cfg, src, tmp_path / "exp", motion="walk")
    assert list((tmp_path / "exp").glob("walk_*.ply"))
    with pytest.raises(ResultExistsError):
        P.export(cfg, src, tmp_path / "exp")
    P.export(cfg, src, tmp_path / "exp", overwrite=True)
    assert not list((tmp_path / "exp").glob("walk_*.ply")) and (tmp_path / "exp" / "canonical.ply").is_file()
    assert tera_main(["export", str(src), "--out", str(tmp_path / "cli"), "--motion", "dance",
                      f"run_dir={cfg.run_dir}", *TOY]) == 2
    assert not (tmp_path / "cli").exists()


def _stage2_cfg(run, tmp_path, name: str, *extra: str):
    cfg, overrides, _, _ = run
    return load_config(None, overrides + [f"run_dir={tmp_path / name}",
                                          f"distill.train.output_dir={P.run_paths(cfg).distill}",
                                          "diffusion.train.log_every=1", *extra])


@pytest.mark.slow
def test_restart_starts_clean_and_resume_compares_every_setting(run, tmp_path):
    """Issue cases 5 and 6 (stage 2)."""
    P.train(_stage2_cfg(run, tmp_path, "r", "diffusion.train.max_steps=3"), progress=False)
    diffusion = tmp_path / "r" / "diffusion"
    for change in ("diffusion.prediction=eps", "diffusion.text_dropout=0.5", "seed=1"):
        with pytest.raises(ConfigError, match=change.split("=")[0].replace(".", r"\.")) as err:
            P.train(_stage2_cfg(run, tmp_path, "r", change, "diffusion.train.max_steps=4"), progress=False)
        assert "--restart" in err.value.hint and "diffusion.train.allow_config_change=true" in err.value.hint
    # The override the hint names is accepted by the CLI's config and resumes on purpose.
    allowed = _stage2_cfg(run, tmp_path, "r", "seed=1", "diffusion.train.max_steps=4",
                          "diffusion.train.allow_config_change=true")
    assert P.train(allowed, progress=False)["steps"] == 4
    # --restart: a new run of 2 steps; the old run (steps up to 4) is kept aside, never resumed from.
    P.train(_stage2_cfg(run, tmp_path, "r", "diffusion.train.max_steps=2"), progress=False, resume=None)
    assert [p.name for p in list_checkpoints(diffusion)] == ["step_00000002"]
    old = [p for p in (tmp_path / "r").iterdir() if p.name.startswith("diffusion.old-")]
    assert len(old) == 1 and list_checkpoints(old[0])[-1].name == "step_00000004"
    assert P.train(_stage2_cfg(run, tmp_path, "r", "diffusion.train.max_steps=3"), progress=False)["steps"] == 3
    steps = [json.loads(line)["step"] for line in (diffusion / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_two_runs_of_one_config_give_bit_identical_checkpoints(run, tmp_path):
    """Issue case 7 for TeRA: the model is built under the run's seed, whatever ran before in the process."""
    files = []
    for name in ("a", "b"):
        torch.rand(7)  # unrelated draws from the global RNG must not change the weights
        P.train(_stage2_cfg(run, tmp_path, name, "diffusion.train.max_steps=2"), progress=False)
        ck = list_checkpoints(tmp_path / name / "diffusion")[-1]
        files.append({f: (ck / f).read_bytes() for f in ("model.safetensors", "ema.safetensors", "optimizer.pt")
                      if (ck / f).is_file()})
    assert files[0] == files[1] and {"model.safetensors", "optimizer.pt"} <= files[0].keys()  # byte for byte


def test_a_live_run_holds_its_folder(run, tmp_path):
    """Issue case 8: a second training into a folder in use is refused with one line; nothing is written."""
    cfg = _stage2_cfg(run, tmp_path, "busy")
    diffusion = tmp_path / "busy" / "diffusion"
    diffusion.mkdir(parents=True)
    # Another live process (this test's parent) owns the folder.
    (diffusion / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                   "time": time.time(), "argv": ["tera", "train"]}))
    with pytest.raises(RunLockedError, match="in use by another run"):
        P.train(cfg, progress=False)
    assert sorted(p.name for p in diffusion.iterdir()) == [LOCK_FILE]


def test_fit_teacher_refuses_features_fitted_under_other_settings(run, tmp_path):
    """Issue case 6 (teacher): changed settings refit (--restart) or are refused, never mixed."""
    cfg, overrides, _, root = run
    teacher = P.run_paths(cfg).teacher
    before = _tree(teacher)
    changed = load_config(None, overrides + ["teacher.steps=3"])
    with pytest.raises(ConfigError, match=r"teacher\.steps: checkpoint=2, now=3") as err:
        P.fit_teacher(changed, progress=False)
    assert "fit-teacher --restart" in err.value.hint and _tree(teacher) == before
    assert P.fit_teacher(cfg, progress=False)["fitted"] == 0  # same settings: resumes, nothing to do
    again = P.fit_teacher(changed, progress=False, restart=True)
    assert again["fitted"] == again["avatars"] == 2
    assert any(p.name.startswith("teacher.old-") for p in teacher.parent.iterdir())
