"""The paper's networks or named stand-ins, chosen by the config and recorded by every run.

A method names each pretrained part it needs as a :class:`Component`: the paper's network (a :class:`Requirement`:
a config key holding a local folder or file, checked against :mod:`avatar_core.pretrained`'s registry or a list of
files) and the embedded :class:`StandIn` that can replace it (the small portrait VAE, the SSIM perceptual term, a
random-feature network, MiniLM for CLIP). :func:`resolve` decides, before any work:

* the key is set: its files must be there (a missing file is an error, never a silent fallback);
* the key is empty: the stand-in is used only if the config lists it under ``standins``; a paper config lists none,
  so it fails, naming every file it needs and where they are looked for -- all missing parts in one error.

The returned :class:`StandInRecord` goes into the run's settings file (:meth:`StandInRecord.settings`) and is logged
once per process. Environment variables that change a run are recorded the same way (:meth:`StandInRecord.env`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from avatar_core.errors import ConfigError, MissingWeightsError
from avatar_core.pretrained.registry import expand_path, expected_files, find_model_dir, model_spec

log = logging.getLogger(__name__)

__all__ = ["Component", "Requirement", "StandIn", "StandInRecord", "registry_source", "resolve"]

_LOGGED: set[tuple[str, ...]] = set()


@dataclass(frozen=True)
class Requirement:
    """The paper's network: what it is, the config key that points at it and what must be there.

    ``kind``: a pretrained-registry kind (a model folder, checked by :func:`find_model_dir`); else ``check``: a
    function of the path giving a problem sentence or None; else ``directory``: a non-empty folder; else ``files``:
    names inside the configured folder (empty: the configured path is itself the one file).
    """

    what: str
    config_key: str
    path: str | os.PathLike | None
    kind: str | None = None
    files: tuple[str, ...] = ()
    source: str = ""  # where the files come from (download hint)
    directory: bool = False
    check: Callable[[str | os.PathLike], str | None] | None = None

    def needed(self) -> str:
        if self.kind is not None:
            return " + ".join(g[0] for g in expected_files(self.kind))
        if self.directory:
            return "a folder of files"
        return " + ".join(self.files) if self.files else "one file"

    def problem(self) -> str | None:
        """None when complete, else a sentence naming what is missing and where it was looked for."""
        if not self.path:
            src = f" ({self.source})" if self.source else ""
            return f"{self.what}: `{self.config_key}` is empty; it must point at {self.needed()}{src}"
        if self.kind is not None:
            try:
                find_model_dir(self.kind, self.path, config_key=self.config_key)
                return None
            except MissingWeightsError as e:
                return f"{self.what} (`{self.config_key}`): {e.message}"
        if self.check is not None:
            problem = self.check(self.path)
            return f"{self.what} (`{self.config_key}`={os.fspath(self.path)}): {problem}" if problem else None
        root = expand_path(self.path)
        if self.directory:
            if not root.is_dir() or not any(root.iterdir()):
                return f"{self.what} (`{self.config_key}`): {root} is not a folder holding files"
            return None
        targets = [root / f for f in self.files] if self.files else [root]
        missing = [str(t) for t in targets if not t.is_file()]
        if missing:
            return f"{self.what} (`{self.config_key}`={os.fspath(self.path)}): missing {', '.join(missing)}"
        return None


@dataclass(frozen=True)
class StandIn:
    """An embedded replacement for a paper network: its ``standins`` name, what it replaces, what it is."""

    name: str
    replaces: str
    description: str


@dataclass(frozen=True)
class Component:
    """A part a method needs: the paper's network and the stand-in that can replace it. ``use_standin``: the config
    chose between the two by another key (e.g. ``text.encoder: minilm``); None: an empty path chooses the stand-in."""

    requirement: Requirement
    standin: StandIn | None = None
    use_standin: bool | None = None


@dataclass
class StandInRecord:
    """What a run uses: stand-ins (name, what they replace) and the environment variables that changed it."""

    used: list[StandIn] = field(default_factory=list)
    paper: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [s.name for s in self.used]

    def uses(self, name: str) -> bool:
        return name in self.names()

    def env(self, name: str) -> str | None:
        """Read an environment variable and record its value (a run changed by it says so in its settings)."""
        value = os.environ.get(name)
        if value is not None:
            self.environment[name] = value
        return value

    def settings(self) -> dict[str, Any]:
        return {"standins": [asdict(s) for s in self.used], "paper_networks": list(self.paper),
                "environment": dict(self.environment)}

    def log_once(self, run: str = "") -> None:
        key = (run, *self.names())
        if key in _LOGGED:
            return
        _LOGGED.add(key)
        if self.used:
            log.warning("%sstand-ins in use: %s", f"{run}: " if run else "",
                        "; ".join(f"{s.name} ({s.description}) instead of {s.replaces}" for s in self.used))
        else:
            log.info("%sno stand-ins: the paper's networks are used", f"{run}: " if run else "")


def resolve(components: Sequence[Component], allowed: Sequence[str], config_key: str = "standins",
            known: Sequence[str] | None = None) -> StandInRecord:
    """Decide paper network or stand-in for each component, before any work (see the module docstring).

    ``known``: every stand-in name the method has (default: those of ``components``), for a command that resolves
    only the parts it uses. Raises :class:`MissingWeightsError` listing every missing file at once, or
    :class:`ConfigError` for a name in ``allowed`` that is not known.
    """
    known = set(known) if known is not None else {c.standin.name for c in components if c.standin is not None}
    unknown = sorted(set(allowed) - known)
    if unknown:
        raise ConfigError(f"`{config_key}` names unknown stand-ins {unknown}",
                          f"use some of {sorted(known)} (or none, to require the paper's networks)")
    record, problems = StandInRecord(), []
    for c in components:
        r = c.requirement
        wants = c.use_standin if c.use_standin is not None else not r.path
        if wants and c.standin is not None and c.standin.name in allowed:
            record.used.append(c.standin)
            continue
        if c.use_standin:
            problems.append(f"the config chooses {c.standin.description} instead of {c.standin.replaces}, but "
                            f"`{config_key}` does not list {c.standin.name!r} (add it, or configure the paper's "
                            f"network: {r.what}, `{r.config_key}`)")
            continue
        problem = r.problem()
        if problem is None:
            record.paper.append(r.what)
            continue
        if not r.path and c.standin is not None:
            problem += f" (or add {c.standin.name!r} to `{config_key}` to use {c.standin.description})"
        problems.append(problem)
    if problems:
        raise MissingWeightsError(
            f"this config needs {len(problems)} file set(s) that are not there: "
            + " | ".join(f"({i}) {p}" for i, p in enumerate(problems, 1)),
            "copy the files to this machine and set the keys named above (this toolkit never downloads weights); "
            f"a config that should run with stand-ins lists them under `{config_key}`")
    return record


def registry_source(kind: str) -> str:
    """``from <hub id>`` for a registry kind (for :attr:`Requirement.source`)."""
    spec = model_spec(kind)
    return f"from {spec.hub_id}" + (f", folder {spec.hub_subfolder}" if spec.hub_subfolder else "")


