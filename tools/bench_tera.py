"""TeRA generation benchmark: the tiny model on this CPU, and the paper-scale FLOP count per generation.

Tiny generation = 100 DDPM steps (classifier-free guidance: two UNet passes per step, batched) + decoding the latent
into attribute maps and Gaussians + one 256 x 256 render. Target: <= 10 s on 2 CPU cores. The models are built
from the config (random weights: the work per step does not depend on the weights), or loaded from a trained run
with --run-dir.

Paper scale: FLOPs of one generation counted by torch's FlopCounterMode on meta tensors (no memory, no weights):
the UNet of configs/paper.yaml (32 x 256 x 256 latent, CLIP 77 x 768 context) x 2 (CFG) x 100 steps, plus the
distillation decoder 256 -> 1024. The implied RTX 3090 time divides by its peak (35.6 TFLOP/s FP32, 71 TFLOP/s
FP16 tensor cores, dense) and by a utilisation typical of UNets in PyTorch (40%).

Sampler cost: 100-step DDPM against DDIM at --ddim-steps, seconds and quality (text-faithfulness score, colour-map
difference to the DDPM sample from the same noise); meaningful with a trained --run-dir.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from avatar_core.data.garment_score import garment_scorer, parse_garments
from tera import avatars, stage2
from tera import pipeline as P
from tera.config import CONFIG_DIR, load_config
from tera.distill import DistillationDecoder
from tera.latent_diffusion import StructuredLatentDiffusion, build_unet
from tera.text import TextCondition
from tera.uv_gaussians import ATTRIBUTE_SLICES

RTX3090_FP32 = 35.6e12
RTX3090_FP16_TENSOR = 71.0e12
UTILISATION = 0.4


def tiny_models(cfg, run_dir: str | None):
    """(avatar, decoder, diffusion) of the tiny config: trained ones from ``run_dir``, else freshly built."""
    if run_dir:
        m = P.load_models(load_config(None, [f"run_dir={run_dir}", f"threads={cfg.threads}"]))
        return m.avatar, m.decoder, m.diffusion
    t, d = cfg.teacher, cfg.distill
    avatar = P.build_avatar(cfg)
    decoder = DistillationDecoder(t.channels, d.upsample_factor, d.hidden_channels, t.geometry_channels,
                                  t.geometry_hidden, t.texture_hidden).eval()
    text = stage2.text_conditioner(cfg, torch.device("cpu"))
    model = StructuredLatentDiffusion(stage2.unet_config(cfg, t.channels, d.latent_resolution, text.dim), text=text,
                                      sample_steps=100).eval()
    return avatar, decoder, model


def bench_tiny(cfg, run_dir: str | None, repeats: int) -> dict[str, float]:
    avatar, decoder, model = tiny_models(cfg, run_dir)
    cond = model.encode_text(["a woman in a red dress"])  # encoded once: the text encoder is not the UNet's cost
    cams = avatars.turntable_cameras(cfg, 1, [0.0, 0.0, 0.0], 256)
    times: dict[str, list[float]] = {"sample_100_ddpm": [], "decode": [], "render_256": [], "total": []}
    for r in range(repeats + 1):  # the first round warms up (allocations, kernel caches) and is not counted
        t0 = time.perf_counter()
        with torch.no_grad():
            latent = model.sample(cond, steps=100, sampler="ddpm", generator=torch.Generator().manual_seed(r))
            t1 = time.perf_counter()
            maps = decoder(latent)
            g = avatar(maps)
            t2 = time.perf_counter()
            cams_c = avatars.turntable_cameras(cfg, 1, avatars.body_centre(g.means[0]), 256)
            avatar.render(g, cams_c)
        t3 = time.perf_counter()
        if r:
            for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                times[k].append(v)
    del cams
    return {k: statistics.median(v) for k, v in times.items()}


QUALITY_PROMPTS = ("a woman in a red dress", "a man in a green striped shirt and black trousers",
                   "a woman in a blue shirt and white skirt")


def bench_samplers(cfg, run_dir: str | None, ddim_steps: list[int], seeds: int,
                   prompts: tuple[str, ...] = QUALITY_PROMPTS) -> list[dict[str, float]]:
    """DDPM (100 steps, the paper's sampler) against DDIM at fewer steps, from the same initial noise.

    Per sampler: seconds per generation (sampling only, one prompt), the text-faithfulness score of
    ``pipeline.evaluate`` (the kernel's garment scorer, avatar_core.data.garment_score, on the decoded UV colour map
    against the prompt's attributes) over prompts x seeds,
    and the mean absolute per-texel difference of the decoded colour map to the DDPM sample of the same seed
    (``sample`` draws the initial noise first from the seeded generator, so both chains start from the same x_T).
    """
    avatar, decoder, model = tiny_models(cfg, run_dir)
    scorer = garment_scorer(cfg.body.name, cfg.body.model_dir, cfg.data.uv_res)
    rgb = ATTRIBUTE_SLICES["rgb"]
    conds = {p: model.encode_text([p]) for p in prompts}
    rows, ref = [], {}
    for sampler, steps in [("ddpm", 100)] + [("ddim", n) for n in ddim_steps]:
        times, scores, diffs = [], [], []
        for p in prompts:
            for s in range(seeds):
                t0 = time.perf_counter()
                with torch.no_grad():
                    latent = model.sample(conds[p], steps=steps, sampler=sampler,
                                          generator=torch.Generator().manual_seed(1000 + s))
                times.append(time.perf_counter() - t0)
                with torch.no_grad():
                    colour = decoder(latent)[0, rgb].cpu()  # [3, R, R], as evaluate scores it
                scores += list(scorer.score(colour, parse_garments(p)).values())
                if sampler == "ddpm":
                    ref[p, s] = colour
                diffs.append(float((colour - ref[p, s]).abs().mean()))
        rows.append({"sampler": sampler, "steps": steps, "seconds": statistics.median(times),
                     "text_score": statistics.fmean(scores), "colour_diff_to_ddpm": statistics.fmean(diffs)})
    if seeds > 1:  # the scale to read the differences against: DDPM samples of one prompt from different noise
        other = [float((ref[p, s] - ref[p, (s + 1) % seeds]).abs().mean()) for p in prompts for s in range(seeds)]
        rows.append({"sampler": "ddpm, another seed", "steps": 100, "seconds": float("nan"), "text_score": float("nan"),
                     "colour_diff_to_ddpm": statistics.fmean(other)})
    return rows


def paper_flops() -> dict[str, float]:
    cfg = load_config(CONFIG_DIR / "paper.yaml")
    t, d = cfg.teacher, cfg.distill
    unet_cfg = stage2.unet_config(cfg, t.channels, d.latent_resolution, 768)
    with torch.device("meta"):
        unet = build_unet(unet_cfg)
        decoder = DistillationDecoder(t.channels, d.upsample_factor, d.hidden_channels, t.geometry_channels,
                                      t.geometry_hidden, t.texture_hidden).eval()
        x = torch.randn(2, t.channels, d.latent_resolution, d.latent_resolution)  # CFG: cond + null in one batch
        ctx = TextCondition(torch.randn(2, 77, 768), torch.ones(2, 77, dtype=torch.bool))
        ts = torch.tensor([500, 500])
        counter = FlopCounterMode(display=False)
        with counter:
            unet(x, ts, encoder_hidden_states=ctx.states)
        unet_step = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            decoder(x[:1])
        dec = counter.get_total_flops()
    steps = cfg.diffusion.sample_steps
    total = unet_step * steps + dec
    params = sum(p.numel() for p in unet.parameters())
    return {"unet_params": params, "unet_flops_per_step_cfg": unet_step, "steps": steps, "decoder_flops": dec,
            "total_flops": total,
            "rtx3090_fp32_s": total / (RTX3090_FP32 * UTILISATION),
            "rtx3090_fp16_s": total / (RTX3090_FP16_TENSOR * UTILISATION),
            "rtx3090_fp16_peak_s": total / RTX3090_FP16_TENSOR}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="tiny config (default: configs/tiny.yaml)")
    ap.add_argument("--run-dir", default=None, help="time a trained run's models instead of fresh ones")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on a 2-core machine shared with other work, 2 threads per op thrash)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ddim-steps", type=int, nargs="*", default=[10, 25, 50],
                    help="DDIM step counts compared with 100-step DDPM (none: skip the comparison)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per prompt in the sampler comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"threads={args.threads}"])
    tiny = bench_tiny(cfg, args.run_dir, args.repeats)
    if args.ddim_steps:
        rows = bench_samplers(cfg, args.run_dir, args.ddim_steps, args.seeds)
        print(f"TeRA samplers ({'trained run ' + args.run_dir if args.run_dir else 'random weights'}; "
              f"{len(QUALITY_PROMPTS)} held-out prompts x {args.seeds} seeds, same initial noise per seed)")
        print("| sampler | steps | seconds / generation (sampling) | text score | mean abs colour-map diff to DDPM |")
        print("|---|---|---|---|---|")
        for r in rows:
            sec, score = (("-" if v != v else f"{v:.3f}") for v in (r["seconds"], r["text_score"]))  # nan: not timed
            print(f"| {r['sampler']} | {r['steps']} | {sec} | {score} | {r['colour_diff_to_ddpm']:.4f} |")
        print()
    paper = paper_flops()
    print(f"TeRA tiny generation on CPU ({args.threads} threads; latent {cfg.teacher.channels}x"
          f"{cfg.distill.latent_resolution}^2, {cfg.body.num_points} Gaussians), median of {args.repeats}")
    print("| stage | seconds |\n|---|---|")
    for k, v in tiny.items():
        print(f"| {k} | {v:.3f} |")
    print(f"| target (total) | <= 10 | {'met' if tiny['total'] <= 10 else 'NOT met'} |")
    print("\nTeRA paper scale (configs/paper.yaml), one generation")
    print("| quantity | value |\n|---|---|")
    print(f"| UNet parameters | {paper['unet_params'] / 1e6:.1f} M |")
    print(f"| UNet FLOPs per step (cond + null batch) | {paper['unet_flops_per_step_cfg'] / 1e12:.3f} T |")
    print(f"| sampling steps | {paper['steps']} |")
    print(f"| decoder FLOPs (256 -> 1024) | {paper['decoder_flops'] / 1e12:.3f} T |")
    print(f"| total FLOPs | {paper['total_flops'] / 1e12:.1f} T |")
    print(f"| RTX 3090 FP32 at {UTILISATION:.0%} of 35.6 TFLOP/s | {paper['rtx3090_fp32_s']:.1f} s |")
    print(f"| RTX 3090 FP16 tensor cores at {UTILISATION:.0%} of 71 TFLOP/s | {paper['rtx3090_fp16_s']:.1f} s |")
    print(f"| RTX 3090 FP16 at peak | {paper['rtx3090_fp16_peak_s']:.1f} s |")
    print("| paper (one RTX 3090) | 12 s |")


if __name__ == "__main__":
    main()
