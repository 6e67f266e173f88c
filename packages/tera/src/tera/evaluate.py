"""TeRA's evaluation (``tera evaluate``): text faithfulness of generated avatars (a garment-colour scorer on the UV
colour map, and the CLIP score when a local CLIP folder is configured), the editing errors of try-on (inpainting vs
the replacement baseline, Sec. 3.5), and the latent-resolution ablation; the report as Markdown tables."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avatar_core.config import merge_overrides
from avatar_core.data.garment_score import ATTRIBUTES, GarmentScorer, garment_scorer, parse_garments
from avatar_core.data.stats import seeded_subset
from avatar_core.errors import ConfigError
from avatar_core.io import save_json
from avatar_core.results import check_result_dir, prepare_result_dir
from tera import edit as edit_mod
from tera.avatars import Models, body_centre, decode, load_models, predict_shape, turntable_cameras
from tera.config import TeraConfig
from tera.generate import edit, generate, sample_latents
from tera.runs import load_dataset, run_paths
from tera.scaling import format_scaling, plan_study, run_study
from tera.shape_text import shape_table
from tera.stage1 import distill
from tera.stage2 import train
from tera.teacher import teacher_consistency
from tera.uv_gaussians import ATTRIBUTE_SLICES, resize_mask

__all__ = ["CLIP_MEAN", "CLIP_NOT_COMPUTED", "CLIP_STD", "ClipScorer", "ablation_arms", "avatar_views", "clip_preprocess",
           "evaluate", "format_clip", "format_report", "format_teacher_consistency"]

def _mean_score(rows: list[dict[str, float]]) -> float:
    vals = [v for r in rows for v in r.values()]
    return float(np.mean(vals)) if vals else float("nan")


def _per_attribute(rows: list[dict[str, float]]) -> dict[str, list[float]]:
    """Per attribute of :data:`avatar_core.data.garment_score.ATTRIBUTES` that was asked: ``[mean score, times asked]``."""
    return {a: [float(np.mean(v)), len(v)] for a in ATTRIBUTES if (v := [r[a] for r in rows if a in r])}


#: CLIP's image normalisation (the constants every openai/clip-vit-* release was trained with).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_NOT_COMPUTED = "CLIP score: not computed (set evaluate.clip_path to a local CLIP folder)"


def clip_preprocess(images: Tensor, size: int) -> Tensor:  # [V, H, W, 3] in [0, 1] -> [V, 3, size, size]
    """CLIP's input: shorter side resized to ``size`` (bicubic), centre crop, mean/std normalisation.

    The sizes follow transformers' ``CLIPImageProcessor`` (the longer side becomes ``int(size * long / short)``),
    so a crop covers the same pixels as the processor's."""
    x = images.permute(0, 3, 1, 2).float().clamp(0, 1)
    h, w = x.shape[-2:]
    long = int(size * max(h, w) / min(h, w))
    nh, nw = (size, long) if h <= w else (long, size)
    # Antialiasing matters when the renders are larger than CLIP's input: plain bicubic would alias thin edges.
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)  # bicubic overshoots; CLIP saw [0, 1] images
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


def _features(out: Any) -> Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; older ones a tensor.
    return getattr(out, "pooler_output", out)


class ClipScorer:
    """CLIP score (Hessel et al. 2021, without the clip at 0): 100 x cosine(image embedding, text embedding)."""

    def __init__(self, path: str | Path | None, device: torch.device | str = "cpu"):
        from avatar_core.pretrained import load_clip

        parts = load_clip(path, device=device, config_key="evaluate.clip_path")
        self.model = parts.model.eval()
        self.tokenizer = parts.tokenizer
        self.device = torch.device(device)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = min(int(self.tokenizer.model_max_length),
                              int(self.model.config.text_config.max_position_embeddings))

    @torch.no_grad()
    def text_embedding(self, prompts: list[str]) -> Tensor:  # [P, D], unit norm
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        emb = _features(self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                                     attention_mask=tok.attention_mask.to(self.device)))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def image_embedding(self, images: Tensor) -> Tensor:  # [V, H, W, 3] in [0, 1] -> [V, D], unit norm
        pixels = clip_preprocess(images, self.image_size).to(self.device, self.model.dtype)
        emb = _features(self.model.get_image_features(pixel_values=pixels))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def score(self, images: Tensor, prompt: str) -> float:
        """Mean over the views ``[V, H, W, 3]`` of 100 x cosine(view, prompt)."""
        return float(100 * (self.image_embedding(images) @ self.text_embedding([prompt])[0]).mean())


