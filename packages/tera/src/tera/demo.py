"""TeRA's part of ``make demo`` (the convention is written at the top of ``tools/demo.py``): a tiny text-to-avatar
model trained here on a few synthetic avatars, three generations from prompts, one try-on edit and one animation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from tera.config import load_config
from tera.generate import animate, edit, generate
from tera.pipeline import load_models, run_all

__all__ = ["DEMO_OVERRIDES", "PROMPTS", "SMALLEST_OVERRIDES", "run"]

#: One torch thread: on a 2-core machine shared with anything else, two threads per op thrash (30x slower).
DEMO_OVERRIDES = (
    "threads=1", "data.num=6", "data.views=4", "data.res=48", "data.image_size=48", "data.uv_res=64",
    "body.num_points=2500", "teacher.resolution=32", "teacher.feature_levels=[8,16,32]", "teacher.steps=25", "teacher.views_per_step=2",
    "distill.latent_resolution=16", "distill.upsample_factor=2", "distill.train.max_steps=60",
    "diffusion.train.max_steps=150", "diffusion.batch_size=6", "generate.turntable_frames=16",
    "generate.render_size=192", "animate.frames=12", "animate.render_size=192", "diffusion.train.progress_bar=false",
    "distill.train.progress_bar=false",
)
#: ``smallest``: every step runs once or twice, on two avatars, in a few seconds (a smoke test of the part).
SMALLEST_OVERRIDES = (
    "data.num=2", "data.views=3", "data.res=32", "data.image_size=32", "data.eval_views=[1]", "body.num_points=800",
    "teacher.resolution=16", "teacher.feature_levels=[]", "teacher.steps=2", "distill.latent_resolution=8",
    "distill.train.max_steps=2",
    "diffusion.train.max_steps=2", "diffusion.batch_size=2", "generate.sampler=ddim", "generate.steps=2",
    "generate.render_size=32", "generate.turntable_frames=2", "animate.frames=2", "animate.render_size=32",
)
PROMPTS = ("a woman in a red dress", "a man in a blue shirt and black trousers", "a man in a green jacket")


def run(out: Path, *, smallest: bool = False) -> dict[str, Any]:
    """Train the tiny model in ``out`` (dataset under ``out/dataset``), generate, edit and animate; the summary."""
    out = Path(out)
    overrides = [*DEMO_OVERRIDES, *(SMALLEST_OVERRIDES if smallest else ()), f"run_dir={out}",
                 f"data.root={out / 'dataset'}"]
    cfg = load_config("tiny", overrides)
    threads = torch.get_num_threads()
    try:
        t0 = time.perf_counter()
        stages = run_all(cfg, progress=False)
        models = load_models(cfg)
        # A rerun of the demo rewrites the demo's own results (and only those: they carry its result markers).
        gens = [generate(cfg, p, seed=i, models=models, overwrite=True) for i, p in enumerate(PROMPTS)]
        ed = edit(cfg, gens[1]["dir"], "upper_clothes", "a man in a yellow shirt", models=models, overwrite=True)
        clip = animate(cfg, gens[0]["dir"], models=models, overwrite=True)
    finally:
        torch.set_num_threads(threads)  # the demo's single thread must not leak into the caller's other parts
    return {
        "run_dir": str(out),
        "generated": {p: g["dir"] for p, g in zip(PROMPTS, gens)},
        "turntables": [g["files"]["turntable"] for g in gens],
        "edit": {"dir": ed["dir"], "seam": ed["seam"]},
        "animation": clip["video"],
        "seconds": {"fit_teacher": stages["fit_teacher"]["seconds"], "distill": stages["distill"]["seconds"],
                    "train": stages["train"]["seconds"], "generate_each": [g["seconds"] for g in gens],
                    "total": time.perf_counter() - t0},
        "psnr_heldout": stages["distill"].get("psnr_heldout"),
    }
