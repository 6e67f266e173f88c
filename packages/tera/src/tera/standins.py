"""TeRA's paper networks or named stand-ins, decided from the config before any work (:mod:`avatar_core.standins`).

Paper networks (Sec. 3): SMPL-X, CLIP ViT-L/14, VGG-16 for L_vgg and IDOL's precomputed UV features. A config that
uses the embedded ones instead lists them under ``standins`` (``anny_body``, ``minilm_text``,
``random_feature_perceptual``, ``fitted_teacher``); ``paper.yaml`` lists none and fails before any work with the
files it needs. ``$AVATAR_SMPLX_DIR``, when it supplies the SMPL-X folder, is recorded with the run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from avatar_core.body.smplx_model import SMPLX_ENV, find_smplx_file, resolve_smplx_dir
from avatar_core.errors import AvatarError
from avatar_core.io import save_json
from avatar_core.perceptual import STANDIN as PERCEPTUAL_STANDIN
from avatar_core.standins import Component, Requirement, StandIn, StandInRecord, registry_source, resolve
from tera.config import TeraConfig
from tera.runs import run_paths

__all__ = ["ANNY_BODY", "FITTED_TEACHER", "MINILM_TEXT", "resolve_standins", "trained_standins"]

ANNY_BODY = StandIn("anny_body", "the SMPL-X body (body.name: smplx)", "the embedded Anny body model")
MINILM_TEXT = StandIn("minilm_text", "the CLIP ViT-L/14 text encoder (text.encoder: clip)",
                      "the embedded MiniLM-L6 sentence encoder")
FITTED_TEACHER = StandIn("fitted_teacher", "IDOL's UV features (teacher.source: idol)",
                         "UV features fitted per avatar by this project (tera fit-teacher)")


def _smplx_problem(path: str | os.PathLike) -> str | None:
    try:
        find_smplx_file(resolve_smplx_dir(path), "neutral")
        return None
    except AvatarError as e:
        return e.message


def resolve_standins(cfg: TeraConfig, parts: Sequence[str] = ("body", "text", "perceptual", "teacher"),
                     run_dir: str | os.PathLike | None = None) -> StandInRecord:
    """Paper network or allowed stand-in for each of ``parts``, before any work; logged once and, with ``run_dir``,
    written to ``<run_dir>/standins.json``. ``$AVATAR_SMPLX_DIR``, when it supplies the SMPL-X folder, is recorded."""
    smplx_dir = cfg.body.model_dir or os.environ.get(SMPLX_ENV) or ""
    table = {
        "body": Component(Requirement("SMPL-X model files (Sec. 3.1)", "body.model_dir", smplx_dir,
                                      check=_smplx_problem, source="https://smpl-x.is.tue.mpg.de"),
                          ANNY_BODY, use_standin=cfg.body.name != "smplx"),
        "text": Component(Requirement("CLIP ViT-L/14 text encoder (Sec. 3.4)", "text.path", cfg.text.path or "",
                                      kind="clip_text_encoder", source=registry_source("clip_text_encoder")),
                          MINILM_TEXT, use_standin=cfg.text.encoder != "clip"),
        "perceptual": Component(Requirement("VGG-16 weights (L_vgg, Eq. 1)", "teacher.vgg_weights",
                                            cfg.teacher.vgg_weights or "", source="torchvision's vgg16 state dict"),
                                PERCEPTUAL_STANDIN),
        "teacher": Component(Requirement("IDOL UV features (Sec. 3.2)", "teacher.features_dir",
                                         cfg.teacher.features_dir, directory=True,
                                         source="IDOL's encoder run over the dataset (yiyuzhuang/IDOL)"),
                             FITTED_TEACHER, use_standin=cfg.teacher.source != "idol"),
    }
    record = resolve([table[p] for p in parts], list(cfg.standins),
                     known=[c.standin.name for c in table.values()])
    if "body" in parts and cfg.body.name == "smplx" and not cfg.body.model_dir:
        record.env(SMPLX_ENV)
    record.log_once("tera")
    if run_dir is not None:
        save_json(Path(run_dir) / "standins.json", record.settings())
    return record


def trained_standins(cfg: TeraConfig) -> dict[str, list[str]]:
    """The stand-ins each training stage of the run recorded (``standins.json`` of teacher, distill, diffusion):
    what a generated avatar's settings name as the networks it was made with."""
    paths = run_paths(cfg)
    out = {}
    for stage, folder in (("teacher", paths.teacher), ("distill", paths.distill), ("diffusion", paths.diffusion)):
        f = Path(folder) / "standins.json"
        if f.is_file():
            out[stage] = [s["name"] for s in json.loads(f.read_text(encoding="utf-8"))["standins"]]
    return out
