"""Text faithfulness per body region: which garment types, sleeve lengths, colours and patterns a prompt asks for,
and whether an avatar shows them -- in its UV colour map, or in renders of it.

:func:`parse_garments` reads every attribute the dataset's captions name (:mod:`avatar_core.data.captions`): the
upper garment's type (shirt, jacket, dress), colour and pattern, its sleeves, the shirt's colour and pattern under a
jacket, the lower garment's type (trousers, shorts, skirt; a dress is both), colour and pattern, and the shoes'
colour. Patterns are the painter's (:data:`avatar_core.data.appearance.PATTERNS`): the captions write ``striped``,
``checked`` and ``polka-dot`` (read as ``dotted``) and nothing for a solid garment, so a prompt without a pattern word
asks for no pattern; ``plain`` / ``solid`` ask for ``solid`` (and ``checkered`` / ``dotted`` are read too).

:class:`GarmentScorer` decides each of them from the colours of garment regions. Where a garment of each kind
sits in the UV layout is taken from the dataset's own painter (:class:`avatar_core.data.appearance.TexturePainter`):
it paints reference outfits with distinct colours on the template body and reads the garment segments back, so
the scorer's regions are the painter's, not a second copy of its geometry. The region colours come from a UV map
(:meth:`GarmentScorer.score`) or from rendered views, each pixel assigned the region of the body-surface texel it
shows (:meth:`GarmentScorer.view_regions`, :meth:`GarmentScorer.score_views`). The decisions:

- colours: the median colour of the region (torso without a jacket's open front; thighs; shoes; the open
  front for the shirt under a jacket), named by the nearest palette colour;
- dress: the thighs carry the top's colour; jacket: the open front shows the top's colour on less than half
  as many of its texels as the torso does (a patterned shirt shows it about as often in both);
- bottom type: the band only trousers cover (shins) carries the bottom's colour -> trousers, else the band a
  skirt covers below shorts -> skirt, else shorts;
- sleeves: the forearm band (long sleeves only) -> long, else the upper-arm band -> short, else sleeveless;
- patterns, each from its garment's fabric region: the texels every reference top covers (shirt, dress, jacket
  without its open front) away from where long hair falls; the thighs every bottom covers (not under a jacket); the
  open front without its buttons; each one texel in from its edges (hems and collars are painted darker). The
  painter draws patterns as solid textures of the template body's 3D position: stripes are slabs of constant
  height, checks a 3D checker and dots a 3D lattice of balls (a few percent of the surface), the second colour at
  least 0.3 in luminance from the garment's. So the region's luminances are split in two (two-means); fewer than
  two minority texels (or half a percent), or centres less than 0.12 apart -> solid; else the split is compared
  between texels of the same template height (4 mm bins, random pairs in a bin) and texels anywhere (random
  pairs): stripes disagree at the same height under 0.4 times as often as anywhere, checks and dots about as
  often; of those, a minority under 20 % of the texels -> dotted, else checked. Renders read each pixel's height
  from the texel :meth:`GarmentScorer.view_regions` found under it (:class:`ViewRegions`); a render reads a
  pattern only as far as it resolves it (blobs wider than a stripe blur stripes into a mix read as checks, and
  an arm's blobs spilling over the torso read as a second colour).
"""

from __future__ import annotations

import copy
import re
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from avatar_core.data.appearance import GARMENT_COLOURS, PATTERNS, SEGMENT_NAMES, TexturePainter, sample_attributes
from avatar_core.errors import InputError

__all__ = ["ATTRIBUTES", "REGIONS", "GarmentScorer", "ViewRegions", "garment_scorer", "parse_garments"]

#: Every attribute the scorer reads, by region.
ATTRIBUTES = ("top_type", "top_colour", "top_pattern", "sleeves", "inner_colour", "inner_pattern", "bottom_type",
              "bottom_colour", "bottom_pattern", "shoes_colour")
#: The UV regions the decisions read.
REGIONS = ("torso", "opening", "shorts", "skirt_band", "trouser_band", "short_band", "long_band", "shoes",
           "top_fabric", "inner_fabric", "bottom_fabric")
