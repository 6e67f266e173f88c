"""Teacher UV features for TeRA's distilled latent space: IDOL's, read from disk, or the project's fitted teacher.

On-disk layout (one file per avatar, in one folder)::

    FEATURES_DIR/
        <avatar_id>.safetensors   key "uv_features": [32, H, W], float16 / bfloat16 / float32
        <avatar_id>.npy           or a NumPy array [32, H, W] of the same meaning
        decoder.safetensors       (fitted teacher only) its UV decoder (the final one once the joint fit's
                                  first phase is done)
        fit_state.pt              (joint fit, while it runs) features, Adam moments, decoder + optimizer, epoch
        consistency.json          (fitted teacher) every avatar's PSNR through the final decoder

IDOL (Zhuang et al. 2025, github.com/yiyuzhuang/IDOL @ 69b6df7) writes 32 x 1536 x 1536 tanh-bounded UV features from its Sapiens encoder; export them
per avatar under the avatar's id in this layout. Rows follow the kernel's UV convention (row 0 is v = 1, the top
of the UV image). Without IDOL, :class:`TeacherFitter` produces the same layout by auto-decoding: per-avatar UV
feature maps optimised jointly with an IDOL-style UV decoder (:class:`tera.uv_gaussians.UVDecoder`) to reproduce
the avatar's multi-view renders with IDOL's losses (lambda_mse 20, lambda_lpips 10, lambda_offset 1; the
joint schedule of :meth:`TeacherFitter.fit_joint`, then a refit against the frozen decoder). The
dataset's views show each avatar in its own shape and pose, so each fit takes that avatar's posed body: the
canonical Gaussians are skinned onto it before rendering. :func:`fit_teacher` is the ``tera fit-teacher`` stage.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatar_core.body import BodyOutput
from avatar_core.body.model import blend_transforms
from avatar_core.cameras import Cameras
from avatar_core.errors import ConfigError, CorruptFileError, InputError, MissingFileError
from avatar_core.io import atomic_write, load_json, load_tensors, save_json, save_tensors
from avatar_core.rotations import matrix_to_quaternion, nearest_rotation, quaternion_multiply
from avatar_core.train import move_aside, run_lock, signature_diff
from tera.config import TeraConfig
from tera.data import TeraDataset, training_views
from tera.distill import PerceptualLoss, render_loss
from tera.runs import (
    build_avatar,
    load_dataset,
    perceptual,
    posed_render,
    run_paths,
    stage_signature,
    train_device,
    uv_decoder,
)
from tera.standins import resolve_standins
from tera.uv_gaussians import GaussianBatch, UVDecoder, UVGaussianAvatar, composite, resize_mask

FEATURE_KEY = "uv_features"
FEATURE_CHANNELS = 32
DECODER_FILE = "decoder.safetensors"
#: The settings the fitted teacher's features were made under (written before the first avatar is fitted).
FIT_SETTINGS_FILE = "fit_settings.json"
FIT_FORMAT = "tera.teacher_fit/1"
#: The joint fit's state after its last finished epoch (features, Adam moments, decoder, its optimizer).
FIT_STATE_FILE = "fit_state.pt"
#: The fitted features' reconstruction through the final decoder, per avatar in fit order (:func:`teacher_consistency`).
CONSISTENCY_FILE = "consistency.json"

#: Views for one avatar: RGBA images ``[V, H, W, 4]`` in [0, 1], their V cameras, and the posed body the
#: views show (None: the canonical body).
ViewsFn = Callable[[str], tuple[Tensor, Cameras] | tuple[Tensor, Cameras, BodyOutput | None]]


class TeacherFeatureStore:
    """A folder of per-avatar teacher UV features in the layout of the module docstring.

    Args:
        root: the folder.
        channels: expected feature channels (IDOL 32).
    """

    def __init__(self, root: str | os.PathLike, channels: int = FEATURE_CHANNELS):
        self.root = Path(root)
        self.channels = channels

    def path(self, avatar_id: str) -> Path | None:
        """The avatar's feature file (safetensors preferred), or None."""
        for suffix in (".safetensors", ".npy"):
            p = self.root / f"{avatar_id}{suffix}"
            if p.is_file():
                return p
        return None

    def exists(self, avatar_id: str) -> bool:
        return self.path(avatar_id) is not None

    def ids(self) -> list[str]:
        """Avatar ids with features, sorted."""
        if not self.root.is_dir():
            return []
        return sorted({p.stem for p in self.root.iterdir()
                       if p.suffix in (".safetensors", ".npy") and p.name != DECODER_FILE})

    def load(self, avatar_id: str) -> Tensor:  # [C, H, W] float32
        """The avatar's features, validated: [channels, H, W], square, finite."""
        path = self.path(avatar_id)
        if path is None:
            raise MissingFileError(
                f"no teacher UV features for avatar {avatar_id!r} in {self.root} "
                f"(looked for {avatar_id}.safetensors and {avatar_id}.npy)",
                "fit them with `tera fit-teacher` (the project's own teacher), or export IDOL's features as "
                f"{self.root}/<avatar_id>.safetensors with key '{FEATURE_KEY}' [{self.channels}, H, W]")
        if path.suffix == ".npy":
            try:
                feats = torch.from_numpy(np.load(path, allow_pickle=False))
            except (OSError, ValueError) as exc:
                raise CorruptFileError(f"cannot read teacher features {path}: {exc}",
                                       "re-export the file as a plain [C, H, W] float array") from exc
        else:
            tensors, _ = load_tensors(path)
            if FEATURE_KEY not in tensors:
                raise CorruptFileError(f"{path} has no '{FEATURE_KEY}' tensor (keys: {sorted(tensors)})",
                                       f"store the features under the key '{FEATURE_KEY}'")
            feats = tensors[FEATURE_KEY]
        return self._validate(feats, path)

    def _validate(self, feats: Tensor, path: Path) -> Tensor:
        if not feats.is_floating_point():
            raise CorruptFileError(f"{path}: features have dtype {feats.dtype}, expected float16/32",
                                   "store the encoder's float output")
        if feats.dim() == 4 and feats.shape[0] == 1:
            feats = feats[0]
        if feats.dim() != 3 or feats.shape[0] != self.channels:
            hint = ("the file looks channels-last: transpose it to [C, H, W]"
                    if feats.dim() == 3 and feats.shape[-1] == self.channels else
                    f"IDOL's features are [{self.channels}, 1536, 1536]; check the export")
            raise CorruptFileError(f"{path}: features have shape {tuple(feats.shape)}, expected "
                                   f"[{self.channels}, H, W]", hint)
        if feats.shape[1] != feats.shape[2]:
            raise CorruptFileError(f"{path}: UV features must be square, got {feats.shape[1]}x{feats.shape[2]}",
                                   "export the full UV map")
        feats = feats.float()
        if not torch.isfinite(feats).all():
            raise CorruptFileError(f"{path}: features contain NaN or infinite values", "re-run the encoder / fit")
        return feats

    def save(self, avatar_id: str, features: Tensor, metadata: dict | None = None,
             dtype: torch.dtype = torch.float16) -> Path:
        """Write ``features [C, H, W]`` as ``<avatar_id>.safetensors`` (atomically)."""
        if features.dim() != 3 or features.shape[0] != self.channels:
            raise InputError(f"features must be [{self.channels}, H, W], got {tuple(features.shape)}",
                             "save one avatar's UV feature map")
        self.root.mkdir(parents=True, exist_ok=True)
        return save_tensors(self.root / f"{avatar_id}.safetensors", {FEATURE_KEY: features.detach().to(dtype)},
                            metadata or {})


