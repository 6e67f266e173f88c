"""TeRA's data-scaling study of text faithfulness (``tera evaluate`` with ``evaluate.data_sizes``).

Does text faithfulness generalise, and does it improve with data? One dataset; nested training subsets of the sizes
in ``evaluate.data_sizes`` (``data.max_avatars`` takes the first N avatars, so each subset holds the smaller ones);
per size a stage-2 diffusion model trained on that subset, with its step budget scaled to the data
(``evaluate.base_steps x N / evaluate.base_avatars``, so every size sees its avatars as often); and one scorer
(:mod:`avatar_core.data.garment_score` on the decoded UV colour map).

Shared across sizes: the run's teacher features and its stage-1 decoder, both fit on the run's first
``data.max_avatars`` avatars, which must hold the largest subset (normally equal to it). Only stage 2 varies, so the
table isolates what the diffusion model learns from more captioned avatars; the smaller sizes decode through a
decoder that saw more avatars than they did.

Held-out prompts are the long captions of the ``evaluate.heldout_avatars`` dataset avatars after the run's
``data.max_avatars``: neither the teacher, the decoder nor any training subset saw them, so they are new
combinations of the dataset's attributes, written the way the training captions are. Rows per size:

* held-out prompts: avatars generated from the held-out captions, scored against them;
* chance: the same avatars scored against a different held-out prompt's attributes (what matching by luck gives);
* training captions: avatars generated from as many training captions (a seeded subset), scored against them;
* diffusion steps and training wall time.

Each size trains in its own folder, ``<run_dir>/scaling/n<N>/`` (the latents of its subset under ``distill/``, the
model under ``diffusion/``); an interrupted size resumes (the kernel Trainer), and a finished size whose settings
match its ``size.json`` is reused without training.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avatar_core.config import merge_overrides
from avatar_core.data.garment_score import ATTRIBUTES, GarmentScorer, parse_garments
from avatar_core.data.stats import seeded_subset
from avatar_core.errors import ConfigError
from avatar_core.io import load_json, save_json
from tera.config import TeraConfig
from tera.distill import DistillationDecoder
from tera.latent_diffusion import StructuredLatentDiffusion
from tera.runs import load_dataset, run_paths, stage_signature, train_device
from tera.stage2 import load_model, train
from tera.streaming import latent_set, teacher_latent_cache, write_latent_index
from tera.uv_gaussians import ATTRIBUTE_SLICES

__all__ = ["SIZE_RECORD", "StudyPlan", "format_scaling", "generated_colour_maps", "loo_ridge_r2", "other_prompt",
           "plan_study", "run_study", "scaled_steps", "score_prompts", "size_config", "size_folder",
           "text_predictability", "train_size"]

#: Per size, the settings it trained under and its timings (a finished size with matching settings is reused).
SIZE_RECORD = "size.json"
#: Prompts sampled at once.
SAMPLE_BATCH = 16


def scaled_steps(cfg: TeraConfig, n: int) -> int:
    """Stage-2 steps for ``n`` training avatars: ``evaluate.base_steps x n / evaluate.base_avatars`` (at least 1)."""
    e = cfg.evaluate
    return max(1, int(round(e.base_steps * n / e.base_avatars)))


class StudyPlan:
    """Sizes, their step budgets, the held-out avatars and each size's training avatars (dataset ids)."""

    def __init__(self, sizes: list[int], steps: dict[int, int], training: dict[int, list[str]], heldout: list[str]):
        self.sizes, self.steps, self.training, self.heldout = sizes, steps, training, heldout


