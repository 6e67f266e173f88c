"""What a user does with a trained TeRA run: text -> avatar (Sec. 3.4), try-on editing (Sec. 3.5), animation by
the body's skinning (Sec. 3.1) and export to files other tools open. ``tera generate / edit / animate / export``.

Every command writes a new result folder (``avatar_core.results``): the default name is unique per prompt, seed
and settings; an existing folder is replaced only with ``overwrite`` (its old files are cleared first), and the
source avatar of an edit, animation or export is never written to. Every argument is checked before anything is
written or loaded."""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from avatar_core.body.motions import load_motion
from avatar_core.errors import ConfigError, InputError, MissingFileError
from avatar_core.io import image_grid, save_image, save_json, save_tensors, write_video
from avatar_core.results import check_result_dir, prepare_result_dir, result_name, short_hash, slug
from tera import animate as anim
from tera import edit as edit_mod
from tera.avatars import (
    AVATAR_FORMAT,
    Models,
    body_centre,
    decode,
    load_avatar,
    load_models,
    maps_image,
    predict_shape,
    stored_shape,
    turntable_cameras,
    write_avatar,
)
from tera.config import TeraConfig
from tera.latent_diffusion import SAMPLERS
from tera.runs import run_paths

log = logging.getLogger(__name__)

__all__ = ["animate", "edit", "export", "generate", "sample_latents", "sampling"]


def _check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty", 'describe the avatar, e.g. "a woman in a red dress"')
    return prompt.strip()


AVATAR_KIND, ANIMATION_KIND, EXPORT_KIND = "tera.avatar", "tera.animation", "tera.export"


def _is_avatar_dir(folder: Path) -> bool:
    """An avatar folder written before result markers existed (its settings.json names the avatar format)."""
    try:
        return json.loads((folder / "settings.json").read_text()).get("format") == AVATAR_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_motion(motion: str) -> str:
    """A built-in motion's name, or the path of an SMPL-X / AMASS ``.npz`` pose sequence (read by the kernel's
    :func:`avatar_core.body.motions.load_motion`)."""
    if str(motion).lower().endswith(".npz"):
        if not Path(motion).is_file():
            raise MissingFileError(f"no motion file at {motion}", "pass an SMPL-X / AMASS .npz pose sequence")
        return str(motion)
    if motion not in anim.MOTIONS:
        raise InputError(f"unknown motion {motion!r}", f"use one of: {', '.join(anim.MOTIONS)}, or an .npz file")
    return motion


def _motion_name(motion: str) -> str:
    return slug(Path(motion).stem, 24, "motion") if motion.lower().endswith(".npz") else motion


def _pose(models: Models, g, motion: str, cfg: TeraConfig, shape: Tensor | None = None):
    """The canonical avatar ``g`` posed by ``motion`` on the body of ``shape`` (None: the template): a built-in
    loop of ``animate.frames`` frames, or the first ``animate.frames`` frames of an ``.npz`` sequence at
    ``animate.fps`` (root rotation and translation kept; the avatar keeps its own shape, not the file's)."""
    a, body = cfg.animate, models.avatar.body
    shape = None if shape is None else shape.to(models.device, torch.float32)
    if not motion.lower().endswith(".npz"):
        return anim.animate(models.avatar, g, anim.builtin_motion(body, motion, a.frames).to(models.device),
                            shape=shape)
    m = load_motion(motion, body, fps=a.fps, frames=slice(0, a.frames))
    return anim.animate(models.avatar, g, m.poses, shape=shape, global_orient=m.global_orient, transl=m.transl)


def _source_dir(avatar_path: str | Path) -> Path:
    return Path(avatar_path) if Path(avatar_path).is_dir() else Path(avatar_path).parent


def sampling(cfg: TeraConfig, sampler: str | None = None) -> dict[str, Any]:
    """The sampler settings of ``cfg.generate`` (checked) as keywords of :func:`sample_latents`."""
    g = cfg.generate
    sampler = sampler or g.sampler
    if sampler not in SAMPLERS:
        raise ConfigError(f"generate.sampler={sampler!r}", f"use one of: {', '.join(SAMPLERS)}")
    return {"sampler": sampler, "steps": g.steps or None, "guidance": g.guidance or None}


