"""Body shape from text in generation: the prompt's shape (the run's shape head) is the body the generated avatar is
decoded on, it is stored in the avatar file and settings.json, and animate / export / edit reuse it; a file
without a stored shape still loads, on the template body, with a logged note."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from avatar_core.io import load_ply, load_tensors, save_tensors
from tera import generate as G
from tera import pipeline as P
from tera.avatars import decode, load_avatar, stored_shape
from tera.config import load_config
from tera.recolour import recolour
from tera.shape_text import ShapeHead, fit_shape_head, gaussian_height, shape_table, shape_words

TOY = ["threads=1", "data.num=2", "data.views=3", "data.res=32", "data.image_size=32", "data.uv_res=64",
       "data.eval_views=[1]", "body.num_points=800", "teacher.resolution=16", "teacher.feature_levels=[]", "teacher.steps=2",
       "distill.latent_resolution=8", "distill.upsample_factor=2", "distill.train.max_steps=2",
       "distill.train.progress_bar=false", "diffusion.train.max_steps=2", "diffusion.train.progress_bar=false",
       "diffusion.batch_size=2", "generate.sampler=ddim", "generate.steps=2", "generate.render_size=32",
       "generate.turntable_frames=2", "animate.frames=2", "animate.render_size=32"]

TALL_HEAVY = "a tall heavy-set man in a red shirt and blue trousers"
SHORT_SLIM = "a short slim man in a red shirt and blue trousers"
# Anny's phenotype: gender, age, muscle, weight, height, proportions (a man of about 40)
SHAPES = {TALL_HEAVY: [0.0, 0.8, 0.5, 0.9, 1.0, 0.5], SHORT_SLIM: [0.0, 0.8, 0.5, 0.1, 0.0, 0.5]}


def _radius(means: torch.Tensor) -> float:  # mean horizontal distance of the Gaussians from the body's vertical axis
    xz = means[:, [0, 2]]
    return float((xz - xz.mean(0)).norm(dim=-1).mean())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny pipeline, then its shape head fitted to known outputs for two prompts through the run's own text
    encoder (the head's fit is checked below, so the test does not depend on the tiny run's few captions)."""
    root = tmp_path_factory.mktemp("tera_shape")
    cfg = load_config(None, TOY + [f"run_dir={root / 'run'}", f"data.root={root / 'data'}"])
    P.run_all(cfg, progress=False)
    models = P.load_models(cfg)
    assert models.shape_head is not None  # stage 2 wrote diffusion/shape_head.safetensors and load_models read it
    prompts = list(SHAPES)
    cond = models.diffusion.encode_text(prompts)
    head = ShapeHead(models.diffusion.text_dim, len(models.avatar.body.shape_names), hidden=32)
    fit_shape_head(head, cond, torch.tensor([SHAPES[p] for p in prompts]), steps=400, lr=1e-2)
    models.shape_head = head.eval()
    gens = {p: G.generate(cfg, p, seed=5, models=models, video=False) for p in prompts}
    return cfg, models, gens, root


def test_generated_bodies_follow_the_asked_shape(run):
    cfg, models, gens, _ = run
    tall, short = gens[TALL_HEAVY], gens[SHORT_SLIM]
    for p, gen in gens.items():
        tensors, meta = load_tensors(gen["files"]["avatar"])
        torch.testing.assert_close(tensors["shape"], torch.tensor(SHAPES[p]), atol=0.05, rtol=0)
        assert meta["shape_from"] == "prompt" and meta["body_shape"] == tensors["shape"].tolist()
    h_tall, h_short = gaussian_height(tall["gaussians"].means[0]), gaussian_height(short["gaussians"].means[0])
    # Anny's height phenotype 1 vs 0 is ~0.3 m of standing height for this man (the mesh's own measure)
    mesh = {p: float(shape_words(models.avatar.body, torch.tensor(s))["height_m"]) for p, s in SHAPES.items()}
    assert mesh[TALL_HEAVY] - mesh[SHORT_SLIM] > 0.15
    assert h_tall - h_short > 0.5 * (mesh[TALL_HEAVY] - mesh[SHORT_SLIM])
    assert _radius(tall["gaussians"].means[0]) > 1.1 * _radius(short["gaussians"].means[0])
    # the same latent on the template body: the shape, not the sampled appearance, moved the body
    latent, meta = load_avatar(tall["files"]["avatar"], models)
    _, on_template = decode(models, latent)
    assert h_tall > gaussian_height(on_template.means[0]) + 0.05
    # the written PLY is the reshaped avatar
    ply = load_ply(tall["files"]["ply"])
    assert abs(gaussian_height(torch.as_tensor(ply.means)) - h_tall) < 1e-4