def avatar_views(cfg: TeraConfig, models: Models, maps: Tensor, n: int, size: int) -> Tensor:
    """``n`` turntable views ``[n, size, size, 3]`` of the avatar decoded from attribute maps ``[1, 13, R, R]``."""
    with torch.no_grad():
        g = models.avatar(maps.to(models.device))
        cams = turntable_cameras(cfg, n, body_centre(g.means[0]), size)
        rgb, _ = models.avatar.render(g, cams, tuple(cfg.data.background))
    return rgb[0].cpu()


def format_clip(clip: dict[str, Any] | None) -> list[str]:
    """The CLIP-score section of the evaluation report (Markdown lines)."""
    if not clip:
        return ["## CLIP score", "", CLIP_NOT_COMPUTED]
    lines = [f"## CLIP score (100 x cosine of CLIP image and text embeddings, mean over {clip['views']} views; "
             f"{clip['path']})", "", "| rows | CLIP score |", "|---|---|",
             f"| held-out prompts | {clip['held_out_prompts']:.2f} |",
             f"| held-out avatars scored against another held-out prompt | {clip['against_other_prompt']:.2f} |",
             "", "| held-out prompt | CLIP score |", "|---|---|"]
    lines += [f"| {p} | {v:.2f} |" for p, v in clip["per_prompt"].items()]
    return lines


