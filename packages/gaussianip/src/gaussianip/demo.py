"""GaussianIP's part of ``make demo``: the embedded prior (trained once, cached in the demo's folder), one
identity-preserving generation from a held-out synthetic face and a prompt, its PLY, turntable and refined views,
and an animation of the result."""

from __future__ import annotations

import time
from pathlib import Path

from gaussianip.config import load_gaussianip_config

#: The demo scale: the tiny config, a little smaller so the part stays within about 1.5 min on 2 cores.
DEMO = ["threads=1", "dataset.num=10", "dataset.views=6", "dataset.held_out=1", "prior.embedded.vae_steps=150",
        "prior.embedded.identity_steps=100", "prior.embedded.diffusion_steps=250", "gaussians.num_points=2000",
        "stage1.steps=60", "recon.steps=30", "output.turntable_frames=16", "animate.frames=12"]
#: The smallest end-to-end run (tests and ``smallest=True``): seconds of training, tiny renders.
SMALLEST = ["threads=1", "dataset.num=3", "dataset.views=4", "dataset.res=32", "dataset.uv_res=64", "dataset.held_out=1",
            "prior.embedded.image_size=32", "prior.embedded.vae_steps=4", "prior.embedded.identity_steps=4",
            "prior.embedded.diffusion_steps=4", "prior.embedded.batch_size=4", "gaussians.num_points=400",
            "stage1.steps=4", "stage1.render_size=32", "stage1.preview_every=2", "vcr.num_views=8", "vcr.size=32",
            "vcr.refine_steps=2", "recon.steps=3", "output.size=32", "output.turntable_frames=4", "animate.frames=3"]
PROMPT = "a woman in a red dress"


def run(out: Path, *, smallest: bool = False) -> dict:
    """Write the GaussianIP demo into ``out``; returns a summary (paths, seconds)."""
    from gaussianip.system import pipeline

    out = Path(out)
    overrides = (SMALLEST if smallest else DEMO) + [f"dataset.root={out / 'dataset'}", f"prior.cache_dir={out / 'prior'}",
                                                      f"run_dir={out / 'runs'}"]
    cfg = load_gaussianip_config("tiny", overrides)
    t0 = time.time()
    prior = pipeline.load_prior(cfg)  # trains once into out/prior
    t_prior = time.time() - t0
    t1 = time.time()
    res = pipeline.generate(cfg, PROMPT, out=out / "result", overwrite=True)
    t_gen = time.time() - t1
    anim = pipeline.animate(out / "result", cfg, "walk", overwrite=True)
    return {"prompt": PROMPT, "face": str(pipeline.default_face(cfg)), "prior": prior.name, "run": res["run"],
            "ply": res["ply"], "turntable": res["turntable"], "animation": anim["animation"],
            "refined_views": str(out / "result" / "previews" / "stage2_refined.png"),
            "seconds_prior": round(t_prior, 1), "seconds_generate": round(t_gen, 1),
            "seconds": round(time.time() - t0, 1), "perceptual": res["perceptual"]}
