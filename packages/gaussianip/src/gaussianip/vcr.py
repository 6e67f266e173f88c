"""View-Consistent Refinement (GaussianIP Sec. 3.3): mutual attention across views as diffusers attention
processors installed by ``set_attn_processor`` on the UNet's named decoder self-attentions.

Each patched layer caches the input of its self-attention (after the block's norm) for every view and CFG half
in the current denoising call. Principal views (front, back, left, right) attend to themselves. A key view
(+-45, +-135 deg) attends over its own tokens concatenated with a principal view's. An intermediate view blends
``lambda_self Attn(Q_i, K_i, V_i) + (1 - lambda_self)(w_l Attn(Q_i, K_l, V_l) + w_r Attn(Q_i, K_r, V_r))`` with its
two neighbouring principal / key views weighted by azimuth distance (closer weighs more). K/V of a cached view are
recomputed with the layer's own ``to_k`` / ``to_v``. All views share one initial noise; only the last few DDIM
steps run, with a fixed seed. ``mode="independent"`` denoises every view alone (the ablation baseline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

from avatar_core.errors import ConfigError, InputError

PRINCIPAL = (0.0, 90.0, 180.0, -90.0)
KEY = (45.0, 135.0, -135.0, -45.0)


def _wrap(a: float) -> float:
    """Degrees to (-180, 180]."""
    a = (a + 180.0) % 360.0 - 180.0
    return 180.0 if a == -180.0 else a


@dataclass
class Role:
    """What one view does in a patched self-attention."""

    kind: str  # "principal", "key" or "intermediate"
    refs: tuple[int, ...] = ()  # views it reads from the cache
    weights: tuple[float, ...] = ()  # intermediate: (w_l, w_r)


def plan_views(azimuths: list[float], key_reference: str = "code") -> list[Role]:
    """Roles of views at the given azimuths (degrees; 0 = front, 90 = the body's left)."""
    az = [_wrap(a) for a in azimuths]
    idx = {a: i for i, a in enumerate(az)}
    missing = [a for a in PRINCIPAL + KEY if _wrap(a) not in idx]
    if missing:
        raise InputError(f"VCR needs views at the principal and key azimuths; missing {missing}",
                         "use a number of views that is a multiple of 8 on the orbit from -180 deg")
    front, back = idx[0.0], idx[180.0]
    roles: list[Role] = []
    anchors = sorted(_wrap(a) for a in PRINCIPAL + KEY)
    for a in az:
        if a in [_wrap(p) for p in PRINCIPAL]:
            roles.append(Role("principal"))
        elif a in [_wrap(k) for k in KEY]:
            if key_reference == "code":
                ref = front if a in (45.0, 135.0) else back
            elif key_reference == "nearest":
                ref = front if abs(a) < 90 else back
            else:
                raise ConfigError(f"unknown vcr.key_reference {key_reference!r}", "use 'code' or 'nearest'")
            roles.append(Role("key", (ref,)))
        else:
            lo = max((x for x in anchors if x < a), default=anchors[-1] - 360.0)
            hi = min((x for x in anchors if x > a), default=anchors[0] + 360.0)
            dl, dr = a - lo, hi - a
            roles.append(Role("intermediate", (idx[_wrap(lo)], idx[_wrap(hi)]), (dr / (dl + dr), dl / (dl + dr))))
    return roles


@dataclass
class VCRState:
    """Shared by every patched layer: the rows' views and roles in the current call, and the token cache."""

    lambda_self: float = 0.55
    rows: list[tuple[int, int]] | None = None  # (view, CFG half) per batch row; None: plain self-attention
    roles: list[Role] = field(default_factory=list)  # per view
    cache: dict = field(default_factory=dict)  # (layer, view, half) -> [N, C]

    def clear(self) -> None:
        self.cache.clear()


def attend(attn, q_in: Tensor, kv_in: Tensor) -> Tensor:  # [B, N, C], [B, M, C] -> [B, N, inner]
    """Multi-head scaled dot-product attention of ``q_in`` over ``kv_in`` with the layer's projections."""
    B = q_in.shape[0]
    q, k, v = attn.to_q(q_in), attn.to_k(kv_in), attn.to_v(kv_in)
    h = attn.heads
    d = k.shape[-1] // h
    q, k, v = (x.view(B, -1, h, d).transpose(1, 2) for x in (q, k, v))
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).reshape(B, -1, h * d).to(q_in.dtype)


