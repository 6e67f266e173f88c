"""Shared fixtures: the Anny body (built once per session) and the tiny SVD-layout configs."""

from __future__ import annotations

import pytest
import torch

from avatar_core.body import load_body_model


@pytest.fixture(scope="session")
def body():
    return load_body_model("anny")


@pytest.fixture(scope="session")
def tiny_cfg():
    from gas.config import load_gas_config

    return load_gas_config("tiny")


@pytest.fixture()
def tiny_parts(tiny_cfg):
    from omegaconf import OmegaConf

    from gas.svd_parts import build_tiny_parts
    from gas.video_unet import ConditioningConfig

    v = tiny_cfg.video
    plain = lambda n: OmegaConf.to_container(n, resolve=True)  # noqa: E731
    torch.manual_seed(0)
    return build_tiny_parts(plain(v.unet), plain(v.vae), plain(v.image_encoder), plain(v.scheduler),
                            ConditioningConfig(**plain(v.conditioning)))
