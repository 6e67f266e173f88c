"""Cascaded triplane diffusion (Sec. 3.2, Eqs. 4-6, App. A): a base model and an upsample model.

- :class:`BaseDiffusion`: low-resolution roll-outs, eps-prediction with learned variance (``learned_range``,
  Nichol & Dhariwal 2021) trained with the hybrid loss L_simple + lambda L_vlb (lambda = 0.001), the
  ``rodin_cosine_light`` schedule (:data:`RODINHD_SCHEDULES`) over 1000 steps, 20% condition dropout, classifier-free guidance (1.3) and a
  respaced 10-step DDPM sampler.
- :class:`UpsampleDiffusion`: high-resolution roll-outs, x0-prediction, the ``rodin_sigmoid`` schedule over 100
  steps, conditioned on the bilinearly upsampled low-res triplane with conditional noise augmentation, plus the
  image-level loss of Eq. 6: patches rendered from the predicted triplane against the ground-truth view images.
- Both hold a :class:`rodinhd.normalizer.TriplaneNormalizer` as a submodule, so its statistics are saved in the
  model's state dict.

Both models take and return *raw* (un-normalised) roll-outs [B, C, H, 3W]; normalisation happens inside.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatar_core.diffusion import (
    NoiseSchedule,
    alpha_sigma,
    cfg,
    ddpm_step,
    expand_to,
    get_schedule,
    model_log_variance,
    posterior_mean_variance,
    q_sample,
    respace,
    space_timesteps,
    x0_from_eps,
)
from avatar_core.errors import ConfigError, InputError
from rodinhd.augment import AUG_MODES, degrade_rollout
from rodinhd.conditioning import PortraitTokenizer, drop_condition, null_features
from rodinhd.image_loss import StructuralLoss, body_patch_corners, composite, crop_patches
from rodinhd.normalizer import TriplaneNormalizer
from rodinhd.unet import TriplaneUNet, planes_to_rollout, rollout_to_planes

#: render_patch(triplane [B, C, H, 3W] raw roll-out, cameras (one per triplane), rows [B, P] long,
#: cols [B, P] long) -> rgb [B, P, P, 3] in [0, 1]: the pixels (rows x cols) of each camera's image.
RenderPatch = Callable[[Tensor, object, Tensor, Tensor], Tensor]


#: RodinHD's schedule names (its code's presets, App. A) -> the kernel's schedule families and their parameters:
#: base model "Cosine(start=0.2, end=1, tau=3)" (the code's ``cosine_light``), the code's ``cosine`` (tau=5), and
#: the upsample model's "Sigmoid(start=0, end=3, tau=0.1)". Other names go to the kernel unchanged.
RODINHD_SCHEDULES: dict[str, tuple[str, dict[str, float]]] = {
    "rodin_cosine_light": ("cosine_power", {"start": 0.2, "end": 1.0, "tau": 3.0}),
    "rodin_cosine": ("cosine_power", {"start": 0.2, "end": 1.0, "tau": 5.0}),
    "rodin_sigmoid": ("sigmoid", {"start": 0.0, "end": 3.0, "tau": 0.1}),
}


def rodinhd_schedule(name: str) -> NoiseSchedule:
    """A noise schedule by RodinHD's name (:data:`RODINHD_SCHEDULES`) or any kernel name (``cosine``, ...)."""
    family, params = RODINHD_SCHEDULES.get(str(name).strip().lower(), (name, {}))
    return get_schedule(family, **params)


# -- the variational bound's terms (improved-diffusion, Nichol & Dhariwal 2021, Sec. 2-3) --------------------------

