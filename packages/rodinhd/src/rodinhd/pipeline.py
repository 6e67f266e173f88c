"""The RodinHD stages as commands over one output folder (Sec. 3 end to end; what ``rodinhd`` and ``make`` run).

Layout of ``out``::

    data/                      the synthetic dataset (unless data.root points elsewhere)
    stage1/                    stage-1 state (decoder, Adam, IWC) and triplanes/ (Algorithm 1)
    decoder.safetensors        the shared decoder after stage 1
    triplanes/                 stage-2 triplanes, one safetensors file per avatar
    portrait_vae.safetensors   the embedded portrait VAE (when no pretrained VAE folder is configured)
    base/, upsample/           Trainer runs: checkpoints/, metrics.jsonl, config.yaml
    samples/NAME/              triplane.safetensors, views/, views.png, turntable.mp4, settings.json
    eval.json, ablation/       evaluation and the Table 4(a) ablation

Every stage reads the config it is given; the modules take plain arguments, mapped here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from avatar_core.cameras import Cameras, orbit_cameras
from avatar_core.config import config_to_dict, save_config
from avatar_core.errors import ConfigError, CorruptFileError, InputError, MissingFileError
from avatar_core.io import image_grid, load_tensors, save_image, save_json, save_tensors
from avatar_core.metrics import psnr as psnr_fn
from avatar_core.metrics import ssim as ssim_fn
from avatar_core.render.rays import generate_rays
from avatar_core.render.turntable import turntable
from avatar_core.train import TrainConfig, Trainer, latest_checkpoint
from rodinhd.cascade import BaseDiffusion, UpsampleDiffusion, VGGPerceptual
from rodinhd.conditioning import (
    PortraitTokenizer,
    PortraitVAE,
    SDVAEFeatures,
    portrait_features,
    prepare_portrait,
    train_portrait_vae,
)
from rodinhd.config import load_rodinhd_config
from rodinhd.data import AvatarViews, downsample_triplanes, load_portrait
from rodinhd.decoder import TriplaneDecoder
from rodinhd.fitting import evaluate_fit, fit_shared, fit_triplanes, process_shard
from rodinhd.renderer import TriplaneField, build_occupancy_grid, render_triplane_rays, render_views
from rodinhd.triplane import TriplaneStore, rollout, unroll
from rodinhd.unet import TriplaneUNet

log = logging.getLogger("rodinhd")

__all__ = [
    "resolve_device",
    "prepare_data",
    "open_data",
    "build_decoder",
    "load_decoder",
    "get_encoder",
    "build_base",
    "build_upsample",
    "make_render_patch",
    "fit_shared_stage",
    "fit_stage",
    "train_base",
    "train_upsample",
    "TriplaneSampler",
    "sample",
    "render_file",
    "evaluate",
    "ablate",
    "train_all",
    "demo_part",
]

DECODER_FILE = "decoder.safetensors"
VAE_FILE = "portrait_vae.safetensors"
#: Keys of a diffusion stage's loop settings that may change between a run and its resumption.
_RESUMABLE = ("max_steps", "checkpoint_every", "log_every", "progress_bar", "keep_last_checkpoints")


# ---------------------------------------------------------------------------------------------------------------
# Plumbing
# ---------------------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _as_cfg(cfg: Any) -> Any:
    return cfg if cfg is not None else load_rodinhd_config()


def _data_root(cfg: Any, out: Path) -> Path:
    return Path(cfg.data.root) if cfg.data.root else out / "data"


def prepare_data(cfg: Any, out: str | os.PathLike, progress: bool = True) -> Path:
    """Write the synthetic dataset described by ``cfg.data`` unless it is already complete (the generator resumes)."""
    from avatar_core.data import generate_dataset

    out = Path(out)
    root = _data_root(cfg, out)
    d = cfg.data
    return generate_dataset(root, num=d.num_avatars, views=d.views, res=d.res, seed=d.seed, uv_res=d.uv_res,
                            progress=progress)


def open_data(cfg: Any, out: str | os.PathLike) -> AvatarViews:
    """The dataset of this run (``data.root``, else ``<out>/data``), split into training and held-out avatars."""
    root = _data_root(cfg, Path(out))
    if not (root / "meta.json").is_file():
        raise MissingFileError(f"no avatar dataset at {root}",
                               f"run `rodinhd train-all --out {out}` (it writes one), or `avatar-core make-dataset "
                               f"--out {root} --num N`, or set data.root=DIR")
    return AvatarViews(root, held_out=cfg.data.held_out)


def _triplane_kwargs(cfg: Any) -> dict:
    return dict(bound=float(cfg.triplane.bound), center=[float(c) for c in cfg.triplane.center])


def build_decoder(cfg: Any) -> TriplaneDecoder:
    """The shared decoder of ``cfg.decoder`` (seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    d = cfg.decoder
    return TriplaneDecoder(cfg.triplane.channels, reduce=d.reduce, hidden_dim=d.hidden_dim,
                           geo_feat_dim=d.geo_feat_dim, density_layers=d.density_layers, color_layers=d.color_layers,
                           density_activation=d.density_activation, density_bias=d.density_bias)


def _save_decoder(decoder: TriplaneDecoder, path: Path, cfg: Any) -> Path:
    meta = {"kind": "rodinhd.decoder", "channels": cfg.triplane.channels, "decoder": config_to_dict(cfg.decoder)}
    return save_tensors(path, {k: v.detach().cpu() for k, v in decoder.state_dict().items()}, meta)


def load_decoder(cfg: Any, out: str | os.PathLike, device: torch.device | str = "cpu") -> TriplaneDecoder:
    """The stage-1 decoder of ``out``, frozen, checked against ``cfg``."""
    path = Path(out) / DECODER_FILE
    if not path.is_file():
        raise MissingFileError(f"no shared decoder at {path}", f"run `rodinhd fit-shared --out {out}` first")
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "rodinhd.decoder":
        raise CorruptFileError(f"{path} is not a RodinHD decoder", "delete it and rerun `rodinhd fit-shared`")
    if meta.get("channels") != cfg.triplane.channels or meta.get("decoder") != config_to_dict(cfg.decoder):
        raise ConfigError(f"the decoder in {path} was trained with other settings "
                          f"(channels={meta.get('channels')}, decoder={meta.get('decoder')})",
                          "use the config it was trained with, or rerun fit-shared into a new --out")
    decoder = build_decoder(cfg)
    decoder.load_state_dict(tensors)
    decoder.requires_grad_(False)
    return decoder.to(device).eval()


def get_encoder(cfg: Any, out: str | os.PathLike, data: AvatarViews | None = None,
                device: torch.device | str = "cpu", progress: bool = True) -> nn.Module:
    """The portrait feature encoder: the SD/SDXL VAE folder of ``conditioning.vae_path``, else the embedded VAE
    (trained on the training avatars' portraits when ``data`` is given and none exists yet)."""
    c = cfg.conditioning
    if c.vae_path:
        # A missing or incomplete folder raises MissingWeightsError naming the expected layout.
        return SDVAEFeatures.from_pretrained(c.vae_path, device=device)
    path = Path(out) / VAE_FILE
    if path.is_file():
        vae = PortraitVAE.load(path, device=device)
        if (vae.base_channels, vae.latent_channels) != (c.vae_base_channels, c.vae_latent_channels):
            raise ConfigError(f"the portrait VAE in {path} has base_channels={vae.base_channels}, latent_channels="
                              f"{vae.latent_channels}; the config asks for {c.vae_base_channels}, "
                              f"{c.vae_latent_channels}", "use the config it was trained with, or delete the file")
        return vae.eval()
    if data is None:
        raise MissingFileError(f"no portrait VAE at {path} and no conditioning.vae_path configured",
                               f"run `rodinhd train-base --out {out}` (it trains the embedded VAE), or set "
                               "conditioning.vae_path=DIR to a local SD/SDXL VAE folder")
    portraits = _portraits(data, data.train_ids, c.portrait_size)  # [N, 3, S, S] in [-1, 1]
    images = ((portraits + 1) / 2).permute(0, 2, 3, 1)
    log.info("training the embedded portrait VAE on %d portraits (%d steps)", len(images), c.vae_steps)
    vae, _ = train_portrait_vae(images, steps=c.vae_steps, base_channels=c.vae_base_channels,
                                latent_channels=c.vae_latent_channels, batch_size=c.vae_batch_size, lr=c.vae_lr,
                                kl_weight=c.vae_kl_weight, seed=cfg.seed, device=device)
    vae.save(path)
    return vae.eval()


def _portraits(data: AvatarViews, ids: Sequence[str], size: int) -> Tensor:  # [N, 3, S, S] in [-1, 1]
    return torch.cat([prepare_portrait(data.portrait(a), size) for a in ids])


def _feature_channels(encoder: nn.Module) -> tuple[int, ...]:
    return tuple(int(c) for c in encoder.feature_channels)


def _unet(u: Any, image_size: int, channels: int, out_channels: int, context_dim: int, cond_channels: int = 0,
          aug: bool = False) -> TriplaneUNet:
    return TriplaneUNet(image_size, channels, u.model_channels, out_channels=out_channels,
                        channel_mult=list(u.channel_mult), num_res_blocks=list(u.num_res_blocks),
                        attention_resolutions=list(u.attention_resolutions),
                        cross_attn_resolutions=list(u.cross_attn_resolutions), middle_cross_attn=u.middle_cross_attn,
                        conv3d_resolutions=list(u.conv3d_resolutions), dropout=u.dropout,
                        use_scale_shift_norm=u.use_scale_shift_norm, num_heads=u.num_heads,
                        num_head_channels=u.num_head_channels, context_dim=context_dim,
                        attention_pool=u.attention_pool, cond_channels=cond_channels, aug_level_embedding=aug,
                        resblock_updown=u.resblock_updown, fold_planes=u.fold_planes,
                        emb_channels=u.emb_channels or None)


def build_base(cfg: Any, feature_channels: Sequence[int]) -> BaseDiffusion:
    """The base model of ``cfg.base`` reading portrait features with ``feature_channels`` per scale."""
    b, c = cfg.base, cfg.conditioning
    n = len(b.context_resolutions)
    tok = PortraitTokenizer(feature_channels[:n], list(c.kernel_sizes)[:n], c.token_dim, c.portrait_size)
    C = cfg.triplane.channels
    unet = _unet(b.unet, b.resolution, C, 2 * C, c.token_dim)
    return BaseDiffusion(unet, tok, list(b.context_resolutions), b.num_steps, b.schedule, b.vlb_weight,
                         b.cond_drop_prob, b.guidance_scale, b.sample_steps)


def build_upsample(cfg: Any, feature_channels: Sequence[int], render_patch: Callable | None = None,
                   perceptual: nn.Module | None = None) -> UpsampleDiffusion:
    """The upsample model of ``cfg.upsample`` (it reads the first ``len(context_resolutions)`` portrait scales)."""
    u, c = cfg.upsample, cfg.conditioning
    n = len(u.context_resolutions)
    tok = PortraitTokenizer(feature_channels[:n], list(c.kernel_sizes)[:n], c.token_dim, c.portrait_size)
    C = cfg.triplane.channels
    unet = _unet(u.unet, cfg.triplane.resolution, C, C, c.token_dim, cond_channels=C, aug=True)
    return UpsampleDiffusion(unet, tok, list(u.context_resolutions), u.num_steps, u.schedule, u.cond_drop_prob,
                             u.guidance_scale, u.sample_steps, u.variance_type, u.aug_schedule, u.aug_max_train,
                             u.aug_sample, render_patch, u.patch_size, u.image_loss_weight, u.perceptual_weight,
                             perceptual)


def make_render_patch(decoder: TriplaneDecoder, bound: float, center: Sequence[float], num_samples: int,
                      background: Sequence[float] = (1.0, 1.0, 1.0)) -> Callable:
    """The image-level loss's renderer (Eq. 6): pixels ``rows x cols`` of camera ``b`` through triplane ``b``.

    ``render_patch(triplane [B, C, H, 3W] raw roll-out, cameras (B), rows [B, P], cols [B, P]) -> [B, P, P, 3]``;
    uniform marching (no occupancy grid), differentiable in the triplane; the decoder stays frozen.
    """

    def render_patch(triplanes: Tensor, cameras: Cameras, rows: Tensor, cols: Tensor) -> Tensor:
        out = []
        bg = torch.as_tensor(background, dtype=triplanes.dtype, device=triplanes.device)
        for b in range(triplanes.shape[0]):
            P = rows.shape[1]
            field = TriplaneField(unroll(triplanes[b]), decoder, bound, center)
            rr = rows[b][:, None].expand(P, P).reshape(-1)
            cc = cols[b][None, :].expand(P, P).reshape(-1)
            cam = cameras[b].to(triplanes.device)
            o, d = generate_rays(cam, torch.zeros_like(rr), rr, cc)
            r = render_triplane_rays(field, o, d, num_samples, None, bg, early_stop_eps=0.0)
            out.append(r.rgb.reshape(P, P, 3))
        return torch.stack(out)

    return render_patch


def _loop_config(loop: Any, output_dir: Path, seed: int) -> TrainConfig:
    return TrainConfig(output_dir=str(output_dir), max_steps=loop.max_steps, seed=seed,
                       mixed_precision=loop.mixed_precision, gradient_accumulation_steps=loop.gradient_accumulation_steps,
                       max_grad_norm=loop.max_grad_norm, ema_decay=loop.ema_decay, checkpoint_every=loop.checkpoint_every,
                       keep_last_checkpoints=loop.keep_last_checkpoints, log_every=loop.log_every,
                       progress_bar=loop.progress_bar)


def _optimizer(loop: Any) -> Callable:
    if loop.optimizer not in ("adam", "adamw"):
        raise ConfigError(f"unknown optimizer {loop.optimizer!r}", "use 'adam' or 'adamw'")
    cls = torch.optim.AdamW if loop.optimizer == "adamw" else torch.optim.Adam
    return lambda params: cls([p for p in params if p.requires_grad], lr=loop.lr, weight_decay=loop.weight_decay)


def _run_signature(cfg: Any, section: str) -> dict:
    """The settings a resumed diffusion run must share with its checkpoint (model, data, conditioning)."""
    sec = config_to_dict(getattr(cfg, section))
    for k in _RESUMABLE:
        sec["train"].pop(k, None)
    return {section: sec, "triplane": config_to_dict(cfg.triplane), "decoder": config_to_dict(cfg.decoder),
            "conditioning": config_to_dict(cfg.conditioning), "data": config_to_dict(cfg.data)}


def _epoch_batches(items: dict[str, Any], n: int, batch_size: int, seed: int) -> Callable[[int], list]:
    """``epoch -> batches``: a seeded permutation of the ``n`` samples per epoch, so a resumed run sees the same data.

    ``batch_size`` is the global batch: under ``accelerate launch`` each process takes its own share of every batch
    (rank ``r`` of ``w`` takes items ``r::w``), so N GPUs see the same data as one.
    """
    rank, world = process_shard()
    bs = min(batch_size, n)
    if bs < world:
        raise ConfigError(f"a batch of {bs} cannot be split over {world} processes",
                          "raise train.batch_size (and the number of training avatars) to at least the process count")

    def batches(epoch: int) -> list:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))
        out = []
        for i in range(0, n - bs + 1, bs):
            idx = perm[i:i + bs][rank::world]
            out.append({k: ([f[idx] for f in v] if isinstance(v, list) else v[idx]) for k, v in items.items()})
        return out

    return batches


