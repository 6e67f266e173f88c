"""The joint fitted teacher: resume equals an uninterrupted fit, zeros outside the UV charts, a frozen decoder in the
refit, the feature prior's value and gradient, the consistency measure, and mask-aware pooling to the latent."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from avatar_core.body import UVMapper, load_body_model
from avatar_core.cameras import orbit_cameras
from avatar_core.io import load_json, load_tensors, save_tensors
from tera.config import load_config
from tera.distill import features_to_latent
from tera.teacher import (
    CONSISTENCY_FILE,
    DECODER_FILE,
    FIT_STATE_FILE,
    TeacherFeatureStore,
    TeacherFitter,
    feature_mask,
    feature_regulariser,
    format_consistency,
    measure_consistency,
)
from tera.uv_gaussians import UVDecoder, UVGaussianAvatar, attributes_from_texture, sample_maps

R = 8  # feature resolution in these tests
C = 8  # feature channels


@pytest.fixture(scope="module")
def scene():
    """A small avatar and three avatars' RGBA views of differently part-coloured bodies (kernel renders)."""
    torch.manual_seed(0)
    body = load_body_model("anny")
    mapper = UVMapper(body, 16)
    avatar = UVGaussianAvatar(body, num_points=400, seed=0, uv_mapper=mapper)
    cams = orbit_cameras(3, radius=2.6, width=16, height=16)
    labels = mapper.part_label_map().clamp_min(0)
    views = {}
    for k in range(3):
        palette = torch.rand(8, 3, generator=torch.Generator().manual_seed(k))
        with torch.no_grad():
            rgb, alpha = avatar.render(avatar(attributes_from_texture(palette[labels])), cams)
        views[f"a{k}"] = (torch.cat([rgb[0], alpha[0]], -1), cams)
    return avatar, views


def _fitter(avatar, root, **kw):
    torch.manual_seed(0)  # the same starting decoder in every fitter
    decoder = UVDecoder(C, 4, 8, 8)
    return TeacherFitter(avatar, TeacherFeatureStore(root, C), feature_resolution=R, decoder=decoder, lr=2e-3,
                         feature_lr=5e-2, views_per_step=2, seed=3, **kw)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("random_background", [False, True])
