"""The paper-layout prior from tiny random-weight diffusers / transformers models saved to local folders: the
kernel loaders read them, the FaceID LoRA is merged into the UNet's attention, and one HDS step runs end to end."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

from avatar_core.errors import MissingWeightsError
from gaussianip.config import PaperPriorConfig
from gaussianip.hds import HDSConditions, hds_step
from gaussianip.prior_paper import PaperPrior

CROSS, ID, HC, E = 64, 16, 24, 64  # text width = perceiver width (V2 shortcut), ArcFace, CLIP hidden; heads = E / 64


def _tokenizer():
    vocab = {}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz,":
            vocab[c + suffix] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _faceid_plus_state(unet, g):
    """A random checkpoint in the released FaceID-PlusV2 layout (perceiver resampler, LoRA on every attention)."""
    r = lambda *s: 0.05 * torch.randn(*s, generator=g)  # noqa: E731
    proj = {"proj.0.weight": r(2 * ID, ID), "proj.0.bias": r(2 * ID), "proj.2.weight": r(4 * E, 2 * ID),
            "proj.2.bias": r(4 * E), "norm.weight": torch.ones(E), "norm.bias": torch.zeros(E),
            "perceiver_resampler.proj_in.weight": r(E, HC), "perceiver_resampler.proj_in.bias": r(E),
            "perceiver_resampler.proj_out.weight": r(CROSS, E), "perceiver_resampler.proj_out.bias": r(CROSS),
            "perceiver_resampler.norm_out.weight": torch.ones(CROSS), "perceiver_resampler.norm_out.bias": torch.zeros(CROSS)}
    for i in range(4):
        p = f"perceiver_resampler.layers.{i}"
        proj.update({f"{p}.0.norm1.weight": torch.ones(E), f"{p}.0.norm1.bias": torch.zeros(E),
                     f"{p}.0.norm2.weight": torch.ones(E), f"{p}.0.norm2.bias": torch.zeros(E),
                     f"{p}.0.to_q.weight": r(64, E), f"{p}.0.to_kv.weight": r(128, E), f"{p}.0.to_out.weight": r(E, 64),
                     f"{p}.1.0.weight": torch.ones(E), f"{p}.1.0.bias": torch.zeros(E),
                     f"{p}.1.1.weight": r(4 * E, E), f"{p}.1.3.weight": r(E, 4 * E)})
    ip = {}
    for i, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name.rsplit(".", 1)[0])
        for key in ("to_q", "to_k", "to_v", "to_out"):
            lin = attn.to_out[0] if key == "to_out" else getattr(attn, key)
            ip[f"{i}.{key}_lora.down.weight"] = r(4, lin.in_features)
            ip[f"{i}.{key}_lora.up.weight"] = r(lin.out_features, 4)
        if name.endswith("attn2.processor"):
            ip[f"{i}.to_k_ip.weight"] = r(attn.to_k.out_features, CROSS)
            ip[f"{i}.to_v_ip.weight"] = r(attn.to_v.out_features, CROSS)
    return {"image_proj": proj, "ip_adapter": ip}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=CROSS,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    tok = _tokenizer()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=CROSS, intermediate_size=64, num_attention_heads=4,
                                        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    sd = root / "sd"
    unet.save_pretrained(sd / "unet")
    vae.save_pretrained(sd / "vae")
    text.save_pretrained(sd / "text_encoder")
    tok.save_pretrained(sd / "tokenizer")
    DDIMScheduler(beta_schedule="scaled_linear").save_pretrained(sd / "scheduler")
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).save_pretrained(root / "controlnet")
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=HC, intermediate_size=48, num_attention_heads=4,
                                                   num_hidden_layers=2, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(root / "image_encoder")
    torch.save(_faceid_plus_state(unet, g), root / "ip-adapter-faceid-plusv2_sd15.bin")
    np.save(root / "face.npy", np.random.default_rng(0).standard_normal(ID).astype(np.float32))
    return root, unet


def _config(root, **kw):
    base = dict(sd_path=str(root / "sd"), controlnet_path=str(root / "controlnet"),
                ip_adapter_path=str(root / "ip-adapter-faceid-plusv2_sd15.bin"),
                image_encoder_path=str(root / "image_encoder"), face_embedding_path=str(root / "face.npy"), dtype="float32")
    return PaperPriorConfig(**{**base, **kw})


def test_one_hds_step_through_every_piece(folders):
    root, unet0 = folders
    prior = PaperPrior.from_config(_config(root), device="cpu")
    # The LoRA was merged into the attention weights: q of the first self-attention moved by up @ down.
    name = next(iter(prior.unet.attn_processors)).rsplit(".", 1)[0]
    sd = torch.load(root / "ip-adapter-faceid-plusv2_sd15.bin", weights_only=True)["ip_adapter"]
    delta = prior.unet.get_submodule(name).to_q.weight - unet0.get_submodule(name).to_q.weight
    torch.testing.assert_close(delta, sd["0.to_q_lora.up.weight"] @ sd["0.to_q_lora.down.weight"])
    assert prior.image_size == 16
    face = torch.rand(40, 40, 3)
    ident = prior.face_identity(face)
    assert ident.id_embeds.shape == (1, 1, ID) and ident.clip_embeds.shape[:2] == (1, 1)
    B = 2
    prior.set_ip_scale(0.5, 0.4)
    cond = HDSConditions(prior.encode_text(["bad"]).expand(B, -1, -1), prior.encode_text(["a man, front view"] * B),
                         prior.null_text(B), prior.zero_identity().expand(B), ident.expand(B),
                         prior.unrelated_identity().expand(B), torch.rand(B, 3, 16, 16))
    images = torch.rand(B, 3, 16, 16, requires_grad=True)
    loss, info = hds_step(prior, prior.encode(images), 300, cond)
    loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # The identity reaches the noise prediction (the IP branch is live): another face changes eps.
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    args = (prior.encode_text(["a man"]),)
    e1 = prior.predict_noise(z, t, *args, ident, torch.zeros(1, 3, 16, 16))
    e2 = prior.predict_noise(z, t, *args, prior.zero_identity(), torch.zeros(1, 3, 16, 16))
    assert (e1 - e2).abs().max() > 1e-6


def test_missing_pieces_name_files(folders, tmp_path):
    root, _ = folders
    with pytest.raises(MissingWeightsError, match="diffusion_pytorch_model"):
        PaperPrior.from_config(_config(root, controlnet_path=str(tmp_path)), device="cpu")
    with pytest.raises(MissingWeightsError, match="buffalo_l"):
        cfg = _config(root)
        cfg.face_embedding_path, cfg.insightface_root = None, str(tmp_path)
        PaperPrior.from_config(cfg, device="cpu")


def test_vcr_runs_on_the_paper_layout(folders):
    from gaussianip.config import VCRConfig
    from gaussianip.vcr import VCRAttnProcessor, decoder_self_attentions, orbit_azimuths, refine_views

    root, _ = folders
    prior = PaperPrior.from_config(_config(root), device="cpu")
    assert decoder_self_attentions(prior.unet)  # the paper-layout UNet has decoder self-attentions to patch
    az = orbit_azimuths(8)
    z = torch.randn(8, 4, 8, 8)
    args = (az, prior.encode_text(["a man"]), prior.encode_text(["bad"]), prior.face_identity(torch.rand(40, 40, 3)),
            prior.zero_identity(), torch.rand(8, 3, 16, 16))
    out = {m: refine_views(prior, z, *args, VCRConfig(mode=m, ddim_steps=10, refine_steps=2)) for m in ("vcr", "independent")}
    assert all(torch.isfinite(v).all() for v in out.values())
    assert (out["vcr"] - out["independent"]).abs().max() > 0  # mutual attention changes the key views
    assert not any(isinstance(p, VCRAttnProcessor) for p in prior.unet.attn_processors.values())  # restored
