"""Teacher UV features for TeRA's distilled latent space: IDOL's, read from disk, or the project's fitted teacher.

On-disk layout (one file per avatar, in one folder)::

    FEATURES_DIR/
        <avatar_id>.safetensors   key "uv_features": [32, H, W], float16 / bfloat16 / float32
        <avatar_id>.npy           or a NumPy array [32, H, W] of the same meaning
        decoder.safetensors       (fitted teacher only) its UV decoder, for resuming

IDOL (Zhuang et al. 2025, github.com/yiyuzhuang/IDOL @ 69b6df7) writes 32 x 1536 x 1536 tanh-bounded UV features from its Sapiens encoder; export them
per avatar under the avatar's id in this layout. Rows follow the kernel's UV convention (row 0 is v = 1, the top
of the UV image). Without IDOL, :class:`TeacherFitter` produces the same layout by auto-decoding: per-avatar UV
feature maps optimised jointly with an IDOL-style UV decoder (:class:`tera.uv_gaussians.UVDecoder`) to reproduce
the avatar's multi-view renders with IDOL's losses (lambda_mse 20, lambda_lpips 10, lambda_offset 1). The
dataset's views show each avatar in its own shape and pose, so each fit takes that avatar's posed body: the
canonical Gaussians are skinned onto it before rendering. :func:`fit_teacher` is the ``tera fit-teacher`` stage.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from avatar_core.body import BodyOutput
from avatar_core.cameras import Cameras
from avatar_core.errors import ConfigError, CorruptFileError, InputError, MissingFileError
from avatar_core.io import load_json, load_tensors, save_json, save_tensors
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
from tera.uv_gaussians import UVDecoder, UVGaussianAvatar, composite

FEATURE_KEY = "uv_features"
FEATURE_CHANNELS = 32
DECODER_FILE = "decoder.safetensors"
#: The settings the fitted teacher's features were made under (written before the first avatar is fitted).
FIT_SETTINGS_FILE = "fit_settings.json"
FIT_FORMAT = "tera.teacher_fit/1"

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


class TeacherFitter:
    """The project's own teacher: per-avatar UV features + a shared IDOL-style UV decoder, fitted to renders.

    Features are ``tanh`` of free parameters (IDOL's encoder ends in tanh, so both teachers share a range).
    Each avatar is fitted for ``steps`` iterations on ``views_per_step`` random views (IDOL trains on 5), with
    IDOL's loss weights, then written to the store; the decoder is saved after every avatar, so an interrupted
    run resumes where it stopped (avatars already in the store are skipped).

    Args:
        avatar: the UV Gaussian avatar (UV points and body) that turns attribute maps into Gaussians.
        store: where features (and the decoder) are written.
        feature_resolution: UV feature map size (IDOL 1536; tiny 32-64; it must be a multiple of the latent's).
        decoder: the UV decoder to fit; a fresh :class:`UVDecoder` when None.
        lr: decoder learning rate (IDOL 5e-4).
        feature_lr: learning rate of the per-avatar feature parameters (auto-decoding needs a higher one; 1e-2).
        lambda_mse, lambda_lpips, lambda_offset: IDOL's loss weights (20, 10, 1).
        perceptual: the LPIPS stand-in; None builds :class:`tera.distill.PerceptualLoss`.
        views_per_step: views rendered per iteration (IDOL 5).
        grad_clip: gradient-norm clip (IDOL 10).
        background: colour behind the avatar, for renders and RGBA targets.
        seed: feature initialisation and view sampling.
        init_scale: standard deviation of the features' free parameters at the start (0.1). 0 starts every
            avatar at zero, so texels no Gaussian reads stay 0 instead of keeping random values a latent would carry.
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
        self._decoder_opt = torch.optim.Adam(self.decoder.parameters(), lr=lr)
        decoder_path = store.root / DECODER_FILE
        if decoder_path.is_file():  # resume: continue with the decoder fitted so far
            tensors, _ = load_tensors(decoder_path, device=device)
            self.decoder.load_state_dict(tensors)

    def loss(self, features: Tensor, images: Tensor, cameras: Cameras,
             body: BodyOutput | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """IDOL's render loss of one avatar's features ``[C, R, R]`` against RGBA views ``[V, H, W, 4]``, the
        Gaussians skinned onto ``body`` (the posed body the views show; None: canonical)."""
        maps = self.decoder(features[None])
        g = self.avatar(maps)
        pred = posed_render(self.avatar, g, body, cameras, self.background)
        target = composite(images, self.background).to(pred)[None]
        return render_loss(pred, target, g.offsets, self.perceptual, *self.lambdas, sum_views=False)

    def fit_avatar(self, images: Tensor, cameras: Cameras, steps: int, seed: int | None = None,
                   body: BodyOutput | None = None) -> tuple[Tensor, list[float]]:
        """Fit one avatar's features (and update the shared decoder): ``(features [C, R, R], losses per step)``.

        ``body`` is the posed body the views show (the dataset's body parameters); None renders canonically."""
        if images.dim() != 4 or images.shape[-1] not in (3, 4) or images.shape[0] != len(cameras):
            raise InputError(f"views must be [V, H, W, 4] with one camera each, got {tuple(images.shape)} and "
                             f"{len(cameras)} cameras", "pass the avatar's RGBA renders and their Cameras")
        if (images.shape[2], images.shape[1]) != (cameras.width, cameras.height):
            raise InputError(f"images are {images.shape[2]}x{images.shape[1]} but cameras {cameras.width}x"
                             f"{cameras.height}", "resize the cameras with Cameras.resized")
        g = torch.Generator().manual_seed(self.seed if seed is None else seed)
        C, R = self.store.channels, self.resolution
        device = self.avatar.template_points.device
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
        """Fit every avatar not yet in the store (all with ``overwrite``); final loss per fitted avatar.

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
    avatar = build_avatar(cfg, device)  # the fitter runs where the avatar's buffers are
    fitter = TeacherFitter(
        avatar, store, feature_resolution=t.resolution, decoder=uv_decoder(cfg), lr=t.lr, feature_lr=t.feature_lr,
        lambda_mse=t.lambda_mse, lambda_lpips=t.lambda_lpips, lambda_offset=t.lambda_offset,
        perceptual=perceptual(cfg), views_per_step=t.views_per_step, grad_clip=t.grad_clip,
        background=tuple(cfg.data.background), seed=cfg.seed, init_scale=t.init_scale)
    train_v = training_views(ds.num_views, list(cfg.data.eval_views))
    index = {a: i for i, a in enumerate(ds.ids)}

    def views(avatar_id: str) -> tuple[Tensor, Cameras, BodyOutput]:
        k = index[avatar_id]
        images, cams = ds.views(k, train_v)
        return images, cams, ds.body_output(k, avatar.body)

    todo = [a for a in ds.ids if not store.exists(a)]
    losses = fitter.fit(ds.ids, views, t.steps, progress=progress)
    return {"source": "fit", "avatars": len(ds), "fitted": len(todo),
            "mean_final_loss": float(np.mean(list(losses.values()))) if losses else None,
            "seconds": time.perf_counter() - start}


__all__ = ["DECODER_FILE", "FEATURE_CHANNELS", "FEATURE_KEY", "FIT_SETTINGS_FILE", "TeacherFeatureStore",
           "TeacherFitter", "check_fit_settings", "fit_teacher"]
