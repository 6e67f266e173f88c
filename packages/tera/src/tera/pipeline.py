"""TeRA end to end: the stages in order, and one import for the public entry points of every stage.

Each stage lives in the module named after it and takes a :class:`tera.config.TeraConfig`:
:mod:`tera.teacher` (``fit_teacher``), :mod:`tera.stage1` (``distill``), :mod:`tera.stage2` (``train``),
:mod:`tera.generate` (``generate``, ``edit``, ``animate``, ``export``), :mod:`tera.evaluate` (``evaluate``);
:mod:`tera.runs` holds the run folder's layout and :mod:`tera.avatars` the avatar files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from avatar_core.config import save_config
from tera.avatars import AVATAR_FORMAT, Models, decode, load_avatar, load_models
from tera.config import TeraConfig
from tera.evaluate import evaluate, format_report
from tera.generate import animate, edit, export, generate, sample_latents, sampling
from tera.runs import build_avatar, load_dataset, run_paths
from tera.stage1 import distill
from tera.stage2 import train
from tera.teacher import fit_teacher

__all__ = [
    "AVATAR_FORMAT", "Models", "animate", "build_avatar", "decode", "distill", "edit", "evaluate", "export",
    "fit_teacher", "format_report", "generate", "load_avatar", "load_dataset", "load_models", "run_all", "run_paths",
    "sample_latents", "sampling", "train",
]


def run_all(cfg: TeraConfig, progress: bool = True) -> dict[str, Any]:
    """fit-teacher -> distill -> train on the configured dataset (created when missing); timings per stage."""
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    return {"fit_teacher": fit_teacher(cfg, progress, create_dataset=True), "distill": distill(cfg, progress),
            "train": train(cfg, progress)}
