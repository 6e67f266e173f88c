"""GaussianIP's settings as dataclasses, loaded through :func:`avatar_core.config.load_config`.

The defaults equal the tiny CPU scale; ``configs/paper.yaml`` holds the paper's and the official code's numbers
with their sources. Where the paper and the official code differ, the paper's value is the default and the code's
is a named option (see each field).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from avatar_core.cli import package_config_dir, resolve_config
from avatar_core.config import load_config as _load_config

#: The package's configs folder: inside the package in a wheel, beside src/ in a checkout.
CONFIG_DIR = package_config_dir(__file__)


@dataclass
class DatasetConfig:
    """The synthetic avatar dataset the embedded prior trains on (written by the kernel generator if absent)."""

    root: str = "outputs/gaussianip/dataset"
    num: int = 24
    views: int = 8
    res: int = 64
    uv_res: int = 256
    seed: int = 0
    held_out: int = 2
    """The last N avatars are kept out of training (their portraits are the held-out faces)."""


@dataclass
class EmbeddedPriorConfig:
    """Sizes and training of the embedded prior (``gaussianip train-prior``)."""

    image_size: int = 64
    vae_channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    unet_channels: list[int] = field(default_factory=lambda: [32, 64])
    head_dim: int = 8
    text_dim: int = 384
    """MiniLM token width (the paper's CLIP text encoder: 768)."""
    text_length: int = 77
    identity_size: int = 32
    identity_dim: int = 64
    identity_tokens: int = 4
    """IP tokens per face (IP-Adapter-FaceID: 4)."""
    vae_steps: int = 300
    identity_steps: int = 200
    diffusion_steps: int = 600
    batch_size: int = 16
    lr: float = 1.0e-3
    cond_dropout: float = 0.1
    """Probability of dropping text and identity together (the null branch CFG needs)."""
    seed: int = 0


@dataclass
class PaperPriorConfig:
    """Local folders of the paper-scale prior (nothing is downloaded)."""

    sd_path: str | None = None
    """SD-1.5-class pipeline folder (official: Realistic_Vision_V4.0_noVAE)."""
    vae_path: str | None = None
    """Separate VAE folder (official: sd-vae-ft-mse); null: the pipeline's vae/."""
    controlnet_path: str | None = None
    """control_v11p_sd15_openpose folder."""
    ip_adapter_path: str | None = None
    """ip-adapter-faceid-plusv2_sd15.bin."""
    image_encoder_path: str | None = None
    """CLIP-ViT-H-14 image encoder folder (h94/IP-Adapter models/image_encoder)."""
    insightface_root: str | None = None
    """Folder holding insightface models (models/buffalo_l); or use face_embedding_path."""
    face_embedding_path: str | None = None
    """A precomputed 512-d ArcFace embedding (.npy / .pt / .safetensors) instead of running insightface."""
    dtype: str = "float16"


@dataclass
class PriorConfig:
    kind: str = "embedded"
    """'embedded' (trained here on synthetic avatars) or 'paper' (SD-1.5 + ControlNet + IP-Adapter-FaceID-PlusV2)."""
    cache_dir: str = "outputs/gaussianip/prior"
    """Where the embedded prior is trained once and read from."""
    embedded: EmbeddedPriorConfig = field(default_factory=EmbeddedPriorConfig)
    paper: PaperPriorConfig = field(default_factory=PaperPriorConfig)
    negative_prompt: str = "low quality, blurry, deformed, bad anatomy, extra limbs"


@dataclass
class CameraConfig:
    """Stage-1 camera sampler (official code)."""

    azimuth: list[float] = field(default_factory=lambda: [-180.0, 180.0])
    elevation: list[float] = field(default_factory=lambda: [-30.0, 30.0])
    distance: list[float] = field(default_factory=lambda: [1.3, 1.7])
    fovy: list[float] = field(default_factory=lambda: [40.0, 70.0])
    head_zoom_from: int = 1200
    head_zoom_p: float = 0.25
    head_distance: list[float] = field(default_factory=lambda: [0.4, 0.6])
    head_azimuth: list[float] = field(default_factory=lambda: [0.0, 180.0])
    upper_zoom_p: float = 0.2
    upper_distance: list[float] = field(default_factory=lambda: [0.6, 0.8])
    upper_azimuth: list[float] = field(default_factory=lambda: [-180.0, 0.0])
    zoom_raise: float = 0.65
    """Camera and target raised by this (body frame: height body_height, centred at 0)."""


@dataclass
class GaussiansConfig:
    body: str = "anny"
    body_dir: str | None = None
    body_height: float = 1.5
    """The body is scaled to this height and centred at the origin (the cameras' frame)."""
    num_points: int = 3000
    """Gaussians sampled on the body surface at the start (paper 100K)."""
    init_opacity: float = 0.1
    init_scale: float = 0.01
    sh_degree: int = 0


@dataclass
class OptimConfig:
    """Per-attribute Adam, as the official code trains (its YAML's single Adam lr 1e-3 is unused)."""

    xyz_lr: list[float] = field(default_factory=lambda: [2.0e-4, 1.0e-4])
    """Start and end (exponential decay over the stage)."""
    color_lr: float = 0.0125
    opacity_lr: float = 0.01
    scaling_lr: float = 0.005
    rotation_lr: float = 0.001
    eps: float = 1.0e-15


@dataclass
class DensifyConfig:
    """gsplat DefaultStrategy settings; the paper's schedule is the default, the code's steps an option."""

    schedule: str = "paper"
    """'paper': densify and prune every 800 steps from 200 to 1700; 'code': at steps 500, 1000, 1500."""
    grad_threshold: float = 2.0e-4
    min_opacity: float = 0.05
    extent: float = 4.0
    prune_only_step: int = 1800
    prune_only_opacity: float = 0.04
    prune_only_scale: float = 0.015
    reference_steps: int = 2400


@dataclass
class Stage1Config:
    """HDS with the adaptive timestep schedule (Sec. 3.1-3.2)."""

    steps: int = 120
    batch_size: int = 2
    render_size: int = 64
    """Render size (paper 1024, resized to the VAE's 512)."""
    guidance_scale: float = 7.5
    denoiser_switch_t: int = 170
    """delta_d = eps_null below, eps_null - eps_neg above (HumanGaussian: 200)."""
    grad_clip: float = 1.0
    """Norm of the HDS gradient along the latent width for each (batch, channel, row) is clipped to this."""
    timesteps: str = "ahds"
    """'ahds' (paper), 'uniform' or 'linear' (ablations)."""
    ip_scale: float = 0.5
    structure_scale: float = 0.4
    controlnet_scale: float = 1.0
    sparsity: str = "depth"
    """Sparsity loss mean(sqrt(x^2 + 0.01)) on normalised depth (code) or on 'opacity'."""
    sparsity_weight: float = 0.0
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    cameras: CameraConfig = field(default_factory=CameraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    preview_every: int = 40


@dataclass
class VCRConfig:
    """View-consistent refinement (Sec. 3.3)."""

    mode: str = "vcr"
    """'vcr' (mutual attention) or 'independent' (each view alone: the ablation baseline)."""
    num_views: int = 16
    """Views on the orbit (official 32 at 11.25 deg); must be a multiple of 8."""
    elevation: float = 17.0
    distance: float = 1.5
    fovy: float = 70.0
    size: int = 64
    """Render size (official 1024; the VAE reads it resized to the prior's size)."""
    lambda_self: float = 0.55
    ddim_steps: int = 50
    refine_steps: int = 8
    """The last N of the DDIM steps are run (official 8 of 50, from t ~ 142)."""
    guidance_scale: float = 7.5
    ip_scale: float = 0.6
    structure_scale: float = 0.5
    layers: str = "decoder"
    """'decoder': every self-attention of the UNet's up blocks (SD-1.5: the nine official ones), or a
    comma-separated list of attention module names."""
    key_reference: str = "code"
    """Which principal view a key view attends to: 'code' (45/135 -> front, -45/-135 -> back, official code) or
    'nearest' (the nearer of front and back, the paper's 'nearest principal view')."""
    seed: int = 2024


@dataclass
class ReconConfig:
    """Stage 3: 3DGS fitted to the refined views."""

    steps: int = 60
    batch_size: int = 8
    """Paper 8; the official code uses 4."""
    l1_weight: float = 10.0
    lpips_weight: float = 15.0
    vgg_weights: str | None = None
    """torchvision vgg16 state dict for LPIPS-VGG (paper); null: the kernel's named random-feature stand-in."""
    lpips_weights: str | None = "auto"
    """LPIPS v0.1 linear heads: a file, 'auto' (the installed lpips wheel's), or null (LPIPS's baseline)."""
    densify_step: int = 100
    """One densification at this step (scaled by steps / reference_steps)."""
    reference_steps: int = 800


@dataclass
class OutputConfig:
    turntable_frames: int = 24
    fps: int = 12
    size: int = 128
    radius: float = 2.2
    fovy: float = 50.0


@dataclass
class AnimateConfig:
    motion: str = "walk"
    frames: int = 24


@dataclass
class GaussianIPConfig:
    run_dir: str = "outputs/gaussianip/runs"
    device: str = "auto"
    seed: int = 0
    threads: int = 0
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    gaussians: GaussiansConfig = field(default_factory=GaussiansConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    vcr: VCRConfig = field(default_factory=VCRConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    animate: AnimateConfig = field(default_factory=AnimateConfig)


def config_path(name: str | Path) -> Path:
    """``tiny`` / ``paper`` (the shipped configs) or a YAML path (:func:`avatar_core.cli.resolve_config`)."""
    return resolve_config(name, CONFIG_DIR)


def load_gaussianip_config(name: str | Path = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> GaussianIPConfig:
    return _load_config(GaussianIPConfig, config_path(name), list(overrides))
