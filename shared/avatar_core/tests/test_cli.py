"""The console scripts' shared plumbing: --config by name or path, key=value overrides anywhere on the line."""

from __future__ import annotations

import pytest

from avatar_core.cli import add_config_arguments, check_overrides, make_parser, package_config_dir, resolve_config
from avatar_core.config import to_settings
from avatar_core.env import resolve_device
from avatar_core.errors import ConfigError, InputError, MissingFileError


def _parser():
    parser, sub = make_parser("demo", "a test script", "0")
    p = sub.add_parser("edit")
    p.add_argument("avatar")
    p.add_argument("prompt")
    p.add_argument("--region")
    p.add_argument("--seed", type=int)
    add_config_arguments(p)
    q = sub.add_parser("train")
    q.add_argument("--restart", action="store_true")
    add_config_arguments(q)
    return parser


@pytest.mark.parametrize("argv", [
    ["edit", "a.safetensors", "a red dress", "--region", "shoes", "seed=1", "x.y=2"],
    ["edit", "seed=1", "a.safetensors", "--region", "shoes", "a red dress", "x.y=2"],
    ["edit", "--region", "shoes", "seed=1", "a.safetensors", "x.y=2", "a red dress"],
])
def test_overrides_anywhere_on_the_line(argv):
    args = _parser().parse_args(argv)
    assert (args.avatar, args.prompt, args.region) == ("a.safetensors", "a red dress", "shoes")
    assert args.overrides == ["seed=1", "x.y=2"] and args.config == "tiny"


def test_flags_and_option_values_are_not_overrides():
    args = _parser().parse_args(["train", "a=1", "--restart", "--config", "paper", "b.c=x=y"])
    assert args.restart and args.config == "paper" and args.overrides == ["a=1", "b.c=x=y"]
    assert check_overrides(args.overrides) == ["a=1", "b.c=x=y"]
    with pytest.raises(InputError, match="'oops'"):
        check_overrides(["a=1", "oops"])


def test_resolve_config_by_name_or_path(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tiny.yaml").write_text("a: 1\n")
    (configs / "paper.yaml").write_text("a: 2\n")
    own = tmp_path / "mine.yaml"
    own.write_text("a: 3\n")
    assert resolve_config("paper", configs) == configs / "paper.yaml"
    assert resolve_config("paper.yaml", configs) == configs / "paper.yaml"
    assert resolve_config(None, configs) == resolve_config("", configs) == configs / "tiny.yaml"
    assert resolve_config(own, configs) == own
    with pytest.raises(MissingFileError, match="paper, tiny"):
        resolve_config("huge", configs)
    with pytest.raises(MissingFileError):
        resolve_config("elsewhere/paper.yaml", configs)  # a path is a path, not a shipped name


def test_package_config_dir_inside_a_wheel_and_beside_src(tmp_path):
    wheel = tmp_path / "site" / "pkg"
    (wheel / "configs").mkdir(parents=True)
    assert package_config_dir(wheel / "config.py") == wheel / "configs"
    checkout = tmp_path / "packages" / "pkg"
    (checkout / "src" / "pkg").mkdir(parents=True)
    (checkout / "configs").mkdir()
    assert package_config_dir(checkout / "src" / "pkg" / "config.py") == checkout / "configs"


def test_resolve_device_and_to_settings():
    import torch
    from omegaconf import OmegaConf

    from avatar_core.train import TrainConfig

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu0")
    section = OmegaConf.structured(TrainConfig(max_steps=7))
    settings = to_settings(section)
    assert isinstance(settings, TrainConfig) and settings.max_steps == 7
    assert to_settings(settings) is settings
