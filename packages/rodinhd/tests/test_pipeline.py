"""The RodinHD pipeline end to end on a handful of avatars (fit -> train -> sample -> render), and its bad inputs.

The ground truth is built here: every avatar is a random triplane rendered by a random decoder, written in the
kernel's dataset format, so the pipeline reads it through the same adapter as the synthetic dataset.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avatar_core.cameras import orbit_cameras
from avatar_core.errors import ConfigError, CorruptFileError, InputError, MissingFileError
from avatar_core.io import load_image, load_tensors
from rodinhd import pipeline
from rodinhd.cli import main as cli_main
from rodinhd.config import load_rodinhd_config
from rodinhd.data import AvatarViews
from rodinhd.demo import SMALLEST_OVERRIDES

RES, VIEWS, NUM = 32, 6, 4

#: A micro scale of tiny.yaml: the demo's smallest settings (4-channel 16^2 triplanes, 8^2 base model, a few steps
#: per stage) on this file's 4 avatars, with a checkpoint every step.
MICRO = [
    *SMALLEST_OVERRIDES, "data.num_avatars=4", "data.held_out=1", "stage1.num_avatars=2", "base.train.batch_size=3",
    "base.train.checkpoint_every=1", "base.train.progress_bar=false", "base.train.log_every=1",
    "upsample.train.progress_bar=false", "upsample.train.log_every=1",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, triplane_dataset):
    """One micro run through every stage; later tests reuse its folder."""
    out = tmp_path_factory.mktemp("rodinhd_run")
    triplane_dataset(out / "data", NUM, RES, VIEWS)
    cfg = load_rodinhd_config("tiny", MICRO)
    pipeline.fit_shared_stage(cfg, out, progress=False)
    pipeline.fit_stage(cfg, out, progress=False)
    pipeline.train_base(cfg, out, progress=False)
    pipeline.train_upsample(cfg, out, progress=False)
    result = pipeline.sample(cfg, out, out / "data" / "avatars" / "000003" / "portrait.png", name="held")
    return cfg, out, result


def test_dataset_adapter_round_trip(run):
    """get_views returns the written RGBA pixels (to 8-bit precision) and the written cameras."""
    _, out, _ = run
    data = AvatarViews(out / "data", held_out=1)
    assert data.train_ids == ["000000", "000001", "000002"] and data.held_out_ids == ["000003"]
    images, cams = data.get_views("000001")
    assert images.shape == (VIEWS, RES, RES, 4) and len(cams) == VIEWS
    png = np.asarray(Image.open(out / "data" / "avatars" / "000001" / "views" / "002.png"), dtype=np.float32) / 255
    assert torch.allclose(images[2], torch.from_numpy(png), atol=1e-6)
    expected = orbit_cameras(VIEWS, 2.8, 0.0, 40.0, RES, RES)
    assert torch.allclose(cams.viewmats, expected.viewmats, atol=1e-5)


def test_end_to_end_outputs_and_render_round_trip(run, tmp_path):
    """Every stage leaves its files; rendering the sampled triplane file reproduces the sample's own views."""
    cfg, out, result = run
    for p in ("decoder.safetensors", "portrait_vae.safetensors", "triplanes/000002.safetensors"):
        assert (out / p).is_file(), p
    assert pipeline.latest_checkpoint(out / "base") is not None
    assert pipeline.latest_checkpoint(out / "upsample") is not None
    settings = json.loads(Path(result["settings"]).read_text())
    assert settings["triplane_shape"] == [3, 4, 16, 16] and settings["guidance_scale"] == 1.3
    assert Path(result["turntable"]).is_file() and Path(result["grid"]).is_file()
    rendered = pipeline.render_file(cfg, out, result["triplane"], dest=tmp_path / "r")
    for v in range(3):
        a = load_image(Path(result["views"]) / f"{v:03d}.png")
        b = load_image(Path(rendered["views"]) / f"{v:03d}.png")
        assert torch.equal(a, b)
    # Unconditional generation uses the null condition and writes the same outputs.
    unc = pipeline.sample(cfg, out, None, dest=tmp_path / "u", num_views=1, frames=0)
    assert Path(unc["triplane"]).is_file() and json.loads(Path(unc["settings"]).read_text())["unconditional"]


def test_cli_render_rejects_wrong_shape_triplane(run, tmp_path, capsys):
    """A triplane file of another shape is refused with the expected shape named; exit code 2, no traceback."""
    _, out, _ = run
    from avatar_core.io import save_tensors

    bad = save_tensors(tmp_path / "bad.safetensors", {"planes": torch.zeros(3, 4, 8, 8)})
    code = cli_main(["render", str(bad), "--out", str(out), *MICRO])
    err = capsys.readouterr().err
    assert code == 2 and "(3, 4, 16, 16)" in err and "(3, 4, 8, 8)" in err


def test_bad_portraits(run, tmp_path):
    """Not an image, no alpha (and no mask), not square without framing: clear errors before any model is loaded."""
    cfg, out, _ = run
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png at all")
    with pytest.raises(CorruptFileError, match="not a readable image"):
        pipeline.sample(cfg, out, junk)
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (32, 32), (200, 100, 50)).save(rgb)
    with pytest.raises(InputError, match="no alpha"):
        pipeline.sample(cfg, out, rgb)
    wide = tmp_path / "wide.png"
    Image.new("RGBA", (48, 32), (200, 100, 50, 255)).save(wide)
    with pytest.raises(InputError, match="square"):  # framing (the default) accepts it; as it is, it must be square
        pipeline.sample(cfg, out, wide, frame=False)
    assert not (out / "samples" / "tmp_wide").exists()


