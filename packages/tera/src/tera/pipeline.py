"""TeRA end to end: fit the teacher, distil the latent space (stage 1), train the latent diffusion (stage 2),
generate, edit (try-on), animate, export and evaluate. Every function takes a :class:`tera.config.TeraConfig`.

Files under ``cfg.run_dir``::

    teacher/<avatar_id>.safetensors   teacher UV features [C, H, W] (+ decoder.safetensors)   fit_teacher
    distill/decoder.safetensors       distillation decoder + its settings                      distill
    distill/latents.safetensors       the dataset's latents [A, C, r, r] (ids in the metadata)  distill
    distill/checkpoints/, metrics.jsonl
    diffusion/model/                  config.json + model.safetensors                           train
    diffusion/checkpoints/, metrics.jsonl
    avatars/<name>/                   avatar.safetensors (latent + provenance), avatar.ply, maps.png,
                                      maps.safetensors, turntable.mp4, preview.png, settings.json
"""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avatar_core.body import BodyOutput, UVMapper, load_body_model
from avatar_core.cameras import Cameras, orbit_cameras
from avatar_core.config import config_to_dict, save_config
from avatar_core.data.appearance import GARMENT_COLOURS
from avatar_core.errors import ConfigError, CorruptFileError, InputError, MissingFileError
from avatar_core.io import image_grid, load_tensors, save_image, save_json, save_tensors, write_video
from avatar_core.train import Trainer
from tera import animate as anim
from tera import edit as edit_mod
from tera.config import TeraConfig
from tera.data import TeraDataset, caption_choice, ensure_dataset, training_views
from tera.distill import DistillationDecoder, PerceptualLoss, features_to_latent, render_loss
from tera.latent_diffusion import SAMPLERS, StructuredLatentDiffusion
from tera.teacher import DECODER_FILE, TeacherFeatureStore, TeacherFitter
from tera.text import TextCondition, TextConditioner
from tera.uv_gaussians import ATTRIBUTE_SLICES, GaussianBatch, UVDecoder, UVGaussianAvatar, composite

log = logging.getLogger(__name__)

AVATAR_FORMAT = "tera.avatar/1"
DECODER_FORMAT = "tera.distill_decoder/1"


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


def resolve_device(name: str, threads: int = 0) -> torch.device:
    """'auto' -> CUDA when available, else CPU; ``threads`` > 0 sets torch's CPU thread count."""
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(int(threads))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here", "use device=auto or device=cpu")
    return dev


def _train_device(cfg: TeraConfig) -> torch.device:
    """The device of this process: under ``accelerate launch`` each process has its own GPU."""
    dev = resolve_device(cfg.device, cfg.threads)
    if cfg.device == "auto":
        from accelerate import PartialState

        return PartialState().device
    return dev


def _shard(batches: list) -> list:
    """This process's share of an epoch's batches (every process gets the same number)."""
    from accelerate import PartialState

    st = PartialState()
    if st.num_processes == 1:
        return batches
    n = len(batches) // st.num_processes * st.num_processes
    return batches[st.process_index:n:st.num_processes]


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


@lru_cache(maxsize=4)
def _avatar(name: str, model_dir: str | None, num_points: int, seed: int, uv_res: int, knn_k: int) -> UVGaussianAvatar:
    body = _body(name, model_dir)
    return UVGaussianAvatar(body, num_points, seed=seed, knn_k=knn_k, uv_mapper=UVMapper(body, uv_res))


def build_avatar(cfg: TeraConfig) -> UVGaussianAvatar:
    """The UV Gaussian avatar of ``cfg.body`` (body model + fixed UV point set), built once per process."""
    b = cfg.body
    return _avatar(b.name, b.model_dir, int(b.num_points), int(b.point_seed), int(b.uv_resolution), int(b.knn_k))


def load_dataset(cfg: TeraConfig, create: bool = False) -> TeraDataset:
    """The configured dataset; with ``create`` it is written first when missing (``cfg.data`` sizes)."""
    d = cfg.data
    if create:
        ensure_dataset(d.root, d.num, d.views, d.res, d.uv_res, d.seed, cfg.body.name)
    if not (Path(d.root) / "meta.json").is_file():
        raise MissingFileError(f"no avatar dataset at {d.root}",
                               f"write one with `avatar-core make-dataset --out {d.root} --num {d.num} --views {d.views}"
                               f" --res {d.res} --uv-res {d.uv_res}`, or set data.root=...")
    return TeraDataset(d.root, d.image_size, d.max_avatars)


def posed_render(avatar: UVGaussianAvatar, gaussians: GaussianBatch, body: BodyOutput | None, cameras: Cameras,
                 background) -> Tensor:  # [1, V, H, W, 3]
    """Canonical Gaussians skinned onto a posed body (if given) and rendered in ``cameras``."""
    if body is not None:
        gaussians = anim.pose_gaussians(avatar, gaussians, body)
    rgb, _ = avatar.render(gaussians, cameras, background)
    return rgb