def test_the_stored_shape_round_trips_and_animate_export_edit_reuse_it(run, tmp_path):
    cfg, models, gens, _ = run
    gen = gens[TALL_HEAVY]
    latent, meta = load_avatar(gen["files"]["avatar"], models)
    shape = stored_shape(meta)
    assert torch.equal(shape, load_tensors(gen["files"]["avatar"])[0]["shape"])
    settings = json.loads(open(gen["files"]["settings"]).read())
    assert settings["body_shape"] == shape.tolist()
    h = gaussian_height(gen["gaussians"].means[0])
    files = G.export(cfg, gen["files"]["avatar"], tmp_path / "export", motion="walk")
    exported = load_ply(files["ply"])
    assert abs(gaussian_height(torch.as_tensor(exported.means)) - h) < 1e-4
    posed = load_ply(tmp_path / "export" / "walk_000.ply")  # posed on the tall body, not the template
    _, on_template = decode(models, latent)
    assert gaussian_height(torch.as_tensor(posed.means)) > gaussian_height(on_template.means[0]) + 0.05
    ed = G.edit(cfg, gen["files"]["avatar"], "shoes", "black shoes", seed=2, models=models, video=False)
    torch.testing.assert_close(load_tensors(ed["files"]["avatar"])[0]["shape"], shape)
    anim = G.animate(cfg, gen["files"]["avatar"], out=tmp_path / "clip", models=models)
    assert anim["frames"] == cfg.animate.frames
    rec = recolour(cfg, gen["files"]["avatar"], "shoes", "red", out_dir=tmp_path / "recolour", models=models)
    assert abs(gaussian_height(torch.as_tensor(load_ply(rec["files"]["ply"]).means)) - h) < 1e-4  # same tall body
    assert json.loads(open(rec["files"]["settings"]).read())["body_shape"] == shape.tolist()


def test_an_avatar_file_without_a_shape_loads_on_the_template(run, tmp_path, caplog):
    cfg, models, gens, _ = run
    tensors, meta = load_tensors(gens[TALL_HEAVY]["files"]["avatar"])
    old = {k: v for k, v in meta.items() if k not in ("body_shape", "shape_from")}
    (tmp_path / "old").mkdir()
    path = save_tensors(tmp_path / "old" / "avatar.safetensors", {"latent": tensors["latent"]}, old)
    with caplog.at_level(logging.INFO, logger="tera.avatars"):
        latent, got = load_avatar(path, models)
    assert stored_shape(got) is None and "template body" in caplog.text
    _, g = decode(models, latent, stored_shape(got))
    torch.testing.assert_close(g.means[0] - g.offsets[0], models.avatar.template_points)
    files = G.export(cfg, path, tmp_path / "export")
    assert abs(gaussian_height(torch.as_tensor(load_ply(files["ply"]).means)) - gaussian_height(g.means[0])) < 1e-4


def test_shape_table_measures_the_generated_avatars(run):
    cfg, models, gens, _ = run

    def make(prompt):
        return stored_shape(load_avatar(gens[prompt]["files"]["avatar"], models)[1]), gens[prompt]["gaussians"].means[0]

    table = shape_table(models.shape_head, models.diffusion.encode_text, models.avatar.body, list(SHAPES),
                        torch.tensor([0.0, 0.8, 0.5, 0.5, 0.5, 0.5]), generate=make)
    rows = {r["prompt"]: r for r in table["per_prompt"]}
    assert rows[TALL_HEAVY]["avatar"]["build"] == "heavy-set" and rows[SHORT_SLIM]["avatar"]["build"] == "slim"
    assert float(rows[TALL_HEAVY]["avatar"]["height_m"]) > float(rows[SHORT_SLIM]["avatar"]["height_m"]) + 0.1
    assert set(table) == {"per_prompt", "head", "mean_shape", "avatar"}
    assert table["avatar"]["build"] == 1.0 and table["mean_shape"]["build"] == 0.0


def test_the_viewer_animator_poses_an_avatar_on_its_stored_body(run, tmp_path):
    from types import SimpleNamespace

    from tera.view import AvatarAnimator

    cfg, models, gens, _ = run
    folder = SimpleNamespace(path=Path(gens[TALL_HEAVY]["files"]["avatar"]).parent)
    animator = AvatarAnimator(lambda: cfg)
    assert "walk" in animator.motions
    assert animator.can_animate(folder) and not animator.can_animate(SimpleNamespace(path=tmp_path))
    frames = animator(folder, "walk")
    assert len(frames) == cfg.animate.frames
    latent, _ = load_avatar(folder.path / "avatar.safetensors", models)
    _, on_template = decode(models, latent)
    for f in frames:  # every frame on the tall stored body, not the template
        assert gaussian_height(torch.as_tensor(f.centers)) > gaussian_height(on_template.means[0]) + 0.05