def sample_latents(models: Models, prompts: list[str], seed: int, **options) -> Tensor:  # [B, C, h, w]
    gen = torch.Generator().manual_seed(int(seed))
    return models.diffusion.sample(prompts, generator=gen, **options)


def generate(cfg: TeraConfig, prompt: str, out_dir: str | Path | None = None, seed: int | None = None,
             models: Models | None = None, video: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Text -> avatar (Sec. 3.4): sample a latent, read the body shape from the prompt (the run's shape head),
    decode onto that body, write every output; returns paths and timings.

    The default folder is ``<run>/avatars/<prompt slug>_s<seed>_<hash of prompt, seed, settings>``."""
    prompt = _check_prompt(prompt)
    seed = cfg.generate.seed if seed is None else int(seed)
    settings = sampling(cfg)
    out = Path(out_dir) if out_dir is not None else run_paths(cfg).avatars / result_name(prompt, seed, settings)
    check_result_dir(out, AVATAR_KIND, overwrite, recognise=_is_avatar_dir)
    models = models or load_models(cfg)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latent = sample_latents(models, [prompt], seed, **settings)[0].cpu()
    shape = predict_shape(models, prompt)
    for w in caught:
        log.warning("%s", w.message)
    t_sample = time.perf_counter() - t0
    prepare_result_dir(out, AVATAR_KIND, overwrite, recognise=_is_avatar_dir)
    prov = {"prompt": prompt, "seed": seed, **settings, "kind": "generate",
            "shape_from": "template" if shape is None else "prompt"}
    res = write_avatar(cfg, models, latent, out, prov, video=video, shape=shape)
    res["seconds_sample"] = t_sample
    res["seconds"] = time.perf_counter() - t0
    return res


def edit(cfg: TeraConfig, avatar_path: str | Path, region: str, prompt: str, out_dir: str | Path | None = None,
         seed: int | None = None, method: str | None = None, models: Models | None = None,
         video: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Structure-aware editing / try-on (Sec. 3.5): regenerate ``region`` under ``prompt``; the source is kept.

    The default folder sits beside the source: ``<source>__<region>__<prompt slug>_s<seed>_<hash>``."""
    prompt = _check_prompt(prompt)
    edit_mod.parse_regions(region)  # an unknown region fails here, listing the valid ones, before anything loads
    method = method or cfg.edit.method
    seed = cfg.generate.seed if seed is None else int(seed)
    settings = sampling(cfg)
    src_dir = _source_dir(avatar_path)
    out = Path(out_dir) if out_dir is not None else src_dir.parent / (
        f"{src_dir.name}__{slug(region)}__"
        + result_name(prompt, seed, {"region": region, "method": method, "source": str(src_dir), **settings}, n=24))
    check_result_dir(out, AVATAR_KIND, overwrite, inputs=[avatar_path], recognise=_is_avatar_dir)
    models = models or load_models(cfg)
    latent, meta = load_avatar(avatar_path, models)
    model = models.diffusion
    cells = edit_mod.region_mask(models.avatar.uv_mapper.part_masks(), region, model.latent_shape[1:],
                                 rule=cfg.edit.rule, dilate=cfg.edit.dilate)
    t0 = time.perf_counter()
    new = edit_mod.edit(model, latent, cells.cpu(), prompt, generator=torch.Generator().manual_seed(int(seed)),
                        method=method, **settings).cpu()
    t_edit = time.perf_counter() - t0
    seam = edit_mod.seam_gradient(new, cells)
    prov = {"prompt": prompt, "seed": seed, **settings, "kind": "edit", "region": region, "method": method,
            "source": str(avatar_path), "source_prompt": meta.get("prompt"), "seam": seam,
            "changed_outside_region": float((new - latent)[:, ~cells].abs().max()) if (~cells).any() else 0.0,
            "shape_from": "template" if stored_shape(meta) is None else "source"}  # an edit keeps the body
    prepare_result_dir(out, AVATAR_KIND, overwrite, inputs=[avatar_path], recognise=_is_avatar_dir)
    res = write_avatar(cfg, models, new, out, prov, video=video, shape=stored_shape(meta))
    res.update({"seconds_edit": t_edit, "seam": seam, "cells": int(cells.sum()), "latent": new, "source_latent": latent,
                "region_cells": cells})
    return res


def animate(cfg: TeraConfig, avatar_path: str | Path, out: str | Path | None = None, motion: str | None = None,
            models: Models | None = None, overwrite: bool = False) -> dict[str, Any]:
    """A clip of the avatar with a built-in motion, posed by the body's skinning (Sec. 3.1).

    ``out`` is a result folder receiving ``<motion>.mp4`` and a strip ``<motion>.png``; by default it sits beside
    the avatar, ``<avatar>__<motion>_<hash of the clip settings>`` (the avatar's own folder is never written)."""
    a = cfg.animate
    motion = _check_motion(motion or a.motion)
    src_dir = _source_dir(avatar_path)
    name = _motion_name(motion)
    clip = {"motion": str(Path(motion).resolve()) if name != motion else motion, "frames": a.frames, "fps": a.fps,
            "size": a.render_size, "source": str(src_dir)}
    folder = Path(out) if out is not None else src_dir.parent / f"{src_dir.name}__{name}_{short_hash(clip)}"
    check_result_dir(folder, ANIMATION_KIND, overwrite, inputs=[avatar_path])
    models = models or load_models(cfg, with_diffusion=False)
    latent, meta = load_avatar(avatar_path, models)
    t0 = time.perf_counter()
    shape = stored_shape(meta)
    _, g = decode(models, latent, shape)
    frames = _pose(models, g, motion, cfg, shape)
    centre = body_centre(frames.means[0])
    cam = turntable_cameras(cfg, 1, centre, a.render_size)
    images = anim.render_frames(models.avatar, frames, cam, tuple(cfg.data.background))
    prepare_result_dir(folder, ANIMATION_KIND, overwrite, inputs=[avatar_path], info={"source": str(avatar_path)})
    path = folder / f"{name}.mp4"
    written = write_video(path, images.cpu(), fps=a.fps)
    strip = save_image(path.with_suffix(".png"), image_grid(images[:: max(1, len(images) // 4)][:4].cpu(), nrow=4))
    return {"video": str(written), "strip": str(strip), "frames": len(images), "motion": motion,
            "seconds": time.perf_counter() - t0}


def export(cfg: TeraConfig, avatar_path: str | Path, out_dir: str | Path, motion: str | None = None,
           overwrite: bool = False) -> dict[str, Any]:
    """The avatar as files for other tools: canonical PLY, attribute maps, and optionally posed PLYs per frame."""
    if motion:
        _check_motion(motion)  # before anything is written
    out = check_result_dir(out_dir, EXPORT_KIND, overwrite, inputs=[avatar_path])
    models = load_models(cfg, with_diffusion=False)
    latent, meta = load_avatar(avatar_path, models)
    prepare_result_dir(out, EXPORT_KIND, overwrite, inputs=[avatar_path], info={"source": str(avatar_path)})
    shape = stored_shape(meta)
    maps, g = decode(models, latent, shape)
    files = {"ply": str(g.save_ply(out / "canonical.ply")),
             "maps": str(save_tensors(out / "maps.safetensors", {"maps": maps[0].cpu()}, {"source": str(avatar_path)})),
             "maps_png": str(save_image(out / "maps.png", maps_image(maps)))}
    if motion:
        frames, name = _pose(models, g, motion, cfg, shape), _motion_name(motion)
        for t in range(len(frames)):
            frames[t].save_ply(out / f"{name}_{t:03d}.ply")
        files["posed"] = f"{out}/{name}_NNN.ply ({len(frames)} frames)"
    save_json(out / "export.json", {"source": str(avatar_path), "provenance": meta, "files": files})
    return files

