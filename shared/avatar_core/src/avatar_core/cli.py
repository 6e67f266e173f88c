"""Command-line plumbing shared by every console script (``avatar-core``, ``tera``, ``gaussianip``, ...).

A script builds its parser with :func:`make_parser`, adds one sub-command per action, and hands control to
:func:`run`, which turns the toolkit's errors into a short message and a non-zero exit code instead of a
traceback (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from avatar_core import __version__
from avatar_core.errors import AvatarError

Handler = Callable[[argparse.Namespace], int | None]


def make_parser(prog: str, description: str, version: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """A parser with ``--version``, ``--debug`` and an ``info`` sub-command already wired."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {version}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="print version, torch device, usable rendering backends and body models")
    info.set_defaults(func=lambda args: _info(prog, version))
    return parser, sub


def _info(prog: str, version: str) -> int:
    from avatar_core.env import environment_report, format_report

    print(format_report(environment_report(prog, version)))
    return 0


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, call the chosen sub-command's handler and map errors to exit codes."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        return int(func(args) or 0)
    except AvatarError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed outputs and the last checkpoint are kept", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser, sub = make_parser("avatar-core", "Kernel utilities of the avatar toolkit.", __version__)
    make = sub.add_parser("make-dataset", help="write the synthetic avatar dataset (renders, textures, captions)")
    make.add_argument("--out", required=True, help="output folder (created; a rerun with the same settings resumes)")
    make.add_argument("--num", type=int, default=100, help="number of avatars")
    make.add_argument("--views", type=int, default=36, help="calibrated views per avatar, on an orbit from the front")
    make.add_argument("--res", type=int, default=256, help="render and portrait resolution in pixels")
    make.add_argument("--seed", type=int, default=0, help="avatar i depends on (seed, i) only")
    make.add_argument("--body", default="anny", help="body model (anny)")
    make.add_argument("--uv-res", type=int, default=512, help="UV texture resolution")
    make.add_argument("--overwrite", action="store_true", help="delete an existing dataset in --out and start again")

    def _make_dataset(args: argparse.Namespace) -> int:
        from avatar_core.data.generate import generate_dataset

        out = generate_dataset(args.out, num=args.num, views=args.views, res=args.res, seed=args.seed,
                               body=args.body, overwrite=args.overwrite, uv_res=args.uv_res)
        print(f"dataset written to {out} (contact sheet: {out / 'contact_sheet.png'})")
        return 0

    make.set_defaults(func=_make_dataset)
    from avatar_core.view import add_view_command

    add_view_command(sub)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
