"""The shared training loop: exact resume, gradient accumulation, checkpoint errors, EMA, metrics log."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from avatar_core.errors import ConfigError, CorruptFileError
from avatar_core.train import EMA, TrainConfig, Trainer, list_checkpoints

N_SAMPLES, BATCH = 24, 4  # 6 batches per epoch: step 10 of a run stops mid-epoch


def _dataset(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, 8, generator=g)
    y = torch.randn(N_SAMPLES, 2, generator=g)
    return TensorDataset(x, y)


def _model(dropout: float = 0.3) -> nn.Module:
    torch.manual_seed(1)  # same initial weights in every run
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 2))


def _step(model: nn.Module, batch):
    x, y = batch
    loss = nn.functional.mse_loss(model(x), y)
    return loss, {"abs_err": (model(x) - y).abs().mean()}  # second forward: draws dropout again


def _trainer(tmp_path, max_steps: int, accumulate: int = 1, dropout: float = 0.3, batch: int = BATCH,
             run_config: dict | None = None, **cfg) -> Trainer:
    settings = dict(seed=7, ema_decay=0.9, max_grad_norm=0.5, checkpoint_every=5, keep_last_checkpoints=None,
                    log_every=1, progress_bar=False) | cfg
    config = TrainConfig(output_dir=str(tmp_path), max_steps=max_steps, gradient_accumulation_steps=accumulate,
                         **settings)
    return Trainer(
        config, _model(dropout),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7),
        step_fn=_step, data=DataLoader(_dataset(), batch_size=batch, shuffle=True), run_config=run_config,
    )


def _assert_same_state(a: Trainer, b: Trainer) -> None:
    for (name, p), q in zip(a.unwrapped_model.named_parameters(), b.unwrapped_model.parameters()):
        assert torch.equal(p, q), name
    for name, s in a.ema.shadow.items():
        assert torch.equal(s, b.ema.shadow[name]), f"ema {name}"
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][key]), torch.as_tensor(sb[i][key])), f"optimizer {i}.{key}"
    assert a.lr_scheduler.state_dict() == b.lr_scheduler.state_dict()


def test_resume_is_bit_exact(tmp_path):
    """20 steps straight == 10 steps, a new Trainer, 10 more (dropout, Adam, StepLR, EMA, shuffled epochs)."""
    straight = _trainer(tmp_path / "straight", max_steps=20, keep_last_checkpoints=2)
    straight.train()
    assert [p.name for p in list_checkpoints(tmp_path / "straight")] == ["step_00000015", "step_00000020"]

    first = _trainer(tmp_path / "split", max_steps=10)
    first.train()
    resumed = _trainer(tmp_path / "split", max_steps=20)
    resumed.train(resume="auto")

    assert resumed.step == 20 and resumed.epoch == straight.epoch
    _assert_same_state(straight, resumed)
    # The run really changed the weights, and the metrics log of the resumed run matches the straight one.
    assert not torch.equal(straight.unwrapped_model[0].weight, _model()[0].weight)
    log_a = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == list(range(1, 21))
    assert [(r["loss"], r["lr"], r["metrics"]) for r in log_a] == [(r["loss"], r["lr"], r["metrics"]) for r in log_b]
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == [f"step_{s:08d}" for s in (5, 10, 15, 20)]


def test_gradient_accumulation_matches_big_batch(tmp_path):
    """k micro-batches of size B/k and one batch of size B give the same update (no dropout, same samples)."""
    big = _trainer(tmp_path / "big", max_steps=1, dropout=0.0, batch=8)
    small = _trainer(tmp_path / "small", max_steps=1, accumulate=2, dropout=0.0, batch=4)
    # Same data order: the seedable sampler yields one permutation; batch 8 = micro-batches 4 + 4.
    big.train()
    small.train()
    for p, q in zip(big.unwrapped_model.parameters(), small.unwrapped_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(big.unwrapped_model[0].weight, _model(0.0)[0].weight)


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    _trainer(tmp_path, max_steps=10).train()  # checkpoints at 5 and 10
    latest = list_checkpoints(tmp_path)[-1]
    data = (latest / "model.safetensors").read_bytes()
    (latest / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="step_00000005"):
        _trainer(tmp_path, max_steps=20).train(resume="auto")

    (latest / "model.safetensors").write_bytes(data)
    with pytest.raises(ConfigError, match=r"train\.seed: checkpoint=7, now=8") as err:
        _trainer(tmp_path, max_steps=20, run_config={"width": 64}, seed=8).train(resume="auto")
    assert "run.width: checkpoint='<unset>', now=64" in str(err.value)
    # A half-written checkpoint (no trainer_state.json) never counts as the latest one.
    (tmp_path / "checkpoints" / "step_00000099").mkdir()
    assert list_checkpoints(tmp_path)[-1] == latest
    t = _trainer(tmp_path, max_steps=11, seed=8)
    t.train(resume="auto", allow_config_change=True)
    assert t.step == 11


def test_ema_closed_form_and_swap():
    """After updates with parameters p1, p2 the shadow is d^2 p0 + d(1-d) p1 + (1-d) p2; the swap restores."""
    model = nn.Linear(3, 1)
    p0 = model.weight.detach().clone()
    ema = EMA(model, decay=0.8)
    with torch.no_grad():
        model.weight.add_(1.0)
        ema.update(model)
        model.weight.add_(2.0)
        ema.update(model)
    expected = 0.64 * p0 + 0.16 * (p0 + 1) + 0.2 * (p0 + 3)
    torch.testing.assert_close(ema.shadow["weight"], expected)
    with ema.average_parameters(model):
        torch.testing.assert_close(model.weight, expected)
    torch.testing.assert_close(model.weight, p0 + 3)


def test_fresh_run_moves_the_old_run_aside_so_resume_never_mixes_runs(tmp_path):
    """``--restart`` (resume=None): the old run's later checkpoints must not be resumed into the new run."""
    _trainer(tmp_path / "run", max_steps=10).train()  # checkpoints at 5 and 10
    new = _trainer(tmp_path / "run", max_steps=4, dropout=0.0)
    new.train()  # a fresh run; the old one is kept aside
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1 and [p.name for p in list_checkpoints(old[0])] == ["step_00000005", "step_00000010"]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000004"]
    resumed = _trainer(tmp_path / "run", max_steps=6, dropout=0.0)
    resumed.train(resume="auto")
    assert resumed.step == 6  # from the new run's step 4, not the old run's step 10
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@dataclass
class _Diffusion:
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class _Run:
    diffusion: _Diffusion = field(default_factory=_Diffusion)


