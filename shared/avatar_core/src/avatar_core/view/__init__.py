"""The results viewer (``avatar-core view``): discovery of what is under a path, scene arrays, the viser server.

``viser`` is imported only when a server starts, so the rest of the kernel imports without it.
"""

from avatar_core.view.discover import LOOKED_FOR, Found, Result, discover
from avatar_core.view.scene import Splats, density_points, read_metrics, splats_from_ply, splats_from_tensors
from avatar_core.view.server import ViewerApp, free_port, serve

__all__ = ["LOOKED_FOR", "Found", "Result", "discover", "Splats", "density_points", "read_metrics",
           "splats_from_ply", "splats_from_tensors", "ViewerApp", "free_port", "serve", "add_view_command"]


def add_view_command(sub, default_path: str | None = None, what: str = "results", configure=None):
    """Add the ``view`` sub-command to a console script's sub-parsers (the kernel's and every method's CLI).

    ``default_path``: what ``view`` opens without a PATH (a method's run folder). ``configure(args) -> dict``:
    extra keyword arguments for :func:`serve` built from the parsed arguments (e.g. ``triplane_field``, or
    ``path`` when the default depends on other options). Returns the sub-parser, for a method's own options."""
    p = sub.add_parser("view", help=f"look at {what} in the browser (serves on 127.0.0.1, prints the URL)")
    p.add_argument("path", nargs="?", default=None,
                   help="a result folder, a run folder, a dataset folder or a .ply"
                        + (f" (default: {default_path})" if default_path else ""))
    p.add_argument("--port", type=int, default=8080, help="port (the next free one is taken if it is in use)")

    def _view(args) -> int:
        from pathlib import Path

        from avatar_core.cli import OVERRIDE
        from avatar_core.errors import InputError

        if args.path and hasattr(args, "overrides") and OVERRIDE.match(args.path) and not Path(args.path).exists():
            args.overrides, args.path = [args.path, *args.overrides], None  # a config override, not the PATH
        kwargs = dict(configure(args)) if configure is not None else {}
        fallback = kwargs.pop("path", None) or default_path
        path = args.path or fallback
        if path is None:
            raise InputError("view needs a PATH", "pass a result, run or dataset folder, or a .ply file")
        serve(path, port=args.port, **kwargs)
        return 0

    p.set_defaults(func=_view)
    return p