def plan_study(cfg: TeraConfig) -> StudyPlan:
    """The study's plan from ``cfg.evaluate`` and the dataset, checked before anything is trained."""
    e = cfg.evaluate
    sizes = [int(n) for n in e.data_sizes]
    if not sizes or any(n < 1 for n in sizes) or sizes != sorted(set(sizes)):
        raise ConfigError(f"evaluate.data_sizes={list(e.data_sizes)}: needs increasing positive sizes",
                          "e.g. evaluate.data_sizes=[16,64,256] (or [] to skip the scaling study)")
    if e.base_steps < 1 or e.base_avatars < 1 or e.heldout_avatars < 2:
        raise ConfigError(f"evaluate.base_steps={e.base_steps}, base_avatars={e.base_avatars}, "
                          f"heldout_avatars={e.heldout_avatars}: need base_steps, base_avatars >= 1 and at least "
                          "2 held-out avatars (the chance row scores against another one's prompt)",
                          "e.g. evaluate.base_steps=400 evaluate.base_avatars=16 evaluate.heldout_avatars=32")
    largest, fit = sizes[-1], int(cfg.data.max_avatars)
    if fit < largest:
        raise ConfigError(f"the scaling study shares the run's teacher and stage-1 decoder, fit on its first "
                          f"data.max_avatars avatars, which must hold the largest subset ({largest}); the run uses "
                          f"data.max_avatars={fit} (0: all, leaving none to hold out)",
                          f"train the run with data.max_avatars={largest}, or end evaluate.data_sizes at {fit}")
    everything = load_dataset(_with(cfg, ["data.max_avatars=0"])).ids
    need = fit + e.heldout_avatars
    if len(everything) < need:
        d = cfg.data
        raise ConfigError(f"the scaling study needs {need} avatars ({fit} for the run + evaluate.heldout_avatars="
                          f"{e.heldout_avatars} held out); {d.root} has {len(everything)}",
                          f"write a larger dataset (`avatar-core make-dataset --out DIR --num {need} --views {d.views} "
                          f"--res {d.res} --uv-res {d.uv_res}`, then data.root=DIR), or lower the sizes")
    return StudyPlan(sizes, {n: scaled_steps(cfg, n) for n in sizes}, {n: list(everything[:n]) for n in sizes},
                     list(everything[fit:need]))


def size_folder(cfg: TeraConfig, n: int) -> Path:
    return run_paths(cfg).run / "scaling" / f"n{n}"


def size_config(cfg: TeraConfig, n: int, steps: int) -> TeraConfig:
    """The run's config for stage 2 on the first ``n`` avatars with ``steps`` steps, in the size's own folder
    (the teacher features stay the run's)."""
    folder = size_folder(cfg, n)
    return _with(cfg, [f"data.max_avatars={n}", f"distill.train.output_dir={folder / 'distill'}",
                       f"diffusion.train.output_dir={folder / 'diffusion'}", f"diffusion.train.max_steps={steps}"])


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def train_size(cfg: TeraConfig, n: int, steps: int, progress: bool = True) -> dict[str, Any]:
    """Stage 2 on the first ``n`` avatars (resumed when interrupted; reused when finished under these settings)."""
    sub = size_config(cfg, n, steps)
    paths = run_paths(sub)
    record_path = paths.diffusion.parent / SIZE_RECORD
    signature = _jsonable(stage_signature(sub, "diffusion"))
    if record_path.is_file() and (paths.diffusion / "model" / "config.json").is_file():
        record = load_json(record_path)
        if record.get("signature") == signature and record.get("steps") == steps:
            return {**record, "reused": True}
    start = time.perf_counter()
    ds = load_dataset(sub)
    r = int(cfg.distill.latent_resolution)
    cache, ids = teacher_latent_cache(sub, ds, r, progress)  # the subset's latents (the run's teacher features)
    write_latent_index(sub, cache, ids, r, paths.distill)
    result = train(sub, progress=progress, resume="auto")
    record = {"avatars": n, "steps": int(result["steps"]), "final_loss": result.get("final_loss"),
              "seconds": time.perf_counter() - start, "signature": signature}
    save_json(record_path, record)
    return {**record, "reused": False}


def other_prompt(prompts: Sequence[str]) -> list[int]:
    """For each prompt, the index of the next prompt (cyclically) with a different text: the chance row's."""
    out = []
    for k, p in enumerate(prompts):
        j = next((j % len(prompts) for j in range(k + 1, k + len(prompts)) if prompts[j % len(prompts)] != p), None)
        if j is None:
            raise ConfigError("every held-out prompt is the same text; the chance row needs two different ones",
                              "hold out more avatars (evaluate.heldout_avatars)")
        out.append(j)
    return out


@torch.no_grad()
def generated_colour_maps(model: StructuredLatentDiffusion, decoder: DistillationDecoder, prompts: Sequence[str],
                          seed: int, sampling: dict[str, Any]) -> Tensor:  # [P, 3, R, R] on the CPU
    """The decoded UV colour maps of one sample per prompt (batches of :data:`SAMPLE_BATCH`, seeded)."""
    out = []
    for s in range(0, len(prompts), SAMPLE_BATCH):
        gen = torch.Generator().manual_seed(int(seed) + s)
        lat = model.sample(list(prompts[s:s + SAMPLE_BATCH]), generator=gen, **sampling)
        out.append(decoder(lat.to(model.device)).cpu()[:, ATTRIBUTE_SLICES["rgb"]])
    return torch.cat(out)