def feature_mask(avatar: UVGaussianAvatar, resolution: int) -> Tensor:  # -> [R, R] bool
    """The texels of a UV feature map inside the body's UV charts: the chart mask at ``resolution`` together with
    every texel the avatar's Gaussians read (bilinear footprints of its UV points, which reach one texel past a
    chart's border). Features outside are held at exactly zero by the fitted teacher."""
    R = int(resolution)
    mask = resize_mask(avatar.uv_mapper.mask, R).clone()
    uv = avatar.uv.detach().cpu().double()
    x, y = uv[:, 0] * R - 0.5, (1.0 - uv[:, 1]) * R - 0.5  # continuous texel coordinates (centres at integers)
    x0, y0 = x.floor().long(), y.floor().long()
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = (x0 + dx).clamp(0, R - 1), (y0 + dy).clamp(0, R - 1)  # border padding reads the edge texel
            mask[yi, xi] = True
    return mask.to(avatar.template_points.device)


def feature_regulariser(features: Tensor, mask: Tensor, lambda_l2: float = 0.0,
                        lambda_tv: float = 0.0) -> Tensor:  # [B, C, R, R], [R, R] -> [B]
    """Per-avatar prior on UV features inside the charts: ``lambda_l2`` times the mean squared feature over the
    masked texels plus ``lambda_tv`` times the mean squared difference of horizontally and vertically adjacent
    texels that are both inside (a smoothness term that never pulls a chart's border towards the zeros outside)."""
    m = mask.to(features)
    C = features.shape[1]
    out = features.new_zeros(features.shape[0])
    if lambda_l2:
        out = out + lambda_l2 * (features ** 2 * m).sum((1, 2, 3)) / (m.sum() * C).clamp_min(1)
    if lambda_tv:
        mh, mv = m[:, 1:] * m[:, :-1], m[1:, :] * m[:-1, :]
        dh = (features[..., :, 1:] - features[..., :, :-1]) ** 2 * mh
        dv = (features[..., 1:, :] - features[..., :-1, :]) ** 2 * mv
        pairs = ((mh.sum() + mv.sum()) * C).clamp_min(1)
        out = out + lambda_tv * (dh.sum((1, 2, 3)) + dv.sum((1, 2, 3))) / pairs
    return out


class PosedSurface:
    """What posing an avatar's canonical Gaussians onto one fixed body needs, computed once (the same maths as
    :func:`tera.animate.pose_gaussians`): surface points, blended skinning linear parts and their rotations."""

    def __init__(self, avatar: UVGaussianAvatar, body: BodyOutput):
        with torch.no_grad():
            self.surface = avatar.surface_points(body.vertices)[0]  # [N, 3]
            self.linear = blend_transforms(avatar.skin_weights, body.transforms)[0, ..., :3]  # [N, 3, 3]
            self.rotation = matrix_to_quaternion(nearest_rotation(self.linear))  # [N, 4] wxyz

    def pose(self, g: GaussianBatch) -> GaussianBatch:  # one canonical avatar [1, N] -> posed [1, N]
        dt = g.means.dtype
        means = self.surface.to(dt) + (self.linear.to(dt) @ g.offsets[0, :, :, None])[..., 0]
        quats = quaternion_multiply(self.rotation.to(dt), F.normalize(g.quats[0], dim=-1))  # rotate_quaternions
        return GaussianBatch(means[None], quats[None], g.scales, g.opacities, g.colors, g.offsets)


