"""Nothing a RodinHD user made is lost or silently replaced: sample/render folders, odd portraits and flags,
reproducible training, one run per folder, --restart and the resume hint."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from avatar_core.errors import ConfigError, InputError
from avatar_core.results import ResultExistsError
from avatar_core.train import RunLockedError, list_checkpoints
from avatar_core.train.lock import LOCK_FILE
from rodinhd import pipeline
from rodinhd.cli import main as cli_main
from rodinhd.config import load_rodinhd_config

# The micro scale and the ground-truth dataset writer of the end-to-end test, loaded from its file.
_spec = importlib.util.spec_from_file_location("rodinhd_e2e", Path(__file__).with_name("test_pipeline.py"))
_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_e2e)
MICRO = _e2e.MICRO


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, triplane_dataset):
    out = tmp_path_factory.mktemp("rodinhd_safety")
    triplane_dataset(out / "data", _e2e.NUM, _e2e.RES, _e2e.VIEWS)
    cfg = load_rodinhd_config("tiny", MICRO)
    pipeline.fit_shared_stage(cfg, out, progress=False)
    pipeline.fit_stage(cfg, out, progress=False)
    pipeline.train_base(cfg, out, progress=False)
    pipeline.train_upsample(cfg, out, progress=False)
    portrait = out / "data" / "avatars" / "000003" / "portrait.png"
    result = pipeline.sample(cfg, out, portrait, name="held", frames=0)
    return cfg, out, portrait, result


def test_sample_never_replaces_a_sample_unasked_and_overwrite_leaves_no_stale_views(run):
    cfg, out, portrait, result = run
    dest = Path(result["dest"])
    before = _tree(dest)
    with pytest.raises(ResultExistsError, match="--overwrite"):
        pipeline.sample(cfg, out, portrait, name="held", frames=0)
    assert _tree(dest) == before
    assert len(list((dest / "views").glob("*.png"))) == 3
    pipeline.sample(cfg, out, portrait, name="held", num_views=1, frames=0, overwrite=True)
    assert sorted(p.name for p in (dest / "views").iterdir()) == ["000.png"]  # not 000 new + 001..002 stale
    # Default names differ per settings; the portrait's folder and the run's model folders are read-only.
    other = load_rodinhd_config("tiny", [*MICRO, "sample.seed=5"])
    a = pipeline.sample(cfg, out, portrait, num_views=1, frames=0)
    b = pipeline.sample(other, out, portrait, num_views=1, frames=0)
    assert a["dest"] != b["dest"]
    for bad in (portrait.parent, out / "base", out):
        with pytest.raises(InputError, match="input"):
            pipeline.sample(cfg, out, portrait, dest=bad, num_views=1, frames=0, overwrite=True)


def test_render_writes_beside_its_input_never_into_it(run, tmp_path):
    cfg, out, _, result = run
    tri = Path(result["triplane"])
    src = _tree(tri.parent)
    with pytest.raises(InputError, match="input"):
        pipeline.render_file(cfg, out, tri, dest=tri.parent, overwrite=True)
    r = pipeline.render_file(cfg, out, tri)
    assert Path(r["dest"]).parent == tri.parent.parent and _tree(tri.parent) == src
    with pytest.raises(ResultExistsError):
        pipeline.render_file(cfg, out, tri)


def test_odd_portraits_and_contradicting_flags_are_refused(run, tmp_path, capsys):
    cfg, out, _, _ = run
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (32, 32), (200, 100, 50, 0)).save(clear)
    with pytest.raises(InputError, match="fully transparent"):
        pipeline.sample(cfg, out, clear, dest=tmp_path / "s")
    assert not (tmp_path / "s").exists()
    portrait = out / "data" / "avatars" / "000000" / "portrait.png"
    code = cli_main(["sample", "--out", str(out), "--portrait", str(portrait), "--unconditional",
                     "--dest", str(tmp_path / "c"), *MICRO])
    err = capsys.readouterr().err
    assert code == 2 and "contradict" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def _copy_run(out: Path, to: Path) -> Path:
    shutil.copytree(out, to, ignore=shutil.ignore_patterns("base", "upsample", "samples", "*_render"))
    return to


@pytest.mark.slow
def test_two_trainings_of_one_config_give_bit_identical_checkpoints(run, tmp_path):
    """build_base is seeded: two base trainings of one config write the same weights, whatever ran before."""
    cfg, out, _, _ = run
    models = []
    for name in ("a", "b"):
        torch.rand(11)  # unrelated draws from the global RNG in the same process
        run_dir = _copy_run(out, tmp_path / name)
        pipeline.train_base(cfg, run_dir, progress=False)
        ck = list_checkpoints(run_dir / "base")[-1]
        models.append({f: (ck / f).read_bytes() for f in ("model.safetensors", "ema.safetensors")})
    assert models[0] == models[1]


def test_restart_live_lock_and_resume_hint(run, tmp_path):
    cfg, out, _, _ = run
    run_dir = _copy_run(out, tmp_path / "r")
    pipeline.train_base(cfg, run_dir, progress=False)
    changed = load_rodinhd_config("tiny", [*MICRO, "base.train.lr=0.5", "base.train.max_steps=3"])
    with pytest.raises(ConfigError, match=r"base\.train\.lr") as err:
        pipeline.train_base(changed, run_dir, progress=False)
    assert "--restart" in err.value.hint and "base.train.allow_config_change=true" in err.value.hint
    allowed = load_rodinhd_config("tiny", [*MICRO, "base.train.lr=0.5", "base.train.max_steps=3",
                                          "base.train.allow_config_change=true"])
    pipeline.train_base(allowed, run_dir, progress=False)
    assert list_checkpoints(run_dir / "base")[-1].name == "step_00000003"
    pipeline.train_base(cfg, run_dir, resume=False, progress=False)  # --restart: the old run is moved aside
    assert [p.name for p in list_checkpoints(run_dir / "base")] == ["step_00000001", "step_00000002"]
    old = [p for p in run_dir.iterdir() if p.name.startswith("base.old-")]
    assert len(old) == 1 and list_checkpoints(old[0])[-1].name == "step_00000003"
    # A live run holds the folder: the second one is refused before it writes anything.
    (run_dir / "base" / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                          "time": time.time(), "argv": ["rodinhd", "train-base"]}))
    before = _tree(run_dir / "base")
    with pytest.raises(RunLockedError, match="in use by another run"):
        pipeline.train_base(cfg, run_dir, progress=False)
    assert _tree(run_dir / "base") == before
