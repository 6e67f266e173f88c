"""Table 4(b)'s conditioning variants and rows (``rodinhd ablate-diffusion``).

The conditions are checked by properties the paper's definitions imply: a global token cannot see where in the
portrait a feature sits (a spatial permutation of the feature maps leaves the prediction unchanged), a single-scale
model cannot see the other scales, the multi-scale model sees every scale. The rows are checked against the
paper's text: each adds one factor to the row above.
"""

from __future__ import annotations

import json

import pytest
import torch

from avatar_core.errors import ConfigError
from rodinhd import ablation_diffusion, pipeline
from rodinhd.ablation_diffusion import (
    DIFFUSION_ROWS,
    ablate_diffusion,
    format_diffusion_table,
    row_config,
    row_settings,
)
from rodinhd.cli import main as cli_main
from rodinhd.conditioning import CONDITION_MODES, PortraitTokenizer
from rodinhd.config import load_rodinhd_config
from rodinhd.demo import SMALLEST_OVERRIDES
from rodinhd.unet import TriplaneUNet

P = 32  # portrait side: features at 16, 8, 4 with (8, 16, 32) channels
CH = (8, 16, 32)


def _model(mode: str, scale: int = -1) -> tuple[PortraitTokenizer, TriplaneUNet]:
    """A small base UNet whose only portrait path is cross-attention (no attention pool), with every parameter
    random (the zero-initialised output layers would otherwise hide any dependence)."""
    torch.manual_seed(0)
    tok = PortraitTokenizer(CH, (4, 2, 1), 16, portrait_size=P, mode=mode, scale=scale)
    unet = TriplaneUNet(8, 4, 8, out_channels=8, channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1],
                        cross_attn_resolutions=[8, 4, 2], middle_cross_attn=True, context_dim=16, attention_pool=False,
                        emb_channels=32)
    with torch.no_grad():
        for p in list(tok.parameters()) + list(unet.parameters()):
            p.normal_(0.0, 0.3)
    return tok, unet


def _features(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, P // s, P // s, generator=g) for c, s in zip(CH, (2, 4, 8))]


def _predict(tok: PortraitTokenizer, unet: TriplaneUNet, feats: list[torch.Tensor]) -> torch.Tensor:
    x = torch.randn(2, 4, 8, 24, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), dict(zip((8, 4, 2), tok(feats))))


@pytest.mark.parametrize("mode", CONDITION_MODES)
def test_each_condition_builds_and_its_prediction_depends_on_the_portrait(mode):
    tok, unet = _model(mode)
    a, b = _predict(tok, unet, _features(1)), _predict(tok, unet, _features(2))
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() > 1e-3 * a.abs().max()
    tokens = tok(_features(1))
    assert len(tokens) == 3  # one token set per cross-attention resolution
    if mode == "global":
        assert all(t.shape == (2, 1, 16) for t in tokens)
    else:
        assert all(t.shape == (2, 16, 16) for t in tokens)  # 4 x 4 patches at every scale


def test_global_token_ignores_where_a_feature_sits_the_patch_tokens_do_not():
    feats = _features(3)
    g = torch.Generator().manual_seed(0)
    shuffled = [f.flatten(2)[..., torch.randperm(f[0, 0].numel(), generator=g)].reshape(f.shape) for f in feats]
    tok, unet = _model("global")
    torch.testing.assert_close(_predict(tok, unet, feats), _predict(tok, unet, shuffled), rtol=1e-4, atol=1e-5)
    for mode in ("single_scale", "multi_scale"):
        tok, unet = _model(mode)
        assert (_predict(tok, unet, feats) - _predict(tok, unet, shuffled)).abs().max() > 1e-3


def test_single_scale_reads_only_its_scale_multi_scale_reads_all():
    feats = _features(4)
    other = _features(9)
    for scale in (0, 2):
        tok, unet = _model("single_scale", scale)
        ref = _predict(tok, unet, feats)
        for i in range(3):
            changed = [other[j] if j == i else f for j, f in enumerate(feats)]
            diff = (_predict(tok, unet, changed) - ref).abs().max()
            assert (diff > 1e-3) if i == scale else (diff == 0)
    tok, unet = _model("multi_scale")
    ref = _predict(tok, unet, feats)
    for i in range(3):
        changed = [other[j] if j == i else f for j, f in enumerate(feats)]
        assert (_predict(tok, unet, changed) - ref).abs().max() > 1e-3


def test_bad_condition_settings_are_refused():
    with pytest.raises(ConfigError, match="unknown portrait condition"):
        PortraitTokenizer(CH, (4, 2, 1), 16, P, mode="clip")
    with pytest.raises(ConfigError, match="condition scale"):
        PortraitTokenizer(CH, (4, 2, 1), 16, P, mode="single_scale", scale=3)