def evaluate(cfg: TeraConfig, out_dir: str | Path | None = None, ablation: bool = True,
             progress: bool = True, overwrite: bool = False, scaling: bool = True) -> dict[str, Any]:
    """Text faithfulness (held-out prompts vs random captions), the data-scaling study (:mod:`tera.scaling`, when
    ``scaling`` and ``evaluate.data_sizes``), editing errors, latent-resolution ablation.

    ``out`` is a result folder (``avatar_core.results``): an earlier evaluation there is replaced only with
    ``overwrite``."""
    start = time.perf_counter()
    e = cfg.evaluate
    out = Path(out_dir) if out_dir is not None else run_paths(cfg).run / "evaluation"
    edit_mod.parse_regions(e.edit_region)  # a bad region fails before anything is generated
    arms = ablation_arms(cfg) if ablation else []  # so does an ablation resolution the decoder cannot reach
    scaling = bool(scaling and e.data_sizes)
    if scaling:
        plan_study(cfg)  # and a study the run or the dataset cannot hold
    check_result_dir(out, EVALUATION_KIND, overwrite, recognise=_is_evaluation)
    models = load_models(cfg)
    ds = load_dataset(cfg)
    parts = models.avatar.uv_mapper.part_masks()
    scorer = garment_scorer(cfg.body.name, cfg.body.model_dir, cfg.data.uv_res)  # regions of the dataset's painter
    sampling = {"sampler": e.sampler, "steps": None, "guidance": cfg.generate.guidance or None}
    # Loaded before any generation so a missing or incomplete CLIP folder fails at once, with nothing spent.
    clip = ClipScorer(e.clip_path, models.device) if e.clip_path else None
    prepare_result_dir(out, EVALUATION_KIND, overwrite, recognise=_is_evaluation)
    report: dict[str, Any] = {}

    # The scorer on the dataset's own UV textures: how often it reads the truth (its ceiling).
    gt_rows = []
    for i in range(len(ds)):
        tex = ds.texture(i).permute(2, 0, 1)
        gt_rows.append(scorer.score(tex, parse_garments(ds.captions(i)[0])))
    train_caps = [c for i in range(len(ds)) for c in ds.captions(i)]

    def generated_maps(prompts: list[str], seed: int) -> Tensor:  # [B, 13, R, R]
        lat = sample_latents(models, prompts, seed, **sampling)
        with torch.no_grad():
            return models.decoder(lat.to(models.device)).cpu()

    rng = np.random.default_rng(cfg.seed)
    held_rows, held_vs_random, per_prompt = [], [], []
    clip_emb: list[Tensor] = []  # per held-out prompt: each sample's view-averaged unit image embeddings [S, D]
    for k, prompt in enumerate(e.prompts):
        asked = parse_garments(prompt)
        full = generated_maps([prompt] * e.samples_per_prompt, cfg.seed + k)
        maps = full[:, ATTRIBUTE_SLICES["rgb"]]
        if clip is not None:
            views = [avatar_views(cfg, models, full[i:i + 1], e.clip_views, e.clip_render_size)
                     for i in range(len(full))]
            clip_emb.append(torch.stack([clip.image_embedding(v).mean(0) for v in views]))  # [S, D]
        rows = [scorer.score(m, asked) for m in maps]
        held_rows += rows
        other = train_caps[int(rng.integers(len(train_caps)))]
        held_vs_random += [scorer.score(m, parse_garments(other)) for m in maps]
        per_prompt.append({"prompt": prompt, "asked": asked, "score": _mean_score(rows),
                           "combination_in_training_set": any(all(parse_garments(ds.captions(i)[0]).get(a) == v
                                                                   for a, v in asked.items()) for i in range(len(ds)))})
    rand_caps = [train_caps[int(j)] for j in rng.choice(len(train_caps), size=e.random_captions, replace=False)]
    rand_maps = generated_maps(rand_caps, cfg.seed + 1000)[:, ATTRIBUTE_SLICES["rgb"]]
    rand_rows = [scorer.score(m, parse_garments(c)) for m, c in zip(rand_maps, rand_caps)]
    shuffled = rand_caps[1:] + rand_caps[:1]
    rand_vs_other = [scorer.score(m, parse_garments(c)) for m, c in zip(rand_maps, shuffled)]
    report["text_faithfulness"] = {
        "held_out_prompts": _mean_score(held_rows),
        "held_out_avatars_scored_against_random_caption": _mean_score(held_vs_random),
        "random_training_captions": _mean_score(rand_rows),
        "random_caption_avatars_scored_against_another_caption": _mean_score(rand_vs_other),
        "scorer_on_ground_truth_textures": _mean_score(gt_rows),
        "per_attribute": {name: _per_attribute(rows) for name, rows in (
            ("held_out_prompts", held_rows), ("held_out_avatars_scored_against_random_caption", held_vs_random),
            ("random_training_captions", rand_rows), ("scorer_on_ground_truth_textures", gt_rows))},
        "per_prompt": per_prompt,
        "samples_per_prompt": e.samples_per_prompt,
        "sampler": e.sampler,
    }

    # The teacher's features through its final decoder, first vs last fitted avatars (tera.teacher): the cap on
    # every later stage. IDOL's features come without their decoder, so they are not measured.
    report["teacher_consistency"] = teacher_consistency(cfg) if cfg.teacher.source == "fit" else None

    # Text faithfulness vs training data: stage 2 on nested subsets, held-out captions (tera.scaling).
    report["scaling"] = run_study(cfg, models.decoder, scorer, sampling, progress) if scaling else None

    # Body shape from text: the words the predicted shapes and the generated avatars' bodies read as, against the
    # asked ones (tera.shape_text). Each avatar is made as `tera generate` makes it: shape from the prompt, the
    # sampled latent decoded on that body; its stature is read from the height of its decoded Gaussians.
    report["shape"] = None
    if models.shape_head is not None and models.diffusion is not None:
        mean_shape = torch.stack([ds.body_params(i)["shape"].float()
                                  for i in seeded_subset(len(ds), cfg.data.stats_items or None, cfg.seed)]).mean(0)
        seeds = {p: cfg.seed + 3000 + k for k, p in enumerate(e.shape_prompts)}

        def generated_body(prompt: str) -> tuple[Tensor, Tensor]:
            shape = predict_shape(models, prompt)
            _, g = decode(models, sample_latents(models, [prompt], seeds[prompt], **sampling)[0], shape)
            return shape, g.means[0].cpu()

        report["shape"] = shape_table(models.shape_head, models.diffusion.text, models.avatar.body,
                                      list(e.shape_prompts), mean_shape, generate=generated_body)

    # CLIP score: mean over views of 100 x cosine, i.e. 100 x (mean of the unit view embeddings) . text.
    report["clip_score"] = None
    if clip is not None:
        text = clip.text_embedding(list(e.prompts))  # [P, D]
        sims = torch.stack([100 * (emb @ text.T) for emb in clip_emb])  # [P, S, P]: prompt k's samples vs all
        own = torch.stack([sims[k, :, k] for k in range(len(e.prompts))])  # [P, S]
        others = [sims[k, :, j] for k in range(len(e.prompts)) for j in range(len(e.prompts)) if j != k]
        report["clip_score"] = {
            "path": str(e.clip_path), "views": e.clip_views, "render_size": e.clip_render_size,
            "held_out_prompts": float(own.mean()),
            "against_other_prompt": float(torch.cat(others).mean()) if others else float("nan"),
            "per_prompt": {p: float(own[k].mean()) for k, p in enumerate(e.prompts)},
        }

    # Editing: outside the region nothing moves; inside follows the new prompt; inpaint vs replace seams.
    src = generate(cfg, e.prompts[0], out / "edit_source", seed=cfg.seed, models=models, video=False)
    src_maps = src["maps"]
    R = src_maps.shape[-1]
    region_parts = edit_mod.region_parts(e.edit_region)
    uv_region = torch.zeros(R, R, dtype=torch.bool)
    for p in region_parts:
        uv_region |= resize_mask(parts[p], R).cpu()
    valid = torch.zeros(R, R, dtype=torch.bool)
    for m in parts.values():
        valid |= resize_mask(m, R).cpu()
    edit_rows = {}
    for method in ("inpaint", "replace"):
        r_ = edit(cfg, src["dir"], e.edit_region, e.edit_prompt, out / f"edit_{method}", seed=cfg.seed + 7,
                  method=method, models=models, video=False)
        cells = r_["region_cells"]
        lat_out = (r_["latent"] - r_["source_latent"])[:, ~cells].abs().max().item() if (~cells).any() else 0.0
        diff = (r_["maps"] - src_maps)[0, ATTRIBUTE_SLICES["rgb"]].abs().cpu()  # [3, R, R]
        outside = valid & ~uv_region
        asked = parse_garments(e.edit_prompt)
        inside_score = scorer.score(r_["maps"][0, ATTRIBUTE_SLICES["rgb"]].cpu(),
                                        {k: v for k, v in asked.items() if k.startswith("top")})
        cells_map = torch.nn.functional.interpolate(cells[None, None].float(), size=(R, R), mode="nearest")[0, 0] > 0.5
        seam_map = edit_mod.seam_gradient(r_["maps"][0, ATTRIBUTE_SLICES["rgb"]].cpu(), cells_map, valid)
        edit_rows[method] = {
            "latent_max_abs_change_outside": lat_out,
            "colour_map_mean_abs_change_outside": float(diff[:, outside].mean()),
            "colour_map_mean_abs_change_inside": float(diff[:, uv_region & valid].mean()),
            "inside_follows_prompt": _mean_score([inside_score]),
            "seam_ratio_latent": r_["seam"]["ratio"],
            "seam_ratio_colour_map": seam_map["ratio"],
        }
    report["editing"] = {"region": e.edit_region, "prompt": e.edit_prompt, "source_prompt": e.prompts[0],
                         **edit_rows}

    # The latent-resolution ablation: at each latent resolution, under the same budgets, a decoder to the main
    # run's UV resolution (reconstruction PSNR) and a diffusion model on its latents (held-out text score).
    if ablation:
        report["latent_resolution_ablation"] = {
            str(r): _ablation_arm(cfg, r, factor, out / f"ablation_r{r}", scorer, sampling, progress)
            for r, factor in arms}
    report["seconds"] = time.perf_counter() - start
    save_json(out / "evaluation.json", report)
    (out / "evaluation.md").write_text(format_report(report), encoding="utf-8")
    return report