def _clip_rows(grad: Tensor, max_norm: float) -> Tensor:
    """Each avatar's gradient (row of ``grad``) clipped to ``max_norm`` on its own, so avatars stay independent."""
    norms = grad.flatten(1).norm(dim=1)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return grad * scale.reshape(-1, *[1] * (grad.dim() - 1))


class _RowAdam:
    """Adam over the rows (avatars) of one parameter tensor, updating only the rows of a step's batch: an avatar
    outside the batch keeps its value and moments, exactly as if each avatar had its own optimizer."""

    def __init__(self, param: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)
        self.t = torch.zeros(param.shape[0], dtype=torch.long)

    def reset(self, rows: Tensor) -> None:
        self.m[rows] = 0
        self.v[rows] = 0
        self.t[rows] = 0

    def step(self, param: Tensor, rows: Tensor, grad: Tensor) -> None:
        b1, b2 = self.betas
        self.t[rows] += 1
        t = self.t[rows].to(param).reshape(-1, *[1] * (param.dim() - 1))
        m = self.m[rows] * b1 + (1 - b1) * grad
        v = self.v[rows] * b2 + (1 - b2) * grad * grad
        self.m[rows], self.v[rows] = m, v
        step = self.lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + self.eps)
        param[rows] = param[rows] - step

    def state(self) -> dict[str, Tensor]:
        return {"m": self.m, "v": self.v, "t": self.t}

    def load(self, state: dict[str, Tensor]) -> None:
        self.m, self.v, self.t = (state[k].to(self.m.device) if k != "t" else state[k].cpu() for k in ("m", "v", "t"))


