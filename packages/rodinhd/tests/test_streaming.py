"""RodinHD's training data from disk: the same batches as the stacked tensors the pipeline held before, cameras
from cameras.json, bad avatars named (stop) or left out (skip), and the paper config refusing stand-ins."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from avatar_core.data.cache import FeatureCache
from avatar_core.errors import CorruptFileError, MissingFileError, MissingWeightsError
from rodinhd import pipeline
from rodinhd.config import load_rodinhd_config
from rodinhd.data import downsample_triplanes
from rodinhd.streaming import low_res_cache, resolve_standins, stage2_store, training_ids, training_loader

IDS = [f"{i:06d}" for i in range(5)]
SMALL = ["triplane.channels=2", "triplane.resolution=8", "base.resolution=4"]


def _run(tmp_path: Path, cfg) -> tuple[Path, dict[str, torch.Tensor], FeatureCache]:
    """Stage-2 triplanes, cameras.json files (no images) and a portrait-feature cache for IDS."""
    out = tmp_path / "run"
    g = torch.Generator().manual_seed(0)
    planes = {a: torch.randn(3, 2, 8, 8, generator=g) for a in IDS}
    store = stage2_store(cfg, out)
    for a, p in planes.items():
        store.save(a, p)
        d = out / "data" / "avatars" / a
        d.mkdir(parents=True)
        views = [{"file": f"views/{v}.png", "viewmat": (torch.eye(4) * (1 + v)).tolist(),
                  "K": [[10.0 * int(a) + v, 0, 4], [0, 10, 4], [0, 0, 1]]} for v in range(3)]
        (d / "cameras.json").write_text(json.dumps({"width": 8, "height": 8, "views": views}))
    feats = FeatureCache(out / "cache", "portrait_features", {"encoder": "test"})
    feats.build(IDS, lambda chunk: [{"f0": torch.full((3, 2, 2), float(int(a)))} for a in chunk])
    return out, planes, feats


def test_streamed_batches_equal_the_stacked_tensors(tmp_path):
    cfg = load_rodinhd_config("tiny", SMALL + ["upsample.train.batch_size=2"])
    out, planes, feats = _run(tmp_path, cfg)
    low, ids = low_res_cache(cfg, out, IDS)
    assert ids == IDS
    data = SimpleNamespace(root=out / "data", views=None)
    loader = training_loader(cfg, out, data, ids, low, feats, 1, 2, full=True, cameras=True)
    stacked = torch.stack([planes[a] for a in IDS])
    stacked_low = downsample_triplanes(stacked, 4)
    for epoch in (0, 3):
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(cfg.seed * 1000003 + epoch))
        got = list(loader(epoch))
        assert len(got) == 2
        for k, b in enumerate(got):
            idx = perm[2 * k:2 * k + 2]
            assert torch.equal(b["planes"], stacked[idx]) and torch.equal(b["low"], stacked_low[idx])
            assert torch.equal(b["f0"][:, 0, 0, 0], idx.float())
            assert b["viewmats"].shape == (2, 3, 4, 4) and torch.equal(b["Ks"][:, 2, 0, 0], 10.0 * idx + 2)


def test_missing_and_corrupt_avatars_stop_or_are_skipped(tmp_path):
    cfg = load_rodinhd_config("tiny", SMALL)
    out, _, _ = _run(tmp_path, cfg)
    store = stage2_store(cfg, out)
    store.path("000001").unlink()
    data = SimpleNamespace(train_ids=IDS)
    with pytest.raises(MissingFileError, match="000001"):
        training_ids(cfg, out, data)
    skip = load_rodinhd_config("tiny", SMALL + ["data.on_error=skip"])
    assert training_ids(skip, out, data) == [a for a in IDS if a != "000001"]
    p = store.path("000003")
    p.write_bytes(p.read_bytes()[:-16])  # truncated stage-2 file
    ids = [a for a in IDS if a != "000001"]
    with pytest.raises(CorruptFileError, match="000003"):
        low_res_cache(cfg, out, ids)
    cache, kept = low_res_cache(skip, out, ids)
    assert kept == ["000000", "000002", "000004"] and not cache.folder.exists("000003")
    assert store.exists("000003")  # nothing written is removed


def test_paper_config_without_its_networks_fails_before_any_work(tmp_path):
    cfg = load_rodinhd_config("paper")
    with pytest.raises(MissingWeightsError) as err:
        pipeline.train_all(cfg, tmp_path / "run", progress=False)
    msg = str(err.value)
    for key in ("conditioning.vae_path", "upsample.vgg_path", "diffusion_pytorch_model"):
        assert key in msg
    assert "upsample.lpips_path" not in msg  # Eq. 6's term is VGG features: LPIPS's heads are not the paper's
    assert not (tmp_path / "run").exists()
    with pytest.raises(MissingWeightsError, match="conditioning.vae_path"):
        pipeline.train_base(cfg, tmp_path / "run", progress=False)
    # A folder that is configured but incomplete is named with what it lacks.
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match=r"vae.*diffusion_pytorch_model\.safetensors"):
        resolve_standins(load_rodinhd_config("paper", [f"conditioning.vae_path={tmp_path / 'vae'}"]), ("encoder",))


def test_tiny_config_chooses_and_records_its_standins(tmp_path):
    rec = resolve_standins(load_rodinhd_config("tiny"), run_dir=tmp_path)
    assert rec.names() == ["portrait_vae", "ssim_perceptual"]
    saved = json.loads((tmp_path / "standins.json").read_text())
    assert [s["name"] for s in saved["standins"]] == ["portrait_vae", "ssim_perceptual"]
