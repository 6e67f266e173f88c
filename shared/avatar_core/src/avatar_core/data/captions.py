"""Captions from avatar attributes: one full sentence and three shorter phrase variants.

TeRA (Sec. 3.1, data annotation) pairs every training avatar with a detailed description and shorter
attribute phrases so the text encoder sees both styles; here they are generated from the sampled
attributes, so every colour and garment a caption names is exactly what the texture shows.
"""

from __future__ import annotations

from typing import Any

_PATTERN_WORD = {"solid": "", "striped": "striped", "checked": "checked", "dotted": "polka-dot"}
_PLURAL = {"trousers", "shorts"}


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def garment_phrase(g: dict[str, Any], article: bool = True, pattern: bool = True, sleeves: bool = False) -> str:
    """``"a green checked shirt"``, ``"black trousers"``, ``"a short-sleeved red shirt"``."""
    words = []
    if sleeves and g["type"] in ("shirt", "dress") and g.get("sleeves") in ("short", "long", "none"):
        words.append({"short": "short-sleeved", "long": "long-sleeved", "none": "sleeveless"}[g["sleeves"]])
    words.append(g["colour"])
    if pattern and _PATTERN_WORD[g["pattern"]]:
        words.append(_PATTERN_WORD[g["pattern"]])
    words.append(g["type"])
    phrase = " ".join(words)
    if article and g["type"] not in _PLURAL:
        phrase = _article(phrase)
    return phrase


def _person(attributes: dict[str, Any]) -> str:
    woman = attributes["gender"] == "woman"
    if attributes.get("body_words", {}).get("age") == "teenage":
        return "girl" if woman else "boy"
    return "woman" if woman else "man"


def _hair(attributes: dict[str, Any]) -> str:
    h = attributes["hair"]
    if h["style"] == "bald":
        return "a bald head"
    style = {"short": "short", "buzz": "buzz-cut", "bob": "bob-cut", "long": "long"}[h["style"]]
    return f"{style} {h['colour']} hair"


def _outfit(attributes: dict[str, Any], sleeves: bool = True) -> str:
    gs = attributes["garments"]
    types = [g["type"] for g in gs]
    parts = []
    if "jacket" in types:
        jacket = gs[types.index("jacket")]
        shirt = gs[types.index("shirt")]
        parts.append(f"{garment_phrase(jacket)} over {garment_phrase(shirt)}")
        rest = [g for g in gs if g["type"] not in ("jacket", "shirt")]
    else:
        rest = list(gs)
    parts += [garment_phrase(g, sleeves=sleeves) for g in rest]
    shoes = f"{attributes['shoes']['colour']} shoes"
    return ", ".join(parts) + f" and {shoes}" if len(parts) > 1 else f"{parts[0]} and {shoes}"


def make_captions(attributes: dict[str, Any]) -> dict[str, Any]:
    """``{"caption": full sentence, "phrases": [3 shorter variants]}`` for one avatar's attributes.

    Uses ``attributes["body_words"]`` (stature, build, age group; see
    :func:`avatar_core.data.appearance.describe_body`) when present.
    """
    words = attributes.get("body_words", {})
    person = _person(attributes)
    adjectives = [w for w in (words.get("stature"), words.get("build")) if w]
    age = words.get("age", "")
    if age and age != "teenage":
        adjectives.append(age)
    elif age == "teenage":
        adjectives.append("young")
    subject = _article(" ".join(adjectives + [person]))
    hair = _hair(attributes)
    skin = f"{attributes['skin_tone']} skin"
    full = f"{subject} with {hair} and {skin} wearing {_outfit(attributes)}"

    gs = attributes["garments"]
    main = [g for g in gs if g["type"] != "shirt" or not any(o["type"] == "jacket" for o in gs)]
    short_list = ", ".join(garment_phrase(g, article=False) for g in main)
    phrases = [
        f"{' '.join([w for w in (age, person) if w])}, {hair}, {short_list}",
        f"a {person} in " + " and ".join(garment_phrase(g, pattern=False) for g in main),
        f"{hair}, {skin}, {attributes['shoes']['colour']} shoes",
    ]
    return {"caption": full, "phrases": phrases}