def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(
    x: Tensor,  # [...] data on the bin centres of [low, high]
    means: Tensor,  # [...]
    log_scales: Tensor,  # [...] log standard deviations
    low: float = -1.0,
    high: float = 1.0,
    num_bins: int = 256,
) -> Tensor:  # [...] log-probability in nats
    """log P(x) of a Gaussian integrated over x's bin (Ho et al. 2020, Eq. 13); the outer bins extend to +-inf.

    As improved-diffusion: ``num_bins`` bins of width (high - low) / (num_bins - 1) centred on the data grid;
    values below low + half a bin take the lower tail, above high - half a bin the upper tail. The exact normal
    CDF (``torch.special.ndtr``) is used instead of the tanh approximation.
    """
    half = 0.5 * (high - low) / (num_bins - 1)
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_std * (centred + half))
    cdf_min = torch.special.ndtr(inv_std * (centred - half))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < low + half, log_cdf_plus, torch.where(x > high - half, log_one_minus_cdf_min, log_delta))


def mean_flat(x: Tensor) -> Tensor:  # [B, ...] -> [B]
    """Mean over all but the batch axis."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def upsample_rollout(x: Tensor, size: int) -> Tensor:  # [B, C, h, 3h] -> [B, C, size, 3 size]
    """Bilinear upsampling plane by plane, so no plane borrows texels from its neighbour in the roll-out."""
    p = rollout_to_planes(x)
    B, _, C, h, w = p.shape
    up = F.interpolate(p.reshape(B * 3, C, h, w), size=(size, size), mode="bilinear", align_corners=False)
    return planes_to_rollout(up.reshape(B, 3, C, size, size))


def _randn(shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Gaussian noise drawn on the CPU generator (reproducible on any device), moved to like's device."""
    return torch.randn(tuple(shape), generator=generator).to(device=like.device, dtype=like.dtype)


class _Conditioned(nn.Module):
    """Shared parts: schedule buffers, portrait tokens per resolution, condition dropout, guided model calls."""

    def __init__(self, unet: TriplaneUNet, tokenizer: PortraitTokenizer | None, context_resolutions: Sequence[int],
                 num_steps: int, schedule: str, cond_drop_prob: float, guidance_scale: float, sample_steps: int):
        super().__init__()
        if tokenizer is not None and not unet.context_dim:
            raise ConfigError("a portrait tokenizer was given to a UNet built without cross-attention",
                              "build the UNet with context_dim = tokenizer.token_dim")
        if tokenizer is not None and tokenizer.token_dim != unet.context_dim:
            raise ConfigError(f"tokenizer width {tokenizer.token_dim} differs from the UNet's context_dim "
                              f"{unet.context_dim}", "use the same token width in both")
        self.unet = unet
        self.tokenizer = tokenizer
        self.context_resolutions = tuple(int(r) for r in context_resolutions)
        unread = sorted(set(self.context_resolutions) - set(getattr(unet, "context_resolutions", ())))
        if tokenizer is not None and unread:
            raise ConfigError(f"portrait tokens for resolution(s) {unread} would be read by no cross-attention block",
                              f"the UNet cross-attends at {sorted(unet.context_resolutions)} (its middle block "
                              f"is at {getattr(unet, 'middle_resolution', '?')}); make context_resolutions match")
        self.num_steps = int(num_steps)
        self.schedule_name = schedule
        self.cond_drop_prob = float(cond_drop_prob)
        self.guidance_scale = float(guidance_scale)
        self.sample_steps = int(sample_steps)
        self.register_buffer("alphas_cumprod", rodinhd_schedule(schedule).alphas_cumprod(self.num_steps),
                             persistent=False)
        self.normalizer = TriplaneNormalizer(unet.in_channels)

    def context(self, features: Sequence[Tensor] | None) -> dict[int, Tensor] | None:
        """Portrait tokens keyed by the UNet resolution that reads them (scale i -> context_resolutions[i])."""
        if self.tokenizer is None or features is None:
            return None
        return dict(zip(self.context_resolutions, self.tokenizer(features)))

    def forward(self, *args, **kwargs) -> dict[str, Tensor]:
        """The training loss (``loss``): calling the module lets Accelerate/DDP wrappers synchronise gradients."""
        return self.loss(*args, **kwargs)

    def _train_features(self, features: Sequence[Tensor] | None, generator,
                        batch_size: int, device) -> list[Tensor] | None:
        if self.tokenizer is None:
            return None
        if features is None:  # unconditional data on a conditional model: the null condition, every parameter used
            return self.tokenizer.null_features(batch_size, device)
        if self.training and self.cond_drop_prob > 0:
            features, _ = drop_condition(features, self.cond_drop_prob, generator)
        return list(features)

    def _sample_features(self, features, batch_size: int, device) -> tuple[list[Tensor] | None, bool]:
        """(features, guided?): no portrait on a conditional model means the null condition, unguided."""
        if self.tokenizer is None:
            return None, False
        if features is None:
            return self.tokenizer.null_features(batch_size, device), False
        return list(features), True

    def guided(self, x: Tensor, t: Tensor, features: list[Tensor] | None, scale: float, guide: bool,
               **extra) -> Tensor:  # [B, out, H, 3W]
        """The UNet output with classifier-free guidance (Ho & Salimans 2022) on the prediction channels.

        The conditional and null-condition (ones) passes run as one batch; guidance applies to the first
        ``in_channels`` output channels (eps or x0); a learned-variance half is taken from the conditional pass.
        """
        if not guide or scale == 1.0:
            return self.unet(x, t, self.context(features), **extra)
        both = [torch.cat([f, o], dim=0) for f, o in zip(features, null_features(features))]
        extra2 = {k: (torch.cat([v, v], dim=0) if isinstance(v, Tensor) and v.ndim else v) for k, v in extra.items()}
        out = self.unet(torch.cat([x, x]), torch.cat([t, t]), self.context(both), **extra2)
        cond, uncond = out.chunk(2, dim=0)
        c = self.unet.in_channels
        return torch.cat([cfg(cond[:, :c], uncond[:, :c], scale), cond[:, c:]], dim=1)