EVALUATION_KIND = "tera.evaluation"


def ablation_arms(cfg: TeraConfig) -> list[tuple[int, int]]:
    """``(latent resolution, decoder upsample factor)`` per ablation arm: every arm decodes to the main run's UV
    resolution (``distill.latent_resolution x distill.upsample_factor``, paper 256 x 4 = 1024), so the factor is
    that resolution over the arm's, which the decoder needs to be a power of two; the teacher features must be a
    multiple of the arm's resolution to be pooled to it."""
    d, e = cfg.distill, cfg.evaluate
    uv = int(d.latent_resolution) * int(d.upsample_factor)
    arms = []
    for r in e.ablation_resolutions:
        r = int(r)
        factor = uv // r if r > 0 and uv % r == 0 else 0
        if factor < 1 or factor & (factor - 1):
            raise ConfigError(f"evaluate.ablation_resolutions: latent {r} cannot be decoded to the main run's UV "
                              f"resolution {uv} (the decoder upsamples by a power of two)",
                              f"use resolutions {uv} / 2^k, e.g. {uv // (2 * d.upsample_factor)} and {d.latent_resolution}")
        if cfg.teacher.resolution % r:
            raise ConfigError(f"evaluate.ablation_resolutions: the teacher features ({cfg.teacher.resolution}) are not "
                              f"a multiple of latent {r}", "use resolutions that divide teacher.resolution")
        arms.append((r, factor))
    return arms


