"""Streaming data layer: same batches as in memory, resume without reading skipped batches, process shards, the
feature cache (keyed, truncated entries rebuilt), streaming statistics, bad items named, stand-in resolution."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from avatar_core.data.cache import FeatureCache, module_fingerprint
from avatar_core.data.stats import ChannelMoments, seeded_subset
from avatar_core.data.stream import (
    CameraField,
    RecordField,
    RecordFolder,
    StreamDataset,
    StreamLoader,
    ViewsField,
)
from avatar_core.errors import ConfigError, CorruptFileError, InputError, MissingWeightsError
from avatar_core.standins import Component, Requirement, StandIn, resolve
from avatar_core.train import TrainConfig, Trainer

N, BATCH, SEED = 12, 4, 5


def _items(n: int = N) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"planes": torch.randn(2, 4, 12, generator=g), "f0": torch.randn(3, 2, 2, generator=g),
             "f1": torch.randn(5, 1, 1, generator=g)} for _ in range(n)]


def _folder(tmp_path: Path, items: list[dict]) -> RecordFolder:
    folder = RecordFolder(tmp_path / "records")
    for i, it in enumerate(items):
        folder.save(f"{i:06d}", it)
    return folder


def _in_memory_batches(items: list[dict], epoch: int) -> list[dict[str, torch.Tensor]]:
    """What the packages did before streaming: every item stacked in RAM, indexed by a seeded permutation."""
    stacked = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(SEED * 1000003 + epoch))
    return [{k: v[perm[i:i + BATCH]] for k, v in stacked.items()} for i in range(0, len(items) - BATCH + 1, BATCH)]


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_gives_the_in_memory_batches(tmp_path, workers):
    items = _items()
    folder = _folder(tmp_path, items)
    loader = StreamLoader(StreamDataset(folder.ids(), [RecordField(folder)]), BATCH, SEED, num_workers=workers)
    for epoch in (0, 1):
        got = list(loader(epoch))
        want = _in_memory_batches(items, epoch)
        assert len(got) == len(want) == N // BATCH
        for g, w in zip(got, want):
            for k in w:
                assert torch.equal(g[k], w[k]), (epoch, k)
    assert not torch.equal(list(loader(0))[0]["planes"], list(loader(1))[0]["planes"])  # epochs differ


def test_resume_skips_batches_without_reading_them(tmp_path):
    items = _items()
    folder = _folder(tmp_path, items)
    reads: list[str] = []

    def counting(item_id: str) -> dict:
        reads.append(item_id)
        return {}

    loader = StreamLoader(StreamDataset(folder.ids(), [RecordField(folder), counting]), BATCH, SEED)
    full = list(loader(2))
    reads.clear()
    tail = list(loader.batches_from(2, 1))
    assert len(tail) == len(full) - 1 and all(torch.equal(a["planes"], b["planes"]) for a, b in zip(tail, full[1:]))
    assert sorted(reads) == sorted(i for b in full[1:] for i in b["item_id"])  # batch 0's items never read


class _Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(96, 16), nn.Dropout(0.2), nn.Linear(16, 3))

    def forward(self, batch):
        return nn.functional.mse_loss(self.net(batch["planes"]), batch["f0"].mean(dim=(2, 3)))


def _train(tmp_path, folder, steps, resume):
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=steps, seed=3, checkpoint_every=2, log_every=1,
                      progress_bar=False, keep_last_checkpoints=None)
    loader = StreamLoader(StreamDataset(folder.ids(), [RecordField(folder)]), BATCH, SEED, num_workers=1)
    t = Trainer(cfg, _Regressor(), lambda p: torch.optim.Adam(p, lr=1e-2), lambda m, b: (m(b), {}), loader)
    t.train(resume="auto" if resume else None)
    return t


@pytest.mark.slow
def test_trainer_on_a_stream_resumes_bit_exactly(tmp_path):
    folder = _folder(tmp_path, _items())
    straight = _train(tmp_path / "a", folder, 7, resume=False)  # 3 batches an epoch: step 7 is mid-epoch
    _train(tmp_path / "b", folder, 5, resume=False)
    resumed = _train(tmp_path / "b", folder, 7, resume=True)
    for p, q in zip(straight.unwrapped_model.parameters(), resumed.unwrapped_model.parameters()):
        assert torch.equal(p, q)
    assert resumed.epoch == straight.epoch == 2


@pytest.mark.slow
def test_two_processes_see_disjoint_shards_covering_an_epoch(tmp_path):
    folder = _folder(tmp_path, _items(N))
    torchrun = Path(sys.executable).with_name("torchrun")
    script = Path(__file__).with_name("stream_shards_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(folder.root),
                    str(tmp_path), str(BATCH)], check=True, env=env, timeout=240, capture_output=True)
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["sizes"] == [BATCH // 2] * (N // BATCH) for r in ranks)
    for epoch in ("0", "1"):
        a, b = (set(r["seen"][epoch]) for r in ranks)
        assert not a & b and a | b == set(folder.ids())
    # The cache both built: disjoint shares computed, every item readable by both, the unreadable one known to both.
    assert ranks[0]["readable"] == ranks[1]["readable"] == [i for i in folder.ids() if i != "000003"]
    assert all(r["built"]["failed"] == ["000003"] for r in ranks)
    assert sum(r["built"]["computed"] for r in ranks) == N - 1
    # Together the two processes see exactly the one-process epoch's global batches.
    one = StreamLoader(StreamDataset(folder.ids(), [RecordField(folder)]), BATCH, 3, rank=0, world_size=1)
    for k, batch in enumerate(one(0)):
        got = set(ranks[0]["seen"]["0"][2 * k:2 * k + 2]) | set(ranks[1]["seen"]["0"][2 * k:2 * k + 2])
        assert got == set(batch["item_id"])


def test_bad_item_is_named_and_stops_or_is_skipped(tmp_path, caplog):
    folder = _folder(tmp_path, _items())
    bad = folder.path("000003")
    bad.write_bytes(bad.read_bytes()[:-40])  # truncated
    (folder.path("000007")).unlink()  # missing
    before = {p.name: p.read_bytes() for p in folder.root.iterdir()}
    ids = [f"{i:06d}" for i in range(N)]
    with pytest.raises(CorruptFileError, match="item 00000[37]"):
        list(StreamLoader(StreamDataset(ids, [RecordField(folder)]), N, SEED)(0))
    with caplog.at_level(logging.WARNING):
        (batch,) = list(StreamLoader(StreamDataset(ids, [RecordField(folder)], on_error="skip"), N, SEED)(0))
    assert sorted(batch["item_id"]) == [i for i in ids if i not in ("000003", "000007")]
    assert "000003" in caplog.text and "000007" in caplog.text
    assert {p.name: p.read_bytes() for p in folder.root.iterdir()} == before  # nothing written is touched
    with pytest.raises(ConfigError):
        StreamDataset(ids, [], on_error="ignore")


def _avatar(root: Path, item_id: str, views: int = 3) -> None:
    d = root / "avatars" / item_id
    d.mkdir(parents=True)
    frames = [{"file": f"views/{v:03d}.png", "viewmat": torch.eye(4).tolist(),
               "K": [[50.0 + v, 0, 16], [0, 50, 16], [0, 0, 1]]} for v in range(views)]
    (d / "cameras.json").write_text(json.dumps({"width": 32, "height": 32, "views": frames}))


def test_cameras_come_from_cameras_json_without_images(tmp_path):
    _avatar(tmp_path, "000000")
    cams = CameraField(tmp_path)("000000")  # no image file exists: nothing is decoded
    assert cams["viewmats"].shape == (3, 4, 4) and cams["Ks"][2, 0, 0] == 52.0 and cams["width"] == 32
    assert CameraField(tmp_path, views=[1])("000000")["Ks"].shape == (1, 3, 3)
    with pytest.raises(CorruptFileError, match="item 000000"):
        StreamDataset(["000000"], [ViewsField(tmp_path)])[0]  # the views themselves are missing


def test_feature_cache_keyed_by_encoder_and_rebuilt_when_truncated(tmp_path):
    ids = [f"{i:06d}" for i in range(5)]
    enc = nn.Linear(4, 3)
    calls: list[str] = []

    def compute(chunk):
        calls.extend(chunk)
        with torch.no_grad():
            return [{"feat": enc(torch.full((4,), float(int(i))))} for i in chunk]

    ident = {"encoder": "linear", "weights": module_fingerprint(enc), "size": 4}
    cache = FeatureCache(tmp_path, "feats", ident)
    assert cache.build(ids, compute, batch_size=2) == {"computed": 5, "rebuilt": 0, "reused": 0, "failed": []}
    first = cache.get("000002")["feat"]
    calls.clear()
    assert FeatureCache(tmp_path, "feats", ident).build(ids, compute) == {"computed": 0, "rebuilt": 0, "reused": 5, "failed": []}
    assert calls == []
    # A changed setting or changed weights select another cache; the old one is left as it was.
    assert FeatureCache(tmp_path, "feats", {**ident, "size": 8}).build(ids, compute)["computed"] == 5
    with torch.no_grad():
        enc.weight.add_(1.0)
    changed = FeatureCache(tmp_path, "feats", {**ident, "weights": module_fingerprint(enc)})
    assert changed.key != cache.key and changed.build(ids, compute)["computed"] == 5
    assert not torch.equal(changed.get("000002")["feat"], first) and torch.equal(cache.get("000002")["feat"], first)
    # A truncated entry is detected, refused when read, and rebuilt by the next build.
    p = cache.folder.path("000004")
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(CorruptFileError, match="000004"):
        cache.get("000004")
    calls.clear()
    assert cache.build(ids, compute) == {"computed": 0, "rebuilt": 1, "reused": 4, "failed": []}
    assert calls == ["000004"]
    # An entry copied in from another cache is stale, not served.
    shutil.copy(changed.folder.path("000001"), cache.folder.path("000001"))
    assert not cache.valid("000001")
    # Items the feature function cannot read are reported, not written.
    other = FeatureCache(tmp_path, "feats", {**ident, "size": 9})
    r = other.build(ids, lambda chunk: [None if i == "000002" else {"feat": torch.zeros(1)} for i in chunk])
    assert r["failed"] == ["000002"] and r["computed"] == 4 and not other.folder.exists("000002")


def test_channel_moments_match_the_whole_tensor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 3, 5, 6, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 1e-3]).view(1, 3, 1, 1)
    x = x + torch.tensor([1e6, -3.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1)  # a large offset: no cancellation
    m = ChannelMoments(3).update_all(x[s:s + 5] for s in range(0, 37, 5))
    flat = x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(m.mean, flat.mean(1), rtol=0, atol=1e-9)
    torch.testing.assert_close(m.var(), flat.var(1), rtol=1e-9, atol=0)
    torch.testing.assert_close(m.rms(), flat.pow(2).mean(1).sqrt())
    assert torch.equal(m.low, flat.min(1).values) and torch.equal(m.high, flat.max(1).values)
    p = m.pooled()
    torch.testing.assert_close(p.var()[0], x.var(), rtol=1e-9, atol=0)
    r = ChannelMoments.from_state(json.loads(json.dumps(m.state())))
    assert torch.equal(r.m2, m.m2) and r.count == m.count
    assert seeded_subset(100, 10, 4) == seeded_subset(100, 10, 4) != seeded_subset(100, 10, 5)
    assert len(set(seeded_subset(100, 10, 4))) == 10 and seeded_subset(5, None, 0) == [0, 1, 2, 3, 4]


def _components(vae_path: str, vgg_path: str) -> list[Component]:
    return [
        Component(Requirement("SDXL VAE", "conditioning.vae_path", vae_path, kind="sd_vae"),
                  StandIn("portrait_vae", "SDXL VAE", "the embedded portrait VAE")),
        Component(Requirement("VGG16 weights", "upsample.vgg_path", vgg_path),
                  StandIn("ssim_perceptual", "VGG16 / LPIPS", "SSIM + gradient")),
    ]


def test_paper_config_without_files_fails_naming_all_of_them(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        resolve(_components("", ""), allowed=[])
    msg = str(err.value)
    assert "conditioning.vae_path" in msg and "config.json" in msg and "diffusion_pytorch_model" in msg
    assert "upsample.vgg_path" in msg and "'ssim_perceptual'" in msg
    with pytest.raises(MissingWeightsError, match=str(tmp_path / "vgg16.pth")):
        resolve(_components("", str(tmp_path / "vgg16.pth")), allowed=["portrait_vae"])
    with pytest.raises(ConfigError, match="unknown stand-ins"):
        resolve(_components("", ""), allowed=["ssim"])


def test_allowed_standins_are_recorded(tmp_path):
    (tmp_path / "vgg16.pth").write_bytes(b"x")
    rec = resolve(_components("", str(tmp_path / "vgg16.pth")), allowed=["portrait_vae", "ssim_perceptual"])
    assert rec.names() == ["portrait_vae"] and rec.paper == ["VGG16 weights"]
    s = json.loads(json.dumps(rec.settings()))
    assert s["standins"][0]["name"] == "portrait_vae" and s["standins"][0]["replaces"] == "SDXL VAE"
    os.environ["AVATAR_TEST_KNOB"] = "7"
    try:
        assert rec.env("AVATAR_TEST_KNOB") == "7" and rec.settings()["environment"] == {"AVATAR_TEST_KNOB": "7"}
    finally:
        del os.environ["AVATAR_TEST_KNOB"]


def test_custom_order_and_per_epoch_transform_agree_across_workers(tmp_path):
    import numpy as np

    folder = _folder(tmp_path, _items())

    def order(n, seed, epoch):
        return np.random.default_rng([seed, 1, epoch]).permutation(n)

    def pick(item, epoch):  # a per-epoch choice made inside the worker
        return {**item, "choice": (item["index"] + 3 * epoch) % 4}

    runs = []
    for workers in (0, 2):
        loader = StreamLoader(StreamDataset(folder.ids(), [RecordField(folder)], transform=pick), BATCH, SEED,
                              num_workers=workers, order=order)
        runs.append([(b["index"].tolist(), b["choice"].tolist(), b["epoch"].tolist()) for b in loader(3)])
    assert runs[0] == runs[1]
    perm = order(N, SEED, 3).tolist()
    assert [i for idx, _, _ in runs[0] for i in idx] == perm
    assert all(c == [(i + 9) % 4 for i in idx] and e == [3] * BATCH for idx, c, e in runs[0])
    with pytest.raises(InputError, match="permutation"):
        list(StreamLoader(StreamDataset(folder.ids(), [RecordField(folder)]), BATCH, SEED,
                          order=lambda n, s, e: [0] * n)(0))


def test_standin_chosen_by_another_key_folders_and_custom_checks(tmp_path):
    minilm = StandIn("minilm_text", "CLIP", "MiniLM")
    clip = Requirement("CLIP text encoder", "text.path", "", kind="clip_text_encoder")
    with pytest.raises(MissingWeightsError, match="does not list 'minilm_text'"):
        resolve([Component(clip, minilm, use_standin=True)], allowed=[])
    assert resolve([Component(clip, minilm, use_standin=True)], allowed=["minilm_text"]).names() == ["minilm_text"]
    with pytest.raises(MissingWeightsError, match="text.path"):  # the paper's encoder chosen: its files are needed
        resolve([Component(clip, minilm, use_standin=False)], allowed=["minilm_text"])
    feats = Requirement("IDOL features", "teacher.features_dir", str(tmp_path / "idol"), directory=True)
    with pytest.raises(MissingWeightsError, match="not a folder holding files"):
        resolve([Component(feats)], allowed=[])
    (tmp_path / "idol").mkdir()
    (tmp_path / "idol" / "000000.safetensors").write_bytes(b"x")
    body = Requirement("SMPL-X", "body.model_dir", str(tmp_path), check=lambda p: "no SMPLX_NEUTRAL.npz")
    with pytest.raises(MissingWeightsError, match="no SMPLX_NEUTRAL.npz") as err:
        resolve([Component(feats), Component(body)], allowed=[])
    assert "IDOL" not in str(err.value)