def _load_trained(model: nn.Module, run_dir: Path, use_ema: bool, what: str) -> Path:
    """Weights of the newest checkpoint of a Trainer run (EMA parameters over the model's buffers when asked)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise MissingFileError(f"no trained {what} model in {run_dir}",
                               f"run `rodinhd train-{what} --out {run_dir.parent}` first")
    state, _ = load_tensors(ckpt / "model.safetensors")
    # Frozen perceptual-loss weights (VGG/LPIPS) are training-only; a sampling model is built without them.
    own = set(model.state_dict())
    state = {k: v for k, v in state.items() if not k.startswith("perceptual.") or k in own}
    if use_ema and (ckpt / "ema.safetensors").is_file():
        ema, _ = load_tensors(ckpt / "ema.safetensors")
        state.update(ema)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"the {what} checkpoint {ckpt} does not fit the configured model "
                          f"({str(e).splitlines()[0]})", "use the config it was trained with") from e
    return ckpt


# ---------------------------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------------------------
def fit_shared_stage(cfg: Any = None, out: str | os.PathLike = "outputs/rodinhd", progress: bool = True) -> dict:
    """``rodinhd fit-shared``: stage 1 (Algorithm 1) on the first ``stage1.num_avatars`` training avatars."""
    cfg, out = _as_cfg(cfg), Path(out)
    data = open_data(cfg, out)
    s = cfg.stage1
    ids = data.train_ids[: s.num_avatars] if s.num_avatars > 0 else data.train_ids
    device = resolve_device(cfg.device)
    decoder = build_decoder(cfg).to(device)
    store = TriplaneStore(out / "stage1" / "triplanes", cfg.triplane.channels, cfg.triplane.resolution)
    kwargs = {k: v for k, v in config_to_dict(s).items() if k != "num_avatars"}
    t0 = time.perf_counter()
    result = fit_shared(data.get_views, ids, decoder, store, out / "stage1", seed=cfg.seed, progress=progress,
                        **kwargs, **_triplane_kwargs(cfg))
    path = _save_decoder(decoder, out / DECODER_FILE, cfg)
    last = result.history[-len(ids):] if result.history else []
    return {"decoder": str(path), "triplanes": str(store.root), "avatars": ids, "seconds": time.perf_counter() - t0,
            "final_psnr": {h["avatar"]: h["psnr"] for h in last}}


def fit_stage(cfg: Any = None, out: str | os.PathLike = "outputs/rodinhd", rank: int | None = None,
              world_size: int | None = None, progress: bool = True) -> dict:
    """``rodinhd fit``: stage 2, every training avatar's triplane with the frozen decoder (sharded by rank)."""
    cfg, out = _as_cfg(cfg), Path(out)
    data = open_data(cfg, out)
    device = resolve_device(cfg.device)
    decoder = load_decoder(cfg, out, device)
    s = cfg.stage2
    C, R = cfg.triplane.channels, cfg.triplane.resolution
    store = TriplaneStore(out / "triplanes", C, R)
    init = TriplaneStore(out / "stage1" / "triplanes", C, R) if s.init_from_stage1 else None
    kwargs = {k: v for k, v in config_to_dict(s).items() if k != "init_from_stage1"}
    t0 = time.perf_counter()
    done = fit_triplanes(data.get_views, data.train_ids, decoder, store, init, seed=cfg.seed, rank=rank,
                         world_size=world_size, progress=progress, **kwargs, **_triplane_kwargs(cfg))
    return {"triplanes": str(store.root), "fitted": done, "seconds": time.perf_counter() - t0}


