"""Helpers shared by the benchmark scripts in tools/: peak-memory sampling and plain-text tables."""

from __future__ import annotations

import ctypes
import gc
import resource
import threading
import time
from collections.abc import Sequence


class PeakRSS:
    """Peak resident memory of this process during a block, sampled every 2 ms (MiB above the start)."""

    def __enter__(self):
        # Hand freed heap pages back first, so the baseline is live memory, not the allocator's cache.
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self._rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def print_table(rows: list[dict], columns: Sequence[str], digits: int = 3) -> None:
    """Print ``rows`` as an aligned table of ``columns`` (floats to ``digits`` places, large ones as integers)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.{digits}f}" if v < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
