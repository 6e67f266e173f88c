"""`make demo`: run the toolkit's main job on the embedded defaults and leave viewable results.

Writes into ``--out``: ``environment.txt`` (what this machine can run) and ``summary.json``. Each method package
adds its own part here when it lands.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from avatar_core.env import environment_report, format_report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary: dict[str, object] = {}

    report = format_report(environment_report())
    (args.out / "environment.txt").write_text(report + "\n")
    print(report)
    summary["environment"] = str(args.out / "environment.txt")

    summary["seconds"] = round(time.time() - t0, 2)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ndemo outputs in {args.out}/: " + ", ".join(sorted(p.name for p in args.out.iterdir())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