def psnr(a: Tensor, b: Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def _perceptual(cfg: TeraConfig) -> PerceptualLoss:
    return PerceptualLoss(cfg.teacher.vgg_weights)


def _uv_decoder(cfg: TeraConfig) -> UVDecoder:
    t = cfg.teacher
    return UVDecoder(t.channels, t.geometry_channels, t.geometry_hidden, t.texture_hidden, t.offset_init)


# --------------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------------


class PosedTeacherFitter(TeacherFitter):
    """:class:`tera.teacher.TeacherFitter` whose renders are skinned onto the avatar's own posed body.

    The dataset's views show each avatar in its shape and pose; the canonical Gaussians are posed with
    ``body_output`` (set per avatar) before rendering. Without it, the parent's canonical loss applies.
    """

    body_output: BodyOutput | None = None
    #: Standard deviation of the features' initial values (the parent draws 0.1 * randn). 0 starts every avatar
    #: at zero, so texels no Gaussian reads stay 0 instead of keeping random values the latent would carry.
    init_scale: float = 0.1

    def fit_avatar(self, images: Tensor, cameras: Cameras, steps: int, seed: int | None = None):
        if self.init_scale == 0.1:
            return super().fit_avatar(images, cameras, steps, seed)
        g = torch.Generator().manual_seed(self.seed if seed is None else seed)
        C, R = self.store.channels, self.resolution
        device = self.avatar.template_points.device
        param = torch.nn.Parameter((self.init_scale * torch.randn(C, R, R, generator=g)).to(device))
        images, cameras = images.to(device), cameras.to(device)
        opt = torch.optim.Adam([param], lr=self.feature_lr)
        self.decoder.train()
        history = []
        for _ in range(steps):
            pick = torch.randperm(images.shape[0], generator=g)[: self.views_per_step].tolist()
            loss, _ = self.loss(torch.tanh(param), images[pick], cameras[pick])
            opt.zero_grad(set_to_none=True)
            self._decoder_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([param, *self.decoder.parameters()], self.grad_clip)
            opt.step()
            self._decoder_opt.step()
            history.append(loss.item())
        return torch.tanh(param).detach(), history

    def loss(self, features: Tensor, images: Tensor, cameras: Cameras):
        maps = self.decoder(features[None])
        g = self.avatar(maps)
        pred = posed_render(self.avatar, g, self.body_output, cameras, self.background)
        target = composite(images, self.background).to(pred)[None]
        return render_loss(pred, target, g.offsets, self.perceptual, *self.lambdas, sum_views=False)


def fit_teacher(cfg: TeraConfig, progress: bool = True, create_dataset: bool = False) -> dict[str, Any]:
    """Teacher UV features for every dataset avatar (fitted, or IDOL's checked on disk); resumes where it stopped."""
    start = time.perf_counter()
    paths = run_paths(cfg)
    t = cfg.teacher
    store = TeacherFeatureStore(paths.teacher, t.channels)
    resolve_device(cfg.device, cfg.threads)
    ds = load_dataset(cfg, create=create_dataset)
    if t.source == "idol":
        missing = [a for a in ds.ids if not store.exists(a)]
        if missing:
            raise MissingFileError(
                f"IDOL features missing for {len(missing)} of {len(ds)} avatars in {store.root} (first: {missing[0]})",
                f"export IDOL's UV features as {store.root}/<avatar_id>.safetensors (key 'uv_features', "
                f"[{t.channels}, H, W]) or set teacher.source=fit")
        return {"source": "idol", "avatars": len(ds), "seconds": time.perf_counter() - start}
    if t.source != "fit":
        raise ConfigError(f"teacher.source={t.source!r}", "use 'fit' (own teacher) or 'idol' (features on disk)")
    avatar = build_avatar(cfg)
    fitter = PosedTeacherFitter(
        avatar, store, feature_resolution=t.resolution, decoder=_uv_decoder(cfg), lr=t.lr, feature_lr=t.feature_lr,
        lambda_mse=t.lambda_mse, lambda_lpips=t.lambda_lpips, lambda_offset=t.lambda_offset,
        perceptual=_perceptual(cfg), views_per_step=t.views_per_step, grad_clip=t.grad_clip,
        background=tuple(cfg.data.background), seed=cfg.seed)
    fitter.init_scale = t.init_scale
    train_v = training_views(ds.num_views, list(cfg.data.eval_views))
    losses: dict[str, float] = {}
    from tqdm.auto import tqdm

    todo = [i for i, a in enumerate(ds.ids) if not store.exists(a)]
    for k in tqdm(todo, desc="fit-teacher", disable=not progress):
        images, cams = ds.views(k, train_v)
        fitter.body_output = ds.body_output(k, avatar.body)
        feats, hist = fitter.fit_avatar(images, cams, t.steps, seed=cfg.seed + k)
        store.save(ds.ids[k], feats, {"resolution": t.resolution, "steps": t.steps, "final_loss": hist[-1]})
        # The decoder after every avatar: an interrupted run resumes with it (TeacherFitter reads it back).
        save_tensors(store.root / DECODER_FILE, fitter.decoder.state_dict(), {"channels": t.channels})
        losses[ds.ids[k]] = hist[-1]
    return {"source": "fit", "avatars": len(ds), "fitted": len(todo),
            "mean_final_loss": float(np.mean(list(losses.values()))) if losses else None,
            "seconds": time.perf_counter() - start}


def _teacher_latents(cfg: TeraConfig, ds: TeraDataset, latent_resolution: int) -> Tensor:  # [A, C, r, r]
    store = TeacherFeatureStore(run_paths(cfg).teacher, cfg.teacher.channels)
    missing = [a for a in ds.ids if not store.exists(a)]
    if missing:
        raise MissingFileError(
            f"teacher UV features missing for {len(missing)} of {len(ds)} avatars in {store.root} "
            f"(first: {missing[0]})", "run `tera fit-teacher` first (or point teacher.features_dir at IDOL features)")
    lat = []
    for a in ds.ids:
        f = store.load(a)
        if f.shape[-1] % latent_resolution:
            raise ConfigError(f"teacher features are {f.shape[-1]}^2, not a multiple of the latent resolution "
                              f"{latent_resolution}", "pick distill.latent_resolution dividing teacher.resolution")
        lat.append(features_to_latent(f, latent_resolution)[0])
    return torch.stack(lat)


# --------------------------------------------------------------------------------------------------
# Stage 1: distillation decoder
# --------------------------------------------------------------------------------------------------


def _decoder_settings(cfg: TeraConfig, latent_resolution: int) -> dict[str, Any]:
    t, d, b = cfg.teacher, cfg.distill, cfg.body
    return {"format": DECODER_FORMAT, "latent_channels": t.channels, "latent_resolution": latent_resolution,
            "upsample_factor": d.upsample_factor, "hidden_channels": d.hidden_channels,
            "geometry_channels": t.geometry_channels, "geometry_hidden": t.geometry_hidden,
            "texture_hidden": t.texture_hidden, "offset_init": t.offset_init,
            "body": b.name, "num_points": b.num_points, "point_seed": b.point_seed}


def _build_decoder(s: dict[str, Any]) -> DistillationDecoder:
    return DistillationDecoder(s["latent_channels"], s["upsample_factor"], s["hidden_channels"], s["geometry_channels"],
                               s["geometry_hidden"], s["texture_hidden"], s["offset_init"])


def distill(cfg: TeraConfig, progress: bool = True, latent_resolution: int | None = None,
            steps: int | None = None, out_dir: str | Path | None = None, resume: str | None = "auto") -> dict[str, Any]:
    """Stage 1 (Eq. 1): train the distillation decoder on the teacher latents; report held-out view PSNR."""
    start = time.perf_counter()
    d = cfg.distill
    r = int(latent_resolution or d.latent_resolution)
    out = Path(out_dir) if out_dir is not None else run_paths(cfg).distill
    device = _train_device(cfg)
    ds = load_dataset(cfg)
    latents = _teacher_latents(cfg, ds, r)
    avatar = build_avatar(cfg).to(device)
    settings = _decoder_settings(cfg, r)
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only: runs are reproducible
    decoder = _build_decoder(settings)
    teacher_file = run_paths(cfg).teacher / DECODER_FILE
    if d.init_from_teacher and teacher_file.is_file():
        head = _uv_decoder(cfg)
        head.load_state_dict(load_tensors(teacher_file)[0])
        decoder.load_teacher_head(head)
    perceptual = _perceptual(cfg).to(device)
    bg = tuple(cfg.data.background)
    train_v = training_views(ds.num_views, list(cfg.data.eval_views))
    bodies = [ds.body_output(i, avatar.body) for i in range(len(ds))]
    seed = cfg.seed

    def data(epoch: int) -> list[dict[str, Tensor]]:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(ds))
        out_b = []
        for s in range(0, len(order) - d.batch_size + 1, d.batch_size):
            idx = order[s:s + d.batch_size]
            views = np.stack([rng.choice(train_v, size=min(d.views_per_step, len(train_v)), replace=False) for _ in idx])
            out_b.append({"index": torch.as_tensor(idx), "views": torch.as_tensor(views)})
        return _shard(out_b)

    def step_fn(model, batch):
        total, parts = 0.0, []
        for i, views in zip(batch["index"].tolist(), batch["views"].tolist()):
            images, cams = ds.views(i, views)
            maps = model(latents[i:i + 1].to(device))
            g = avatar(maps)
            pred = posed_render(avatar, g, bodies[i], cams.to(device), bg)
            target = composite(images.to(device), bg)[None]
            loss, p = render_loss(pred, target, g.offsets, perceptual, 1.0, d.lambda_vgg, d.lambda_offset, sum_views=True)
            total = total + loss / len(batch["index"])
            parts.append(p)
        return total, {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}

    tc = config_to_dict(d.train)
    tc["output_dir"] = str(out)
    tc["progress_bar"] = bool(progress and tc.get("progress_bar", True))
    if steps is not None:
        tc["max_steps"] = int(steps)
    trainer = Trainer(tc, decoder, lambda p: torch.optim.Adam(p, lr=d.lr), step_fn, data,
                      run_config={"latent_resolution": r, "lr": d.lr, "batch_size": d.batch_size})
    last = trainer.train(resume=resume)
    decoder = trainer.unwrapped_model
    if trainer.ema is not None:
        trainer.ema.copy_to(decoder)
    decoder.eval()
    if not trainer.accelerator.is_main_process:  # other processes of `accelerate launch` stop here
        return {"latent_resolution": r, "steps": trainer.step}
    save_tensors(out / "decoder.safetensors", decoder.state_dict(), settings)
    save_tensors(out / "latents.safetensors", {"latents": latents}, {"ids": ds.ids, "latent_resolution": r})
    recon = reconstruction_psnr(cfg, decoder, latents, ds, avatar)
    result = {"latent_resolution": r, "steps": trainer.step, "final_loss": last.get("loss"),
              **recon, "seconds": time.perf_counter() - start}
    save_json(out / "summary.json", result)
    return result


