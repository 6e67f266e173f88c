"""Command-line plumbing shared by every console script (``avatar-core``, ``tera``, ``gaussianip``, ...).

A script builds its parser with :func:`make_parser`, adds one sub-command per action, and hands control to
:func:`run`, which turns the toolkit's errors into a short message and a non-zero exit code instead of a
traceback (``--debug`` shows the traceback).

Config-driven sub-commands (every method package's stages) call :func:`add_config_arguments`: ``--config`` takes a
YAML path or the name of a config the package ships (``tiny``, ``paper``; found by :func:`resolve_config` in the
package's configs folder, inside an installed wheel too), and ``key=value`` overrides may stand anywhere on the
line, before or after options and positionals (the sub-command parsers parse intermixed arguments).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from avatar_core import __version__
from avatar_core.errors import AvatarError, InputError, MissingFileError

Handler = Callable[[argparse.Namespace], int | None]


def make_parser(prog: str, description: str, version: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """A parser with ``--version``, ``--debug`` and an ``info`` sub-command already wired."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {version}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    info = sub.add_parser("info", help="print version, torch device, usable rendering backends and body models")
    info.set_defaults(func=lambda args: _info(prog, version))
    return parser, sub


class CommandParser(argparse.ArgumentParser):
    """A sub-command parser that reads options and positionals intermixed, so ``key=value`` overrides and a
    positional may sit before or after options (``rodinhd render FILE --out RUN a.b=1``), which plain argparse
    splits into unrecognised chunks."""

    _inside = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._positional_actions: list[argparse.Action] = []

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if not action.option_strings and action.dest != "overrides":
            self._positional_actions.append(action)
        return action

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:  # the intermixed parser calls back into this method for its two passes
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            ns, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False
        self._sort_overrides(ns)
        return ns, extras

    def _sort_overrides(self, ns: argparse.Namespace) -> None:
        """An override given before a positional (``generate a=1 "a prompt"``) lands in the positional's slot;
        give every ``key=value`` token to the overrides and the rest, in order, to the single-valued positionals."""
        singles = self._positional_actions
        if not hasattr(ns, "overrides") or not singles or any(a.nargs is not None for a in singles):
            return
        tokens = [getattr(ns, a.dest) for a in singles] + list(ns.overrides or [])
        if any(not isinstance(t, str) for t in tokens):
            return
        plain = [t for t in tokens if not OVERRIDE.match(t)]
        if len(plain) != len(singles):  # a positional itself looks like key=value: keep argparse's reading
            return
        for a, t in zip(singles, plain):
            setattr(ns, a.dest, t)
        ns.overrides = [t for t in tokens if OVERRIDE.match(t)]


#: A ``key=value`` config override: a dotted key, then ``=``.
OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*=")


def package_config_dir(module_file: str | os.PathLike) -> Path:
    """The configs folder of the package whose module is ``module_file``: ``<package>/configs`` inside an installed
    wheel, ``configs/`` beside ``src/`` in a checkout or an editable install."""
    here = Path(module_file).resolve().parent
    for d in (here / "configs", here.parents[1] / "configs"):
        if d.is_dir():
            return d
    return here.parents[1] / "configs"


def resolve_config(value: str | os.PathLike | None, config_dir: str | os.PathLike, default: str = "tiny") -> Path:
    """A ``--config`` value as a file: an existing path, or the name of a shipped config in ``config_dir``
    (``tiny``, ``paper``, with or without ``.yaml``); None or empty is ``default``."""
    config_dir = Path(config_dir)
    if value is None or str(value) == "":
        value = default
    p = Path(value)
    if p.is_file():
        return p
    shipped = config_dir / (p.name if p.suffix else f"{p.name}.yaml")
    if p.parent == Path(".") and shipped.is_file():
        return shipped
    names = ", ".join(sorted(q.stem for q in config_dir.glob("*.yaml"))) or "none found"
    raise MissingFileError(f"config file not found: {value}",
                           f"pass a YAML path or the name of a shipped config in {config_dir}: {names}")


def add_config_arguments(p: argparse.ArgumentParser, default: str = "tiny") -> None:
    """``--config`` (path or shipped name) and the ``key=value`` overrides of a config-driven sub-command.

    Call it after the sub-command's own positionals are added: the overrides take the positionals left over."""
    p.add_argument("--config", default=default,
                   help=f"YAML config: a path, or a config the package ships (tiny, paper); default {default}")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", default=[],
                   help="config overrides anywhere on the line, e.g. seed=1 run_dir=outputs/x")


def check_overrides(overrides: Sequence[str]) -> list[str]:
    """``overrides`` checked to be ``key=value`` tokens; anything else is an InputError naming it."""
    bad = [o for o in overrides if not OVERRIDE.match(o)]
    if bad:
        raise InputError(f"unexpected argument(s) {', '.join(map(repr, bad))}",
                         "config overrides are key=value (e.g. seed=1); quote a positional that holds spaces")
    return list(overrides)


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
    conv = sub.add_parser("convert-ply", help="re-export 3DGS PLY files in another world convention (opencv: -y up, "
                          "facing -z, for viewers built around COLMAP scenes; opengl: +y up, facing +z, the default)")
    conv.add_argument("src", help="a 3DGS .ply, or a folder: every 3DGS .ply in it")
    conv.add_argument("--out", required=True, help="destination file (or folder when SRC is a folder)")
    conv.add_argument("--convention", choices=("opencv", "opengl"), default="opencv")
    conv.add_argument("--overwrite", action="store_true", help="replace existing destination files")

    def _convert(args: argparse.Namespace) -> int:
        from avatar_core.io.ply import convert_ply

        for path in convert_ply(args.src, args.out, args.convention, overwrite=args.overwrite):
            print(f"wrote {path} ({args.convention})")
        return 0

    conv.set_defaults(func=_convert)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
