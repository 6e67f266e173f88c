"""Appearance of the synthetic avatars: attribute sampling and UV texture painting (faces in :mod:`.faces`,
palettes in :mod:`.palettes`, whose names callers import from here too).

Every region is defined on the body's surface in 3D, on the *template* (average-shape, rest-pose) position
of each texel, so boundaries are clean lines on the body whatever the UV layout, and a texel means the same
anatomical place for every body shape: garments are body parts cut by height bands and by the position
along the arm, hair styles are shapes on the head, the face features sit at the eye / nose keypoints, and
patterns (stripes, checks, dots) are solid textures evaluated at the 3D position.

Colours come from named palettes so that captions can name them (:mod:`avatar_core.data.captions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avatar_core.body.model import OPENPOSE_18, PART_NAMES, BodyModel
from avatar_core.body.uv import UVMapper
from avatar_core.data.faces import paint_face, sample_face
from avatar_core.data.palettes import (  # noqa: F401
    BOTTOM_TYPES,
    EYE_COLOURS,
    GARMENT_COLOURS,
    GARMENT_TYPES,
    HAIR_COLOURS,
    HAIR_STYLES,
    PATTERNS,
    SEGMENT_NAMES,
    SKIN_TONES,
    TOP_TYPES,
)
from avatar_core.data.palettes import pick as _pick
from avatar_core.data.palettes import rgb as _rgb

#: Texels of padding copied outwards around every UV chart, so bilinear lookups at seams stay on colour.
_GUTTER = 4

# --------------------------------------------------------------------------------------------------
# Attributes
# --------------------------------------------------------------------------------------------------

#: Anny's phenotype age is piecewise linear in years between these anchors (from the ``anny`` wheel's
#: shape calibration: 11 y -> 0.415, 16 y -> 0.67, 18 y -> 0.77, 64 y -> 0.83, 110 y -> 1.0).
_AGE_YEARS = (11.0, 16.0, 18.0, 64.0, 110.0)
_AGE_ANNY = (0.415, 0.67, 0.77, 0.83, 1.0)


def anny_age(years: float) -> float:
    """Anny's ``age`` phenotype for an age in years (teenagers to the elderly)."""
    return float(np.interp(years, _AGE_YEARS, _AGE_ANNY))



def _contrasting(rng: np.random.Generator, colour: str, min_diff: float = 0.3) -> str:
    """A palette colour whose luminance differs from ``colour``'s by at least ``min_diff``."""
    lum = lambda c: float(np.dot(GARMENT_COLOURS[c], (0.299, 0.587, 0.114)))  # noqa: E731
    options = [c for c in GARMENT_COLOURS if abs(lum(c) - lum(colour)) >= min_diff]
    return _pick(rng, options)


def _garment(rng: np.random.Generator, kind: str, pattern_p: float = 0.45) -> dict[str, Any]:
    colour = _pick(rng, GARMENT_COLOURS)
    pattern = "solid" if rng.random() > pattern_p else _pick(rng, PATTERNS[1:])
    g: dict[str, Any] = {"type": kind, "colour": colour, "pattern": pattern}
    if pattern != "solid":
        g["pattern_colour"] = _contrasting(rng, colour)
        g["pattern_scale"] = float(rng.uniform(0.8, 1.3))
    return g