@torch.no_grad()
def reconstruction_psnr(cfg: TeraConfig, decoder: DistillationDecoder, latents: Tensor, ds: TeraDataset,
                        avatar: UVGaussianAvatar) -> dict[str, float]:
    """PSNR of decoded, posed renders against the dataset's views: held-out and training views."""
    bg = tuple(cfg.data.background)
    device = next(decoder.parameters()).device
    held = list(cfg.data.eval_views)
    train_v = training_views(ds.num_views, held)
    decoder.eval()
    res = {"psnr_heldout": [], "psnr_train": []}
    for i in range(len(ds)):
        g = avatar(decoder(latents[i:i + 1].to(device)))
        for key, views in (("psnr_heldout", held), ("psnr_train", train_v[:2])):
            if not views:
                continue
            images, cams = ds.views(i, views)
            pred = posed_render(avatar, g, ds.body_output(i, avatar.body), cams.to(device), bg)
            res[key].append(psnr(pred[0].cpu(), composite(images, bg)))
    return {k: float(np.mean(v)) for k, v in res.items() if v}


def load_decoder(cfg: TeraConfig, directory: str | Path | None = None) -> tuple[DistillationDecoder, dict]:
    """The trained distillation decoder and its settings; checked against the config's body."""
    path = Path(directory or run_paths(cfg).distill) / "decoder.safetensors"
    if not path.is_file():
        raise MissingFileError(f"no distillation decoder at {path}", "run `tera distill` first")
    tensors, settings = load_tensors(path)
    if settings.get("format") != DECODER_FORMAT:
        raise CorruptFileError(f"{path} is not a TeRA distillation decoder", "point run_dir at a TeRA run")
    if settings["body"] != cfg.body.name:
        raise ConfigError(f"the decoder in {path} was trained on body {settings['body']!r}, the config says "
                          f"{cfg.body.name!r}", f"set body.name={settings['body']} or train a new run")
    decoder = _build_decoder(settings)
    decoder.load_state_dict(tensors)
    return decoder.eval(), settings


# --------------------------------------------------------------------------------------------------
# Stage 2: latent diffusion
# --------------------------------------------------------------------------------------------------


def _text(cfg: TeraConfig, device: torch.device) -> TextConditioner:
    return TextConditioner(cfg.text.encoder, cfg.text.path, cfg.text.max_length, device=device)


def _unet_config(cfg: TeraConfig, channels: int, resolution: int, text_dim: int) -> dict[str, Any]:
    u = cfg.diffusion.unet
    if len(u.down_block_types) != len(u.block_out_channels) or len(u.up_block_types) != len(u.block_out_channels):
        raise ConfigError("diffusion.unet: block_out_channels, down_block_types and up_block_types need one entry "
                          "per resolution level", "give lists of equal length")
    return {"sample_size": resolution, "in_channels": channels, "out_channels": channels,
            "block_out_channels": list(u.block_out_channels), "down_block_types": list(u.down_block_types),
            "up_block_types": list(u.up_block_types), "layers_per_block": u.layers_per_block,
            "cross_attention_dim": text_dim, "attention_head_dim": u.attention_head_dim,
            "norm_num_groups": u.norm_num_groups}


def load_latents(cfg: TeraConfig) -> tuple[Tensor, list[str]]:
    path = run_paths(cfg).distill / "latents.safetensors"
    if not path.is_file():
        raise MissingFileError(f"no distilled latents at {path}", "run `tera distill` first")
    tensors, meta = load_tensors(path)
    return tensors["latents"], list(meta["ids"])


