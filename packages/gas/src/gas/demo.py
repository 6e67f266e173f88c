"""GAS's part of ``make demo``: both stages trained on a few synthetic avatars, then one held-out person from one
image + parameters file, shown in a novel-view orbit (tiled past the model's frame count) and driven by a motion.

At this scale (32^2, seconds of training) the outputs are a smoke test of the whole pipeline, not a result;
``make train-gas`` trains longer.
"""

from __future__ import annotations

import time
from pathlib import Path

#: Demo scale on top of configs/tiny.yaml: 4 avatars (1 held out), short stage trainings.
NORMAL = ["data.num_avatars=5", "data.held_out=1", "nerf_train.train.max_steps=40", "video_train.vae_steps=60",
          "video_train.train.max_steps=40", "sample.steps=8", "sample.frames=20"]
SMALLEST = ["data.num_avatars=2", "data.held_out=1", "data.frames=4", "nerf_train.train.max_steps=3",
            "nerf_train.targets_per_step=1", "nerf.num_samples=12", "video_train.vae_steps=3",
            "video_train.train.max_steps=3", "video.unet.num_frames=4", "sample.tile=4", "sample.overlap=1",
            "sample.steps=2", "sample.frames=6"]


def run(out: Path, *, smallest: bool = False) -> dict:
    """Train, then synthesise a novel view and a novel pose of a held-out avatar into ``out``; a summary dict."""
    from avatar_core.data.clips import load_clip
    from gas import pipeline
    from gas.data import ensure_clips, split
    from gas.reference import export_reference

    out = Path(out)
    t0 = time.perf_counter()
    cfg = pipeline.config("tiny", [f"run={out / 'run'}", *(SMALLEST if smallest else NORMAL)])
    pipeline.train_nerf(cfg, progress=False)
    pipeline.train_video(cfg, progress=False)
    _, held = split(cfg, ensure_clips(cfg, progress=False))
    clip = load_clip(held[0])
    from gas.nerf_training import body_for

    image, params = export_reference(out / "input" / "person.png", clip.ref_rgba, clip.ref_camera, body_for(cfg),
                                     clip.shape, clip.ref_pose, clip.transl[0])
    frames = cfg.sample.frames
    view = pipeline.novel_view(cfg, str(image), str(out / "novel_view"), frames=frames, overwrite=True,
                               progress=False)
    pose = pipeline.novel_pose(cfg, str(image), "wave", str(out / "novel_pose"), frames=frames, overwrite=True,
                               progress=False)
    return {"input": str(image), "params": str(params), "novel_view": view["video"], "novel_pose": pose["video"],
            "nerf_view": view["nerf_video"], "comparison": view["comparison"],
            "novel_view_seconds": round(view["seconds"], 2), "frames": frames, "tile": cfg.sample.tile,
            "seconds": round(time.perf_counter() - t0, 1),
            "note": "demo-scale models: a pipeline smoke test; run make train-gas for a trained model"}
