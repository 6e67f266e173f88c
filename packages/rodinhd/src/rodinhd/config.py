"""Typed settings of every RodinHD stage, read by :func:`load_rodinhd_config` from YAML plus ``key=value`` overrides.

The schema is the dataclass tree below; ``configs/paper.yaml`` fills it with the paper's numbers (Sec. 4.1,
App. A, Table 5) and ``configs/tiny.yaml`` with a scale that runs end to end on a laptop CPU. Unknown keys are
rejected with the nearest valid ones (:func:`avatar_core.config.load_config`). The modules of the package take
plain arguments; :mod:`rodinhd.pipeline` maps these configs onto them.

The dataclass defaults are not one source: each field that a source fixes says whether its default is the paper's
value (Table 5, App. A, an equation), the authors' code's (RodinHD/RodinHD @ 690d34d, marked CODE where it differs
from the paper) or ours. ``configs/paper.yaml`` has every paper value, ``configs/authors_code.yaml`` every code
value, each line with its source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avatar_core.cli import package_config_dir, resolve_config
from avatar_core.config import load_config
from avatar_core.train import TrainConfig

__all__ = [
    "CONFIG_DIR",
    "DataConfig",
    "TriplaneConfig",
    "DecoderConfig",
    "Stage1Config",
    "Stage2Config",
    "RenderConfig",
    "ConditioningConfig",
    "UNetConfig",
    "DiffusionTrainConfig",
    "BaseConfig",
    "UpsampleConfig",
    "SampleConfig",
    "EvalConfig",
    "AblationConfig",
    "RodinHDConfig",
    "config_path",
    "load_rodinhd_config",
]

#: The package's shipped configs (``tiny.yaml``, ``paper.yaml``): inside the package in a wheel, beside ``src/`` in a
#: checkout or an editable install.
CONFIG_DIR = package_config_dir(__file__)


@dataclass
class DataConfig:
    """The synthetic avatar dataset (``avatar-core make-dataset``) or any folder in its format."""

    root: str = ""
    """Dataset folder; empty means ``<out>/data`` (written by ``train-all`` when missing)."""
    num_avatars: int = 8
    """Avatars to generate; the last ``held_out`` are kept out of fitting and training."""
    views: int = 36
    """Views per avatar on an orbit (fitting targets)."""
    res: int = 256
    """Render and portrait resolution in pixels."""
    uv_res: int = 512
    """UV texture resolution of the generator."""
    seed: int = 0
    held_out: int = 1
    """Avatars reserved for sampling from an unseen portrait and for generation metrics."""
    on_error: str = "stop"
    """An avatar whose files are missing or corrupt: "stop" the run naming it, or "skip" it (logged)."""
    num_workers: int = 0
    """DataLoader worker processes reading training items from disk (0: read in the training process)."""
    view_cache: int = 0
    """Avatars whose decoded views the fitting loop keeps in memory (stage 1 revisits its subset; 0 keeps none)."""
    stats_items: int = 0
    """Avatars the normaliser's statistics are measured on, a seeded subset (0: all training avatars)."""


@dataclass
class TriplaneConfig:
    """The triplane avatar (Sec. 3.1): 3 planes of ``resolution^2 x channels`` covering ``center +- bound``."""

    channels: int = 32
    resolution: int = 512
    bound: float = 1.0
    """Half side of the world cube the planes span (metres; the dataset's bodies are centred, ~1.8 m tall)."""
    center: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])


@dataclass
class DecoderConfig:
    """The shared MLP decoder (:class:`rodinhd.decoder.TriplaneDecoder`)."""

    reduce: str = "sum"
    hidden_dim: int = 64
    geo_feat_dim: int = 15
    density_layers: int = 2
    color_layers: int = 2
    density_activation: str = "exp"
    density_bias: float = 0.0
    color_channels: int = 0
    """0: every channel to the density net (ours); 24 of 32 to the colour net (the authors' network.py)."""
    view_dependent: bool = False
    """Colour also reads a frequency encoding of the view direction (the authors'; ours: False)."""
    dir_frequencies: int = 4


