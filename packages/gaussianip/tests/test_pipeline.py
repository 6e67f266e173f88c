"""The tiny pipeline end to end at its smallest size (prior training, three stages, outputs, animation, resume),
and the bad inputs that must fail with one line before anything is written."""

import json

import pytest
import torch

from avatar_core.errors import AvatarError, ConfigError, InputError
from avatar_core.io import load_ply, save_image
from gaussianip.cli import main
from gaussianip.config import load_gaussianip_config
from gaussianip.demo import SMALLEST


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gip")
    over = SMALLEST + [f"dataset.root={root / 'ds'}", f"prior.cache_dir={root / 'prior'}", f"run_dir={root / 'runs'}"]
    return root, over


@pytest.mark.slow
def test_end_to_end_smallest(setup, capsys):
    root, over = setup
    assert main(["generate", "--prompt", "a man in a blue shirt", "--out", str(root / "run"), *over]) == 0
    run = root / "run"
    for f in ("avatar.ply", "turntable.mp4", "settings.json", "stage1.safetensors", "stage2.safetensors",
              "gaussians.safetensors", "previews/stage2_refined.png", "previews/final_views.png", "refined_views/000.png"):
        assert (run / f).is_file(), f
    ply = load_ply(run / "avatar.ply")
    assert ply.means.shape[0] > 0 and torch.isfinite(ply.means).all()
    settings = json.loads((run / "settings.json").read_text())
    assert settings["prompt"] == "a man in a blue shirt" and settings["perceptual"]
    # Re-running without --overwrite refuses; --resume of a finished run redoes nothing.
    assert main(["generate", "--prompt", "a man in a blue shirt", "--out", str(run), *over]) == 2
    before = (run / "stage1.safetensors").stat().st_mtime_ns
    assert main(["generate", "--prompt", "a man in a blue shirt", "--out", str(run), "--resume", *over]) == 0
    assert (run / "stage1.safetensors").stat().st_mtime_ns == before
    # A killed run (no stage-3 file) continues from its last stage.
    (run / "gaussians.safetensors").unlink()
    assert main(["reconstruct", str(run), *over]) == 0
    assert (run / "gaussians.safetensors").is_file() and (run / "stage1.safetensors").stat().st_mtime_ns == before
    # Another config's run folder is refused.
    assert main(["reconstruct", str(run), *over, "stage1.guidance_scale=5.0"]) == 2
    assert "another config" in capsys.readouterr().err
    assert main(["animate", str(run), "--motion", "wave", *over]) == 0
    assert (run / "animation_wave.mp4").is_file()


def test_bad_inputs(setup, tmp_path, capsys):
    root, over = setup
    cfg = load_gaussianip_config("tiny", over)
    from gaussianip.system.pipeline import generate

    with pytest.raises(InputError, match="prompt is empty"):
        generate(cfg, "  ", out=tmp_path / "x")
    grey = tmp_path / "grey.png"
    save_image(grey, torch.rand(40, 40, 1))
    with pytest.raises(InputError, match="greyscale"):
        generate(cfg, "a man", face=grey, out=tmp_path / "x")
    small = tmp_path / "small.png"
    save_image(small, torch.rand(8, 8, 3))
    with pytest.raises(InputError, match="32x32"):
        generate(cfg, "a man", face=small, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written
    with pytest.raises(ConfigError, match="timestep schedule"):
        from gaussianip.timesteps import TimestepSchedule

        TimestepSchedule("cosine", 10)
    with pytest.raises(AvatarError, match="paper-scale|weights|configured"):
        from gaussianip.system.pipeline import load_prior

        load_prior(load_gaussianip_config("paper", over[:0]))
    assert main(["animate", str(tmp_path), "--motion", "walk"]) == 2
    assert "no finished GaussianIP result" in capsys.readouterr().err