class TeacherFitter:
    """The project's own teacher: per-avatar UV features + a shared IDOL-style UV decoder, fitted to renders.

    Features are ``tanh`` of free parameters (IDOL's encoder ends in tanh, so both teachers share a range). Two
    schedules (``teacher.mode``):

    * :meth:`fit_joint` (``joint``, the default): every avatar's features live in one parameter store and are fitted
      in mini-batches of avatars over several epochs while the shared decoder is updated every step (the
      auto-decoder of DeepSDF / IDOL's joint training); then the decoder is frozen (BatchNorm in inference mode)
      and every avatar's features are refitted to it, so each avatar's features mean the same through the final
      decoder. Features outside the UV charts (:func:`feature_mask`) are held at exactly zero, and an optional prior
      (:func:`feature_regulariser`) keeps them small and smooth inside. Resumes at epoch granularity.
    * :meth:`fit` (``sequential``, the original fitter, kept for comparison): avatars one after another for
      ``steps`` iterations each against the decoder as it is, never revisited.

    Args:
        avatar: the UV Gaussian avatar (UV points and body) that turns attribute maps into Gaussians.
        store: where features (and the decoder) are written.
        feature_resolution: UV feature map size (IDOL 1536; tiny 32-64; it must be a multiple of the latent's).
        decoder: the UV decoder to fit; a fresh :class:`UVDecoder` when None.
        lr: decoder learning rate (IDOL 5e-4).
        feature_lr: learning rate of the per-avatar feature parameters (auto-decoding needs a higher one; 1e-2).
        lambda_mse, lambda_lpips, lambda_offset: IDOL's loss weights (20, 10, 1).
        perceptual: the LPIPS stand-in; None builds :class:`tera.distill.PerceptualLoss`.
        views_per_step: views rendered per iteration and avatar (IDOL 5).
        grad_clip: gradient-norm clip (IDOL 10); in the joint fit per avatar and for the decoder separately.
        background: colour behind the avatar, for renders and RGBA targets.
        seed: feature initialisation and view sampling.
        init_scale: standard deviation of the features' free parameters at the start (0.1).
        lambda_l2, lambda_tv: weights of :func:`feature_regulariser` (joint fit only).
        levels: resolutions of the joint fit's free feature parameters, bilinearly upsampled to
            ``feature_resolution`` and summed before the tanh (None: one level, per texel). Coarse levels share
            one parameter between neighbouring texels, so the few pixels of a low-resolution view move whole
            regions of the map instead of leaving per-texel noise that the renders cannot see.
    """

    def __init__(
        self,
        avatar: UVGaussianAvatar,
        store: TeacherFeatureStore,
        feature_resolution: int = 64,
        decoder: UVDecoder | None = None,
        lr: float = 5e-4,
        feature_lr: float = 1e-2,
        lambda_mse: float = 20.0,
        lambda_lpips: float = 10.0,
        lambda_offset: float = 1.0,
        perceptual: PerceptualLoss | None = None,
        views_per_step: int = 5,
        grad_clip: float = 10.0,
        background: Sequence[float] = (1.0, 1.0, 1.0),
        seed: int = 0,
        init_scale: float = 0.1,
        lambda_l2: float = 0.0,
        lambda_tv: float = 0.0,
        levels: Sequence[int] | None = None,
    ):
        self.avatar = avatar
        self.store = store
        self.resolution = feature_resolution
        device = avatar.template_points.device
        self.decoder = (decoder if decoder is not None else UVDecoder(store.channels)).to(device)
        self.lr, self.feature_lr = lr, feature_lr
        self.lambdas = (lambda_mse, lambda_lpips, lambda_offset)
        self.perceptual = (perceptual if perceptual is not None else PerceptualLoss()).to(device)
        self.views_per_step = views_per_step
        self.grad_clip = grad_clip
        self.background = tuple(background)
        self.seed = seed
        self.init_scale = float(init_scale)
        self.lambda_l2, self.lambda_tv = float(lambda_l2), float(lambda_tv)
        self.mask = feature_mask(avatar, feature_resolution)
        self.levels = sorted({int(r) for r in (levels or [feature_resolution])})
        if not all(0 < r <= feature_resolution for r in self.levels):
            raise InputError(f"feature parameter levels {self.levels} must lie in [1, {feature_resolution}]",
                             "use resolutions up to teacher.resolution (e.g. [16, 32])")
        self._decoder_opt = torch.optim.Adam(self.decoder.parameters(), lr=lr)
        decoder_path = store.root / DECODER_FILE
        if decoder_path.is_file():  # resume: continue with the decoder fitted so far
            tensors, _ = load_tensors(decoder_path, device=device)
            self.decoder.load_state_dict(tensors)

    @property
    def device(self) -> torch.device:
        return self.avatar.template_points.device

    def loss(self, features: Tensor, images: Tensor, cameras: Cameras,
             body: BodyOutput | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """IDOL's render loss of one avatar's features ``[C, R, R]`` against RGBA views ``[V, H, W, 4]``, the
        Gaussians skinned onto ``body`` (the posed body the views show; None: canonical)."""
        maps = self.decoder(features[None])
        g = self.avatar(maps)
        pred = posed_render(self.avatar, g, body, cameras, self.background)
        target = composite(images, self.background).to(pred)[None]
        return render_loss(pred, target, g.offsets, self.perceptual, *self.lambdas, sum_views=False)

    def batch_loss(self, features: Tensor, images: Tensor, cameras: Sequence[Cameras],
                   posed: Sequence[PosedSurface | None]) -> tuple[Tensor, Tensor]:
        """Render loss + prior of B avatars' features ``[B, C, R, R]`` against their views ``[B, V, H, W, 4]``:
        ``(mean over the batch, per-avatar render loss [B] detached)``."""
        g = self.avatar(self.decoder(features))
        parts = [p.pose(g[b]) if p is not None else g[b] for b, p in enumerate(posed)]
        g = GaussianBatch(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(GaussianBatch)))
        pred, _ = self.avatar.render(g, list(cameras), self.background)
        target = composite(images, self.background).to(pred)
        lm, lp, lo = self.lambdas
        mse = ((pred - target) ** 2).mean((-3, -2, -1))  # [B, V]
        perc = self.perceptual(pred, target) if lp > 0 else torch.zeros_like(mse)
        per_avatar = (lm * mse + lp * perc).mean(1) + lo * (g.offsets ** 2).sum(-1).mean(-1)
        prior = feature_regulariser(features, self.mask, self.lambda_l2, self.lambda_tv)
        return (per_avatar + prior).mean(), per_avatar.detach()

    # ---- the sequential fitter (teacher.mode=sequential) ---------------------------------------------

    def fit_avatar(self, images: Tensor, cameras: Cameras, steps: int, seed: int | None = None,
                   body: BodyOutput | None = None) -> tuple[Tensor, list[float]]:
        """Fit one avatar's features (and update the shared decoder): ``(features [C, R, R], losses per step)``.

        ``body`` is the posed body the views show (the dataset's body parameters); None renders canonically."""
        _check_views(images, cameras)
        g = torch.Generator().manual_seed(self.seed if seed is None else seed)
        C, R = self.store.channels, self.resolution
        device = self.device
        param = nn.Parameter((self.init_scale * torch.randn(C, R, R, generator=g)).to(device))
        images, cameras = images.to(device), cameras.to(device)
        feat_opt = torch.optim.Adam([param], lr=self.feature_lr)
        self.decoder.train()
        history = []
        V = images.shape[0]
        for _ in range(steps):
            pick = torch.randperm(V, generator=g)[: self.views_per_step].tolist()
            loss, _ = self.loss(torch.tanh(param), images[pick], cameras[pick], body)
            feat_opt.zero_grad(set_to_none=True)
            self._decoder_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([param, *self.decoder.parameters()], self.grad_clip)
            feat_opt.step()
            self._decoder_opt.step()
            history.append(loss.item())
        return torch.tanh(param).detach(), history

    def fit(
        self,
        avatar_ids: Sequence[str],
        get_views: ViewsFn,
        steps: int = 500,
        overwrite: bool = False,
        progress: bool = True,
    ) -> dict[str, float]:
        """Sequential fit: every avatar not yet in the store (all with ``overwrite``); final loss per fitted avatar.

        Avatar ``k`` of ``avatar_ids`` is seeded by ``seed + k``, so a resumed run fits the rest as a whole run would."""
        from tqdm.auto import tqdm

        done: dict[str, float] = {}
        todo = [(k, a) for k, a in enumerate(avatar_ids) if overwrite or not self.store.exists(a)]
        for k, avatar_id in tqdm(todo, desc="fit-teacher", disable=not progress):
            images, cameras, *body = get_views(avatar_id)
            feats, history = self.fit_avatar(images, cameras, steps, seed=self.seed + k, body=body[0] if body else None)
            self.store.save(avatar_id, feats, {"resolution": self.resolution, "steps": steps,
                                               "final_loss": history[-1] if history else None})
            save_tensors(self.store.root / DECODER_FILE, self.decoder.state_dict(), {"channels": self.store.channels})
            done[avatar_id] = history[-1] if history else float("nan")
        return done

    # ---- the joint fitter (teacher.mode=joint) ------------------------------------------------------

    def _features(self, params: Sequence[Tensor]) -> Tensor:
        """Features ``[B, C, R, R]`` of free parameters at the fit's levels: tanh of their bilinearly upsampled
        sum, zero outside the charts."""
        R = self.resolution
        total = 0
        for p in params:
            total = total + (p if p.shape[-1] == R else
                             F.interpolate(p, size=(R, R), mode="bilinear", align_corners=False))
        return torch.tanh(total) * self.mask.to(params[0])

    def _batch_views(self, rows: Sequence[int], views: list[tuple[Tensor, Cameras, PosedSurface | None]],
                     g: torch.Generator) -> tuple[Tensor, list[Cameras], list[PosedSurface | None]]:
        imgs, cams, posed = [], [], []
        for k in rows:
            images, cameras, p = views[k]
            pick = torch.randperm(images.shape[0], generator=g)[: self.views_per_step]
            imgs.append(images[pick])
            cams.append(Cameras(cameras.viewmats[pick], cameras.Ks[pick], cameras.width, cameras.height))
            posed.append(p)
        if len({im.shape for im in imgs}) != 1:
            raise InputError("avatars of one batch have different view counts or sizes",
                             "give every avatar at least views_per_step views of one size")
        return torch.stack(imgs), cams, posed

    def _own_views(self, rows: Tensor, views: list, gens: dict[int, torch.Generator]):
        """A refit batch's views, each avatar's drawn from its own generator (batches do not change them)."""
        parts = [self._batch_views([int(k)], views, gens[int(k)]) for k in rows]
        return torch.cat([b[0] for b in parts]), [b[1][0] for b in parts], [b[2][0] for b in parts]

    def _step(self, params: list[Tensor], adams: list[_RowAdam], rows: Tensor, leaves: list[Tensor]) -> None:
        for p, adam, leaf in zip(params, adams, leaves):  # per-avatar gradients (the loss is a batch mean)
            adam.step(p, rows, _clip_rows(leaf.grad * len(rows), self.grad_clip))

    def fit_joint(
        self,
        avatar_ids: Sequence[str],
        get_views: ViewsFn,
        epochs: int = 10,
        batch_avatars: int = 8,
        refit_steps: int = 20,
        progress: bool = True,
    ) -> dict[str, float]:
        """Joint fit, then refit against the frozen decoder; writes every avatar's features and the decoder.

        Phase 1, ``epochs`` passes over the avatars in seeded random mini-batches of ``batch_avatars``: one step
        per batch updates the batch's features and the decoder. Its state (features, Adam moments, decoder and its
        optimizer, the epoch) is written atomically to ``fit_state.pt`` in the store after every epoch, so an
        interrupted run resumes at the last finished epoch and ends exactly as an uninterrupted one. Phase 2: the
        decoder is saved, frozen and switched to inference mode; every avatar not yet in the store is refitted for
        ``refit_steps`` steps (fresh Adam moments, its own view sampling and gradient clip) and written. Avatars
        added after phase 1 (a larger ``data.max_avatars``) start from the initialisation in phase 2 only.
        Returns each written avatar's final render loss."""
        from tqdm.auto import tqdm

        ids = list(avatar_ids)
        if not ids:
            return {}
        A, C, device = len(ids), self.store.channels, self.device
        state_path = self.store.root / FIT_STATE_FILE
        decoder_path = self.store.root / DECODER_FILE
        g0 = torch.Generator().manual_seed(self.seed)
        params = [(self.init_scale * torch.randn(A, C, r, r, generator=g0)).to(device) if r == max(self.levels)
                  else torch.zeros(A, C, r, r, device=device) for r in self.levels]
        adams = [_RowAdam(p, self.feature_lr) for p in params]
        epoch = 0
        if state_path.is_file():
            state = _load_state(state_path, device)
            old = list(state["ids"])
            if state["epoch"] < epochs and old != ids:
                raise ConfigError(
                    f"{state_path} holds an unfinished joint fit of {len(old)} other avatars than these {A}",
                    "resume with the dataset it was started on (data.max_avatars), or run `tera fit-teacher "
                    "--restart`")
            pos = {a: i for i, a in enumerate(old)}
            keep = torch.tensor([pos.get(a, -1) for a in ids])
            have = keep >= 0
            for p, adam, sp, sa in zip(params, adams, state["params"], state["adams"]):
                p[have] = sp[keep[have]]
                adam.m[have], adam.v[have], adam.t[have] = sa["m"][keep[have]], sa["v"][keep[have]], sa["t"][keep[have]]
            self.decoder.load_state_dict(state["decoder"])
            self._decoder_opt.load_state_dict(state["decoder_opt"])
            epoch = int(state["epoch"])
        elif decoder_path.is_file():
            epoch = epochs  # phase 1 finished and its state was cleared: only new avatars are left
        todo = [k for k, a in enumerate(ids) if not self.store.exists(a)]
        if not todo:
            return {}
        views = []
        for a in ids:
            images, cameras, *body = get_views(a)
            _check_views(images, cameras)
            b = body[0] if body else None
            views.append((images.to(device), cameras.to(device), PosedSurface(self.avatar, b) if b is not None else None))

        steps_per_epoch = math.ceil(A / batch_avatars)
        bar = tqdm(total=(epochs - epoch) * steps_per_epoch, desc="fit-teacher joint", disable=not progress
                   or epoch >= epochs)
        self.decoder.train()
        dec_params = list(self.decoder.parameters())
        for e in range(epoch, epochs):
            g = torch.Generator().manual_seed(self.seed * 100_003 + e + 1)
            order = torch.randperm(A, generator=g)
            for s in range(steps_per_epoch):
                rows = order[s * batch_avatars:(s + 1) * batch_avatars]
                if len(rows) < 2 < A:  # BatchNorm needs more than one avatar: fold a last single one in
                    rows = order[-2:]
                leaves = [p[rows].clone().requires_grad_(True) for p in params]
                images, cams, posed = self._batch_views(rows.tolist(), views, g)
                loss, per = self.batch_loss(self._features(leaves), images, cams, posed)
                self._decoder_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(dec_params, self.grad_clip)
                self._decoder_opt.step()
                self._step(params, adams, rows, leaves)
                bar.update()
                bar.set_postfix(epoch=e + 1, loss=f"{per.mean().item():.4f}")
            _save_state(state_path, {"format": FIT_FORMAT, "ids": ids, "epoch": e + 1, "levels": list(self.levels),
                                     "params": params, "adams": [a.state() for a in adams],
                                     "decoder": self.decoder.state_dict(),
                                     "decoder_opt": self._decoder_opt.state_dict()})
        bar.close()
        if not decoder_path.is_file() or epoch < epochs:
            save_tensors(decoder_path, self.decoder.state_dict(), {"channels": C, "phase": "joint"})
        return self.refit(ids, views, params, adams, todo, refit_steps, batch_avatars, progress)

    def refit(self, ids: Sequence[str], views: list, params: list[Tensor], adams: list[_RowAdam],
              todo: Sequence[int], steps: int, batch_avatars: int, progress: bool = True) -> dict[str, float]:
        """Phase 2 of :meth:`fit_joint`: features of avatars ``todo`` refitted to the frozen decoder and written."""
        from tqdm.auto import tqdm

        self.decoder.eval()
        for p in self.decoder.parameters():
            p.requires_grad_(False)
        done: dict[str, float] = {}
        bar = tqdm(total=len(todo), desc="fit-teacher refit", disable=not progress)
        try:
            for s in range(0, len(todo), batch_avatars):
                rows = torch.tensor(todo[s:s + batch_avatars])
                for adam in adams:
                    adam.reset(rows)
                gens = {int(k): torch.Generator().manual_seed(self.seed * 100_003 + 7_919 * (int(k) + 1)) for k in rows}

                for _ in range(steps):
                    leaves = [p[rows].clone().requires_grad_(True) for p in params]
                    loss, per = self.batch_loss(self._features(leaves), *self._own_views(rows, views, gens))
                    loss.backward()
                    self._step(params, adams, rows, leaves)
                with torch.no_grad():
                    feats = self._features([p[rows] for p in params])
                    _, per = self.batch_loss(feats, *self._own_views(rows, views, gens))  # of the written features
                for j, k in enumerate(rows.tolist()):
                    self.store.save(ids[k], feats[j], {"resolution": self.resolution, "mode": "joint",
                                                       "final_loss": float(per[j])})
                    done[ids[k]] = float(per[j])
                bar.update(len(rows))
        finally:
            bar.close()
            for p in self.decoder.parameters():
                p.requires_grad_(True)
        (self.store.root / FIT_STATE_FILE).unlink(missing_ok=True)  # every avatar written: the state is spent
        return done