@dataclass
class Stage1Config:
    """Stage 1, Algorithm 1: task replay + IWC on a subset (:func:`rodinhd.fitting.fit_shared`).

    The defaults MIX sources, each marked: iteration counts are the paper's (Table 5 / App. A), learning rates and
    regularisers the authors' code's (RodinHD @ 690d34d), since Table 5's constant rates are what ``paper.yaml``
    sets. ``paper.yaml`` holds every paper value, ``authors_code.yaml`` every code value, ``tiny.yaml`` its own.
    """

    num_avatars: int = 64
    """Avatars fitted jointly with the decoder. Paper (App. A: 64); code @ 690d34d: 256. 0: all training avatars."""
    outer_loops: int = 30
    """Paper (Table 5 "Outer loop iterations per avatar"); the code @ 690d34d agrees."""
    inner_iterations: int = 5000
    """Paper (Table 5 "Inner loop iterations"); code @ 690d34d: 6000."""
    rays_per_step: int = 8192
    """Paper (App. A, Table 5 "Ray batch size"); the code agrees."""
    num_samples: int = 1024
    """Paper (Table 5 "Samples per ray")."""
    triplane_lr: float = 2e-2
    """CODE @ 690d34d (2e-2 / (10 loop + 1)); paper (Table 5): 2e-3, constant."""
    triplane_lr_loop_decay: float = 10.0
    """CODE @ 690d34d (the 10 of 2e-2 / (10 loop + 1)); paper (Table 5): 0, one constant rate."""
    decoder_lr: float = 2e-3
    """CODE @ 690d34d (2e-3 x 0.1^(iter / (50 inner))); paper (Table 5): 2e-4, constant."""
    decoder_lr_decay_visits: float = 50.0
    """CODE @ 690d34d (the 50 above); paper (Table 5): inf, one constant rate."""
    tv_weight: float = 2e-4
    """CODE @ 690d34d; paper (Table 5 "Loss Weight of TV regularization"): 1e-2."""
    l2_weight: float = 0.0
    """CODE @ 690d34d (no L2); paper (Table 5 "Loss Weight of L2 regularization"): 1e-4."""
    l1_weight: float = 1e-6
    """CODE @ 690d34d; paper (Table 5): no L1 term (0)."""
    weight_decay: float = 0.0
    """Paper (Table 5 "Ours": 0; 1e-4 only in its "+ Weight decay" column); the code agrees."""
    iwc_weight: float = 0.1
    """Paper (Table 5 "Loss Weight of IWC regularization", Eq. 3's lambda); the code agrees."""
    iwc_half: bool = True
    """Paper (Eq. 3's lambda/2); code @ 690d34d: False (``sum F (w* - w)^2``, no 1/2)."""
    iwc_normalize: bool = False
    """Paper and code (raw Fisher values); True is ours (Fisher divided by its mean)."""
    distortion_weight: float = 0.0
    """Paper (no distortion loss); code @ 690d34d: 2e-5 (mip-NeRF 360's)."""
    occupancy: bool = True
    """Paper (App. A: an occupancy grid); the code agrees (torch-ngp's)."""
    grid_resolution: int = 128
    """Paper (App. A: 128^3)."""
    grid_update_every: int = 16
    """Ours (neither source gives one)."""
    init_std: float = 0.1
    """Ours."""
    shuffle: bool = False
    """Paper (Algorithm 1 visits s = 1..S in order); the code agrees."""


@dataclass
class Stage2Config:
    """Stage 2: frozen decoder, every avatar fitted on its own, sharded by rank (:func:`rodinhd.fitting.fit_triplanes`).

    As in :class:`Stage1Config`: the iteration count is the paper's, the rate and regularisers the code's."""

    iterations: int = 25000
    """Paper (App. A "set to 25000"); code @ 690d34d: 30000."""
    rays_per_step: int = 8192
    """Paper (App. A); the code agrees."""
    num_samples: int = 1024
    """Paper (Table 5)."""
    triplane_lr: float = 2e-2
    """CODE @ 690d34d; paper: Table 5's 2e-3 (the same fitting loss as stage 1)."""
    tv_weight: float = 2e-4
    """CODE @ 690d34d; paper (Table 5): 1e-2."""
    l2_weight: float = 0.0
    """CODE @ 690d34d; paper (Table 5): 1e-4."""
    l1_weight: float = 1e-6
    """CODE @ 690d34d; paper (Table 5): none (0)."""
    occupancy: bool = True
    """Paper (App. A)."""
    grid_resolution: int = 128
    """Paper (App. A: 128^3)."""
    grid_update_every: int = 16
    """Ours."""
    init_std: float = 0.1
    """Ours."""
    init_from_stage1: bool = True
    """Ours: start a stage-1 avatar from its stage-1 triplane (the others start from noise)."""


