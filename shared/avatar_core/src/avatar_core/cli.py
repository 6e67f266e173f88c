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
    parser, _sub = make_parser("avatar-core", "Kernel utilities of the avatar toolkit.", __version__)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