def _without(settings: dict, *keys: str) -> dict:
    base = {k: v for k, v in settings["base"].items() if k not in keys}
    unet = {k: v for k, v in base.pop("unet").items() if k not in keys}
    out = {**settings, "row": None, "label": None, "base": {**base, "unet": unet}}
    if "resolution" in keys:  # the triplanes the model learns are fitted at its resolution
        out.pop("triplanes")
    return out


def test_rows_add_one_factor_each_as_the_paper_says():
    cfg = load_rodinhd_config("tiny")
    s = {r: row_settings(cfg, r) for r in DIFFUSION_ROWS}
    res_keys = ("resolution", "context_resolutions", "attention_resolutions", "cross_attn_resolutions",
                "conv3d_resolutions")
    # A vs B: only the triplane resolution (and the resolution lists that follow it), B at the config's.
    assert s["A"]["base"]["resolution"] * 2 == s["B"]["base"]["resolution"] == cfg.base.resolution
    assert s["A"]["base"]["context_resolutions"] == [r // 2 for r in cfg.base.context_resolutions]
    assert _without(s["A"], *res_keys) == _without(s["B"], *res_keys)
    assert [s[r]["triplanes"]["fitted_at"] for r in "AB"] == [cfg.base.resolution // 2, cfg.base.resolution]
    # B vs C: only the noise schedule, default (linear, Ho et al.) -> the paper's optimized one.
    assert s["B"]["base"]["schedule"] == "linear" and s["C"]["base"]["schedule"] == cfg.base.schedule
    assert _without(s["B"], "schedule") == _without(s["C"], "schedule")
    # C -> D -> E: only the portrait condition, global token -> one VAE scale -> multi-scale.
    assert [s[r]["base"]["condition"] for r in "CDE"] == ["global", "single_scale", "multi_scale"]
    assert _without(s["C"], "condition") == _without(s["D"], "condition") == _without(s["E"], "condition")
    # E is the paper's full model: the config's own base section.
    assert row_config(cfg, "E").base == cfg.base
    assert len({json.dumps(v["train"]) for v in s.values()}) == 1  # the same budget for every row


MICRO = [*SMALLEST_OVERRIDES, "data.num_avatars=5", "data.held_out=2", "stage1.num_avatars=2",
         "conditioning.portrait_size=32", "ablation.diffusion.max_steps=2", "ablation.diffusion.sample_steps=2",
         "ablation.diffusion.eval_num_samples=12", "base.train.progress_bar=false", "base.train.checkpoint_every=1",
         "render.occupancy=false"]


def test_micro_ablate_diffusion_prints_five_rows_and_resumes_finished_ones(tmp_path, capsys, monkeypatch,
                                                                          triplane_dataset):
    out = tmp_path / "run"
    triplane_dataset(out / "data", 5, 32, 4, num_samples=24)
    cfg = load_rodinhd_config("tiny", MICRO)
    pipeline.fit_shared_stage(cfg, out, progress=False)
    pipeline.fit_stage(cfg, out, progress=False)
    assert cli_main(["ablate-diffusion", "--out", str(out), "--no-progress", *MICRO]) == 0
    table = capsys.readouterr().out
    lines = [x for x in table.splitlines() if x.startswith("| ") and "Model configuration" not in x]
    assert [x.split(" | ")[0][2:] for x in lines] == [r.label for r in DIFFUSION_ROWS.values()]
    assert "FID is not reported" in table
    dest = out / "ablation_diffusion"
    result = json.loads((dest / "results.json").read_text())
    assert [r["row"] for r in result["rows"]] == list("ABCDE")
    assert all(0 <= r["match"] <= 1 and r["psnr"] > 0 for r in result["rows"])
    assert all(r["x0_mse"] > 0 and abs(r["portrait_gain"]) < float("inf") for r in result["rows"])
    assert result["rows"][4]["settings"]["base"]["condition"] == "multi_scale"

    # A finished row is read back, not retrained; a row whose result is gone is redone alone.
    (dest / "seed0" / "row_E" / "result.json").unlink()
    trained = []
    real = ablation_diffusion._train_row
    monkeypatch.setattr(ablation_diffusion, "_train_row",
                        lambda c, s, *a, **k: trained.append(s["row"]) or real(c, s, *a, **k))
    again = ablate_diffusion(cfg, out, progress=False)
    assert trained == ["E"]
    assert [r["psnr"] for r in again["rows"]] == pytest.approx([r["psnr"] for r in result["rows"]])
    assert format_diffusion_table(again).count("\n| ") == 5  # five rows below the header
