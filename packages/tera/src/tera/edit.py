"""Structure-aware editing and virtual try-on in the UV latent (TeRA Sec. 3.5).

The UV latent is aligned with the body, so a garment is a fixed set of latent cells: the body's UV part masks,
brought to the latent resolution, say which cells an edit may change. The kept cells stay the source latent; the
edited cells are denoised from noise under the new prompt, and after every reverse step the kept cells are replaced
by the source re-noised to the sample's new level (:func:`avatar_core.diffusion.inpaint_merge`), so the model fills
in the garment consistently with what is kept. The paper's ablation baseline, direct feature replacement, generates
a whole new latent for the prompt and pastes its edited cells into the source (``method="replace"``).

Mask resizing rule (``rule``) from the UV resolution R to the latent's h x w:

- ``"any"`` (default): a latent cell is edited when any texel it covers belongs to the region, so the edited
  area contains the whole garment (a cell half on the sleeve is regenerated, not kept half-old);
- ``"majority"``: when at least half of its texels do;
- ``"nearest"``: the texel at the cell's centre decides.

``dilate`` then grows the edited area by that many cells (a square neighbourhood), which gives the sampler room to
blend into the kept region when the decoder's receptive field spans several cells.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from avatar_core.body.model import PART_NAMES
from avatar_core.diffusion import Respaced, inpaint_merge
from avatar_core.errors import InputError
from tera.latent_diffusion import StructuredLatentDiffusion
from tera.text import TextCondition

__all__ = ["EDIT_METHODS", "RESIZE_RULES", "TRYON_REGIONS", "edit", "parse_regions", "region_mask", "region_names",
           "region_parts", "seam_gradient"]

#: Try-on regions as unions of the kernel's body parts (avatar_core.body.model.PART_NAMES); each part is also a
#: region under its own name.
TRYON_REGIONS: dict[str, tuple[str, ...]] = {
    "upper_clothes": ("upper_body", "arms"),
    "lower_clothes": ("lower_body", "legs"),
    "shoes": ("feet",),
    "outfit": ("upper_body", "arms", "lower_body", "legs"),
    **{name: (name,) for name in PART_NAMES},
}

RESIZE_RULES = ("any", "majority", "nearest")
EDIT_METHODS = ("inpaint", "replace")


def region_names() -> list[str]:
    """Every valid region name."""
    return list(TRYON_REGIONS)


def parse_regions(names: str | Sequence[str]) -> list[str]:
    """'upper_clothes+shoes', 'upper_clothes,shoes' or a list; unknown names raise with the valid ones listed."""
    if isinstance(names, str):
        names = [n for n in names.replace(",", "+").split("+")]
    names = [str(n).strip() for n in names]
    if not names or any(not n for n in names):
        raise InputError("no region named (empty name)", f"name one or more of: {', '.join(region_names())}")
    unknown = [n for n in names if n not in TRYON_REGIONS]
    if unknown:
        raise InputError(f"unknown region(s) {', '.join(map(repr, unknown))}",
                         f"valid regions: {', '.join(region_names())} (join several with '+')")
    return names


def region_parts(names: str | Sequence[str]) -> list[str]:
    """The kernel body parts (sorted) that a union of named regions covers, e.g. 'shoes' -> ['feet']."""
    return sorted({p for n in parse_regions(names) for p in TRYON_REGIONS[n]})


def region_mask(
    part_masks: Mapping[str, Tensor],  # name -> [R, R] bool, e.g. UVMapper.part_masks()
    names: str | Sequence[str],
    latent_hw: tuple[int, int],
    rule: str = "any",
    dilate: int = 0,
) -> Tensor:  # [h, w] bool, True = edited
    """Edited latent cells for a union of named regions, resized from UV to latent resolution (see module doc)."""
    if rule not in RESIZE_RULES:
        raise InputError(f"unknown mask resize rule {rule!r}", f"use one of: {', '.join(RESIZE_RULES)}")
    if int(dilate) < 0:
        raise InputError(f"dilate must be >= 0 cells, got {dilate}", "pass 0 for no growth")
    parts = region_parts(names)
    missing = [p for p in parts if p not in part_masks]
    if missing:
        raise InputError(f"part masks lack {', '.join(missing)}",
                         "pass UVMapper.part_masks() (all of avatar_core's PART_NAMES)")
    uv = torch.stack([part_masks[p].bool() for p in parts]).any(0).float()[None, None]  # [1, 1, R, R]
    h, w = int(latent_hw[0]), int(latent_hw[1])
    if rule == "nearest":
        cells = F.interpolate(uv, size=(h, w), mode="nearest") > 0.5
    else:
        # Fraction of each cell's texels in the region ("area" is exact block averaging when R is a multiple).
        frac = F.adaptive_avg_pool2d(uv, (h, w))
        cells = frac > 0 if rule == "any" else frac >= 0.5
    if dilate:
        cells = F.max_pool2d(cells.float(), 2 * int(dilate) + 1, stride=1, padding=int(dilate)) > 0
    return cells[0, 0]


def _as_cells(mask: Tensor, hw: tuple[int, int]) -> Tensor:  # [h, w] or [1, h, w] -> [1, 1, h, w] bool
    m = mask
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2 or tuple(m.shape) != tuple(hw):
        raise InputError(f"region mask must be [h, w] or [1, h, w] with (h, w) = {tuple(hw)}, got {tuple(mask.shape)}",
                         "build it with region_mask(part_masks, names, latent_hw)")
    return m.bool()[None, None]


@torch.no_grad()
def edit(
    model: StructuredLatentDiffusion,
    latent_source: Tensor,  # [C, h, w] or [B, C, h, w] in decoder units
    region: Tensor,  # [h, w] or [1, h, w] bool, True = edited
    prompt: str | Sequence[str] | TextCondition | Tensor,
    steps: int | None = None,
    guidance: float | None = None,
    generator: torch.Generator | None = None,
    sampler: str = "ddpm",
    eta: float = 0.0,
    method: str = "inpaint",
) -> Tensor:  # the source's shape
    """Re-generate the ``region`` of a latent under ``prompt``, keeping the rest exactly (Sec. 3.5, try-on).

    Args:
        model: the trained latent diffusion model.
        latent_source: the avatar's latent(s), in decoder units.
        region: edited cells (see :func:`region_mask`).
        prompt: the new description (one, or one per latent).
        steps, guidance, sampler, eta: as in :meth:`StructuredLatentDiffusion.sample` (paper: 100 DDPM steps).
        generator: CPU generator fixing all noise (initial, ancestral, re-noising).
        method: ``"inpaint"`` (paper: re-noise the kept region and merge at every step) or ``"replace"``
            (ablation baseline: sample a whole new latent and paste its region into the source).

    Outside ``region`` the result equals the source bit for bit.
    """
    if method not in EDIT_METHODS:
        raise InputError(f"unknown edit method {method!r}", f"use one of: {', '.join(EDIT_METHODS)}")
    single = latent_source.ndim == 3
    src = latent_source[None] if single else latent_source
    src = model.check_latents(src.to(model.device, model.null_states.dtype))
    b = src.shape[0]
    cells = _as_cells(region.to(model.device), model.latent_shape[1:])  # [1, 1, h, w]
    cond = model.encode_text(prompt).repeat_to(b)

    if method == "inpaint":
        known = model.normalize(src)
        keep = (~cells).to(known.dtype)
        noise_device = generator.device if generator is not None else "cpu"

        def merge(x: Tensor, level: int, chain: Respaced) -> Tensor:
            noise = torch.randn(x.shape, generator=generator, device=noise_device).to(x)
            return inpaint_merge(x, known, keep, level, noise, chain.alphas_cumprod)

        new = model.sample(cond, steps=steps, guidance=guidance, generator=generator, sampler=sampler, eta=eta,
                           hook=merge)
    else:
        new = model.sample(cond, steps=steps, guidance=guidance, generator=generator, sampler=sampler, eta=eta)
    # The last merge already restored the kept cells in diffusion units; pasting the untouched source makes
    # them exact in decoder units too, free of the normalise/denormalise round-off.
    out = torch.where(cells, new, src)
    return out[0] if single else out


def seam_gradient(
    x: Tensor,  # [C, H, W] (a latent, or a decoded attribute map)
    region: Tensor,  # [H, W] or [1, H, W] bool, True = edited
    valid: Tensor | None = None,  # [H, W] bool: cells that carry content (e.g. the UV chart); all if None
) -> dict[str, float]:
    """Mean gradient magnitude across the region's boundary ('seam') and elsewhere ('interior'), and their ratio.

    The gradient between horizontally or vertically neighbouring cells is the L2 norm over channels of their
    difference; a pair is on the seam when exactly one of the two cells is edited. A visible seam (the ablation's
    artefact) shows as ratio > 1; a natural transition keeps it near 1.
    """
    if x.ndim != 3:
        raise InputError(f"seam_gradient expects [C, H, W], got {tuple(x.shape)}", "pass one latent or map")
    m = _as_cells(region.to(x.device), x.shape[1:])[0, 0]
    v = torch.ones_like(m) if valid is None else valid.to(x.device).bool()
    xf = x.double()
    gx = (xf[:, :, 1:] - xf[:, :, :-1]).norm(dim=0)  # [H, W-1]
    gy = (xf[:, 1:, :] - xf[:, :-1, :]).norm(dim=0)  # [H-1, W]
    seam_x, seam_y = m[:, 1:] ^ m[:, :-1], m[1:, :] ^ m[:-1, :]
    ok_x, ok_y = v[:, 1:] & v[:, :-1], v[1:, :] & v[:-1, :]
    seam = torch.cat([gx[seam_x & ok_x], gy[seam_y & ok_y]])
    inner = torch.cat([gx[~seam_x & ok_x], gy[~seam_y & ok_y]])
    if seam.numel() == 0:
        raise InputError("the region has no boundary inside the valid area", "pick a region that is not empty "
                         "and does not cover everything")
    s = float(seam.mean())
    i = float(inner.mean()) if inner.numel() else float("nan")
    return {"seam": s, "interior": i, "ratio": s / i if i > 0 else float("inf")}
