"""Sampling a trained RodinHD cascade (Sec. 3.3-3.4: portrait -> base -> upsample -> triplane) and rendering a
triplane to 360-degree views and a turntable; ``rodinhd sample`` and ``rodinhd render``.

A sample folder holds ``triplane.safetensors`` (loadable by ``render``), ``triplane_lowres.safetensors``,
``views/``, ``views.png``, ``turntable.mp4`` and ``settings.json``.

Both commands write result folders by the kernel's rule (:mod:`avatar_core.results`): a new folder, or an existing
result replaced only with ``overwrite`` (its old views are cleared first, so fewer views leave no stale ones); the
portrait's and the triplane's folders and the run's model folders are read-only; every argument is checked before
a model is loaded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from avatar_core.cameras import Cameras, orbit_cameras
from avatar_core.config import config_to_dict
from avatar_core.env import resolve_device
from avatar_core.errors import CorruptFileError, InputError, MissingFileError
from avatar_core.io import image_grid, load_tensors, save_image, save_json, save_tensors
from avatar_core.render.turntable import turntable
from avatar_core.results import check_result_dir, prepare_result_dir, result_name
from rodinhd.conditioning import portrait_features, prepare_portrait
from rodinhd.config import RodinHDConfig
from rodinhd.decoder import TriplaneDecoder
from rodinhd.models import build_base, build_upsample, feature_channels, get_encoder, load_decoder, load_trained
from rodinhd.portrait import load_user_portrait
from rodinhd.renderer import TriplaneField, build_occupancy_grid, render_views
from rodinhd.streaming import resolve_standins
from rodinhd.triplane import TriplaneStore, unroll

__all__ = ["TriplaneSampler", "load_triplane_file", "render_file", "sample"]

SAMPLE_KIND, RENDER_KIND = "rodinhd.sample", "rodinhd.render"


def _is_sample(folder: Path) -> bool:
    """A sample or render folder written before result markers existed (it has the views of a triplane)."""
    return (folder / "settings.json").is_file() or ((folder / "views").is_dir() and (folder / "views.png").is_file())


def _run_inputs(out: Path) -> list[Path]:
    """The run's folders a sample reads: never written by sample or render."""
    return [out / "base", out / "upsample", out / "triplanes", out / "stage1"]


class TriplaneSampler:
    """The trained cascade of a run folder: portrait features -> base -> upsample -> triplane ``[3, C, R, R]``."""

    def __init__(self, cfg: RodinHDConfig, out: str | os.PathLike, device: torch.device | str | None = None):
        self.cfg, self.out = cfg, Path(out)
        self.device = torch.device(device) if device is not None else resolve_device(cfg.device)
        self.decoder = load_decoder(cfg, out, self.device)
        self.encoder = get_encoder(cfg, out, None, self.device)
        fc = feature_channels(self.encoder)
        use_ema = cfg.sample.use_ema
        self.base = build_base(cfg, fc).to(self.device).eval()
        load_trained(self.base, self.out / "base", use_ema, "base")
        self.upsample = build_upsample(cfg, fc).to(self.device).eval()
        load_trained(self.upsample, self.out / "upsample", use_ema, "upsample")

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


