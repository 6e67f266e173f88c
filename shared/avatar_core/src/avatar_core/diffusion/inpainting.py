"""The inpainting merge used for editing: known content re-noised to the current level, pasted over the sample.

After each denoising step the region to keep is replaced by the known clean content diffused to the same
noise level (Lugmayr et al. 2022, RePaint Eq. 8; Song et al. 2021, replacement method), so the model only
has to fill in the rest consistently.
"""

from __future__ import annotations

from torch import Tensor

from avatar_core.diffusion.parameterization import ScheduleLike, q_sample
from avatar_core.errors import InputError


def inpaint_merge(
    x_t_generated: Tensor,  # [B, ...] the sample at noise level t
    x0_known: Tensor,  # [B, ...] clean known content
    mask_known: Tensor,  # broadcastable to [B, ...]; 1 = keep known, 0 = keep generated (soft values blend)
    t: float | int | Tensor,  # scalar or [B]: the level of x_t_generated
    noise: Tensor,  # [B, ...] fresh noise for re-noising the known content
    schedule: ScheduleLike,  # NoiseSchedule (continuous t) or alphas_cumprod [T] (integer t)
) -> Tensor:  # [B, ...]
    """mask * q_sample(x0_known, t) + (1 - mask) * x_t_generated.

    ``t`` is the level the generated sample is at *after* the step, i.e. the previous timestep. With an
    alphas_cumprod tensor a negative index means the clean level, and with a NoiseSchedule ``t = 0`` does;
    there alpha = 1 and sigma = 0, so the known region is reproduced exactly after the final step.
    """
    if x_t_generated.shape != x0_known.shape:
        raise InputError(
            f"generated sample {tuple(x_t_generated.shape)} and known content {tuple(x0_known.shape)} differ in shape",
            "encode the known content to the same (latent) space and size as the sample",
        )
    known_t = q_sample(x0_known, t, noise, schedule)
    mask = mask_known.to(dtype=x_t_generated.dtype, device=x_t_generated.device)
    return mask * known_t + (1 - mask) * x_t_generated
