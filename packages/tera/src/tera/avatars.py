"""A trained TeRA run's models loaded once, and avatars on disk: the latent file with its provenance, decoding to
Gaussians, and every file an avatar folder holds (PLY, attribute maps, preview, turntable, settings).

An avatar's body shape comes from its prompt (:mod:`tera.shape_text`, the run's shape head) and is stored in its
file (tensor ``shape``; ``body_shape`` in the metadata and settings.json), so every later command decodes the
UV-anchored Gaussians on that body: the canonical Gaussians are the UV points re-evaluated by their barycentrics
on the rest mesh of the stored shape, plus the decoded offsets. Files written before shape from text hold no
shape and decode on the template body."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from avatar_core.cameras import Cameras, orbit_cameras
from avatar_core.config import config_to_dict
from avatar_core.env import resolve_device
from avatar_core.errors import ConfigError, CorruptFileError, InputError, MissingFileError
from avatar_core.io import image_grid, load_tensors, save_image, save_json, save_tensors, write_video
from tera.config import TeraConfig
from tera.distill import DistillationDecoder
from tera.latent_diffusion import StructuredLatentDiffusion
from tera.runs import build_avatar, run_paths
from tera.shape_text import ShapeHead, load_shape_head
from tera.stage1 import load_decoder
from tera.stage2 import load_model
from tera.standins import trained_standins
from tera.uv_gaussians import ATTRIBUTE_SLICES, GaussianBatch, UVGaussianAvatar

log = logging.getLogger(__name__)

__all__ = ["AVATAR_FORMAT", "Models", "body_centre", "decode", "load_avatar", "load_models", "maps_image",
           "predict_shape", "slug", "stored_shape", "turntable_cameras", "write_avatar"]

AVATAR_FORMAT = "tera.avatar/1"


@dataclass
class Models:
    """Everything generation, editing and animation need, loaded once."""

    avatar: UVGaussianAvatar
    decoder: DistillationDecoder
    decoder_settings: dict
    diffusion: StructuredLatentDiffusion | None
    device: torch.device
    shape_head: ShapeHead | None = None  # prompt -> body shape (None: a run trained before it; template body)


def load_models(cfg: TeraConfig, with_diffusion: bool = True) -> Models:
    """The run's avatar, decoder and (unless ``with_diffusion`` is False) diffusion model, checked to match."""
    device = resolve_device(cfg.device, cfg.threads)
    decoder, settings = load_decoder(cfg)
    model = load_model(cfg, device) if with_diffusion else None
    if model is not None and tuple(model.latent_shape) != (settings["latent_channels"], settings["latent_resolution"],
                                                           settings["latent_resolution"]):
        raise ConfigError(f"the diffusion model's latent {model.latent_shape} does not match the decoder's",
                          "train the diffusion model again after distilling")
    avatar = build_avatar(cfg, device)
    head = load_shape_head(run_paths(cfg).diffusion) if model is not None else None
    if head is not None:
        want = (model.text_dim, len(avatar.body.shape_names))
        got = (head.net[1].in_features, head.net[-1].out_features)
        if got != want:
            raise ConfigError(f"the shape head maps text {got[0]} -> shape {got[1]}; this run's text and body "
                              f"need {want[0]} -> {want[1]}", "train the diffusion model (stage 2) again")
        head = head.to(device)
    return Models(avatar, decoder.to(device), settings, model, device, head)


@torch.no_grad()
def predict_shape(models: Models, prompt: str) -> Tensor | None:  # -> [S] on the CPU, or None
    """The body shape the run's shape head reads from ``prompt`` (None, with a logged note, for a run whose stage 2
    predates the head: the avatar then stays on the template body)."""
    if models.shape_head is None or models.diffusion is None:
        log.info("this run has no shape head (diffusion/shape_head.safetensors): the avatar uses the template body; "
                 "train stage 2 again for body shape from text")
        return None
    shape = models.shape_head(models.diffusion.encode_text([prompt]))[0].float().cpu()
    # Anny's phenotypes live in [0, 1] (the head is fitted on dataset shapes, so this only trims overshoot).
    return shape.clamp(0.0, 1.0) if models.avatar.body.name == "anny" else shape


def stored_shape(meta: dict) -> Tensor | None:
    """The body shape :func:`load_avatar` read from an avatar file (None: the template body)."""
    s = meta.get("body_shape")
    return None if s is None else torch.tensor(s, dtype=torch.float32)


def slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:n] or "avatar"


