"""What this machine can run: torch device, rendering backends, body models, embedded weights.

Nothing here imports a heavy backend; availability is decided from package metadata, CUDA presence and
files on disk, so ``info`` answers in well under a second on any machine.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import os
import platform
from pathlib import Path

import torch

from avatar_core.body.smplx_model import SMPLX_ENV
from avatar_core.errors import ConfigError


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def default_device() -> torch.device:
    """The device a run uses when none is given: the first CUDA GPU if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str = "auto", threads: int = 0) -> torch.device:
    """A config's ``device`` value as a torch device: ``auto`` is :func:`default_device`; ``cuda`` on a machine
    without CUDA is a ConfigError. ``threads`` > 0 sets torch's CPU thread count first."""
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(int(threads))
    if name == "auto":
        return default_device()
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device={name!r} is not a torch device", "use device=auto, cpu or cuda[:N]") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here", "use device=auto or device=cpu")
    return dev


def smplx_dir() -> Path | None:
    """The SMPL-X model directory named by ``AVATAR_SMPLX_DIR``, if it is set."""
    value = os.environ.get(SMPLX_ENV)
    return Path(value).expanduser() if value else None


def rendering_backends() -> dict[str, str]:
    """Each rendering backend and whether it runs here, with the reason when it does not."""
    cuda = torch.cuda.is_available()
    out = {
        "gaussians/torch (CPU, own rasterizer)": "available",
        "volume/torch (CPU, own occupancy grid)": "available",
    }
    for name, dist in (("gaussians/gsplat (CUDA)", "gsplat"), ("volume/nerfacc (CUDA)", "nerfacc")):
        if _version(dist) is None:
            out[name] = f"not installed (pip install {dist})"
        elif not cuda:
            out[name] = "installed; needs a CUDA GPU"
        else:
            out[name] = "available"
    return out


def body_models() -> dict[str, str]:
    """Each body model and whether it loads here."""
    out = {}
    out["anny"] = "available (embedded default)" if importlib.util.find_spec("anny") else "not installed (pip install anny)"
    d = smplx_dir()
    if importlib.util.find_spec("smplx") is None:
        out["smplx"] = "smplx package not installed (pip install smplx)"
    elif d is None:
        out["smplx"] = f"model files not configured (set {SMPLX_ENV} to the folder holding SMPLX_NEUTRAL.npz)"
    else:
        from avatar_core.body.smplx_model import folder_status

        out["smplx"] = folder_status(d)[1]  # the model file's arrays and the UV layout, not just a name
    return out


def environment_report(package: str | None = None, version: str | None = None) -> dict[str, object]:
    """Everything ``NAME info`` prints, as a dict (also handy in bug reports)."""
    from avatar_core import __version__ as core_version

    device = default_device()
    report: dict[str, object] = {}
    if package:
        report["package"] = f"{package} {version or _version(package) or '?'}"
    report["avatar-core"] = core_version
    report["python"] = platform.python_version()
    report["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda})" if torch.version.cuda else torch.__version__
    report["device"] = (f"{device} ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s))"
                        if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)")
    for dist in ("diffusers", "transformers", "accelerate", "gsplat", "nerfacc", "smplx", "anny"):
        report[dist] = _version(dist) or "not installed"
    report["rendering"] = rendering_backends()
    report["body models"] = body_models()
    report["hub access"] = "offline (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else (
        "never used at run time: weights are read from local directories")
    return report


def format_report(report: dict[str, object]) -> str:
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {k:<42} {v}" for k, v in value.items())
        else:
            lines.append(f"{key:<14} {value}")
    return "\n".join(lines)
