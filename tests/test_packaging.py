"""The monorepo's promises about installation and console scripts."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's vendored copy of the same parser
    from pip._vendor import tomli as tomllib

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


#: Import names whose distribution is named differently (or is absent here, so the parent env cannot tell).
IMPORT_TO_DIST = {"PIL": "pillow", "yaml": "pyyaml", "cv2": "opencv-python", "skimage": "scikit-image",
                  "insightface": "insightface", "onnxruntime": "onnxruntime", "sklearn": "scikit-learn"}
#: Build tools the isolated install needs besides the package's own requirements (--no-build-isolation).
BUILD_TOOLS = ["pip", "hatchling", "editables"]


def _pyproject(name: str) -> dict:
    path = ROOT / ("shared/avatar_core" if name == "avatar-core" else f"packages/{name}") / "pyproject.toml"
    return tomllib.loads(path.read_text())


def _declared(name: str) -> set[str]:
    """Distributions the package's pyproject declares (dependencies and every optional extra), normalised."""
    project = _pyproject(name)["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {canonicalize_name(Requirement(r.replace("{root:parent:parent:uri}", "file:///x")).name) for r in reqs}


def _source(name: str) -> Path:
    return ROOT / ("shared/avatar_core/src/avatar_core" if name == "avatar-core" else f"packages/{name}/src/{name}")


def _imported_distributions(name: str) -> dict[str, str]:
    """``import name -> distribution`` for every third-party module the package's source imports anywhere."""
    own = {"avatar_core", name.replace("-", "_")}
    mods: set[str] = set()
    for f in _source(name).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    dists = metadata.packages_distributions()
    out = {}
    for m in sorted(mods - set(sys.stdlib_module_names) - own):
        out[m] = canonicalize_name(IMPORT_TO_DIST.get(m) or (dists.get(m) or [m])[0])
    return out


@pytest.mark.parametrize("name", PACKAGES + ["avatar-core"])
def test_every_import_is_declared(name):
    """A package declares every third-party distribution its code imports (directly; an optional extra counts),
    so installing it alone never depends on what another package happened to pull in."""
    if not _source(name).is_dir():
        pytest.skip(f"{name} has no source yet")
    declared = _declared(name)
    missing = {m: d for m, d in _imported_distributions(name).items() if d not in declared}
    assert not missing, f"{name} imports {missing} but its pyproject.toml does not declare them"


def _requirement_closure(names: list[str]) -> list[metadata.Distribution]:
    """The installed distributions ``names`` need, transitively (markers evaluated, requested extras followed)."""
    todo = [Requirement(n) for n in names]
    seen: dict[str, metadata.Distribution] = {}
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        if key in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement not installed here: pip's check below reports a missing required one
        seen[key] = dist
        for r in dist.requires or []:
            sub = Requirement(r)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                sub.marker = None
                todo.append(sub)
    return list(seen.values())


def _visible_site(root: Path, dists: list[metadata.Distribution]) -> Path:
    """A folder of links to exactly these distributions' top-level files (modules, packages, dist-info)."""
    site = root / "visible-site"
    site.mkdir()
    for dist in dists:
        base = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops - {"__pycache__"}):
            src, dst = base / top, site / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    return site


def _project_requirements(name: str) -> list[str]:
    deps = _pyproject(name)["project"].get("dependencies", [])
    return [d for d in deps if not d.startswith("avatar-core")]


@pytest.mark.slow
@pytest.mark.parametrize("name", PACKAGES)
def test_package_installs_alone_from_another_directory(tmp_path, name):
    """`pip install -e packages/NAME` in a new environment, run from outside the repository, that sees only what
    NAME and the kernel declare (and pip's build tools): every module of both must import there.

    Nothing is downloaded: the new environment links to this one's copies of exactly the declared distributions
    (transitively), so an undeclared dependency is missing there; the kernel, a path dependency, is built into it.
    """
    if not _source(name).is_dir():
        pytest.skip(f"{name} has no source yet")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    new_site = next((venv / "lib").glob("python3*/site-packages"))
    needed = _project_requirements(name) + _project_requirements("avatar-core") + BUILD_TOOLS
    (new_site / "declared.pth").write_text(str(_visible_site(tmp_path, _requirement_closure(needed))) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHONPATH"))}
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
    # Every module imports with only the declared distributions visible (a method package never needs another).
    walk = ("import importlib, pkgutil, sys\n"
            "for top in sys.argv[1:]:\n"
            "    pkg = importlib.import_module(top)\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, top + '.'):\n"
            "        importlib.import_module(m.name)\n")
    imp = subprocess.run([venv / "bin" / "python", "-c", walk, name, "avatar_core"], capture_output=True, text=True,
                         cwd=tmp_path, env=env)
    assert imp.returncode == 0, imp.stderr[-3000:]
