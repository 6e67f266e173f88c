"""Repository-wide test set-up.

Tests run with one torch thread: the models are tiny, and two intra-op threads on a busy two-core machine
spin against each other (measured 5-10x slower). `make test` runs one pytest-xdist worker per core instead.
Before workers start, the controller builds what every worker would otherwise build at the same moment: the
Anny body's Warp kernels (about a minute, once per machine) and the CPU rasterizer's compiled kernel.
"""

from __future__ import annotations

import os

import torch


def pytest_configure(config):
    torch.set_num_threads(1)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if getattr(config.option, "numprocesses", None):
        from avatar_core.body import load_body_model
        from avatar_core.render._gaussians_cpu import load_kernel

        load_body_model("anny")
        load_kernel()