@dataclass
class RenderConfig:
    """Rendering of full views (:func:`rodinhd.renderer.render_views`)."""

    num_samples: int = 512
    """Marching steps across the cube's diagonal."""
    occupancy: bool = True
    grid_resolution: int = 128
    grid_updates: int = 16
    """Occupancy-grid updates from zero for a generated triplane (App. A: 16)."""
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    early_stop_eps: float = 1e-4
    chunk: int = 32768


@dataclass
class ConditioningConfig:
    """Portrait features (Sec. 3.2, Eqs. 7-8): a pretrained SD/SDXL VAE from a local folder or the embedded VAE."""

    vae_path: str = ""
    """Local SD/SDXL ``AutoencoderKL`` folder (paper: SDXL VAE); empty trains the package's small VAE."""
    portrait_size: int = 256
    kernel_sizes: list[int] = field(default_factory=lambda: [16, 8, 4])
    """Patch kernels (= strides) per scale H/2, H/4, H/8."""
    token_dim: int = 512
    vae_base_channels: int = 32
    vae_latent_channels: int = 4
    vae_steps: int = 2000
    vae_batch_size: int = 8
    vae_lr: float = 2e-4
    vae_kl_weight: float = 1e-4


@dataclass
class UNetConfig:
    """:class:`rodinhd.unet.TriplaneUNet` settings (App. A; the image size and channels come from the triplanes)."""

    model_channels: int = 192
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 3, 4])
    num_res_blocks: list[int] = field(default_factory=lambda: [3, 3, 3, 3, 3])
    attention_resolutions: list[int] = field(default_factory=lambda: [32, 16, 8])
    cross_attn_resolutions: list[int] = field(default_factory=lambda: [32, 16, 8])
    middle_cross_attn: bool = True
    conv3d_resolutions: list[int] = field(default_factory=lambda: [128])
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    num_heads: int = 4
    num_head_channels: int = 64
    attention_pool: bool = True
    resblock_updown: bool = True
    fold_planes: bool = False
    emb_channels: int = 768


@dataclass
class DiffusionTrainConfig(TrainConfig):
    """The kernel's training-loop settings (:class:`avatar_core.train.TrainConfig`) of one diffusion model, plus
    its batch and optimiser (which the kernel leaves to the caller). Defaults are the paper's base model (App. A)."""

    output_dir: str = ""
    """Empty: the run folder's ``base/`` or ``upsample/`` (``--out``); another folder is refused."""
    seed: int | None = None
    """None: the run's ``seed``."""
    max_steps: int = 100000
    ema_decay: float | None = 0.9999
    checkpoint_every: int = 5000
    log_every: int = 100
    batch_size: int = 96
    """The global batch (all processes together; :mod:`avatar_core.train.sharding`)."""
    optimizer: str = "adamw"
    """"adamw" (paper, base) or "adam" (paper, upsampler)."""
    lr: float = 1e-5
    weight_decay: float = 0.0


@dataclass
class BaseConfig:
    """The base model (Sec. 3.2, Eq. 4): portrait -> low-res triplane."""

    resolution: int = 128
    """Plane side of the low-res triplanes (fitted triplanes are area-downsampled to it)."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    context_resolutions: list[int] = field(default_factory=lambda: [32, 16, 8])
    num_steps: int = 1000
    schedule: str = "rodin_cosine_light"
    vlb_weight: float = 1e-3
    cond_drop_prob: float = 0.2
    guidance_scale: float = 1.3
    sample_steps: int = 10
    condition: str = "multi_scale"
    """Portrait condition (:data:`rodinhd.conditioning.CONDITION_MODES`): ``multi_scale`` (the paper: the encoder's
    scale i read at ``context_resolutions[i]``), ``single_scale`` (the tokens of one scale at every cross-attention
    layer) or ``global`` (one pooled token of one scale at every layer; Rodin's CLIP-token baseline, Tab. 4(b))."""
    condition_scale: int = -1
    """The scale ``single_scale`` / ``global`` read: an index into the first ``len(context_resolutions)`` feature
    maps (-1: the deepest of them, H/8)."""
    train: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)


