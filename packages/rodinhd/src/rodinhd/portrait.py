"""Portraits as users have them (``rodinhd sample --portrait``): an RGBA image of any aspect, or an RGB image with a
separate mask, framed the way the training portraits are.

The dataset's portraits (:mod:`avatar_core.data.generate`) are square RGBA front views from 16 cm above the eyes
(the top of the head) to 30 cm below the neck: the head's top sits 3-6% of the side below the top edge, the
shoulders fill the width and the body runs off the bottom edge. :func:`frame_portrait` reproduces that from the
alpha alone: a square whose side is the width of the person's alpha bounding box, centred on it horizontally,
its top :data:`TOP_MARGIN` of the side above the bounding box's top; whatever the square takes from outside the
image is transparent. An upper-body photo (head to chest, arms down) frames best; a full-body photo with the arms
down gives the same crop (the shoulders set the width), with the arms spread it includes more of the body.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from avatar_core.errors import InputError
from avatar_core.io import load_image
from rodinhd.data import MIN_PORTRAIT_SIZE

__all__ = ["MIN_PERSON_PIXELS", "TOP_MARGIN", "frame_portrait", "load_user_portrait"]

#: Space above the top of the head, as a fraction of the square's side (the dataset's portraits: 3-6%).
TOP_MARGIN = 0.05
#: Narrowest person (alpha bounding-box width, pixels) a portrait may hold.
MIN_PERSON_PIXELS = 16
#: Alpha above which a pixel is the person.
ALPHA_THRESHOLD = 0.5


def _is_grayscale(rgb: Tensor, alpha: Tensor) -> bool:  # [H, W, 3], [H, W]
    person = alpha > ALPHA_THRESHOLD  # only the person's pixels count (an empty image is refused elsewhere)
    px = rgb[person]
    return bool(px.numel()) and bool(((px.max(dim=-1).values - px.min(dim=-1).values) <= 2.0 / 255.0).all())


def frame_portrait(rgba: Tensor, what: str = "portrait") -> Tensor:  # [H, W, 4] -> [S, S, 4]
    """Crop / pad a straight-alpha RGBA image of any aspect to the training framing (module docstring)."""
    alpha = rgba[..., 3]
    person = alpha > ALPHA_THRESHOLD
    if not bool(person.any()):
        raise InputError(f"{what} is fully transparent (no pixel has alpha above 0.5): there is no person to "
                         "condition on",
                         "pass the portrait with the person opaque (alpha or mask > 0.5), or use --unconditional")
    rows = torch.nonzero(person.any(dim=1)).flatten()
    cols = torch.nonzero(person.any(dim=0)).flatten()
    top, left, right = int(rows[0]), int(cols[0]), int(cols[-1]) + 1
    side = right - left
    if side < MIN_PERSON_PIXELS:
        raise InputError(f"the person in {what} is only {side} pixels wide",
                         f"use a portrait where the person is at least {MIN_PERSON_PIXELS} pixels wide "
                         "(the paper uses 256x256 portraits)")
    y0 = top - round(TOP_MARGIN * side)
    x0 = (left + right) // 2 - side // 2
    H, W = alpha.shape
    # Pad with transparent pixels wherever the square leaves the image, then cut it out.
    pad = (max(0, -x0), max(0, x0 + side - W), max(0, -y0), max(0, y0 + side - H))
    padded = F.pad(rgba.permute(2, 0, 1), pad, value=0.0).permute(1, 2, 0)
    y, x = y0 + pad[2], x0 + pad[0]
    return padded[y:y + side, x:x + side].contiguous()


def load_user_portrait(path: str | os.PathLike, mask: str | os.PathLike | None = None,
                       frame: bool = True) -> Tensor:  # [S, S, 4] straight alpha in [0, 1]
    """A user's portrait: RGBA (the alpha separates the person), or RGB plus ``mask`` (a grey or RGB image of
    the same size, white = person), framed as the training portraits are (``frame=False``: used as it is, which
    then must be square). Grayscale pictures, RGB without a mask and tiny images get a one-line error."""
    path = Path(path)
    img = load_image(path)  # MissingFileError / CorruptFileError
    H, W, C = img.shape
    if C == 1:
        raise InputError(f"portrait {path} is a grayscale image",
                         "pass a colour photo: the model was trained on colour portraits")
    if min(H, W) < MIN_PORTRAIT_SIZE:
        raise InputError(f"portrait {path} is only {W}x{H} pixels",
                         f"use at least {MIN_PORTRAIT_SIZE}x{MIN_PORTRAIT_SIZE} (the paper uses 256x256)")
    if mask is not None:
        m = load_image(mask)
        if tuple(m.shape[:2]) != (H, W):
            raise InputError(f"mask {mask} is {m.shape[1]}x{m.shape[0]} pixels, the portrait {W}x{H}",
                             "pass a mask of the portrait's size (white = person, black = background)")
        alpha = m[..., :3].mean(dim=-1) if m.shape[-1] >= 3 else m[..., 0]
        img = torch.cat([img[..., :3], alpha[..., None]], dim=-1)
    elif C != 4:
        raise InputError(f"portrait {path} has no alpha channel and no mask was given",
                         "pass --mask MASK (white = person) or an RGBA image with a transparent background")
    if _is_grayscale(img[..., :3], img[..., 3]):
        raise InputError(f"portrait {path} is grayscale (its colour channels are equal)",
                         "pass a colour photo: the model was trained on colour portraits")
    if not frame:
        if H != W:
            raise InputError(f"portrait {path} is {W}x{H} pixels; without framing it must be square",
                             "drop --no-frame to crop it around the person, or crop it square yourself")
        if not bool((img[..., 3] >= 1 / 255).any()):
            raise InputError(f"portrait {path} is fully transparent: there is no person to condition on",
                             "pass the portrait with the person opaque, or use --unconditional")
        return img
    return frame_portrait(img, f"portrait {path}")