def load_avatar(path: str | Path, models: Models) -> tuple[Tensor, dict]:
    """An avatar file's latent ``[C, h, w]`` and provenance, checked against the loaded models."""
    path = Path(path)
    if path.is_dir():
        path = path / "avatar.safetensors"
    if not path.is_file():
        raise MissingFileError(f"avatar file not found: {path}", "pass an avatar.safetensors written by `tera generate`")
    tensors, meta = load_tensors(path)
    if meta.get("format") != AVATAR_FORMAT or "latent" not in tensors:
        raise CorruptFileError(f"{path} is not a TeRA avatar file", "pass an avatar.safetensors from `tera generate`")
    s = models.decoder_settings
    if meta.get("body") != s["body"]:
        raise InputError(f"{path} was made for body model {meta.get('body')!r}; this run uses {s['body']!r}",
                         "use the run (run_dir / --config) the avatar was generated with")
    want = [s["latent_channels"], s["latent_resolution"], s["latent_resolution"]]
    if list(tensors["latent"].shape) != want or meta.get("map_resolution") != s["latent_resolution"] * s["upsample_factor"]:
        raise InputError(f"{path} holds a latent {list(tensors['latent'].shape)} at UV resolution "
                         f"{meta.get('map_resolution')}; this run's decoder takes {want} -> UV "
                         f"{s['latent_resolution'] * s['upsample_factor']}",
                         "use the run the avatar was generated with")
    if meta.get("num_points") != s["num_points"] or meta.get("point_seed") != s["point_seed"]:
        # The latent's texels are read at the run's fixed UV point set: another set is another avatar.
        raise InputError(f"{path} was made with {meta.get('num_points')} Gaussians (point seed "
                         f"{meta.get('point_seed')}); this run uses {s['num_points']} (seed {s['point_seed']})",
                         f"use the run the avatar was generated with, or set body.num_points={meta.get('num_points')} "
                         f"body.point_seed={meta.get('point_seed')}")
    meta = dict(meta)
    if "shape" in tensors:
        dim = len(models.avatar.body.shape_names) if hasattr(models, "avatar") else tensors["shape"].numel()
        if tensors["shape"].shape != (dim,):
            raise InputError(f"{path} holds a body shape of {list(tensors['shape'].shape)}; this run's body takes "
                             f"[{dim}]", "use the run the avatar was generated with")
        meta["body_shape"] = tensors["shape"].float().tolist()
    else:
        log.info("%s stores no body shape (written before shape from text): it is decoded on the template body", path)
        meta["body_shape"] = None
    return tensors["latent"].float(), meta


@torch.no_grad()
def decode(models: Models, latent: Tensor, shape: Tensor | None = None) -> tuple[Tensor, GaussianBatch]:
    """Latent ``[C, h, w]`` -> attribute maps ``[1, 13, R, R]`` and canonical Gaussians on the rest body of
    ``shape`` ``[S]`` (None: the template body)."""
    maps = models.decoder(latent[None].to(models.device))
    body_shape = None if shape is None else shape.reshape(1, -1).to(models.device, torch.float32)
    return maps, models.avatar(maps, shape=body_shape)


def body_centre(points: Tensor) -> list[float]:  # [N, 3] -> centre of the bounding box
    lo, hi = points.min(0).values, points.max(0).values
    return ((lo + hi) / 2).tolist()


def turntable_cameras(cfg: TeraConfig, n: int, centre: list[float], size: int | None = None) -> Cameras:
    g = cfg.generate
    s = size or g.render_size
    return orbit_cameras(n, radius=g.camera_radius, fov_deg=g.fov_deg, width=s, height=s, target=centre)


def maps_image(maps: Tensor) -> Tensor:  # [1, 13, R, R] -> [H, W, 3]: colour, offset, radius, rotation
    m = maps[0].detach().cpu()
    off = m[ATTRIBUTE_SLICES["offset"]]
    off = (off / (2 * off.abs().amax().clamp_min(1e-6)) + 0.5)
    tiles = torch.stack([m[ATTRIBUTE_SLICES["rgb"]], off, m[ATTRIBUTE_SLICES["radius"]], m[ATTRIBUTE_SLICES["rotation"]]])
    up = max(1, 256 // tiles.shape[-1])  # nearest upscaling keeps texels visible in small maps
    tiles = torch.nn.functional.interpolate(tiles, scale_factor=up, mode="nearest") if up > 1 else tiles
    return image_grid([t.clamp(0, 1).permute(1, 2, 0) for t in tiles], nrow=4)


def write_avatar(cfg: TeraConfig, models: Models, latent: Tensor, out_dir: Path, provenance: dict[str, Any],
                 video: bool = True, shape: Tensor | None = None) -> dict[str, Any]:
    """All outputs of one avatar: latent file, PLY, attribute maps (PNG + safetensors), preview, turntable, JSON.

    ``shape`` ``[S]`` is the avatar's body shape (stored in the file; None: the template body)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    s = models.decoder_settings
    maps, g = decode(models, latent, shape)
    files = {}
    tensors = {"latent": latent.detach().cpu()}
    if shape is not None:
        tensors["shape"] = shape.detach().float().cpu().reshape(-1)
    meta = {"format": AVATAR_FORMAT, "body": s["body"], "num_points": s["num_points"], "point_seed": s["point_seed"],
            "latent_shape": list(latent.shape), "map_resolution": int(maps.shape[-1]),
            "body_shape": tensors["shape"].tolist() if shape is not None else None, **provenance}
    files["avatar"] = str(save_tensors(out_dir / "avatar.safetensors", tensors, meta))
    files["ply"] = str(g.save_ply(out_dir / "avatar.ply"))
    files["maps"] = str(save_tensors(out_dir / "maps.safetensors", {"maps": maps[0].cpu()},
                                     {"channels": {k: [v.start, v.stop] for k, v in ATTRIBUTE_SLICES.items()}}))
    files["maps_png"] = str(save_image(out_dir / "maps.png", maps_image(maps)))
    centre = body_centre(g.means[0])
    with torch.no_grad():
        cams = turntable_cameras(cfg, 4, centre)
        rgb, _ = models.avatar.render(g, cams, tuple(cfg.data.background))
        files["preview"] = str(save_image(out_dir / "preview.png", image_grid(rgb[0].cpu(), nrow=4)))
        if video:
            n = cfg.generate.turntable_frames
            frames, _ = models.avatar.render(g, turntable_cameras(cfg, n, centre), tuple(cfg.data.background))
            files["turntable"] = str(write_video(out_dir / "turntable.mp4", frames[0].cpu(), fps=cfg.generate.fps))
    settings = {**meta, "files": files, "config": config_to_dict(cfg), "standins": trained_standins(cfg)}
    files["settings"] = str(save_json(out_dir / "settings.json", settings))
    return {"dir": str(out_dir), "files": files, "maps": maps, "gaussians": g}

