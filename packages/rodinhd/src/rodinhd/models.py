"""The networks of a RodinHD run built from its config, and loaded back from its folder: the shared triplane
decoder (Sec. 3.2), the portrait encoder (Sec. 3.3: a local SD/SDXL VAE or the embedded portrait VAE), the base
and upsample diffusion models of the cascade (Sec. 3.3-3.4) with the image-level loss's patch renderer (Eq. 6)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from avatar_core.cameras import Cameras
from avatar_core.config import config_to_dict
from avatar_core.errors import ConfigError, CorruptFileError, MissingFileError
from avatar_core.io import load_tensors, save_tensors
from avatar_core.render.rays import generate_rays
from avatar_core.train import latest_checkpoint
from rodinhd.cascade import BaseDiffusion, UpsampleDiffusion
from rodinhd.conditioning import PortraitTokenizer, PortraitVAE, SDVAEFeatures, prepare_portrait, train_portrait_vae
from rodinhd.config import RodinHDConfig, UNetConfig
from rodinhd.data import AvatarViews
from rodinhd.decoder import TriplaneDecoder
from rodinhd.renderer import TriplaneField, render_triplane_rays
from rodinhd.streaming import resolve_standins
from rodinhd.triplane import unroll
from rodinhd.unet import TriplaneUNet

log = logging.getLogger("rodinhd")

__all__ = ["DECODER_FILE", "VAE_FILE", "build_base", "build_decoder", "build_upsample", "feature_channels",
           "get_encoder", "load_decoder", "load_trained", "make_render_patch", "portraits", "save_decoder",
           "triplane_kwargs"]

DECODER_FILE = "decoder.safetensors"
VAE_FILE = "portrait_vae.safetensors"


def triplane_kwargs(cfg: RodinHDConfig) -> dict:
    """The triplane's box (``bound``, ``center``) as the keywords the fitting and rendering functions take."""
    return dict(bound=float(cfg.triplane.bound), center=[float(c) for c in cfg.triplane.center])


def build_decoder(cfg: RodinHDConfig) -> TriplaneDecoder:
    """The shared decoder of ``cfg.decoder`` (seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    return TriplaneDecoder.from_config(cfg.triplane.channels, cfg.decoder)


def save_decoder(decoder: TriplaneDecoder, path: Path, cfg: RodinHDConfig) -> Path:
    meta = {"kind": "rodinhd.decoder", "channels": cfg.triplane.channels, "decoder": config_to_dict(cfg.decoder)}
    return save_tensors(path, {k: v.detach().cpu() for k, v in decoder.state_dict().items()}, meta)


def load_decoder(cfg: RodinHDConfig, out: str | os.PathLike, device: torch.device | str = "cpu") -> TriplaneDecoder:
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


def get_encoder(cfg: RodinHDConfig, out: str | os.PathLike, data: AvatarViews | None = None,
                device: torch.device | str = "cpu", progress: bool = True) -> nn.Module:
    """The portrait feature encoder: the SD/SDXL VAE folder of ``conditioning.vae_path``, else the embedded VAE
    (trained on the training avatars' portraits when ``data`` is given and none exists yet)."""
    c = cfg.conditioning
    resolve_standins(cfg, ("encoder",))  # the embedded VAE only where the config allows it (`standins`)
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
    images = ((portraits(data, data.train_ids, c.portrait_size) + 1) / 2).permute(0, 2, 3, 1)  # [N, S, S, 3]
    log.info("training the embedded portrait VAE on %d portraits (%d steps)", len(images), c.vae_steps)
    vae, _ = train_portrait_vae(images, steps=c.vae_steps, base_channels=c.vae_base_channels,
                                latent_channels=c.vae_latent_channels, batch_size=c.vae_batch_size, lr=c.vae_lr,
                                kl_weight=c.vae_kl_weight, seed=cfg.seed, device=device)
    vae.save(path)
    return vae.eval()


def portraits(data: AvatarViews, ids: Sequence[str], size: int) -> Tensor:  # [N, 3, S, S] in [-1, 1]
    return torch.cat([prepare_portrait(data.portrait(a), size) for a in ids])


def feature_channels(encoder: nn.Module) -> tuple[int, ...]:
    return tuple(int(c) for c in encoder.feature_channels)


def _unet(u: UNetConfig, image_size: int, channels: int, out_channels: int, context_dim: int, cond_channels: int = 0,
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


def build_base(cfg: RodinHDConfig, feature_channels: Sequence[int]) -> BaseDiffusion:
    """The base model of ``cfg.base`` reading portrait features with ``feature_channels`` per scale, conditioned as
    ``base.condition`` says (multi-scale, single-scale or one global token; :class:`PortraitTokenizer`)."""
    b, c = cfg.base, cfg.conditioning
    n = len(b.context_resolutions)
    tok = PortraitTokenizer(feature_channels[:n], list(c.kernel_sizes)[:n], c.token_dim, c.portrait_size,
                            mode=b.condition, scale=b.condition_scale)
    C = cfg.triplane.channels
    unet = _unet(b.unet, b.resolution, C, 2 * C, c.token_dim)
    return BaseDiffusion(unet, tok, list(b.context_resolutions), b.num_steps, b.schedule, b.vlb_weight,
                         b.cond_drop_prob, b.guidance_scale, b.sample_steps)


def build_upsample(cfg: RodinHDConfig, feature_channels: Sequence[int], render_patch: Callable | None = None,
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
                             perceptual, cfg.render.background, u.aug_mode, u.aug_blur_max, u.aug_down_max)


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




def load_trained(model: nn.Module, run_dir: Path, use_ema: bool, what: str) -> Path:
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


