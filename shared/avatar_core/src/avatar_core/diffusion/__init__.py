"""Diffusion building blocks shared by the methods: noise schedules, parameterisations, guidance, samplers.

``get_schedule(name, **params)`` returns a continuous-time schedule (alpha_bar, log_snr, alpha, sigma on
t in [0, 1]) whose ``betas(N)`` / ``trained_betas(N)`` feed any diffusers scheduler.
"""

from avatar_core.diffusion.guidance import cfg, linear_guidance_scale, triangular_guidance_scale
from avatar_core.diffusion.inpainting import inpaint_merge
from avatar_core.diffusion.parameterization import (
    PREDICTION_KINDS,
    alpha_bar_at,
    alpha_sigma,
    convert,
    eps_from_v,
    eps_from_x0,
    expand_to,
    prediction_kind,
    q_sample,
    v_from_eps,
    v_from_x0,
    x0_from_eps,
    x0_from_v,
)
from avatar_core.diffusion.samplers import (
    VARIANCE_TYPES,
    Respaced,
    ddim_step,
    ddpm_step,
    model_log_variance,
    posterior_mean_variance,
    respace,
    space_timesteps,
)
from avatar_core.diffusion.schedules import (
    ALIASES,
    MAX_BETA,
    SCHEDULE_NAMES,
    CosinePowerSchedule,
    CosineSchedule,
    LinearSchedule,
    NoiseSchedule,
    ScaledLinearSchedule,
    ShiftedSchedule,
    SigmoidSchedule,
    betas_for_alpha_bar,
    get_schedule,
)

__all__ = [
    "ALIASES",
    "MAX_BETA",
    "PREDICTION_KINDS",
    "SCHEDULE_NAMES",
    "VARIANCE_TYPES",
    "CosinePowerSchedule",
    "CosineSchedule",
    "LinearSchedule",
    "NoiseSchedule",
    "Respaced",
    "ScaledLinearSchedule",
    "ShiftedSchedule",
    "SigmoidSchedule",
    "alpha_bar_at",
    "alpha_sigma",
    "betas_for_alpha_bar",
    "cfg",
    "convert",
    "ddim_step",
    "ddpm_step",
    "eps_from_v",
    "eps_from_x0",
    "expand_to",
    "get_schedule",
    "inpaint_merge",
    "linear_guidance_scale",
    "model_log_variance",
    "posterior_mean_variance",
    "prediction_kind",
    "q_sample",
    "respace",
    "space_timesteps",
    "triangular_guidance_scale",
    "v_from_eps",
    "v_from_x0",
    "x0_from_eps",
    "x0_from_v",
]