#: The fabric region each pattern attribute is read from.
_FABRIC = {"top_pattern": "top_fabric", "inner_pattern": "inner_fabric", "bottom_pattern": "bottom_fabric"}
#: Pattern words of prompts -> the painter's pattern names (the captions write striped / checked / polka-dot).
_PATTERN_WORDS = {"striped": "striped", "checked": "checked", "checkered": "checked", "polka-dot": "dotted",
                  "dotted": "dotted", "plain": "solid", "solid": "solid"}
assert set(_PATTERN_WORDS.values()) == set(PATTERNS)
_LUMA = (0.299, 0.587, 0.114)
_BAND = 0.004  # template-height bin (m) of the stripe test: under a quarter of the narrowest stripe

_TOPS, _BOTTOMS = ("dress", "jacket", "shirt"), ("trousers", "shorts", "skirt")
_SLEEVES = {"short-sleeved": "short", "long-sleeved": "long", "sleeveless": "none"}
_NEAR = 0.2  # RGB distance under which a texel shows a colour (palette colours are further apart)


def _tokens(prompt: str) -> list[str]:
    words = re.sub(r"[^a-z\- ]+", " ", prompt.lower()).split()
    out, i = [], 0
    while i < len(words):
        two = " ".join(words[i:i + 2])
        if two in GARMENT_COLOURS or two == "polka dot":
            out.append(two.replace("polka dot", "polka-dot"))
            i += 2
        else:
            out.append(words[i])
            i += 1
    return out


def parse_garments(prompt: str) -> dict[str, str]:
    """Every garment attribute a prompt names (keys of :data:`ATTRIBUTES`); a colour or pattern word belongs to the
    next garment word, unless a ``hair`` / ``skin`` word takes it first."""
    out: dict[str, str] = {}
    colour, sleeves, pattern = None, None, None
    for w in _tokens(prompt):
        if w in GARMENT_COLOURS:
            colour = w
        elif w in _SLEEVES:
            sleeves = _SLEEVES[w]
        elif w in _PATTERN_WORDS:
            pattern = _PATTERN_WORDS[w]
        elif w in ("hair", "skin"):
            colour, pattern = None, None
        elif w in _TOPS + _BOTTOMS + ("shoes",):
            if w == "shoes":
                key = "shoes_colour"
            elif w == "shirt" and out.get("top_type") == "jacket":
                key = "inner_colour"
            elif w in _TOPS:
                key = None if "top_type" in out else "top_colour"
                if key:
                    out["top_type"] = w
                    if w == "dress":
                        out.setdefault("bottom_type", "dress")
            else:
                key = None if "bottom_type" in out else "bottom_colour"
                if key:
                    out["bottom_type"] = w
            if key and colour is not None and key not in out:
                out[key] = colour
            if key in ("top_colour",) and sleeves is not None:
                out["sleeves"] = sleeves
            pattern_key = {"top_colour": "top_pattern", "inner_colour": "inner_pattern",
                           "bottom_colour": "bottom_pattern"}.get(key)
            if pattern_key and pattern is not None and pattern_key not in out:
                out[pattern_key] = pattern
            colour, sleeves, pattern = None, None, None
    return out


def _nearest(rgb: Tensor) -> str:
    names = list(GARMENT_COLOURS)
    pal = torch.tensor([GARMENT_COLOURS[n] for n in names], dtype=rgb.dtype)
    return names[int(((pal - rgb[None]) ** 2).sum(-1).argmin())]


def resize_mask(mask: Tensor, resolution: int) -> Tensor:  # [R0, R0] bool -> [R, R] bool
    """A UV mask at another resolution (nearest texel centre)."""
    if mask.shape[-1] == resolution:
        return mask.bool()
    m = torch.nn.functional.interpolate(mask[None, None].float(), size=(resolution, resolution), mode="nearest")
    return m[0, 0] > 0.5


