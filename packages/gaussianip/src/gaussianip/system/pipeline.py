"""GaussianIP end to end: prior -> stage 1 (HDS + AHDS) -> stage 2 (VCR) -> stage 3 (reconstruction) -> outputs.

This module only orchestrates: it validates the inputs before writing anything, keeps a run folder with one file
per finished stage (so a killed run continues from its last stage with ``resume=True``), and writes the PLY, the
turntable MP4, the refined views, per-stage previews and the settings JSON.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from avatar_core.config import config_to_dict
from avatar_core.errors import ConfigError, InputError, MissingFileError
from avatar_core.io import image_grid, load_image, load_json, save_image, save_json, write_video
from avatar_core.results import check_result_dir, prepare_result_dir, read_marker, result_name
from gaussianip import gaussians as G

KIND = "gaussianip.run"
STAGES = ("stage1", "stage2", "stage3")


def set_threads(cfg) -> None:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))


def load_prior(cfg, train_if_missing: bool = True):
    """The configured prior: embedded (trained on first use) or the paper's from local folders."""
    if cfg.prior.kind == "embedded":
        from gaussianip.prior_train import load_or_train_embedded

        return load_or_train_embedded(cfg, train_if_missing)
    if cfg.prior.kind == "paper":
        from gaussianip.prior_paper import PaperPrior

        return PaperPrior.from_config(cfg.prior.paper)
    raise ConfigError(f"unknown prior.kind {cfg.prior.kind!r}", "use 'embedded' or 'paper'")


def read_face(path: str | Path | None, cfg) -> torch.Tensor | None:
    """The face photo ``[H, W, 3|4]``; checked for mode and size (a clear one-line error otherwise)."""
    if path is None:
        return None
    img = load_image(path)
    if img.shape[-1] not in (3, 4):
        raise InputError(f"the face image {path} is greyscale ({img.shape[-1]} channel); a colour photo is needed",
                         "pass an RGB or RGBA image")
    if min(img.shape[:2]) < 32:
        raise InputError(f"the face image {path} is {img.shape[1]}x{img.shape[0]} pixels; at least 32x32 is needed",
                         "pass a larger photo")
    return img


def default_face(cfg) -> Path:
    """A held-out portrait of the synthetic dataset (the last avatar, never trained on)."""
    from avatar_core.data.datasets import AvatarDataset

    ds = AvatarDataset(cfg.dataset.root)
    return ds.dirs[-1] / "portrait.png"


def _perceptual(cfg):
    """LPIPS-VGG from local weights (kernel perceptual module), or its named embedded stand-in when
    ``recon.vgg_weights`` is empty; returns ``(distance [B, 3, H, W] x2 -> [B], description)``."""
    from avatar_core.perceptual import PerceptualLoss

    p = PerceptualLoss(cfg.recon.vgg_weights or None, lpips_weights=cfg.recon.lpips_weights or None, net="vgg")
    desc = p.describe()
    return (lambda a, b: p(a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1))), str(desc.get("kind", desc))


#: Keys that may differ between a run folder and the command continuing it (what is written, not what is made).
MAY_CHANGE = ("output.*", "animate.*", "run_dir", "prior.cache_dir", "dataset.root", "stage1.preview_every")


def _signature(cfg) -> dict:
    from avatar_core.train import config_signature

    return config_signature(cfg, allow=MAY_CHANGE)


def _settings_match(run: Path, cfg) -> None:
    from avatar_core.train import signature_diff

    stored = load_json(run / "settings.json").get("signature", {})
    diff = signature_diff(stored, _signature(cfg))
    if diff:
        raise ConfigError(f"{run} was made with another config ({'; '.join(diff[:3])})",
                          "resume it with the same config, or start a new run (another --out or --overwrite)")


def vcr_cameras(cfg):
    from avatar_core.cameras import Cameras, look_at, spherical_to_position
    from gaussianip.vcr import orbit_azimuths

    vc = cfg.vcr
    az = orbit_azimuths(vc.num_views)
    a = torch.tensor(az, dtype=torch.float64)
    target = torch.zeros(len(az), 3, dtype=torch.float64)
    eye = spherical_to_position(a, torch.full_like(a, vc.elevation), torch.full_like(a, vc.distance), target)
    return az, Cameras.from_fov(look_at(eye, target).float(), vc.fovy, vc.size, vc.size)


