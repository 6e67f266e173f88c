"""Typed settings of GAS, read by :func:`load_gas_config` from YAML plus ``key=value`` overrides.

``configs/paper.yaml`` holds the paper's and the official code's numbers (each with its source) and
``configs/tiny.yaml`` a scale that trains and samples end to end on a laptop CPU. Unknown keys are rejected with
the nearest valid ones (:func:`avatar_core.config.load_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avatar_core.cli import package_config_dir, resolve_config
from avatar_core.config import load_config
from avatar_core.train import TrainConfig
from gas.human_nerf import NeRFConfig
from gas.objective import EDMConfig
from gas.video_unet import ConditioningConfig

#: The package's configs folder: inside the package in a wheel, beside src/ in a checkout.
CONFIG_DIR = package_config_dir(__file__)


@dataclass
class DataConfig:
    """Synthetic clips (:mod:`avatar_core.data.clips`) of the synthetic avatars; the last ``held_out`` are unseen."""

    clips: str = ""
    """Clip folder; empty means ``<run>/clips`` (written by train-nerf when missing)."""
    dataset: str = ""
    """Optional kernel multi-view dataset (``avatar-core make-dataset`` layout, or a real capture laid out so) whose
    avatars add reference view -> other views pairs to stage 1 (the last ``held_out`` are left out)."""
    num_avatars: int = 6
    held_out: int = 2
    frames: int = 8
    """Frames per clip (the video model's frame count)."""
    res: int = 32
    uv_res: int = 128
    seed: int = 0


@dataclass
class NeRFTrainConfig:
    """Stage 1 training (SHERF's losses: 100 MSE + 10 mask + (1 - SSIM) + LPIPS, Adam lr 0.0025)."""

    lr: float = 0.0025
    targets_per_step: int = 2
    """Target frames rendered per step (other views and other poses of the reference)."""
    mse_weight: float = 100.0
    mask_weight: float = 10.0
    ssim_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_weights: str = ""
    """Local torchvision VGG-16 state dict for LPIPS (:mod:`avatar_core.perceptual`); empty: the kernel's named
    random-feature stand-in (recorded in the run's settings)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=60, checkpoint_every=1000, log_every=10))


@dataclass
class VideoModelConfig:
    """The video prior: SVD-xt-1.1 from ``pretrained`` (paper) or tiny parts from the configs below."""

    pretrained: str = ""
    """Local SVD pipeline folder (unet/, vae/, image_encoder/, scheduler/); empty: the tiny parts below."""
    unet: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    image_encoder: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    dtype: str = "float32"


@dataclass
class VideoTrainConfig:
    name: str = "full"
    """Variant name: the model trains into ``<run>/video_<name>`` (ablations: no_nerf, no_switcher)."""
    lr: float = 1e-4
    """AdamW learning rate (the full UNet is trained, as GAS fine-tunes SVD)."""
    batch_size: int = 2
    """Clips per step; view and pose clips mixed, each with its switcher label."""
    edm: EDMConfig = field(default_factory=EDMConfig)
    vae_steps: int = 150
    """Steps of fitting the tiny VAE on clip frames (0 with a pretrained VAE)."""
    vae_lr: float = 2e-3
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=80, checkpoint_every=1000, log_every=10))


@dataclass
class SampleConfig:
    """Inference (official: Euler, 25 steps, 20 frames, fps 7 passed as 6, motion bucket 127, noise_aug 0)."""

    steps: int = 25
    frames: int = 20
    tile: int = 8
    """The model's frame count; longer sequences are tiled."""
    overlap: int = 2
    view_guidance: str = "triangular"
    """triangular (the paper's, any length), official (the authors' 20-frame list generalised) or constant."""
    pose_guidance: str = "constant"
    """constant (the paper's 2.0) or linear (SVD's ramp)."""
    min_guidance: float = 1.0
    max_guidance: float = 2.0
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug: float = 0.0
    repeat_noise: bool = True
    seed: int = 0
    video_fps: int = 8
    """Frame rate of the written MP4."""


@dataclass
class GASConfig:
    run: str = "outputs/gas"
    """Run folder: clips, NeRF and video checkpoints, caches."""
    threads: int = 0
    """Torch CPU threads (0: torch's default)."""
    body: str = "anny"
    body_dir: str = ""
    """SMPL-X folder when body = smplx."""
    data: DataConfig = field(default_factory=DataConfig)
    nerf: NeRFConfig = field(default_factory=NeRFConfig)
    nerf_train: NeRFTrainConfig = field(default_factory=NeRFTrainConfig)
    video: VideoModelConfig = field(default_factory=VideoModelConfig)
    video_train: VideoTrainConfig = field(default_factory=VideoTrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def config_path(name: str) -> Path:
    """``tiny`` / ``paper`` (shipped) or a path to a YAML file (:func:`avatar_core.cli.resolve_config`)."""
    return resolve_config(name, CONFIG_DIR)


def load_gas_config(name: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> Any:
    return load_config(GASConfig, config_path(name), list(overrides))
