"""The TeRA pipeline end to end at a toy scale: dataset -> fit-teacher -> distill -> train -> generate -> edit,
then bad inputs (clear errors, nothing lost) and the configs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from avatar_core.errors import ConfigError, InputError, MissingFileError
from avatar_core.io import load_ply, load_tensors, save_tensors
from tera import evaluate as E
from tera import pipeline as P
from tera.avatars import stored_shape
from tera.config import CONFIG_DIR, load_config

TOY = ["threads=1", "data.num=2", "data.views=3", "data.res=32", "data.image_size=32", "data.uv_res=64",
       "data.eval_views=[1]", "body.num_points=800", "teacher.resolution=16", "teacher.feature_levels=[]", "teacher.steps=2",
       "distill.latent_resolution=8", "distill.upsample_factor=2", "distill.train.max_steps=2",
       "distill.train.progress_bar=false", "diffusion.train.max_steps=3", "diffusion.train.progress_bar=false",
       "diffusion.batch_size=2", "generate.sampler=ddim", "generate.steps=4", "generate.render_size=32",
       "generate.turntable_frames=2", "animate.frames=2", "animate.render_size=32"]


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tera")
    cfg = load_config(None, TOY + [f"run_dir={root / 'run'}", f"data.root={root / 'data'}"])
    stages = P.run_all(cfg, progress=False)
    models = P.load_models(cfg)
    gen = P.generate(cfg, "a woman in a red dress", seed=3, models=models)
    return cfg, models, gen, stages


def test_end_to_end_outputs(run):
    cfg, models, gen, stages = run
    assert stages["distill"]["steps"] == 2 and stages["train"]["steps"] == 3
    files = gen["files"]
    for key in ("avatar", "ply", "maps", "maps_png", "preview", "turntable", "settings"):
        assert Path(files[key]).is_file(), key
    # The PLY holds the avatar's Gaussians: what decoding the stored latent gives, in the viewer layout.
    latent, meta = P.load_avatar(files["avatar"], models)
    _, g = P.decode(models, latent, stored_shape(meta))  # on the body of the prompt's shape, stored in the file
    ply = load_ply(files["ply"])
    assert ply.means.shape == (cfg.body.num_points, 3)
    torch.testing.assert_close(torch.as_tensor(ply.means).float(), g.means[0].float(), atol=1e-5, rtol=0)
    assert meta["prompt"] == "a woman in a red dress" and meta["body"] == cfg.body.name
    # A seed fixes the sample: generating again gives the same latent bit for bit.
    again = P.sample_latents(models, ["a woman in a red dress"], 3, **P.sampling(cfg))[0].cpu()
    torch.testing.assert_close(again, latent, atol=0, rtol=0)


def test_tiny_run_records_its_standins_and_streams_its_latents(run):
    """Each training stage writes the stand-ins the tiny config chose; stage 1's latents are one file per avatar."""
    cfg, *_ = run
    paths = P.run_paths(cfg)
    for stage in (paths.teacher, paths.distill, paths.diffusion):
        names = [s["name"] for s in json.loads((stage / "standins.json").read_text())["standins"]]
        assert names and set(names) <= {"anny_body", "minilm_text", "random_feature_perceptual", "fitted_teacher"}
    index = json.loads((paths.distill / "latents.json").read_text())
    assert len(index["ids"]) == cfg.data.num and all((Path(index["folder"]) / f"{a}.safetensors").is_file()
                                                     for a in index["ids"])
    assert not (paths.distill / "latents.safetensors").exists()
    settings = json.loads(Path(run[2]["files"]["settings"]).read_text())  # a generated avatar names them too
    assert settings["standins"]["diffusion"] == ["minilm_text"]


def test_edit_keeps_outside_and_source(run, tmp_path):
    cfg, models, gen, _ = run
    before = _sha(gen["files"]["avatar"])
    res = P.edit(cfg, gen["dir"], "upper_clothes", "a man in a green shirt", out_dir=tmp_path / "e", models=models)
    cells = res["region_cells"]
    assert 0 < int(cells.sum()) < cells.numel()
    new, src = res["latent"], res["source_latent"]
    assert torch.equal(new[:, ~cells], src[:, ~cells])  # outside the region: exactly the source
    assert not torch.equal(new[:, cells], src[:, cells])  # inside: regenerated
    assert _sha(gen["files"]["avatar"]) == before  # the source avatar is untouched
    stored, _ = load_tensors(tmp_path / "e" / "avatar.safetensors")
    torch.testing.assert_close(stored["latent"], new, atol=0, rtol=0)
    clip = P.animate(cfg, tmp_path / "e", models=models)
    assert Path(clip["video"]).is_file() and clip["frames"] == 2


