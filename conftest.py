"""Repository-wide test set-up.

Under pytest-xdist each worker runs on one core with one torch thread (two workers on two cores beat one
process whose two threads fight over the cores). Before workers start, the controller builds what every
worker would otherwise build at the same moment: the Anny body's Warp kernels (about a minute, once per
machine) and the CPU rasterizer's compiled kernel.
"""

from __future__ import annotations

import os

import torch


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        return
    if getattr(config.option, "numprocesses", None):
        from avatar_core.body import load_body_model
        from avatar_core.render._gaussians_cpu import load_kernel

        load_body_model("anny")
        load_kernel()
