"""Triplane fitting (RodinHD Sec. 3.1, Algorithm 1, App. "Triplane fitting").

Stage 1 fits S avatars jointly with the shared decoder. Avatars are visited in a task-replay schedule
(``outer_loops`` passes over the avatars, ``inner_iterations`` steps per visit); each visit loads the avatar's
triplane from disk, trains it and the decoder on randomly sampled rays, and ends by storing the avatar's
identity-aware weight consolidation (IWC) state: the Fisher diagonal (squared data-loss gradients of the last step)
and a snapshot of the decoder weights. When the avatar is visited again, ``lambda/2 * sum Omega (w - w*)^2``
(Eq. 3) is added to the loss. The rows of Table 4(a)/5 are parameter settings of :func:`fit_shared`
(:data:`ABLATION_ROWS` in :mod:`rodinhd.ablation`). The schedule and the loss terms are in :mod:`rodinhd.replay`.

Stage 2 freezes the decoder and fits each avatar's triplane on its own, sharded over processes.

Both stages take their settings as one object, :class:`rodinhd.config.Stage1Config` / :class:`Stage2Config` (the
run's config sections), plus the triplane box (``bound``, ``center``) and the seed.

Loss weights and learning-rate rules default to the authors' code (RodinHD's released training code: TV 2e-4,
l1 1e-6, triplane lr 2e-2 / (10 loop + 1), decoder lr 2e-3 * 0.1^(step / (50 inner))), since the paper's Table 5
gives only constant rates; iteration counts default to the paper (5000 a visit, 25000 in stage 2; the code uses
6000 and 30000). :data:`PAPER_TABLE5` holds the table's numbers as Stage1Config overrides. The IWC penalty keeps
the paper's 1/2 (Eq. 3; the authors' code applies ``sum F (w* - w)^2`` with weight 0.1 and no 1/2):
``iwc_half=False``.
The code's distortion loss (mip-NeRF 360's, weight 2e-5; the paper does not mention it) is stage 1's
``distortion_weight`` option (0 in paper.yaml, 2e-5 in authors_code.yaml), on distances along the ray divided by
the cube's diagonal (ours: it makes the weight independent of the world's scale).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from avatar_core.cameras import Cameras
from avatar_core.errors import ConfigError, CorruptFileError, InputError
from avatar_core.io import load_tensors, save_tensors
from avatar_core.metrics import psnr as psnr_fn
from avatar_core.metrics import ssim as ssim_fn
from avatar_core.render.compositing import distortion_loss
from avatar_core.render.occupancy import OccupancyGrid
from avatar_core.render.rays import generate_rays, sample_pixels
from avatar_core.train.sharding import process_shard
from rodinhd.config import Stage1Config, Stage2Config
from rodinhd.decoder import TriplaneDecoder
from rodinhd.renderer import TriplaneField, build_occupancy_grid, render_triplane_rays, render_views
from rodinhd.replay import decoder_lr_at, fisher_diagonal, iwc_penalty, task_replay_schedule, triplane_lr_at, tv_loss
from rodinhd.triplane import TriplaneStore, init_triplane

__all__ = [
    "GetViews",
    "PAPER_TABLE5",
    "fit_shared",
    "Stage1Result",
    "fit_triplanes",
    "evaluate_fit",
]

#: ``get_views(avatar_id) -> (images [V, H, W, 4] float RGBA in [0, 1] (straight alpha), Cameras of V views)``.
GetViews = Callable[[str], tuple[Tensor, Cameras]]

#: The hyper-parameters of the paper's Table 5 ("Ours" column) as overrides of :class:`Stage1Config`
#: (``dataclasses.replace(Stage1Config(), **PAPER_TABLE5)``).
PAPER_TABLE5 = dict(inner_iterations=5000, outer_loops=30, tv_weight=1e-2, l2_weight=1e-4, l1_weight=0.0,
                    iwc_weight=0.1, weight_decay=0.0, triplane_lr=2e-3, triplane_lr_loop_decay=0.0,
                    decoder_lr=2e-4, decoder_lr_decay_visits=math.inf, rays_per_step=8192, num_samples=1024)

STATE_FILE = "stage1_state.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# One visit: the inner loop of Algorithm 1 (also stage 2 with a frozen decoder)
# ---------------------------------------------------------------------------------------------------------------
def _check_views(avatar_id: str, images: Tensor, cameras: Cameras) -> None:
    if images.ndim != 4 or images.shape[-1] != 4:
        raise InputError(f"views of avatar {avatar_id!r} must be RGBA [V, H, W, 4], got {tuple(images.shape)}",
                         "return float RGBA images in [0, 1] from get_views")
    if images.shape[0] != len(cameras) or images.shape[1:3] != (cameras.height, cameras.width):
        raise InputError(f"avatar {avatar_id!r}: {images.shape[0]} images of {images.shape[2]}x{images.shape[1]} "
                         f"but {len(cameras)} cameras of {cameras.width}x{cameras.height}",
                         "give one camera per image with the images' size")
    if not bool(torch.isfinite(images).all()) or float(images.min()) < 0.0 or float(images.max()) > 1.0 + 1e-4:
        raise InputError(f"views of avatar {avatar_id!r} must be finite values in [0, 1], got "
                         f"[{float(images.min()):.3g}, {float(images.max()):.3g}]",
                         "convert 8-bit images with images.float() / 255")


@dataclass
class _StepConfig:
    rays_per_step: int
    num_samples: int
    bound: float
    center: tuple[float, float, float]
    tv_weight: float
    l2_weight: float
    l1_weight: float
    weight_decay: float
    iwc_weight: float
    iwc_half: bool
    occupancy: bool
    grid_resolution: int
    grid_update_every: int
    distortion_weight: float = 0.0


def _step_config(s: Stage1Config | Stage2Config, bound: float, center: Sequence[float], train_decoder: bool
                 ) -> _StepConfig:
    """The per-step settings of either stage (stage 2 trains no decoder: no weight decay, no IWC)."""
    return _StepConfig(s.rays_per_step, s.num_samples, float(bound), tuple(float(c) for c in center), s.tv_weight,
                       s.l2_weight, s.l1_weight, s.weight_decay if train_decoder else 0.0,
                       s.iwc_weight if train_decoder else 0.0, s.iwc_half if train_decoder else True, s.occupancy,
                       s.grid_resolution, s.grid_update_every, getattr(s, "distortion_weight", 0.0))


def _run_visit(
    planes: Tensor,  # [3, C, R, R] leaf with grad
    decoder: TriplaneDecoder,
    images: Tensor,  # [V, H, W, 4]
    cameras: Cameras,
    steps: int,
    cfg: _StepConfig,
    plane_opt: torch.optim.Optimizer,
    decoder_opt: torch.optim.Optimizer | None,
    decoder_lr: Callable[[int], float] | None,
    iwc_state: tuple[dict[str, Tensor], dict[str, Tensor]] | None,
    generator: torch.Generator,
    on_step: Callable[[float], None] | None = None,
) -> tuple[list[float], dict[str, Tensor] | None]:
    """``steps`` optimisation steps on one avatar; returns the data losses and, when the decoder trains, the
    Fisher diagonal of the last step."""
    radiance = TriplaneField(planes, decoder, cfg.bound, cfg.center)
    grid = None
    if cfg.occupancy:
        grid = build_occupancy_grid(radiance, cfg.grid_resolution, cfg.num_samples)
        grid.train()
    step_size = radiance.step_size(cfg.num_samples)
    consolidated = decoder.consolidated_parameters()
    losses, fisher = [], None
    for it in range(steps):
        if grid is not None and it > 0:
            # Our CPU grid draws its probes from the visit's generator (reproducible); nerfacc's from the global RNG.
            extra = {"generator": generator} if isinstance(grid, OccupancyGrid) and grid.device.type == "cpu" else {}
            grid.update_every_n_steps(it, lambda x: radiance.density(x) * step_size, n=cfg.grid_update_every,
                                      warmup_steps=0, **extra)
        if decoder_opt is not None and decoder_lr is not None:
            for group in decoder_opt.param_groups:
                group["lr"] = decoder_lr(it)
        cam_ids, rows, cols = sample_pixels(cameras, cfg.rays_per_step, generator)
        rays_o, rays_d = generate_rays(cameras, cam_ids, rows, cols)
        target = images[cam_ids, rows, cols]  # [N, 4]
        # A random background per ray makes colour and opacity both identifiable (torch-ngp's trick).
        bg = torch.rand(cfg.rays_per_step, 3, generator=generator).to(images)
        target_rgb = target[:, :3] * target[:, 3:] + bg * (1.0 - target[:, 3:])
        out = render_triplane_rays(radiance, rays_o, rays_d, cfg.num_samples, grid, bg, stratified=True,
                                   generator=generator)
        data_loss = (out.rgb - target_rgb).pow(2).mean()
        loss = data_loss + cfg.tv_weight * tv_loss(planes)
        if cfg.l2_weight:
            loss = loss + cfg.l2_weight * planes.pow(2).mean()
        if cfg.l1_weight:
            loss = loss + cfg.l1_weight * planes.abs().mean()
        if cfg.distortion_weight:
            scale = 2.0 * math.sqrt(3.0) * cfg.bound  # distances in units of the cube's diagonal
            loss = loss + cfg.distortion_weight * distortion_loss(
                out.weights, out.t_starts / scale, out.t_ends / scale, out.ray_indices, rays_o.shape[0]).mean()
        if decoder_opt is not None:
            if cfg.weight_decay:
                loss = loss + cfg.weight_decay * sum(p.pow(2).sum() for p in decoder.parameters())
            if cfg.iwc_weight and iwc_state is not None:
                loss = loss + iwc_penalty(consolidated, iwc_state[0], iwc_state[1], cfg.iwc_weight, cfg.iwc_half)
            if it == steps - 1 and data_loss.requires_grad:
                fisher = fisher_diagonal(data_loss, consolidated)
            decoder_opt.zero_grad(set_to_none=True)
        plane_opt.zero_grad(set_to_none=True)
        loss.backward()
        plane_opt.step()
        if decoder_opt is not None:
            decoder_opt.step()
        losses.append(float(data_loss.detach()))
        if on_step is not None:
            on_step(losses[-1])
    if decoder_opt is not None and fisher is None:
        fisher = {n: torch.zeros_like(p) for n, p in consolidated.items()}
    return losses, fisher


def _adam(params, lr: float) -> torch.optim.Adam:
    # torch-ngp's Adam settings for grid-like parameters.
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-15)


def _load_views(get_views: GetViews, avatar_id: str, device) -> tuple[Tensor, Cameras]:
    images, cameras = get_views(avatar_id)
    images = torch.as_tensor(images).float()
    _check_views(avatar_id, images, cameras)
    return images.to(device), cameras.to(device)


def _seed(*parts) -> int:
    """A stable 63-bit seed from parts (independent of Python's hash randomisation)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Stage1Result:
    """What :func:`fit_shared` returns: the decoder, the per-visit history and whether the schedule is done."""

    decoder: TriplaneDecoder
    history: list[dict] = field(default_factory=list)
    next_visit: int = 0
    total_visits: int = 0

    @property
    def done(self) -> bool:
        return self.next_visit >= self.total_visits


def _save_state(path: Path, decoder: TriplaneDecoder, opt: torch.optim.Optimizer,
                iwc: dict[str, tuple[dict[str, Tensor], dict[str, Tensor]]], meta: dict) -> None:
    tensors = {f"decoder/{k}": v for k, v in decoder.state_dict().items()}
    names = [n for n, _ in decoder.named_parameters()]
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"optim/{names[i]}/{k}"] = torch.as_tensor(v)
    for aid, (fisher, snap) in iwc.items():
        for n in fisher:
            tensors[f"iwc/{aid}/fisher/{n}"] = fisher[n]
            tensors[f"iwc/{aid}/snapshot/{n}"] = snap[n]
    save_tensors(path, tensors, meta)


