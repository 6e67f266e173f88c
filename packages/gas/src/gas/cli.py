"""The ``gas`` console script: parses arguments and calls the package's functions."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from avatar_core.cli import make_parser, run
from avatar_core.view import add_view_command
from gas import __doc__ as DESCRIPTION
from gas import __version__


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="tiny, paper or a YAML file (default tiny)")
    p.add_argument("--run", default=None, help="run folder (overrides the config's `run`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. sample.steps=25")


def _overrides(args: argparse.Namespace) -> list[str]:
    return list(args.overrides) + ([f"run={args.run}"] if args.run else [])


def _cfg(args: argparse.Namespace, variant: str = "full"):
    from gas.pipeline import config

    return config(args.config, _overrides(args), variant)


def _train_nerf(args):
    from gas.pipeline import train_nerf

    print(f"stage-1 checkpoint: {train_nerf(_cfg(args), args.restart, not args.no_progress)}")


def _train_video(args):
    from gas.pipeline import train_video

    print(f"video model checkpoint: {train_video(_cfg(args, args.variant), args.restart, not args.no_progress)}")


def _novel_view(args):
    from gas.pipeline import novel_view

    r = novel_view(_cfg(args), args.image, args.out, args.params, args.mask, args.frames, args.overwrite,
                   args.nerf_only, not args.no_progress)
    print(json.dumps(r, indent=1))


def _novel_pose(args):
    from gas.pipeline import novel_pose

    r = novel_pose(_cfg(args), args.image, args.motion, args.out, args.params, args.mask, args.frames,
                   args.overwrite, args.nerf_only, not args.no_progress)
    print(json.dumps(r, indent=1))


def _reference(args):
    from gas.pipeline import export_held_out

    image, params = export_held_out(_cfg(args), args.out, args.clip, args.overwrite)
    print(f"input written: {image} and {params}")


def _evaluate(args):
    from gas.pipeline import evaluate

    r = evaluate(args.config, _overrides(args), tuple(args.variants.split(",")) if args.variants else (),
                 args.max_clips, not args.no_progress)
    print(r["table"])
    print(f"perceptual: {r['lpips']}")


def build_parser():
    parser, commands = make_parser("gas", DESCRIPTION, __version__)
    add_view_command(commands, default_path="outputs/gas", what="GAS results (frames and videos beside the reference)")

    p = commands.add_parser("train-nerf", help="stage 1: the generalizable human NeRF on the synthetic clips")
    _common(p)
    p.add_argument("--restart", action="store_true", help="start afresh (the old run is moved aside)")
    p.set_defaults(func=_train_nerf)

    p = commands.add_parser("train-video", help="stage 2: cache NeRF renders, train the video model")
    _common(p)
    p.add_argument("--variant", default="full", help="full, no_nerf (normals only) or no_switcher")
    p.add_argument("--restart", action="store_true", help="start afresh (the old run is moved aside)")
    p.set_defaults(func=_train_video)

    for name, fn, helptext in (("novel-view", _novel_view, "an orbit around the person in the image"),
                               ("novel-pose", _novel_pose, "the person in the image driven by a motion")):
        p = commands.add_parser(name, help=helptext)
        _common(p)
        p.add_argument("--image", required=True, help="RGBA image (or RGB with --mask) of one person")
        if name == "novel-pose":
            p.add_argument("--motion", required=True, help="walk, wave, or an SMPL-X / AMASS .npz sequence")
        p.add_argument("--params", default=None, help="body parameters + camera JSON (default: IMAGE with .json)")
        p.add_argument("--mask", default=None, help="mask image for an RGB --image")
        p.add_argument("--frames", type=int, default=None, help="frames to generate (any number: tiled)")
        p.add_argument("--out", required=True, help="result folder (frames, nerf, gas.mp4, nerf.mp4, settings.json)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing result in --out")
        p.add_argument("--nerf-only", action="store_true", help="only the stage-1 renders (no video model)")
        p.set_defaults(func=fn)

    p = commands.add_parser("reference", help="write a held-out synthetic person as an input (image + parameters)")
    _common(p)
    p.add_argument("--out", required=True, help="image path; the parameters go beside it with .json")
    p.add_argument("--clip", type=int, default=0, help="which held-out avatar")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=_reference)

    p = commands.add_parser("evaluate", help="PSNR / SSIM / flicker on the held-out clips")
    _common(p)
    p.add_argument("--variants", default="full", help="comma-separated trained variants (full,no_nerf,no_switcher)")
    p.add_argument("--max-clips", type=int, default=None, help="evaluate only the first N held-out clips")
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
