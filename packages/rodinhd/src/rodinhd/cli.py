"""The ``rodinhd`` console script: parses arguments and calls the package's functions."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from avatar_core.cli import make_parser, run
from rodinhd import __doc__ as DESCRIPTION
from rodinhd import __version__


def build_parser():
    parser, _commands = make_parser("rodinhd", DESCRIPTION, __version__)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