class VCRAttnProcessor:
    """Mutual self-attention of one named layer (a drop-in for diffusers' ``AttnProcessor2_0`` on ``attn1``)."""

    def __init__(self, state: VCRState, name: str):
        self.state, self.name = state, name

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3 \
                or attn.group_norm is not None or attn.spatial_norm is not None:
            raise InputError(f"VCR patches plain self-attention only; {self.name} is not one",
                             "patch the attn1 layers of the UNet's transformer blocks")
        x = hidden_states
        st = self.state
        if st.rows is None:
            out = attend(attn, x, x)
        else:
            for r, (view, half) in enumerate(st.rows):
                st.cache[(self.name, view, half)] = x[r]
            outs = []
            for r, (view, half) in enumerate(st.rows):
                role, xi = st.roles[view], x[r:r + 1]
                if role.kind == "principal":
                    o = attend(attn, xi, xi)
                elif role.kind == "key":
                    ref = st.cache[(self.name, role.refs[0], half)][None]
                    o = attend(attn, xi, torch.cat([xi, ref], dim=1))
                else:
                    left = st.cache[(self.name, role.refs[0], half)][None]
                    right = st.cache[(self.name, role.refs[1], half)][None]
                    wl, wr = role.weights
                    o = st.lambda_self * attend(attn, xi, xi) + (1 - st.lambda_self) * (
                        wl * attend(attn, xi, left) + wr * attend(attn, xi, right))
                outs.append(o)
            out = torch.cat(outs)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def decoder_self_attentions(unet, layers: str = "decoder") -> list[str]:
    """Names of the patched modules: every ``attn1`` under ``up_blocks`` (SD-1.5: the official nine), or a list."""
    if layers != "decoder":
        names = [n.strip() for n in layers.split(",") if n.strip()]
        known = {n for n, _ in unet.named_modules()}
        bad = [n for n in names if n not in known]
        if bad:
            raise ConfigError(f"vcr.layers names modules the UNet does not have: {bad}",
                              "use 'decoder' or names like up_blocks.1.attentions.0.transformer_blocks.0.attn1")
        return names
    return [n.rsplit(".", 1)[0] for n in unet.attn_processors if n.startswith("up_blocks") and n.endswith("attn1.processor")]


def install(unet, state: VCRState, layers: str = "decoder") -> dict:
    """Install VCR processors on the named layers (others unchanged); returns the previous processors."""
    previous = dict(unet.attn_processors)
    procs = dict(previous)
    for name in decoder_self_attentions(unet, layers):
        procs[f"{name}.processor"] = VCRAttnProcessor(state, name)
    unet.set_attn_processor(procs)
    return previous


def orbit_azimuths(num_views: int) -> list[float]:
    """``-180 + i * 360 / V`` (official: 32 views at 11.25 deg)."""
    if num_views < 8 or num_views % 8:
        raise ConfigError(f"vcr.num_views must be a positive multiple of 8, got {num_views}",
                          "use 8, 16 or 32 (official) so the principal and key views are on the orbit")
    return [-180.0 + i * 360.0 / num_views for i in range(num_views)]


@torch.no_grad()
def refine_views(prior, latents: Tensor, azimuths: list[float], text_pos: Tensor, text_neg: Tensor, id_pos, id_neg,
                 poses: Tensor, cfg) -> Tensor:
    """Refined latents of V views ``[V, 4, h, w]`` (last ``refine_steps`` of ``ddim_steps`` DDIM steps, CFG)."""
    from diffusers import DDIMScheduler

    V = latents.shape[0]
    sched = DDIMScheduler.from_config(prior.scheduler.config)
    sched.set_timesteps(cfg.ddim_steps)
    ts = sched.timesteps[-cfg.refine_steps:]
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn((1, *latents.shape[1:]), generator=g).to(latents).expand(V, -1, -1, -1)
    z = sched.add_noise(latents, noise, ts[:1].repeat(V))
    state = VCRState(lambda_self=cfg.lambda_self)
    if cfg.mode == "vcr":
        roles = plan_views(azimuths, cfg.key_reference)
        groups = [[i for i, r in enumerate(roles) if r.kind == k] for k in ("principal", "key", "intermediate")]
        groups = [grp for grp in groups if grp]
    elif cfg.mode == "independent":
        roles, groups = [], [list(range(V))]
    else:
        raise ConfigError(f"unknown vcr.mode {cfg.mode!r}", "use 'vcr' or 'independent'")
    state.roles = roles
    previous = install(prior.unet, state, cfg.layers)
    prior.set_ip_scale(cfg.ip_scale, cfg.structure_scale)
    try:
        for t in ts:
            eps = torch.empty_like(z)
            state.clear()
            for grp in groups:
                n = len(grp)
                state.rows = [(v, h) for h in (0, 1) for v in grp] if cfg.mode == "vcr" else None
                zin = torch.cat([z[grp], z[grp]])
                text = torch.cat([text_neg.expand(n, -1, -1), text_pos.expand(n, -1, -1)])
                ident = id_neg.expand(n).cat([id_pos.expand(n)])
                e = prior.predict_noise(zin, t.reshape(1), text, ident, torch.cat([poses[grp], poses[grp]])).float()
                e_u, e_c = e.chunk(2)
                eps[grp] = (e_u + cfg.guidance_scale * (e_c - e_u)).to(eps.dtype)
            z = sched.step(eps, t, z).prev_sample
    finally:
        prior.unet.set_attn_processor(previous)
        state.rows = None
    return z
