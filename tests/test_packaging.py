"""The monorepo's promises about installation and console scripts."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["tera", "gaussianip", "rodinhd", "gas"]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("name", PACKAGES)
def test_kernel_dependency_points_into_this_repository(name):
    reqs = [Requirement(r) for r in metadata.requires(name) or []]
    (kernel,) = [r for r in reqs if r.name == "avatar-core"]
    assert kernel.url is not None and kernel.url.startswith("file://")
    assert Path(kernel.url.removeprefix("file://")).resolve() == ROOT / "shared" / "avatar_core"


@pytest.mark.parametrize("name", PACKAGES + ["avatar-core"])
def test_console_scripts_answer_help_and_info(name):
    exe = BIN / name
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "info" in out
    info = subprocess.run([exe, "info"], capture_output=True, text=True, check=True).stdout
    assert "device" in info and "rendering" in info and "body models" in info


def test_unknown_command_fails_cleanly():
    proc = subprocess.run([BIN / "rodinhd", "no-such-command"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", PACKAGES)
def test_package_installs_alone_from_another_directory(tmp_path, name):
    """`pip install -e packages/NAME` in a new environment, run from outside the repository.

    The new environment sees this one's site-packages through a .pth file, so third-party dependencies count as
    installed and nothing is downloaded; the kernel, a direct path dependency, is built into the new environment.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    new_site = next((venv / "lib").glob("python3*/site-packages"))
    (new_site / "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    target = ROOT / "packages" / name
    proc = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "--no-build-isolation", "--no-index", "-e", str(target)],
        cwd=tmp_path, capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = sorted(p.name for p in new_site.iterdir())
    assert any(n.startswith(name) for n in installed), installed
    assert any(n.startswith("avatar_core") for n in installed), installed
    run = subprocess.run([venv / "bin" / name, "info"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0 and f"{name} 0.1.0" in run.stdout, run.stderr
