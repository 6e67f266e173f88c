"""What every TeRA stage shares: the run folder's layout, the device, the body's UV Gaussian avatar and the dataset.

Files under ``cfg.run_dir``::

    teacher/<avatar_id>.safetensors   teacher UV features [C, H, W] (+ decoder.safetensors)   tera.teacher
    distill/decoder.safetensors       distillation decoder + its settings                      tera.stage1
    distill/latents.json              the latents' folder (latents/<key>/items/<id>.safetensors)  tera.stage1
    distill/checkpoints/, metrics.jsonl
    diffusion/model/                  config.json + model.safetensors                           tera.stage2
    cache/text_states/<key>/          caption token states per avatar, keyed by the text encoder  tera.stage2
    */standins.json                   the stand-ins each stage used (tera.standins)
    diffusion/checkpoints/, metrics.jsonl
    avatars/<name>/                   avatar.safetensors (latent + provenance), avatar.ply, maps.png,
                                      maps.safetensors, turntable.mp4, preview.png, settings.json   tera.generate
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from avatar_core.body import BodyOutput, UVMapper, load_body_model
from avatar_core.cameras import Cameras
from avatar_core.env import resolve_device
from avatar_core.errors import MissingFileError
from tera import animate as anim
from tera.config import TeraConfig
from tera.data import TeraDataset, ensure_dataset
from tera.distill import PerceptualLoss
from tera.uv_gaussians import GaussianBatch, UVDecoder, UVGaussianAvatar, lit

__all__ = ["RunPaths", "build_avatar", "dataset_ambient", "load_dataset", "perceptual", "posed_render", "run_paths",
           "stage_signature", "train_device", "uv_decoder"]

#: Settings read only after training (where the run lives, sampling, editing, animation, evaluation): a stage
#: may resume under other values of these; every other setting is part of the stage's resume signature.
AFTER_TRAINING = ("run_dir", "generate", "edit", "animate", "evaluate", "data.num_workers", "data.view_cache",
                  "data.body_cache")
#: Per stage, the sections it does not read besides AFTER_TRAINING (an explicit allow-list, never a pick-list).
STAGE_MAY_CHANGE = {
    "teacher": ("distill", "diffusion", "text", "teacher.features_dir", "data.num", "data.max_avatars"),
    "distill": ("diffusion", "text", "teacher.features_dir"),
    "diffusion": ("teacher.features_dir", "diffusion.guidance_scale", "diffusion.sample_steps", "diffusion.ddim_steps"),
}


def stage_signature(cfg: TeraConfig, stage: str) -> dict:
    """What ``stage`` ("teacher", "distill", "diffusion") trains under: the whole config minus its allow-list."""
    from avatar_core.train import config_signature

    return config_signature(cfg, allow=AFTER_TRAINING + STAGE_MAY_CHANGE[stage])


def train_device(cfg: TeraConfig) -> torch.device:
    """The device of this process: under ``accelerate launch`` each process has its own GPU."""
    dev = resolve_device(cfg.device, cfg.threads)
    if cfg.device == "auto":
        from accelerate import PartialState

        return PartialState().device
    return dev


@dataclass
class RunPaths:
    """Where each stage reads and writes (module docstring)."""

    run: Path
    teacher: Path
    distill: Path
    diffusion: Path
    avatars: Path


def run_paths(cfg: TeraConfig) -> RunPaths:
    run = Path(cfg.run_dir)
    teacher = Path(cfg.teacher.features_dir) if cfg.teacher.features_dir else run / "teacher"
    distill = Path(cfg.distill.train.output_dir) if cfg.distill.train.output_dir else run / "distill"
    diffusion = Path(cfg.diffusion.train.output_dir) if cfg.diffusion.train.output_dir else run / "diffusion"
    return RunPaths(run, teacher, distill, diffusion, run / "avatars")


@lru_cache(maxsize=4)
def _body(name: str, model_dir: str | None):
    return load_body_model(name, model_dir)


@lru_cache(maxsize=8)
def _avatar(name: str, model_dir: str | None, num_points: int, seed: int, uv_res: int, knn_k: int,
            device: str = "cpu") -> UVGaussianAvatar:
    if device != "cpu":  # a copy of the CPU avatar (and its body): never the shared object moved in place
        return copy.deepcopy(_avatar(name, model_dir, num_points, seed, uv_res, knn_k)).to(device)
    body = _body(name, model_dir)
    return UVGaussianAvatar(body, num_points, seed=seed, knn_k=knn_k, uv_mapper=UVMapper(body, uv_res))


def build_avatar(cfg: TeraConfig, device: torch.device | str | None = None) -> UVGaussianAvatar:
    """The UV Gaussian avatar of ``cfg.body`` (body model + fixed UV point set) on ``device`` (default CPU), built
    once per process and device. Callers share the object: move it with this argument, never with ``.to()``,
    which would move every other caller's avatar too."""
    b = cfg.body
    dev = str(torch.device(device)) if device is not None else "cpu"
    return _avatar(b.name, b.model_dir, int(b.num_points), int(b.point_seed), int(b.uv_resolution), int(b.knn_k),
                   dev)


