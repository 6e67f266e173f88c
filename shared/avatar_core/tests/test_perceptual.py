"""Perceptual distances: our LPIPS against the lpips package given the same backbone weights, closed forms."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from avatar_core.errors import CorruptFileError, MissingWeightsError
from avatar_core.perceptual import (
    LPIPS,
    BackboneFeatures,
    PerceptualLoss,
    RandomFeaturePerceptual,
    alexnet_features,
    lpips_weights_path,
    vgg16_features,
)


def _random_backbone(tmp_path, net):
    """A random-init torchvision-layout state dict saved to a file (the user's weights, here untrained)."""
    torch.manual_seed(0)
    feats = vgg16_features() if net == "vgg" else alexnet_features()
    state = {f"features.{k}": v for k, v in feats.state_dict().items()}
    path = tmp_path / f"{net}.pth"
    torch.save(state, path)
    return path, state


def _lpips_package(monkeypatch):
    """The lpips package; its torchvision backbone constructor is given our layout when torchvision is absent
    (lpips builds the network with pretrained=False here and we load the same weights into it)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv = types.ModuleType("torchvision")
        tv.models = types.ModuleType("torchvision.models")
        tv.models.vgg16 = lambda pretrained=False, **kw: types.SimpleNamespace(features=vgg16_features(31))
        tv.models.alexnet = lambda pretrained=False, **kw: types.SimpleNamespace(features=alexnet_features(13))
        tv.models.squeezenet1_1 = tv.models.resnet18 = None
        monkeypatch.setitem(sys.modules, "torchvision", tv)
        monkeypatch.setitem(sys.modules, "torchvision.models", tv.models)
    import lpips

    return lpips


def _load_into_lpips(model, state):
    """Copy torchvision ``features.N`` tensors into lpips' slices (which keep the indices N as module names)."""
    own = model.net.state_dict()
    mapped = {}
    for key in own:
        _, idx, name = key.split(".")
        mapped[key] = state[f"features.{idx}.{name}"]
    model.net.load_state_dict(mapped)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_matches_the_lpips_package(tmp_path, monkeypatch, net):
    lpips = _lpips_package(monkeypatch)
    path, state = _random_backbone(tmp_path, net)
    ref = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # heads from the package's weights/v0.1
    _load_into_lpips(ref, state)
    heads = lpips_weights_path(net)
    assert heads is not None and heads.name == f"{net}.pth"
    ours = LPIPS.from_files(path, heads, net)
    assert ours.describe()["kind"] == "lpips"
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 2, 64, 64, 3, generator=g)
    expect = ref(a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2), normalize=True).flatten()
    torch.testing.assert_close(ours(a, b), expect, rtol=1e-4, atol=1e-6)
    # LPIPS's baseline (no heads) against the package's lpips=False mode.
    base = lpips.LPIPS(net=net, lpips=False, pnet_rand=True, verbose=False)
    _load_into_lpips(base, state)
    torch.testing.assert_close(LPIPS.from_files(path, None, net)(a, b),
                               base(a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2), normalize=True).flatten(),
                               rtol=1e-4, atol=1e-6)


def test_closed_forms_and_gradients(tmp_path):
    path, _ = _random_backbone(tmp_path, "alex")
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(2, 3, 48, 48, 3, generator=g)
    for metric in (LPIPS.from_files(path, lpips_weights_path("alex"), "alex"), RandomFeaturePerceptual()):
        assert torch.equal(metric(a, a), torch.zeros(3))  # identical images: exactly 0
        d = metric(a, b)
        assert d.shape == (3,) and (d > 0).all()
        torch.testing.assert_close(metric(b, a), d)  # symmetric
        x = a.clone().requires_grad_(True)
        metric(x, b).sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # Heads of all ones are the baseline's channel sum.
    ones = {f"lin{i}.model.1.weight": torch.ones(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    backbone = BackboneFeatures.from_file(path, "alex", "lpips")
    torch.testing.assert_close(LPIPS(backbone, ones)(a, b), LPIPS(backbone, None)(a, b))


def test_front_end_names_what_it_runs(tmp_path, caplog):
    path, _ = _random_backbone(tmp_path, "vgg")
    assert PerceptualLoss(path).describe()["kind"] == "lpips"  # heads found in the installed lpips wheel
    assert PerceptualLoss(path, lpips_weights=None).kind == "lpips_baseline"
    import avatar_core.perceptual as P

    P._LOGGED.discard("standin")
    with caplog.at_level(logging.WARNING, logger="avatar_core.perceptual"):
        a = PerceptualLoss()
        PerceptualLoss()  # a second one logs nothing more
    assert a.describe() == {"kind": "random_feature_perceptual", "channels": [16, 32, 64], "seed": 0}
    assert caplog.text.count("embedded stand-in") == 1  # logged once per process


def test_bad_weight_files(tmp_path):
    with pytest.raises(MissingWeightsError, match="not found"):
        PerceptualLoss(tmp_path / "missing.pth")
    torch.save({"features.0.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pth")
    with pytest.raises(CorruptFileError, match="lack or misshape"):
        BackboneFeatures.from_file(tmp_path / "wrong.pth")
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(CorruptFileError):
        BackboneFeatures.from_file(tmp_path / "junk.pth")


def test_auto_heads_without_the_lpips_package_is_an_error(tmp_path, monkeypatch):
    import avatar_core.perceptual as P

    path, _ = _random_backbone(tmp_path, "alex")
    monkeypatch.setattr(P, "lpips_weights_path", lambda net="vgg", version="0.1": None)
    with pytest.raises(MissingWeightsError, match="lpips_weights=None"):
        PerceptualLoss(path, net="alex")
    assert PerceptualLoss(path, lpips_weights=None, net="alex").kind == "lpips_baseline"