def _fitted_triplanes(cfg: Any, out: Path, ids: Sequence[str]) -> Tensor:  # [N, 3, C, R, R]
    store = TriplaneStore(out / "triplanes", cfg.triplane.channels, cfg.triplane.resolution)
    missing = [a for a in ids if not store.exists(a)]
    if missing:
        raise MissingFileError(f"{len(missing)} training avatars have no stage-2 triplane (e.g. {missing[0]})",
                               f"run `rodinhd fit --out {out}` first")
    return torch.stack([store.load(a) for a in ids])


# ---------------------------------------------------------------------------------------------------------------
# Diffusion training
# ---------------------------------------------------------------------------------------------------------------
def train_base(cfg: Any = None, out: str | os.PathLike = "outputs/rodinhd", resume: bool = True,
               progress: bool = True) -> dict:
    """``rodinhd train-base``: the base model on the fitted triplanes area-downsampled to ``base.resolution``.

    Runs on :class:`avatar_core.train.Trainer` (checkpoints, exact resume, EMA, ``accelerate launch``); with
    ``resume`` an existing run continues, and a run whose settings differ from its checkpoint's is refused.
    """
    cfg, out = _as_cfg(cfg), Path(out)
    data = open_data(cfg, out)
    device = resolve_device(cfg.device)
    ids = data.train_ids
    encoder = get_encoder(cfg, out, data, device, progress)
    with torch.no_grad():
        feats = portrait_features(encoder, _portraits(data, ids, cfg.conditioning.portrait_size).to(device))
    feats = [f.cpu() for f in feats[: len(cfg.base.context_resolutions)]]
    low = rollout(downsample_triplanes(_fitted_triplanes(cfg, out, ids), cfg.base.resolution))  # [N, C, r, 3r]
    model = build_base(cfg, _feature_channels(encoder))
    model.normalizer.fit(low)
    loop = cfg.base.train
    data_fn = _epoch_batches({"triplanes": low, "features": feats}, len(ids), loop.batch_size, cfg.seed)

    def step(m: nn.Module, batch: dict) -> tuple[Tensor, dict]:
        o = m(batch["triplanes"], batch["features"])
        return o["loss"], {"mse": o["mse"].detach(), "vlb": o["vlb"].detach()}

    return _train_stage(cfg, out, "base", loop, model, step, data_fn, resume)