def erode(mask: Tensor) -> Tensor:  # [R, R] bool -> [R, R] bool
    """The texels of a UV mask whose four neighbours are in it too."""
    p = torch.nn.functional.pad(mask[None, None].float(), (1, 1, 1, 1))[0, 0] > 0.5
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def decide_pattern(rgb: Tensor, height: Tensor) -> str | None:
    """The pattern (:data:`avatar_core.data.appearance.PATTERNS`) that colours ``[M, 3]`` at template heights ``[M]``
    (metres) of one garment's fabric show (module docstring); None for fewer than 16 samples."""
    if len(rgb) < 16:
        return None
    lum = rgb.float() @ torch.tensor(_LUMA)
    c0, c1 = torch.quantile(lum, 0.02), torch.quantile(lum, 0.98)
    split = torch.zeros(len(lum), dtype=torch.bool)
    for _ in range(8):  # two-means on the luminance, from the 2nd and 98th percentiles
        split = (lum - c1).abs() < (lum - c0).abs()
        if bool(split.all()) or not bool(split.any()):
            return "solid"
        c0, c1 = lum[~split].mean(), lum[split].mean()
    minority = int(min(int(split.sum()), len(lum) - int(split.sum())))
    if float((c1 - c0).abs()) < 0.12 or minority < max(2, 0.005 * len(lum)):
        return "solid"
    g = torch.Generator().manual_seed(0)
    band = torch.floor(height.float() / _BAND)
    band = band - band.min()
    order = torch.argsort(band * 2.0 + torch.rand(len(lum), generator=g))  # random order inside each band
    same = band[order][1:] == band[order][:-1]
    s = split[order]
    if not bool(same.any()):
        return None
    at_height = float((s[1:] != s[:-1])[same].float().mean())
    anywhere = float((split != split[torch.randperm(len(lum), generator=g)]).float().mean())
    if at_height < 0.4 * anywhere:
        return "striped"
    return "dotted" if minority < 0.2 * len(lum) else "checked"


def decide(texels: dict[str, Tensor], heights: dict[str, Tensor]) -> dict[str, str]:
    """What the colours ``[M, 3]`` seen in each of :data:`REGIONS` show, per attribute (module docstring); the
    patterns also need each fabric region's template heights ``[M]``. A region nothing was seen in (a fabric
    region: fewer than 16 samples) leaves the attributes that need it out."""

    def near(name: str, colour: Tensor) -> float:  # fraction of the region's texels showing ``colour``
        x = texels[name]
        return float(((x - colour[None]).norm(dim=-1) < _NEAR).float().mean()) if len(x) else 0.0

    def covered(name: str, colour: Tensor) -> bool:
        return near(name, colour) > 0.5

    def median(name: str) -> Tensor | None:
        return texels[name].median(0).values if len(texels[name]) else None

    seen: dict[str, str] = {}
    for attr, region in _FABRIC.items():
        if (pattern := decide_pattern(texels[region], heights[region])) is not None:
            seen[attr] = pattern
    top_c, bottom_c, inner_c, shoes_c = (median(n) for n in ("torso", "shorts", "opening", "shoes"))
    if inner_c is not None:
        seen["inner_colour"] = _nearest(inner_c)
    if shoes_c is not None:
        seen["shoes_colour"] = _nearest(shoes_c)
    if bottom_c is not None:
        seen["bottom_colour"] = _nearest(bottom_c)
    if top_c is None:
        return seen
    seen["top_colour"] = _nearest(top_c)
    seen["sleeves"] = "long" if covered("long_band", top_c) else "short" if covered("short_band", top_c) else "none"
    if bottom_c is None:
        return seen
    dress = covered("shorts", top_c)
    # A jacket's open front shows the top's colour far less often than the torso does (a patterned shirt shows it
    # about as often in both).
    jacket = not dress and len(texels["opening"]) > 0 and near("opening", top_c) < 0.5 * near("torso", top_c)
    seen["top_type"] = "dress" if dress else "jacket" if jacket else "shirt"
    seen["bottom_type"] = ("dress" if dress else "trousers" if covered("trouser_band", bottom_c)
                           else "skirt" if covered("skirt_band", bottom_c) else "shorts")
    return seen



def _compare(seen: dict[str, str], asked: dict[str, str]) -> dict[str, float]:
    return {k: float(seen[k] == v) for k, v in asked.items() if k in seen}


