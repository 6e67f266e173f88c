"""One run per folder: a second training into a live run's folder is refused; a killed run's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from avatar_core.train import RunLockedError, TrainConfig, Trainer, list_checkpoints, move_aside, run_lock
from avatar_core.train.lock import LOCK_FILE, holds_lock, lock_owner

# A child process that trains into a folder slowly (a file says when it holds the folder).
CHILD = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from torch import nn
    from avatar_core.train import TrainConfig, Trainer
    out, started = Path(sys.argv[1]), Path(sys.argv[2])
    data = [(torch.ones(2, 3), torch.zeros(2, 1))]
    def step(m, batch):
        started.touch()
        time.sleep(0.1)
        return nn.functional.mse_loss(m(batch[0]), batch[1]), {}
    cfg = TrainConfig(output_dir=str(out), max_steps=600, checkpoint_every=1, log_every=1, progress_bar=False)
    Trainer(cfg, lambda: nn.Linear(3, 1), lambda p: torch.optim.SGD(p, lr=0.1), step, data).train()
""")


def _trainer(out, max_steps: int) -> Trainer:
    data = [(torch.ones(2, 3), torch.zeros(2, 1))]
    cfg = TrainConfig(output_dir=str(out), max_steps=max_steps, checkpoint_every=1, log_every=1, progress_bar=False)
    return Trainer(cfg, lambda: nn.Linear(3, 1), lambda p: torch.optim.SGD(p, lr=0.1),
                   lambda m, b: (nn.functional.mse_loss(m(b[0]), b[1]), {}), data)


@pytest.mark.slow
def test_second_training_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path):
    out, started = tmp_path / "run", tmp_path / "started"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(started)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not started.exists():
            assert child.poll() is None, child.stdout.read().decode()
            assert time.time() < deadline, "the child never started training"
            time.sleep(0.1)
        with pytest.raises(RunLockedError, match=rf"in use by another run \(pid {child.pid} on ") as err:
            _trainer(out, max_steps=3).train(resume="auto")
        assert str(LOCK_FILE) in str(err.value)  # the hint names the file to delete if the run is dead
        assert child.poll() is None  # the first run goes on untouched
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert lock_owner(out)["pid"] == child.pid  # kill -9: the lock file stays behind ...
    ckpts = list_checkpoints(out)
    t = _trainer(out, max_steps=(int(ckpts[-1].name[5:]) if ckpts else 0) + 2)
    t.train(resume="auto")  # ... and is recognised as stale
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, t.step + 1))  # every step logged once
    assert not (out / LOCK_FILE).exists()  # released when the run ended


def test_lock_is_reentrant_released_on_error_and_judges_owners(tmp_path):
    with run_lock(tmp_path / "a"):
        with run_lock(tmp_path / "a"):  # the package holds it for its command, the Trainer again inside
            assert holds_lock(tmp_path / "a")
        assert (tmp_path / "a" / LOCK_FILE).exists()
    assert not (tmp_path / "a" / LOCK_FILE).exists()
    with pytest.raises(ZeroDivisionError):
        with run_lock(tmp_path / "b"):
            raise ZeroDivisionError
    assert not (tmp_path / "b" / LOCK_FILE).exists() and not holds_lock(tmp_path / "b")

    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cases = [({"pid": dead.pid, "host": host}, True),  # process gone
             ({"pid": os.getppid(), "host": host, "start": "1"}, True),  # pid alive but reused by another process
             ({"pid": os.getppid(), "host": host}, False),  # a live process
             ({"pid": 1, "host": host + "-elsewhere"}, False)]  # another machine: cannot tell, refuse
    for owner, stale in cases:
        d = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / LOCK_FILE).write_text(json.dumps({**owner, "time": time.time(), "argv": ["train"]}))
        if stale:
            with run_lock(d):
                assert lock_owner(d)["pid"] == os.getpid()
        else:
            with pytest.raises(RunLockedError, match="in use by another run"):
                with run_lock(d):
                    pass
            assert lock_owner(d)["pid"] == owner["pid"]  # a live run's lock is left alone


def test_move_aside_keeps_the_old_run_and_refuses_a_live_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("old\n")
    old = move_aside(run)
    assert old.name.startswith("run.old-") and (old / "metrics.jsonl").read_text() == "old\n"
    assert run.is_dir() and not any(run.iterdir())
    assert move_aside(run) is None  # nothing to move
    (run / "x").write_text("1")
    (run / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(RunLockedError):
        move_aside(run)
    assert (run / "x").is_file()