def _train_stage(cfg: Any, out: Path, name: str, loop: Any, model: nn.Module, step: Callable, data_fn: Callable,
                 resume: bool) -> dict:
    """Run one diffusion stage on the kernel's Trainer in ``out/name`` (exact resume; a changed config is refused)."""
    run_dir = out / name
    trainer = Trainer(_loop_config(loop, run_dir, cfg.seed), model, _optimizer(loop), step, data_fn,
                      run_config=_run_signature(cfg, name))
    t0 = time.perf_counter()
    last = trainer.train(resume="auto" if resume else None)
    save_config(cfg, run_dir / "config.yaml")
    return {"run": str(run_dir), "checkpoint": str(latest_checkpoint(run_dir)), "last": last,
            "seconds": time.perf_counter() - t0}


def train_upsample(cfg: Any = None, out: str | os.PathLike = "outputs/rodinhd", resume: bool = True,
                   progress: bool = True) -> dict:
    """``rodinhd train-upsample``: the upsample model (x0, Eq. 5) plus the image-level loss (Eq. 6) on patches
    rendered through the frozen decoder from a random training view per sample."""
    cfg, out = _as_cfg(cfg), Path(out)
    data = open_data(cfg, out)
    device = resolve_device(cfg.device)
    ids = data.train_ids
    u = cfg.upsample
    encoder = get_encoder(cfg, out, data, device, progress)
    with torch.no_grad():
        feats = portrait_features(encoder, _portraits(data, ids, cfg.conditioning.portrait_size).to(device))
    feats = [f.cpu() for f in feats[: len(u.context_resolutions)]]
    planes = _fitted_triplanes(cfg, out, ids)
    high = rollout(planes)
    low = rollout(downsample_triplanes(planes, cfg.base.resolution))
    decoder = load_decoder(cfg, out, device)
    render_patch = make_render_patch(decoder, cfg.triplane.bound, cfg.triplane.center, u.render_num_samples,
                                     cfg.render.background) if u.image_loss_weight > 0 else None
    perceptual = VGGPerceptual.from_local(u.vgg_path, u.lpips_path or None) if u.vgg_path else None
    model = build_upsample(cfg, _feature_channels(encoder), render_patch, perceptual)
    model.normalizer.fit(high)
    cams = [data.get_views(a)[1] for a in ids]
    loop = u.train
    data_fn = _epoch_batches({"triplanes": high, "low_res": low, "features": feats,
                              "index": torch.arange(len(ids))}, len(ids), loop.batch_size, cfg.seed)

    def step(m: nn.Module, batch: dict) -> tuple[Tensor, dict]:
        idx = batch["index"].tolist()
        views = torch.randint(0, len(cams[0]), (len(idx),)).tolist()  # global RNG: restored on resume
        cameras = Cameras.cat([cams[i][v] for i, v in zip(idx, views)])
        o = m(batch["triplanes"], batch["low_res"], batch["features"], cameras=cameras)
        metrics = {k: o[k].detach() for k in ("mse", "pixel", "perceptual") if k in o}
        return o["loss"], metrics

    return _train_stage(cfg, out, "upsample", loop, model, step, data_fn, resume)


