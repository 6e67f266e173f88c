"""Captions from avatar attributes: one long description and five phrase-level ones (TeRA Sec. 3.1).

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


#: TeRA's annotation (Sec. 3.1): one long description of at most 40 words and five phrase-level ones of 8-16.
MAX_CAPTION_WORDS = 40
NUM_PHRASES = 5
PHRASE_WORDS = (8, 16)


def _words(text: str) -> int:
    return len(text.split())


def _pad(text: str, fillers: tuple[str, ...]) -> str:
    """``text`` grown to at least ``PHRASE_WORDS[0]`` words by appending neutral context, filler by filler."""
    for f in fillers:
        if _words(text) >= PHRASE_WORDS[0]:
            break
        text = f"{text}{f}"
    return text


def make_captions(attributes: dict[str, Any]) -> dict[str, Any]:
    """``{"caption": long description, "phrases": [5 phrase-level descriptions]}`` for one avatar's attributes.

    The counts and lengths follow TeRA (Sec. 3.1): the caption has at most :data:`MAX_CAPTION_WORDS` words and
    each of the :data:`NUM_PHRASES` phrases 8-16 words. Every phrase names at least one garment with its colour
    (the upper garment, the lower garment, or the whole outfit), so any caption an epoch draws carries garment
    words; the body and hair words are spread over them. Uses ``attributes["body_words"]`` (stature, build, age
    group; see :func:`avatar_core.data.appearance.describe_body`) when present.
    """
    words = attributes.get("body_words", {})
    person = _person(attributes)
    adjectives = [w for w in (words.get("stature"), words.get("build")) if w]
    age = words.get("age", "")
    age_word = "young" if age == "teenage" else age
    if age_word:
        adjectives.append(age_word)
    subject = _article(" ".join(adjectives + [person]))
    hair = _hair(attributes)
    skin = f"{attributes['skin_tone']} skin"
    shoes = f"{attributes['shoes']['colour']} shoes"
    full = f"{subject} with {hair} and {skin} wearing {_outfit(attributes)}"
    if _words(full) > MAX_CAPTION_WORDS:  # the longest outfits: sleeves and skin go first, the garments stay
        full = f"{subject} with {hair} wearing {_outfit(attributes, sleeves=False)}"

    gs = attributes["garments"]
    main = [g for g in gs if g["type"] != "shirt" or not any(o["type"] == "jacket" for o in gs)]
    top, bottom = main[0], main[-1]
    outfit = " and ".join(garment_phrase(g, pattern=False) for g in main)
    body = " ".join(w for w in (words.get("stature"), words.get("build")) if w)
    fillers = (", full body", ", standing", " in a neutral pose")
    phrases = [
        _pad(f"{_article(' '.join([w for w in (age_word, person) if w]))} in {outfit}", fillers),
        _pad(f"{garment_phrase(top, sleeves=True)} on {_article(body + ' ' + person if body else person)}", fillers),
        _pad(f"{hair}, {garment_phrase(bottom, article=False)} and {shoes}", fillers),
        _pad(f"{_article(person)} with {skin} wearing {garment_phrase(top, pattern=False)}", fillers),
        _pad(", ".join(garment_phrase(g, article=False) for g in main) + f", {shoes}", fillers),
    ]
    return {"caption": full, "phrases": phrases}