def generate(cfg, prompt: str, face: str | Path | None = None, out: str | Path | None = None,
             overwrite: bool = False, resume: bool = False, progress: bool = True, stop_after: str | None = None) -> dict:
    """Run the three stages into a run folder; returns a summary dict (paths, timings, counts)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty", "describe the person, e.g. --prompt 'a woman in a red dress'")
    if stop_after is not None and stop_after not in STAGES:
        raise InputError(f"unknown stage {stop_after!r}", f"use one of {STAGES}")
    set_threads(cfg)
    face_img = read_face(face, cfg)
    if face_img is None and cfg.prior.kind == "paper":
        raise InputError("the paper-scale prior needs a face photo", "pass --face IMG")
    run = Path(out) if out is not None else Path(cfg.run_dir) / result_name(prompt, cfg.seed, {"face": str(face)})
    if resume and run.is_dir() and (run / "settings.json").is_file():
        if (read_marker(run) or {}).get("kind") != KIND:
            raise InputError(f"{run} is not a GaussianIP run folder", "pass the folder `gaussianip generate` wrote")
        _settings_match(run, cfg)
    else:
        check_result_dir(run, KIND, overwrite, inputs=[face])
    prior = load_prior(cfg)
    if face_img is None and cfg.prior.kind == "embedded":
        face = default_face(cfg)
        face_img = read_face(face, cfg)
    identity = prior.face_identity(face_img)
    if not (resume and (run / "settings.json").is_file()):
        prepare_result_dir(run, KIND, overwrite, inputs=[face])
        save_json(run / "settings.json", {"config": config_to_dict(cfg), "signature": _signature(cfg),
                                          "prompt": prompt, "face": str(face), "prior": prior.name})
    from avatar_core.train import run_lock

    with run_lock(run):
        return continue_run(run, cfg, prior, prompt, identity, progress=progress, stop_after=stop_after)


def continue_run(run: Path, cfg, prior, prompt: str, identity, progress: bool = True,
                 stop_after: str | None = None) -> dict:
    """Run the stages a run folder does not hold yet."""
    from gaussianip.distill import body_keypoints, run_stage1
    from gaussianip.prior_train import pose_images
    from gaussianip.reconstruct import reconstruct
    from gaussianip.vcr import refine_views

    timings: dict[str, float] = {}
    frame = G.body_frame(cfg.gaussians)
    (run / "previews").mkdir(exist_ok=True)
    null_id = prior.unrelated_identity()
    # Stage 1
    if not (run / "stage1.safetensors").is_file():
        t0 = time.time()
        params = G.init_from_body(frame, cfg.gaussians, seed=cfg.seed)
        log: list = []
        run_stage1(prior, frame, params, prompt, identity, null_id, cfg, run / "previews", progress, log)
        G.save_gaussians(run / "stage1.safetensors", params)
        save_json(run / "stage1_log.json", log)
        timings["stage1"] = time.time() - t0
    if stop_after == "stage1":
        return {"run": str(run), "timings": timings}
    # Stage 2
    az, cams = vcr_cameras(cfg)
    if not (run / "stage2.safetensors").is_file():
        t0 = time.time()
        params = G.load_gaussians(run / "stage1.safetensors")
        with torch.no_grad():
            rgb, _, _, _ = G.render(params, cams, cfg.stage1.background)
        S = prior.image_size
        x = torch.nn.functional.interpolate(rgb.permute(0, 3, 1, 2), size=(S, S), mode="bilinear", antialias=True)
        kp = body_keypoints(frame)
        poses = torch.nn.functional.interpolate(pose_images(kp, cams, torch.tensor(az), "full"), size=(S, S))
        with torch.no_grad():
            z = prior.encode(x)
            text_pos = prior.encode_text([prompt])
            text_neg = prior.encode_text([cfg.prior.negative_prompt])
            z = refine_views(prior, z, az, text_pos, text_neg, identity, prior.zero_identity(), poses, cfg.vcr)
            refined = prior.decode(z)
        refined = torch.nn.functional.interpolate(refined, size=(cfg.vcr.size, cfg.vcr.size), mode="bilinear",
                                                  antialias=True).permute(0, 2, 3, 1).clamp(0, 1)
        from avatar_core.io import save_tensors

        save_tensors(run / "stage2.safetensors", {"refined": refined.contiguous(), "rendered": rgb.contiguous()})
        (run / "refined_views").mkdir(exist_ok=True)
        for i, img in enumerate(refined):
            save_image(run / "refined_views" / f"{i:03d}.png", img)
        save_image(run / "previews" / "stage2_rendered.png", image_grid(list(rgb), nrow=8))
        save_image(run / "previews" / "stage2_refined.png", image_grid(list(refined), nrow=8))
        timings["stage2"] = time.time() - t0
    if stop_after == "stage2":
        return {"run": str(run), "timings": timings}
    # Stage 3
    perceptual, pname = _perceptual(cfg)
    if not (run / "gaussians.safetensors").is_file():
        t0 = time.time()
        from avatar_core.io import load_tensors

        params = G.load_gaussians(run / "stage1.safetensors")
        refined = load_tensors(run / "stage2.safetensors")[0]["refined"]
        log = []
        reconstruct(params, cams, refined, cfg, perceptual, progress, log)
        save_json(run / "stage3_log.json", log)
        G.save_gaussians(run / "gaussians.safetensors", params, {"perceptual": pname})
        timings["stage3"] = time.time() - t0
    return finish(run, cfg, timings, pname)


def finish(run: Path, cfg, timings: dict, perceptual_name: str) -> dict:
    """PLY, turntable MP4, final views; the settings JSON records timings and stand-ins."""
    from avatar_core.cameras import orbit_cameras
    from avatar_core.render.turntable import turntable

    params = G.load_gaussians(run / "gaussians.safetensors")
    ply = G.export_ply(run / "avatar.ply", params)
    oc = cfg.output

    def render_fn(cams):
        with torch.no_grad():
            return G.render(params, cams, cfg.stage1.background)[0]

    turntable(render_fn, num_frames=oc.turntable_frames, radius=oc.radius, elevation=5.0, fov_deg=oc.fovy,
              width=oc.size, height=oc.size, path=run / "turntable.mp4", fps=oc.fps)
    save_image(run / "previews" / "final_views.png",
               image_grid(list(render_fn(orbit_cameras(4, oc.radius, 5.0, oc.fovy, oc.size, oc.size))), nrow=4))
    settings = load_json(run / "settings.json")
    settings.setdefault("timings_s", {}).update({k: round(v, 2) for k, v in timings.items()})
    settings["perceptual"] = perceptual_name
    settings["gaussians"] = int(params["means"].shape[0])
    save_json(run / "settings.json", settings)
    return {"run": str(run), "ply": str(ply), "turntable": str(run / "turntable.mp4"), "timings": timings,
            "gaussians": settings["gaussians"], "perceptual": perceptual_name}


def resume_stage(run: str | Path, cfg, stage: str, progress: bool = True) -> dict:
    """``refine RUN`` / ``reconstruct RUN``: redo one stage (and what follows) of an existing run."""
    run = Path(run)
    if not (run / "settings.json").is_file() or (read_marker(run) or {}).get("kind") != KIND:
        raise MissingFileError(f"{run} is not a GaussianIP run folder", "pass a folder written by `gaussianip generate`")
    _settings_match(run, cfg)
    need = {"stage2": "stage1.safetensors", "stage3": "stage2.safetensors"}[stage]
    if not (run / need).is_file():
        raise MissingFileError(f"{run} has no {need} yet", "finish the earlier stages with `gaussianip generate --resume`")
    drop = {"stage2": ("stage2.safetensors", "gaussians.safetensors"), "stage3": ("gaussians.safetensors",)}[stage]
    for f in drop:
        (run / f).unlink(missing_ok=True)
    settings = load_json(run / "settings.json")
    set_threads(cfg)
    prior = load_prior(cfg, train_if_missing=False)
    face = settings["face"]
    identity = prior.face_identity(read_face(face, cfg))
    from avatar_core.train import run_lock

    with run_lock(run):
        return continue_run(run, cfg, prior, settings["prompt"], identity, progress=progress)


def train_prior(cfg, overwrite: bool = False) -> dict:
    """``gaussianip train-prior``: the embedded prior into ``prior.cache_dir`` (refuses to replace one silently)."""
    from gaussianip.prior import EmbeddedPrior
    from gaussianip.prior_train import train_embedded_prior

    if cfg.prior.kind == "paper":
        load_prior(cfg)  # checks every local folder now, so a missing file is reported before generate
        return {"prior": "paper", "note": "the paper-scale prior is pretrained (local folders); nothing to train"}
    if cfg.prior.kind != "embedded":
        raise ConfigError(f"unknown prior.kind {cfg.prior.kind!r}", "use 'embedded' or 'paper'")
    set_threads(cfg)
    out = Path(cfg.prior.cache_dir)
    if all((out / f).is_file() for f in EmbeddedPrior.FILES) and not overwrite:
        from avatar_core.results import ResultExistsError

        raise ResultExistsError(f"{out} already holds a trained prior", "add --overwrite to retrain it")
    if overwrite:
        for f in EmbeddedPrior.FILES:
            (out / f).unlink(missing_ok=True)
        from avatar_core.train import move_aside

        for d in ("train_vae", "train_identity", "train_diffusion"):
            if (out / d).exists():
                move_aside(out / d)
    t0 = time.time()
    prior = train_embedded_prior(cfg, out)
    return {"prior": str(out), "seconds": round(time.time() - t0, 1), **prior.info}


def animate(run: str | Path, cfg, motion: str, out: str | Path | None = None, overwrite: bool = False) -> dict:
    """``gaussianip animate RUN --motion M``: the result skinned to the body and driven by a kernel motion."""
    from avatar_core.cameras import orbit_cameras
    from avatar_core.results import check_result_file
    from gaussianip.animate import motion_poses, render_animation

    run = Path(run)
    if not (run / "gaussians.safetensors").is_file():
        raise MissingFileError(f"{run} holds no finished GaussianIP result (gaussians.safetensors)",
                               "run `gaussianip generate` (or `--resume` it) first")
    dest = Path(out) if out is not None else run / f"animation_{Path(motion).stem}.mp4"
    check_result_file(dest, overwrite=overwrite)
    frame = G.body_frame(cfg.gaussians)
    poses = motion_poses(frame, motion, cfg.animate.frames)
    params = G.load_gaussians(run / "gaussians.safetensors")
    oc = cfg.output
    cams = orbit_cameras(1, oc.radius, 5.0, oc.fovy, oc.size, oc.size, start_azimuth=30.0)
    video = render_animation(params, frame, poses, cams, cfg.stage1.background)
    write_video(dest, video, fps=oc.fps)
    return {"animation": str(dest), "frames": int(video.shape[0])}
