"""A prompt the text encoder cannot read (emoji, unknown scripts) is flagged, not silently encoded as noise."""

from __future__ import annotations

import warnings

import pytest

from avatar_core.text import UnknownTokensWarning, load_text_encoder


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


@pytest.mark.slow
def test_all_unknown_prompt_warns_and_words_do_not(minilm):
    ids = minilm.tokenizer("\U0001F600\U0001F483\U0001F57A", add_special_tokens=False)["input_ids"]
    assert set(ids) == {minilm.tokenizer.unk_token_id}  # the vocabulary's own verdict: nothing known
    with pytest.warns(UnknownTokensWarning, match=r"prompt 1 .*no known tokens|no known tokens in prompt 1"):
        minilm.encode(["a woman in a red dress", "\U0001F600\U0001F483\U0001F57A"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownTokensWarning)
        minilm.encode(["a woman \U0001F600 in a red dress", "!!!"])  # one known word is enough; '!' is a token