class ViewRegions(dict):
    """Per region of :data:`REGIONS`, the pixels ``[C, H, W]`` (bool) of rendered views that show it, and in
    ``height`` ``[C, H, W]`` the template height (metres) of the body-surface texel each pixel shows (what the
    pattern decisions group pixels by, as the UV map's texels)."""

    def __init__(self, masks: dict[str, Tensor], height: Tensor):
        super().__init__(masks)
        self.height = height


class GarmentScorer:
    """Region masks from the painter's reference outfits (module docstring); scores a UV map or rendered views."""

    def __init__(self, painter: TexturePainter):
        rng = np.random.default_rng(0)
        base = sample_attributes(rng)
        base["hair"] = {"style": "bald", "colour": "black"}
        seg = {}

        def painted(*garments: dict, hair: dict | None = None, seed: int = 0) -> tuple[Tensor, np.ndarray]:
            a = copy.deepcopy(base)
            a["garments"] = [{"pattern": "solid", **g} for g in garments]
            a["hair"] = hair or a["hair"]
            tex, s = painter.paint(a, np.random.default_rng(seed))
            return tex, s.numpy()

        def outfit(*garments: dict) -> np.ndarray:
            return painted(*garments)[1]

        named = SEGMENT_NAMES.index
        s = outfit({"type": "shirt", "colour": "red", "sleeves": "none"}, {"type": "shorts", "colour": "blue"})
        seg["torso"], seg["shorts"] = s == named("shirt"), s == named("shorts")
        seg["shoes"] = s == named("shoes")
        short = outfit({"type": "shirt", "colour": "red", "sleeves": "short"}, {"type": "skirt", "colour": "blue"})
        seg["short_band"] = (short == named("shirt")) & ~seg["torso"]
        seg["skirt_band"] = (short == named("skirt")) & ~seg["shorts"]
        long = outfit({"type": "shirt", "colour": "red", "sleeves": "long"}, {"type": "trousers", "colour": "blue"})
        seg["long_band"] = (long == named("shirt")) & ~seg["torso"] & ~seg["short_band"]
        seg["trouser_band"] = (long == named("trousers")) & ~seg["shorts"] & ~seg["skirt_band"]
        j_tex, j = painted({"type": "jacket", "colour": "red", "sleeves": "long"},
                           {"type": "shirt", "colour": "green", "sleeves": "long"}, {"type": "trousers", "colour": "blue"})
        seg["opening"] = j == named("shirt")
        seg["torso"] = seg["torso"] & ~seg["opening"]
        # Fabric regions (module docstring): what every top / bottom covers, away from long hair, hems and buttons.
        d = outfit({"type": "dress", "colour": "red", "sleeves": "none", "length": "mid-thigh"})
        hair = np.zeros_like(seg["torso"])
        for k in range(8):  # the hair's length is drawn per avatar: the union of a few draws
            hair |= painted({"type": "shirt", "colour": "red", "sleeves": "none"}, {"type": "shorts", "colour": "blue"},
                            hair={"style": "long", "colour": "black"}, seed=k)[1] == named("hair")
        top = (s == named("shirt")) & (d == named("dress")) & (j == named("jacket")) & ~hair
        bottom = seg["shorts"] & (short == named("skirt")) & (j == named("trousers"))
        shirt_rgb = torch.tensor(GARMENT_COLOURS["green"])
        unbuttoned = ((j_tex - shirt_rgb).norm(dim=-1) < _NEAR).numpy()
        self.masks = {k: torch.from_numpy(v) for k, v in seg.items()}
        self.masks["top_fabric"] = erode(torch.from_numpy(top))
        self.masks["bottom_fabric"] = erode(torch.from_numpy(bottom))
        self.masks["inner_fabric"] = erode(self.masks["opening"]) & torch.from_numpy(unbuttoned)
        #: Template (rest-pose, average-shape) height of every texel, metres (0 outside the layout).
        self.height = torch.zeros(painter.mask.shape)
        self.height[painter.mask] = painter.pos[:, 1].float().cpu()
        self.body = painter.body

    def read(self, rgb: Tensor) -> dict[str, str]:
        """What a colour map ``[3, R, R]`` in [0, 1] shows, per attribute."""
        if rgb.ndim != 3 or rgb.shape[0] != 3 or rgb.shape[1] != rgb.shape[2]:
            raise InputError(f"expected a UV colour map [3, R, R], got {tuple(rgb.shape)}", "pass the texture channels first")
        R = rgb.shape[-1]
        rgb = rgb.float().cpu()
        masks = {k: resize_mask(m, R) for k, m in self.masks.items()}
        height = self.height
        if height.shape[-1] != R:
            height = torch.nn.functional.interpolate(height[None, None], size=(R, R), mode="nearest")[0, 0]
        return decide({k: rgb[:, m].T for k, m in masks.items()}, {k: height[masks[k]] for k in _FABRIC.values()})

    def score(self, rgb: Tensor, asked: dict[str, str]) -> dict[str, float]:
        """1/0 per asked attribute for a colour map ``[3, R, R]`` in [0, 1]."""
        return _compare(self.read(rgb), asked)

    def view_regions(self, vertices: Tensor, cameras, alpha: Tensor | None = None) -> ViewRegions:
        """Per region, the pixels ``[C, H, W]`` (bool) of the cameras that show it: the posed body ``vertices``
        ``[V, 3]`` (of the body model the scorer was built on) is rasterised, each visible pixel's surface UV is
        interpolated per triangle corner and looked up in the region masks (and in the template heights the
        pattern decisions read, :class:`ViewRegions`). With ``alpha`` ``[C, H, W]`` of a render, only pixels it
        covers by more than a half count."""
        from avatar_core.render.mesh import interpolate, rasterize_mesh

        if vertices.ndim != 2 or tuple(vertices.shape) != (self.body.num_vertices, 3):
            raise InputError(f"expected the scorer's body vertices [{self.body.num_vertices}, 3], got "
                             f"{tuple(vertices.shape)}", "pose the same body model the scorer was built on")
        frags = rasterize_mesh(vertices.float().cpu(), self.body.faces.cpu(), cameras.to("cpu", torch.float32))
        uv = interpolate(frags, self.body.uv_coords.float().cpu()[self.body.uv_faces.cpu()], per="corner")
        R = next(iter(self.masks.values())).shape[-1]
        col = (uv[..., 0] * R).floor().long().clamp(0, R - 1)
        row = ((1.0 - uv[..., 1]) * R).floor().long().clamp(0, R - 1)
        seen = frags.mask if alpha is None else frags.mask & (alpha.cpu().reshape(frags.mask.shape) > 0.5)
        return ViewRegions({k: m[row, col] & seen for k, m in self.masks.items()}, self.height[row, col])

    def read_views(self, rgb: Tensor, regions: ViewRegions) -> dict[str, str]:
        """What rendered views ``[C, H, W, 3]`` show, per attribute, through :meth:`view_regions`' pixels."""
        rgb = rgb.float().cpu()
        if not isinstance(regions, ViewRegions):
            raise InputError("the regions carry no per-pixel template heights for the pattern decisions",
                             "pass what GarmentScorer.view_regions returns")
        if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.shape[:3] != regions.height.shape:
            raise InputError(f"views {tuple(rgb.shape)} do not match the regions' pixels "
                             f"{tuple(regions.height.shape)}", "render [C, H, W, 3] with the same cameras")
        return decide({k: rgb[m] for k, m in regions.items()},
                      {k: regions.height[regions[k]] for k in _FABRIC.values()})

    def score_views(self, rgb: Tensor, regions: ViewRegions, asked: dict[str, str]) -> dict[str, float]:
        """1/0 per asked attribute for rendered views ``[C, H, W, 3]`` in [0, 1]."""
        return _compare(self.read_views(rgb, regions), asked)


@lru_cache(maxsize=4)
def _scorer(body_name: str, model_dir: str | None, resolution: int) -> GarmentScorer:
    from avatar_core.body import load_body_model

    return GarmentScorer(TexturePainter(load_body_model(body_name, model_dir), resolution))


def garment_scorer(body_name: str, model_dir: str | None = None, resolution: int = 128) -> GarmentScorer:
    """The scorer of a body model, built once per process (painting its reference outfits at ``resolution``)."""
    return _scorer(body_name, None if model_dir is None else str(model_dir), int(resolution))
