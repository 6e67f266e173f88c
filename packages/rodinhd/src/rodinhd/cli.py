"""The ``rodinhd`` console script: parses arguments and calls :mod:`rodinhd.pipeline`.

Every stage command takes ``--config`` (a YAML path, or ``tiny`` / ``paper`` from the package's configs folder;
default ``tiny``), ``--out`` (the run folder) and trailing ``key=value`` overrides, e.g.
``rodinhd train-base --config paper --out runs/a base.train.lr=2e-5``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from avatar_core.cli import add_config_arguments, check_overrides, make_parser, run
from avatar_core.errors import InputError
from avatar_core.view import add_view_command
from rodinhd import __doc__ as DESCRIPTION
from rodinhd import __version__

DEFAULT_OUT = "outputs/rodinhd"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=DEFAULT_OUT, help=f"run folder (default: {DEFAULT_OUT})")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_config_arguments(p)


def _cfg(args: argparse.Namespace):
    from rodinhd.config import load_rodinhd_config

    return load_rodinhd_config(args.config, check_overrides(args.overrides))


def _print(result) -> None:
    from rodinhd.pipeline import fmt_paths

    paths = fmt_paths(result) if isinstance(result, dict) else ""
    if paths:
        print("wrote:\n" + paths)


def _fit_shared(args):
    from rodinhd.pipeline import fit_shared_stage

    r = fit_shared_stage(_cfg(args), args.out, progress=not args.no_progress)
    print(f"stage 1 done in {r['seconds']:.1f} s on {len(r['avatars'])} avatars")
    _print(r)


def _fit(args):
    from rodinhd.pipeline import fit_stage

    r = fit_stage(_cfg(args), args.out, rank=args.rank, world_size=args.world_size, progress=not args.no_progress)
    print(f"stage 2 fitted {len(r['fitted'])} avatars in {r['seconds']:.1f} s")
    _print(r)


def _train(which: str):
    def handler(args):
        from rodinhd import pipeline

        fn = pipeline.train_base if which == "base" else pipeline.train_upsample
        r = fn(_cfg(args), args.out, resume=not args.restart, progress=not args.no_progress)
        print(f"train-{which}: last loss {r['last'].get('loss', float('nan')):.4g} ({r['seconds']:.1f} s)")
        _print(r)

    return handler


def _sample(args):
    from rodinhd.pipeline import sample

    if args.portrait is None and not args.unconditional:
        raise InputError("sample needs a portrait", "pass --portrait IMG, or --unconditional to generate without one")
    if args.portrait is not None and args.unconditional:
        raise InputError("--portrait and --unconditional contradict each other",
                         "pass --portrait IMG to condition on it, or --unconditional alone to generate without one")
    r = sample(_cfg(args), args.out, args.portrait, name=args.name, dest=args.dest, overwrite=args.overwrite,
               mask=args.mask, frame=not args.no_frame)
    print(f"sampled in {r['base_seconds'] + r['upsample_seconds']:.1f} s (base + upsample)")
    _print(r)


def _render(args):
    from rodinhd.pipeline import render_file

    _print(render_file(_cfg(args), args.out, args.triplane, dest=args.dest, overwrite=args.overwrite))


def _evaluate(args):
    from rodinhd.evaluate import format_eval
    from rodinhd.pipeline import evaluate

    r = evaluate(_cfg(args), args.out, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in r.items()}, indent=2))
    print(format_eval(r))


def _ablate(args):
    from rodinhd.ablation import format_table
    from rodinhd.pipeline import ablate

    results = ablate(_cfg(args), args.out, progress=not args.no_progress)
    print(format_table(results))


def _ablate_triplane(args):
    from rodinhd.ablation import format_sweep
    from rodinhd.evaluate import ablate_triplane

    print(format_sweep(ablate_triplane(_cfg(args), args.out, progress=not args.no_progress)))


def _ablate_diffusion(args):
    from rodinhd.ablation_diffusion import ablate_diffusion, format_diffusion_table

    print(format_diffusion_table(ablate_diffusion(_cfg(args), args.out, dest=args.dest, progress=not args.no_progress)))


def _train_all(args):
    from rodinhd.pipeline import train_all

    r = train_all(_cfg(args), args.out, progress=not args.no_progress, evaluate_after=args.evaluate)
    print("stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()))
    _print(r)


def _view_settings(args) -> dict:
    """``rodinhd view``: the run folder unless a PATH is given; triplanes decoded by that run's decoder."""
    cfg = _cfg(args)

    def field(path):
        from rodinhd.models import load_decoder
        from rodinhd.renderer import TriplaneField
        from rodinhd.sample import load_triplane_file

        t = cfg.triplane
        return TriplaneField(load_triplane_file(path, t.channels, t.resolution), load_decoder(cfg, args.out),
                             t.bound, t.center)

    return {"path": args.out, "triplane_field": field}