def _load_state(path: Path, decoder: TriplaneDecoder, opt: torch.optim.Optimizer, device
                ) -> tuple[dict, dict[str, tuple[dict[str, Tensor], dict[str, Tensor]]]]:
    tensors, meta = load_tensors(path, device=device)
    try:
        decoder.load_state_dict({k[len("decoder/"):]: v for k, v in tensors.items() if k.startswith("decoder/")})
    except RuntimeError as e:
        raise ConfigError(f"the decoder in {path} does not match this decoder ({e})",
                          "resume with the decoder settings of the original run, or use a fresh state directory"
                          ) from e
    names = {n: i for i, (n, _) in enumerate(decoder.named_parameters())}
    state: dict[int, dict[str, Tensor]] = {}
    iwc: dict[str, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            pname, key = k[len("optim/"):].rsplit("/", 1)
            # Adam keeps its step counter on the CPU unless it is capturable/fused.
            state.setdefault(names[pname], {})[key] = v.cpu() if key == "step" else v
        elif k.startswith("iwc/"):
            aid, kind, pname = k[len("iwc/"):].split("/", 2)
            fisher, snap = iwc.setdefault(aid, ({}, {}))
            (fisher if kind == "fisher" else snap)[pname] = v
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    return meta, iwc


def fit_shared(
    get_views: GetViews,
    avatar_ids: Sequence[str],
    decoder: TriplaneDecoder,
    store: TriplaneStore,
    state_dir: str | os.PathLike,
    settings: Stage1Config | None = None,
    *,
    bound: float = 1.0,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    seed: int = 0,
    max_visits: int | None = None,
    progress: bool = True,
) -> Stage1Result:
    """Stage 1 (Algorithm 1): fit the avatars' triplanes jointly with the shared decoder, resumably.

    Args:
        get_views: ``avatar_id -> (images [V, H, W, 4], Cameras)``, called once per visit.
        avatar_ids: the S avatars [64 in the paper, 256 in the code].
        decoder: the shared decoder, trained in place.
        store: where the triplanes live between visits; a missing triplane starts from ``init_std`` noise. Each
            visit loads the triplane and gives it a fresh Adam optimiser (its learning rate changes per loop).
        state_dir: holds ``stage1_state.safetensors`` (decoder, its Adam state, IWC states, schedule position,
            settings), rewritten atomically after every visit; an existing state is resumed, and resuming with
            other settings is refused.
        settings: the stage's settings (:class:`rodinhd.config.Stage1Config`, whose fields document the paper's and
            the authors' values; ``num_avatars`` is the caller's choice of ``avatar_ids`` and unused here). None:
            the defaults. Naive fitting is ``outer_loops=1``.
        bound, center: the world cube the triplanes cover.
        seed: all randomness (each visit is seeded by ``(seed, visit)``, so a resumed run repeats an uninterrupted
            one exactly).
        max_visits: stop after this many visits in this call (the state is saved, call again to continue).
        progress: show a tqdm bar over iterations.
    """
    s = settings if settings is not None else Stage1Config()
    device = next(decoder.parameters()).device
    schedule = task_replay_schedule(avatar_ids, s.outer_loops, s.inner_iterations, s.shuffle, seed)
    fitted = {k: v for k, v in asdict(s).items() if k != "num_avatars"}
    config = dict(avatar_ids=[str(a) for a in avatar_ids], **fitted, bound=bound, center=list(center), seed=seed,
                  channels=store.channels, resolution=store.resolution)
    cfg = _step_config(s, bound, center, train_decoder=True)
    decoder_opt = _adam(decoder.parameters(), s.decoder_lr)
    state_path = Path(state_dir) / STATE_FILE
    next_visit, global_step, history = 0, 0, []
    iwc: dict[str, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}
    if state_path.is_file():
        meta, iwc = _load_state(state_path, decoder, decoder_opt, device)
        if not isinstance(meta, dict) or "config" not in meta:
            raise CorruptFileError(f"{state_path} has no stage-1 metadata", "delete it to start over")
        _check_same_config(meta["config"], json.loads(json.dumps(config)), state_path)
        next_visit, global_step, history = meta["next_visit"], meta["global_step"], meta["history"]

    end = len(schedule) if max_visits is None else min(len(schedule), next_visit + max_visits)
    bar = tqdm(total=len(schedule) * s.inner_iterations, initial=next_visit * s.inner_iterations,
               desc="stage 1 (shared decoder)", unit="it", disable=not progress, dynamic_ncols=True)
    decoder.train()
    for visit in schedule[next_visit:end]:
        aid = visit.avatar_id
        images, cameras = _load_views(get_views, aid, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(seed, "visit", visit.index))
            gen = torch.Generator().manual_seed(_seed(seed, "rays", visit.index))
            if store.exists(aid):
                planes = store.load(aid, device)
            else:
                planes = init_triplane(store.channels, store.resolution, s.init_std,
                                       torch.Generator().manual_seed(_seed(seed, "init", aid)), device)
            planes = planes.clone().requires_grad_(True)
            plane_opt = _adam([planes], triplane_lr_at(visit.loop, s.triplane_lr, s.triplane_lr_loop_decay))
            start = global_step
            bar.set_postfix(avatar=aid, loop=visit.loop)
            losses, fisher = _run_visit(
                planes, decoder, images, cameras, visit.iterations, cfg, plane_opt, decoder_opt,
                lambda it, start=start: decoder_lr_at(start + it, s.inner_iterations, s.decoder_lr,
                                                      s.decoder_lr_decay_visits),
                iwc.get(aid), gen, on_step=lambda _: bar.update(1))
        global_step += visit.iterations
        snapshot = {n: p.detach().clone() for n, p in decoder.consolidated_parameters().items()}
        if s.iwc_normalize:
            mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp_min(1e-30)
            fisher = {n: f / mean for n, f in fisher.items()}
        iwc[aid] = (fisher, snapshot)
        tail = losses[-max(1, len(losses) // 10):]
        history.append(dict(visit=visit.index, loop=visit.loop, avatar=aid,
                            loss=sum(tail) / len(tail), psnr=-10.0 * math.log10(max(sum(tail) / len(tail), 1e-12))))
        store.save(aid, planes, {"stage": 1, "visit": visit.index, "loop": visit.loop})
        _save_state(state_path, decoder, decoder_opt, iwc,
                    dict(config=config, next_visit=visit.index + 1, global_step=global_step, history=history))
        next_visit = visit.index + 1
    bar.close()
    return Stage1Result(decoder, history, next_visit, len(schedule))


def _check_same_config(saved: dict, current: dict, path: Path) -> None:
    # A setting added after the state was written matches when it holds the schema's default.
    defaults = asdict(Stage1Config())
    saved = {**{k: defaults[k] for k in current if k not in saved and k in defaults}, **saved}
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:6])
        raise ConfigError(f"the stage-1 state in {path.parent} was written with other settings ({detail})",
                          "resume with the original settings, or pass a fresh state directory to start over")


# ---------------------------------------------------------------------------------------------------------------
# Stage 2
# ---------------------------------------------------------------------------------------------------------------
def fit_triplanes(
    get_views: GetViews,
    avatar_ids: Sequence[str],
    decoder: TriplaneDecoder,
    out_store: TriplaneStore,
    init_store: TriplaneStore | None = None,
    settings: Stage2Config | None = None,
    *,
    bound: float = 1.0,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Stage 2: with the decoder frozen, fit every avatar's triplane independently; returns the ids this
    process fitted.

    ``settings`` are the stage's (:class:`rodinhd.config.Stage2Config`; ``iterations`` per avatar [25000 paper
    appendix; 30000 code]; ``init_from_stage1`` is the caller's choice of ``init_store``); None: the defaults.
    ``init_store`` supplies a starting triplane when it has one (e.g. stage 1's), otherwise noise; avatars
    ``avatar_ids[rank::world_size]`` go to this process (:func:`avatar_core.train.process_shard`); an avatar whose
    file in ``out_store`` already records ``iterations`` stage-2 steps is skipped, so a killed run resumes per
    avatar. ``bound``, ``center`` and ``seed`` mean what they mean in :func:`fit_shared`.
    """
    s = settings if settings is not None else Stage2Config()
    iterations = s.iterations
    rank, world_size = process_shard(rank, world_size)
    mine = [str(a) for a in avatar_ids][rank::world_size]
    device = next(decoder.parameters()).device
    cfg = _step_config(s, bound, center, train_decoder=False)
    decoder.eval()
    frozen = [p.requires_grad for p in decoder.parameters()]
    for p in decoder.parameters():
        p.requires_grad_(False)
    done = []
    try:
        bar = tqdm(total=len(mine) * iterations, desc=f"stage 2 (shard {rank}/{world_size})", unit="it",
                   disable=not progress, dynamic_ncols=True)
        for aid in mine:
            if out_store.exists(aid):
                _, meta = out_store.load_with_metadata(aid)
                if meta.get("stage") == 2 and meta.get("iterations") == iterations:
                    bar.update(iterations)
                    continue
            images, cameras = _load_views(get_views, aid, device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed(seed, "stage2", aid))
                gen = torch.Generator().manual_seed(_seed(seed, "stage2-rays", aid))
                if init_store is not None and init_store.exists(aid):
                    planes = init_store.load(aid, device)
                else:
                    planes = init_triplane(out_store.channels, out_store.resolution, s.init_std,
                                           torch.Generator().manual_seed(_seed(seed, "init", aid)), device)
                planes = planes.clone().requires_grad_(True)
                bar.set_postfix(avatar=aid)
                losses, _ = _run_visit(planes, decoder, images, cameras, iterations, cfg,
                                       _adam([planes], s.triplane_lr), None, None, None, gen,
                                       on_step=lambda _: bar.update(1))
            tail = losses[-max(1, len(losses) // 10):]
            out_store.save(aid, planes, {"stage": 2, "iterations": iterations, "loss": sum(tail) / len(tail)})
            done.append(aid)
        bar.close()
    finally:
        for p, flag in zip(decoder.parameters(), frozen):
            p.requires_grad_(flag)
    return done


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_fit(
    get_views: GetViews,
    avatar_ids: Sequence[str],
    decoder: TriplaneDecoder,
    store: TriplaneStore,
    bound: float = 1.0,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    num_samples: int = 128,
    occupancy: bool = False,
    grid_resolution: int = 128,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    perceptual: torch.nn.Module | None = None,
) -> dict[str, dict[str, float]]:
    """PSNR / SSIM of each stored triplane rendered by ``decoder`` against its views (composited on
    ``background``): ``{avatar_id: {"psnr": dB, "ssim": s}}``, averaged over the avatar's views; with
    ``perceptual`` (``(pred [V, H, W, 3], target) -> distance``, e.g. the kernel's LPIPS) also ``"lpips"``."""
    device = next(decoder.parameters()).device
    bg = torch.as_tensor(background, dtype=torch.float32, device=device)
    out = {}
    for aid in avatar_ids:
        images, cameras = _load_views(get_views, str(aid), device)
        rgb, _ = render_views(store.load(str(aid), device), decoder, cameras, bound, center, num_samples,
                              occupancy, grid_resolution, background=bg)
        target = images[..., :3] * images[..., 3:] + bg * (1.0 - images[..., 3:])
        s = ssim_fn(rgb, target).mean() if min(rgb.shape[1:3]) >= 11 else torch.tensor(float("nan"))
        out[str(aid)] = {"psnr": float(psnr_fn(rgb, target).mean()), "ssim": float(s)}
        if perceptual is not None:
            out[str(aid)]["lpips"] = float(perceptual(rgb, target).mean())
    return out