def test_missing_vae_directory(run, tmp_path):
    """A configured pretrained VAE folder that does not exist names the folder and what to put there."""
    _, out, _ = run
    cfg = load_rodinhd_config("tiny", [*MICRO, f"conditioning.vae_path={tmp_path / 'no_vae'}"])
    with pytest.raises(MissingFileError) as err:
        pipeline.get_encoder(cfg, out)
    assert "no_vae" in str(err.value)


def test_resume_with_changed_config_is_refused_and_keeps_checkpoints(run):
    """Resuming base training with another learning rate fails with the differing key; checkpoints stay intact."""
    _, out, _ = run
    before = {p: p.read_bytes() for p in sorted((out / "base" / "checkpoints").rglob("*")) if p.is_file()}
    metrics = (out / "base" / "metrics.jsonl").read_bytes()
    cfg = load_rodinhd_config("tiny", [*MICRO, "base.train.lr=0.5", "base.train.max_steps=3"])
    with pytest.raises(ConfigError, match="lr"):
        pipeline.train_base(cfg, out, progress=False)
    after = {p: p.read_bytes() for p in sorted((out / "base" / "checkpoints").rglob("*")) if p.is_file()}
    assert after == before and (out / "base" / "metrics.jsonl").read_bytes() == metrics


def test_tiny_run_records_its_standins(run):
    """The tiny config chooses the embedded VAE and the SSIM term explicitly; each stage writes them down."""
    cfg, out, result = run
    for stage, names in (("base", ["portrait_vae"]), ("upsample", ["portrait_vae", "ssim_perceptual"])):
        saved = json.loads((out / stage / "standins.json").read_text())
        assert [s["name"] for s in saved["standins"]] == names
    settings = json.loads(Path(result["settings"]).read_text())
    assert [s["name"] for s in settings["standins"]] == ["portrait_vae"]
    assert (out / "cache" / "portrait_features").is_dir() and (out / "cache" / "triplanes_low").is_dir()


@pytest.mark.slow
def test_streamed_base_training_resumes_bit_exactly(run, tmp_path):
    """Three base steps straight, or two then a resumed third, from the same cached records: identical weights."""
    _, out, _ = run

    def copy(name: str) -> Path:
        return Path(shutil.copytree(out, tmp_path / name, ignore=shutil.ignore_patterns("base", "upsample", "samples")))

    cfg = {n: load_rodinhd_config("tiny", MICRO + [f"base.train.max_steps={n}", "base.train.batch_size=2"])
           for n in (2, 3)}
    straight, split = copy("straight"), copy("split")
    pipeline.train_base(cfg[3], straight, resume=False, progress=False)
    pipeline.train_base(cfg[2], split, resume=False, progress=False)
    pipeline.train_base(cfg[3], split, resume=True, progress=False)
    a, _ = load_tensors(pipeline.latest_checkpoint(straight / "base") / "model.safetensors")
    b, _ = load_tensors(pipeline.latest_checkpoint(split / "base") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_config_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="stage2.iterations"):
        load_rodinhd_config("tiny", ["stage2.iteration=5"])


def test_evaluate_scores_held_out_and_training_avatars_apart(run, tmp_path):
    """Generation is scored on held-out avatars; training avatars form their own labelled row, never mixed in."""
    from rodinhd.evaluate import evaluate, format_eval

    cfg, out, _ = run
    cfg = load_rodinhd_config("tiny", [*MICRO, "evaluate.num_avatars=2", "evaluate.refit_views=2",
                                       "evaluate.refit_res=16", "evaluate.refit_iterations=2",
                                       "evaluate.refit_rays_per_step=64"])
    r = evaluate(cfg, out, progress=False)
    g = r["generation"]
    assert g["held_out"]["avatars"] == ["000003"] and g["training"]["avatars"] == ["000000", "000001"]
    held = [row for row in g["per_avatar"] if row["held_out"]]
    assert [row["avatar"] for row in held] == ["000003"] and g["held_out"]["psnr"] == held[0]["psnr"]
    table = format_eval(r)
    assert "held-out avatars" in table and "training avatars (seen in training)" in table


def test_ablate_triplane_prints_the_table6_grid(run, capsys):
    """`rodinhd ablate-triplane`: one fit per resolution x channels on a training avatar, printed as Table 6."""
    _, out, _ = run
    code = cli_main(["ablate-triplane", "--out", str(out), "--no-progress", *MICRO, "ablation.sweep_resolutions=[4,8]",
                     "ablation.sweep_channels=[2,4]", "ablation.sweep_iterations=3", "ablation.rays_per_step=64",
                     "ablation.num_samples=16", "ablation.eval_num_samples=16"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and printed[-3].split()[-2:] == ["2", "4"]
    assert [line.split()[0] for line in printed[-2:]] == ["4", "8"]
    results = json.loads((out / "ablation_triplane" / "results.json").read_text())
    assert [(r["resolution"], r["channels"]) for r in results] == [(4, 2), (4, 4), (8, 2), (8, 4)]