def sample_attributes(rng: np.random.Generator) -> dict[str, Any]:
    """One avatar's attributes (JSON-serialisable): body phenotype, skin, hair, eyes, garments, shoes."""
    gender = "woman" if rng.random() < 0.5 else "man"
    years = float(rng.choice([rng.uniform(14, 18), rng.uniform(18, 45), rng.uniform(45, 85)], p=[0.1, 0.55, 0.35]))
    pheno = {
        # Anny's gender axis runs from male (0) to female (1); keep near the ends for clear captions.
        "gender": float(rng.uniform(0.0, 0.15) if gender == "man" else rng.uniform(0.85, 1.0)),
        "age": anny_age(years),
        "muscle": float(rng.beta(2.0, 2.0) * 0.8 + 0.1),
        "weight": float(rng.beta(2.0, 2.0) * 0.85 + 0.05),
        "height": 0.5,  # replaced by the value that gives height_target_m (see generate.solve_height)
        "proportions": float(rng.uniform(0.3, 0.7)),
    }
    # Standing height in metres, roughly as in adult populations (teenagers a little shorter).
    mean, sd = (1.63, 0.065) if gender == "woman" else (1.76, 0.07)
    if years < 18:
        mean -= 0.04
    height_m = float(mean + sd * np.clip(rng.normal(), -2.2, 2.2))
    old = years >= 60
    hair_colours = list(HAIR_COLOURS)
    hp = np.array([0.22, 0.2, 0.18, 0.07, 0.06, 0.15, 0.07, 0.05] if not old else [0.05, 0.05, 0.05, 0.0, 0.0, 0.05, 0.5, 0.3])
    if gender == "woman":
        styles, sp = HAIR_STYLES[:4], [0.15, 0.02, 0.33, 0.5]
    else:
        styles, sp = HAIR_STYLES, [0.55, 0.2, 0.05, 0.08, 0.12 if not old else 0.3]
    sp = np.asarray(sp, np.float64)
    hair = {"style": _pick(rng, styles, sp / sp.sum()), "colour": _pick(rng, hair_colours, hp / hp.sum())}

    garments: list[dict[str, Any]] = []
    dress = gender == "woman" and rng.random() < 0.3
    if dress:
        d = _garment(rng, "dress")
        d["sleeves"] = _pick(rng, ("none", "short"))
        d["length"] = _pick(rng, ("knee", "mid-thigh"))
        garments.append(d)
    else:
        top_kind = "jacket" if rng.random() < 0.3 else "shirt"
        if top_kind == "jacket":
            inner = _garment(rng, "shirt", pattern_p=0.3)
            inner["sleeves"] = "long"
            jacket = _garment(rng, "jacket", pattern_p=0.2)
            jacket["sleeves"] = "long"
            if jacket["colour"] == inner["colour"]:
                inner["colour"] = _contrasting(rng, jacket["colour"], 0.2)
            garments += [jacket, inner]
        else:
            shirt = _garment(rng, "shirt")
            shirt["sleeves"] = _pick(rng, ("short", "long"))
            garments.append(shirt)
        bottoms = ("trousers", "shorts", "skirt") if gender == "woman" else ("trousers", "shorts")
        bp = np.array([0.55, 0.2, 0.25] if gender == "woman" else [0.75, 0.25])
        bottom = _garment(rng, _pick(rng, bottoms, bp), pattern_p=0.15)
        if bottom["colour"] == garments[0]["colour"]:
            bottom["colour"] = _contrasting(rng, garments[0]["colour"], 0.15)
        garments.append(bottom)
    # A child stream of the avatar's seed: the face features do not shift any other draw of the avatar.
    seq = getattr(rng.bit_generator, "seed_seq", None)
    face_rng = np.random.default_rng(seq.spawn(1)[0]) if seq is not None else np.random.default_rng(rng.integers(2**31))
    return {
        "gender": gender,
        "face": sample_face(face_rng, gender),
        "age_years": round(years, 1),
        "height_target_m": round(height_m, 3),
        "phenotype": pheno,
        "skin_tone": _pick(rng, SKIN_TONES),
        "hair": hair,
        "eye_colour": _pick(rng, EYE_COLOURS),
        "garments": garments,
        "shoes": {"colour": _pick(rng, ("black", "brown", "white", "grey", "navy", "red", "beige"))},
    }


def phenotype_vector(attributes: dict[str, Any], names: tuple[str, ...]) -> Tensor:  # [len(names)]
    """The body model's shape vector from the attributes' phenotype (Anny's order)."""
    return torch.tensor([float(attributes["phenotype"][n]) for n in names])


def describe_body(attributes: dict[str, Any], height_m: float) -> dict[str, str]:
    """Words for stature, build and age group, written back into the attributes as ``body_words``."""
    woman = attributes["gender"] == "woman"
    tall, short = (1.74, 1.58) if woman else (1.84, 1.68)
    stature = "tall" if height_m >= tall else "short" if height_m <= short else ""
    p = attributes["phenotype"]
    build = ("heavy-set" if p["weight"] >= 0.7 else "slim" if p["weight"] <= 0.3
             else "muscular" if p["muscle"] >= 0.72 else "")
    y = attributes["age_years"]
    age = "teenage" if y < 18 else "young" if y < 35 else "middle-aged" if y < 60 else "elderly"
    return {"stature": stature, "build": build, "age": age}