class BaseDiffusion(_Conditioned):
    """The base model: portrait -> low-res triplane roll-out (Sec. 3.2, Eq. 4 + L_vlb; App. A).

    Args (paper values):
        unet: a :class:`TriplaneUNet` with ``out_channels = 2 * in_channels`` (learned variance).
        tokenizer: a :class:`PortraitTokenizer` (None: an unconditional model).
        context_resolutions: the UNet resolution fed by each portrait scale ((32, 16, 8)).
        num_steps: training chain length (1000). schedule: ``rodin_cosine_light`` (cosine(0.2, 1, 3)).
        vlb_weight: lambda of L_hybrid = L_simple + lambda L_vlb (0.001, Nichol & Dhariwal 2021).
        cond_drop_prob: condition dropout (0.2). guidance_scale: CFG at sampling (1.3).
        sample_steps: respaced DDPM steps at sampling (10).
    """

    def __init__(self, unet: TriplaneUNet, tokenizer: PortraitTokenizer | None = None,
                 context_resolutions: Sequence[int] = (32, 16, 8), num_steps: int = 1000,
                 schedule: str = "rodin_cosine_light", vlb_weight: float = 1e-3, cond_drop_prob: float = 0.2,
                 guidance_scale: float = 1.3, sample_steps: int = 10):
        super().__init__(unet, tokenizer, context_resolutions, num_steps, schedule, cond_drop_prob,
                         guidance_scale, sample_steps)
        if unet.out_channels != 2 * unet.in_channels:
            raise ConfigError(f"the base UNet must output 2 x {unet.in_channels} channels (eps and variance), "
                              f"got {unet.out_channels}", "build it with out_channels = 2 * in_channels")
        self.vlb_weight = float(vlb_weight)

    def vlb_terms(
        self,
        x0: Tensor,  # [B, C, H, 3W] normalised clean roll-out
        x_t: Tensor,  # [B, C, H, 3W]
        t: Tensor,  # [B] long
        eps: Tensor,  # [B, C, H, 3W] predicted noise (pass it detached for the hybrid loss)
        var_values: Tensor,  # [B, C, H, 3W] the variance output in [-1, 1]
        alphas_cumprod: Tensor | None = None,  # [T] defaults to the training chain
    ) -> Tensor:  # [B] in bits per dimension
        """L_t of the bound: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0, the decoder NLL at t = 0."""
        ac = self.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
        true_mean, _, true_logvar = posterior_mean_variance(x0, x_t, t, ac)
        alpha, sigma = alpha_sigma(t, ac)
        x0_pred = x0_from_eps(x_t, eps, alpha.to(x_t.dtype), sigma.to(x_t.dtype))
        model_mean, _, _ = posterior_mean_variance(x0_pred, x_t, t, ac)
        model_logvar = model_log_variance(t, ac, "learned_range", var_values).to(x_t.dtype)
        kl = mean_flat(normal_kl(true_mean, expand_to(true_logvar.to(x_t.dtype), x_t), model_mean, model_logvar))
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def loss(self, triplanes: Tensor, features: Sequence[Tensor] | None = None,
             generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Hybrid loss on raw low-res roll-outs [B, C, H, 3W] and portrait features (None: unconditional).

        loss = mean ||eps_hat - eps||^2 + vlb_weight * T * L_t, with t uniform, so the second term is an unbiased
        estimate of lambda L_vlb (improved-diffusion's "rescaled MSE" hybrid); the VLB sees the predicted mean
        through a stop-gradient, so it trains only the variance (Nichol & Dhariwal 2021, Sec. 3.1).
        """
        x0 = self.normalizer.normalize(triplanes)
        B = x0.shape[0]
        t = torch.randint(0, self.num_steps, (B,), generator=generator).to(x0.device)
        noise = _randn(x0.shape, generator, x0)
        x_t = q_sample(x0, t, noise, self.alphas_cumprod)
        feats = self._train_features(features, generator, B, x0.device)
        out = self.unet(x_t, t, self.context(feats))
        eps, var_values = out.chunk(2, dim=1)
        mse = mean_flat((eps - noise) ** 2)
        vb = self.vlb_terms(x0, x_t, t, eps.detach(), var_values)
        loss = mse + self.vlb_weight * self.num_steps * vb
        return {"loss": loss.mean(), "mse": mse.mean(), "vlb": vb.mean(), "t": t}

    @torch.no_grad()
    def sample(self, features: Sequence[Tensor] | None = None, batch_size: int | None = None,
               steps: int | None = None, guidance_scale: float | None = None,
               generator: torch.Generator | None = None, noise: Tensor | None = None,
               clip_denoised: bool = True) -> Tensor:
        """Respaced ancestral DDPM with learned variance and CFG; returns raw roll-outs [B, C, H, 3W].

        features: portrait features (None: unconditional generation with the null condition); batch_size when
        there are none; steps (10), guidance_scale (1.3), generator, noise (the starting x_T), clip_denoised (clamp
        every x0 prediction to the training data's range, :meth:`TriplaneNormalizer.clip`; True as
        improved-diffusion's sampler does for images).
        """
        steps = steps or self.sample_steps
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        B = features[0].shape[0] if features is not None else (batch_size or 1)
        device = self.alphas_cumprod.device
        size = self.unet.image_size
        shape = (B, self.unet.in_channels, size, 3 * size)
        x = noise.to(device) if noise is not None else torch.randn(shape, generator=generator).to(device)
        feats, guide = self._sample_features(features, B, device)
        chain = respace(self.alphas_cumprod, space_timesteps(self.num_steps, [steps]))
        ac = chain.alphas_cumprod.to(device)
        for k in reversed(range(len(chain.timesteps))):
            t = chain.timesteps[k].to(device).expand(B)
            out = self.guided(x, t, feats, scale, guide)
            eps, var_values = out.chunk(2, dim=1)
            a, s = alpha_sigma(k, ac)
            x0 = x0_from_eps(x, eps, float(a), float(s))
            if clip_denoised:
                x0 = self.normalizer.clip(x0)
            x = ddpm_step(x0, x, k, ac, torch.randn(shape, generator=generator).to(x), "learned_range",
                          var_values).to(x.dtype)
        return self.normalizer.denormalize(x)


class UpsampleDiffusion(_Conditioned):
    """The upsample model: low-res roll-out + portrait -> high-res roll-out (Sec. 3.2, Eqs. 5-6; App. A).

    Args (paper values; ours where the paper gives none):
        unet: a :class:`TriplaneUNet` with ``cond_channels = in_channels`` (the low-res triplane is concatenated),
            ``out_channels = in_channels`` (x0), no self-attention, cross-attention in the middle block only, and
            ``aug_level_embedding=True`` so it knows how noisy its condition is.
        tokenizer: a :class:`PortraitTokenizer` over the H/2 features only (the 128^2 map at 256^2 portraits).
        context_resolutions: the UNet resolution reading the tokens: its middle resolution ((128,)).
        num_steps: 100. schedule: ``rodin_sigmoid`` (sigmoid(0, 3, 0.1)). sample_steps: 10 (DDPM).
        cond_drop_prob: 0.2. guidance_scale: 1.3 (the authors' code uses one scale for sampling).
        variance_type: reverse-step variance of the x0 model: ``fixed_large`` (improved-diffusion's default
            without learned sigma) or ``fixed_small``.
        aug_schedule, aug_max_train, aug_sample: conditional augmentation (:mod:`rodinhd.augment`) at level
            s ~ U[0, aug_max_train] in training, s = aug_sample at sampling. Neither the paper nor the authors' code
            gives levels; all are ours. ``aug_mode="noise"``: sqrt(ab) x + sqrt(1 - ab) n with ab =
            aug_schedule's alpha_bar(s) (ours: Nichol's ``cosine``, 0.3 = noise std up to 0.45 of unit-variance
            data, 0.1 = std 0.16). ``aug_mode="degrade"`` (the authors' route; the paper config's): blur by
            s * aug_blur_max texels, downsample by 1 + s (aug_down_max - 1), bicubic upsampling.
        render_patch: the renderer callable (see :data:`RenderPatch`); None disables the image-level loss.
        patch_size: rendered patch side (64 px in the authors' code), centred on a body pixel of the target view.
        image_loss_weight: weight of L_Image (1). perceptual_weight: weight of L_Perc inside it: 1 in Eq. 6
            (L_Image = L_Pixel + L_Perc); the authors' code weights its LPIPS term 0.5.
        perceptual: a :class:`~rodinhd.image_loss.VGGPerceptual` (VGG feature distance, or LPIPS with its heads, from local weights)
            or None for :class:`StructuralLoss`.
        background: the colour the renderer composites onto; the RGBA target views are composited onto it.
    """

    def __init__(self, unet: TriplaneUNet, tokenizer: PortraitTokenizer | None = None,
                 context_resolutions: Sequence[int] = (128,), num_steps: int = 100, schedule: str = "rodin_sigmoid",
                 cond_drop_prob: float = 0.2, guidance_scale: float = 1.3, sample_steps: int = 10,
                 variance_type: str = "fixed_large", aug_schedule: str = "cosine", aug_max_train: float = 0.3,
                 aug_sample: float = 0.1, render_patch: RenderPatch | None = None, patch_size: int = 64,
                 image_loss_weight: float = 1.0, perceptual_weight: float = 1.0,
                 perceptual: nn.Module | None = None, background: Sequence[float] = (1.0, 1.0, 1.0),
                 aug_mode: str = "noise", aug_blur_max: float = 1.0, aug_down_max: float = 2.0):
        super().__init__(unet, tokenizer, context_resolutions, num_steps, schedule, cond_drop_prob,
                         guidance_scale, sample_steps)
        if unet.cond_channels != unet.in_channels or unet.out_channels != unet.in_channels:
            raise ConfigError("the upsample UNet needs cond_channels = out_channels = in_channels "
                              f"(got {unet.cond_channels}, {unet.out_channels}, {unet.in_channels})",
                              "build it with cond_channels=C and out_channels=C for x0 prediction")
        if not 0.0 <= aug_sample <= 1.0 or not 0.0 <= aug_max_train <= 1.0:
            raise ConfigError("augmentation levels must lie in [0, 1]", "e.g. aug_max_train=0.3, aug_sample=0.1")
        if aug_mode not in AUG_MODES:
            raise ConfigError(f"unknown conditional augmentation {aug_mode!r}", f"use one of {AUG_MODES}")
        self.aug_mode, self.aug_blur_max, self.aug_down_max = aug_mode, float(aug_blur_max), float(aug_down_max)
        self.variance_type = variance_type
        self.aug_schedule = rodinhd_schedule(aug_schedule)
        self.aug_max_train = float(aug_max_train)
        self.aug_sample = float(aug_sample)
        self.render_patch = render_patch
        self.patch_size = int(patch_size)
        self.image_loss_weight = float(image_loss_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.perceptual = perceptual if perceptual is not None else StructuralLoss()
        self.background = tuple(float(v) for v in background)

    def _augmented(self, low_res: Tensor, level: Tensor, noise: Tensor) -> Tensor:  # raw [B, C, h, 3h] -> [B, C, H, 3W]
        """The normalised, upsampled and augmented condition of ``aug_mode`` at per-sample ``level``."""
        if self.aug_mode == "degrade":
            return degrade_rollout(self.normalizer.normalize(low_res), level, self.unet.image_size,
                                   self.aug_blur_max, self.aug_down_max)
        return self.augment_condition(self._condition(low_res), level, noise)

    def augment_condition(self, low_res_up: Tensor, level: Tensor,
                          noise: Tensor) -> Tensor:  # [B, C, H, 3W]
        """Conditional noise augmentation: alpha(level) x + sigma(level) n on the aug schedule, level [B] in [0, 1]."""
        alpha, sigma = alpha_sigma(level.to(torch.float64).cpu(), self.aug_schedule)
        return expand_to(alpha, low_res_up) * low_res_up + expand_to(sigma, low_res_up) * noise

    def _condition(self, low_res: Tensor) -> Tensor:
        """Normalised low-res roll-out upsampled (plane by plane) to the model's size."""
        size = self.unet.image_size
        lr = self.normalizer.normalize(low_res)
        return lr if lr.shape[2] == size else upsample_rollout(lr, size)

    def loss(self, triplanes: Tensor, low_res: Tensor, features: Sequence[Tensor] | None = None,
             cameras=None, generator: torch.Generator | None = None,
             images: Tensor | None = None) -> dict[str, Tensor]:
        """L_simple^HR (Eq. 5) + image_loss_weight * L_Image (Eq. 6) on raw roll-outs.

        triplanes: [B, C, H, 3H] high-res; low_res: [B, C, h, 3h]; features: portrait features; cameras: a batch
        of B cameras and images [B, H, W, 4] the ground-truth RGBA views they took (both needed when render_patch
        is set). Returns the total and its parts, plus ``aug_level`` [B], the augmentation applied to each
        sample's condition.
        """
        x0 = self.normalizer.normalize(triplanes)
        B = x0.shape[0]
        t = torch.randint(0, self.num_steps, (B,), generator=generator).to(x0.device)
        x_t = q_sample(x0, t, _randn(x0.shape, generator, x0), self.alphas_cumprod)
        level = torch.rand(B, generator=generator, dtype=torch.float64) * self.aug_max_train
        cond = self._augmented(low_res, level, _randn(x0.shape, generator, x0))
        feats = self._train_features(features, generator, B, x0.device)
        x0_pred = self.unet(x_t, t, self.context(feats), low_res=cond, aug_level=self._aug_input(level, x0))
        mse = mean_flat((x0_pred - x0) ** 2).mean()
        out = {"mse": mse, "t": t, "aug_level": level.to(x0.device)}
        total = mse
        if self.render_patch is not None and self.image_loss_weight > 0:
            if cameras is None or images is None:
                raise InputError("the image-level loss needs a ground-truth view and its camera per triplane",
                                 "pass cameras=... and images=..., or build the model with render_patch=None")
            pix, perc = self.image_loss(self.normalizer.denormalize(x0_pred), images, cameras, generator)
            out.update(pixel=pix, perceptual=perc)
            total = total + self.image_loss_weight * (pix + self.perceptual_weight * perc)
        out["loss"] = total
        return out

    def _aug_input(self, level: Tensor, like: Tensor) -> Tensor:
        # The level is embedded like a timestep on a 1000-step scale, so small levels stay distinguishable.
        return (level * 1000.0).to(device=like.device, dtype=torch.float32)

    def image_loss(self, pred: Tensor, images: Tensor, cameras,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """L_Pixel (MSE) and L_Perc of Eq. 6 between the patch rendered from the predicted triplane ``pred``
        [B, C, H, 3W] (raw) and the same pixels of the ground-truth view ``images`` [B, H, W, 4] (straight-alpha
        RGBA, composited on the render background) at ``cameras`` (one per sample, of the images' size)."""
        B = pred.shape[0]
        P = self.patch_size
        height, width = int(cameras.height), int(cameras.width)
        if images.ndim != 4 or images.shape[0] != B or images.shape[-1] != 4 \
                or tuple(images.shape[1:3]) != (height, width):
            raise InputError(f"image-level loss targets must be [{B}, {height}, {width}, 4] RGBA views, got "
                             f"{tuple(images.shape)}", "pass one RGBA view per triplane, at its camera's size")
        top, left = body_patch_corners(images[..., 3], P, generator)
        rows = (top[:, None] + torch.arange(P)).to(pred.device)
        cols = (left[:, None] + torch.arange(P)).to(pred.device)
        rendered = self.render_patch(pred, cameras, rows, cols)  # [B, P, P, 3]
        reference = composite(crop_patches(images, top, left, P), self.background).to(rendered)
        return F.mse_loss(rendered, reference), self.perceptual(rendered, reference)

    @torch.no_grad()
    def sample(self, low_res: Tensor, features: Sequence[Tensor] | None = None, steps: int | None = None,
               guidance_scale: float | None = None, aug_level: float | None = None,
               generator: torch.Generator | None = None, return_info: bool = False, clip_denoised: bool = True):
        """Respaced ancestral DDPM on x0 predictions; returns raw high-res roll-outs [B, C, H, 3H].

        low_res: raw base output [B, C, h, 3h]; aug_level: the fixed conditional augmentation (``aug_sample``);
        clip_denoised: clamp each x0 prediction to the training data's range (True).
        With ``return_info`` also a dict of the settings used (steps, guidance, aug_level), for the output JSON.
        """
        steps = steps or self.sample_steps
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        level_value = self.aug_sample if aug_level is None else float(aug_level)
        B = low_res.shape[0]
        device = self.alphas_cumprod.device
        size = self.unet.image_size
        shape = (B, self.unet.in_channels, size, 3 * size)
        level = torch.full((B,), level_value, dtype=torch.float64)
        ref = torch.empty(0, device=device)
        cond = self._augmented(low_res.to(device), level, torch.randn(shape, generator=generator).to(device))
        feats, guide = self._sample_features(features, B, device)
        chain = respace(self.alphas_cumprod, space_timesteps(self.num_steps, [steps]))
        ac = chain.alphas_cumprod.to(device)
        x = torch.randn(shape, generator=generator).to(device)
        for k in reversed(range(len(chain.timesteps))):
            t = chain.timesteps[k].to(device).expand(B)
            x0 = self.guided(x, t, feats, scale, guide, low_res=cond, aug_level=self._aug_input(level, ref))
            if clip_denoised:
                x0 = self.normalizer.clip(x0)
            x = ddpm_step(x0, x, k, ac, torch.randn(shape, generator=generator).to(x), self.variance_type).to(x.dtype)
        out = self.normalizer.denormalize(x)
        if return_info:
            return out, {"steps": steps, "guidance_scale": scale, "aug_level": level_value, "aug_mode": self.aug_mode,
                         "aug_schedule": type(self.aug_schedule).__name__, "variance_type": self.variance_type}
        return out
