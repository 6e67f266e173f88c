"""Teacher features (IDOL layout, fitted teacher), the distillation decoder, its loss and the latent scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar_core.body import UVMapper, load_body_model
from avatar_core.cameras import orbit_cameras
from avatar_core.errors import CorruptFileError, MissingFileError, MissingWeightsError
from avatar_core.io import save_tensors
from tera.distill import (
    DistillationDecoder,
    Distiller,
    PerceptualLoss,
    features_to_latent,
    latent_scale,
)
from tera.teacher import FEATURE_KEY, TeacherFeatureStore, TeacherFitter
from tera.uv_gaussians import ATTRIBUTE_SLICES, UVDecoder, UVGaussianAvatar, attributes_from_texture

R = 16  # teacher feature / attribute map resolution in these tests


@pytest.fixture(scope="module")
def scene():
    """A small avatar and ground-truth RGBA views of a part-coloured body rendered by the kernel."""
    torch.manual_seed(0)
    body = load_body_model("anny")
    mapper = UVMapper(body, R)
    avatar = UVGaussianAvatar(body, num_points=1500, seed=0, uv_mapper=mapper)
    palette = torch.tensor([[0.9, 0.7, 0.6], [0.2, 0.1, 0.05], [0.8, 0.1, 0.1], [0.1, 0.2, 0.7],
                            [0.9, 0.7, 0.6], [0.9, 0.7, 0.6], [0.1, 0.5, 0.2], [0.1, 0.1, 0.1]])
    texture = palette[mapper.part_label_map().clamp_min(0)]
    cams = orbit_cameras(3, radius=2.6, width=32, height=32)
    with torch.no_grad():
        rgb, alpha = avatar.render(avatar(attributes_from_texture(texture)), cams)
    images = torch.cat([rgb[0], alpha[0]], -1)  # [V, H, W, 4]
    return avatar, images, cams


def test_feature_store_layout_and_errors(tmp_path):
    """safetensors / npy files round-trip; missing, mis-shaped or broken features fail with what to do."""
    store = TeacherFeatureStore(tmp_path)
    feats = torch.randn(32, 8, 8).clamp(-1, 1)
    store.save("a1", feats)
    np.save(tmp_path / "a2.npy", feats.numpy())
    assert store.ids() == ["a1", "a2"]
    torch.testing.assert_close(store.load("a1"), feats, atol=1e-3, rtol=0)  # float16 on disk
    torch.testing.assert_close(store.load("a2"), feats)
    with pytest.raises(MissingFileError, match="fit-teacher"):
        store.load("nobody")
    save_tensors(tmp_path / "b.safetensors", {FEATURE_KEY: torch.randn(16, 8, 8)})
    with pytest.raises(CorruptFileError, match=r"\[32, H, W\]"):
        store.load("b")
    np.save(tmp_path / "c.npy", np.zeros((8, 8, 32), np.float32))
    with pytest.raises(CorruptFileError, match="channels-last"):
        store.load("c")
    save_tensors(tmp_path / "d.safetensors", {"features": feats})
    with pytest.raises(CorruptFileError, match=FEATURE_KEY):
        store.load("d")
    bad = feats.clone()
    bad[0, 0, 0] = float("nan")
    store.save("e", bad, dtype=torch.float32)
    with pytest.raises(CorruptFileError, match="NaN"):
        store.load("e")


def test_decoders_channel_semantics():
    """IDOL's UV decoder: ~zero offsets at init (U(+-1e-5) head), sigmoid channels in (0, 1), opacity 1,
    geometry and texture branches read disjoint feature channels; the distillation decoder starts as head(up(z))."""
    torch.manual_seed(0)
    dec = UVDecoder().eval()
    feats = torch.randn(2, 32, R, R)
    maps = dec(feats)
    assert maps.shape == (2, 13, R, R)
    assert maps[:, ATTRIBUTE_SLICES["offset"]].abs().max() < 1e-3
    tex = maps[:, 3:12]
    assert (tex > 0).all() and (tex < 1).all() and tex.std() > 1e-3
    assert torch.equal(maps[:, ATTRIBUTE_SLICES["opacity"]], torch.ones(2, 1, R, R))
    geo_changed = feats.clone()
    geo_changed[:, :16] += 1.0
    tex_changed = feats.clone()
    tex_changed[:, 16:] += 1.0
    torch.testing.assert_close(dec(geo_changed)[:, 3:], maps[:, 3:])
    torch.testing.assert_close(dec(tex_changed)[:, :3], maps[:, :3])

    distill = DistillationDecoder(32, upsample_factor=4, hidden_channels=16, norm="batch").eval()
    distill.load_teacher_head(dec)
    z = torch.randn(1, 32, 4, 4)
    up = torch.nn.functional.interpolate(z, scale_factor=4, mode="bilinear", align_corners=False)
    torch.testing.assert_close(distill(z), dec(up))
    # The default GroupNorm head: per-avatar statistics, the same output in training and inference mode.
    grouped = DistillationDecoder(32, upsample_factor=4, hidden_channels=16)
    grouped.load_teacher_head(dec)
    torch.testing.assert_close(grouped.train()(z), grouped.eval()(z))


def test_latent_is_downsampled_features_and_scale_is_their_std():
    """The latent is the area-downsampled teacher map; latent_scale streams the dataset's std exactly."""
    feats = torch.randn(3, 32, 16, 16, dtype=torch.float64)
    lat = features_to_latent(feats, 4)
    torch.testing.assert_close(lat, feats.float().reshape(3, 32, 4, 4, 4, 4).mean((3, 5)))
    chunks = [lat[:1], lat[1:]]
    torch.testing.assert_close(latent_scale(chunks), lat.std())
    torch.testing.assert_close(latent_scale(iter(chunks), per_channel=True), lat.transpose(0, 1).reshape(32, -1).std(1))
    torch.testing.assert_close(latent_scale(chunks, center=False), lat.pow(2).mean().sqrt())


