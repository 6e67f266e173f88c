"""Paper-scale cost of one GAS sample, counted rather than guessed: FLOPs of every network at SVD-xt's sizes.

The networks are built under PyTorch's ``FakeTensorMode`` (shapes only, no memory, no weights) and run under
``torch.utils.flop_counter.FlopCounterMode``, which counts matrix multiplications and convolutions (2 FLOPs per
multiply-add) of the real architectures: diffusers' ``UNetSpatioTemporalConditionModel`` at its default (SVD)
configuration plus GAS's encoders and switcher, SVD's temporal-decoder VAE, and the human NeRF at SHERF's sizes.
Elementwise work (norms, activations, softmax) is not counted, so the figures are a lower bound on the work; the
implied times divide by a sustained fraction of each GPU's dense bf16 peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

#: Dense bf16 tensor-core peaks (NVIDIA data sheets, SXM parts), FLOP/s.
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12}

#: SVD-xt's temporal-decoder VAE (its vae/config.json).
SVD_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4)


@dataclass
class Cost:
    unet_forward: float
    vae_encode: float
    vae_decode: float
    total: float

    def seconds(self, gpu: str, utilisation: float = 0.4) -> float:
        return self.total / (PEAK_FLOPS[gpu] * utilisation)


def _count(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def paper_flops(frames: int = 20, res: int = 512, steps: int = 25, cfg_passes: int = 2) -> Cost:
    """FLOPs of one novel-view sample: ``steps`` x ``cfg_passes`` UNet passes over ``frames`` frames at ``res``^2,
    plus the VAE encodings (reference and ``frames`` NeRF renders) and the decoding of ``frames`` frames."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gas.video_unet import GASUNet

    h = res // 8
    with FakeTensorMode(allow_non_fake_inputs=True):
        unet = GASUNet.from_unet(UNetSpatioTemporalConditionModel(), None, vae_downsamplings=3)
        vae = AutoencoderKLTemporalDecoder(**SVD_VAE)
        x = torch.empty(1, frames, 8, h, h)
        t = torch.empty(1)
        ctx = torch.empty(1, 1, 1024)
        ids = torch.empty(1, 3)
        nerf = torch.empty(1, frames, 4, h, h)
        normals = torch.empty(1, frames, 3, res, res)
        task = torch.empty(1, 2)
        with torch.no_grad():
            f_unet = _count(lambda: unet(x, t, ctx, ids, nerf_latents=nerf, normal_maps=normals, task=task))
            f_enc = _count(lambda: vae.encode(torch.empty(frames + 1, 3, res, res)))
            f_dec = _count(lambda: vae.decode(torch.empty(frames, 4, h, h), num_frames=frames))
    total = steps * cfg_passes * f_unet + f_enc + f_dec
    return Cost(f_unet, f_enc, f_dec, total)


def nerf_flops(cfg, frames: int = 20, res: int = 512, measure_res: int = 64) -> float:
    """FLOPs of the human NeRF rendering ``frames`` frames at ``res``^2 with ``cfg.nerf``'s sizes: counted on one
    frame at ``measure_res``^2 of a real posed body (rays through the body's box, samples near its surface) and
    scaled by the pixel count (per-ray work does not depend on the resolution)."""
    from avatar_core.cameras import orbit_cameras
    from gas.nerf_training import build_nerf

    model = build_nerf(cfg).eval()
    warp = model.warp
    body = warp.body
    shape = torch.full((body.shape_dim,), 0.5)
    ref = warp.pose(shape, torch.zeros(body.num_joints - 1, 3))
    big = warp.pose(shape, warp.big_pose(shape))
    cams = orbit_cameras(2, radius=2.8, fov_deg=40, width=measure_res, height=measure_res)
    img = torch.rand(measure_res, measure_res, 4)
    with torch.no_grad():
        code = model.encode(img, cams[0:1], ref, big)
        per_frame = _count(lambda: model.render(code, ref, cams[1:2]))
    return per_frame * (res / measure_res) ** 2 * frames
