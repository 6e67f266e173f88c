"""The human-centric diffusion prior HDS distils from (GaussianIP Sec. 3.1): one interface, two scales.

A prior maps noisy latents, timesteps and a batch of conditions (text tokens, a face identity, an OpenPose
skeleton image) to noise predictions, with a ControlNet branch on the skeleton and IP-Adapter decoupled
cross-attention on identity tokens. The ControlNet receives the same text + identity context as the UNet
(the official code concatenates the 77 text tokens and the IP tokens for both).

* :class:`EmbeddedPrior` (default, CPU): a small ``AutoencoderKL``, a ``UNet2DConditionModel`` with MiniLM text
  cross-attention, a ``ControlNetModel`` made from it, and FaceID-style identity tokens (diffusers'
  ``IPAdapterFaceIDImageProjection`` + ``IPAdapterAttnProcessor2_0``, installed through the kernel) from a small
  face-identity encoder, all trained on the kernel's synthetic avatars (:mod:`gaussianip.prior_train`).
* :class:`~gaussianip.prior_paper.PaperPrior`: SD-1.5 + ControlNet-openpose + IP-Adapter-FaceID-PlusV2 from
  local folders.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from avatar_core.errors import InputError, MissingWeightsError
from avatar_core.io import load_json, load_tensors, save_json, save_tensors


@dataclass
class FaceIdentity:
    """What the IP-Adapter branch reads for one or more faces."""

    id_embeds: Tensor  # [B, 1, E] face-recognition embedding
    clip_embeds: Tensor | None = None  # [B, 1, T, Hc] CLIP penultimate hidden states (FaceID-Plus only)

    def cat(self, others: list[FaceIdentity]) -> FaceIdentity:
        items = [self, *others]
        clip = None if self.clip_embeds is None else torch.cat([o.clip_embeds for o in items])
        return FaceIdentity(torch.cat([o.id_embeds for o in items]), clip)

    def expand(self, batch: int) -> FaceIdentity:
        clip = None if self.clip_embeds is None else self.clip_embeds.expand(batch, *self.clip_embeds.shape[1:])
        return FaceIdentity(self.id_embeds.expand(batch, *self.id_embeds.shape[1:]), clip)


class Prior(nn.Module, abc.ABC):
    """Frozen text + identity + pose conditioned latent diffusion model (eps prediction, DDPM 1000 steps)."""

    unet: nn.Module
    controlnet: nn.Module
    vae: nn.Module
    name: str = "prior"

    def __init__(self):
        super().__init__()
        from diffusers import DDIMScheduler

        # SD's DDPM schedule (scaled_linear 0.00085 - 0.012, 1000 steps), as the official code's DDIM scheduler.
        self.scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                       steps_offset=1)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(), persistent=False)

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def image_size(self) -> int:
        """Pixel size the VAE encodes (paper 512)."""

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    # ---- conditions --------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_text(self, prompts: list[str]) -> Tensor:  # [B, L, D]
        """Token states of non-empty prompts."""

    @abc.abstractmethod
    def null_text(self, batch: int) -> Tensor:  # [B, L, D]
        """The empty prompt's token states."""

    @abc.abstractmethod
    def face_identity(self, face: Tensor) -> FaceIdentity:  # face [H, W, 3] in [0, 1]
        """The identity of one face photo."""

    @abc.abstractmethod
    def unrelated_identity(self) -> FaceIdentity:
        """The null branch's face: an unrelated person."""

    @abc.abstractmethod
    def zero_identity(self) -> FaceIdentity:
        """The negative branch's identity: zero face embedding (and CLIP features of an all-zero image)."""

    # ---- networks ----------------------------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:  # [B, 3, S, S] in [0, 1] -> [B, 4, s, s]
        """VAE latents (mean of the posterior, scaled), differentiable w.r.t. the images."""
        z = self.vae.encode(images.to(self.dtype) * 2.0 - 1.0).latent_dist.mean
        return z * self.latent_scale

    def decode(self, latents: Tensor) -> Tensor:  # -> [B, 3, S, S] in [0, 1]
        x = self.vae.decode(latents / self.latent_scale).sample
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    def _projection(self):
        return self.unet.encoder_hid_proj.image_projection_layers[0]

    def set_ip_scale(self, scale: float, structure: float | None = None) -> None:
        """IP-Adapter weight on every decoupled cross-attention, and the FaceID-PlusV2 structure scale."""
        for proc in self.unet.attn_processors.values():
            if hasattr(proc, "scale") and isinstance(proc.scale, list):
                proc.scale = [float(scale)] * len(proc.scale)
        proj = self._projection()
        if structure is not None and hasattr(proj, "shortcut"):
            proj.shortcut, proj.shortcut_scale = True, float(structure)

    def identity_tokens(self, identity: FaceIdentity) -> Tensor:  # [B, N, D]
        proj = self._projection()
        if identity.clip_embeds is not None:
            proj.clip_embeds = identity.clip_embeds.to(self.device, self.dtype)
        tokens = self.unet.encoder_hid_proj([identity.id_embeds.to(self.device, self.dtype)])[0]
        return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])

    def predict_noise(self, latents: Tensor, t: Tensor, text: Tensor, identity: FaceIdentity, pose: Tensor,
                      controlnet_scale: float = 1.0) -> Tensor:
        """eps(z_t, t | text, identity, pose) for a batch; ``pose`` is ``[B, 3, S, S]`` in [0, 1]."""
        B = latents.shape[0]
        if not (text.shape[0] == identity.id_embeds.shape[0] == pose.shape[0] == B):
            raise InputError(f"prior batch mismatch: latents {B}, text {text.shape[0]}, identity "
                             f"{identity.id_embeds.shape[0]}, pose {pose.shape[0]}", "pass one condition per latent")
        latents = latents.to(self.dtype)
        t = t.to(self.device).reshape(-1).expand(B) if t.numel() == 1 else t.to(self.device)
        tokens = self.identity_tokens(identity)
        context = torch.cat([text.to(self.dtype), tokens], dim=1)  # the ControlNet sees text + identity
        down, mid = self.controlnet(latents, t, encoder_hidden_states=context, controlnet_cond=pose.to(self.dtype),
                                    conditioning_scale=controlnet_scale, return_dict=False)
        ip = {"image_embeds": [identity.id_embeds.to(self.device, self.dtype)]}
        return self.unet(latents, t, encoder_hidden_states=text.to(self.dtype), added_cond_kwargs=ip,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid).sample


