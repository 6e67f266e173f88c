"""The resume signature: every setting that changes what is trained, derived from the whole config.

A run may only resume a checkpoint made under the same settings, or it silently trains a mixed model. Listing
the settings that matter invites omissions (a new key is unchecked until someone remembers it), so the
signature is the *whole* config, flattened to dotted keys, minus an explicit allow-list of keys that may
change between a checkpoint and the run resuming it: logging, progress bars, where files go, how long to train,
the device. Patterns are ``fnmatch`` globs over dotted keys (``"*.progress_bar"``, ``"eval.*"``).

Every package passes ``run_config=config_signature(cfg, allow=MAY_CHANGE)`` to the Trainer; the Trainer adds
its own :data:`TRAIN_MAY_CHANGE` rule for the loop settings and compares both on resume.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any

#: Loop settings (``TrainConfig`` fields) that may change on resume: how long, how often, where, what is shown.
TRAIN_MAY_CHANGE = ("output_dir", "max_steps", "checkpoint_every", "keep_last_checkpoints", "log_every",
                    "progress_bar", "allow_config_change")

#: Keys no package's training depends on, allowed to change everywhere.
COMMON_MAY_CHANGE = ("device", "threads", "progress", "*.progress_bar", "*.log_every", "*.checkpoint_every",
                     "*.keep_last_checkpoints", "*.max_steps", "*.output_dir", "*.allow_config_change")

_UNSET = "<unset>"


def _plain(config: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True, enum_to_str=True)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return config


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}`` (lists stay values)."""
    config = _plain(config)
    if isinstance(config, Mapping):
        out: dict[str, Any] = {}
        for k, v in config.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(config, tuple):
        config = list(config)
    return {prefix: config}


def allowed(key: str, allow: Iterable[str]) -> bool:
    """``key`` matches one of the ``allow`` patterns, or lies under one (``"eval"`` allows ``"eval.x"``)."""
    return any(fnmatchcase(key, p) or key.startswith(p + ".") for p in allow)


def config_signature(config: Any, allow: Iterable[str] = (), prefix: str = "") -> dict[str, Any]:
    """The whole ``config`` as flat dotted keys, without the keys ``allow`` (and :data:`COMMON_MAY_CHANGE`) name."""
    allow = tuple(allow) + COMMON_MAY_CHANGE
    flat = flatten(config)
    return {f"{prefix}{k}": v for k, v in sorted(flat.items()) if not allowed(k, allow)}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) or (math.isnan(a) and math.isnan(b))
    return a == b


def signature_diff(stored: Mapping[str, Any], now: Mapping[str, Any],
                   defaults: Mapping[str, Any] | None = None) -> list[str]:
    """``"key: checkpoint=X, now=Y"`` for every key whose value differs (a missing key reads ``<unset>``).

    ``defaults`` (the signature of the schema's defaults) forgives keys added to the config after the checkpoint
    was written: a key the checkpoint lacks that now holds its default value is no difference (the default is
    what the code did before the key existed). Any other value of such a key still is.
    """
    defaults = defaults or {}
    keys = sorted(set(stored) | set(now))
    return [f"{k}: checkpoint={stored.get(k, _UNSET)!r}, now={now.get(k, _UNSET)!r}"
            for k in keys if not _same(stored.get(k, _UNSET), now.get(k, _UNSET))
            and not (k not in stored and k in now and k in defaults and _same(now[k], defaults[k]))]