def test_changed_settings_refusal_names_working_commands(tmp_path):
    from avatar_core.config import load_config

    _trainer(tmp_path, max_steps=5, run_config={"diffusion": {"prediction": "x0"}}).train()
    t = Trainer(TrainConfig(output_dir=str(tmp_path), max_steps=6, seed=7, ema_decay=0.9, max_grad_norm=0.5,
                            progress_bar=False), _model(), lambda p: torch.optim.Adam(p, lr=1e-2), _step,
                [next(iter(DataLoader(_dataset(), batch_size=BATCH)))], lambda o: torch.optim.lr_scheduler.StepLR(o, 3),
                run_config={"diffusion": {"prediction": "eps"}}, config_key="diffusion.train")
    with pytest.raises(ConfigError, match=r"run\.diffusion\.prediction: checkpoint='x0', now='eps'") as err:
        t.train(resume="auto")
    assert "--restart" in err.value.hint and "diffusion.train.allow_config_change=true" in err.value.hint

    # The override the hint names is one a CLI's key=value parser accepts, and it lets the run resume.
    cfg = load_config(_Run, overrides=["diffusion.train.allow_config_change=true"])
    assert cfg.diffusion.train.allow_config_change is True
    t.config.allow_config_change = True
    t.train(resume="auto")
    assert t.step == 6


def test_config_signature_is_the_whole_config_minus_an_allow_list():
    from avatar_core.train import config_signature

    cfg = {"seed": 1, "device": "cpu", "diffusion": {"prediction": "x0", "text_dropout": 0.1,
                                                      "train": {"max_steps": 9, "log_every": 3, "seed": 1}},
           "generate": {"steps": 50}, "eval": {"prompts": ["a"]}}
    sig = config_signature(cfg, allow=["generate", "eval.*"])
    assert sig == {"seed": 1, "diffusion.prediction": "x0", "diffusion.text_dropout": 0.1, "diffusion.train.seed": 1}


def test_models_built_by_the_trainer_are_seeded_so_runs_are_bit_identical(tmp_path):
    def run(name: str) -> dict[str, bytes]:
        torch.rand(17)  # whatever ran before in the process must not matter
        t = Trainer(TrainConfig(output_dir=str(tmp_path / name), max_steps=3, seed=5, checkpoint_every=3,
                                progress_bar=False, ema_decay=0.9), lambda: _model_unseeded(),
                    lambda p: torch.optim.Adam(p, lr=1e-2), _step, DataLoader(_dataset(), batch_size=BATCH, shuffle=True))
        t.train()
        ck = list_checkpoints(tmp_path / name)[-1]
        return {f: (ck / f).read_bytes() for f in ("model.safetensors", "ema.safetensors", "optimizer.pt")}

    assert run("a") == run("b")
    # The helper packages call themselves: same weights for one seed, and the caller's stream is not shifted.
    from avatar_core.train import seeded

    state = torch.get_rng_state()
    with seeded(3):
        a = _model_unseeded()
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)
    with seeded(3):
        b = _model_unseeded()
    with seeded(4):
        c = _model_unseeded()
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[0].weight, c[0].weight)


def _model_unseeded() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))


def test_a_setting_added_later_at_its_default_does_not_block_resume(tmp_path):
    """A key the checkpoint lacks is forgiven only when it holds the schema's default (what the code did before)."""
    _trainer(tmp_path, max_steps=5, run_config={"lr": 0.1}).train()

    def resume(run_config):
        t = _trainer(tmp_path, max_steps=6, run_config=run_config)
        t.run_defaults = {"lr": 0.1, "new_key": False}
        t.train(resume="auto")
        return t.step

    with pytest.raises(ConfigError, match=r"run\.new_key: checkpoint='<unset>', now=True"):
        resume({"lr": 0.1, "new_key": True})
    assert resume({"lr": 0.1, "new_key": False}) == 6