def _ablation_arm(cfg: TeraConfig, r: int, factor: int, folder: Path, scorer: GarmentScorer,
                  sampling: dict[str, Any], progress: bool) -> dict[str, Any]:
    """One arm: stage 1 at latent ``r`` (``evaluate.ablation_steps``), then stage 2 on its latents
    (``evaluate.ablation_diffusion_steps``) and the held-out text score of its samples."""
    e = cfg.evaluate
    sub = _with(cfg, [f"distill.upsample_factor={factor}", f"distill.latent_resolution={r}",
                      f"distill.train.output_dir={folder}", f"diffusion.train.output_dir={folder / 'diffusion'}",
                      f"diffusion.train.max_steps={e.ablation_diffusion_steps}"])
    res = distill(sub, progress=progress, latent_resolution=r, steps=e.ablation_steps, out_dir=folder, resume=None)
    row = {"psnr_heldout": res.get("psnr_heldout"), "psnr_train": res.get("psnr_train"), "upsample_factor": factor,
           "uv_resolution": r * factor, "steps": res["steps"], "seconds": res["seconds"]}
    if e.ablation_diffusion_steps > 0:
        t0 = time.perf_counter()
        trained = train(sub, progress=progress, resume=None)
        models = load_models(sub)
        rows = []
        for k, prompt in enumerate(e.prompts):
            lat = sample_latents(models, [prompt] * e.samples_per_prompt, cfg.seed + k, **sampling)
            with torch.no_grad():
                maps = models.decoder(lat.to(models.device)).cpu()[:, ATTRIBUTE_SLICES["rgb"]]
            rows += [scorer.score(m, parse_garments(prompt)) for m in maps]
        row.update({"held_out_text_score": _mean_score(rows), "diffusion_steps": trained["steps"],
                    "seconds_generation_arm": time.perf_counter() - t0})
    return row


def _is_evaluation(folder: Path) -> bool:
    """An evaluation folder written before result markers existed."""
    return (folder / "evaluation.json").is_file()


def _with(cfg: TeraConfig, overrides: list[str]) -> TeraConfig:
    return merge_overrides(copy.deepcopy(cfg), overrides)


