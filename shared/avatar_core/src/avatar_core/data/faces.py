"""Faces of the synthetic avatars: identity beyond colour (brows, lips, nose shading, facial hair, glasses).

The features are drawn from their own random stream (``sample_face``), recorded under ``attributes["face"]`` and
never named in captions; ``paint_face`` paints them with the eyes and cheeks on the front-of-head texels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from avatar_core.data.palettes import (
    BROW_THICKNESS,
    EYE_COLOURS,
    FACIAL_HAIR,
    GLASSES,
    GLASSES_COLOURS,
    LIP_FULLNESS,
    LIP_TINTS,
    SEGMENT_NAMES,
    pick,
    rgb,
)

if TYPE_CHECKING:
    from avatar_core.data.appearance import Landmarks


def sample_face(rng: np.random.Generator, gender: str) -> dict[str, Any]:
    """Painted face features that tell people apart beyond colour: brows, lips, nose shading, facial hair, glasses."""
    face: dict[str, Any] = {
        "brow_thickness": pick(rng, BROW_THICKNESS),
        "brow_arch": float(rng.uniform(0.0, 0.008)),
        "brow_tilt": float(rng.uniform(-0.004, 0.004)),
        "lip_fullness": pick(rng, LIP_FULLNESS),
        "lip_width": float(rng.uniform(0.017, 0.026)),
        "lip_tint": pick(rng, LIP_TINTS),
        "nose_shading": float(rng.uniform(0.0, 1.0)),
        "facial_hair": "none",
        "glasses": "none",
    }
    if gender == "man":
        face["facial_hair"] = pick(rng, FACIAL_HAIR, [0.55, 0.15, 0.1, 0.2])
    if rng.random() < 0.25:
        face["glasses"] = pick(rng, GLASSES[1:])
        face["glasses_colour"] = pick(rng, GLASSES_COLOURS)
    return face



def paint_face(pos: Tensor, lm: Landmarks, tex: Tensor, seg: Tensor, attributes: dict[str, Any], skin: Tensor,
               hair_rgb: Tensor) -> tuple[Tensor, Tensor]:
    """Cheeks, eyes (sclera, iris, pupil, lash line), brows, lips, nose shading, facial hair and glasses.

    ``pos`` [N, 3] are the template positions of the face texels whose colours ``tex`` [N, 3] and labels ``seg`` [N]
    are painted; ``lm`` the template landmarks the features sit at.
    """
    x, y, z = pos.unbind(-1)
    for eye in (lm.eye_l, lm.eye_r):
        cheek = (x - eye[0]) ** 2 + (y - (eye[1] - 0.035)) ** 2
        blush = 0.08 * torch.exp(-cheek / (2 * 0.012**2))
        tex = tex * (1 - blush[:, None]) + torch.tensor([0.85, 0.35, 0.35]) * blush[:, None]
    iris_rgb = rgb(EYE_COLOURS, attributes["eye_colour"])
    grey = attributes["hair"]["colour"] in ("white", "grey")
    brow_rgb = hair_rgb * (0.7 if grey else 0.8)
    for eye in (lm.eye_l, lm.eye_r):
        dx, dy = x - eye[0], y - eye[1]
        near = z > float(eye[2]) - 0.03
        e = (dx / 0.0115) ** 2 + (dy / 0.0048) ** 2
        sclera = near & (e < 1.0)
        r = torch.sqrt(dx**2 + dy**2)
        tex[sclera] = torch.tensor([0.92, 0.90, 0.87])
        tex[sclera & (r < 0.0055)] = iris_rgb
        tex[sclera & (r < 0.0024)] = torch.tensor([0.03, 0.03, 0.03])
        lash = near & (e >= 1.0) & (e < 1.7) & (dy > -0.001)
        tex[lash] = tex[lash] * 0.35
        seg[sclera] = SEGMENT_NAMES.index("eyes")
        # An arched brow over each eye, its outer end a little lower (thickness, arch and tilt per face).
        face = attributes.get("face", {})
        arch = float(face.get("brow_arch", 0.004))
        tilt = float(face.get("brow_tilt", 0.0)) * (dx * torch.sign(eye[0])) / 0.02
        half = BROW_THICKNESS.get(face.get("brow_thickness", ""), 0.0028)
        arc = eye[1] + 0.017 + arch * (1 - (dx / 0.02) ** 2) + tilt
        brow = near & (dx.abs() < 0.02) & ((y - arc).abs() < half) & ((dx * torch.sign(eye[0])) > -0.014)
        tex[brow] = brow_rgb
        seg[brow] = SEGMENT_NAMES.index("brows")
    face = attributes.get("face", {})
    my = lm.mouth_y
    nose = lm.nose
    front = z > float(nose[2]) - 0.06
    if face:
        # Nose shading: darker sides and a lit ridge, stronger for a more sculpted nose.
        k = float(face["nose_shading"])
        ny0, ny1 = float(nose[1]), float(lm.eye_l[1]) - 0.005
        along = ((y - ny0) / (ny1 - ny0)).clamp(0, 1)
        on_nose = front & (y > ny0 - 0.006) & (y < ny1)
        side = on_nose & (x.abs() > 0.006) & (x.abs() < 0.013 + 0.004 * (1 - along))
        ridge = on_nose & (x.abs() < 0.003)
        tex[side] = tex[side] * (1 - 0.25 * k)
        tex[ridge] = (tex[ridge] * (1 + 0.12 * k)).clamp(0, 1)
        tex[front & ((x / 0.012) ** 2 + ((y - ny0 + 0.004) / 0.004) ** 2 < 1.0)] *= 1 - 0.2 * k  # nostrils
    lip_h = LIP_FULLNESS.get(face.get("lip_fullness", ""), 0.0075)
    lip_w = float(face.get("lip_width", 0.022))
    lips = front & ((x / lip_w) ** 2 + ((y - my) / lip_h) ** 2 < 1.0)
    lip_rgb = skin * torch.tensor(LIP_TINTS.get(face.get("lip_tint", ""), (0.85, 0.55, 0.55))) + torch.tensor([0.06, 0.0, 0.0])
    tex[lips] = lip_rgb
    tex[lips & ((y - my).abs() < 0.0011)] = lip_rgb * 0.45
    seg[lips] = SEGMENT_NAMES.index("lips")
    hair = face.get("facial_hair", "none")
    if hair != "none":
        chin = my - 0.045
        if hair == "moustache":
            region = front & (x.abs() < lip_w + 0.004) & (y > my + lip_h * 0.6) & (y < float(nose[1]) - 0.007)
            amount = 0.9
        else:
            region = front & ~lips & (y < float(nose[1]) - 0.007) & (y > chin - 0.015) & (x.abs() < 0.06)
            amount = 0.35 if hair == "stubble" else 0.9
        tex[region] = tex[region] * (1 - amount) + hair_rgb * 0.8 * amount
        seg[region] = SEGMENT_NAMES.index("facial_hair")
    if face.get("glasses", "none") != "none":
        frame_rgb = torch.tensor(GLASSES_COLOURS[face["glasses_colour"]])
        for eye in (lm.eye_l, lm.eye_r):
            dx, dy = x - eye[0], y - eye[1]
            if face["glasses"] == "round":
                d = torch.sqrt(dx**2 + dy**2)
                rim = (d > 0.016) & (d < 0.0185)
            else:
                d = torch.maximum(dx.abs() / 0.019, dy.abs() / 0.013)
                rim = (d > 0.9) & (d < 1.0)
            rim = rim & (z > float(eye[2]) - 0.03)
            tex[rim] = frame_rgb
            seg[rim] = SEGMENT_NAMES.index("glasses")
        bridge = front & (x.abs() < 0.012) & ((y - float(lm.eye_l[1]) - 0.002).abs() < 0.0012)
        tex[bridge] = frame_rgb
        seg[bridge] = SEGMENT_NAMES.index("glasses")
    return tex, seg
