"""Named palettes and label sets of the synthetic avatars (sRGB in [0, 1]).

Captions name these colours (:mod:`avatar_core.data.captions`), the painter (:mod:`avatar_core.data.appearance`,
:mod:`avatar_core.data.faces`) paints them, and scorers read them back.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

GARMENT_COLOURS: dict[str, tuple[float, float, float]] = {
    "black": (0.08, 0.08, 0.09), "white": (0.93, 0.93, 0.91), "grey": (0.52, 0.53, 0.55),
    "navy": (0.11, 0.15, 0.36), "blue": (0.16, 0.36, 0.78), "light blue": (0.55, 0.72, 0.90),
    "red": (0.78, 0.12, 0.13), "maroon": (0.45, 0.08, 0.14), "green": (0.18, 0.55, 0.24),
    "dark green": (0.08, 0.30, 0.16), "olive": (0.45, 0.45, 0.20), "yellow": (0.95, 0.82, 0.20),
    "orange": (0.93, 0.48, 0.12), "pink": (0.94, 0.56, 0.70), "purple": (0.46, 0.24, 0.60),
    "brown": (0.42, 0.27, 0.15), "beige": (0.83, 0.75, 0.60), "teal": (0.10, 0.50, 0.52),
}
SKIN_TONES: dict[str, tuple[float, float, float]] = {
    "pale": (0.96, 0.84, 0.76), "fair": (0.92, 0.76, 0.64), "light": (0.86, 0.68, 0.54),
    "medium": (0.76, 0.56, 0.40), "tan": (0.66, 0.46, 0.31), "brown": (0.50, 0.33, 0.21),
    "dark": (0.33, 0.21, 0.14),
}
HAIR_COLOURS: dict[str, tuple[float, float, float]] = {
    "black": (0.06, 0.05, 0.05), "dark brown": (0.20, 0.12, 0.07), "brown": (0.38, 0.24, 0.13),
    "auburn": (0.50, 0.20, 0.10), "red": (0.70, 0.28, 0.12), "blonde": (0.85, 0.70, 0.42),
    "grey": (0.60, 0.60, 0.60), "white": (0.88, 0.87, 0.84),
}
EYE_COLOURS: dict[str, tuple[float, float, float]] = {
    "brown": (0.32, 0.18, 0.08), "dark brown": (0.16, 0.09, 0.05), "blue": (0.25, 0.45, 0.70),
    "green": (0.28, 0.48, 0.30), "hazel": (0.45, 0.35, 0.15), "grey": (0.45, 0.50, 0.55),
}
HAIR_STYLES = ("short", "buzz", "bob", "long", "bald")
#: Painted face features (identity beyond colour); recorded under ``attributes["face"]``, never in captions.
BROW_THICKNESS = {"thin": 0.0018, "medium": 0.0028, "thick": 0.0042}  # half-height in metres
LIP_FULLNESS = {"thin": 0.0055, "medium": 0.0075, "full": 0.0095}  # vertical semi-axis in metres
LIP_TINTS: dict[str, tuple[float, float, float]] = {"natural": (0.85, 0.55, 0.55), "rose": (0.95, 0.45, 0.50),
                                                    "dark": (0.60, 0.35, 0.35)}
FACIAL_HAIR = ("none", "stubble", "moustache", "beard")
GLASSES = ("none", "round", "square")
GLASSES_COLOURS: dict[str, tuple[float, float, float]] = {"black": (0.05, 0.05, 0.05), "brown": (0.35, 0.2, 0.1),
                                                          "gold": (0.8, 0.65, 0.3)}
PATTERNS = ("solid", "striped", "checked", "dotted")
TOP_TYPES = ("shirt", "jacket")
BOTTOM_TYPES = ("trousers", "shorts", "skirt")
GARMENT_TYPES = ("shirt", "jacket", "dress", "trousers", "shorts", "skirt")

#: Labels of the per-avatar segment map (``segments.png``), one per painted region.
SEGMENT_NAMES: tuple[str, ...] = (
    "none", "skin", "hair", "eyes", "brows", "lips", "shirt", "jacket", "dress", "trousers", "shorts",
    "skirt", "shoes", "facial_hair", "glasses",
)


def pick(rng: np.random.Generator, options, p=None):
    """One of ``options`` (a sequence or a palette's names), drawn from ``rng`` with probabilities ``p``."""
    options = list(options)
    return options[int(rng.choice(len(options), p=p))]


def rgb(palette: dict[str, tuple[float, float, float]], name: str) -> Tensor:  # [3]
    return torch.tensor(palette[name], dtype=torch.float32)