# ---------------------------------------------------------------------------------------------------------------
# Sampling and rendering
# ---------------------------------------------------------------------------------------------------------------
class TriplaneSampler:
    """The trained cascade of a run folder: portrait features -> base -> upsample -> triplane ``[3, C, R, R]``."""

    def __init__(self, cfg: Any, out: str | os.PathLike, device: torch.device | str | None = None):
        self.cfg, self.out = cfg, Path(out)
        self.device = torch.device(device) if device is not None else resolve_device(cfg.device)
        self.decoder = load_decoder(cfg, out, self.device)
        self.encoder = get_encoder(cfg, out, None, self.device)
        fc = _feature_channels(self.encoder)
        use_ema = cfg.sample.use_ema
        self.base = build_base(cfg, fc).to(self.device).eval()
        _load_trained(self.base, self.out / "base", use_ema, "base")
        self.upsample = build_upsample(cfg, fc).to(self.device).eval()
        _load_trained(self.upsample, self.out / "upsample", use_ema, "upsample")

    def features(self, portrait: Tensor) -> list[Tensor]:  # [H, W, 4] -> per-scale [1, C_i, h_i, w_i]
        x = prepare_portrait(portrait, self.cfg.conditioning.portrait_size).to(self.device)
        return portrait_features(self.encoder, x)

    @torch.no_grad()
    def __call__(self, portrait: Tensor | None, seed: int = 0, base_steps: int | None = None,
                 upsample_steps: int | None = None, guidance_scale: float | None = None) -> tuple[Tensor, dict]:
        """One avatar; ``portrait`` None generates unconditionally. Returns planes ``[3, C, R, R]`` and timings."""
        feats = self.features(portrait) if portrait is not None else None
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        nb = len(self.cfg.base.context_resolutions)
        nu = len(self.cfg.upsample.context_resolutions)
        low = self.base.sample(feats[:nb] if feats else None, batch_size=1, steps=base_steps,
                               guidance_scale=guidance_scale, generator=gen)
        t1 = time.perf_counter()
        high = self.upsample.sample(low, feats[:nu] if feats else None, steps=upsample_steps,
                                    guidance_scale=guidance_scale, generator=gen)
        t2 = time.perf_counter()
        return unroll(high[0]), {"base_seconds": t1 - t0, "upsample_seconds": t2 - t1, "low_res": low[0]}


def _render_outputs(cfg: Any, planes: Tensor, decoder: TriplaneDecoder, dest: Path, num_views: int, view_res: int,
                    frames: int, turntable_res: int) -> dict:
    """Views on an orbit (PNG each and a grid) and a turntable video of one triplane; the occupancy grid is built
    once by ``render.grid_updates`` updates from zero (App. A) and reused for every frame."""
    r, s = cfg.render, cfg.sample
    field = TriplaneField(planes, decoder, cfg.triplane.bound, cfg.triplane.center)
    t0 = time.perf_counter()
    grid = build_occupancy_grid(field, r.grid_resolution, r.num_samples, r.grid_updates) if r.occupancy else False
    t_grid = time.perf_counter() - t0

    def render_fn(cams: Cameras) -> Tensor:
        rgb, _ = render_views(planes, decoder, cams, cfg.triplane.bound, cfg.triplane.center, r.num_samples, grid,
                              background=r.background, chunk=r.chunk, early_stop_eps=r.early_stop_eps)
        return rgb

    out: dict[str, Any] = {}
    if num_views > 0:
        t0 = time.perf_counter()
        cams = orbit_cameras(num_views, s.radius, s.elevation, s.fov_deg, view_res, view_res)
        views = torch.cat([render_fn(cams[i:i + 8]) for i in range(0, num_views, 8)])
        out["render_seconds"] = time.perf_counter() - t0 + t_grid
        (dest / "views").mkdir(parents=True, exist_ok=True)
        for i, v in enumerate(views):
            save_image(dest / "views" / f"{i:03d}.png", v)
        out["views"] = str(dest / "views")
        out["grid"] = str(save_image(dest / "views.png", image_grid(list(views), nrow=min(num_views, 9))))
    if frames > 0:
        path = dest / "turntable.mp4"
        turntable(render_fn, frames, s.radius, s.elevation, s.fov_deg, turntable_res, turntable_res, path=path,
                  fps=s.fps)
        written = [p for p in (path, path.with_suffix(".gif")) if p.is_file()]
        out["turntable"] = str(written[0] if written else path)
    return out


