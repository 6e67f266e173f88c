"""The evaluation's CLIP score against transformers' own CLIP preprocessing and embeddings, on a tiny random CLIP
saved to disk."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from avatar_core.errors import MissingWeightsError
from tera import evaluate as P


def _processor(size: int) -> CLIPImageProcessor:
    """transformers' CLIP preprocessing (PIL bicubic resize of the short side, centre crop, CLIP mean / std)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the PIL backend is chosen where torchvision is absent
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                  image_mean=list(P.CLIP_MEAN), image_std=list(P.CLIP_STD))


def _reference_pixels(views_u8: torch.Tensor, size: int) -> torch.Tensor:  # [V, H, W, 3] uint8 -> [V, 3, S, S]
    return _processor(size)(images=[v.numpy() for v in views_u8], return_tensors="pt").pixel_values


def _tokenizer() -> CLIPTokenizer:
    """Single letters plus a couple of merges: enough BPE to tokenise any lower-case prompt."""
    vocab = {c + s: 0 for s in ("", "</w>") for c in "abcdefghijklmnopqrstuvwxyz"}
    merges = [("r", "e"), ("re", "d</w>")]
    vocab.update({a + b: 0 for a, b in merges})
    vocab.update({"<|startoftext|>": 0, "<|endoftext|>": 0})
    vocab = {k: i for i, k in enumerate(vocab)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    tok = _tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root, model, tok


def test_clip_score_equals_transformers_cosine(clip_dir):
    root, model, tok = clip_dir
    scorer = P.ClipScorer(root)
    assert scorer.image_size == 32
    torch.manual_seed(1)
    # Three non-square renders (resize the short side, centre crop), smooth like renders, as 8-bit images.
    smooth = torch.nn.functional.interpolate(torch.rand(3, 3, 6, 8), size=(48, 64), mode="bilinear")
    views_u8 = (smooth.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    views = views_u8.float() / 255
    prompt = "a woman in a red dress"
    pixels = _reference_pixels(views_u8, 32)  # the oracle's input, not ours
    assert pixels.shape == (3, 3, 32, 32)
    ids = tok([prompt], return_tensors="pt").input_ids  # unpadded: no mask needed for the reference
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=ids)
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    ref = 100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1).mean()
    # PIL's and torch's bicubic kernels differ by a few 8-bit levels; the score is 100 x cosine.
    assert P.ClipScorer(root).score(views, prompt) == pytest.approx(float(ref), abs=0.5)
    # Padding in a batch of prompts must not change a prompt's embedding (the attention mask is passed).
    both = scorer.text_embedding([prompt, "red"])
    torch.testing.assert_close(both[0], torch.nn.functional.normalize(txt[0], dim=0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(48, 64), (200, 150), (64, 64), (90, 40)])
def test_clip_preprocess_matches_transformers_processor(shape):
    torch.manual_seed(2)
    h, w = shape
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, max(2, h // 8), max(2, w // 8)), size=(h, w),
                                             mode="bilinear")
    views_u8 = (smooth.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    ours = P.clip_preprocess(views_u8.float() / 255, 32)
    ref = _reference_pixels(views_u8, 32)
    assert ours.shape == ref.shape
    # Same crop, same normalisation; the resampling kernels (torch vs PIL bicubic) differ by a few 8-bit levels.
    assert (ours - ref).abs().mean() < 0.01
    torch.testing.assert_close(ours, ref, atol=0.03, rtol=0)


def test_clip_preprocess_normalises_and_crops():
    # A constant colour stays constant through resize and crop, then becomes (c - mean) / std: a closed form.
    c = torch.tensor([0.2, 0.5, 0.9])
    out = P.clip_preprocess(c.expand(2, 20, 30, 3), 16)
    want = (c - torch.tensor(P.CLIP_MEAN)) / torch.tensor(P.CLIP_STD)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, want[None, :, None, None].expand_as(out), atol=1e-5, rtol=0)
    # The crop is centred: a left/right split image keeps its halves' colours at the crop's two edges.
    img = torch.zeros(1, 16, 48, 3)
    img[:, :, 24:] = 1.0
    out = P.clip_preprocess(img, 16) * torch.tensor(P.CLIP_STD)[:, None, None] + torch.tensor(P.CLIP_MEAN)[:, None, None]
    assert out[0, :, :, 0].max() < 0.05 and out[0, :, :, -1].min() > 0.95


def test_missing_clip_folder_and_not_configured_message(clip_dir, tmp_path):
    with pytest.raises(MissingWeightsError, match="evaluate.clip_path|CLIP"):
        P.ClipScorer(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((clip_dir[0] / "config.json").read_text())  # no weights, no tokenizer
    with pytest.raises(MissingWeightsError):
        P.ClipScorer(partial)
    assert P.format_clip(None)[-1] == ("CLIP score: not computed (set evaluate.clip_path to a local CLIP folder)")
