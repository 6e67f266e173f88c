"""TeRA's training data from disk: stage 2's streamed batches equal the stacked tensors it held before, the latent
scale from streamed moments equals the stacked measurement, bad teacher files stop or are skipped, and the paper
config refuses stand-ins."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from avatar_core.data.cache import FeatureCache
from avatar_core.data.stats import ChannelMoments
from avatar_core.data.stream import RecordFolder
from avatar_core.errors import CorruptFileError, MissingFileError, MissingWeightsError
from avatar_core.io import save_tensors
from tera import pipeline as P
from tera.config import load_config
from tera.data import caption_choice
from tera.latent_diffusion import StructuredLatentDiffusion
from tera.standins import resolve_standins
from tera.streaming import LatentSet, diffusion_loader, teacher_latent_cache
from tera.teacher import FEATURE_KEY
from tera.text import TextCondition

IDS = [f"{i:06d}" for i in range(7)]


def test_streamed_diffusion_batches_equal_the_stacked_tensors(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "seed=4"])
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(7, 3, 4, 4, generator=g)
    states, mask = torch.randn(7, 4, 5, 6, generator=g), torch.rand(7, 4, 5, generator=g) > 0.5
    folder = RecordFolder(tmp_path / "latents")
    cache = FeatureCache(tmp_path / "cache", "text_states", {"encoder": "test"})
    for j, a in enumerate(IDS):
        folder.save(a, {"latent": lat[j]})
    cache.build(IDS, lambda chunk: [{"states": states[IDS.index(a)], "mask": mask[IDS.index(a)]} for a in chunk])
    loader = diffusion_loader(cfg, LatentSet(folder, IDS, 4), IDS, cache, 3)
    for epoch in (0, 2):
        # What stage 2 did before: everything stacked, a numpy permutation, one caption per (seed, epoch, index).
        order = np.random.default_rng([4, 1, epoch]).permutation(7)
        got = list(loader(epoch))
        assert len(got) == 2
        for b, s in zip(got, (0, 3)):
            idx = order[s:s + 3]
            k = [caption_choice(4, 4, epoch, int(i), "random") for i in idx]
            assert torch.equal(b["latents"], lat[idx]) and torch.equal(b["states"], states[idx, k])
            assert torch.equal(b["mask"], mask[idx, k])


@pytest.mark.parametrize("per_channel,center", [(False, False), (True, False), (True, True), (False, True)])
def test_latent_scale_from_streamed_moments(per_channel, center):
    z = torch.randn(9, 3, 4, 4) * torch.tensor([0.5, 2.0, 3.0]).view(1, 3, 1, 1) + 0.7
    null = TextCondition(torch.zeros(1, 5, 8), torch.ones(1, 5, dtype=torch.bool))
    unet = {"sample_size": 4, "in_channels": 3, "out_channels": 3, "block_out_channels": [8],
            "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"], "layers_per_block": 1,
            "cross_attention_dim": 8, "norm_num_groups": 4}
    stacked, streamed = (StructuredLatentDiffusion(unet, null_text=null) for _ in range(2))
    stacked.set_latent_stats(z, per_channel=per_channel, center=center)
    streamed.set_latent_stats_from_moments(ChannelMoments(3).update_all(z[i:i + 2] for i in range(0, 9, 2)),
                                           per_channel=per_channel, center=center)
    torch.testing.assert_close(streamed.latent_scale, stacked.latent_scale)
    torch.testing.assert_close(streamed.latent_shift, stacked.latent_shift)


def test_missing_or_corrupt_teacher_features_stop_or_are_skipped(tmp_path):
    feats = tmp_path / "teacher"
    for a in IDS[:5]:
        save_tensors(feats / f"{a}.safetensors", {FEATURE_KEY: torch.randn(8, 8, 8)})
    (feats / f"{IDS[2]}.safetensors").write_bytes(b"not a safetensors file")
    ds = SimpleNamespace(ids=IDS[:6])  # IDS[5] has no features at all
    base = [f"run_dir={tmp_path / 'run'}", f"teacher.features_dir={feats}"]
    with pytest.raises(MissingFileError, match=IDS[5]):
        teacher_latent_cache(load_config(None, base), ds, 4)
    with pytest.raises(CorruptFileError, match=IDS[2]):
        teacher_latent_cache(load_config(None, base), SimpleNamespace(ids=IDS[:5]), 4)
    cache, kept = teacher_latent_cache(load_config(None, base + ["data.on_error=skip"]), ds, 4)
    assert kept == [IDS[0], IDS[1], IDS[3], IDS[4]] and cache.get(IDS[3])["latent"].shape == (8, 4, 4)
    assert (feats / f"{IDS[2]}.safetensors").read_bytes() == b"not a safetensors file"  # inputs untouched


def test_paper_config_without_its_files_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("AVATAR_SMPLX_DIR", raising=False)
    cfg = load_config("paper", [f"run_dir={tmp_path / 'run'}", f"teacher.features_dir={tmp_path / 'idol'}",
                                f"text.path={tmp_path / 'clip'}"])
    with pytest.raises(MissingWeightsError) as err:
        P.distill(cfg, progress=False)
    msg = str(err.value)
    for key in ("body.model_dir", "teacher.vgg_weights", "teacher.features_dir", str(tmp_path / "idol")):
        assert key in msg
    with pytest.raises(MissingWeightsError, match=r"text\.path.*clip"):
        P.train(cfg, progress=False)
    with pytest.raises(MissingWeightsError, match="body.model_dir"):
        P.fit_teacher(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    # The SMPL-X folder given by the environment instead of the config is recorded with the run.
    monkeypatch.setenv("AVATAR_SMPLX_DIR", str(tmp_path / "smplx"))
    with pytest.raises(MissingWeightsError, match="smplx"):
        resolve_standins(cfg, ("body",))


def test_tiny_config_chooses_and_records_its_standins(tmp_path):
    rec = resolve_standins(load_config("tiny"), run_dir=tmp_path)
    names = ["anny_body", "minilm_text", "random_feature_perceptual", "fitted_teacher"]
    assert rec.names() == names
    assert [s["name"] for s in json.loads((tmp_path / "standins.json").read_text())["standins"]] == names
    with pytest.raises(MissingWeightsError, match="minilm_text"):  # choosing MiniLM without listing it is refused
        resolve_standins(load_config("tiny", ["standins=[anny_body]"]), ("text",))
