"""TeRA's settings as dataclasses: one block per stage, loaded through :func:`avatar_core.config.load_config`.

``configs/paper.yaml`` holds the paper's numbers and ``configs/tiny.yaml`` a CPU scale; both are read on top of
the defaults below (which equal the tiny scale), then ``key=value`` overrides. A key that no dataclass has is an
error that names the nearest valid keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from avatar_core.cli import package_config_dir, resolve_config
from avatar_core.config import load_config as _load_config
from avatar_core.train import TrainConfig

#: The package's configs folder (paper.yaml, tiny.yaml): inside the package in a wheel, beside src/ in a checkout.
CONFIG_DIR = package_config_dir(__file__)
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"


@dataclass
class BodyConfig:
    """The body model and the fixed UV point set the Gaussians live on (TeRA Sec. 3.1)."""

    name: str = "anny"
    """Body model: 'anny' (embedded default) or 'smplx' (paper; licensed files from model_dir)."""
    model_dir: str | None = None
    """Folder of the SMPL-X files (SMPLX_NEUTRAL.npz, smplx_uv.obj); unused for Anny."""
    num_points: int = 5000
    """Gaussians per avatar (paper ~100K)."""
    point_seed: int = 0
    """Fixes the UV point set; an avatar file records it and must match when reloaded."""
    uv_resolution: int = 64
    """Resolution of the rasterised UV layout used for part masks and texture edits."""
    knn_k: int = 3
    """Neighbours averaged for each Gaussian's base scale."""


@dataclass
class DataConfig:
    """The synthetic avatar dataset (avatar_core.data) and how its avatars are split and read."""

    root: str = "outputs/tera/dataset"
    """Dataset folder (meta.json, avatars/NNNNNN/...) in avatar_core's layout."""
    synthetic: bool = True
    """True: ``tera fit-teacher --make-dataset`` (what `make train-tera` runs) writes the synthetic dataset of the
    sizes below at ``root`` when it is missing. False (paper): ``root`` is the user's dataset, never generated."""
    num: int = 16
    """Avatars to write when the pipeline creates the dataset itself."""
    views: int = 8
    """Calibrated views per avatar when creating the dataset."""
    res: int = 64
    """Render resolution when creating the dataset."""
    uv_res: int = 128
    """UV texture resolution when creating the dataset."""
    seed: int = 0
    """Dataset seed when creating it."""
    max_avatars: int = 0
    """Use only the first N avatars (0: all)."""
    image_size: int = 64
    """Views are resized to this size for fitting and distillation (paper: IDOL 640x896)."""
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    lit_renders: bool = False
    """Light the Gaussians' colours (then an albedo) with the dataset's recorded light rig (its meta.json's
    "lighting", avatar_core.render.lighting) wherever renders are compared with its views: the teacher fit, its
    consistency, stage 1 and its PSNR. False: unlit colours are fitted to the lit views (IDOL on its data), so
    the views' shading is baked into the colours, darkening them by the mean shade. Generated avatars render unlit."""
    """Colour behind the avatar in renders and RGBA targets."""
    eval_views: list[int] = field(default_factory=lambda: [1])
    """Views held out of fitting and distillation, for the reconstruction PSNR."""
    on_error: str = "stop"
    """An avatar whose files are missing or corrupt: "stop" the run naming it, or "skip" it (logged)."""
    num_workers: int = 0
    """DataLoader worker processes reading diffusion-training items from disk (0: in the training process)."""
    view_cache: int = 64
    """Avatars whose decoded views are kept in memory (fitting and distillation revisit them)."""
    body_cache: int = 64
    """Avatars whose posed bodies are kept in memory (recomputed from body.safetensors when evicted)."""
    stats_items: int = 0
    """Avatars the latent scale is measured on, a seeded subset (0: all)."""