# ------------------------------------------------------------------------------------------------------
# The embedded prior
# ------------------------------------------------------------------------------------------------------


class IdentityEncoder(nn.Module):
    """A small CNN from a portrait to a unit face-identity vector (trained contrastively on synthetic faces)."""

    def __init__(self, size: int = 32, width: int = 32, dim: int = 64):
        super().__init__()
        self.size = size
        layers, c = [], 3
        for k in range(4):
            w = width * min(2 ** k, 4)
            layers += [nn.Conv2d(c, w, 3, stride=2 if k else 1, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, dim))

    def forward(self, images: Tensor) -> Tensor:  # [B, 3, H, W] in [0, 1] -> [B, dim]
        x = nn.functional.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True,
                                      align_corners=False)
        return nn.functional.normalize(self.net(x * 2 - 1), dim=-1)


def _as_face_batch(face: Tensor, name: str = "face image") -> Tensor:  # -> [1, 3, H, W]
    if face.dim() != 3 or face.shape[-1] not in (3, 4):
        raise InputError(f"the {name} must be an RGB or RGBA image [H, W, 3|4], got shape {tuple(face.shape)}",
                         "pass a colour photo (PNG or JPEG)")
    if min(face.shape[:2]) < 16:
        raise InputError(f"the {name} is {face.shape[1]}x{face.shape[0]} pixels, too small to show a face",
                         "pass a photo of at least 32x32 pixels")
    rgb = face[..., :3] * face[..., 3:] if face.shape[-1] == 4 else face
    return rgb.permute(2, 0, 1)[None].float()