def load_dataset(cfg: TeraConfig, create: bool = False) -> TeraDataset:
    """The configured dataset; with ``create`` and ``data.synthetic`` the synthetic dataset of ``cfg.data``'s sizes
    is written first when missing. A config that names the user's own data (``synthetic: false``) is never
    generated: a missing one is an error."""
    d = cfg.data
    if create and d.synthetic:
        ensure_dataset(d.root, d.num, d.views, d.res, d.uv_res, d.seed, cfg.body.name)
    if not d.synthetic and not (Path(d.root) / "meta.json").is_file():
        raise MissingFileError(f"no dataset at data.root={d.root}; this config reads your own data (data.synthetic is "
                               "false), so it is not generated",
                               "convert your dataset (the paper: HuGe100K) to avatar_core's layout at data.root, or "
                               "set data.synthetic=true to write a synthetic one there")
    if not (Path(d.root) / "meta.json").is_file():
        raise MissingFileError(f"no avatar dataset at {d.root}",
                               f"write one with `avatar-core make-dataset --out {d.root} --num {d.num} --views {d.views}"
                               f" --res {d.res} --uv-res {d.uv_res}`, or set data.root=...")
    return TeraDataset(d.root, d.image_size, d.max_avatars, view_cache=d.view_cache, body_cache=d.body_cache)


def posed_render(avatar: UVGaussianAvatar, gaussians: GaussianBatch, body: BodyOutput | None, cameras: Cameras,
                 background, ambient: float | None = None) -> Tensor:  # [1, V, H, W, 3]
    """Canonical Gaussians skinned onto a posed body (if given) and rendered in ``cameras``; with ``ambient``
    their colours are lit by the dataset's light rig on that body's normals (:func:`tera.uv_gaussians.lit`)."""
    vertices = avatar.body.template_vertices[None] if body is None else body.vertices
    if body is not None:
        gaussians = anim.pose_gaussians(avatar, gaussians, body)
    if ambient is not None:
        gaussians = lit(gaussians, avatar.surface_normals(vertices.to(gaussians.means)), cameras.viewmats, ambient)
    rgb, _ = avatar.render(gaussians, cameras, background)
    return rgb


def dataset_ambient(cfg: TeraConfig, ds: TeraDataset) -> float | None:
    """The ambient term of the dataset's recorded lighting when ``data.lit_renders`` (renders compared with its
    views are lit as the views were), else None (unlit renders)."""
    if not cfg.data.lit_renders:
        return None
    from avatar_core.render.lighting import lighting_ambient

    return lighting_ambient(ds.base.meta, str(ds.root))


def perceptual(cfg: TeraConfig) -> PerceptualLoss:
    """The perceptual loss of the teacher and stage 1 (VGG16 weights from ``teacher.vgg_weights``)."""
    return PerceptualLoss(cfg.teacher.vgg_weights)


def uv_decoder(cfg: TeraConfig) -> UVDecoder:
    """A fresh IDOL-style UV decoder with the teacher's sizes."""
    t = cfg.teacher
    return UVDecoder(t.channels, t.geometry_channels, t.geometry_hidden, t.texture_hidden, t.offset_init)