@dataclass
class TeacherConfig:
    """Teacher UV features (TeRA Sec. 3.2): IDOL's from disk, or the project's fitted teacher."""

    source: str = "fit"
    """'fit' (the project's own teacher, `tera fit-teacher`) or 'idol' (precomputed, read from features_dir)."""
    features_dir: str = ""
    """Folder of per-avatar feature files; empty: <run_dir>/teacher."""
    channels: int = 8
    """Feature channels (IDOL 32)."""
    geometry_channels: int = 4
    """Channels feeding the geometry branch (IDOL 16 of 32)."""
    geometry_hidden: int = 16
    """Geometry branch width (IDOL 64)."""
    texture_hidden: int = 32
    """Texture branch width (IDOL 128)."""
    offset_init: float = 1.0e-5
    """Offset head initialisation half-width (IDOL 1e-5)."""
    resolution: int = 64
    """Feature map size (IDOL 1536); a multiple of the latent resolution."""
    mode: str = "joint"
    """'joint' (all avatars in mini-batches over `epochs`, the decoder updated every step, then every avatar refitted
    for `refit_steps` with the decoder frozen) or 'sequential' (the original fitter: one avatar after another for
    `steps` iterations against the decoder as it is, never revisited)."""
    epochs: int = 40
    """Joint fit: passes over all avatars (each avatar takes one step per epoch)."""
    batch_avatars: int = 8
    """Joint fit: avatars per mini-batch (BatchNorm statistics are over the batch)."""
    refit_steps: int = 40
    """Joint fit: steps per avatar refitting its features to the frozen final decoder."""
    lambda_l2: float = 0.0
    """Joint fit: weight of the mean squared feature inside the UV charts."""
    lambda_tv: float = 0.0
    """Joint fit: weight of the mean squared difference of adjacent texels inside the charts (smoothness)."""
    feature_levels: list[int] = field(default_factory=list)
    """Joint fit: resolutions of the free feature parameters, upsampled to `resolution` and summed before the tanh
    (coarse levels move whole regions from the few pixels of a view); empty: one parameter per texel."""
    random_background: bool = False
    """Joint fit: composite every view over its own random colour (render and target alike) instead of
    `data.background`, so Gaussians spilling past the silhouette cannot lower the loss by taking the background's
    colour (IDOL renders over one colour)."""
    steps: int = 40
    """Sequential fit: iterations per avatar."""
    lr: float = 5.0e-4
    """Decoder learning rate (IDOL 5e-4)."""
    feature_lr: float = 3.0e-2
    """Per-avatar feature learning rate (auto-decoding)."""
    lambda_mse: float = 20.0
    """IDOL's MSE weight."""
    lambda_lpips: float = 10.0
    """IDOL's LPIPS weight (the perceptual stand-in without VGG weights)."""
    lambda_offset: float = 1.0
    """IDOL's offset regulariser weight."""
    views_per_step: int = 2
    """Views per iteration (IDOL 5)."""
    init_scale: float = 0.1
    """Standard deviation of the per-avatar features' random start (0: start at zero)."""
    grad_clip: float = 10.0
    """Gradient-norm clip (IDOL 10)."""
    vgg_weights: str | None = None
    """Local torchvision VGG16 weights for the perceptual terms; None: the embedded random-feature loss."""


@dataclass
class DistillConfig:
    """Stage 1: the distillation decoder (TeRA Sec. 3.2, Eq. 1)."""

    latent_resolution: int = 16
    """Latent size r (paper 256)."""
    upsample_factor: int = 4
    """Decoder output / latent resolution (paper 1024 / 256 = 4)."""
    hidden_channels: int = 32
    """Width of the decoder's upsampling trunk."""
    lambda_vgg: float = 0.5
    """Perceptual weight (not published; IDOL's 10 : 20 ratio)."""
    lambda_offset: float = 0.05
    """Offset regulariser weight (not published; IDOL's 1 : 20 ratio)."""
    lr: float = 5.0e-4
    """Adam learning rate."""
    batch_size: int = 1
    """Avatars per micro-batch, all processes together (avatar_core.train.sharding; paper 2 per GPU x 4)."""
    views_per_step: int = 2
    """Views rendered per avatar and step."""
    init_from_teacher: bool = True
    """Start the two branches from the fitted teacher's UV decoder when widths match."""
    lambda_teacher_maps: float = 0.0
    """Weight of a mean squared error, inside the UV charts, between the decoder's attribute maps and the fitted
    teacher's decoder on the avatar's full-resolution features (area-resized to the output). 0: the paper's Eq. 1
    (renders only). Needs the fitted teacher's decoder (teacher.source=fit)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        output_dir="", max_steps=150, checkpoint_every=50, log_every=10, max_grad_norm=10.0))
    """The shared training loop's settings; output_dir empty: <run_dir>/distill."""


