"""One run per folder: a lock file held for the run's life, stale locks of killed processes detected.

``<folder>/.run.lock`` holds the owner's pid, host name, process start time and command line. It is created
atomically with its content (written to a temporary file, then hard-linked into place, which fails if the
lock exists), so a reader never sees a half-written lock. A lock whose owner is gone is *stale* and taken
over: on the same host the pid is not running, or is running but started at another time (the pid was
reused). A lock from another host cannot be checked and is refused; the error says which file to delete.

The lock is re-entrant within a process: a package takes it for its whole command (``with run_lock(dir):``)
and the :class:`~avatar_core.train.Trainer` inside takes it again for free.

:func:`move_aside` implements ``--restart``: the old run folder is renamed to ``<folder>.old-<UTC time>``
(kept, not deleted) and a new empty folder takes its place, under the lock.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from avatar_core.errors import InputError

LOCK_FILE = ".run.lock"

_held: dict[str, int] = {}  # resolved lock path -> nesting depth, for this process


class RunLockedError(InputError):
    """Another live process is writing into the same run folder."""


def _proc_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the name in parentheses may hold spaces


def pid_alive(pid: int) -> bool:
    """A process with this pid exists on this host (one owned by another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
            "time": time.time(), "argv": sys.argv}


def lock_owner(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The owner recorded in ``folder``'s lock, or None when unlocked; ``{}`` for an unreadable lock."""
    path = Path(folder) / LOCK_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_stale(owner: dict[str, Any]) -> bool:
    """The lock's process is gone (same host only; another host's lock is never judged stale)."""
    if owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return True
    start = owner.get("start")
    return start is not None and _proc_start(pid) not in (None, start)


def _describe(owner: dict[str, Any]) -> str:
    cmd = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(owner.get("argv") or []))
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["time"])) if "time" in owner else "?"
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {since}" + (f": {cmd}" if cmd else "")


def _create(path: Path) -> bool:
    """Create the lock file with our owner record, atomically; False if it already exists."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_owner(), f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create, then the content
            try:
                fd2 = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd2, "w", encoding="utf-8") as f:
                f.write(Path(tmp).read_text(encoding="utf-8"))
        return True
    finally:
        os.unlink(tmp)


def acquire(folder: str | os.PathLike) -> Path:
    """Take ``folder``'s lock (creating the folder), or raise :class:`RunLockedError`; returns the lock path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    key = os.path.realpath(path)
    if _held.get(key):
        _held[key] += 1
        return path
    for _ in range(3):
        if _create(path):
            _held[key] = 1
            return path
        owner = lock_owner(folder)
        if owner is None:
            continue  # released in between
        if owner == {} and time.time() - _mtime(path) < 10:
            time.sleep(0.2)  # a lock being written by the fallback path; look again
            continue
        if owner == {} or is_stale(owner):
            path.unlink(missing_ok=True)  # the owner was killed: take the lock over
            continue
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            _held[key] = 1  # ours, taken through another path spelling
            return path
        raise RunLockedError(f"{folder} is in use by another run ({_describe(owner)})",
                             f"wait for it to finish, or use another output folder; if no such run is alive, "
                             f"delete {path}")
    raise RunLockedError(f"could not take the lock {path}", "retry; another run keeps taking it")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def release(folder: str | os.PathLike) -> None:
    """Give back one level of the lock; the file goes when the outermost holder releases it."""
    path = Path(folder) / LOCK_FILE
    key = os.path.realpath(path)
    depth = _held.get(key, 0)
    if depth > 1:
        _held[key] = depth - 1
        return
    _held.pop(key, None)
    owner = lock_owner(folder)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def is_main_process() -> bool:
    """This is the main process of a launch (``accelerate launch`` / ``torchrun`` set ``RANK``), or the only one."""
    return int(os.environ.get("RANK", "0") or 0) == 0


@contextmanager
def run_lock(folder: str | os.PathLike, main_process_only: bool = True) -> Iterator[Path | None]:
    """Hold ``folder``'s run lock inside the block (re-entrant); released on exit, also on an error.

    Under a multi-process launch only the main process takes it (the others write nothing there): the
    block runs on every process, and yields None where no lock was taken.
    """
    if main_process_only and not is_main_process():
        yield None
        return
    path = acquire(folder)
    try:
        yield path
    finally:
        release(folder)


def holds_lock(folder: str | os.PathLike) -> bool:
    return bool(_held.get(os.path.realpath(Path(folder) / LOCK_FILE)))


def move_aside(folder: str | os.PathLike) -> Path | None:
    """``--restart``: rename ``folder`` to ``<folder>.old-<UTC time>`` and leave a new empty one, locked.

    Returns where the old run went (None when there was nothing to move). Refuses, like :func:`acquire`,
    when another live run holds the folder. The caller's lock (if any) carries over to the new folder.
    """
    folder = Path(folder)
    if not folder.is_dir() or not any(p.name != LOCK_FILE for p in folder.iterdir()):
        return None
    with run_lock(folder):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        old = folder.with_name(f"{folder.name}.old-{stamp}")
        k = 1
        while old.exists():
            k += 1
            old = folder.with_name(f"{folder.name}.old-{stamp}-{k}")
        os.replace(folder, old)
        folder.mkdir()
        if not _create(folder / LOCK_FILE):
            raise RunLockedError(f"another run took {folder} while the old run was being moved to {old}",
                                 "wait for it to finish, or use another output folder")
        (old / LOCK_FILE).unlink(missing_ok=True)
    return old