def embedded_components(cfg) -> dict[str, nn.Module]:
    """Random-weight VAE, UNet, ControlNet and identity encoder of the embedded prior (``cfg``: EmbeddedPriorConfig)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(cfg.vae_channels),
                        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
                        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels), layers_per_block=1,
                        norm_num_groups=8, sample_size=cfg.image_size)
    latent = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    n = len(cfg.unet_channels)
    unet = UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4,
                                block_out_channels=tuple(cfg.unet_channels), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
                                cross_attention_dim=cfg.text_dim, attention_head_dim=cfg.head_dim, norm_num_groups=8)
    down = len(cfg.vae_channels) - 1
    cond_channels = tuple(8 * 2 ** k for k in range(down + 1))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=cond_channels)
    idenc = IdentityEncoder(cfg.identity_size, dim=cfg.identity_dim)
    attach_identity_adapter(unet, cfg.identity_dim, cfg.text_dim, cfg.identity_tokens)
    return {"vae": vae, "unet": unet, "controlnet": controlnet, "identity": idenc}


def attach_identity_adapter(unet, id_dim: int, cross_dim: int, num_tokens: int, seed: int = 0) -> None:
    """FaceID-style image projection + decoupled cross-attention K/V, installed by the kernel's IP-Adapter loader.

    The K/V weights start as copies of each cross-attention's own ``to_k`` / ``to_v`` (IP-Adapter's init)."""
    from avatar_core.pretrained import IPAdapterWeights, attach_ip_adapter

    g = torch.Generator().manual_seed(seed)
    proj = {"proj.0.weight": torch.randn(2 * id_dim, id_dim, generator=g) / id_dim ** 0.5,
            "proj.0.bias": torch.zeros(2 * id_dim),
            "proj.2.weight": torch.randn(num_tokens * cross_dim, 2 * id_dim, generator=g) / (2 * id_dim) ** 0.5,
            "proj.2.bias": torch.zeros(num_tokens * cross_dim),
            "norm.weight": torch.ones(cross_dim), "norm.bias": torch.zeros(cross_dim)}
    ip, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.rsplit(".", 1)[0])
            ip[f"{key}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
            ip[f"{key}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()
            key += 2
    weights = IPAdapterWeights(Path("<embedded identity adapter>"), "faceid", proj, ip, len(ip) // 2, cross_dim)
    attach_ip_adapter(unet, weights, scale=1.0)


class EmbeddedPrior(Prior):
    """The small prior trained on the synthetic avatars; same structure as the paper's (see the module doc)."""

    name = "embedded"
    FILES = ("prior.json", "prior.safetensors")

    def __init__(self, cfg, components: dict[str, nn.Module] | None = None, text_encoder=None,
                 null_face: Tensor | None = None):
        super().__init__()
        comps = components or embedded_components(cfg)
        self.cfg = cfg
        self.vae, self.unet, self.controlnet, self.identity = (comps[k] for k in ("vae", "unet", "controlnet", "identity"))
        self._text = [text_encoder]  # frozen, kept out of the state dict
        self.register_buffer("null_face", null_face if null_face is not None else torch.zeros(3, 8, 8), persistent=True)

    @property
    def image_size(self) -> int:
        return int(self.cfg.image_size)

    @property
    def text_encoder(self):
        if self._text[0] is None:
            from avatar_core.text import load_text_encoder

            self._text[0] = load_text_encoder("minilm", max_length=self.cfg.text_length)
        return self._text[0]

    def encode_text(self, prompts: list[str]) -> Tensor:
        return self.text_encoder.encode(list(prompts)).token_states.to(self.device, self.dtype)

    def null_text(self, batch: int) -> Tensor:
        return self.text_encoder.encode_null(batch).token_states.to(self.device, self.dtype)

    def identity_vector(self, images: Tensor) -> Tensor:  # [B, 3, H, W] -> [B, E]
        return self.identity(images.to(self.device, self.dtype))

    def face_identity(self, face: Tensor) -> FaceIdentity:
        with torch.no_grad():
            v = self.identity_vector(_as_face_batch(face))
        return FaceIdentity(v[:, None])

    def unrelated_identity(self) -> FaceIdentity:
        """The null branch's face: a fixed face the model was not asked to reproduce (a training-set stranger)."""
        with torch.no_grad():
            v = self.identity_vector(self.null_face[None])
        return FaceIdentity(v[:, None])

    def zero_identity(self) -> FaceIdentity:
        return FaceIdentity(torch.zeros(1, 1, self.cfg.identity_dim, device=self.device, dtype=self.dtype))

    # ---- files ---------------------------------------------------------------------------------------
    def save(self, folder: Path, info: dict | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        from avatar_core.config import config_to_dict

        save_tensors(folder / "prior.safetensors", {k: v.detach().contiguous() for k, v in self.state_dict().items()})
        save_json(folder / "prior.json", {"config": config_to_dict(self.cfg), "info": info or {}})
        return folder

    @classmethod
    def load(cls, folder: Path, cfg=None, device: str | torch.device = "cpu") -> EmbeddedPrior:
        folder = Path(folder)
        missing = [f for f in cls.FILES if not (folder / f).is_file()]
        if missing:
            raise MissingWeightsError(
                f"the embedded GaussianIP prior is not in {folder} (missing {', '.join(missing)})",
                "train it with `gaussianip train-prior` (or let `gaussianip generate` train it on first use)")
        meta = load_json(folder / "prior.json")
        from omegaconf import OmegaConf

        from gaussianip.config import EmbeddedPriorConfig

        stored = OmegaConf.merge(OmegaConf.structured(EmbeddedPriorConfig), meta["config"])
        prior = cls(stored)
        state, _ = load_tensors(folder / "prior.safetensors")
        prior.null_face = torch.zeros_like(state["null_face"])
        prior.load_state_dict(state)
        prior.info = meta.get("info", {})
        return prior.to(device).eval().requires_grad_(False)