def test_perceptual_loss_embedded_and_vgg(tmp_path, monkeypatch):
    """Zero for equal images, larger for more different ones; VGG16 from a local file only (no environment
    variable changes it behind the config's back)."""
    from avatar_core.perceptual import vgg16_features

    torch.manual_seed(0)
    a = torch.rand(2, 32, 32, 3)
    near, far = (a + 0.05 * torch.randn_like(a)).clamp(0, 1), torch.rand(2, 32, 32, 3)
    # A torchvision-layout VGG16 state dict with random weights stands in for the real one.
    state = {f"features.{k}": t for k, t in vgg16_features().state_dict().items()}
    save_tensors(tmp_path / "vgg16.safetensors", state)
    assert PerceptualLoss().kind == "random_feature_perceptual"
    monkeypatch.setenv("TERA_VGG16_WEIGHTS", str(tmp_path / "vgg16.safetensors"))  # the variable of old versions
    assert PerceptualLoss().kind == "random_feature_perceptual"
    assert PerceptualLoss(tmp_path / "vgg16.safetensors").kind == "lpips"
    for loss in (PerceptualLoss(lpips_weights=None), PerceptualLoss(tmp_path / "vgg16.safetensors")):
        assert loss(a, a).abs().max() < 1e-6
        assert (loss(a, near) < loss(a, far)).all()
    with pytest.raises(MissingWeightsError, match="not found"):
        PerceptualLoss(tmp_path / "missing.pth")


def test_teacher_fit_reduces_loss_and_resumes(scene, tmp_path):
    """A tiny fitted teacher: features + decoder reproduce the views far better than at the start; a rerun skips."""
    avatar, images, cams = scene
    store = TeacherFeatureStore(tmp_path)
    fitter = TeacherFitter(avatar, store, feature_resolution=R, lr=2e-3, feature_lr=3e-2, views_per_step=3)
    _, history = fitter.fit_avatar(images, cams, 15)
    assert history[-1] < 0.3 * history[0]
    fitter.fit(["x"], lambda _: (images, cams), steps=2, progress=False)
    assert store.load("x").shape == (32, R, R) and store.load("x").abs().max() <= 1.0
    resumed = TeacherFitter(avatar, store, feature_resolution=R)
    for key, value in fitter.decoder.state_dict().items():
        torch.testing.assert_close(resumed.decoder.state_dict()[key], value)
    assert resumed.fit(["x"], lambda _: (images, cams), steps=10, progress=False) == {}


def test_distillation_reduces_loss(scene):
    """A tiny stage-1 run: the decoder learns to render the views from a latent; L_dist falls clearly."""
    avatar, images, cams = scene
    torch.manual_seed(0)
    latent = torch.tanh(torch.randn(1, 32, 4, 4))
    distiller = Distiller(avatar, DistillationDecoder(32, upsample_factor=4, hidden_channels=16))
    history = distiller.fit(latent, lambda _: (images, cams), steps=15, lr=3e-3, progress=False)
    assert history[-1] < 0.5 * history[0]
    with torch.no_grad():
        maps, g = distiller.decode(latent)
    assert maps.shape == (1, 13, 16, 16) and g.means.shape == (1, avatar.num_points, 3)


def test_teacher_map_term_is_zero_on_the_teachers_own_maps_and_needs_its_decoder(tmp_path):
    """``distill.lambda_teacher_maps``' term: 0 for maps equal to the fitted teacher's decoder on the stored
    features, positive and differentiable for other maps; without the teacher's decoder a clear error."""
    from avatar_core.errors import ConfigError
    from tera.config import load_config
    from tera.runs import build_avatar, run_paths, uv_decoder
    from tera.stage1 import _teacher_maps
    from tera.teacher import DECODER_FILE

    cfg = load_config(None, [f"run_dir={tmp_path}", "body.num_points=400", "teacher.resolution=16",
                             "distill.lambda_teacher_maps=1.0"])
    avatar = build_avatar(cfg, "cpu")
    with pytest.raises(ConfigError, match="needs the fitted teacher's decoder"):
        _teacher_maps(cfg, avatar, 16, torch.device("cpu"))
    torch.manual_seed(0)
    head = uv_decoder(cfg).eval()
    save_tensors(run_paths(cfg).teacher / DECODER_FILE, head.state_dict())
    feats = torch.rand(cfg.teacher.channels, 16, 16)
    TeacherFeatureStore(run_paths(cfg).teacher, cfg.teacher.channels).save("a0", feats, dtype=torch.float32)
    term = _teacher_maps(cfg, avatar, 16, torch.device("cpu"))
    with torch.no_grad():
        own = head(feats[None])
    assert float(term("a0", own)) < 1e-10
    other = (own + 0.1).requires_grad_(True)
    value = term("a0", other)
    value.backward()
    assert value.item() > 1e-3 and other.grad.abs().sum() > 0