def sample(cfg: Any = None, out: str | os.PathLike = "outputs/rodinhd", portrait: str | os.PathLike | None = None,
           name: str | None = None, dest: str | os.PathLike | None = None, sampler: TriplaneSampler | None = None,
           num_views: int | None = None, frames: int | None = None) -> dict:
    """``rodinhd sample``: portrait (or none: unconditional) -> base -> upsample -> triplane -> 360-degree renders.

    Writes ``triplane.safetensors`` (loadable by ``render``), ``views/``, ``views.png``, ``turntable.mp4`` and
    ``settings.json`` to ``dest`` (default ``<out>/samples/<name>``) and returns their paths and timings.
    """
    cfg, out = _as_cfg(cfg), Path(out)
    image = load_portrait(portrait) if portrait is not None else None  # validated before any model is loaded
    gen = sampler or TriplaneSampler(cfg, out)
    s = cfg.sample
    name = name or (Path(portrait).parent.name + "_" + Path(portrait).stem if portrait else f"uncond_{s.seed}")
    dest = Path(dest) if dest is not None else out / "samples" / name
    dest.mkdir(parents=True, exist_ok=True)
    planes, info = gen(image, s.seed, s.base_steps, s.upsample_steps, s.guidance_scale)
    store = TriplaneStore(dest, cfg.triplane.channels, cfg.triplane.resolution)
    tri = store.save("triplane", planes, {"stage": "sample", "portrait": str(portrait) if portrait else None})
    save_tensors(dest / "triplane_lowres.safetensors", {"planes": unroll(info["low_res"]).cpu()})
    outputs = _render_outputs(cfg, planes, gen.decoder, dest, s.num_views if num_views is None else num_views,
                              s.view_res, s.turntable_frames if frames is None else frames, s.turntable_res)
    settings = {"portrait": str(portrait) if portrait else None, "unconditional": portrait is None,
                "seed": s.seed, "base_steps": s.base_steps or cfg.base.sample_steps,
                "upsample_steps": s.upsample_steps or cfg.upsample.sample_steps, "guidance_scale": s.guidance_scale,
                "base_seconds": info["base_seconds"], "upsample_seconds": info["upsample_seconds"],
                "render_seconds": outputs.get("render_seconds"), "run": str(out),
                "triplane_shape": list(planes.shape), "config": config_to_dict(cfg)}
    save_json(dest / "settings.json", settings)
    return {"dest": str(dest), "triplane": str(tri), **outputs, "settings": str(dest / "settings.json"),
            "base_seconds": info["base_seconds"], "upsample_seconds": info["upsample_seconds"]}


def load_triplane_file(path: str | os.PathLike, channels: int, resolution: int) -> Tensor:  # [3, C, R, R]
    """A triplane file (``render`` input), checked against the configured shape with an error naming both."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"triplane file not found: {path}", "pass a .safetensors file written by sample or fit")
    tensors, _ = load_tensors(path)  # CorruptFileError for a file that is not safetensors
    if "planes" not in tensors:
        raise CorruptFileError(f"{path} holds no 'planes' tensor (found {sorted(tensors)})",
                               "pass a triplane written by `rodinhd sample` or `rodinhd fit`")
    planes = tensors["planes"]
    expected = (3, channels, resolution, resolution)
    if tuple(planes.shape) != expected:
        raise InputError(f"{path} holds a triplane of shape {tuple(planes.shape)}, the config expects {expected}",
                         "render it with the config it was made with (triplane.channels / triplane.resolution), "
                         "or pass the full-resolution triplane.safetensors rather than the low-res one")
    if not torch.isfinite(planes).all():
        raise CorruptFileError(f"{path} contains NaN or infinite values", "regenerate or refit it")
    return planes.float()


def render_file(cfg: Any = None, out: str | os.PathLike = "outputs/rodinhd", triplane: str | os.PathLike = "",
                dest: str | os.PathLike | None = None) -> dict:
    """``rodinhd render``: a triplane file -> views and a turntable with the run's decoder."""
    cfg, out = _as_cfg(cfg), Path(out)
    planes = load_triplane_file(triplane, cfg.triplane.channels, cfg.triplane.resolution)
    device = resolve_device(cfg.device)
    decoder = load_decoder(cfg, out, device)
    dest = Path(dest) if dest is not None else Path(triplane).with_suffix("").parent / (Path(triplane).stem + "_render")
    dest.mkdir(parents=True, exist_ok=True)
    s = cfg.sample
    return {"dest": str(dest), **_render_outputs(cfg, planes.to(device), decoder, dest, s.num_views, s.view_res,
                                                 s.turntable_frames, s.turntable_res)}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
def _on(bg: Tensor, rgba: Tensor) -> Tensor:  # [..., 4] straight alpha -> [..., 3]
    return rgba[..., :3] * rgba[..., 3:] + bg * (1 - rgba[..., 3:])


