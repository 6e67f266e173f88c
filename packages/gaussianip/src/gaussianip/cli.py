"""The ``gaussianip`` console script: parses arguments and calls :mod:`gaussianip.system.pipeline`.

Every sub-command takes ``--config`` (a YAML path, or ``tiny`` / ``paper``; default ``tiny``) and ``key=value``
overrides anywhere on the line, e.g. ``gaussianip generate --prompt "a man in a suit" stage1.steps=2400``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from avatar_core.cli import add_config_arguments, check_overrides, make_parser, run
from avatar_core.view import add_view_command
from gaussianip import __doc__ as DESCRIPTION
from gaussianip import __version__


def _config(args: argparse.Namespace):
    from gaussianip.config import load_gaussianip_config

    return load_gaussianip_config(args.config, check_overrides(args.overrides))


def _print(result: dict) -> None:
    print(json.dumps(result, indent=2, default=str))


def _train_prior(args):
    from gaussianip.system import pipeline

    _print(pipeline.train_prior(_config(args), overwrite=args.overwrite))


def _generate(args):
    from gaussianip.system import pipeline

    _print(pipeline.generate(_config(args), args.prompt, face=args.face, out=args.out, overwrite=args.overwrite,
                             resume=args.resume))


def _refine(args):
    from gaussianip.system import pipeline

    _print(pipeline.resume_stage(args.run, _config(args), "stage2"))


def _reconstruct(args):
    from gaussianip.system import pipeline

    _print(pipeline.resume_stage(args.run, _config(args), "stage3"))


def _animate(args):
    from gaussianip.system import pipeline

    _print(pipeline.animate(args.run, _config(args), args.motion, out=args.out, overwrite=args.overwrite))


def _evaluate(args):
    from gaussianip.evaluate import evaluate

    _print(evaluate(_config(args), out=args.out, overwrite=args.overwrite))


def build_parser() -> argparse.ArgumentParser:
    parser, sub = make_parser("gaussianip", DESCRIPTION, __version__)
    p = sub.add_parser("train-prior", help="train the embedded prior on the synthetic avatars (once; cached)")
    p.add_argument("--overwrite", action="store_true", help="retrain even if the cache holds a prior")
    add_config_arguments(p)
    p.set_defaults(func=_train_prior)

    p = sub.add_parser("generate", help="face photo + text -> 3D Gaussian human (stages 1-3)")
    p.add_argument("--prompt", required=True, help="the person, e.g. 'a woman in a red dress'")
    p.add_argument("--face", default=None, help="face photo (default: a held-out synthetic portrait)")
    p.add_argument("--out", default=None, help="run folder (default: run_dir/<prompt>_s<seed>_<hash>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last finished stage")
    add_config_arguments(p)
    p.set_defaults(func=_generate)

    for name, fn, text in (("refine", _refine, "redo stage 2 (VCR) and stage 3 of a run"),
                           ("reconstruct", _reconstruct, "redo stage 3 (reconstruction) of a run")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run", help="a run folder written by generate")
        add_config_arguments(p)
        p.set_defaults(func=fn)

    p = sub.add_parser("animate", help="drive a result with a motion (built-in name or SMPL-X / AMASS .npz)")
    p.add_argument("run", help="a run folder written by generate")
    p.add_argument("--motion", required=True, help="walk, wave, or a .npz pose sequence")
    p.add_argument("--out", default=None, help="output MP4 (default RUN/animation_<motion>.mp4)")
    p.add_argument("--overwrite", action="store_true")
    add_config_arguments(p)
    p.set_defaults(func=_animate)

    p = sub.add_parser("evaluate", help="the measurements: AHDS vs uniform / linear, VCR vs independent, identity")
    p.add_argument("--out", default="outputs/gaussianip/evaluate", help="report folder")
    p.add_argument("--overwrite", action="store_true")
    add_config_arguments(p)
    p.set_defaults(func=_evaluate)
    add_view_command(sub, default_path="outputs/gaussianip", what="GaussianIP results (splats, motions, curves)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
