"""Texture editing of a generated avatar from the command line (``tera recolour``): the colour channels of its
decoded attribute maps are replaced inside a UV region (:func:`tera.animate.edit_texture`); geometry is kept.

The edit lives in the attribute maps, not in the latent (a latent that decodes to the recoloured maps is not
searched for), so the result folder holds the edited maps, the Gaussians they give (PLY) and a preview; it is a
result folder of its own (``avatar_core.results``): by default beside the avatar,
``<avatar>__recolour_<region>_<colour>_<hash>``, replaced only with ``overwrite``; the avatar is never written."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch

from avatar_core.data.appearance import GARMENT_COLOURS
from avatar_core.errors import InputError
from avatar_core.io import image_grid, save_image, save_json, save_tensors
from avatar_core.results import check_result_dir, prepare_result_dir, short_hash, slug
from tera import animate as anim
from tera import edit as edit_mod
from tera.avatars import (
    Models,
    body_centre,
    decode,
    load_avatar,
    load_models,
    maps_image,
    stored_shape,
    turntable_cameras,
)
from tera.config import TeraConfig
from tera.uv_gaussians import ATTRIBUTE_SLICES

__all__ = ["RECOLOUR_KIND", "parse_colour", "recolour"]

RECOLOUR_KIND = "tera.recolour"


def parse_colour(colour: str) -> tuple[float, float, float]:
    """A palette name (``"light blue"``), ``#rrggbb`` or ``r,g,b`` in [0, 1] -> RGB in [0, 1]."""
    text = str(colour).strip().lower()
    if text in GARMENT_COLOURS:
        return tuple(float(c) for c in GARMENT_COLOURS[text])
    if re.fullmatch(r"#[0-9a-f]{6}", text):
        return tuple(int(text[i:i + 2], 16) / 255.0 for i in (1, 3, 5))
    parts = text.split(",")
    if len(parts) == 3:
        try:
            rgb = tuple(float(p) for p in parts)
        except ValueError:
            rgb = ()
        if len(rgb) == 3 and all(0.0 <= c <= 1.0 for c in rgb):
            return rgb
    raise InputError(f"unknown colour {colour!r}",
                     f"use a palette name ({', '.join(sorted(GARMENT_COLOURS))}), #rrggbb, or r,g,b in [0, 1]")


def recolour(cfg: TeraConfig, avatar_path: str | Path, region: str, colour: str, out_dir: str | Path | None = None,
             strength: float = 1.0, overwrite: bool = False, models: Models | None = None) -> dict[str, Any]:
    """Recolour ``region`` (try-on regions or body parts, joined with ``+``) of the avatar to ``colour``."""
    regions = edit_mod.parse_regions(region)  # every argument checked before anything is loaded or written
    rgb = parse_colour(colour)
    if not 0.0 <= float(strength) <= 1.0:
        raise InputError(f"strength must be in [0, 1], got {strength}", "1 replaces the colours, 0 keeps them")
    src = Path(avatar_path) if Path(avatar_path).is_dir() else Path(avatar_path).parent
    settings = {"region": "+".join(regions), "rgb": list(rgb), "strength": float(strength), "source": str(src)}
    name = f"{src.name}__recolour_{slug('_'.join(regions), 24, 'region')}_{slug(colour, 16, 'colour')}"
    out = Path(out_dir) if out_dir is not None else src.parent / f"{name}_{short_hash(settings)}"
    check_result_dir(out, RECOLOUR_KIND, overwrite, inputs=[avatar_path])
    models = models or load_models(cfg, with_diffusion=False)
    latent, meta = load_avatar(avatar_path, models)
    t0 = time.perf_counter()
    shape = stored_shape(meta)  # the source's own body (None: an avatar made before shapes were generated)
    maps, _ = decode(models, latent, shape)
    new = anim.edit_texture(maps, models.avatar.uv_mapper, regions, color=rgb, strength=float(strength))
    with torch.no_grad():
        g = models.avatar(new, shape=None if shape is None else shape.reshape(1, -1).to(models.device))
        cams = turntable_cameras(cfg, 4, body_centre(g.means[0]))
        views, _ = models.avatar.render(g, cams, tuple(cfg.data.background))
    changed = (new - maps)[0, ATTRIBUTE_SLICES["rgb"]].abs().amax(0) > 0
    prepare_result_dir(out, RECOLOUR_KIND, overwrite, inputs=[avatar_path], info={"source": str(avatar_path)})
    files = {"ply": str(g.save_ply(out / "avatar.ply")),
             "maps": str(save_tensors(out / "maps.safetensors", {"maps": new[0].cpu()},
                                      {"channels": {k: [v.start, v.stop] for k, v in ATTRIBUTE_SLICES.items()},
                                       "source": str(avatar_path)})),
             "maps_png": str(save_image(out / "maps.png", maps_image(new))),
             "preview": str(save_image(out / "preview.png", image_grid(views[0].cpu(), nrow=4)))}
    files["settings"] = str(save_json(out / "settings.json", {**settings, "source_prompt": meta.get("prompt"),
                                                              "body_shape": meta.get("body_shape"),
                                                              "texels_changed": int(changed.sum()), "files": files}))
    return {"dir": str(out), "files": files, "maps": new, "source_maps": maps, "texels_changed": int(changed.sum()),
            "seconds": time.perf_counter() - t0}
