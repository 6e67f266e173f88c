"""Structured latent diffusion (TeRA Sec. 3.4, stage 2): a text-conditioned UNet denoising the UV latent.

The paper fixes: x0-prediction, a DDPM chain of 1000 training steps sampled in 100 steps, a CLIP text encoder
(77 x 768) whose condition is dropped 20% of the time for classifier-free guidance, and a plain MSE loss. It does
not name the beta schedule, the UNet layout or the guidance scale; ours are the DDPM ``linear`` schedule (Ho et al.
2020, also what E3Gen, the nearest public UV-latent diffusion, uses), the UNet of ``configs/paper.yaml``
(E3Gen-like: base 128 channels, attention at 32, 16 and 8; 182M parameters for the 32 x 256^2 latent and CLIP's
768-wide text) and guidance 3.0.

Conventions. Latents go in and come out in the units of the distillation decoder; inside, they are normalised as
``(z - shift) * scale`` with statistics measured on the training latents (:meth:`set_latent_stats`), as latent
diffusion does with its VAE scale factor. Timesteps are integer indices into the chain's ``alphas_cumprod``
(0 = least noisy); a respaced chain of K steps keeps a subset of them (improved-diffusion's respacing) and the UNet
is always told the original index. Guidance is applied to the x0 prediction; at a fixed x_t this is the same as
guiding eps or v, because each is an affine function of x0.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from avatar_core.data.stats import ChannelMoments
from avatar_core.diffusion import (
    Respaced,
    cfg,
    convert,
    ddim_step,
    ddpm_step,
    get_schedule,
    prediction_kind,
    q_sample,
    respace,
    space_timesteps,
)
from avatar_core.errors import ConfigError, InputError
from avatar_core.io import load_json, load_tensors, save_json, save_tensors
from tera.text import TextCondition, TextConditioner, as_prompt_list

__all__ = [
    "TINY_UNET_CONFIG",
    "SAMPLERS",
    "StructuredLatentDiffusion",
    "build_unet",
]

#: CPU scale: an 8 x 16 x 16 latent, MiniLM text (384); about 1.2M parameters, ~20 ms a forward on one core.
TINY_UNET_CONFIG: dict = {
    "sample_size": 16,
    "in_channels": 8,
    "out_channels": 8,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 384,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}

SAMPLERS = ("ddpm", "ddim")

#: ``merge(x, level, chain) -> x``: called on the sample after every step (and on the initial noise), with the
#: chain index ``level`` the sample is now at (-1 = clean). Editing uses it to paste the re-noised kept region.
StepHook = Callable[[Tensor, int, Respaced], Tensor]

_FORMAT = "tera.latent_diffusion"
_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.safetensors"


def build_unet(config: dict) -> UNet2DConditionModel:
    """diffusers' UNet2DConditionModel from a plain config dict (see :data:`TINY_UNET_CONFIG`)."""
    try:
        return UNet2DConditionModel(**config)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build the latent UNet from its config: {e}",
                          "start from tera.latent_diffusion.TINY_UNET_CONFIG or the diffusion.unet block of configs/paper.yaml") from e