# --------------------------------------------------------------------------------------------------
# Painting
# --------------------------------------------------------------------------------------------------


def _smoothstep(edge0: float, edge1: float, x: Tensor) -> Tensor:
    t = ((x - edge0) / (edge1 - edge0)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)



@dataclass
class Landmarks:
    """Template landmarks (metres, canonical frame) that the region rules are written against."""

    neck: Tensor
    shoulder_y: float
    hip_y: float
    knee_y: float
    ankle_y: float
    eye_l: Tensor
    eye_r: Tensor
    nose: Tensor
    ear_z: float
    ear_y: float
    ear_x: float
    shoulder_l: Tensor
    wrist_l: Tensor
    head_top: float

    @property
    def mouth_y(self) -> float:
        # Facial thirds: the mouth sits about 1.2 eye-to-nose distances below the nose tip.
        eye_y = float(self.eye_l[1])
        return float(self.nose[1]) - 1.2 * (eye_y - float(self.nose[1]))


class TexturePainter:
    """Paints UV textures for one body model at one UV resolution (the geometry is computed once)."""

    def __init__(self, body: BodyModel, resolution: int = 512):
        self.body = body
        self.resolution = resolution
        self.mapper = UVMapper(body, resolution)
        with torch.no_grad():
            out = body.forward()
            pos = self.mapper.position_map(out.vertices)[0]  # [R, R, 3]
            nrm = self.mapper.normal_map(out.vertices)[0]
            kp = body.keypoints(out, OPENPOSE_18)[0].float()
        mask = self.mapper.mask
        self.mask = mask  # [R, R]
        self.pos = pos[mask].float()  # [M, 3] template position per valid texel
        self.nrm = nrm[mask].float()  # [M, 3]
        self.part = self.mapper.part_label_map()[mask]  # [M]
        k = {n: kp[i] for i, n in enumerate(OPENPOSE_18)}
        verts = out.vertices[0]
        self.lm = Landmarks(
            neck=k["neck"], shoulder_y=float((k["left_shoulder"][1] + k["right_shoulder"][1]) / 2),
            hip_y=float(k["left_hip"][1]), knee_y=float(k["left_knee"][1]), ankle_y=float(k["left_ankle"][1]),
            eye_l=k["left_eye"], eye_r=k["right_eye"], nose=k["nose"], ear_z=float(k["left_ear"][2]),
            ear_y=float(k["left_ear"][1]), ear_x=float(k["left_ear"][0]), shoulder_l=k["left_shoulder"],
            wrist_l=k["left_wrist"], head_top=float(verts[:, 1].max()),
        )
        self._arm_t = self._arm_coordinate()
        self._part_masks = {n: self.part == k for k, n in enumerate(PART_NAMES)}
        self._regions: dict[tuple, Tensor] = {}
        self._face_index = torch.nonzero(self._in("head") & (self.pos[:, 2] > float(self.lm.eye_l[2]) - 0.04))[:, 0]
        # The 4-neighbours of every valid texel, as indices into the valid-texel list (-1: outside the layout).
        R = resolution
        lookup = torch.full((R, R), -1, dtype=torch.long)
        lookup[mask] = torch.arange(int(mask.sum()))
        padded = torch.nn.functional.pad(lookup, (1, 1, 1, 1), value=-1)
        rows, cols = torch.nonzero(mask, as_tuple=True)
        self._neighbours = torch.stack([padded[rows + 1 + dr, cols + 1 + dc]
                                        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))])  # [4, M]
        # Nearest chart texel of every texel within the gutter: depends on the layout only, so computed once.
        from scipy import ndimage

        dist, (ii, jj) = ndimage.distance_transform_edt(~mask.numpy(), return_indices=True)
        self._gutter_src = torch.from_numpy(ii * resolution + jj).flatten()  # [R * R]
        self._gutter_keep = torch.from_numpy(dist <= _GUTTER).flatten()  # [R * R]

    # ---- geometry helpers ------------------------------------------------------------------------

    def _in(self, *names: str) -> Tensor:  # [M] bool
        out = self._part_masks[names[0]]
        for n in names[1:]:
            out = out | self._part_masks[n]
        return out

    def _cached(self, key: tuple, make) -> Tensor:
        """Garment regions depend on a few discrete choices only: compute each once per painter."""
        if key not in self._regions:
            self._regions[key] = make()
        return self._regions[key]

    def _arm_coordinate(self) -> Tensor:  # [M]
        """Position along the arm, 0 at the shoulder keypoint and 1 at the wrist (mirrored for the right arm)."""
        p = self.pos.clone()
        p[:, 0] = p[:, 0].abs()  # the body is left-right symmetric: measure both arms on the left one
        s, w = self.lm.shoulder_l, self.lm.wrist_l
        d = w - s
        return ((p - s) @ d) / float(d @ d)

    def _pattern(self, g: dict[str, Any], phase: Tensor) -> Tensor:  # [M] weight of the pattern colour
        """Solid textures in 3D: horizontal stripes, a 3D checker, or dots on a 3D lattice."""
        kind = g["pattern"]
        x, y, z = (self.pos + phase).unbind(-1)
        scale = float(g.get("pattern_scale", 1.0))
        aa = 0.004  # ~one texel at 512: a soft edge instead of aliasing
        if kind == "striped":
            period = 0.05 * scale
            f = torch.remainder(y / period, 1.0) * period
            return _smoothstep(0.0, aa, f) * (1 - _smoothstep(0.45 * period - aa, 0.45 * period, f))
        if kind == "checked":
            s = 0.06 * scale
            c = sum(torch.floor(v / s) for v in (x, y, z))
            return (torch.remainder(c, 2.0) > 0.5).float()
        if kind == "dotted":
            s, r = 0.045 * scale, 0.011 * scale
            q = torch.stack([x, y, z], -1)
            d = (q - s * torch.round(q / s)).norm(dim=-1)
            return 1.0 - _smoothstep(r - aa, r, d)
        return torch.zeros_like(x)

    def _fill(self, region: Tensor, g: dict[str, Any], rng: np.random.Generator, tex: Tensor, seg: Tensor,
              label: int) -> None:
        """Paint garment ``g`` (colour and pattern) into the texels of ``region``."""
        base = torch.tensor(GARMENT_COLOURS[g["colour"]])
        col = base.expand(self.pos.shape[0], 3).clone()
        if g["pattern"] != "solid":
            phase = torch.as_tensor(rng.uniform(0, 0.1, size=3), dtype=torch.float32)
            w = self._pattern(g, phase)[:, None]
            col = col * (1 - w) + torch.tensor(GARMENT_COLOURS[g["pattern_colour"]]) * w
        # Blend over a one-texel soft edge: texel-sized stair steps along hems and collars read less harshly.
        soft = self._soften(region)
        edge = soft > 0
        w = soft[edge, None]
        tex[edge] = tex[edge] * (1 - w) + col[edge] * w
        seg[region] = label

    def _soften(self, region: Tensor) -> Tensor:  # [M] bool -> [M] in [0, 1]
        """Mean of a texel and its four neighbours (a neighbour outside the layout counts as the texel itself)."""
        r = region.float()
        nb = self._neighbours
        vals = torch.where(nb >= 0, r[nb.clamp_min(0)], r[None])
        return (r + vals.sum(0)) / 5.0

    # ---- regions ---------------------------------------------------------------------------------

    def _collar_y(self, scoop: float) -> Tensor:  # [M] height of the neckline above each texel's (x, z)
        lm = self.lm
        x, z = self.pos[:, 0], self.pos[:, 2]
        front = _smoothstep(float(lm.neck[2]) - 0.01, float(lm.neck[2]) + 0.04, z)
        dip = scoop * torch.clamp(1 - (x / 0.09) ** 2, min=0.0)
        return float(lm.neck[1]) - 0.035 - front * dip

    def _top_region(self, sleeves: str, hem_y: float, scoop: float) -> Tensor:
        return self._cached(("top", sleeves, hem_y, scoop), lambda: self._make_top_region(sleeves, hem_y, scoop))

    def _make_top_region(self, sleeves: str, hem_y: float, scoop: float) -> Tensor:
        torso = self._in("upper_body", "lower_body")
        y = self.pos[:, 1]
        body = torso & (y >= hem_y) & (y <= self._collar_y(scoop))
        sleeve_len = {"none": -0.02, "short": 0.32, "long": 0.93}[sleeves]
        arms = self._in("arms") & (self._arm_t <= sleeve_len)
        return body | arms

    def _bottom_region(self, lower_y: float, waist_y: float) -> Tensor:
        y = self.pos[:, 1]
        return self._cached(("bottom", lower_y, waist_y), lambda: self._in("upper_body", "lower_body", "legs")
                            & (y <= waist_y) & (y >= lower_y))

    def _hair_region(self, style: str, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """Hair coverage ``[M]`` in [0, 1] and the head-relative azimuth for strand shading."""
        lm = self.lm
        x, y, z = self.pos.unbind(-1)
        eye_y = float(lm.eye_l[1])
        scalp = self._in("hair")
        head = self._in("head", "hair")
        behind = z < lm.ear_z + 0.005
        # The front hairline: high on the forehead, or a fringe down towards the brows for a bob.
        hairline = eye_y + (float(rng.uniform(0.03, 0.04)) if style == "bob" else float(rng.uniform(0.055, 0.07)))
        cover = scalp & ~((z > lm.ear_z + 0.03) & (y < hairline))
        if style in ("bob", "long"):
            jaw_y = lm.mouth_y - 0.02
            # Hair hanging beside the face (behind the eye plane) and over the back of the head.
            sides = head & (x.abs() > 0.052) & (y > jaw_y) & (z < float(lm.eye_l[2]) - 0.022)
            cover = cover | sides | (head & behind & (y > jaw_y - 0.03))
            if style == "long":
                # Hair falling onto the back of the neck and the upper back, to below the shoulders.
                length = lm.shoulder_y - float(rng.uniform(0.06, 0.16))
                width = 0.13 - 0.5 * torch.clamp(lm.shoulder_y - y, min=0.0)
                # Rounded ends: the hair is longest at the middle of the back.
                back = ((z < float(lm.neck[2]) - 0.01) & (y > length + 3.0 * x**2) & (x.abs() < width)
                        & ~self._in("arms", "hands"))
                cover = cover | (back & self._in("upper_body", "head", "hair"))
            else:
                nape = head & behind & (y > float(lm.neck[1]) + 0.02)
                cover = cover | nape
        amount = cover.float()
        if style == "buzz":
            amount = amount * 0.55
        elif style == "bald":
            amount = torch.zeros_like(amount)
        theta = torch.atan2(x, z - float(lm.neck[2]))
        return amount, theta

    # ---- the painter -----------------------------------------------------------------------------

    def paint(self, attributes: dict[str, Any], rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """``(texture [R, R, 3] float in [0, 1] with a 4-texel gutter, segments [R, R] uint8)``."""
        lm = self.lm
        M = self.pos.shape[0]
        x, y, z = self.pos.unbind(-1)
        seg = torch.full((M,), SEGMENT_NAMES.index("skin"), dtype=torch.uint8)

        # Skin: the base tone with a faint low-frequency variation.
        skin = _rgb(SKIN_TONES, attributes["skin_tone"])
        tex = skin.expand(M, 3).clone()
        tone = 1.0 + 0.03 * torch.sin(17.0 * x + 11.0 * y) * torch.sin(13.0 * z)
        tex = tex * tone[:, None]
        # Face features at the keypoints, painted on the front-of-head texels only.
        hair_rgb = _rgb(HAIR_COLOURS, attributes["hair"]["colour"])
        fi = self._face_index
        tf, sf = paint_face(self.pos[fi], lm, tex[fi], seg[fi], attributes, skin, hair_rgb)
        tex[fi], seg[fi] = tf, sf

        # Shoes, then bottoms, then tops: later garments cover earlier ones where they overlap.
        ankle = lm.ankle_y
        shoes = self._in("feet") | (self._in("legs") & (y < ankle + 0.035))
        shoe_rgb = _rgb(GARMENT_COLOURS, attributes["shoes"]["colour"])
        tex[shoes] = shoe_rgb * (0.9 + 0.1 * _smoothstep(ankle - 0.06, ankle + 0.03, y))[shoes, None]
        sole = self._in("feet") & (y < ankle - 0.055)
        tex[sole] = torch.tensor([0.15, 0.14, 0.13]) if attributes["shoes"]["colour"] != "black" else torch.tensor([0.5, 0.5, 0.5])
        seg[shoes] = SEGMENT_NAMES.index("shoes")

        waist_y = lm.hip_y + 0.11
        for g in attributes["garments"]:
            kind = g["type"]
            label = SEGMENT_NAMES.index(kind)
            if kind == "trousers":
                region = self._bottom_region(ankle + 0.03, waist_y)
            elif kind == "shorts":
                region = self._bottom_region(lm.knee_y + 0.12, waist_y)
            elif kind == "skirt":
                region = self._bottom_region(lm.knee_y + 0.03, waist_y)
            elif kind == "dress":
                hem = lm.knee_y + (0.02 if g.get("length") == "knee" else 0.16)
                region = self._top_region(g.get("sleeves", "none"), waist_y, scoop=0.07) | self._bottom_region(hem, waist_y)
            elif kind == "shirt":
                if any(o["type"] == "jacket" for o in attributes["garments"]):
                    continue  # painted with its jacket, as the part the open front shows
                region = self._top_region(g.get("sleeves", "short"), lm.hip_y - 0.03, scoop=0.03)
            elif kind == "jacket":
                hem = lm.hip_y - 0.1
                region = self._top_region("long", hem, scoop=0.0)
                inner = next(o for o in attributes["garments"] if o["type"] == "shirt")
                # The open front: a V of the shirt underneath, widening towards the collar.
                frac = ((y - hem) / (float(lm.neck[1]) - hem)).clamp(0, 1)
                opening = region & (z > 0.0) & (x.abs() < 0.015 + 0.05 * frac**2) & self._in("upper_body", "lower_body")
                self._fill(region, g, rng, tex, seg, label)
                self._fill(opening, inner, rng, tex, seg, SEGMENT_NAMES.index("shirt"))
                buttons = opening & (x.abs() < 0.004) & (torch.remainder(y, 0.07) < 0.012)
                tex[buttons] = tex[buttons] * 0.5
                continue
            else:
                raise ValueError(f"unknown garment type {kind!r}")
            self._fill(region, g, rng, tex, seg, label)

        # Hair last: long hair falls over the collar and the back of the garments.
        amount, theta = self._hair_region(attributes["hair"]["style"], rng)
        strands = 0.82 + 0.12 * torch.sin(theta * 70.0 + 8.0 * torch.sin(theta * 9.0)) + 0.06 * torch.sin(y * 90.0)
        hair_col = hair_rgb * strands[:, None]
        tex = tex * (1 - amount[:, None]) + hair_col * amount[:, None]
        seg[amount > 0.5] = SEGMENT_NAMES.index("hair")

        # A darker line along each hem and the collar: a cheap seam that makes garment edges read as cloth.
        tex = tex.clamp(0.0, 1.0)
        R = self.resolution
        nb = self._neighbours  # [4, M], -1 where the neighbour is outside the layout
        differs = ((nb >= 0) & (seg[nb.clamp_min(0)] != seg[None])).any(0)
        edge = differs & (seg >= SEGMENT_NAMES.index("shirt"))
        tex[edge] = tex[edge] * 0.85
        image = torch.zeros(R * R, 3)
        idx = self.mask.flatten().nonzero().flatten()
        image[idx] = tex
        labels = torch.zeros(R * R, dtype=torch.uint8)
        labels[idx] = seg
        image = torch.where(self._gutter_keep[:, None], image[self._gutter_src], torch.zeros(()))
        return image.reshape(R, R, 3), labels.reshape(R, R)