def format_teacher_consistency(c: dict[str, Any] | None) -> list[str]:
    """The teacher-consistency section (:func:`tera.teacher.teacher_consistency`) as Markdown lines."""
    head = "## Teacher consistency (PSNR in dB of every avatar's fitted features through the final teacher decoder)"
    if not c:
        return [head, "", "not measured (teacher.source is not 'fit': IDOL's features come without their decoder)"]
    lines = [head, "", f"{c['avatars']} avatars, mode {c.get('mode', '-')}; first / last: the {c['quantile']} "
             "avatars fitted first and last (a positive gap: the decoder drifted away from the early ones)", "",
             "| views | mean | std | first | last | gap |", "|---|---|---|---|---|---|"]
    for key, name in (("psnr", "fitted"), ("psnr_heldout", "held-out")):
        if f"{key}_mean" in c:
            lines.append(f"| {name} | " + " | ".join(f"{c[f'{key}_{s}']:.2f}" for s in ("mean", "std", "first", "last",
                                                                                       "gap")) + " |")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The evaluation as Markdown tables."""
    lines = ["## Text faithfulness (fraction of asked garment attributes found in the UV colour map, avatar_core.data.garment_score)", "",
             "| rows | score |", "|---|---|"]
    tf = report["text_faithfulness"]
    for k in ("held_out_prompts", "held_out_avatars_scored_against_random_caption", "random_training_captions",
              "random_caption_avatars_scored_against_another_caption", "scorer_on_ground_truth_textures"):
        lines.append(f"| {k.replace('_', ' ')} | {tf[k]:.3f} |")
    per = tf.get("per_attribute")
    if per:
        cols = list(per)
        lines += ["", "Per attribute (score, times asked), by body region:", "",
                  "| attribute | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for a in ATTRIBUTES:
            cells = [f"{per[c][a][0]:.2f} ({per[c][a][1]})" if a in per[c] else "-" for c in cols]
            lines.append(f"| {a.replace('_', ' ')} | " + " | ".join(cells) + " |")
    lines += ["", "| held-out prompt | asked | score | combination in training set |", "|---|---|---|---|"]
    for p in tf["per_prompt"]:
        lines.append(f"| {p['prompt']} | {p['asked']} | {p['score']:.2f} | {p['combination_in_training_set']} |")
    lines += [""] + format_scaling(report.get("scaling"))
    lines += [""] + format_teacher_consistency(report.get("teacher_consistency"))
    lines += [""] + format_clip(report.get("clip_score"))
    shape = report.get("shape")
    if shape:
        lines += ["", "## Body shape from text (words the body reads as; '' asks for the middle)", "",
                  "| words | generated avatars (decoded Gaussians) | shape head (its body mesh) | "
                  "training mean shape |", "|---|---|---|---|"]
        lines += [f"| {k} | {shape['avatar'][k]:.2f} | {shape['head'][k]:.2f} | {shape['mean_shape'][k]:.2f} |"
                  for k in shape["head"]]
        lines += ["", "| held-out prompt | asked | generated avatar (Gaussian height m) | shape head (mesh height m) |",
                  "|---|---|---|---|"]
        for r in shape["per_prompt"]:
            a, g = r["avatar"], r["generated"]
            lines.append(f"| {r['prompt']} | {'/'.join(r['asked'].values())} | "
                         f"{a['stature']}/{a['build']}/{a['age']} ({a['height_m']}) | "
                         f"{g['stature']}/{g['build']}/{g['age']} ({g['height_m']}) |")
    ed = report["editing"]
    lines += ["", f"## Editing: region `{ed['region']}`, prompt \"{ed['prompt']}\"", "",
              "| method | latent max abs change outside | colour map mean abs change outside | inside | "
              "inside follows prompt | seam ratio (latent) | seam ratio (colour map) |", "|---|---|---|---|---|---|---|"]
    for m in ("inpaint", "replace"):
        r = ed[m]
        lines.append(f"| {m} | {r['latent_max_abs_change_outside']:.2e} | {r['colour_map_mean_abs_change_outside']:.4f} |"
                     f" {r['colour_map_mean_abs_change_inside']:.4f} | {r['inside_follows_prompt']:.2f} |"
                     f" {r['seam_ratio_latent']:.3f} | {r['seam_ratio_colour_map']:.3f} |")
    if "latent_resolution_ablation" in report:
        lines += ["", "## Latent-resolution ablation (decoder reconstruction PSNR in dB; held-out text score of a "
                  "diffusion model trained on the arm's latents)", "",
                  "| latent resolution | upsample -> UV | decoder steps | PSNR held-out views | PSNR training views |"
                  " diffusion steps | held-out text score |", "|---|---|---|---|---|---|---|"]
        for r, row in report["latent_resolution_ablation"].items():
            score = row.get("held_out_text_score")
            lines.append(f"| {r} | x{row['upsample_factor']} -> {row.get('uv_resolution', '')} | {row['steps']} |"
                         f" {row['psnr_heldout']:.2f} | {row['psnr_train']:.2f} | {row.get('diffusion_steps', '-')} |"
                         f" {'-' if score is None else f'{score:.3f}'} |")
    return "\n".join(lines) + "\n"

