"""The ``tera`` console script: parses arguments and calls :mod:`tera.pipeline`.

Every sub-command takes ``--config`` (a YAML path, or ``tiny`` / ``paper`` from the package's configs; default
``tiny``) and ``key=value`` overrides anywhere on the line, e.g. ``tera train --config paper diffusion.lr=5e-5``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from avatar_core.cli import add_config_arguments, check_overrides, make_parser, run
from avatar_core.view import add_view_command
from tera import __doc__ as DESCRIPTION
from tera import __version__


def _config(args: argparse.Namespace):
    from tera.config import load_config

    return load_config(args.config, check_overrides(args.overrides))


def _print(result: dict) -> None:
    clean = {k: v for k, v in result.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}
    print(json.dumps(clean, indent=2, default=str))


def _fit_teacher(args):
    from tera import pipeline

    _print(pipeline.fit_teacher(_config(args), create_dataset=args.make_dataset, restart=args.restart))


def _distill(args):
    from tera import pipeline

    _print(pipeline.distill(_config(args), resume=None if args.restart else "auto"))


def _train(args):
    from tera import pipeline

    _print(pipeline.train(_config(args), resume=None if args.restart else "auto"))


def _generate(args):
    from tera import pipeline

    res = pipeline.generate(_config(args), args.prompt, out_dir=args.out, seed=args.seed, overwrite=args.overwrite)
    _print({"dir": res["dir"], "files": res["files"], "seconds": res["seconds"]})


def _edit(args):
    from tera import pipeline

    res = pipeline.edit(_config(args), args.avatar, args.region, args.prompt, out_dir=args.out, seed=args.seed,
                        method=args.method, overwrite=args.overwrite)
    _print({"dir": res["dir"], "files": res["files"], "seam": res["seam"], "seconds": res["seconds_edit"]})


def _recolour(args):
    from tera.recolour import recolour

    res = recolour(_config(args), args.avatar, args.region, args.colour, out_dir=args.out, strength=args.strength,
                   overwrite=args.overwrite)
    _print({"dir": res["dir"], "files": res["files"], "texels_changed": res["texels_changed"],
            "seconds": res["seconds"]})


def _animate(args):
    from tera import pipeline

    _print(pipeline.animate(_config(args), args.avatar, out=args.out, motion=args.motion, overwrite=args.overwrite))


def _export(args):
    from tera import pipeline

    _print(pipeline.export(_config(args), args.avatar, args.out, motion=args.motion, overwrite=args.overwrite))


def _evaluate(args):
    from tera import pipeline

    report = pipeline.evaluate(_config(args), out_dir=args.out, ablation=not args.no_ablation, overwrite=args.overwrite,
                               scaling=not args.no_scaling)
    print(pipeline.format_report(report))


def _view_animator(args: argparse.Namespace) -> dict:
    from tera.view import AvatarAnimator

    return {"animator": AvatarAnimator(lambda: _config(args))}


def build_parser() -> argparse.ArgumentParser:
    parser, sub = make_parser("tera", DESCRIPTION, __version__)

    commands = []

    def command(name: str, help_: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=func)
        commands.append(p)
        return p

    p = command("fit-teacher", "fit the project's teacher UV features to the dataset (or check IDOL features)",
                _fit_teacher)
    p.add_argument("--make-dataset", action="store_true", help="write the synthetic dataset first if missing")
    p.add_argument("--restart", action="store_true", help="fit every avatar again; the old features are moved to "
                   "<teacher>.old-<time> (default: resume, under the same settings only)")
    for name, help_, func in (("distill", "stage 1: train the distillation decoder on teacher latents", _distill),
                              ("train", "stage 2: train the text-conditioned latent diffusion", _train)):
        p = command(name, help_, func)
        p.add_argument("--restart", action="store_true", help="start a new run; the old one is moved to "
                       "<run>.old-<time> (default: resume, under the same settings only)")
    p = command("generate", "text -> avatar (PLY, turntable, attribute maps, latent, settings)", _generate)
    p.add_argument("prompt", help='e.g. "a woman in a red dress"')
    p.add_argument("--out", default=None, help="output folder (default: <run_dir>/avatars/<prompt>_s<seed>_<hash>)")
    p.add_argument("--seed", type=int, default=None)
    p = command("edit", "try-on: regenerate a body region of an avatar under a new prompt", _edit)
    p.add_argument("avatar", help="avatar folder or its avatar.safetensors")
    p.add_argument("prompt")
    p.add_argument("--region", required=True, help="e.g. upper_clothes, lower_clothes, shoes, outfit (join with +)")
    p.add_argument("--method", choices=("inpaint", "replace"), default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=None)
    p = command("recolour", "texture editing: recolour a UV region of an avatar (geometry kept)", _recolour)
    p.add_argument("avatar", help="avatar folder or its avatar.safetensors")
    p.add_argument("--region", required=True, help="e.g. upper_clothes, shoes, arms (join with +)")
    p.add_argument("--colour", "--color", required=True, help='a palette name ("light blue"), #rrggbb or r,g,b')
    p.add_argument("--strength", type=float, default=1.0, help="blend with the old colours (1 replaces)")
    p.add_argument("--out", default=None, help="output folder (default: beside the avatar, "
                   "<avatar>__recolour_<region>_<colour>_<hash>)")
    p = command("animate", "a clip of the avatar with a built-in motion or an SMPL-X / AMASS .npz sequence", _animate)
    p.add_argument("avatar")
    p.add_argument("--motion", default=None, help="walk, wave, or the path of an SMPL-X / AMASS .npz pose sequence")
    p.add_argument("--out", default=None, help="output folder for <motion>.mp4 (default: beside the avatar, "
                   "<avatar>__<motion>_<hash>)")
    p = command("export", "canonical PLY + attribute maps (+ posed PLY frames with --motion)", _export)
    p.add_argument("avatar")
    p.add_argument("--out", required=True)
    p.add_argument("--motion", default=None, help="walk, wave, or an SMPL-X / AMASS .npz pose sequence")
    p = command("evaluate", "text faithfulness, editing errors, latent-resolution ablation", _evaluate)
    p.add_argument("--out", default=None)
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--no-scaling", action="store_true", help="skip the data-scaling study (evaluate.data_sizes)")
    for p in (c for c in commands if c.prog.split()[-1] in ("generate", "edit", "recolour", "animate", "export",
                                                                    "evaluate")):
        p.add_argument("--overwrite", action="store_true", help="replace an existing result in the output folder "
                       "(its old files are deleted first); input folders are never written")
    for p in commands:  # after each command's own positionals: the overrides take what is left
        add_config_arguments(p)
    p = add_view_command(sub, default_path="outputs/tera", what="TeRA avatars (posed by the built-in motions), edits "
                         "(before / after), exported frames, training curves", configure=_view_animator)
    add_config_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
