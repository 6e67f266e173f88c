"""The paper-scale prior (GaussianIP Sec. 3.1, official code): an SD-1.5-class UNet + VAE + CLIP text encoder,
ControlNet openpose, IP-Adapter-FaceID-PlusV2 (image projection on the ArcFace embedding and CLIP-ViT-H hidden
states, decoupled cross-attention, and its rank-128 LoRA merged into every UNet attention's q/k/v/out), with the
face identity from insightface (buffalo_l) or a precomputed embedding file. Everything is read from local folders
through the kernel's loaders; nothing is fetched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from avatar_core.errors import BackendUnavailableError, CorruptFileError, InputError, MissingWeightsError
from gaussianip.prior import FaceIdentity, Prior, _as_face_batch

#: Files of insightface's buffalo_l pack that the identity needs (detector + ArcFace recogniser).
INSIGHTFACE_FILES = ("det_10g.onnx", "w600k_r50.onnx")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LORA_KEYS = ("to_q", "to_k", "to_v", "to_out")


def merge_faceid_lora(unet, ip_state: dict[str, Tensor], scale: float = 1.0) -> int:
    """Merge IP-Adapter-FaceID's LoRA (``{i}.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight``, ``i`` the position in
    ``unet.attn_processors``) into the attention weights: ``W += scale * up @ down``. Returns the layers changed."""
    names = list(unet.attn_processors)
    changed = 0
    for i, name in enumerate(names):
        attn = unet.get_submodule(name.rsplit(".", 1)[0])
        done = False
        for key in LORA_KEYS:
            down, up = ip_state.get(f"{i}.{key}_lora.down.weight"), ip_state.get(f"{i}.{key}_lora.up.weight")
            if down is None and up is None:
                continue
            if down is None or up is None:
                raise CorruptFileError(f"IP-Adapter LoRA for layer {i} ({key}) lacks its down or up matrix",
                                       "use the official ip-adapter-faceid-plusv2_sd15.bin")
            lin = attn.to_out[0] if key == "to_out" else getattr(attn, key)
            if tuple(lin.weight.shape) != (up.shape[0], down.shape[1]):
                raise CorruptFileError(f"IP-Adapter LoRA for {name} ({key}) is {tuple(up.shape)} x {tuple(down.shape)} "
                                       f"but the layer is {tuple(lin.weight.shape)}", "use the adapter made for this UNet")
            with torch.no_grad():
                lin.weight += scale * (up.float() @ down.float()).to(lin.weight)
            done = True
        changed += done
    return changed


def _read_embedding(path: Path) -> Tensor:  # [E]
    if not path.is_file():
        raise MissingWeightsError(f"face embedding file not found: {path}",
                                  "pass a .npy / .pt / .safetensors file holding one 512-d ArcFace embedding")
    if path.suffix == ".npy":
        import numpy as np

        emb = torch.from_numpy(np.load(path))
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        d = load_file(str(path))
        emb = next(iter(d.values()))
    else:
        emb = torch.load(path, map_location="cpu", weights_only=True)
    emb = torch.as_tensor(emb).float().reshape(-1)
    if emb.numel() < 16 or not torch.isfinite(emb).all():
        raise CorruptFileError(f"{path} does not hold a face embedding (got {emb.numel()} values)",
                               "save insightface's faces[0].normed_embedding (512 floats)")
    return emb


class InsightFaceIdentity:
    """insightface's FaceAnalysis (buffalo_l) on onnxruntime: the largest face's normed ArcFace embedding and
    its aligned 224 px crop (``face_align.norm_crop``) for the CLIP image encoder, as the official code does."""

    def __init__(self, root: str | Path):
        root = Path(root).expanduser()
        folder = root / "models" / "buffalo_l"
        missing = [f for f in INSIGHTFACE_FILES if not (folder / f).is_file()]
        if missing:
            raise MissingWeightsError(f"insightface buffalo_l files missing: {', '.join(missing)}; looked in {folder}",
                                      "download buffalo_l (insightface model zoo) on a machine with network and put "
                                      "its .onnx files in ROOT/models/buffalo_l, then set prior.paper.insightface_root=ROOT")
        try:
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise BackendUnavailableError(f"insightface is not installed ({exc})",
                                          "pip install insightface onnxruntime, or give prior.paper.face_embedding_path") from exc
        self.app = FaceAnalysis(name="buffalo_l", root=str(root), providers=["CPUExecutionProvider"])
        self.app.prepare(ctx_id=0, det_size=(640, 640))

    def __call__(self, face: Tensor) -> tuple[Tensor, Tensor]:  # [H, W, 3] -> ([512], [224, 224, 3])
        import numpy as np
        from insightface.utils import face_align

        bgr = (face[..., :3].clamp(0, 1) * 255).round().byte().numpy()[..., ::-1].copy()
        faces = self.app.get(bgr)
        if not faces:
            raise InputError("no face was found in the photo", "pass a photo with a clearly visible, frontal face")
        f = max(faces, key=lambda x: float((x.bbox[2] - x.bbox[0]) * (x.bbox[3] - x.bbox[1])))
        crop = face_align.norm_crop(bgr, landmark=f.kps, image_size=224)[..., ::-1]
        return torch.from_numpy(np.asarray(f.normed_embedding)).float(), torch.from_numpy(crop.copy()).float() / 255


class PaperPrior(Prior):
    """SD-1.5 + ControlNet-openpose + IP-Adapter-FaceID-PlusV2 (see the module docstring)."""

    name = "paper"

    def __init__(self, unet, vae, controlnet, text_encoder, image_encoder, face_fn=None, embedding: Tensor | None = None,
                 null_embedding: Tensor | None = None):
        super().__init__()
        self.unet, self.vae, self.controlnet, self.image_encoder = unet, vae, controlnet, image_encoder
        self._text = [text_encoder]
        self.face_fn, self.embedding = face_fn, embedding
        dim = int(self._projection().proj.net[0].proj.in_features)
        self.id_dim = dim
        g = torch.Generator().manual_seed(2024)
        # The unrelated face of the null branch: a given embedding, or a fixed random unit vector.
        null = null_embedding if null_embedding is not None else torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
        self.register_buffer("null_embedding", null.float().reshape(dim), persistent=False)

    @classmethod
    def from_config(cls, pc, device: str | torch.device | None = None) -> PaperPrior:
        from avatar_core import pretrained as P
        from avatar_core.text import CLIPTextEncoder

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, pc.dtype) if str(device).startswith("cuda") else torch.float32
        kw = dict(dtype=dtype, device=device)
        unet = P.load_sd_unet(pc.sd_path, config_key="prior.paper.sd_path", **kw)
        vae = P.load_sd_vae(pc.vae_path if pc.vae_path else pc.sd_path, config_key="prior.paper.vae_path", **kw)
        text_model = P.load_sd_text_encoder(pc.sd_path, config_key="prior.paper.sd_path", **kw)
        tokenizer = P.load_sd_tokenizer(pc.sd_path, config_key="prior.paper.sd_path")
        controlnet = P.load_controlnet(pc.controlnet_path, config_key="prior.paper.controlnet_path", **kw)
        weights = P.load_ip_adapter(pc.ip_adapter_path, image_encoder_path=pc.image_encoder_path,
                                    config_key="prior.paper.ip_adapter_path",
                                    image_encoder_config_key="prior.paper.image_encoder_path", **kw)
        if weights.kind != "faceid_plus":
            raise InputError(f"{weights.path.name} is an IP-Adapter of kind {weights.kind!r}; GaussianIP uses "
                             "IP-Adapter-FaceID-PlusV2", "point prior.paper.ip_adapter_path at ip-adapter-faceid-plusv2_sd15.bin")
        merge_faceid_lora(unet, weights.ip_adapter)
        P.attach_ip_adapter(unet, weights, scale=0.5)
        if pc.face_embedding_path:
            face_fn, emb = None, _read_embedding(Path(pc.face_embedding_path).expanduser())
        elif pc.insightface_root:
            face_fn, emb = InsightFaceIdentity(pc.insightface_root), None
        else:
            raise MissingWeightsError("no face identity model is configured",
                                      "set prior.paper.insightface_root (folder with models/buffalo_l) or "
                                      "prior.paper.face_embedding_path (a precomputed ArcFace embedding)")
        prior = cls(unet, vae, controlnet, CLIPTextEncoder(text_model, tokenizer), weights.image_encoder, face_fn, emb)
        return prior.to(device).eval().requires_grad_(False)

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_text(self, prompts: list[str]) -> Tensor:
        return self._text[0].encode(list(prompts)).token_states.to(self.device, self.dtype)

    def null_text(self, batch: int) -> Tensor:
        return self._text[0].encode_null(batch).token_states.to(self.device, self.dtype)

    def _clip_hidden(self, images: Tensor) -> Tensor:  # [B, H, W, 3] in [0, 1] -> [B, 1, T, Hc]
        size = int(self.image_encoder.config.image_size)
        x = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2).float(), size=(size, size), mode="bicubic",
                                            align_corners=False, antialias=True).clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(self.device, self.dtype)
        hidden = self.image_encoder(x, output_hidden_states=True).hidden_states[-2]
        return hidden[:, None]

    def face_identity(self, face: Tensor) -> FaceIdentity:
        _as_face_batch(face)
        with torch.no_grad():
            if self.face_fn is not None:
                emb, crop = self.face_fn(face)
            else:
                emb, crop = self.embedding, face[..., :3]
            if emb.numel() != self.id_dim:
                raise InputError(f"the face embedding has {emb.numel()} values; the IP-Adapter expects {self.id_dim}",
                                 "use insightface's ArcFace (buffalo_l) embedding")
            clip = self._clip_hidden(crop[None])
        return FaceIdentity(emb.reshape(1, 1, -1).to(self.device, self.dtype), clip)

    def unrelated_identity(self) -> FaceIdentity:
        with torch.no_grad():
            clip = self._clip_hidden(torch.full((1, 224, 224, 3), 0.5))
        return FaceIdentity(self.null_embedding.reshape(1, 1, -1).to(self.device, self.dtype), clip)

    def zero_identity(self) -> FaceIdentity:
        with torch.no_grad():
            clip = self._clip_hidden(torch.zeros(1, 224, 224, 3))
        return FaceIdentity(torch.zeros(1, 1, self.id_dim, device=self.device, dtype=self.dtype), clip)