def _upsample_unet() -> UNetConfig:
    return UNetConfig(model_channels=128, channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 6], attention_resolutions=[],
                      cross_attn_resolutions=[], middle_cross_attn=True, conv3d_resolutions=[512, 256, 128],
                      use_scale_shift_norm=False, emb_channels=512)


def _upsample_loop() -> DiffusionTrainConfig:
    return DiffusionTrainConfig(batch_size=32, optimizer="adam")


@dataclass
class UpsampleConfig:
    """The upsample model (Sec. 3.2, Eqs. 5-6): low-res + portrait -> triplane at ``triplane.resolution``."""

    unet: UNetConfig = field(default_factory=_upsample_unet)
    context_resolutions: list[int] = field(default_factory=lambda: [128])
    num_steps: int = 100
    schedule: str = "rodin_sigmoid"
    cond_drop_prob: float = 0.2
    guidance_scale: float = 1.3
    sample_steps: int = 10
    variance_type: str = "fixed_large"
    aug_mode: str = "noise"
    """Conditional augmentation (:mod:`rodinhd.augment`): ``degrade`` (blur + downsample + bicubic, the authors'
    route) or ``noise`` (CDM noise augmentation on ``aug_schedule``); every level is ours."""
    aug_schedule: str = "cosine"
    aug_max_train: float = 0.3
    aug_sample: float = 0.1
    aug_blur_max: float = 1.0
    """``degrade``: Gaussian blur std at level 1, in low-resolution texels (ours)."""
    aug_down_max: float = 2.0
    """``degrade``: extra area-downsampling factor at level 1 (ours)."""
    patch_size: int = 64
    """Code @ 690d34d (64-pixel patches; the paper gives no size)."""
    image_loss_weight: float = 1.0
    """Paper (Eq. 6 added with weight 1); the code agrees (render loss weight 1)."""
    perceptual_weight: float = 0.5
    """CODE @ 690d34d (LPIPS 0.5); paper (Eq. 6: L_Pixel + L_Perc): 1."""
    render_num_samples: int = 128
    """Marching steps for the image-level loss's patches."""
    perceptual: str = "vgg"
    """The perceptual term of Eq. 6. Paper: ``vgg`` (sum over VGG-16 layers of feature distances, Psi^l "extracted
    using a pre-trained VGG"); code @ 690d34d: ``lpips`` (LPIPS over VGG-16). It decides which weight files a run
    requires (:func:`rodinhd.streaming.resolve_standins`)."""
    vgg_path: str = ""
    """torchvision VGG-16 weights file for the perceptual term; empty uses the embedded structural loss."""
    lpips_path: str = ""
    """LPIPS ``vgg.pth`` linear heads, read when ``perceptual`` is ``lpips`` (with ``vgg_path``)."""
    train: DiffusionTrainConfig = field(default_factory=_upsample_loop)


@dataclass
class SampleConfig:
    """Sampling and outputs: portrait -> base -> upsample -> triplane -> 360-degree renders."""

    num_views: int = 36
    view_res: int = 512
    turntable_frames: int = 72
    turntable_res: int = 512
    fps: float = 24.0
    radius: float = 2.8
    elevation: float = 0.0
    fov_deg: float = 40.0
    base_steps: int = 10
    upsample_steps: int = 10
    guidance_scale: float = 1.3
    seed: int = 0
    use_ema: bool = True


@dataclass
class EvalConfig:
    """``rodinhd evaluate``: fitting and generation metrics and the 3D-consistency refit."""

    num_avatars: int = 8
    """Avatars scored for fitting (first N training avatars) and for generation (held-out first)."""
    refit_views: int = 36
    refit_res: int = 256
    refit_iterations: int = 2000
    refit_rays_per_step: int = 4096
    lpips_path: str = ""
    """LPIPS weights (``vgg.pth``) plus VGG-16 (``vgg_path``) for LPIPS; empty: LPIPS is not reported."""
    vgg_path: str = ""


