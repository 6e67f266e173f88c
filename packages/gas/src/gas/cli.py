"""The ``gas`` console script: parses arguments and calls the package's functions."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from avatar_core.cli import make_parser, run
from avatar_core.view import add_view_command
from gas import __doc__ as DESCRIPTION
from gas import __version__


def build_parser():
    parser, _commands = make_parser("gas", DESCRIPTION, __version__)
    add_view_command(_commands, default_path="outputs/gas", what="GAS results (frames and videos beside the reference)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