class StructuredLatentDiffusion(nn.Module):
    """TeRA's stage-2 denoiser over the UV latent [C, h, w] with text cross-attention (Sec. 3.4).

    Args:
        unet_config: UNet2DConditionModel config; its in/out channels and sample size fix the latent shape
            (paper: ``configs/paper.yaml``, 32 x 256 x 256; CPU: :data:`TINY_UNET_CONFIG`, 8 x 16 x 16).
        text: the prompt encoder (paper: CLIP ViT-L/14, 77 x 768; default here: MiniLM, 77 x 384). It is not part
            of the saved weights; its spec is, so :meth:`load` rebuilds it.
        null_text: the null condition [1, L, D] (+ mask); taken from ``text`` when not given. Stored with the model.
        num_train_timesteps: length T of the training chain (paper: 1000).
        schedule: noise schedule name for :func:`avatar_core.diffusion.get_schedule` (paper: DDPM, betas not
            stated; default ``"linear"``, DDPM's 1e-4..2e-2).
        prediction: what the UNet outputs: ``"x0"`` (paper), ``"eps"`` or ``"v"``.
        text_dropout: probability of replacing a sample's text by the null condition in training (paper: 0.2).
        guidance_scale: default classifier-free guidance scale (not stated in the paper; 3.0).
        sample_steps: default DDPM sampling steps (paper: 100).
        ddim_steps: default steps of the faster DDIM sampler (ours: 25).
        use_text_mask: let cross-attention ignore padding tokens (MiniLM); CLIP-conditioned UNets usually
            attend to the padding too (Stable Diffusion does), set False to do that.
    """

    def __init__(
        self,
        unet_config: dict | None = None,
        text: TextConditioner | None = None,
        null_text: TextCondition | None = None,
        num_train_timesteps: int = 1000,
        schedule: str = "linear",
        prediction: str = "x0",
        text_dropout: float = 0.2,
        guidance_scale: float = 3.0,
        sample_steps: int = 100,
        ddim_steps: int = 25,
        use_text_mask: bool = True,
    ):
        super().__init__()
        self.unet_config = copy.deepcopy(dict(unet_config if unet_config is not None else TINY_UNET_CONFIG))
        self.unet = build_unet(self.unet_config)
        if not 0.0 <= text_dropout < 1.0:
            raise ConfigError(f"text_dropout must be in [0, 1), got {text_dropout}", "the paper uses 0.2")
        if int(num_train_timesteps) < 2:
            raise ConfigError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}", "the paper uses 1000")
        self.text = text
        self.schedule_name = str(schedule)
        self.num_train_timesteps = int(num_train_timesteps)
        self.prediction = prediction_kind(prediction)
        self.text_dropout = float(text_dropout)
        self.guidance_scale = float(guidance_scale)
        self.sample_steps = int(sample_steps)
        self.ddim_steps = int(ddim_steps)
        self.use_text_mask = bool(use_text_mask)

        if null_text is None:
            if text is None:
                raise InputError("StructuredLatentDiffusion needs a text conditioner or a null condition",
                                 "pass text=TextConditioner() (MiniLM) or null_text=TextCondition(states, mask)")
            null_text = text.null(1)
        states, mask = null_text.states.detach().float(), null_text.mask.detach().bool()
        if states.ndim != 3 or states.shape[0] != 1 or mask.shape != states.shape[:2]:
            raise InputError(f"null condition must be states [1, L, D] with mask [1, L], got "
                             f"{tuple(states.shape)} and {tuple(mask.shape)}", "encode the empty prompt once")
        self.register_buffer("null_states", states.clone())  # [1, L, D]
        self.register_buffer("null_mask", mask.clone())  # [1, L]
        self.text_dim = int(states.shape[-1])
        cross = int(self.unet_config.get("cross_attention_dim", 1280))
        # A learned projection only when the encoder's width differs from the UNet's cross-attention width.
        self.text_proj = nn.Identity() if cross == self.text_dim else nn.Linear(self.text_dim, cross)

        ac = get_schedule(self.schedule_name).alphas_cumprod(self.num_train_timesteps)
        self.register_buffer("alphas_cumprod", ac, persistent=False)  # [T] float64, rebuilt from the config
        c = self.latent_shape[0]
        self.register_buffer("latent_scale", torch.ones(c))  # [C]
        self.register_buffer("latent_shift", torch.zeros(c))  # [C]
        self.register_buffer("latent_stats_set", torch.zeros((), dtype=torch.bool))

    # ---- shapes, normalisation -----------------------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""
        size = self.unet_config.get("sample_size", 64)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(self.unet_config.get("in_channels", 4)), int(h), int(w)

    @property
    def device(self) -> torch.device:
        return self.latent_scale.device

    def check_latents(self, latents: Tensor) -> Tensor:  # [B, C, h, w]
        """``latents`` itself after checking its shape against the model's and that it is finite."""
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise InputError(f"latents must be [B, {', '.join(map(str, self.latent_shape))}], "
                             f"got {tuple(latents.shape)}",
                             "use latents from the distillation decoder at this model's latent resolution")
        if not torch.isfinite(latents).all():
            raise InputError("latents contain NaN or Inf", "check the teacher features / distillation output")
        return latents

    @torch.no_grad()
    def set_latent_stats(self, latents: Tensor, per_channel: bool = False, center: bool = False) -> None:
        """Measure the normalisation on training latents [N, C, h, w] (LDM's scale factor, Rombach et al. 2022).

        ``center=False``: shift 0, scale = 1 / RMS, so normalised latents have unit second moment;
        ``center=True``: shift = mean, scale = 1 / std. ``per_channel`` measures each channel on its own.
        """
        z = self.check_latents(latents).double()
        dims = (0, 2, 3) if per_channel else (0, 1, 2, 3)
        shift = z.mean(dim=dims) if center else torch.zeros((), dtype=torch.float64)
        spread = ((z - (shift.view(-1, 1, 1) if shift.ndim else shift)) ** 2).mean(dim=dims).sqrt()
        if bool((spread < 1e-12).any()):
            raise InputError("latents are constant (zero spread); cannot measure a scale",
                             "measure the statistics on real, varied training latents")
        c = self.latent_shape[0]
        self.latent_shift.copy_(shift.expand(c).float())
        self.latent_scale.copy_((1.0 / spread).expand(c).float())
        self.latent_stats_set.fill_(True)

    @torch.no_grad()
    def set_latent_stats_from_moments(self, moments: ChannelMoments, per_channel: bool = False, center: bool = False) -> None:
        """:meth:`set_latent_stats` from per-channel moments streamed over the training latents
        (:class:`avatar_core.data.stats.ChannelMoments`), so the latents never need to be in memory together."""
        c = self.latent_shape[0]
        if moments.channels != c:
            raise InputError(f"latent statistics of {moments.channels} channels for a {c}-channel model",
                             "measure them on this model's latents")
        m = moments if per_channel else moments.pooled()
        shift = m.mean if center else torch.zeros_like(m.mean)
        spread = m.var(unbiased=False).sqrt() if center else m.rms()
        if bool((spread < 1e-12).any()):
            raise InputError("latents are constant (zero spread); cannot measure a scale",
                             "measure the statistics on real, varied training latents")
        self.latent_shift.copy_(shift.float())
        self.latent_scale.copy_((1.0 / spread).float())
        self.latent_stats_set.fill_(True)

    def normalize(self, latents: Tensor) -> Tensor:  # [B, C, h, w] -> [B, C, h, w]
        """Decoder units -> diffusion units: (z - shift) * scale."""
        return (latents - self.latent_shift.view(1, -1, 1, 1)) * self.latent_scale.view(1, -1, 1, 1)

    def denormalize(self, latents: Tensor) -> Tensor:  # [B, C, h, w] -> [B, C, h, w]
        """Diffusion units -> decoder units: z / scale + shift."""
        return latents / self.latent_scale.view(1, -1, 1, 1) + self.latent_shift.view(1, -1, 1, 1)

    # ---- conditioning --------------------------------------------------------------------------------

    def encode_text(self, text: str | Sequence[str] | TextCondition | Tensor) -> TextCondition:
        """Prompts (encoded by the conditioner), a TextCondition, or bare token states [B, L, D] (all real)."""
        if isinstance(text, TextCondition):
            cond = text
        elif isinstance(text, Tensor):
            cond = TextCondition(text, torch.ones(text.shape[:2], dtype=torch.bool, device=text.device))
        else:
            if self.text is None:
                raise InputError("this model has no text encoder to encode prompts with",
                                 "pass text=TextConditioner(...) when building or loading it, or pass token states")
            cond = self.text(as_prompt_list(text))
        if cond.states.ndim != 3 or cond.states.shape[-1] != self.text_dim:
            raise InputError(f"text states must be [B, L, {self.text_dim}], got {tuple(cond.states.shape)}",
                             "use the text encoder this model was trained with")
        if cond.states.shape[1] != self.null_states.shape[1]:
            raise InputError(f"text has {cond.states.shape[1]} tokens, the null condition "
                             f"{self.null_states.shape[1]}", "encode prompts with the model's max_length")
        return cond.to(self.device, self.null_states.dtype)

    def null_condition(self, batch: int) -> TextCondition:
        """The stored null condition repeated ``batch`` times."""
        return TextCondition(self.null_states.expand(batch, -1, -1), self.null_mask.expand(batch, -1))

    @property
    def pooled_text(self) -> bool:
        """Whether the UNet also takes the prompt's pooled state, added to its timestep embedding (unet_config
        ``class_embed_type: projection``): every ResNet block then sees the whole prompt, not only the
        cross-attention levels."""
        return self.unet_config.get("class_embed_type") == "projection"

    def denoise(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        """Raw UNet output (of kind ``self.prediction``) for x_t [B, C, h, w] at original steps t [B]."""
        states = self.text_proj(cond.states)
        mask = cond.mask if self.use_text_mask else None
        pooled = None
        if self.pooled_text:  # the mean of the real tokens' states (MiniLM's sentence embedding is this mean)
            w = cond.mask.to(cond.states.dtype).unsqueeze(-1)  # [B, L, 1]
            pooled = (cond.states * w).sum(1) / w.sum(1).clamp_min(1.0)  # [B, D]
        return self.unet(x_t, t, encoder_hidden_states=states, encoder_attention_mask=mask, class_labels=pooled).sample

    # ---- training ------------------------------------------------------------------------------------

    def drop_text(
        self,
        cond: TextCondition,  # [B, L, D] states, [B, L] mask
        generator: torch.Generator | None = None,
        drop: Tensor | None = None,  # [B] bool; drawn with probability text_dropout if None
    ) -> tuple[TextCondition, Tensor]:  # the condition with dropped rows replaced by the null one, drop [B]
        """CFG training (Ho & Salimans 2022): a sample's text becomes null w.p. text_dropout (paper 0.2)."""
        b = cond.states.shape[0]
        if drop is None:
            dev = generator.device if generator is not None else "cpu"
            drop = torch.rand(b, generator=generator, device=dev) < self.text_dropout
        drop = drop.to(self.device).bool()
        null = self.null_condition(b)
        out = TextCondition(torch.where(drop.view(-1, 1, 1), null.states, cond.states),
                            torch.where(drop.view(-1, 1), null.mask, cond.mask))
        return out, drop

    def training_loss(
        self,
        latents: Tensor,  # [B, C, h, w] in decoder units
        text: str | Sequence[str] | TextCondition | Tensor,
        generator: torch.Generator | None = None,
        t: Tensor | None = None,  # [B] long, drawn uniformly from 0..T-1 if None
        noise: Tensor | None = None,  # [B, C, h, w], drawn if None
        drop: Tensor | None = None,  # [B] bool: replace the text by the null condition; drawn if None
    ) -> Tensor:  # scalar
        """MSE between the UNet's output and its target (x0 in the paper) at a uniform random step (Sec. 3.4)."""
        if not bool(self.latent_stats_set):
            raise InputError("latent statistics are not set",
                             "call set_latent_stats(latents) on (a sample of) the training latents first")
        x0 = self.normalize(self.check_latents(latents).to(self.device))
        b = x0.shape[0]
        cond = self.encode_text(text).repeat_to(b)
        cpu_rand = {"generator": generator, "device": generator.device if generator is not None else "cpu"}
        if t is None:
            t = torch.randint(0, self.num_train_timesteps, (b,), **cpu_rand)
        if noise is None:
            noise = torch.randn(x0.shape, **cpu_rand)
        t, noise = t.to(self.device).long(), noise.to(x0)
        cond, _ = self.drop_text(cond, generator, drop)
        x_t = q_sample(x0, t, noise, self.alphas_cumprod)
        target = convert(x0, "x0", self.prediction, x_t, t=t, schedule=self.alphas_cumprod)
        return torch.nn.functional.mse_loss(self.denoise(x_t, t, cond), target)

    def forward(self, *args, **kwargs) -> Tensor:
        """The training loss (see :meth:`training_loss`): a wrapped model (DDP, ``accelerate``) syncs on forward."""
        return self.training_loss(*args, **kwargs)

    # ---- sampling ------------------------------------------------------------------------------------

    def sampling_chain(self, steps: int) -> Respaced:
        """The respaced chain of ``steps`` steps over the training chain (evenly spaced, first and last kept)."""
        steps = int(steps)
        if not 1 <= steps <= self.num_train_timesteps:
            raise InputError(f"sampling steps must be in 1..{self.num_train_timesteps}, got {steps}",
                             "the paper samples with 100 DDPM steps")
        return respace(self.alphas_cumprod, space_timesteps(self.num_train_timesteps, [steps]))

    def predict_x0(self, x_t: Tensor, t: Tensor, cond: TextCondition, guidance: float) -> Tensor:
        """Guided x0 estimate: cfg(x0(cond), x0(null), guidance); one UNet pass when guidance == 1."""
        b = x_t.shape[0]
        if guidance == 1.0:
            out = convert(self.denoise(x_t, t, cond), self.prediction, "x0", x_t, t=t, schedule=self.alphas_cumprod)
            return out
        null = self.null_condition(b)
        both = TextCondition(torch.cat([cond.states, null.states]), torch.cat([cond.mask, null.mask]))
        x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
        out = convert(self.denoise(x2, t2, both), self.prediction, "x0", x2, t=t2, schedule=self.alphas_cumprod)
        x0_cond, x0_null = out.chunk(2)
        return cfg(x0_cond, x0_null, guidance)

    def denoise_step(
        self,
        x_t: Tensor,  # [B, C, h, w] normalised sample at chain index k
        k: int,
        chain: Respaced,
        cond: TextCondition,
        guidance: float,
        sampler: str = "ddpm",
        noise: Tensor | None = None,  # [B, C, h, w]; DDPM's ancestral noise (and DDIM's when eta > 0)
        eta: float = 0.0,
    ) -> tuple[Tensor, Tensor]:  # x at chain index k - 1, x0 estimate
        """One reverse step on a (respaced) chain: UNet -> x0 -> DDPM posterior sample or DDIM update."""
        t = chain.timesteps[k].to(self.device).expand(x_t.shape[0])
        x0 = self.predict_x0(x_t, t, cond, guidance)
        if sampler == "ddpm":
            if noise is None:
                noise = torch.randn_like(x_t)
            return ddpm_step(x0, x_t, k, chain.alphas_cumprod, noise), x0
        if sampler == "ddim":
            return ddim_step(x0, x_t, k, k - 1, chain.alphas_cumprod, eta=eta, noise=noise), x0
        raise InputError(f"unknown sampler {sampler!r}", f"use one of: {', '.join(SAMPLERS)}")

    @torch.no_grad()
    def sample(
        self,
        prompts: str | Sequence[str] | TextCondition | Tensor,
        steps: int | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
        sampler: str = "ddpm",
        eta: float = 0.0,
        hook: StepHook | None = None,
    ) -> Tensor:  # [B, C, h, w] in decoder units
        """Latents for the prompts: ``steps`` (default 100 DDPM / 25 DDIM) reverse steps with CFG ``guidance``.

        ``generator`` (a CPU generator) fixes the initial noise and every step's noise, so the same seed gives the
        same latents. ``hook`` (see :data:`StepHook`) sees the sample after each step; editing merges there.
        """
        if sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {sampler!r}", f"use one of: {', '.join(SAMPLERS)}")
        steps = int(steps if steps is not None else (self.sample_steps if sampler == "ddpm" else self.ddim_steps))
        guidance = float(self.guidance_scale if guidance is None else guidance)
        cond = self.encode_text(prompts)
        b = cond.states.shape[0]
        chain = self.sampling_chain(steps)
        shape = (b, *self.latent_shape)

        def randn() -> Tensor:
            dev = generator.device if generator is not None else "cpu"
            return torch.randn(shape, generator=generator, device=dev).to(self.device, self.null_states.dtype)

        x = randn()
        k_last = len(chain.timesteps) - 1
        if hook is not None:
            x = hook(x, k_last, chain)
        for k in range(k_last, -1, -1):
            noise = randn() if (sampler == "ddpm" and k > 0) or (sampler == "ddim" and eta > 0) else None
            x, _ = self.denoise_step(x, k, chain, cond, guidance, sampler, noise=noise, eta=eta)
            if hook is not None:
                x = hook(x, k - 1, chain)
        return self.denormalize(x)

    # ---- persistence ---------------------------------------------------------------------------------

    def config(self) -> dict:
        """Everything needed to rebuild the model (JSON-serialisable)."""
        return {
            "format": _FORMAT,
            "version": 1,
            "unet_config": self.unet_config,
            "text": self.text.spec() if self.text is not None else None,
            "num_train_timesteps": self.num_train_timesteps,
            "schedule": self.schedule_name,
            "prediction": self.prediction,
            "text_dropout": self.text_dropout,
            "guidance_scale": self.guidance_scale,
            "sample_steps": self.sample_steps,
            "ddim_steps": self.ddim_steps,
            "use_text_mask": self.use_text_mask,
            "null_tokens": int(self.null_states.shape[1]),
            "text_dim": self.text_dim,
        }

    def save(self, directory: str | Path) -> Path:
        """``config.json`` + ``model.safetensors`` (UNet, text projection, null condition, latent statistics)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_tensors(directory / _WEIGHTS_FILE, self.state_dict(), metadata={"format": _FORMAT, "version": 1})
        save_json(directory / _CONFIG_FILE, self.config())
        return directory

    @classmethod
    def load(cls, directory: str | Path, text: TextConditioner | None = None,
             device: torch.device | str | None = None) -> StructuredLatentDiffusion:
        """Rebuild a saved model; the text encoder is ``text`` or the one named in the config (loaded lazily)."""
        directory = Path(directory)
        cfg_ = load_json(directory / _CONFIG_FILE)
        if not isinstance(cfg_, dict) or cfg_.get("format") != _FORMAT:
            raise ConfigError(f"{directory / _CONFIG_FILE} is not a TeRA latent diffusion config",
                              "point at a folder written by StructuredLatentDiffusion.save")
        tensors, _ = load_tensors(directory / _WEIGHTS_FILE)
        if text is None and cfg_.get("text") is not None:
            text = TextConditioner.from_spec(cfg_["text"], device=device)
        null = TextCondition(tensors["null_states"], tensors["null_mask"])
        model = cls(cfg_["unet_config"], text=text, null_text=null,
                    num_train_timesteps=cfg_["num_train_timesteps"], schedule=cfg_["schedule"],
                    prediction=cfg_["prediction"], text_dropout=cfg_["text_dropout"],
                    guidance_scale=cfg_["guidance_scale"], sample_steps=cfg_["sample_steps"],
                    ddim_steps=cfg_["ddim_steps"], use_text_mask=cfg_["use_text_mask"])
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{directory / _WEIGHTS_FILE} does not match its config "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})",
                              "save the model again; do not mix files from different runs")
        return model.to(device) if device is not None else model
