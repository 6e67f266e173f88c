"""Human Distillation Sampling (GaussianIP Sec. 3.1, Eq. 4-7).

SDS's score difference is decomposed into a rectifier, a denoiser and a conditional term; HDS keeps the
conditional term with the identity image inside it and the denoiser term with a repelling negative score at high
timesteps, and drops the noisy ``-eps`` term. One prior call evaluates three branches ``[neg, pos, null]``:

* pos: the view-dependent prompt + the input face,
* null: the empty prompt + an unrelated face,
* neg: the negative prompt + a zero face embedding,

``delta_c = s (eps_pos - eps_null)``, ``delta_d = eps_null`` for ``t < t_switch`` else ``eps_null - eps_neg``,
``grad = (1 - alphabar_t)(delta_c + delta_d)``, its norm along the latent width clipped per (batch, channel, row)
(the official code's clip), and the loss ``0.5 * sum((z - sg(z - grad))^2) / B`` whose gradient is ``grad / B``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gaussianip.prior import FaceIdentity, Prior


def hds_gradient(eps_neg: Tensor, eps_pos: Tensor, eps_null: Tensor, alpha_bar: float, t: int,
                 guidance_scale: float = 7.5, switch_t: int = 170, clip: float | None = 1.0) -> Tensor:
    """The HDS gradient on the latents ``[B, C, h, w]`` from the three branch predictions."""
    delta_c = guidance_scale * (eps_pos - eps_null)
    delta_d = eps_null if t < switch_t else eps_null - eps_neg
    grad = (1.0 - alpha_bar) * (delta_c + delta_d)
    if clip is not None:
        norm = grad.norm(dim=-1, keepdim=True)  # per (batch, channel, row): along the latent width
        grad = grad * (clip / norm.clamp_min(1e-12)).clamp(max=1.0)
    return torch.nan_to_num(grad)


def hds_loss_from_gradient(latents: Tensor, grad: Tensor) -> Tensor:
    """``0.5 * sum((z - sg(z - grad))^2) / B``: backpropagates exactly ``grad / B`` into ``latents``."""
    target = (latents - grad).detach()
    return 0.5 * ((latents - target) ** 2).sum() / latents.shape[0]


@dataclass
class HDSConditions:
    """The three branches' conditions for a batch of B views (each tensor has B rows)."""

    text_neg: Tensor
    text_pos: Tensor
    text_null: Tensor
    id_neg: FaceIdentity
    id_pos: FaceIdentity
    id_null: FaceIdentity
    pose: Tensor  # [B, 3, S, S]


def hds_step(prior: Prior, latents: Tensor, t: int, cond: HDSConditions, guidance_scale: float = 7.5,
             switch_t: int = 170, clip: float | None = 1.0, controlnet_scale: float = 1.0,
             generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
    """Loss of one HDS step on VAE latents with grad (the prior runs without grad in one 3B batch)."""
    B = latents.shape[0]
    a = float(prior.alphas_cumprod[t])
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    with torch.no_grad():
        zt = a ** 0.5 * latents.detach() + (1 - a) ** 0.5 * noise
        text = torch.cat([cond.text_neg, cond.text_pos, cond.text_null])
        ident = cond.id_neg.cat([cond.id_pos, cond.id_null])
        tt = torch.full((3 * B,), t, dtype=torch.long)
        eps = prior.predict_noise(zt.repeat(3, 1, 1, 1), tt, text, ident, cond.pose.repeat(3, 1, 1, 1),
                                  controlnet_scale=controlnet_scale).float()
    eps_neg, eps_pos, eps_null = eps.chunk(3)
    grad = hds_gradient(eps_neg, eps_pos, eps_null, a, t, guidance_scale, switch_t, clip)
    loss = hds_loss_from_gradient(latents.float(), grad)
    return loss, {"t": t, "grad_norm": float(grad.norm()), "alpha_bar": a}