def _check_views(images: Tensor, cameras: Cameras) -> None:
    if images.dim() != 4 or images.shape[-1] not in (3, 4) or images.shape[0] != len(cameras):
        raise InputError(f"views must be [V, H, W, 4] with one camera each, got {tuple(images.shape)} and "
                         f"{len(cameras)} cameras", "pass the avatar's RGBA renders and their Cameras")
    if (images.shape[2], images.shape[1]) != (cameras.width, cameras.height):
        raise InputError(f"images are {images.shape[2]}x{images.shape[1]} but cameras {cameras.width}x"
                         f"{cameras.height}", "resize the cameras with Cameras.resized")


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, device: torch.device) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CorruptFileError(f"cannot read the joint fit's state {path}: {exc}",
                               "delete it to start the joint fit again, or run `tera fit-teacher --restart`") from exc
    if not isinstance(state, dict) or state.get("format") != FIT_FORMAT:
        raise CorruptFileError(f"{path} is not a teacher fit state", "delete it, or run `tera fit-teacher --restart`")
    return state


def check_fit_settings(root: Path, signature: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
    """Refuse to add to features fitted under other settings (or unknown ones): one store, one set of settings.

    ``defaults`` (the signature of the schema's defaults) forgives settings added to the config since the fit."""
    path = root / FIT_SETTINGS_FILE
    fitted = root.is_dir() and any(p.suffix in (".safetensors", ".npy") for p in root.iterdir())
    hint = (f"run `tera fit-teacher --restart` to fit every avatar again (the old features are kept as "
            f"{root}.old-<time>), or restore the settings they were fitted with")
    if path.is_file():
        stored = load_json(path)
        diff = signature_diff(stored.get("signature", {}), signature, defaults) if stored.get("format") == FIT_FORMAT else [
            f"{path.name} is not a teacher-fit record"]
        if diff:
            raise ConfigError(f"the teacher features in {root} were fitted with other settings: " + "; ".join(diff), hint)
    elif fitted:
        raise ConfigError(f"{root} holds teacher features without a record of the settings they were fitted with "
                          f"({FIT_SETTINGS_FILE})", hint)


def fit_teacher(cfg: TeraConfig, progress: bool = True, create_dataset: bool = False,
                restart: bool = False) -> dict[str, Any]:
    """``tera fit-teacher``: teacher UV features for every dataset avatar (fitted, or IDOL's checked on disk);
    resumes where it stopped, under the same settings only (others are refused; ``restart`` moves the old
    features aside to ``<teacher>.old-<time>`` and fits every avatar again)."""
    start = time.perf_counter()
    t = cfg.teacher
    if t.source not in ("fit", "idol"):  # before the dataset is written (create_dataset)
        raise ConfigError(f"teacher.source={t.source!r}", "use 'fit' (own teacher) or 'idol' (features on disk)")
    standins = resolve_standins(cfg, ("body", "teacher") if t.source == "idol" else ("body", "perceptual", "teacher"))
    # (the paper's files or the allowed stand-ins, checked before any work)
    store = TeacherFeatureStore(run_paths(cfg).teacher, t.channels)
    device = train_device(cfg)
    ds = load_dataset(cfg, create=create_dataset)
    if t.source == "idol":
        missing = [a for a in ds.ids if not store.exists(a)]
        if missing:
            raise MissingFileError(
                f"IDOL features missing for {len(missing)} of {len(ds)} avatars in {store.root} (first: {missing[0]})",
                f"export IDOL's UV features as {store.root}/<avatar_id>.safetensors (key 'uv_features', "
                f"[{t.channels}, H, W]) or set teacher.source=fit")
        return {"source": "idol", "avatars": len(ds), "seconds": time.perf_counter() - start}
    with run_lock(store.root):  # one fit per folder
        if restart:
            move_aside(store.root)
        signature = stage_signature(cfg, "teacher")
        check_fit_settings(store.root, signature, stage_signature(TeraConfig(), "teacher"))
        save_json(store.root / FIT_SETTINGS_FILE, {"format": FIT_FORMAT, "signature": signature})
        save_json(store.root / "standins.json", standins.settings())
        return _fit(cfg, store, ds, progress, start, device)


def _fit(cfg: TeraConfig, store: TeacherFeatureStore, ds: TeraDataset, progress: bool, start: float,
         device: torch.device) -> dict[str, Any]:
    t = cfg.teacher
    if t.mode not in ("joint", "sequential"):
        raise ConfigError(f"teacher.mode={t.mode!r}", "use 'joint' (mini-batches over epochs, then a refit with the "
                          "decoder frozen) or 'sequential' (the original one-avatar-after-another fitter)")
    avatar = build_avatar(cfg, device)  # the fitter runs where the avatar's buffers are
    fitter = TeacherFitter(
        avatar, store, feature_resolution=t.resolution, decoder=uv_decoder(cfg), lr=t.lr, feature_lr=t.feature_lr,
        lambda_mse=t.lambda_mse, lambda_lpips=t.lambda_lpips, lambda_offset=t.lambda_offset,
        perceptual=perceptual(cfg), views_per_step=t.views_per_step, grad_clip=t.grad_clip,
        background=tuple(cfg.data.background), seed=cfg.seed, init_scale=t.init_scale, lambda_l2=t.lambda_l2,
        lambda_tv=t.lambda_tv, levels=list(t.feature_levels) or None)
    train_v = training_views(ds.num_views, list(cfg.data.eval_views))
    index = {a: i for i, a in enumerate(ds.ids)}

    def views(avatar_id: str) -> tuple[Tensor, Cameras, BodyOutput]:
        k = index[avatar_id]
        images, cams = ds.views(k, train_v)
        return images, cams, ds.body_output(k, avatar.body)

    todo = [a for a in ds.ids if not store.exists(a)]
    fit_start = time.perf_counter()
    if t.mode == "joint":
        if t.epochs < 0 or t.refit_steps < 0 or t.batch_avatars < 1:
            raise ConfigError(f"teacher.epochs={t.epochs}, refit_steps={t.refit_steps}, batch_avatars={t.batch_avatars}",
                              "use epochs >= 0, refit_steps >= 0 and batch_avatars >= 1")
        losses = fitter.fit_joint(ds.ids, views, t.epochs, t.batch_avatars, t.refit_steps, progress=progress)
    else:
        losses = fitter.fit(ds.ids, views, t.steps, progress=progress)
    fit_seconds = time.perf_counter() - fit_start
    summary: dict[str, Any] = {
        "source": "fit", "mode": t.mode, "avatars": len(ds), "fitted": len(todo),
        "mean_final_loss": float(np.mean(list(losses.values()))) if losses else None,
        "seconds_per_avatar": fit_seconds / len(todo) if todo else None}
    if todo or not (store.root / CONSISTENCY_FILE).is_file():
        consistency = measure_consistency(cfg, ds, store, avatar, fitter.decoder)
    else:
        consistency = load_json(store.root / CONSISTENCY_FILE)
    summary["consistency"] = {k: v for k, v in consistency.items() if k != "per_avatar"}
    summary["seconds"] = time.perf_counter() - start
    return summary


# --------------------------------------------------------------------------------------------------
# Cross-avatar consistency of the fitted features
# --------------------------------------------------------------------------------------------------


def measure_consistency(cfg: TeraConfig, ds: TeraDataset, store: TeacherFeatureStore, avatar: UVGaussianAvatar,
                        decoder: UVDecoder, quantile: float = 0.25) -> dict[str, Any]:
    """How well every avatar's stored features reproduce its views through the FINAL decoder (inference mode),
    in fit order (the dataset's order): PSNR (dB) on the fitted views and on the held-out ``data.eval_views``, the
    mean over the first and the last ``quantile`` of the avatars and their gap (``first - last``). A teacher whose
    decoder drifted while it fitted avatars one after another decodes its early avatars worse (a negative gap);
    one whose features all mean the same through the final decoder has a gap near zero. Written to
    ``<teacher>/consistency.json``."""
    from avatar_core.metrics import psnr

    device = avatar.template_points.device
    train_v = training_views(ds.num_views, list(cfg.data.eval_views))
    held = [v for v in cfg.data.eval_views if 0 <= v < ds.num_views]
    bg = tuple(cfg.data.background)
    was_training = decoder.training
    decoder.eval()
    rows = []
    with torch.no_grad():
        for k, a in enumerate(ds.ids):
            if not store.exists(a):
                continue
            g = avatar(decoder(store.load(a)[None].to(device)))
            body = ds.body_output(k, avatar.body)
            row: dict[str, Any] = {"id": a}
            for name, which in (("psnr", train_v), ("psnr_heldout", held)):
                if which:
                    images, cams = ds.views(k, which)
                    pred = posed_render(avatar, g, body, cams.to(device), bg)[0]
                    row[name] = float(psnr(pred.clamp(0, 1), composite(images.to(pred), bg)).mean())
            rows.append(row)
    decoder.train(was_training)
    if not rows:
        raise MissingFileError(f"no fitted teacher features in {store.root}", "run `tera fit-teacher` first")
    n = max(1, int(round(quantile * len(rows))))
    out: dict[str, Any] = {"mode": cfg.teacher.mode, "avatars": len(rows), "quantile": n}
    for key in ("psnr", "psnr_heldout"):
        vals = [r[key] for r in rows if key in r]
        if vals:
            first, last = float(np.mean(vals[:n])), float(np.mean(vals[-n:]))
            out.update({f"{key}_mean": float(np.mean(vals)), f"{key}_std": float(np.std(vals)),
                        f"{key}_first": first, f"{key}_last": last, f"{key}_gap": first - last})
    out["per_avatar"] = rows
    save_json(store.root / CONSISTENCY_FILE, out)
    return out


def teacher_consistency(cfg: TeraConfig, recompute: bool = False) -> dict[str, Any]:
    """The run's teacher consistency (:func:`measure_consistency`): ``<teacher>/consistency.json`` as
    ``tera fit-teacher`` wrote it, measured now from the store and its decoder when missing or ``recompute``."""
    store = TeacherFeatureStore(run_paths(cfg).teacher, cfg.teacher.channels)
    path = store.root / CONSISTENCY_FILE
    if path.is_file() and not recompute:
        return load_json(path)
    if cfg.teacher.source != "fit":
        raise ConfigError("teacher consistency is measured on the fitted teacher (teacher.source=fit)",
                          "IDOL's features come without the decoder they were trained with")
    decoder_path = store.root / DECODER_FILE
    if not decoder_path.is_file():
        raise MissingFileError(f"no fitted teacher decoder at {decoder_path}", "run `tera fit-teacher` first")
    device = train_device(cfg)
    avatar = build_avatar(cfg, device)
    decoder = uv_decoder(cfg).to(device)
    decoder.load_state_dict(load_tensors(decoder_path, device=device)[0])
    return measure_consistency(cfg, load_dataset(cfg), store, avatar, decoder)


def format_consistency(c: dict[str, Any]) -> str:
    """A small table of :func:`teacher_consistency`: PSNR through the final decoder, first vs last fitted."""
    lines = [f"teacher consistency ({c.get('mode', '?')}, {c['avatars']} avatars; first / last = "
             f"{c['quantile']} avatars in fit order)",
             f"{'views':<10}{'mean':>8}{'std':>8}{'first':>8}{'last':>8}{'gap':>8}"]
    for key, name in (("psnr", "fitted"), ("psnr_heldout", "held-out")):
        if f"{key}_mean" in c:
            lines.append(f"{name:<10}" + "".join(f"{c[f'{key}_{s}']:>8.2f}" for s in ("mean", "std", "first", "last",
                                                                                    "gap")))
    return "\n".join(lines)


__all__ = ["CONSISTENCY_FILE", "DECODER_FILE", "FEATURE_CHANNELS", "FEATURE_KEY", "FIT_SETTINGS_FILE",
           "FIT_STATE_FILE", "PosedSurface", "TeacherFeatureStore", "TeacherFitter", "check_fit_settings",
           "feature_mask", "feature_regulariser", "fit_teacher", "format_consistency", "measure_consistency",
           "teacher_consistency"]