def _scores(pred: Tensor, target: Tensor, lpips: nn.Module | None) -> dict[str, float]:
    out = {"psnr": float(psnr_fn(pred, target).mean())}
    if min(pred.shape[1:3]) >= 11:
        out["ssim"] = float(ssim_fn(pred, target).mean())
    if lpips is not None:
        with torch.no_grad():
            out["lpips"] = float(lpips(pred, target))
    return out


def _mean(rows: list[dict]) -> dict[str, float]:
    keys = rows[0].keys() if rows else []
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def refit_consistency(cfg: Any, planes: Tensor, decoder: TriplaneDecoder, work: Path, iterations: int,
                      views: int, res: int, rays_per_step: int) -> dict:
    """The 3D-consistency check: render ``views`` orbit views of a generated triplane, fit a fresh triplane to them
    with the frozen decoder (stage 2's fitting), and score the refit's renders against those views."""
    r = cfg.render
    cams = orbit_cameras(views, cfg.sample.radius, cfg.sample.elevation, cfg.sample.fov_deg, res, res)
    rgb, alpha = render_views(planes, decoder, cams, cfg.triplane.bound, cfg.triplane.center, r.num_samples,
                              r.occupancy, r.grid_resolution, r.grid_updates, background=None)
    straight = torch.where(alpha > 1e-4, rgb / alpha.clamp_min(1e-4), torch.zeros_like(rgb)).clamp(0, 1)
    target = torch.cat([straight, alpha], dim=-1)  # [V, H, W, 4]
    store = TriplaneStore(work, cfg.triplane.channels, cfg.triplane.resolution)
    s2 = cfg.stage2
    fit_triplanes(lambda _: (target, cams), ["refit"], decoder, store, None, iterations=iterations,
                  rays_per_step=rays_per_step, num_samples=s2.num_samples, triplane_lr=s2.triplane_lr,
                  tv_weight=s2.tv_weight, l2_weight=s2.l2_weight, l1_weight=s2.l1_weight, occupancy=s2.occupancy,
                  grid_resolution=s2.grid_resolution, grid_update_every=s2.grid_update_every, init_std=s2.init_std,
                  seed=cfg.seed, rank=0, world_size=1, progress=False, **_triplane_kwargs(cfg))
    scores = evaluate_fit(lambda _: (target, cams), ["refit"], decoder, store, num_samples=r.num_samples,
                          occupancy=r.occupancy, grid_resolution=r.grid_resolution,
                          background=list(r.background), **_triplane_kwargs(cfg))["refit"]
    return {"refit_psnr": scores["psnr"], "refit_ssim": scores["ssim"], "views": views, "res": res,
            "iterations": iterations}


def evaluate(cfg: Any = None, out: str | os.PathLike = "outputs/rodinhd", progress: bool = True) -> dict:
    """``rodinhd evaluate``: fitting PSNR/SSIM (stage-2 triplanes vs their views), generation PSNR/SSIM (a sample
    from each scored avatar's portrait vs its ground-truth views), LPIPS when weights are configured, and the
    refit PSNR of the 3D-consistency check. Written to ``<out>/eval.json``."""
    cfg, out = _as_cfg(cfg), Path(out)
    e, r = cfg.evaluate, cfg.render
    data = open_data(cfg, out)
    device = resolve_device(cfg.device)
    decoder = load_decoder(cfg, out, device)
    lpips = VGGPerceptual.from_local(e.vgg_path, e.lpips_path).to(device) if (e.vgg_path and e.lpips_path) else None
    bg = torch.as_tensor(list(r.background), dtype=torch.float32, device=device)
    fit_ids = data.train_ids[: e.num_avatars]
    store = TriplaneStore(out / "triplanes", cfg.triplane.channels, cfg.triplane.resolution)
    fit_rows = []
    for a in fit_ids:
        images, cams = data.get_views(a)
        rgb, _ = render_views(store.load(a, device), decoder, cams, cfg.triplane.bound, cfg.triplane.center,
                              r.num_samples, r.occupancy, r.grid_resolution, r.grid_updates, background=bg)
        fit_rows.append(_scores(rgb, _on(bg, images.to(device)), lpips))
    gen = TriplaneSampler(cfg, out, device)
    gen_ids = (data.held_out_ids + data.train_ids)[: e.num_avatars]
    gen_rows, first = [], None
    for a in gen_ids:
        images, cams = data.get_views(a)
        planes, _ = gen(data.portrait(a), cfg.sample.seed, cfg.sample.base_steps, cfg.sample.upsample_steps,
                        cfg.sample.guidance_scale)
        first = planes if first is None else first
        rgb, _ = render_views(planes, decoder, cams, cfg.triplane.bound, cfg.triplane.center, r.num_samples,
                              r.occupancy, r.grid_resolution, r.grid_updates, background=bg)
        gen_rows.append({"avatar": a, "held_out": a in data.held_out_ids,
                         **_scores(rgb, _on(bg, images.to(device)), lpips)})
    consistency = refit_consistency(cfg, first, decoder, out / "eval" / "refit", e.refit_iterations, e.refit_views,
                                    e.refit_res, e.refit_rays_per_step)
    result = {"fitting": {"avatars": fit_ids, **_mean(fit_rows)},
              "generation": {"per_avatar": gen_rows,
                             **_mean([{k: v for k, v in g.items() if k not in ("avatar", "held_out")}
                                      for g in gen_rows])},
              "consistency": consistency,
              "lpips": "reported" if lpips is not None else "not reported (set evaluate.vgg_path and lpips_path)"}
    save_json(out / "eval.json", result)
    return result