def build_parser() -> argparse.ArgumentParser:
    parser, sub = make_parser("rodinhd", DESCRIPTION, __version__)
    p = sub.add_parser("fit-shared", help="stage 1: fit triplanes and the shared decoder (task replay + IWC)")
    _common(p)
    p.set_defaults(func=_fit_shared)
    p = sub.add_parser("fit", help="stage 2: fit every training avatar's triplane with the frozen decoder")
    _common(p)
    p.add_argument("--rank", type=int, default=None, help="this process's shard (default: from the launcher)")
    p.add_argument("--world-size", type=int, default=None, help="number of shards (default: from the launcher)")
    p.set_defaults(func=_fit)
    for which, text in (("base", "the base diffusion model (portrait -> low-res triplane)"),
                        ("upsample", "the upsample diffusion model (low-res -> high-res triplane)")):
        p = sub.add_parser(f"train-{which}", help=f"train {text}; resumes an existing run")
        _common(p)
        p.add_argument("--restart", action="store_true", help="start a new run; the old one is moved to "
                       "<out>/<stage>.old-<time> (default: resume, under the same settings only)")
        p.set_defaults(func=_train(which))
    p = sub.add_parser("sample", help="portrait -> triplane -> 360-degree views, turntable, settings JSON")
    _common(p)
    p.add_argument("--portrait", default=None, help="portrait image: RGBA of any aspect (transparent background), "
                   "or RGB with --mask; cropped around the person to the training framing (head to chest)")
    p.add_argument("--mask", default=None, help="person mask for an RGB --portrait (same size, white = person)")
    p.add_argument("--no-frame", action="store_true", help="use the portrait as it is (it must then be square)")
    p.add_argument("--unconditional", action="store_true", help="generate without a portrait")
    p.add_argument("--name", default=None, help="output sub-folder under <out>/samples (default: unique per "
                   "portrait, seed and sampling settings)")
    p.add_argument("--dest", default=None, help="output folder (overrides --name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing sample there (its old files are "
                   "deleted first)")
    p.set_defaults(func=_sample)
    p = sub.add_parser("render", help="render a triplane file to views and a turntable with the run's decoder")
    p.add_argument("triplane", help="a triplane .safetensors file (from sample or fit)")
    _common(p)
    p.add_argument("--dest", default=None, help="output folder (default: <folder>_<file>_render beside the file's "
                   "folder, which is never written)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing render there (its old files are "
                   "deleted first)")
    p.set_defaults(func=_render)
    p = sub.add_parser("evaluate", help="PSNR/SSIM(/LPIPS) of fitting and generation, 3D-consistency refit")
    _common(p)
    p.set_defaults(func=_evaluate)
    p = sub.add_parser("ablate-fitting", help="the Table 4(a) fitting ablation on a small set; prints the table")
    _common(p)
    p.set_defaults(func=_ablate)
    p = sub.add_parser("ablate-triplane", help="Table 6 small: fitting PSNR by triplane resolution x channels")
    _common(p)
    p.set_defaults(func=_ablate_triplane)
    p = sub.add_parser("ablate-diffusion", help="Table 4(b) small: base models of rows A-E (resolution, noise "
                       "schedule, portrait condition) trained alike, scored on held-out portraits; prints the table")
    _common(p)
    p.add_argument("--dest", default=None, help="output folder (default: <out>/ablation_diffusion); a finished row "
                   "there is read back, an interrupted one resumes")
    p.set_defaults(func=_ablate_diffusion)
    p = sub.add_parser("train-all", help="dataset -> stage 1 -> stage 2 -> base -> upsample -> one sample")
    _common(p)
    p.add_argument("--evaluate", action="store_true", help="also run evaluate at the end")
    p.set_defaults(func=_train_all)
    p = add_view_command(sub, what="RodinHD samples and fitted triplanes (a point cloud from the decoded density)",
                         configure=_view_settings)
    _common(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
