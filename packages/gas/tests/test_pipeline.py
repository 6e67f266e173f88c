"""The tiny SVD-layout pipeline: one sampling step of novel view and novel pose from random-weight parts built from
configs, the end-to-end demo at its smallest size, and the bad inputs (one-line errors, nothing written)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel

from avatar_core.cameras import orbit_cameras
from avatar_core.errors import AvatarError, InputError, MissingFileError, MissingWeightsError
from avatar_core.io import save_image
from gas.body_warp import BodyWarp
from gas.cli import main as cli_main
from gas.human_nerf import HumanNeRF, NeRFConfig
from gas.inference import motion_targets, orbit_targets, synthesize
from gas.reference import Reference, export_reference, load_reference

RES = 32


@pytest.fixture(scope="module")
def reference(body):
    shape = torch.full((body.shape_dim,), 0.5)
    cam = orbit_cameras(1, radius=2.8, fov_deg=40, width=RES, height=RES)
    return Reference(torch.rand(RES, RES, 4), cam, shape, torch.zeros(body.num_joints - 1, 3), torch.zeros(3),
                     torch.zeros(3), "random")


def _sample(cfg, steps=1, frames=3, tile=8):
    s = dict(cfg.sample)
    s.update(steps=steps, frames=frames, tile=tile)
    return type("S", (), s)


@pytest.mark.parametrize("task", ["view", "pose"])
def test_one_step_of_each_task_with_random_weight_svd_parts(body, reference, tiny_cfg, tiny_parts, task):
    nerf = HumanNeRF(BodyWarp(body, 8), NeRFConfig(num_samples=8, anchor_stride=8)).eval()
    targets = (orbit_targets(reference, nerf.warp, 3) if task == "view"
               else motion_targets(reference, body, "walk", 3))
    out = synthesize(nerf, tiny_parts, reference, targets, task, _sample(tiny_cfg), progress=False)
    assert out["frames"].shape == (3, RES, RES, 3) and out["nerf"].shape == (3, RES, RES, 3)
    assert torch.isfinite(out["frames"]).all() and float(out["frames"].min()) >= 0 and float(out["frames"].max()) <= 1
    assert out["normals"].shape == (3, RES, RES, 3)


def test_a_sequence_three_tiles_long_is_tiled_not_refused(body, reference, tiny_cfg, tiny_parts):
    nerf = HumanNeRF(BodyWarp(body, 8), NeRFConfig(num_samples=4, anchor_stride=8)).eval()
    targets = orbit_targets(reference, nerf.warp, 12)
    out = synthesize(nerf, tiny_parts, reference, targets, "view", _sample(tiny_cfg, frames=12, tile=5),
                     progress=False)
    assert out["frames"].shape[0] == 12
    assert float(out["scales"][0]) == 1.0 and float(out["scales"].max()) == 2.0


def test_orbit_is_a_full_circle_about_the_body(body, reference):
    warp = BodyWarp(body, 8)
    t = orbit_targets(reference, warp, 4)
    torch.testing.assert_close(t.cameras.viewmats[0], reference.camera.viewmats[0], atol=1e-5, rtol=0)
    c = t.cameras.centers
    torch.testing.assert_close(c[2, [0, 2]], -c[0, [0, 2]] + 2 * c[:, [0, 2]].mean(0), atol=1e-4, rtol=0)


def test_reference_bad_inputs(body, tmp_path, reference):
    img, params = export_reference(tmp_path / "p.png", reference.rgba, reference.camera, body, reference.shape,
                                   reference.pose, reference.transl)
    ok = load_reference(img, body)
    torch.testing.assert_close(ok.camera.Ks, reference.camera.Ks)
    rgb = tmp_path / "rgb.png"
    save_image(rgb, reference.rgba[..., :3])
    (tmp_path / "rgb.json").write_text(params.read_text())
    with pytest.raises(InputError, match="no alpha channel"):
        load_reference(rgb, body)
    mask = tmp_path / "mask.png"
    save_image(mask, reference.rgba[..., 3:].expand(-1, -1, 3))
    assert load_reference(rgb, body, mask=mask).rgba.shape == (RES, RES, 4)
    other = tmp_path / "other.json"
    other.write_text(params.read_text().replace('"anny"', '"smplx"'))
    with pytest.raises(InputError, match="smplx"):
        load_reference(img, body, params=other)
    with pytest.raises(MissingFileError):
        load_reference(tmp_path / "nothing.png", body)


def test_motion_file_of_the_wrong_layout(body, reference, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, poses=np.zeros((5, 7)))
    with pytest.raises(AvatarError):
        motion_targets(reference, body, str(bad), None)
    with pytest.raises(InputError, match="neither a built-in"):
        motion_targets(reference, body, "moonwalk", None)


def test_paper_config_without_weights_fails_clearly(tmp_path):
    from gas.pipeline import config
    from gas.video_training import build_parts

    cfg = config("paper", [f"run={tmp_path / 'run'}", f"video.pretrained={tmp_path / 'svd'}"])
    with pytest.raises(MissingWeightsError):
        build_parts(cfg)


def test_cli_turns_errors_into_one_line(tmp_path, capsys):
    rc = cli_main(["novel-view", "--image", str(tmp_path / "none.png"), "--out", str(tmp_path / "o"),
                   f"run={tmp_path / 'run'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_tiny_pipeline_end_to_end_at_its_smallest(tmp_path):
    from gas.demo import run

    summary = run(tmp_path / "demo", smallest=True)
    for key in ("novel_view", "novel_pose", "nerf_view", "comparison", "input", "params"):
        assert Path(summary[key]).is_file(), key
    view = tmp_path / "demo" / "novel_view"
    assert len(list((view / "frames").glob("*.png"))) == summary["frames"] > summary["tile"]
    assert len(list((view / "nerf").glob("*.png"))) == summary["frames"]
    assert (view / "settings.json").is_file()
    # A second run into the same folders without --overwrite is refused, the result kept.
    with pytest.raises(InputError):
        from gas import pipeline

        cfg = pipeline.config("tiny", [f"run={tmp_path / 'demo' / 'run'}"])
        pipeline.novel_view(cfg, summary["input"], str(view), frames=4)
    assert (view / "gas.mp4").is_file()


def test_a_kernel_multi_view_dataset_feeds_stage_one(body, tmp_path):
    from avatar_core.data.generate import generate_dataset
    from avatar_core.io import load_image
    from gas.data import clip_from_avatar

    root = generate_dataset(tmp_path / "ds", num=1, views=3, res=32, uv_res=64, progress=False, body_model=body)
    avatar = root / "avatars" / "000000"
    clip = clip_from_avatar(avatar, body)
    assert clip.kind == "view" and clip.num_frames == 3
    torch.testing.assert_close(clip.ref_rgba, load_image(avatar / "views" / "000.png"))
    torch.testing.assert_close(clip.rgba[2], load_image(avatar / "views" / "002.png"))


def test_an_svd_pipeline_folder_loads_through_the_kernel_and_samples(tmp_path, tiny_parts, tiny_cfg):
    """Paper-scale loading path (video.pretrained) on a tiny random-weight folder in SVD's diffusers layout."""
    from omegaconf import OmegaConf

    from gas.sampling import sample_latents
    from gas.svd_parts import clip_embedding, load_paper_parts, vae_mode
    from gas.video_unet import ConditioningConfig, task_labels

    folder = tmp_path / "svd"
    base = UNetSpatioTemporalConditionModel(**OmegaConf.to_container(tiny_cfg.video.unet))
    base.save_pretrained(folder / "unet")
    tiny_parts.vae.save_pretrained(folder / "vae")
    tiny_parts.image_encoder.save_pretrained(folder / "image_encoder")
    tiny_parts.scheduler.save_pretrained(folder / "scheduler")
    parts = load_paper_parts(str(folder), ConditioningConfig(**OmegaConf.to_container(tiny_cfg.video.conditioning)))
    for k, v in base.state_dict().items():
        assert torch.equal(parts.unet.state_dict()[k], v), k
    assert parts.scheduler.config.prediction_type == "v_prediction"
    ref = torch.rand(1, RES, RES, 3)
    lat = sample_latents(parts, vae_mode(parts, ref), clip_embedding(parts, ref), 3, torch.tensor([1.0, 2.0, 1.0]),
                         nerf_latents=torch.randn(1, 3, 4, 8, 8), normal_maps=torch.rand(1, 3, 3, RES, RES),
                         task=task_labels(["view"]), steps=1, tile=8, progress=False)
    assert lat.shape == (1, 3, 4, 8, 8) and torch.isfinite(lat).all()
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(MissingWeightsError):
        load_paper_parts(str(folder), ConditioningConfig())