def train(cfg: TeraConfig, progress: bool = True, resume: str | None = "auto") -> dict[str, Any]:
    """Stage 2: the text-conditioned latent diffusion on the distilled latents (shared Trainer; EMA; resume)."""
    start = time.perf_counter()
    dc = cfg.diffusion
    device = _train_device(cfg)
    latents, ids = load_latents(cfg)
    ds = load_dataset(cfg)
    index = {a: i for i, a in enumerate(ds.ids)}
    unknown = [a for a in ids if a not in index]
    if unknown:
        raise ConfigError(f"the latents come from avatars not in {ds.root} (e.g. {unknown[0]})",
                          "point data.root at the dataset the run was distilled from")
    captions = [ds.captions(index[a]) for a in ids]
    ncap = len(captions[0])
    text = _text(cfg, device)
    cond = text([c for caps in captions for c in caps])
    states = cond.states.reshape(len(ids), ncap, *cond.states.shape[1:]).cpu()  # [A, K, L, D]
    masks = cond.mask.reshape(len(ids), ncap, -1).cpu()  # [A, K, L]
    C, r = latents.shape[1], latents.shape[-1]
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only: runs are reproducible
    model = StructuredLatentDiffusion(
        _unet_config(cfg, C, r, text.dim), text=text, num_train_timesteps=dc.num_train_timesteps,
        schedule=dc.schedule, prediction=dc.prediction, text_dropout=dc.text_dropout,
        guidance_scale=dc.guidance_scale, sample_steps=dc.sample_steps, ddim_steps=dc.ddim_steps)
    model.set_latent_stats(latents, per_channel=dc.per_channel_stats)
    bs = min(dc.batch_size, len(ids))
    seed = cfg.seed

    def data(epoch: int) -> list[dict[str, Tensor]]:
        order = np.random.default_rng([seed, 1, epoch]).permutation(len(ids))
        out = []
        for s in range(0, len(order) - bs + 1, bs):
            idx = order[s:s + bs]
            k = [caption_choice(ncap, seed, epoch, int(i), dc.caption_variant) for i in idx]
            out.append({"latents": latents[idx], "states": states[idx, k], "mask": masks[idx, k]})
        return _shard(out)

    def step_fn(m, batch):
        return m(batch["latents"], TextCondition(batch["states"], batch["mask"].bool())), {}

    tc = config_to_dict(dc.train)
    out = run_paths(cfg).diffusion
    tc["output_dir"] = str(out)
    tc["progress_bar"] = bool(progress and tc.get("progress_bar", True))
    trainer = Trainer(tc, model,
                      lambda p: torch.optim.AdamW(p, lr=dc.lr, weight_decay=dc.weight_decay), step_fn, data,
                      run_config={"lr": dc.lr, "batch_size": bs, "latent_shape": [C, r, r], "text": cfg.text.encoder})
    last = trainer.train(resume=resume)
    model = trainer.unwrapped_model
    if trainer.ema is not None:
        trainer.ema.copy_to(model)
    if not trainer.accelerator.is_main_process:
        return {"steps": trainer.step}
    model.save(out / "model")
    result = {"steps": trainer.step, "final_loss": last.get("loss"), "latent_shape": [C, r, r],
              "avatars": len(ids), "seconds": time.perf_counter() - start}
    save_json(out / "summary.json", result)
    return result


def load_model(cfg: TeraConfig, device: torch.device | None = None) -> StructuredLatentDiffusion:
    path = run_paths(cfg).diffusion / "model"
    if not (path / "config.json").is_file():
        raise MissingFileError(f"no trained latent diffusion model at {path}", "run `tera train` first")
    device = device or resolve_device(cfg.device, cfg.threads)
    return StructuredLatentDiffusion.load(path, device=device).eval()


# --------------------------------------------------------------------------------------------------
# Avatars on disk
# --------------------------------------------------------------------------------------------------


@dataclass
class Models:
    """Everything generation, editing and animation need, loaded once."""

    avatar: UVGaussianAvatar
    decoder: DistillationDecoder
    decoder_settings: dict
    diffusion: StructuredLatentDiffusion | None
    device: torch.device


def load_models(cfg: TeraConfig, with_diffusion: bool = True) -> Models:
    device = resolve_device(cfg.device, cfg.threads)
    decoder, settings = load_decoder(cfg)
    model = load_model(cfg, device) if with_diffusion else None
    if model is not None and tuple(model.latent_shape) != (settings["latent_channels"], settings["latent_resolution"],
                                                           settings["latent_resolution"]):
        raise ConfigError(f"the diffusion model's latent {model.latent_shape} does not match the decoder's",
                          "train the diffusion model again after distilling")
    return Models(build_avatar(cfg).to(device), decoder.to(device), settings, model, device)


def _slug(text: str, n: int = 40) -> str:
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
        log.warning("%s was saved with %s Gaussians (seed %s); decoding with this run's %s (seed %s)", path,
                    meta.get("num_points"), meta.get("point_seed"), s["num_points"], s["point_seed"])
    return tensors["latent"].float(), meta


