"""RodinHD's part of ``make demo`` (the convention is written at the top of ``tools/demo.py``): the tiny pipeline
on a few synthetic avatars (all but one trained, one held out) with short fits and trainings, one sample from the
held-out portrait with its views and turntable, and the fitted triplane of a training avatar rendered beside it.

The fitted triplane shows what the shared decoder and stage 2 learned; the sample comes from a cascade trained for
seconds, so at this scale it is a smoke test of the pipeline (``make train-rodinhd`` trains long enough to generate
whole bodies)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rodinhd.config import load_rodinhd_config
from rodinhd.pipeline import train_all
from rodinhd.sample import render_file

__all__ = ["DEMO_OVERRIDES", "SMALLEST_OVERRIDES", "run"]

#: The demo's scale: a handful of avatars, short fits and trainings (about a minute on two CPU cores).
DEMO_OVERRIDES = (
    "data.num_avatars=4", "data.views=8", "data.res=48", "data.uv_res=64", "data.held_out=1",
    "stage1.outer_loops=2", "stage1.inner_iterations=40", "stage2.iterations=40",
    "conditioning.vae_steps=30", "base.train.max_steps=30", "upsample.train.max_steps=15",
    "sample.num_views=8", "sample.view_res=64", "sample.turntable_frames=24", "sample.turntable_res=96",
)
#: ``smallest``: 3 avatars (2 trained), 4-channel 16^2 triplanes, every stage a few steps (a smoke test).
SMALLEST_OVERRIDES = (
    "data.num_avatars=3", "data.views=4", "data.res=32", "triplane.channels=4", "triplane.resolution=16",
    "decoder.hidden_dim=16", "stage1.outer_loops=1", "stage1.inner_iterations=4", "stage1.rays_per_step=128",
    "stage1.num_samples=24", "stage2.iterations=4", "stage2.rays_per_step=128", "stage2.num_samples=24",
    "render.num_samples=24", "render.grid_resolution=16", "render.grid_updates=4",
    "conditioning.portrait_size=32", "conditioning.kernel_sizes=[4,2,1]", "conditioning.token_dim=16",
    "conditioning.vae_base_channels=8", "conditioning.vae_steps=2",
    "base.resolution=8", "base.unet.model_channels=8", "base.unet.channel_mult=[1,2]",
    "base.unet.num_res_blocks=[1,1]", "base.unet.attention_resolutions=[4]",
    "base.unet.cross_attn_resolutions=[8,4]", "base.unet.conv3d_resolutions=[8]", "base.unet.emb_channels=32",
    "base.context_resolutions=[8,4]", "base.train.max_steps=2", "base.train.batch_size=2",
    "upsample.unet.model_channels=8", "upsample.unet.channel_mult=[1,2]", "upsample.unet.num_res_blocks=[1,1]",
    "upsample.unet.conv3d_resolutions=[16]", "upsample.unet.emb_channels=32", "upsample.context_resolutions=[8]",
    "upsample.patch_size=8", "upsample.render_num_samples=16", "upsample.train.max_steps=2",
    "upsample.train.batch_size=2", "sample.num_views=3", "sample.view_res=32", "sample.turntable_frames=2",
    "sample.turntable_res=32", "sample.base_steps=2", "sample.upsample_steps=2",
)


def run(out: Path, *, smallest: bool = False) -> dict[str, Any]:
    """Train the tiny cascade in ``out`` and sample the held-out avatar; paths written, stage timings."""
    out = Path(out)
    cfg = load_rodinhd_config("tiny", [*DEMO_OVERRIDES, *(SMALLEST_OVERRIDES if smallest else ())])
    t0 = time.perf_counter()
    result = train_all(cfg, out, progress=False)
    smp = result["sample"]
    first = sorted((out / "triplanes").glob("*.safetensors"))[0]
    fitted = render_file(cfg, out, first, out / f"fitted_{first.stem}", overwrite=True)  # the demo's own render
    return {"turntable": smp.get("turntable"), "views": smp.get("grid"), "triplane": smp["triplane"],
            "settings": smp["settings"], "fitted_views": fitted.get("grid"), "seconds": round(time.perf_counter() - t0, 1),
            "stages": result["seconds"], "out": str(out),
            "note": "demo-scale cascade: the sample is a pipeline smoke test, not a result; run make train-rodinhd "
                    "for a trained model"}
