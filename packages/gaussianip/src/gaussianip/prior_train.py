"""Training of the embedded prior on the kernel's synthetic avatars (``gaussianip train-prior``).

Three phases on the kernel's Trainer (Accelerate, checkpoints, exact resume, progress bars): the VAE
(L1 + a small KL), the face-identity encoder (InfoNCE between two lightings / shifts of each avatar's portrait:
the same person under different conditions is one identity), then the UNet + ControlNet + identity adapter
(eps-prediction on SD's DDPM schedule, text and identity dropped independently so the null / negative branches
of HDS are in-distribution). Views are composited on white, the stage-1 background; each view's condition is its
OpenPose skeleton after the view-dependent cropping of :mod:`gaussianip.views`, and its caption gets the same
view suffix stage 1 uses.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from avatar_core.cameras import Cameras
from avatar_core.render.conditions import openpose_image
from avatar_core.train import TrainConfig, Trainer
from gaussianip.prior import EmbeddedPrior, FaceIdentity, embedded_components
from gaussianip.views import skeleton_visibility, view_direction

log = logging.getLogger(__name__)


def ensure_dataset(dcfg) -> Path:
    """The synthetic dataset folder, written by the kernel generator when it is not there yet."""
    from avatar_core.data.generate import generate_dataset

    root = Path(dcfg.root)
    return generate_dataset(root, num=dcfg.num, views=dcfg.views, res=dcfg.res, seed=dcfg.seed, uv_res=dcfg.uv_res)


def pose_images(keypoints: Tensor, cams: Cameras, azimuth: Tensor, kind: str) -> Tensor:  # -> [C, 3, H, W]
    """Skeleton images of world keypoints ``[18, 3]`` with the view-dependent cropping."""
    px, z = cams.project(keypoints.float()[None].expand(len(cams), -1, -1))
    vis = skeleton_visibility(px, z, azimuth, kind, cams.width, cams.height)
    img, _, _ = openpose_image(None, None, cams, occlusion=False, keypoints=keypoints.float(), visibility=vis)
    return img.permute(0, 3, 1, 2)


def _resize(x: Tensor, size: int) -> Tensor:  # [B, C, H, W]
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def load_training_data(root: Path, cfg, held_out: int) -> dict:
    """Images on white, skeleton images, prompts and portraits of the training avatars."""
    from avatar_core.data.datasets import MultiViewDataset
    from avatar_core.io import load_image

    ds = MultiViewDataset(root)
    n_train = max(len(ds) - held_out, 1)
    S = cfg.image_size
    images, poses, prompts, owner, portraits = [], [], [], [], []
    for i in range(n_train):
        item = ds[i]
        attrs, cams_json = ds.attributes(i), ds.cameras(i)
        cams = Cameras(item["viewmats"], item["Ks"], cams_json["width"], cams_json["height"])
        az = torch.tensor([v["azimuth_deg"] for v in cams_json["views"]])
        white = item["images"] + (1 - item["masks"][..., None])
        images.append(_resize(white.permute(0, 3, 1, 2), S))
        poses.append(_resize(pose_images(item["keypoints"], cams, az, "full"), S))
        prompts += [f"{attrs['caption']}, {d} view" for d in view_direction(az)]
        # The portrait (upper body, from the front) stands in for the zoomed views of stage 1.
        p = cams_json["portrait"]
        pc = Cameras(torch.tensor(p["viewmat"])[None], torch.tensor(p["K"])[None], cams_json["width"], cams_json["height"])
        rgba = load_image(ds.dirs[i] / p["file"])
        portraits.append(rgba[..., :3] * rgba[..., 3:])
        images.append(_resize((rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])).permute(2, 0, 1)[None], S))
        poses.append(_resize(pose_images(item["keypoints"], pc, torch.zeros(1), "upper"), S))
        prompts.append(f"{attrs['caption']}, front view")
        owner += [i] * (len(az) + 1)
    return {"images": torch.cat(images), "poses": torch.cat(poses), "prompts": prompts,
            "owner": torch.tensor(owner), "portraits": torch.stack(portraits).permute(0, 3, 1, 2),
            "num_avatars": n_train}


def _batches(n: int, batch: int, seed: int):
    def data(epoch: int):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = torch.randperm(n, generator=g)
        return [{"idx": perm[k:k + batch]} for k in range(0, n, batch) if len(perm[k:k + batch])]
    return data


def _train(model: nn.Module, params, lr: float, steps: int, out: Path, step_fn, data, seed: int) -> None:
    tc = TrainConfig(output_dir=str(out), max_steps=steps, seed=seed, checkpoint_every=max(steps, 1),
                     log_every=max(steps // 10, 1), keep_last_checkpoints=1, max_grad_norm=1.0)
    Trainer(tc, model, lambda _: torch.optim.AdamW(params, lr=lr, weight_decay=0.0), step_fn, data).train(resume="auto")


def _lighting(x: Tensor, g: torch.Generator) -> Tensor:  # [B, 3, H, W]: another light and a small shift
    B = x.shape[0]
    gain = 0.7 + 0.6 * torch.rand(B, 1, 1, 1, generator=g)
    tint = 1 + 0.1 * (torch.rand(B, 3, 1, 1, generator=g) - 0.5)
    gamma = 0.8 + 0.4 * torch.rand(B, 1, 1, 1, generator=g)
    y = (x.clamp(0, 1) ** gamma * gain * tint).clamp(0, 1)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    return torch.roll(y, shifts=(dy, dx), dims=(2, 3))


def train_embedded_prior(cfg, out: Path, progress: bool = True) -> EmbeddedPrior:
    """Train the embedded prior (``cfg``: the full GaussianIPConfig) into ``out`` and return it."""
    from avatar_core.text import load_text_encoder

    out = Path(out)
    pc = cfg.prior.embedded
    root = ensure_dataset(cfg.dataset)
    data = load_training_data(root, pc, cfg.dataset.held_out)
    torch.manual_seed(pc.seed)
    comps = embedded_components(pc)
    N = len(data["images"])
    images, poses = data["images"], data["poses"]

    # 1. VAE
    vae = comps["vae"]

    def vae_step(model, batch):
        x = images[batch["idx"]] * 2 - 1
        post = model.encode(x).latent_dist
        rec = model.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        return (rec - x).abs().mean() + 1e-4 * kl, {}

    _train(vae, vae.parameters(), pc.lr, pc.vae_steps, out / "train_vae", vae_step, _batches(N, pc.batch_size, 1), pc.seed)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = torch.cat([vae.encode(images[k:k + 64] * 2 - 1).latent_dist.mean for k in range(0, N, 64)])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std().clamp_min(1e-3)))
    lat = lat * vae.config.scaling_factor

    # 2. identity encoder: InfoNCE over two lightings of each portrait
    idenc = comps["identity"]
    faces = data["portraits"]
    A = len(faces)
    gaug = torch.Generator().manual_seed(pc.seed + 7)

    def id_step(model, batch):
        idx = batch["idx"]
        if len(idx) < 2:
            idx = torch.arange(A)
        f = faces[idx]
        a, b = model(_lighting(f, gaug)), model(_lighting(f, gaug))
        logits = a @ b.T / 0.1
        target = torch.arange(len(idx))
        return 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)), {}

    _train(idenc, idenc.parameters(), pc.lr, pc.identity_steps, out / "train_identity", id_step,
           _batches(A, min(pc.batch_size, A), 2), pc.seed)
    idenc.eval().requires_grad_(False)

    # 3. UNet + ControlNet + identity adapter
    text = load_text_encoder("minilm", max_length=pc.text_length)
    with torch.no_grad():
        tokens = torch.cat([text.encode(data["prompts"][k:k + 64]).token_states for k in range(0, N, 64)])
        null_tok = text.encode_null(1).token_states
        ids = idenc(faces)[data["owner"]][:, None]  # [N, 1, E]
    prior = EmbeddedPrior(pc, comps, text_encoder=text, null_face=faces[-1])
    net = nn.ModuleDict({"unet": prior.unet, "controlnet": prior.controlnet})
    acp = prior.alphas_cumprod
    gdrop = torch.Generator().manual_seed(pc.seed + 11)

    def diff_step(model, batch):
        idx = batch["idx"]
        B = len(idx)
        z0 = lat[idx]
        t = torch.randint(0, 1000, (B,), generator=gdrop)
        noise = torch.randn(z0.shape, generator=gdrop)
        a = acp[t].view(B, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        drop_t = torch.rand(B, generator=gdrop) < pc.cond_dropout
        drop_i = torch.rand(B, generator=gdrop) < pc.cond_dropout
        ctx = torch.where(drop_t[:, None, None], null_tok.expand(B, -1, -1), tokens[idx])
        idv = torch.where(drop_i[:, None, None], torch.zeros_like(ids[idx]), ids[idx])
        eps = prior.predict_noise(zt, t, ctx, FaceIdentity(idv), poses[idx])
        return nn.functional.mse_loss(eps, noise), {}

    prior.train()
    _train(net, net.parameters(), pc.lr, pc.diffusion_steps, out / "train_diffusion", diff_step,
           _batches(N, pc.batch_size, 3), pc.seed)
    prior.eval().requires_grad_(False)
    prior.save(out, info={"dataset": str(root), "train_images": N, "train_avatars": data["num_avatars"],
                          "steps": {"vae": pc.vae_steps, "identity": pc.identity_steps, "diffusion": pc.diffusion_steps}})
    return prior


def load_or_train_embedded(cfg, train_if_missing: bool = True) -> EmbeddedPrior:
    """The cached embedded prior of ``cfg.prior.cache_dir``; trained there first when absent and allowed."""
    out = Path(cfg.prior.cache_dir)
    if all((out / f).is_file() for f in EmbeddedPrior.FILES):
        prior = EmbeddedPrior.load(out)
        from avatar_core.config import config_diff

        stored = prior.cfg
        if config_diff(stored, cfg.prior.embedded):
            from avatar_core.errors import ConfigError

            raise ConfigError(f"the embedded prior in {out} was trained with other settings "
                              f"({', '.join(list(config_diff(stored, cfg.prior.embedded))[:4])})",
                              "point prior.cache_dir at a new folder, or retrain with `gaussianip train-prior --overwrite`")
        return prior
    if not train_if_missing:
        EmbeddedPrior.load(out)  # raises the error naming the command to run
    log.info("training the embedded prior into %s (once; later runs read it)", out)
    return train_embedded_prior(cfg, out)