@dataclass
class DiffusionAblationConfig:
    """``rodinhd ablate-diffusion``: the base-model rows of Table 4(b), each trained with the same budget on the
    run's fitted triplanes and scored on held-out portraits (:mod:`rodinhd.ablation_diffusion`)."""

    rows: list[str] = field(default_factory=lambda: ["A", "B", "C", "D", "E"])
    seeds: list[int] = field(default_factory=lambda: [0])
    max_steps: int = 1200
    """Optimizer steps per row (the same for every row); batch size, rate and EMA are ``base.train``'s."""
    low_resolution: int = 0
    """Plane side of row A ("Rodin (256)"); 0: half of ``base.resolution`` (the paper's 256 vs 512)."""
    default_schedule: str = "linear"
    """Rows A-B's "original noise": the default linear schedule (Ho et al. 2020; the paper's Fig. 6 "default");
    rows C-E use ``base.schedule``."""
    num_held_out: int = 0
    """Held-out avatars to score (0: all of the run's)."""
    samples_per_portrait: int = 1
    sample_steps: int = 0
    """0: ``base.sample_steps``."""
    eval_num_samples: int = 96
    """Samples per ray when rendering the generated triplanes."""


@dataclass
class AblationConfig:
    """``rodinhd ablate-fitting``: the rows of Table 4(a) on a small set at Table 5's iteration counts per row
    (:mod:`rodinhd.ablation`), scored on held-out views. Defaults are ours (a small scale); paper.yaml holds the
    paper's (64 avatars, 30 x 5000, 512^2 x 32)."""

    num_avatars: int = 8
    """Avatars fitted by every row (the first N training avatars; paper: the stage-1 subset of 64, App. A)."""
    total_iterations: int = 240000
    """Iterations of a task-replay row (C-E), split over avatars x loops; rows A-B visit each avatar once for 3x a
    replay visit (Table 5: 15000 vs 30 x 5000)."""
    outer_loops: int = 30
    """Task-replay passes (Table 5: 30)."""
    earliest: int = 2
    """How many of the first-fitted avatars are scored apart (forgetting shows on them)."""
    channels: int = 8
    resolution: int = 32
    """Row B's triplane side (the paper's 512); row A's is half of it (the paper's 256)."""
    rows: list[str] = field(default_factory=lambda: ["Rodin (256)", "Rodin (512)", "+ Task replay", "+ Weight decay",
                                                     "+ Consolidation"])
    """Table 4(a)'s rows by name (:data:`rodinhd.ablation.ABLATION_ROWS`)."""
    held_out_every: int = 4
    """Every k-th view of each avatar is held out of fitting and the rows are scored on those (ours)."""
    seeds: list[int] = field(default_factory=list)
    """Seeds to repeat every row with (mean and half range reported); empty: the run's ``seed``."""
    rays_per_step: int = 1024
    num_samples: int = 128
    occupancy: bool = False
    eval_num_samples: int = 128
    sweep_resolutions: list[int] = field(default_factory=lambda: [8, 16, 32])
    """``rodinhd ablate-triplane`` (Table 6 small): triplane resolutions x channels fitted to one avatar."""
    sweep_channels: list[int] = field(default_factory=lambda: [2, 4, 8])
    sweep_iterations: int = 250
    diffusion: DiffusionAblationConfig = field(default_factory=DiffusionAblationConfig)
    """``rodinhd ablate-diffusion`` (Table 4(b) small)."""


@dataclass
class RodinHDConfig:
    """Every RodinHD setting, one section per stage."""

    name: str = "rodinhd"
    seed: int = 0
    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda[:N]"."""
    data: DataConfig = field(default_factory=DataConfig)
    triplane: TriplaneConfig = field(default_factory=TriplaneConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    render: RenderConfig = field(default_factory=RenderConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    upsample: UpsampleConfig = field(default_factory=UpsampleConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    standins: list[str] = field(default_factory=list)
    """Embedded stand-ins allowed where a paper network is not configured: ``portrait_vae`` (for the SDXL VAE),
    ``ssim_perceptual`` (for VGG-16 / LPIPS), ``vgg_feature_distance`` (for LPIPS's heads); empty: the paper's
    networks are required and their files checked before any work."""


def config_path(name_or_path: str | os.PathLike | None) -> Path:
    """A config file: a path, or the name of a shipped one (``tiny``, ``paper``, with or without ``.yaml``)."""
    return resolve_config(name_or_path, CONFIG_DIR)


def load_rodinhd_config(config: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The full config: schema defaults <- ``config`` (a path or ``tiny``/``paper``) <- ``key=value`` overrides."""
    return load_config(RodinHDConfig, config_path(config), list(overrides))
