"""Structured configs: dataclass schemas, YAML files and ``key=value`` overrides through OmegaConf.

A method describes its settings as (nested) dataclasses; :func:`load_config` merges, in order, the schema's
defaults, YAML files and command-line overrides, and type-checks the result. A key that the schema does not
have is an error naming the key and the nearest valid ones, so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from avatar_core.errors import ConfigError, MissingFileError

T = TypeVar("T")

__all__ = [
    "load_config",
    "merge_overrides",
    "save_config",
    "config_to_dict",
    "config_diff",
    "missing_keys",
    "to_settings",
]


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every key in a config tree (for suggestions)."""
    keys: list[str] = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            path = f"{prefix}{k}"
            keys.append(path)
            try:
                child = node._get_node(k)
            except Exception:  # pragma: no cover - defensive
                continue
            if isinstance(child, DictConfig):
                keys.extend(_all_keys(child, path + "."))
    return keys


def _suggest(bad_key: str, cfg: DictConfig) -> str:
    """A sentence naming the closest valid keys to ``bad_key``."""
    valid = _all_keys(cfg)
    parent, _, leaf = bad_key.rpartition(".")
    siblings = [k for k in valid if k.rpartition(".")[0] == parent]
    by_leaf = {k.rpartition(".")[2]: k for k in siblings}
    close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.5)]
    close += [k for k in difflib.get_close_matches(bad_key, valid, n=3, cutoff=0.6) if k not in close]
    if close:
        return "did you mean " + " or ".join(f"'{c}'" for c in close[:3]) + "?"
    return "valid keys here: " + ", ".join(sorted(siblings)[:20])


def _full_key(err: oc_errors.OmegaConfBaseException, fallback: str = "") -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or fallback
    return str(key)


def _structured(schema: type[T] | T) -> DictConfig:
    if isinstance(schema, DictConfig):
        return schema
    if not (dataclasses.is_dataclass(schema)):
        raise TypeError(f"config schema must be a dataclass or DictConfig, got {type(schema).__name__}")
    return OmegaConf.structured(schema)


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except oc_errors.ConfigKeyError as err:
        key = _full_key(err)
        raise ConfigError(
            f"unknown config key '{key}' in {source}",
            hint=f"{_suggest(key, base)} Fix or remove the key.",
        ) from None
    except (oc_errors.ValidationError, oc_errors.ConfigTypeError) as err:
        key = _full_key(err)
        raise ConfigError(
            f"bad value for config key '{key}' in {source}: {str(getattr(err, 'msg', err)).splitlines()[0]}",
            hint="Give a value of the type the key expects (see the config's defaults).",
        ) from None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise MissingFileError(
            f"config file not found: {path}",
            hint="Check the path; each package ships its configs in packages/NAME/configs/ (tiny.yaml, paper.yaml).",
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(err, 'problem', err)}",
                          hint="Fix the YAML syntax (indentation, a missing ':' or quote).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}",
                          hint="Write the file as 'key: value' lines.")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form key=value",
                          hint="Write overrides as dotted.key=value, e.g. train.lr=1e-4.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def merge_overrides(cfg: DictConfig, overrides: Iterable[str]) -> DictConfig:
    """Apply ``dotted.key=value`` strings (values parsed as YAML) to a structured config."""
    for item in overrides:
        key, value = _parse_override(item)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        cfg = _merge(cfg, nested, source=f"override '{item}'")
    return cfg


def missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys whose value is still the mandatory marker ``???``."""
    out: list[str] = []
    for k in cfg.keys():
        if OmegaConf.is_missing(cfg, k):
            out.append(f"{prefix}{k}")
            continue
        child = cfg._get_node(k)
        if isinstance(child, DictConfig):
            out.extend(missing_keys(child, f"{prefix}{k}."))
    return out


def load_config(
    schema: type[T] | T | DictConfig,
    files: str | Path | Sequence[str | Path] | None = None,
    overrides: Sequence[str] = (),
    require_complete: bool = True,
) -> T:
    """Build a typed config: ``schema`` defaults <- YAML ``files`` (in order) <- ``key=value`` overrides.

    Returns an OmegaConf ``DictConfig`` that behaves like the dataclass (attribute access, type-checked
    assignment). With ``require_complete`` every ``???`` value must have been filled.
    """
    cfg = _structured(schema)
    if files is not None:
        for f in [files] if isinstance(files, (str, Path)) else files:
            path = Path(f)
            cfg = _merge(cfg, _read_yaml(path), source=str(path))
    cfg = merge_overrides(cfg, overrides)
    if require_complete:
        missing = missing_keys(cfg)
        if missing:
            raise ConfigError(
                "config values are required but not set: " + ", ".join(missing),
                hint="Set them in a YAML file or on the command line as key=value.",
            )
    return cfg  # type: ignore[return-value]


def config_to_dict(cfg: Any) -> dict:
    """A plain, JSON-serialisable dict of a config (DictConfig, dataclass instance or dict)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return config_to_dict(OmegaConf.structured(cfg))
    if isinstance(cfg, dict):
        return cfg
    raise TypeError(f"not a config: {type(cfg).__name__}")


def to_settings(cfg: Any) -> Any:
    """A config section as an instance of its dataclass (what a module's functions take), e.g.
    ``fit(to_settings(cfg.stage1))``; a dataclass instance is returned as it is."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_object(cfg)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return cfg
    raise TypeError(f"not a structured config section: {type(cfg).__name__}")


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write a config as YAML (atomically), so a run can be reproduced with ``--config`` on that file."""
    from avatar_core.io.tensors import atomic_write

    path = Path(path)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def config_diff(a: Any, b: Any, ignore: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two configs: ``{dotted_key: (a_value, b_value)}``."""
    ignore = set(ignore)

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(flat(v, key + "."))
            else:
                out[key] = v
        return out

    fa, fb = flat(config_to_dict(a)), flat(config_to_dict(b))
    diff = {}
    for key in sorted(set(fa) | set(fb)):
        if key in ignore or any(key.startswith(p + ".") for p in ignore):
            continue
        if fa.get(key, "<absent>") != fb.get(key, "<absent>"):
            diff[key] = (fa.get(key, "<absent>"), fb.get(key, "<absent>"))
    return diff