def _render_outputs(cfg: RodinHDConfig, planes: Tensor, decoder: TriplaneDecoder, dest: Path, num_views: int, view_res: int,
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


def sample(cfg: RodinHDConfig, out: str | os.PathLike = "outputs/rodinhd", portrait: str | os.PathLike | None = None,
           name: str | None = None, dest: str | os.PathLike | None = None, sampler: TriplaneSampler | None = None,
           num_views: int | None = None, frames: int | None = None, overwrite: bool = False,
           mask: str | os.PathLike | None = None, frame: bool = True) -> dict:
    """``rodinhd sample``: portrait (or none: unconditional) -> base -> upsample -> triplane -> 360-degree renders.

    The portrait is RGBA of any aspect, or RGB with ``mask`` (white = person); it is cropped / padded around the
    person to the training portraits' framing (:mod:`rodinhd.portrait`) unless ``frame`` is False.

    Writes ``triplane.safetensors`` (loadable by ``render``), ``views/``, ``views.png``, ``turntable.mp4`` and
    ``settings.json`` to ``dest`` (default ``<out>/samples/<name>``; without a name, one unique per portrait, seed
    and sampling settings) and returns their paths and timings. An existing ``dest`` is replaced only with
    ``overwrite``.
    """
    out = Path(out)
    if mask is not None and portrait is None:
        raise InputError("a mask was given without a portrait", "pass --portrait IMG with --mask MASK")
    # validated (and framed) before any model is loaded
    image = load_user_portrait(portrait, mask, frame) if portrait is not None else None
    s = cfg.sample
    if dest is None and not name:
        what = Path(portrait).parent.name + "_" + Path(portrait).stem if portrait else "uncond"
        name = result_name(what, s.seed, {"portrait": str(portrait), **({"mask": str(mask)} if mask else {}),
                                          **({} if frame else {"frame": False}), "base_steps": s.base_steps,
                                          "upsample_steps": s.upsample_steps, "guidance": s.guidance_scale}, n=32)
    dest = Path(dest) if dest is not None else out / "samples" / name
    inputs = [portrait, *([mask] if mask is not None else []), *_run_inputs(out)]
    check_result_dir(dest, SAMPLE_KIND, overwrite, inputs=inputs, what="--dest" if name is None else "--name",
                     recognise=_is_sample)
    gen = sampler or TriplaneSampler(cfg, out)
    planes, info = gen(image, s.seed, s.base_steps, s.upsample_steps, s.guidance_scale)
    prepare_result_dir(dest, SAMPLE_KIND, overwrite, inputs=inputs, recognise=_is_sample)  # only now: all went well
    store = TriplaneStore(dest, cfg.triplane.channels, cfg.triplane.resolution)
    tri = store.save("triplane", planes, {"stage": "sample", "portrait": str(portrait) if portrait else None})
    save_tensors(dest / "triplane_lowres.safetensors", {"planes": unroll(info["low_res"]).cpu()})
    outputs = _render_outputs(cfg, planes, gen.decoder, dest, s.num_views if num_views is None else num_views,
                              s.view_res, s.turntable_frames if frames is None else frames, s.turntable_res)
    settings = {"portrait": str(portrait) if portrait else None, "unconditional": portrait is None,
                "mask": str(mask) if mask else None, "framed": bool(frame and portrait is not None),
                "seed": s.seed, "base_steps": s.base_steps or cfg.base.sample_steps,
                "upsample_steps": s.upsample_steps or cfg.upsample.sample_steps, "guidance_scale": s.guidance_scale,
                "base_seconds": info["base_seconds"], "upsample_seconds": info["upsample_seconds"],
                "render_seconds": outputs.get("render_seconds"), "run": str(out),
                "triplane_shape": list(planes.shape), "config": config_to_dict(cfg),
                **resolve_standins(cfg, ("encoder",)).settings()}
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


def render_file(cfg: RodinHDConfig, out: str | os.PathLike = "outputs/rodinhd", triplane: str | os.PathLike = "",
                dest: str | os.PathLike | None = None, overwrite: bool = False) -> dict:
    """``rodinhd render``: a triplane file -> views and a turntable with the run's decoder.

    ``dest`` defaults to a folder beside the triplane's folder (``<folder>_<file stem>_render``): the triplane's
    own folder is an input and stays untouched. An existing ``dest`` is replaced only with ``overwrite``."""
    out = Path(out)
    planes = load_triplane_file(triplane, cfg.triplane.channels, cfg.triplane.resolution)
    src = Path(triplane)
    dest = Path(dest) if dest is not None else src.parent.parent / f"{src.parent.name}_{src.stem}_render"
    inputs = [triplane, *_run_inputs(out)]
    check_result_dir(dest, RENDER_KIND, overwrite, inputs=inputs, what="--dest", recognise=_is_sample)
    device = resolve_device(cfg.device)
    decoder = load_decoder(cfg, out, device)
    prepare_result_dir(dest, RENDER_KIND, overwrite, inputs=inputs, recognise=_is_sample)
    s = cfg.sample
    return {"dest": str(dest), **_render_outputs(cfg, planes.to(device), decoder, dest, s.num_views, s.view_res,
                                                 s.turntable_frames, s.turntable_res)}