def score_prompts(maps: Tensor, prompts: Sequence[str], scorer: GarmentScorer) -> list[dict[str, float]]:
    """Per map, the scorer's 1/0 per attribute the matching prompt asks for."""
    return [scorer.score(m, parse_garments(p)) for m, p in zip(maps, prompts)]


def loo_ridge_r2(x: Tensor, y: Tensor, lam: float = 10.0) -> float:
    """Leave-one-out R^2 of a ridge regression ``x [N, D] -> y [N, M]`` (with an intercept): the share of ``y``'s
    variance across the N items that the other N - 1 predict from ``x`` (<= 0: none). Closed form through the hat
    matrix, ``e_i / (1 - H_ii)``."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    y = y.double().flatten(1)
    hat = x @ torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=torch.float64), x.T)  # [N, N]
    loo = (y - hat @ y) / (1 - hat.diagonal()).clamp_min(1e-9)[:, None]
    n = len(y)
    others_mean = (y.sum(0, keepdim=True) - y) / (n - 1)  # each item's baseline: the mean of the others
    return float(1 - (loo ** 2).sum() / ((y - others_mean) ** 2).sum())


def text_predictability(cfg: TeraConfig, ids: Sequence[str], captions: Sequence[str], latents: Sequence[Tensor],
                        textures: Sequence[Tensor]) -> dict[str, float]:
    """How much of the training latents (and, for scale, of the real UV textures pooled to the latent's size) the
    caption predicts: :func:`loo_ridge_r2` from the caption's pooled text states. Stage 2 can only learn text ->
    latent structure that exists; latents the caption does not predict leave it to memorise its avatars."""
    from tera.stage2 import text_conditioner

    text = text_conditioner(cfg, torch.device("cpu"))
    with torch.no_grad():
        c = text(list(captions))
    w = c.mask.float().unsqueeze(-1)
    pooled = ((c.states.float() * w).sum(1) / w.sum(1).clamp_min(1.0)).cpu()  # [N, D]
    r = latents[0].shape[-1]
    tex = torch.stack([torch.nn.functional.adaptive_avg_pool2d(t[None].float(), r)[0] for t in textures])
    return {"avatars": len(ids), "caption_to_latent_r2": loo_ridge_r2(pooled, torch.stack(latents)),
            "caption_to_real_texture_r2": loo_ridge_r2(pooled, tex)}


def _mean(rows: list[dict[str, float]]) -> float:
    vals = [v for r in rows for v in r.values()]
    return float(np.mean(vals)) if vals else float("nan")


def _per_attribute(rows: list[dict[str, float]]) -> dict[str, list[float]]:
    return {a: [float(np.mean(v)), len(v)] for a in ATTRIBUTES if (v := [r[a] for r in rows if a in r])}


def run_study(cfg: TeraConfig, decoder: DistillationDecoder, scorer: GarmentScorer, sampling: dict[str, Any],
              progress: bool = True) -> dict[str, Any]:
    """Train every size (or reuse it) and score it; the report's ``scaling`` section (see the module docstring)."""
    plan = plan_study(cfg)
    ds_all = load_dataset(_with(cfg, ["data.max_avatars=0"]))
    index = {a: i for i, a in enumerate(ds_all.ids)}
    caption = lambda a: ds_all.captions(index[a])[0]  # noqa: E731 - the long description
    heldout = [caption(a) for a in plan.heldout]
    others = other_prompt(heldout)
    heldout_gt = [scorer.score(ds_all.texture(index[a]).permute(2, 0, 1), parse_garments(p))
                  for a, p in zip(plan.heldout, heldout)]
    device = train_device(cfg)
    decoder = decoder.to(device).eval()
    # What stage 2 could reach at best: training avatars decoded from their own latents by the shared decoder.
    latents = latent_set(cfg)
    ceiling_ids = [plan.training[plan.sizes[-1]][i] for i in seeded_subset(plan.sizes[-1], len(heldout), cfg.seed)]
    with torch.no_grad():
        ceiling = [scorer.score(decoder(latents.get(a)[None].to(device)).cpu()[0, ATTRIBUTE_SLICES["rgb"]],
                                parse_garments(caption(a))) for a in ceiling_ids]
    largest = plan.training[plan.sizes[-1]]
    predictability = text_predictability(cfg, largest, [caption(a) for a in largest], [latents.get(a) for a in largest],
                                         [ds_all.texture(index[a]).permute(2, 0, 1) for a in largest])
    from tqdm.auto import tqdm

    rows, per_attribute = [], {}
    for n in tqdm(plan.sizes, desc="scaling sizes", unit="size", disable=not progress):
        trained = train_size(cfg, n, plan.steps[n], progress)
        model = load_model(size_config(cfg, n, plan.steps[n]), device)
        maps = generated_colour_maps(model, decoder, heldout, cfg.seed + 5000, sampling)
        held = score_prompts(maps, heldout, scorer)
        chance = score_prompts(maps, [heldout[j] for j in others], scorer)
        chosen = [plan.training[n][i] for i in seeded_subset(n, min(n, len(heldout)), cfg.seed)]
        train_caps = [caption(a) for a in chosen]
        train_rows = score_prompts(generated_colour_maps(model, decoder, train_caps, cfg.seed + 6000, sampling),
                                   train_caps, scorer)
        rows.append({"avatars": n, "held_out_prompts": _mean(held), "chance_other_held_out_prompt": _mean(chance),
                     "training_captions": _mean(train_rows), "diffusion_steps": trained["steps"],
                     "training_seconds": trained["seconds"], "reused": trained["reused"],
                     "final_loss": trained.get("final_loss")})
        per_attribute = {"held_out_prompts": _per_attribute(held), "chance_other_held_out_prompt":
                         _per_attribute(chance), "training_captions": _per_attribute(train_rows)}
    return {"sizes": rows, "per_attribute_largest": per_attribute, "largest": plan.sizes[-1],
            "shared_fit_avatars": int(cfg.data.max_avatars),
            "heldout_avatars": plan.heldout, "scorer_on_held_out_real_textures": _mean(heldout_gt),
            "training_avatars_from_their_latents": _mean(ceiling), "text_predictability": predictability,
            "base_steps": cfg.evaluate.base_steps, "base_avatars": cfg.evaluate.base_avatars,
            "sampler": sampling.get("sampler"), "guidance": sampling.get("guidance")}


def format_scaling(study: dict[str, Any] | None) -> list[str]:
    """The scaling section of the evaluation report (Markdown lines)."""
    if not study:
        return ["## Text faithfulness vs training data", "", "not run (evaluate.data_sizes is empty)"]
    rows = study["sizes"]
    lines = [f"## Text faithfulness vs training data (fraction of asked garment attributes found in the UV colour map; "
             f"{len(study['heldout_avatars'])} held-out avatars' captions; teacher and stage-1 decoder shared, fit on "
             f"the first {study.get('shared_fit_avatars', study['largest'])} avatars; stage-2 steps = "
             f"{study['base_steps']} x N / "
             f"{study['base_avatars']})", "",
             "| training avatars | " + " | ".join(str(r["avatars"]) for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for key, name, fmt in (("held_out_prompts", "held-out prompts", "{:.3f}"),
                           ("chance_other_held_out_prompt", "chance: same avatars vs another held-out prompt", "{:.3f}"),
                           ("training_captions", "training captions", "{:.3f}"),
                           ("diffusion_steps", "diffusion steps", "{}"),
                           ("training_seconds", "training wall time (s)", "{:.0f}")):
        lines.append(f"| {name} | " + " | ".join(fmt.format(r[key]) for r in rows) + " |")
    lines += ["", f"Ceilings: the scorer on the held-out avatars' real textures "
              f"{study['scorer_on_held_out_real_textures']:.3f}; training avatars decoded from their own latents by "
              f"the shared decoder (the best stage 2 can reach) {study['training_avatars_from_their_latents']:.3f}. "
              f"Reused finished sizes: {[r['avatars'] for r in rows if r['reused']] or 'none'}."]
    tp = study.get("text_predictability")
    if tp:
        lines += ["", f"What the caption predicts (leave-one-out R^2 of a ridge regression from the pooled caption states, "
                  f"{tp['avatars']} training avatars): their latents {tp['caption_to_latent_r2']:.3f}, their real UV "
                  f"textures at the latent's size {tp['caption_to_real_texture_r2']:.3f}. Stage 2 can learn only "
                  "the text -> latent structure the teacher's features hold; without it, it memorises its avatars."]
    per = study.get("per_attribute_largest")
    if per:
        cols = list(per)
        lines += ["", f"Per attribute at {study['largest']} training avatars (score, times asked):", "",
                  "| attribute | " + " | ".join(c.replace("_", " ") for c in cols) + " |", "|---|" + "---|" * len(cols)]
        for a in ATTRIBUTES:
            lines.append(f"| {a.replace('_', ' ')} | " + " | ".join(
                f"{per[c][a][0]:.2f} ({per[c][a][1]})" if a in per[c] else "-" for c in cols) + " |")
    return lines


def _with(cfg: TeraConfig, overrides: list[str]) -> TeraConfig:
    return merge_overrides(copy.deepcopy(cfg), overrides)
