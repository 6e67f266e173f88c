"""The project's fitted teacher (:class:`TeacherFitter`): per-avatar UV features auto-decoded jointly with an
IDOL-style UV decoder against the dataset's posed multi-view renders, in mini-batches over epochs (resumable), then
refitted against the frozen decoder; features held at zero outside the UV charts, with an L2 / smoothness prior.
:mod:`tera.teacher` runs it as the ``tera fit-teacher`` stage."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatar_core.body import BodyOutput
from avatar_core.body.model import blend_transforms
from avatar_core.cameras import Cameras
from avatar_core.errors import ConfigError, CorruptFileError, InputError
from avatar_core.io import atomic_write, load_tensors, save_tensors
from avatar_core.rotations import matrix_to_quaternion, nearest_rotation, quaternion_multiply
from tera.distill import PerceptualLoss, render_loss
from tera.runs import (
    posed_render,
)
from tera.teacher_store import (
    DECODER_FILE,
    FIT_FORMAT,
    FIT_STATE_FILE,
    TeacherFeatureStore,
    ViewsFn,
)
from tera.uv_gaussians import GaussianBatch, UVDecoder, UVGaussianAvatar, composite, lit, resize_mask


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
            self.normals = avatar.surface_normals(body.vertices)[0]  # [N, 3], for lit renders

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
        random_background: in the joint fit and its refit, every view is composited over its own random colour
            (the render and its RGBA target alike). Over one fixed colour, a Gaussian that spills past the
            silhouette lowers its loss by taking the background's colour, which leaves background-coloured
            speckles along every silhouette of the texture; over a colour that changes, only the coverage can.
        ambient: light every render with the dataset's light rig of this ambient term (``data.lit_renders``;
            :func:`tera.uv_gaussians.lit`), so the fitted colours are an albedo; None renders unlit.
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
        random_background: bool = False,
        ambient: float | None = None,
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
        self.random_background = bool(random_background)
        self.ambient = None if ambient is None else float(ambient)
        with torch.no_grad():  # the canonical body's normals, for views of unposed avatars
            self._rest_normals = avatar.surface_normals(avatar.body.template_vertices[None].to(device))[0]
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
        pred = posed_render(self.avatar, g, body, cameras, self.background, self.ambient)
        target = composite(images, self.background).to(pred)[None]
        return render_loss(pred, target, g.offsets, self.perceptual, *self.lambdas, sum_views=False)

    def batch_loss(self, features: Tensor, images: Tensor, cameras: Sequence[Cameras],
                   posed: Sequence[PosedSurface | None], backgrounds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Render loss + prior of B avatars' features ``[B, C, R, R]`` against their views ``[B, V, H, W, 4]``:
        ``(mean over the batch, per-avatar render loss [B] detached)``. ``backgrounds`` ``[B, V, 3]``: one colour
        behind each view, for the render and its RGBA target alike (None: the fitter's background)."""
        g = self.avatar(self.decoder(features))
        parts = [p.pose(g[b]) if p is not None else g[b] for b, p in enumerate(posed)]
        g = GaussianBatch(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(GaussianBatch)))
        if self.ambient is not None:  # each avatar lit on its own body, in each of its views: colours [B, V, N, 3]
            colors = torch.stack([
                lit(g[b], (p.normals if p is not None else self._rest_normals)[None], cam.viewmats, self.ambient).colors[0]
                for b, (p, cam) in enumerate(zip(posed, cameras))])
            g = GaussianBatch(g.means, g.quats, g.scales, g.opacities, colors, g.offsets)
        if backgrounds is None:
            pred, _ = self.avatar.render(g, list(cameras), self.background)
            target = composite(images, self.background).to(pred)
        else:  # premultiplied render over black, then each view's own colour behind it
            rgb, alpha = self.avatar.render(g, list(cameras), (0.0, 0.0, 0.0))
            bg = backgrounds.to(rgb)[:, :, None, None, :]  # [B, V, 1, 1, 3]
            pred = rgb + (1.0 - alpha) * bg
            a = images[..., 3:].to(rgb) if images.shape[-1] == 4 else torch.ones_like(alpha)
            target = images[..., :3].to(rgb) * a + bg * (1.0 - a)
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

    def _backgrounds(self, images: Tensor, gens: Sequence[torch.Generator]) -> Tensor | None:
        """Random colours ``[B, V, 3]`` behind a batch's views ``[B, V, H, W, 4]`` (``random_background``; one
        generator for the batch, or one per avatar), else None (the fixed background)."""
        if not self.random_background:
            return None
        B, V = images.shape[:2]
        if len(gens) == 1:
            return torch.rand(B, V, 3, generator=gens[0])
        return torch.stack([torch.rand(V, 3, generator=gen) for gen in gens])

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
                loss, per = self.batch_loss(self._features(leaves), images, cams, posed,
                                            self._backgrounds(images, [g]))
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
                    images, cams, posed = self._own_views(rows, views, gens)
                    loss, per = self.batch_loss(self._features(leaves), images, cams, posed,
                                                self._backgrounds(images, [gens[int(k)] for k in rows]))
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


__all__ = ["PosedSurface", "TeacherFitter", "feature_mask", "feature_regulariser"]
