"""Where a command may write its result: one rule for every command of every package.

The rule. A command that writes a result folder writes it into a *new* folder, or into an existing one only
when the user asked with ``--overwrite``; then the folder's old contents are cleared first (no stale file of
the previous result survives beside the new ones), and only when the folder is recognisably a result this
toolkit wrote: it holds the marker file :data:`MARKER`, written by :func:`prepare_result_dir`. The inputs of a
command are read-only to it: the output may not be an input, lie inside one, or contain one.

Every argument is checked before anything is written (:func:`check_writable`), so a bad path never leaves a
half-made folder behind.

Result names. :func:`result_name` names a result by its prompt (a readable slug), its seed and a short hash of
the *full* prompt and the settings, so two long prompts with the same start, or prompts without letters, never
share a folder.

Usage in a package::

    from avatar_core.results import prepare_result_dir, result_name

    out = out_dir or run / "avatars" / result_name(prompt, seed, {"sampler": s, "steps": n})
    check_result_dir(out, kind="tera.avatar", overwrite=overwrite, inputs=[source])  # before the heavy work
    ...
    prepare_result_dir(out, kind="tera.avatar", overwrite=overwrite, inputs=[source])  # then write into out
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from avatar_core.errors import InputError
from avatar_core.io.tensors import save_json

#: The file that marks a folder as a result written by this toolkit (JSON: kind, time, tool version).
MARKER = ".avatar-result.json"

PathLike = str | os.PathLike


class ResultExistsError(InputError):
    """The output already holds a result and ``--overwrite`` was not given."""


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------


def slug(text: str, n: int = 40, empty: str = "avatar") -> str:
    """Lower-case ASCII letters and digits joined by ``_``, at most ``n`` characters (``empty`` if none)."""
    s = re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")
    return s[:n].rstrip("_") or empty


def short_hash(obj: Any, n: int = 8) -> str:
    """The first ``n`` hex digits of the SHA-256 of ``obj`` as canonical JSON (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def result_name(prompt: str, seed: int, settings: Mapping[str, Any] | None = None, n: int = 40,
                empty: str = "avatar") -> str:
    """``<slug of the prompt>_s<seed>_<hash>``: unique per (full prompt, seed, settings).

    The slug keeps the name readable; the hash of the full prompt and of ``settings`` (anything that changes
    the result: sampler, steps, guidance, ...) keeps it unique, also for prompts without letters.
    """
    digest = short_hash({"prompt": str(prompt), "seed": int(seed), "settings": dict(settings or {})})
    return f"{slug(prompt, n, empty)}_s{int(seed)}_{digest}"


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _abs(path: PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def check_writable(path: PathLike, what: str = "--out") -> Path:
    """Raise a one-line :class:`InputError` unless ``path`` can be (or already is) a folder we can write.

    Refused: ``path`` is a file, a folder on its way is a file, or the nearest existing folder is not
    writable. Nothing is created.
    """
    p = _abs(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{what} {path} is a file, not a folder", f"choose a folder path for {what}")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{what} {path} lies under {probe}, which is a file", f"choose a folder path for {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "is" if probe == p else f"would be created in {probe}, which is"
        raise InputError(f"{what} {path} {where} not writable", f"choose a folder you can write for {what}")
    return p


def _within(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it (both absolute, symlinks resolved)."""
    return a == b or b in a.parents


def check_not_input(out: PathLike, inputs: Iterable[PathLike | None], what: str = "--out") -> None:
    """Refuse an output that is an input, lies inside an input's folder, or contains an input.

    An input that is a file counts as its folder (writing beside a source avatar file rewrites that avatar).
    """
    o = Path(os.path.realpath(_abs(out)))
    for inp in inputs:
        if inp is None:
            continue
        i = Path(os.path.realpath(_abs(inp)))
        folder = i.parent if i.is_file() else i
        if _within(o, folder):
            where = "is the folder of" if o == folder else "is inside"
            raise InputError(f"{what} {out} {where} the input {inp}, which this command only reads",
                             f"choose a {what} outside {folder}")
        if _within(i, o):
            raise InputError(f"{what} {out} contains the input {inp}; overwriting it would delete that input",
                             f"choose a {what} that does not hold {inp}")


def read_marker(path: PathLike) -> dict[str, Any] | None:
    """The marker of a result folder, or None when ``path`` holds none (or an unreadable one)."""
    f = Path(path) / MARKER
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("kind"), str) else None


def is_result_dir(path: PathLike, kind: str | None = None) -> bool:
    """``path`` holds this toolkit's marker (of ``kind``, when given)."""
    marker = read_marker(path)
    return marker is not None and (kind is None or marker["kind"] == kind)


def check_result_dir(out: PathLike, kind: str, overwrite: bool = False, inputs: Iterable[PathLike | None] = (),
                     what: str = "--out", recognise: Callable[[Path], bool] | None = None) -> Path:
    """Every check of :func:`prepare_result_dir`, writing nothing: call it before the command's work.

    ``recognise(folder)`` may accept a folder of ``kind`` written before markers existed (e.g. by its
    format tag); a folder neither marked nor recognised is never cleared.
    """
    p = check_writable(out, what)
    check_not_input(p, inputs, what)
    if not p.is_dir() or not any(p.iterdir()):
        return p
    if not overwrite:
        raise ResultExistsError(f"{out} already holds a result", f"add --overwrite to replace it, or choose another {what}")
    marker = read_marker(p)
    if marker is None and not (recognise is not None and recognise(p)):
        raise InputError(f"{out} is not a folder this toolkit wrote (no {MARKER}), so --overwrite will not clear it",
                         f"choose another {what}, or empty that folder yourself")
    if marker is not None and marker["kind"] != kind:
        raise InputError(f"{out} holds a {marker['kind']} result, not a {kind}; --overwrite only replaces a result "
                         "of the same kind", f"choose another {what}")
    return p


def prepare_result_dir(out: PathLike, kind: str, overwrite: bool = False, inputs: Iterable[PathLike | None] = (),
                       what: str = "--out", recognise: Callable[[Path], bool] | None = None,
                       info: Mapping[str, Any] | None = None) -> Path:
    """Make ``out`` an empty, marked result folder of ``kind`` (the module's rule); returns it.

    A new or empty folder is created; an existing result is cleared only with ``overwrite`` and only when
    it is marked (or ``recognise`` accepts it) and of the same kind. Raises :class:`ResultExistsError` or
    :class:`InputError` otherwise, before touching anything.
    """
    inputs = list(inputs)
    p = check_result_dir(out, kind, overwrite, inputs, what, recognise)
    if p.is_dir():
        clear_folder(p)
    p.mkdir(parents=True, exist_ok=True)
    write_marker(p, kind, info)
    return p


def write_marker(folder: PathLike, kind: str, info: Mapping[str, Any] | None = None) -> Path:
    from avatar_core import __version__

    return save_json(Path(folder) / MARKER, {"kind": kind, "time": time.time(), "avatar_core": __version__,
                                             **dict(info or {})})


def clear_folder(folder: PathLike) -> None:
    """Delete everything inside ``folder`` (links are removed, never followed), keeping the folder."""
    for child in Path(folder).iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def check_result_file(path: PathLike, overwrite: bool = False, inputs: Iterable[PathLike | None] = (),
                      what: str = "--out") -> Path:
    """A single output file (a video, a PLY): its folder must be writable and not an input; an existing
    file is replaced only with ``overwrite``. Writes nothing."""
    p = _abs(path)
    if p.is_dir():
        raise InputError(f"{what} {path} is a folder; this command writes one file", f"give a file name for {what}")
    check_writable(p.parent, what)
    check_not_input(p, inputs, what)
    if p.exists() and not overwrite:
        raise ResultExistsError(f"{path} already exists", f"add --overwrite to replace it, or choose another {what}")
    return p
