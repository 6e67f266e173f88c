from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from omegaconf import MISSING

from avatar_core.config import config_diff, config_to_dict, load_config, save_config
from avatar_core.errors import ConfigError, MissingFileError


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass
class RunConfig:
    name: str = MISSING
    steps: int = 10
    optim: OptimConfig = field(default_factory=OptimConfig)


def test_files_then_overrides_in_order(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("name: base\nsteps: 5\noptim:\n  lr: 0.5\n")
    cfg = load_config(RunConfig, f, ["optim.lr=2e-4", "steps=7"])
    assert (cfg.name, cfg.steps, cfg.optim.lr, tuple(cfg.optim.betas)) == ("base", 7, 2e-4, (0.9, 0.99))
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    "override, named, suggested",
    [("optim.lrr=1", "optim.lrr", "optim.lr"), ("stesp=3", "stesp", "steps"), ("optim.beta=[1,2]", "optim.beta", "optim.betas")],
)
def test_unknown_key_names_it_and_the_nearest(override, named, suggested):
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, overrides=["name=x", override])
    assert f"'{named}'" in str(err.value) and f"'{suggested}'" in str(err.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\noptim:\n  lrate: 1\n")
    with pytest.raises(ConfigError, match="optim.lrate.*bad.yaml"):
        load_config(RunConfig, f)


def test_bad_type_missing_value_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="steps"):
        load_config(RunConfig, overrides=["name=x", "steps=many"])
    with pytest.raises(ConfigError, match="not set: name"):
        load_config(RunConfig)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(RunConfig, overrides=["name"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\n  steps: [1\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(RunConfig, broken)
    with pytest.raises(MissingFileError):
        load_config(RunConfig, tmp_path / "absent.yaml")


def test_save_load_round_trip_and_diff(tmp_path):
    cfg = load_config(RunConfig, overrides=["name=run", "optim.lr=0.25"])
    path = save_config(cfg, tmp_path / "cfg.yaml")
    again = load_config(RunConfig, path)
    assert config_to_dict(again) == config_to_dict(cfg)
    other = load_config(RunConfig, path, ["steps=11"])
    assert config_diff(cfg, other) == {"steps": (10, 11)}
    assert config_diff(cfg, other, ignore=["steps"]) == {}
