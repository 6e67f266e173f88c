"""Text conditioning for the structured latent diffusion model (TeRA Sec. 3.4: CLIP text encoder, 77 x 768).

A thin adapter over :func:`avatar_core.text.load_text_encoder`: it turns prompts into the token states that the
UNet cross-attends to, gives the null (empty-prompt) embedding that classifier-free guidance and the 20% text
dropout need, and loads the frozen encoder lazily so a saved model can be opened without it.

Encoders: ``"minilm"`` (the embedded all-MiniLM-L6-v2, 384-d, runs anywhere) or ``"clip"`` from a local folder
(the paper's CLIP ViT-L/14 text tower, 77 tokens x 768). Empty prompts raise :class:`InputError`; prompts over the
encoder's token limit are cut to it with a :class:`~avatar_core.text.PromptTruncatedWarning` that points at the
caller's line.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from avatar_core.errors import InputError
from avatar_core.text import PromptTruncatedWarning, TextEncoder, load_text_encoder

__all__ = ["TextCondition", "TextConditioner", "as_prompt_list"]


class TextCondition(NamedTuple):
    """What the denoiser is conditioned on: token states and which tokens are real."""

    states: Tensor  # [B, L, D]
    mask: Tensor  # [B, L] bool, True on real tokens

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextCondition:
        """Both tensors on ``device``; the states (not the mask) in ``dtype``."""
        return TextCondition(self.states.to(device=device, dtype=dtype), self.mask.to(device=device))

    def repeat_to(self, batch: int) -> TextCondition:
        """Expand a batch of one to ``batch`` (a batch that already has ``batch`` rows passes through)."""
        if self.states.shape[0] == batch:
            return self
        if self.states.shape[0] != 1:
            raise InputError(f"text condition has batch {self.states.shape[0]}, cannot match batch {batch}",
                             "give one prompt per sample, or a single prompt for all")
        return TextCondition(self.states.expand(batch, -1, -1), self.mask.expand(batch, -1))


def as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    """A single prompt becomes a list of one; anything else must already be a sequence of strings."""
    if isinstance(prompts, str):
        return [prompts]
    return list(prompts)


class TextConditioner:
    """Prompts -> :class:`TextCondition` with a frozen text encoder, loaded on first use.

    Args:
        name: ``"minilm"`` (embedded default, D = 384) or ``"clip"`` (paper: CLIP ViT-L/14, D = 768).
        path: local folder of the encoder's weights (required for CLIP; optional for MiniLM).
        max_length: token length L, special tokens included (paper: 77, CLIP's limit; MiniLM default 77 too).
        device: where the encoder runs.
        encoder: an already built :class:`~avatar_core.text.TextEncoder` (then name/path only label it).
    """

    def __init__(self, name: str = "minilm", path: str | Path | None = None, max_length: int = 77,
                 device: torch.device | str | None = None, encoder: TextEncoder | None = None):
        if encoder is None and name not in ("minilm", "clip"):
            raise InputError(f"unknown text encoder {name!r}", "use 'minilm' (embedded default) or 'clip'")
        if name == "clip" and path is None and encoder is None:
            raise InputError("the CLIP text encoder needs a local folder (path=...)",
                             "pass the folder of a CLIP model or Stable Diffusion pipeline, or use name='minilm'")
        self.name = name
        self.path = None if path is None else str(path)
        self.max_length = int(encoder.max_length) if encoder is not None else int(max_length)
        self.device = device
        self._encoder = encoder
        self._null: TextCondition | None = None

    @classmethod
    def from_encoder(cls, encoder: TextEncoder) -> TextConditioner:
        """Wrap an encoder built elsewhere (e.g. shared with another component)."""
        return cls(name=encoder.name, max_length=encoder.max_length, encoder=encoder)

    @property
    def encoder(self) -> TextEncoder:
        """The frozen encoder, loaded from disk the first time it is needed."""
        if self._encoder is None:
            self._encoder = load_text_encoder(self.name, self.path, device=self.device, max_length=self.max_length)
        return self._encoder

    @property
    def dim(self) -> int:
        """Width D of the token states (384 MiniLM, 768 CLIP ViT-L/14)."""
        return self.encoder.dim

    def spec(self) -> dict:
        """JSON-serialisable description, stored with a trained model so it can rebuild its conditioner."""
        return {"name": self.name, "path": self.path, "max_length": self.max_length}

    @classmethod
    def from_spec(cls, spec: dict, device: torch.device | str | None = None) -> TextConditioner:
        """Inverse of :meth:`spec`."""
        return cls(spec.get("name", "minilm"), spec.get("path"), int(spec.get("max_length", 77)), device=device)

    def __call__(self, prompts: str | Sequence[str]) -> TextCondition:
        """Token states [B, L, D] and mask [B, L] of non-empty prompts; overlong ones are cut with a warning."""
        prompts = as_prompt_list(prompts)
        # The kernel's warning would point into this file; re-issue it at the caller so it is seen once per
        # call site and names the user's line.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTruncatedWarning)
            out = self.encoder.encode(prompts)
        for w in caught:
            if issubclass(w.category, PromptTruncatedWarning):
                warnings.warn(str(w.message), PromptTruncatedWarning, stacklevel=2)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return TextCondition(out.token_states, out.attention_mask)

    def null(self, batch: int = 1) -> TextCondition:
        """The empty prompt's condition repeated ``batch`` times (CFG's unconditional branch, text dropout)."""
        if self._null is None:
            enc = self.encoder.encode_null(1)
            self._null = TextCondition(enc.token_states, enc.attention_mask)
        return TextCondition(self._null.states.expand(batch, -1, -1).clone(),
                             self._null.mask.expand(batch, -1).clone())