def test_bad_inputs_fail_clearly_and_lose_nothing(run, tmp_path):
    cfg, models, gen, _ = run
    with pytest.raises(InputError, match="empty"):
        P.generate(cfg, "   ", models=models)
    with pytest.raises(InputError, match="upper_clothes"):  # the valid regions are listed
        P.edit(cfg, gen["dir"], "sleevez", "a red shirt", out_dir=tmp_path / "x", models=models)
    assert not (tmp_path / "x").exists()
    tensors, meta = load_tensors(gen["files"]["avatar"])
    save_tensors(tmp_path / "other_body.safetensors", tensors, {**meta, "body": "smplx"})
    with pytest.raises(InputError, match="body model"):
        P.edit(cfg, tmp_path / "other_body.safetensors", "upper_clothes", "a red shirt", models=models)
    lat = torch.nn.functional.interpolate(tensors["latent"][None], scale_factor=2)[0]
    save_tensors(tmp_path / "other_res.safetensors", {"latent": lat}, {**meta, "map_resolution": 32})
    with pytest.raises(InputError, match="UV resolution"):
        P.animate(cfg, tmp_path / "other_res.safetensors", models=models)
    no_teacher = load_config(None, TOY + [f"run_dir={tmp_path / 'r2'}", f"data.root={cfg.data.root}"])
    with pytest.raises(MissingFileError, match="fit-teacher"):
        P.distill(no_teacher, progress=False)
    from tera.cli import main

    assert main(["generate", "", "--config", str(CONFIG_DIR / "tiny.yaml"), f"run_dir={cfg.run_dir}"]) == 2


def test_dataset_step_follows_the_config(tmp_path):
    """A config naming the user's own data never writes a synthetic dataset (`make train-tera CONFIG=paper`)."""
    own = load_config("tiny", ["data.synthetic=false", f"data.root={tmp_path / 'mine'}"])
    with pytest.raises(MissingFileError, match="your own data"):
        P.load_dataset(own, create=True)
    assert not (tmp_path / "mine").exists()
    assert load_config("paper").data.synthetic is False and load_config("tiny").data.synthetic is True


def test_configs():
    """The networks configs/paper.yaml builds, built the way the stages build them (on the meta device: no memory),
    run on the paper's latent: a 32 x 256^2 UV latent (IDOL's 32 channels) -> 13 attribute maps at 1024^2 through
    the distillation decoder, and the 182M-parameter text-conditioned UNet over it with CLIP ViT-L/14's 77 x 768
    text states (the paper's encoder; its width is not in the config, the encoder folder gives it at run time)."""
    from tera.latent_diffusion import build_unet
    from tera.stage1 import _build_decoder, _decoder_settings
    from tera.stage2 import unet_config

    paper = load_config("paper")
    C, r = paper.teacher.channels, paper.distill.latent_resolution
    with torch.device("meta"):
        maps = _build_decoder(_decoder_settings(paper, r))(torch.empty(1, C, r, r))
        unet = build_unet(unet_config(paper, C, r, 768))
        eps = unet(torch.empty(1, C, r, r), torch.tensor([999]), encoder_hidden_states=torch.empty(1, 77, 768)).sample
    assert tuple(maps.shape) == (1, 13, 1024, 1024) and tuple(eps.shape) == (1, C, r, r)
    assert 150e6 < sum(p.numel() for p in unet.parameters()) < 220e6
    assert paper.teacher.resolution % r == 0  # distill reads the teacher's features pooled to the latent
    assert load_config("paper").diffusion.unet == load_config(CONFIG_DIR / "paper.yaml").diffusion.unet  # by name
    with pytest.raises(ConfigError, match="latent_resolution"):
        load_config(None, ["distill.latent_resolutoin=8"])


def test_evaluation_prompts_are_read_by_the_kernel_scorer(run):
    """``tera evaluate`` scores with the kernel's garment scorer (avatar_core.data.garment_score; the old prompt
    scorer is gone): every configured prompt asks for garment attributes it reads, the colours by palette name,
    and the dataset's own textures read as their captions (tests/test_scaling.py checks that against chance)."""
    from avatar_core.data.garment_score import garment_scorer, parse_garments

    cfg, *_ = run
    assert not hasattr(E, "parse_prompt") and not hasattr(E, "score_colour_map")
    assert parse_garments("a man in a green striped shirt and black trousers").items() >= {
        "top_type": "shirt", "top_colour": "green", "bottom_type": "trousers", "bottom_colour": "black"}.items()
    assert parse_garments("a woman in a light blue dress")["top_colour"] == "light blue"
    e = cfg.evaluate
    for prompt in [*e.prompts, *e.shape_prompts, e.edit_prompt]:
        assert {"top_type", "top_colour"} <= set(parse_garments(prompt)), prompt
    scorer = garment_scorer(cfg.body.name, cfg.body.model_dir, cfg.data.uv_res)
    ds = P.load_dataset(cfg)
    for i in range(len(ds)):
        asked = parse_garments(ds.captions(i)[0])
        got = scorer.score(ds.texture(i).permute(2, 0, 1), asked)
        assert set(got) == set(asked) and sum(got.values()) >= len(asked) - 1


def test_train_resume_is_exact(run, tmp_path):
    """Stopping stage 2 after 2 steps and resuming to 3 gives the weights of 3 uninterrupted steps."""
    cfg, *_ = run
    distilled = f"distill.train.output_dir={P.run_paths(cfg).distill}"

    def cfg_for(name: str, steps: int):
        return load_config(None, TOY + [f"run_dir={tmp_path / name}", f"data.root={cfg.data.root}", distilled,
                                        f"diffusion.train.max_steps={steps}"])

    P.train(cfg_for("straight", 3), progress=False, resume=None)
    P.train(cfg_for("resumed", 2), progress=False, resume=None)
    P.train(cfg_for("resumed", 3), progress=False, resume="auto")
    a, _ = load_tensors(tmp_path / "straight" / "diffusion" / "model" / "model.safetensors")
    b, _ = load_tensors(tmp_path / "resumed" / "diffusion" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