def ablate(cfg: Any = None, out: str | os.PathLike = "outputs/rodinhd", progress: bool = True) -> list[dict]:
    """``rodinhd ablate-fitting``: the Table 4(a) rows with equal total iterations (:mod:`rodinhd.ablation`)."""
    from rodinhd.ablation import ablate_fitting, format_table

    cfg, out = _as_cfg(cfg), Path(out)
    a = cfg.ablation
    data = open_data(cfg, out)
    ids = data.train_ids[: a.num_avatars]
    d = cfg.decoder
    dec_kwargs = dict(reduce=d.reduce, hidden_dim=d.hidden_dim, geo_feat_dim=d.geo_feat_dim,
                      density_layers=d.density_layers, color_layers=d.color_layers,
                      density_activation=d.density_activation, density_bias=d.density_bias)
    s = cfg.stage1
    results = ablate_fitting(data.get_views, ids, a.total_iterations, out / "ablation", channels=a.channels,
                             resolution=a.resolution, outer_loops=a.outer_loops, earliest=a.earliest, rows=list(a.rows),
                             decoder_kwargs=dec_kwargs, eval_kwargs={"num_samples": a.eval_num_samples},
                             seed=cfg.seed, progress=progress, rays_per_step=a.rays_per_step,
                             num_samples=a.num_samples, occupancy=a.occupancy, triplane_lr=s.triplane_lr,
                             triplane_lr_loop_decay=s.triplane_lr_loop_decay, decoder_lr=s.decoder_lr,
                             decoder_lr_decay_visits=s.decoder_lr_decay_visits, tv_weight=s.tv_weight,
                             l2_weight=s.l2_weight, l1_weight=s.l1_weight, init_std=s.init_std,
                             **_triplane_kwargs(cfg))
    table = format_table(results)
    (out / "ablation").mkdir(parents=True, exist_ok=True)
    (out / "ablation" / "table.txt").write_text(table + "\n", encoding="utf-8")
    save_json(out / "ablation" / "results.json", results)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------------------------
def train_all(cfg: Any = None, out: str | os.PathLike = "outputs/rodinhd", progress: bool = True,
              evaluate_after: bool = False) -> dict:
    """``rodinhd train-all`` (``make train-rodinhd``): dataset -> stage 1 -> stage 2 -> base -> upsample -> one
    sample from a held-out portrait. Each step resumes what an interrupted run left."""
    cfg, out = _as_cfg(cfg), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def timed(key: str, fn: Callable, *args, **kwargs) -> Any:
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        times[key] = round(time.perf_counter() - t0, 2)
        log.info("%s done in %.1f s", key, times[key])
        return result

    timed("dataset", prepare_data, cfg, out, progress)
    save_config(cfg, out / "config.yaml")
    data = open_data(cfg, out)
    s1 = timed("fit_shared", fit_shared_stage, cfg, out, progress)
    timed("fit", fit_stage, cfg, out, progress=progress)
    timed("train_base", train_base, cfg, out, progress=progress)
    timed("train_upsample", train_upsample, cfg, out, progress=progress)
    held = data.held_out_ids[0] if data.held_out_ids else data.train_ids[-1]
    smp = timed("sample", sample, cfg, out, data.portrait_path(held), name=f"heldout_{held}")
    result = {"out": str(out), "config": str(out / "config.yaml"), "dataset": str(data.root),
              "decoder": s1["decoder"], "triplanes": str(out / "triplanes"), "base": str(out / "base"),
              "upsample": str(out / "upsample"), "sample": smp, "seconds": times}
    if evaluate_after:
        result["eval"] = timed("evaluate", evaluate, cfg, out, progress)
    save_json(out / "train_all.json", result)
    return result


#: ``demo_part``'s scale: a handful of avatars, short fits and trainings (about a minute on two CPU cores).
DEMO_OVERRIDES = (
    "data.num_avatars=4", "data.views=8", "data.res=48", "data.uv_res=64", "data.held_out=1",
    "stage1.outer_loops=2", "stage1.inner_iterations=40", "stage2.iterations=40",
    "conditioning.vae_steps=30", "base.train.max_steps=30", "upsample.train.max_steps=15",
    "sample.num_views=8", "sample.view_res=64", "sample.turntable_frames=24", "sample.turntable_res=96",
)


def demo_part(out_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> dict:
    """The RodinHD part of ``make demo``: the tiny pipeline on 4 synthetic avatars (3 trained, 1 held out) with
    short fits and trainings, then one sample from the held-out portrait with its views and turntable.

    Returns the paths written (``turntable``, ``grid``, ``triplane``, ``settings``), the stage timings and the
    held-out avatar id. Quality at this scale is a smoke test, not a result.
    """
    out = Path(out_dir)
    cfg = load_rodinhd_config("tiny", [*DEMO_OVERRIDES, *overrides])
    t0 = time.perf_counter()
    result = train_all(cfg, out, progress=False)
    smp = result["sample"]
    return {"turntable": smp.get("turntable"), "views": smp.get("grid"), "triplane": smp["triplane"],
            "settings": smp["settings"], "seconds": round(time.perf_counter() - t0, 1), "stages": result["seconds"],
            "out": str(out)}


def fmt_paths(result: dict, indent: str = "  ") -> str:
    """The paths in a stage's result, one per line (what the CLI prints at the end)."""
    lines = []
    for k, v in result.items():
        if isinstance(v, dict):
            sub = fmt_paths(v, indent + "  ")
            if sub:
                lines.append(f"{indent}{k}:")
                lines.append(sub)
        elif isinstance(v, str) and (os.sep in v or v.endswith((".safetensors", ".json", ".mp4", ".png"))):
            lines.append(f"{indent}{k}: {v}")
    return "\n".join(lines)