@torch.no_grad()
def decode(models: Models, latent: Tensor) -> tuple[Tensor, GaussianBatch]:
    """Latent ``[C, h, w]`` -> attribute maps ``[1, 13, R, R]`` and canonical Gaussians."""
    maps = models.decoder(latent[None].to(models.device))
    return maps, models.avatar(maps)


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
                 video: bool = True) -> dict[str, Any]:
    """All outputs of one avatar: latent file, PLY, attribute maps (PNG + safetensors), preview, turntable, JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    s = models.decoder_settings
    maps, g = decode(models, latent)
    files = {}
    meta = {"format": AVATAR_FORMAT, "body": s["body"], "num_points": s["num_points"], "point_seed": s["point_seed"],
            "latent_shape": list(latent.shape), "map_resolution": int(maps.shape[-1]), **provenance}
    files["avatar"] = str(save_tensors(out_dir / "avatar.safetensors", {"latent": latent.detach().cpu()}, meta))
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
    settings = {**meta, "files": files, "config": config_to_dict(cfg)}
    files["settings"] = str(save_json(out_dir / "settings.json", settings))
    return {"dir": str(out_dir), "files": files, "maps": maps, "gaussians": g}


# --------------------------------------------------------------------------------------------------
# Generate, edit, animate, export
# --------------------------------------------------------------------------------------------------


def _check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty", 'describe the avatar, e.g. "a woman in a red dress"')
    return prompt.strip()


def _sampling(cfg: TeraConfig, sampler: str | None = None) -> dict[str, Any]:
    g = cfg.generate
    sampler = sampler or g.sampler
    if sampler not in SAMPLERS:
        raise ConfigError(f"generate.sampler={sampler!r}", f"use one of: {', '.join(SAMPLERS)}")
    return {"sampler": sampler, "steps": g.steps or None, "guidance": g.guidance or None}


def sample_latents(models: Models, prompts: list[str], seed: int, **sampling) -> Tensor:  # [B, C, h, w]
    gen = torch.Generator().manual_seed(int(seed))
    return models.diffusion.sample(prompts, generator=gen, **sampling)


def generate(cfg: TeraConfig, prompt: str, out_dir: str | Path | None = None, seed: int | None = None,
             models: Models | None = None, video: bool = True) -> dict[str, Any]:
    """Text -> avatar (Sec. 3.4): sample a latent, decode, write every output; returns paths and timings."""
    prompt = _check_prompt(prompt)
    models = models or load_models(cfg)
    seed = cfg.generate.seed if seed is None else seed
    sampling = _sampling(cfg)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latent = sample_latents(models, [prompt], seed, **sampling)[0].cpu()
    for w in caught:
        log.warning("%s", w.message)
    t_sample = time.perf_counter() - t0
    out = Path(out_dir) if out_dir is not None else run_paths(cfg).avatars / f"{_slug(prompt)}_s{seed}"
    res = write_avatar(cfg, models, latent, out, {"prompt": prompt, "seed": seed, **sampling, "kind": "generate"},
                       video=video)
    res["seconds_sample"] = t_sample
    res["seconds"] = time.perf_counter() - t0
    return res


def _check_region(region: str) -> None:
    names = [n.strip() for n in str(region).replace(",", "+").split("+")]
    unknown = [n for n in names if n not in edit_mod.region_names()]
    if unknown or not names:
        raise InputError(f"unknown region(s) {', '.join(map(repr, unknown)) or repr(region)}",
                         f"valid regions: {', '.join(edit_mod.region_names())} (join several with '+')")


def edit(cfg: TeraConfig, avatar_path: str | Path, region: str, prompt: str, out_dir: str | Path | None = None,
         seed: int | None = None, method: str | None = None, models: Models | None = None,
         video: bool = True) -> dict[str, Any]:
    """Structure-aware editing / try-on (Sec. 3.5): regenerate ``region`` under ``prompt``; the source is kept."""
    prompt = _check_prompt(prompt)
    _check_region(region)  # an unknown region fails here, listing the valid ones, before anything loads
    method = method or cfg.edit.method
    models = models or load_models(cfg)
    latent, meta = load_avatar(avatar_path, models)
    model = models.diffusion
    cells = edit_mod.region_mask(models.avatar.uv_mapper.part_masks(), region, model.latent_shape[1:],
                                 rule=cfg.edit.rule, dilate=cfg.edit.dilate)
    seed = cfg.generate.seed if seed is None else seed
    sampling = _sampling(cfg)
    t0 = time.perf_counter()
    new = edit_mod.edit(model, latent, cells.cpu(), prompt, generator=torch.Generator().manual_seed(int(seed)),
                        method=method, **sampling).cpu()
    t_edit = time.perf_counter() - t0
    src_dir = Path(avatar_path) if Path(avatar_path).is_dir() else Path(avatar_path).parent
    out = Path(out_dir) if out_dir is not None else src_dir.parent / f"{src_dir.name}__{_slug(region)}_{_slug(prompt, 24)}"
    if out.resolve() == src_dir.resolve():
        raise InputError(f"the edit would overwrite its source avatar in {src_dir}", "choose another output folder")
    seam = edit_mod.seam_gradient(new, cells)
    prov = {"prompt": prompt, "seed": seed, **sampling, "kind": "edit", "region": region, "method": method,
            "source": str(avatar_path), "source_prompt": meta.get("prompt"), "seam": seam,
            "changed_outside_region": float((new - latent)[:, ~cells].abs().max()) if (~cells).any() else 0.0}
    res = write_avatar(cfg, models, new, out, prov, video=video)
    res.update({"seconds_edit": t_edit, "seam": seam, "cells": int(cells.sum()), "latent": new, "source_latent": latent,
                "region_cells": cells})
    return res


def animate(cfg: TeraConfig, avatar_path: str | Path, out: str | Path | None = None, motion: str | None = None,
            models: Models | None = None) -> dict[str, Any]:
    """A clip of the avatar with a built-in motion, posed by the body's skinning (Sec. 3.1)."""
    a = cfg.animate
    motion = motion or a.motion
    if motion not in anim.MOTIONS:
        raise InputError(f"unknown motion {motion!r}", f"use one of: {', '.join(anim.MOTIONS)}")
    models = models or load_models(cfg, with_diffusion=False)
    latent, meta = load_avatar(avatar_path, models)
    t0 = time.perf_counter()
    _, g = decode(models, latent)
    body = models.avatar.body
    poses = anim.builtin_motion(body, motion, a.frames).to(models.device)
    frames = anim.animate(models.avatar, g, poses)
    centre = body_centre(frames.means[0])
    cam = turntable_cameras(cfg, 1, centre, a.render_size)
    images = anim.render_frames(models.avatar, frames, cam, tuple(cfg.data.background))
    src_dir = Path(avatar_path) if Path(avatar_path).is_dir() else Path(avatar_path).parent
    path = Path(out) if out is not None else src_dir / f"{motion}.mp4"
    written = write_video(path, images.cpu(), fps=a.fps)
    strip = save_image(path.with_suffix(".png"), image_grid(images[:: max(1, a.frames // 4)][:4].cpu(), nrow=4))
    return {"video": str(written), "strip": str(strip), "frames": a.frames, "motion": motion,
            "seconds": time.perf_counter() - t0}


def export(cfg: TeraConfig, avatar_path: str | Path, out_dir: str | Path, motion: str | None = None) -> dict[str, Any]:
    """The avatar as files for other tools: canonical PLY, attribute maps, and optionally posed PLYs per frame."""
    models = load_models(cfg, with_diffusion=False)
    latent, meta = load_avatar(avatar_path, models)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    maps, g = decode(models, latent)
    files = {"ply": str(g.save_ply(out / "canonical.ply")),
             "maps": str(save_tensors(out / "maps.safetensors", {"maps": maps[0].cpu()}, {"source": str(avatar_path)})),
             "maps_png": str(save_image(out / "maps.png", maps_image(maps)))}
    if motion:
        frames = anim.animate(models.avatar, g, anim.builtin_motion(models.avatar.body, motion,
                                                                    cfg.animate.frames).to(models.device))
        for t in range(len(frames)):
            frames[t].save_ply(out / f"{motion}_{t:03d}.ply")
        files["posed"] = f"{out}/{motion}_NNN.ply ({len(frames)} frames)"
    save_json(out / "export.json", {"source": str(avatar_path), "provenance": meta, "files": files})
    return files


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

_COLOUR_NAMES = sorted(GARMENT_COLOURS, key=len, reverse=True)  # "light blue" before "blue"
_TOPS = ("dress", "jacket", "shirt")
_BOTTOMS = ("trousers", "shorts", "skirt")


def parse_prompt(prompt: str) -> dict[str, str]:
    """Garment attributes a prompt asks for: top/bottom colour and type (palette names, garment words)."""
    p = " " + prompt.lower() + " "
    found: list[tuple[int, str, str]] = []  # (position, kind, word)
    taken = [False] * len(p)
    for name in _COLOUR_NAMES:
        for m in re.finditer(rf"(?<![a-z]){re.escape(name)}(?![a-z])", p):
            if not any(taken[m.start():m.end()]):
                found.append((m.start(), "colour", name))
                for k in range(m.start(), m.end()):
                    taken[k] = True
    for word in _TOPS + _BOTTOMS:
        for m in re.finditer(rf"(?<![a-z]){word}(?![a-z])", p):
            found.append((m.start(), "type", word))
    found.sort()
    out: dict[str, str] = {}
    colour = None
    for _, kind, word in found:
        if kind == "colour":
            colour = word
            continue
        slot = "top" if word in _TOPS else "bottom"
        if f"{slot}_type" not in out:
            out[f"{slot}_type"] = word
            if colour is not None:
                out[f"{slot}_colour"] = colour
        colour = None
    return out


def _nearest_colour(rgb: Tensor) -> str:
    names = list(GARMENT_COLOURS)
    pal = torch.tensor([GARMENT_COLOURS[n] for n in names])
    return names[int(((pal - rgb[None]) ** 2).sum(-1).argmin())]


def score_colour_map(rgb: Tensor, parts: dict[str, Tensor], asked: dict[str, str]) -> dict[str, float]:
    """Does a UV colour map ``[3, R, R]`` show the asked garments? 1/0 per asked attribute (see README).

    Colour: the median colour of the region (upper body for the top, lower body for the bottom) named by the
    nearest palette colour. Type: 'dress' when the thighs carry the top's colour; 'trousers' vs 'shorts/skirt'
    from how much of the legs the bottom's colour covers (the lower legs covered -> trousers).
    """
    R = rgb.shape[-1]
    from tera.uv_gaussians import resize_mask

    def region(name: str) -> Tensor:  # [M, 3]
        m = resize_mask(parts[name], R)
        return rgb[:, m].T

    def median(x: Tensor) -> Tensor:
        return x.median(0).values

    top, bottom = region("upper_body"), region("lower_body")
    top_c, bottom_c = median(top), median(bottom)
    legs_m = resize_mask(parts["legs"], R)
    rows = torch.nonzero(legs_m)[:, 0]
    lower_legs = rgb[:, legs_m].T[rows > rows.float().median()]
    near = lambda x, c: (((x - c[None]) ** 2).sum(-1).sqrt() < 0.2).float().mean()  # noqa: E731
    scores: dict[str, float] = {}
    if "top_colour" in asked:
        scores["top_colour"] = float(_nearest_colour(top_c) == asked["top_colour"])
    if "bottom_colour" in asked:
        scores["bottom_colour"] = float(_nearest_colour(bottom_c) == asked["bottom_colour"])
    dress = bool(near(bottom, top_c) > 0.5)
    if "top_type" in asked:
        scores["top_type"] = float((asked["top_type"] == "dress") == dress)
    if "bottom_type" in asked:
        long = bool(near(lower_legs, bottom_c) > 0.5)
        scores["bottom_type"] = float((asked["bottom_type"] == "trousers") == long and not dress)
    return scores


def _mean_score(rows: list[dict[str, float]]) -> float:
    vals = [v for r in rows for v in r.values()]
    return float(np.mean(vals)) if vals else float("nan")


#: CLIP's image normalisation (the constants every openai/clip-vit-* release was trained with).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_NOT_COMPUTED = "CLIP score: not computed (set evaluate.clip_path to a local CLIP folder)"


def clip_preprocess(images: Tensor, size: int) -> Tensor:  # [V, H, W, 3] in [0, 1] -> [V, 3, size, size]
    """CLIP's input: shorter side resized to ``size`` (bicubic), centre crop, mean/std normalisation."""
    x = images.permute(0, 3, 1, 2).float().clamp(0, 1)
    h, w = x.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    # Antialiasing matters when the renders are larger than CLIP's input: plain bicubic would alias thin edges.
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)  # bicubic overshoots; CLIP saw [0, 1] images
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


def _features(out: Any) -> Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; older ones a tensor.
    return getattr(out, "pooler_output", out)


class ClipScorer:
    """CLIP score (Hessel et al. 2021, without the clip at 0): 100 x cosine(image embedding, text embedding)."""

    def __init__(self, path: str | Path | None, device: torch.device | str = "cpu"):
        from avatar_core.pretrained import load_clip

        parts = load_clip(path, device=device, config_key="evaluate.clip_path")
        self.model = parts.model.eval()
        self.tokenizer = parts.tokenizer
        self.device = torch.device(device)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = min(int(self.tokenizer.model_max_length),
                              int(self.model.config.text_config.max_position_embeddings))

    @torch.no_grad()
    def text_embedding(self, prompts: list[str]) -> Tensor:  # [P, D], unit norm
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        emb = _features(self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                                     attention_mask=tok.attention_mask.to(self.device)))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def image_embedding(self, images: Tensor) -> Tensor:  # [V, H, W, 3] in [0, 1] -> [V, D], unit norm
        pixels = clip_preprocess(images, self.image_size).to(self.device, self.model.dtype)
        emb = _features(self.model.get_image_features(pixel_values=pixels))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def score(self, images: Tensor, prompt: str) -> float:
        """Mean over the views ``[V, H, W, 3]`` of 100 x cosine(view, prompt)."""
        return float(100 * (self.image_embedding(images) @ self.text_embedding([prompt])[0]).mean())


def avatar_views(cfg: TeraConfig, models: Models, maps: Tensor, n: int, size: int) -> Tensor:
    """``n`` turntable views ``[n, size, size, 3]`` of the avatar decoded from attribute maps ``[1, 13, R, R]``."""
    with torch.no_grad():
        g = models.avatar(maps.to(models.device))
        cams = turntable_cameras(cfg, n, body_centre(g.means[0]), size)
        rgb, _ = models.avatar.render(g, cams, tuple(cfg.data.background))
    return rgb[0].cpu()


def format_clip(clip: dict[str, Any] | None) -> list[str]:
    """The CLIP-score section of the evaluation report (Markdown lines)."""
    if not clip:
        return ["## CLIP score", "", CLIP_NOT_COMPUTED]
    lines = [f"## CLIP score (100 x cosine of CLIP image and text embeddings, mean over {clip['views']} views; "
             f"{clip['path']})", "", "| rows | CLIP score |", "|---|---|",
             f"| held-out prompts | {clip['held_out_prompts']:.2f} |",
             f"| held-out avatars scored against another held-out prompt | {clip['against_other_prompt']:.2f} |",
             "", "| held-out prompt | CLIP score |", "|---|---|"]
    lines += [f"| {p} | {v:.2f} |" for p, v in clip["per_prompt"].items()]
    return lines


def evaluate(cfg: TeraConfig, out_dir: str | Path | None = None, ablation: bool = True,
             progress: bool = True) -> dict[str, Any]:
    """Text faithfulness (held-out prompts vs random captions), editing errors, latent-resolution ablation."""
    start = time.perf_counter()
    e = cfg.evaluate
    out = Path(out_dir) if out_dir is not None else run_paths(cfg).run / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    models = load_models(cfg)
    ds = load_dataset(cfg)
    parts = models.avatar.uv_mapper.part_masks()
    sampling = {"sampler": e.sampler, "steps": None, "guidance": cfg.generate.guidance or None}
    # Loaded before any generation so a missing or incomplete CLIP folder fails at once, with nothing spent.
    clip = ClipScorer(e.clip_path, models.device) if e.clip_path else None
    report: dict[str, Any] = {}

    # The scorer on the dataset's own UV textures: how often it reads the truth (its ceiling).
    gt_rows = []
    for i in range(len(ds)):
        tex = ds.texture(i).permute(2, 0, 1)
        gt_rows.append(score_colour_map(tex, parts, parse_prompt(ds.captions(i)[0])))
    train_caps = [c for i in range(len(ds)) for c in ds.captions(i)]

    def generated_maps(prompts: list[str], seed: int) -> Tensor:  # [B, 13, R, R]
        lat = sample_latents(models, prompts, seed, **sampling)
        with torch.no_grad():
            return models.decoder(lat.to(models.device)).cpu()

    rng = np.random.default_rng(cfg.seed)
    held_rows, held_vs_random, per_prompt = [], [], []
    clip_emb: list[Tensor] = []  # per held-out prompt: each sample's view-averaged unit image embeddings [S, D]
    for k, prompt in enumerate(e.prompts):
        asked = parse_prompt(prompt)
        full = generated_maps([prompt] * e.samples_per_prompt, cfg.seed + k)
        maps = full[:, ATTRIBUTE_SLICES["rgb"]]
        if clip is not None:
            views = [avatar_views(cfg, models, full[i:i + 1], e.clip_views, e.clip_render_size)
                     for i in range(len(full))]
            clip_emb.append(torch.stack([clip.image_embedding(v).mean(0) for v in views]))  # [S, D]
        rows = [score_colour_map(m, parts, asked) for m in maps]
        held_rows += rows
        other = train_caps[int(rng.integers(len(train_caps)))]
        held_vs_random += [score_colour_map(m, parts, parse_prompt(other)) for m in maps]
        per_prompt.append({"prompt": prompt, "asked": asked, "score": _mean_score(rows),
                           "combination_in_training_set": any(all(parse_prompt(ds.captions(i)[0]).get(a) == v
                                                                   for a, v in asked.items()) for i in range(len(ds)))})
    rand_caps = [train_caps[int(j)] for j in rng.choice(len(train_caps), size=e.random_captions, replace=False)]
    rand_maps = generated_maps(rand_caps, cfg.seed + 1000)[:, ATTRIBUTE_SLICES["rgb"]]
    rand_rows = [score_colour_map(m, parts, parse_prompt(c)) for m, c in zip(rand_maps, rand_caps)]
    shuffled = rand_caps[1:] + rand_caps[:1]
    rand_vs_other = [score_colour_map(m, parts, parse_prompt(c)) for m, c in zip(rand_maps, shuffled)]
    report["text_faithfulness"] = {
        "held_out_prompts": _mean_score(held_rows),
        "held_out_avatars_scored_against_random_caption": _mean_score(held_vs_random),
        "random_training_captions": _mean_score(rand_rows),
        "random_caption_avatars_scored_against_another_caption": _mean_score(rand_vs_other),
        "scorer_on_ground_truth_textures": _mean_score(gt_rows),
        "per_prompt": per_prompt,
        "samples_per_prompt": e.samples_per_prompt,
        "sampler": e.sampler,
    }

    # CLIP score: mean over views of 100 x cosine, i.e. 100 x (mean of the unit view embeddings) . text.
    report["clip_score"] = None
    if clip is not None:
        text = clip.text_embedding(list(e.prompts))  # [P, D]
        sims = torch.stack([100 * (emb @ text.T) for emb in clip_emb])  # [P, S, P]: prompt k's samples vs all
        own = torch.stack([sims[k, :, k] for k in range(len(e.prompts))])  # [P, S]
        others = [sims[k, :, j] for k in range(len(e.prompts)) for j in range(len(e.prompts)) if j != k]
        report["clip_score"] = {
            "path": str(e.clip_path), "views": e.clip_views, "render_size": e.clip_render_size,
            "held_out_prompts": float(own.mean()),
            "against_other_prompt": float(torch.cat(others).mean()) if others else float("nan"),
            "per_prompt": {p: float(own[k].mean()) for k, p in enumerate(e.prompts)},
        }

    # Editing: outside the region nothing moves; inside follows the new prompt; inpaint vs replace seams.
    src = generate(cfg, e.prompts[0], out / "edit_source", seed=cfg.seed, models=models, video=False)
    src_maps = src["maps"]
    R = src_maps.shape[-1]
    from tera.uv_gaussians import resize_mask

    region_parts = edit_mod.TRYON_REGIONS[e.edit_region] if e.edit_region in edit_mod.TRYON_REGIONS else ()
    uv_region = torch.zeros(R, R, dtype=torch.bool)
    for p in region_parts:
        uv_region |= resize_mask(parts[p], R).cpu()
    valid = torch.zeros(R, R, dtype=torch.bool)
    for m in parts.values():
        valid |= resize_mask(m, R).cpu()
    edit_rows = {}
    for method in ("inpaint", "replace"):
        r_ = edit(cfg, src["dir"], e.edit_region, e.edit_prompt, out / f"edit_{method}", seed=cfg.seed + 7,
                  method=method, models=models, video=False)
        cells = r_["region_cells"]
        lat_out = (r_["latent"] - r_["source_latent"])[:, ~cells].abs().max().item() if (~cells).any() else 0.0
        diff = (r_["maps"] - src_maps)[0, ATTRIBUTE_SLICES["rgb"]].abs().cpu()  # [3, R, R]
        outside = valid & ~uv_region
        asked = parse_prompt(e.edit_prompt)
        inside_score = score_colour_map(r_["maps"][0, ATTRIBUTE_SLICES["rgb"]].cpu(), parts,
                                        {k: v for k, v in asked.items() if k.startswith("top")})
        cells_map = torch.nn.functional.interpolate(cells[None, None].float(), size=(R, R), mode="nearest")[0, 0] > 0.5
        seam_map = edit_mod.seam_gradient(r_["maps"][0, ATTRIBUTE_SLICES["rgb"]].cpu(), cells_map, valid)
        edit_rows[method] = {
            "latent_max_abs_change_outside": lat_out,
            "colour_map_mean_abs_change_outside": float(diff[:, outside].mean()),
            "colour_map_mean_abs_change_inside": float(diff[:, uv_region & valid].mean()),
            "inside_follows_prompt": _mean_score([inside_score]),
            "seam_ratio_latent": r_["seam"]["ratio"],
            "seam_ratio_colour_map": seam_map["ratio"],
        }
    report["editing"] = {"region": e.edit_region, "prompt": e.edit_prompt, "source_prompt": e.prompts[0],
                         **edit_rows}

    # The latent-resolution ablation: decoder reconstruction PSNR at two latent resolutions, same budget.
    if ablation:
        rows = {}
        for r in e.ablation_resolutions:
            factor = max(1, cfg.teacher.resolution // r)
            sub = _with(cfg, [f"distill.upsample_factor={factor}"])
            res = distill(sub, progress=progress, latent_resolution=r, steps=e.ablation_steps,
                          out_dir=out / f"ablation_r{r}", resume=None)
            rows[str(r)] = {"psnr_heldout": res.get("psnr_heldout"), "psnr_train": res.get("psnr_train"),
                            "upsample_factor": factor, "steps": res["steps"], "seconds": res["seconds"]}
        report["latent_resolution_ablation"] = rows
    report["seconds"] = time.perf_counter() - start
    save_json(out / "evaluation.json", report)
    (out / "evaluation.md").write_text(format_report(report), encoding="utf-8")
    return report


def _with(cfg: TeraConfig, overrides: list[str]) -> TeraConfig:
    import copy

    from avatar_core.config import merge_overrides

    return merge_overrides(copy.deepcopy(cfg), overrides)


def format_report(report: dict[str, Any]) -> str:
    """The evaluation as Markdown tables."""
    lines = ["## Text faithfulness (fraction of asked garment attributes found in the UV colour map)", "",
             "| rows | score |", "|---|---|"]
    tf = report["text_faithfulness"]
    for k in ("held_out_prompts", "held_out_avatars_scored_against_random_caption", "random_training_captions",
              "random_caption_avatars_scored_against_another_caption", "scorer_on_ground_truth_textures"):
        lines.append(f"| {k.replace('_', ' ')} | {tf[k]:.3f} |")
    lines += ["", "| held-out prompt | asked | score | combination in training set |", "|---|---|---|---|"]
    for p in tf["per_prompt"]:
        lines.append(f"| {p['prompt']} | {p['asked']} | {p['score']:.2f} | {p['combination_in_training_set']} |")
    lines += [""] + format_clip(report.get("clip_score"))
    ed = report["editing"]
    lines += ["", f"## Editing: region `{ed['region']}`, prompt \"{ed['prompt']}\"", "",
              "| method | latent max abs change outside | colour map mean abs change outside | inside | "
              "inside follows prompt | seam ratio (latent) | seam ratio (colour map) |", "|---|---|---|---|---|---|---|"]
    for m in ("inpaint", "replace"):
        r = ed[m]
        lines.append(f"| {m} | {r['latent_max_abs_change_outside']:.2e} | {r['colour_map_mean_abs_change_outside']:.4f} |"
                     f" {r['colour_map_mean_abs_change_inside']:.4f} | {r['inside_follows_prompt']:.2f} |"
                     f" {r['seam_ratio_latent']:.3f} | {r['seam_ratio_colour_map']:.3f} |")
    if "latent_resolution_ablation" in report:
        lines += ["", "## Latent-resolution ablation (decoder reconstruction PSNR, dB)", "",
                  "| latent resolution | upsample | steps | PSNR held-out views | PSNR training views |",
                  "|---|---|---|---|---|"]
        for r, row in report["latent_resolution_ablation"].items():
            lines.append(f"| {r} | x{row['upsample_factor']} | {row['steps']} | {row['psnr_heldout']:.2f} |"
                         f" {row['psnr_train']:.2f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The whole tiny pipeline, and the demo part
# --------------------------------------------------------------------------------------------------


def run_all(cfg: TeraConfig, progress: bool = True) -> dict[str, Any]:
    """fit-teacher -> distill -> train on the configured dataset (created when missing); timings per stage."""
    cfg_path = Path(cfg.run_dir)
    cfg_path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg_path / "config.yaml")
    return {"fit_teacher": fit_teacher(cfg, progress, create_dataset=True), "distill": distill(cfg, progress),
            "train": train(cfg, progress)}


def demo_part(out_dir: str | Path, config: str | Path | None = None, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """TeRA's part of ``make demo``: a tiny dataset and model trained here, three prompts, one edit, one clip."""
    from tera.config import load_config

    out = Path(out_dir)
    # One torch thread: on a 2-core machine shared with anything else, two threads per op thrash (30x slower).
    base = ["threads=1", f"run_dir={out}", f"data.root={out / 'dataset'}", "data.num=6", "data.views=4", "data.res=48",
            "data.image_size=48", "data.uv_res=64", "body.num_points=2500", "teacher.resolution=32",
            "teacher.steps=25", "teacher.views_per_step=2", "distill.latent_resolution=16", "distill.upsample_factor=2",
            "distill.train.max_steps=60", "diffusion.train.max_steps=150", "diffusion.batch_size=6",
            "generate.turntable_frames=16", "generate.render_size=192", "animate.frames=12",
            "animate.render_size=192", "diffusion.train.progress_bar=false", "distill.train.progress_bar=false"]
    cfg = load_config(config, base + list(overrides))
    threads = torch.get_num_threads()
    try:
        return _demo(cfg, out)
    finally:
        torch.set_num_threads(threads)  # the demo's single thread must not leak into the caller's other parts


def _demo(cfg: TeraConfig, out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    stages = run_all(cfg, progress=False)
    models = load_models(cfg)
    prompts = ["a woman in a red dress", "a man in a blue shirt and black trousers", "a man in a green jacket"]
    gens = [generate(cfg, p, seed=i, models=models) for i, p in enumerate(prompts)]
    ed = edit(cfg, gens[1]["dir"], "upper_clothes", "a man in a yellow shirt", models=models)
    clip = animate(cfg, gens[0]["dir"], models=models)
    summary = {
        "run_dir": str(out),
        "generated": {p: g["dir"] for p, g in zip(prompts, gens)},
        "edit": {"dir": ed["dir"], "seam": ed["seam"]},
        "animation": clip["video"],
        "seconds": {"fit_teacher": stages["fit_teacher"]["seconds"], "distill": stages["distill"]["seconds"],
                    "train": stages["train"]["seconds"], "generate_each": [g["seconds"] for g in gens],
                    "total": time.perf_counter() - t0},
        "psnr_heldout": stages["distill"].get("psnr_heldout"),
    }
    save_json(out / "summary.json", summary)
    return summary


__all__ = [
    "AVATAR_FORMAT", "CLIP_MEAN", "CLIP_NOT_COMPUTED", "CLIP_STD", "ClipScorer", "Models", "PosedTeacherFitter",
    "animate", "avatar_views", "build_avatar", "clip_preprocess", "decode", "demo_part", "distill", "edit",
    "evaluate", "export", "fit_teacher", "format_clip", "format_report", "generate", "load_avatar", "load_dataset",
    "load_models", "parse_prompt", "run_all", "score_colour_map", "train",
]