@dataclass
class UNetConfig:
    """The latent UNet (diffusers UNet2DConditionModel); channels and size come from the latent."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    down_block_types: list[str] = field(default_factory=lambda: ["DownBlock2D", "CrossAttnDownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["CrossAttnUpBlock2D", "UpBlock2D"])
    layers_per_block: int = 1
    attention_head_dim: int = 4
    """Heads per attention layer (diffusers' historical name)."""
    norm_num_groups: int = 8


@dataclass
class TextConfig:
    """The prompt encoder (TeRA Sec. 3.4: CLIP, 77 x 768)."""

    encoder: str = "minilm"
    """'minilm' (embedded, 384-d) or 'clip' (paper; from a local folder)."""
    path: str | None = None
    """Local folder of the encoder's weights (required for CLIP)."""
    max_length: int = 77
    """Tokens, special tokens included (CLIP's 77)."""


@dataclass
class DiffusionConfig:
    """Stage 2: structured latent diffusion (TeRA Sec. 3.4)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    num_train_timesteps: int = 1000
    """Training chain length (paper 1000)."""
    schedule: str = "linear"
    """Beta schedule (DDPM linear; the paper does not name one)."""
    prediction: str = "x0"
    """UNet target (paper: x0)."""
    text_dropout: float = 0.2
    """Probability of training on the null text (paper 0.2)."""
    guidance_scale: float = 3.0
    """Classifier-free guidance at sampling (not published)."""
    sample_steps: int = 100
    """DDPM sampling steps (paper 100)."""
    ddim_steps: int = 25
    """Steps of the faster DDIM sampler."""
    per_channel_stats: bool = False
    """Measure the latent normalisation per channel."""
    pooled_text: bool = False
    """Also condition on the prompt's pooled token states, added to the UNet's timestep embedding (every block sees
    the prompt; cross-attention alone reaches only the attention levels)."""
    lr: float = 1.0e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    batch_size: int = 8
    """Latents per micro-batch, all processes together (avatar_core.train.sharding; paper 8 per GPU x 4)."""
    caption_variant: str = "random"
    """Which caption trains each epoch: 'random' (the long one or a phrase, re-drawn per epoch) or 'full'."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        output_dir="", max_steps=400, checkpoint_every=200, log_every=20, max_grad_norm=1.0, ema_decay=0.99))
    """The shared training loop's settings; output_dir empty: <run_dir>/diffusion."""


@dataclass
class GenerateConfig:
    """Sampling and the files `tera generate` writes."""

    seed: int = 0
    sampler: str = "ddpm"
    """'ddpm' (paper, sample_steps) or 'ddim' (faster, ddim_steps)."""
    steps: int = 0
    """Reverse steps; 0: the model's default for the sampler."""
    guidance: float = 0.0
    """CFG scale; 0: the model's default."""
    render_size: int = 256
    """Turntable / preview resolution in pixels."""
    turntable_frames: int = 24
    fps: int = 12
    camera_radius: float = 2.8
    """Orbit radius in metres (the dataset's rig)."""
    fov_deg: float = 40.0


@dataclass
class EditConfig:
    """Structure-aware editing / virtual try-on (TeRA Sec. 3.5)."""

    method: str = "inpaint"
    """'inpaint' (paper) or 'replace' (the ablation's direct feature replacement)."""
    rule: str = "any"
    """Part mask -> latent cells: 'any', 'majority' or 'nearest'."""
    dilate: int = 0
    """Grow the edited cells by this many."""


@dataclass
class AnimateConfig:
    """Animation by skinning with a built-in motion."""

    motion: str = "walk"
    """'walk' or 'wave'."""
    frames: int = 24
    fps: int = 12
    render_size: int = 256


@dataclass
class EvaluateConfig:
    """`tera evaluate`: text faithfulness, the data-scaling study, editing, latent-resolution ablation."""

    prompts: list[str] = field(default_factory=lambda: [
        "a woman in a red dress",
        "a man in a green striped shirt and black trousers",
        "a woman in a blue shirt and white skirt",
        "a man in a yellow shirt and navy shorts",
    ])
    """Held-out attribute combinations to generate."""
    samples_per_prompt: int = 2
    random_captions: int = 8
    """Training captions drawn at random for the baseline rows."""
    edit_region: str = "upper_clothes"
    edit_prompt: str = "a man in a green shirt and black trousers"
    ablation_resolutions: list[int] = field(default_factory=lambda: [8, 16])
    """Latent resolutions of the ablation (paper: 256 vs lower)."""
    ablation_steps: int = 100
    """Distillation steps per ablation arm."""
    shape_prompts: list[str] = field(default_factory=lambda: [
        "a tall heavy-set elderly man in a teal shirt and grey trousers",
        "a short slim young woman in a teal shirt and grey trousers",
        "a tall slim middle-aged woman in a maroon dress",
        "a short heavy-set young man in a white shirt and navy shorts",
        "a muscular middle-aged man in a yellow jacket over a black shirt and blue trousers",
        "a tall elderly woman in a green shirt and a black skirt",
        "a short slim middle-aged man in a red shirt and beige shorts",
        "a heavy-set young woman in an orange shirt and white trousers",
    ])
    """Held-out prompts asking for stature / build / age words: the shape table (tera.shape_text)."""
    ablation_diffusion_steps: int = 100
    """Stage-2 steps of each ablation arm's generation arm (a diffusion model trained on that arm's latents and
    scored on the held-out prompts); 0 measures decoder PSNR only."""
    sampler: str = "ddim"
    """Sampler used for the evaluation's many generations."""
    clip_path: str | None = None
    """Local CLIP folder (openai/clip-vit-* layout) for the CLIP score; None: the score is not computed."""
    clip_views: int = 4
    """Turntable views rendered per generated avatar for the CLIP score (the score averages over them)."""
    clip_render_size: int = 224
    """Render size of those views before CLIP's own resize (CLIP ViT-L/14 reads 224 x 224)."""
    data_sizes: list[int] = field(default_factory=list)
    """The data-scaling study (tera.scaling): training subset sizes, the first N avatars each, increasing, the last
    at most data.max_avatars (the run's teacher and decoder, fit on those, are shared); empty: not run."""
    heldout_avatars: int = 32
    """Avatars after the run's data.max_avatars whose long captions are the study's held-out prompts."""
    base_steps: int = 400
    """Stage-2 steps of the study at ``base_avatars`` avatars; a size of N trains base_steps x N / base_avatars."""
    base_avatars: int = 16
    """The training-set size ``base_steps`` is for."""


@dataclass
class TeraConfig:
    """Everything `tera` needs; sections per stage."""

    run_dir: str = "outputs/tera/tiny"
    """Where teacher features, decoders, models and generated avatars go."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda[:k]'."""
    seed: int = 0
    threads: int = 0
    """CPU threads for torch (0: torch's default). On a busy shared machine 1 avoids thread oversubscription."""
    body: BodyConfig = field(default_factory=BodyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    animate: AnimateConfig = field(default_factory=AnimateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    standins: list[str] = field(default_factory=list)
    """Embedded stand-ins allowed instead of the paper's networks: ``anny_body`` (SMPL-X), ``minilm_text`` (CLIP),
    ``random_feature_perceptual`` (VGG-16 for L_vgg), ``fitted_teacher`` (IDOL features); empty: the paper's
    files are required and checked before any work."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TeraConfig:
    """The config of ``path`` (a YAML path, or ``tiny`` / ``paper`` from the package's configs; default ``tiny``)
    with ``key=value`` overrides; unknown keys raise."""
    return _load_config(TeraConfig, [resolve_config(path, CONFIG_DIR)], list(overrides))


__all__ = [
    "AnimateConfig", "BodyConfig", "CONFIG_DIR", "DEFAULT_CONFIG", "DataConfig", "DiffusionConfig", "DistillConfig",
    "EditConfig", "EvaluateConfig", "GenerateConfig", "TeacherConfig", "TeraConfig", "TextConfig", "UNetConfig",
    "load_config",
]