def test_joint_fit_resumes_to_the_uninterrupted_result(scene, tmp_path, random_background):
    """Killed in its second epoch, a rerun continues from the saved first epoch and ends bit-for-bit where an
    uninterrupted run ends (random backgrounds included); the state file is gone once every avatar is written."""
    avatar, views = scene
    ids = list(views)
    kw = {"random_background": random_background}
    whole = _fitter(avatar, tmp_path / "whole", **kw)
    whole.fit_joint(ids, views.__getitem__, epochs=2, batch_avatars=2, refit_steps=2, progress=False)

    broken = _fitter(avatar, tmp_path / "resumed", **kw)
    calls = {"n": 0}
    real = broken.batch_loss

    def dies_in_epoch_two(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # 3 avatars in batches of 2: steps 1-2 are epoch 1
            raise _Interrupt
        return real(*a, **k)

    broken.batch_loss = dies_in_epoch_two
    with pytest.raises(_Interrupt):
        broken.fit_joint(ids, views.__getitem__, epochs=2, batch_avatars=2, refit_steps=2, progress=False)
    state = torch.load(tmp_path / "resumed" / FIT_STATE_FILE, weights_only=True)
    assert state["epoch"] == 1 and not TeacherFeatureStore(tmp_path / "resumed", C).ids()

    resumed = _fitter(avatar, tmp_path / "resumed", **kw)
    resumed.fit_joint(ids, views.__getitem__, epochs=2, batch_avatars=2, refit_steps=2, progress=False)
    a, b = TeacherFeatureStore(tmp_path / "whole", C), TeacherFeatureStore(tmp_path / "resumed", C)
    assert a.ids() == b.ids() == ids
    for i in ids:
        torch.testing.assert_close(b.load(i), a.load(i), atol=0, rtol=0)
    for key, value in load_tensors(tmp_path / "whole" / DECODER_FILE)[0].items():
        torch.testing.assert_close(load_tensors(tmp_path / "resumed" / DECODER_FILE)[0][key], value, atol=0, rtol=0)
    assert not (tmp_path / "resumed" / FIT_STATE_FILE).exists()
    assert resumed.fit_joint(ids, views.__getitem__, epochs=2, batch_avatars=2, refit_steps=2, progress=False) == {}


def test_per_view_backgrounds_composite_like_one_fixed_background(scene, tmp_path):
    """The random-background loss renders over black and puts each view's colour behind it; with every view's
    colour set to the fitter's fixed background it is the fixed-background loss (premultiplied compositing), and
    with other colours behind the views it differs (the colours reach both render and target)."""
    avatar, views = scene
    colour = (0.2, 0.5, 0.7)
    fitter = _fitter(avatar, tmp_path, background=colour)
    images = torch.stack([views[a][0][:2] for a in ("a0", "a1")])
    cams = [views[a][1][[0, 1]] for a in ("a0", "a1")]
    feats = 0.3 * torch.randn(2, C, R, R, generator=torch.Generator().manual_seed(1))
    fixed, per_fixed = fitter.batch_loss(feats, images, cams, [None, None])
    same, per_same = fitter.batch_loss(feats, images, cams, [None, None], torch.tensor(colour).expand(2, 2, 3))
    torch.testing.assert_close(same, fixed, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(per_same, per_fixed, atol=1e-6, rtol=1e-5)
    other, _ = fitter.batch_loss(feats, images, cams, [None, None], torch.rand(2, 2, 3))
    assert abs(other.item() - fixed.item()) > 1e-4


def test_saved_features_are_zero_outside_the_charts_and_nothing_reads_there(scene, tmp_path):
    """Every texel outside feature_mask is exactly zero on disk, and the mask holds every texel a Gaussian reads
    (a map that is 1 outside the mask and 0 inside samples to 0 at every UV point); the charts are inside it."""
    avatar, views = scene
    mask = feature_mask(avatar, R)
    outside = (~mask).float()[None, None]
    assert sample_maps(outside, avatar.uv).abs().max() == 0
    chart = UVMapper(avatar.body, R).mask
    assert bool(mask[chart].all()) and 0 < int(mask.sum()) < R * R
    fitter = _fitter(avatar, tmp_path, init_scale=0.5)  # a large random start: outside texels would keep it
    fitter.fit_joint(list(views), views.__getitem__, epochs=1, batch_avatars=3, refit_steps=1, progress=False)
    for a in views:
        f = TeacherFeatureStore(tmp_path, C).load(a)
        assert torch.count_nonzero(f[:, ~mask]) == 0 and torch.count_nonzero(f[:, mask]) > 0


def test_refit_leaves_the_frozen_decoder_unchanged(scene, tmp_path):
    """The refit phase changes features only: the decoder (weights and BatchNorm statistics) ends as phase 1 left
    it, also when avatars added later are encoded against it; the refit lowers those avatars' render loss."""
    avatar, views = scene
    fitter = _fitter(avatar, tmp_path)
    fitter.fit_joint(["a0", "a1"], views.__getitem__, epochs=2, batch_avatars=2, refit_steps=3, progress=False)
    saved = load_tensors(tmp_path / DECODER_FILE)[0]
    for key, value in fitter.decoder.state_dict().items():
        torch.testing.assert_close(value, saved[key], atol=0, rtol=0)
    later = _fitter(avatar, tmp_path)  # a larger dataset: a2 is new, encoded against the frozen decoder
    few = later.fit_joint(list(views), views.__getitem__, epochs=2, batch_avatars=2, refit_steps=1, progress=False)
    assert list(few) == ["a2"]
    for key, value in later.decoder.state_dict().items():
        torch.testing.assert_close(value, saved[key], atol=0, rtol=0)
    fresh = tmp_path / "fresh"  # only the decoder: phase 1 counts as done, every avatar is encoded against it
    save_tensors(fresh / DECODER_FILE, saved)
    longer = _fitter(avatar, fresh).fit_joint(["a2"], views.__getitem__, epochs=2, batch_avatars=2, refit_steps=12,
                                              progress=False)
    assert longer["a2"] < few["a2"]


def test_feature_regulariser_value_and_gradient():
    """Closed form on a 1-channel 2 x 3 map with one texel outside: the L2 term is the mean square inside, the
    smoothness term the mean squared step over the 4 adjacent pairs inside; autograd matches finite differences."""
    f = torch.tensor([[[[1.0, 2.0, 5.0], [0.0, 4.0, 9.0]]]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    l2 = feature_regulariser(f, mask, lambda_l2=1.0)
    assert l2.item() == pytest.approx((1 + 4 + 25 + 0 + 16) / 5)
    # inside pairs: (1,2) (2,5) (0,4) horizontally, (1,0) (2,4) vertically: 5 pairs
    tv = feature_regulariser(f, mask, lambda_tv=1.0)
    assert tv.item() == pytest.approx((1 + 9 + 16 + 1 + 4) / 5)
    x = f.clone().requires_grad_(True)
    feature_regulariser(x, mask, 0.3, 0.7).sum().backward()
    fd = torch.zeros_like(f)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in f.shape)).tolist():
        e = torch.zeros_like(f)
        e[tuple(idx)] = 1e-6
        fd[tuple(idx)] = (feature_regulariser(f + e, mask, 0.3, 0.7) - feature_regulariser(f - e, mask, 0.3, 0.7)) / 2e-6
    torch.testing.assert_close(x.grad, fd, atol=1e-6, rtol=1e-6)
    assert x.grad[0, 0, 1, 2] == 0  # the texel outside gets no pull


def test_consistency_measure_on_a_hand_built_case(scene, tmp_path):
    """Avatar 0's views are renders of its stored features through the decoder (PSNR high); avatar 1's views are
    another avatar's (PSNR low): the first-vs-last gap is their difference, and the JSON and table carry it."""
    avatar, views = scene
    torch.manual_seed(1)
    decoder = UVDecoder(C, 4, 8, 8).eval()
    store = TeacherFeatureStore(tmp_path, C)
    feats = [torch.tanh(torch.randn(C, R, R)) for _ in range(2)]
    for k, f in enumerate(feats):
        store.save(f"b{k}", f)
    cams = orbit_cameras(4, radius=2.6, width=16, height=16)
    with torch.no_grad():
        own = [avatar.render(avatar(decoder(store.load(f"b{k}")[None])), cams) for k in range(2)]
    images = [own[0][0][0], views["a0"][0]]  # RGB over the background, as rendered
    cam_sets = [cams, views["a0"][1]]

    def views_of(k, which):
        idx = torch.as_tensor(which)
        c = cam_sets[k]
        return images[k][idx], type(c)(c.viewmats[idx], c.Ks[idx], c.width, c.height)

    ds = SimpleNamespace(ids=["b0", "b1"], num_views=3, views=views_of, body_output=lambda k, body: None)
    cfg = load_config(None, ["data.eval_views=[1]", "data.background=[1.0,1.0,1.0]", "teacher.mode=sequential",
                             "data.lit_renders=false"])  # the hand-built views are unlit
    c = measure_consistency(cfg, ds, store, avatar, decoder, quantile=0.5)
    rows = c["per_avatar"]
    assert [r["id"] for r in rows] == ["b0", "b1"]
    assert rows[0]["psnr"] > 40 and rows[1]["psnr"] < 25  # own renders vs another avatar's
    assert c["psnr_first"] == pytest.approx(rows[0]["psnr"]) and c["psnr_last"] == pytest.approx(rows[1]["psnr"])
    assert c["psnr_gap"] == pytest.approx(rows[0]["psnr"] - rows[1]["psnr"])
    assert c["psnr_mean"] == pytest.approx((rows[0]["psnr"] + rows[1]["psnr"]) / 2)
    assert load_json(tmp_path / CONSISTENCY_FILE)["psnr_gap"] == pytest.approx(c["psnr_gap"])
    table = format_consistency(c)
    assert "sequential" in table and f"{c['psnr_gap']:.2f}" in table and "held-out" in table


def test_latent_pooling_ignores_texels_outside_the_charts():
    """Zero texels (outside the charts) do not darken a chart's border in the latent; a block with none inside is
    zero; features with no zero texel (IDOL's) are plainly area-averaged."""
    f = torch.zeros(1, 2, 4, 4)
    f[0, :, 0, 0] = torch.tensor([0.4, -0.2])  # one texel inside in the top-left 2x2 block
    f[0, :, 2:, 2:] = torch.tensor([0.6, 0.3]).reshape(2, 1, 1)  # a full block inside
    z = features_to_latent(f, 2)[0]
    torch.testing.assert_close(z[:, 0, 0], torch.tensor([0.4, -0.2]))
    torch.testing.assert_close(z[:, 1, 1], torch.tensor([0.6, 0.3]))
    assert torch.count_nonzero(z[:, 0, 1]) == 0 and torch.count_nonzero(z[:, 1, 0]) == 0
    dense = torch.rand(1, 2, 4, 4) + 0.1
    torch.testing.assert_close(features_to_latent(dense, 2), torch.nn.functional.avg_pool2d(dense, 2))


def test_coarse_feature_levels(scene, tmp_path):
    """Feature levels: one free parameter per level and avatar, at the level's resolution, resumable; the written
    features still vanish outside the charts; a level finer than the features is refused."""
    avatar, views = scene
    from avatar_core.errors import InputError

    with pytest.raises(InputError, match="levels"):
        _fitter(avatar, tmp_path / "bad", levels=[2 * R])
    fitter = _fitter(avatar, tmp_path, levels=[R // 2, R])
    calls = {"n": 0}
    real = fitter.batch_loss

    def stop_after_phase_one(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # 2 epochs of one batch, then the refit's first step
            raise _Interrupt
        return real(*a, **k)

    fitter.batch_loss = stop_after_phase_one
    with pytest.raises(_Interrupt):
        fitter.fit_joint(["a0", "a1"], views.__getitem__, epochs=2, batch_avatars=2, refit_steps=1, progress=False)
    state = torch.load(tmp_path / FIT_STATE_FILE, weights_only=True)
    assert [tuple(p.shape) for p in state["params"]] == [(2, C, R // 2, R // 2), (2, C, R, R)]
    assert state["levels"] == [R // 2, R]
    _fitter(avatar, tmp_path, levels=[R // 2, R]).fit_joint(["a0", "a1"], views.__getitem__, epochs=2,
                                                             batch_avatars=2, refit_steps=1, progress=False)
    mask = feature_mask(avatar, R)
    for a in ("a0", "a1"):
        f = TeacherFeatureStore(tmp_path, C).load(a)
        assert torch.count_nonzero(f[:, ~mask]) == 0 and torch.count_nonzero(f[:, mask]) > 0


def test_lit_colours_in_closed_form():
    """``lit`` multiplies each Gaussian's colour by its shade in each camera: 1 for a normal facing the camera's
    light, the ambient term for one lit edge-on, unchanged everywhere when the light is all ambient."""
    from avatar_core.cameras import look_at
    from avatar_core.render.lighting import camera_lights
    from tera.uv_gaussians import GaussianBatch, lit

    view = look_at(torch.tensor([[0.0, 0.0, 3.0]]), torch.zeros(1, 3), torch.tensor([0.0, 1.0, 0.0]))
    light = camera_lights(view)[0]
    side = torch.linalg.cross(light, torch.tensor([0.0, 0.0, 1.0]))
    normals = torch.stack([light, side / side.norm()])[None]  # [1, 2, 3]
    colours = torch.tensor([[[0.8, 0.4, 0.2], [0.5, 0.5, 0.5]]])
    g = GaussianBatch(torch.zeros(1, 2, 3), torch.tensor([1.0, 0, 0, 0]).expand(1, 2, 4), torch.ones(1, 2, 3),
                      torch.ones(1, 2), colours, torch.zeros(1, 2, 3))
    out = lit(g, normals, view, 0.4).colors  # [1, C=1, 2, 3]
    torch.testing.assert_close(out[0, 0, 0], colours[0, 0])
    torch.testing.assert_close(out[0, 0, 1], 0.4 * colours[0, 1])
    torch.testing.assert_close(lit(g, normals, view, 1.0).colors[:, 0], colours)


def test_lit_teacher_recovers_the_albedo_of_lit_views(scene, tmp_path):
    """Views lit by the dataset's rig (ambient 0.4): a teacher that lights its renders the same way fits colours
    whose brightness is the albedo's; one that renders unlit bakes the shading in and fits them darker."""
    from tera.uv_gaussians import lit

    avatar, _ = scene
    mapper = avatar.uv_mapper
    labels = mapper.part_label_map().clamp_min(0)
    cams = orbit_cameras(4, radius=2.6, width=16, height=16)
    normals = avatar.surface_normals(avatar.body.template_vertices[None])
    views, albedo = {}, []
    for k in range(3):
        palette = 0.3 + 0.6 * torch.rand(8, 3, generator=torch.Generator().manual_seed(10 + k))
        maps = attributes_from_texture(palette[labels])
        with torch.no_grad():
            rgb, alpha = avatar.render(lit(avatar(maps), normals, cams.viewmats, 0.4), cams)
        views[f"a{k}"] = (torch.cat([rgb[0], alpha[0]], -1), cams)
        albedo.append(avatar.sample(maps)[0, :, 3:6].mean())
    errors = {}
    for name, ambient in (("lit", 0.4), ("unlit", None)):
        fitter = _fitter(avatar, tmp_path / name, ambient=ambient, random_background=True, lambda_tv=1.0)
        fitter.fit_joint(list(views), views.__getitem__, epochs=40, batch_avatars=3, refit_steps=20, progress=False)
        fitter.decoder.eval()
        with torch.no_grad():
            fitted = [avatar.sample(fitter.decoder(TeacherFeatureStore(tmp_path / name, C).load(a)[None]))[0, :, 3:6]
                      .mean() for a in views]
        errors[name] = float(torch.stack([f - t for f, t in zip(fitted, albedo)]).mean())
    assert errors["unlit"] < -0.05  # shading baked in: darker than the albedo
    assert abs(errors["lit"]) < 0.5 * abs(errors["unlit"])


def test_fit_teacher_refuses_a_dataset_without_recorded_lighting_before_writing(tmp_path):
    """With data.lit_renders, a dataset whose meta.json records no lighting is refused with a ConfigError before
    the teacher folder gets its settings file (so a rerun with data.lit_renders=false is not blocked)."""
    import json

    from avatar_core.data.generate import generate_dataset
    from avatar_core.errors import ConfigError
    from tera.runs import run_paths
    from tera.teacher import fit_teacher

    root = generate_dataset(tmp_path / "ds", num=1, views=3, res=32, seed=0, uv_res=64, progress=False)
    meta = json.loads((root / "meta.json").read_text())
    del meta["lighting"]
    (root / "meta.json").write_text(json.dumps(meta))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.root={root}", "data.num=1", "data.views=3",
                             "data.res=32", "data.image_size=32", "data.uv_res=64", "data.eval_views=[1]",
                             "data.lit_renders=true", "body.num_points=400"])
    with pytest.raises(ConfigError, match="records no"):
        fit_teacher(cfg, progress=False)
    assert not run_paths(cfg).teacher.exists() or not any(run_paths(cfg).teacher.iterdir())
