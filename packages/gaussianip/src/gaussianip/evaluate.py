"""``gaussianip evaluate``: the measurements behind the paper's claims, at the configured scale.

* A probe the prior never saw: a small CNN trained on a *separate* synthetic dataset (another seed) to read the
  kernel's attribute targets (gender, skin, hair, garment colours / types) from full-body views and the face
  features (facial hair, glasses) from portraits.
* AHDS vs uniform vs linear timesteps at equal step counts, and AHDS at 2/3 of the steps (the paper's 3600 -> 2400
  claim): the probe's agreement of the stage-1 result's views with the attributes of the prompt's avatar.
* VCR vs independent refinement: a fresh 3DGS fitted to each set of refined views; the PSNR it reaches on them
  (views that agree in 3D can be fitted by one 3DGS; inconsistent ones cannot).
* Text faithfulness of garment colours / types (as TeRA's evaluation): the kernel's per-region scorer
  (:mod:`avatar_core.data.garment_score`) on renders of the result from the front, back and sides, each pixel
  assigned the garment region of the body-surface point it shows (the body the Gaussians were built on, in the
  body frame); the prompt's caption against other avatars' captions (chance level).
* Identity: the probe's face-feature agreement of the result's portrait render with the input face's avatar, next
  to the same agreement with the other avatars (random faces).
* Time of one tiny ``generate`` (stage by stage).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from avatar_core.cameras import Cameras, look_at, orbit_cameras
from avatar_core.data.datasets import ATTRIBUTE_CLASSES, MultiViewDataset, attribute_targets
from avatar_core.data.garment_score import ATTRIBUTES, GarmentScorer, garment_scorer, parse_garments
from avatar_core.io import load_image, load_tensors, save_json
from avatar_core.metrics import psnr
from avatar_core.results import prepare_result_dir

FACE_CLASSES = {"facial_hair": ("none", "stubble", "moustache", "beard"), "glasses": ("none", "round", "square")}
BODY_KEYS = ("gender", "skin_tone", "hair_colour", "top_colour", "top_type", "bottom_colour")
FACE_KEYS = ("gender", "skin_tone", "hair_colour", "facial_hair", "glasses")


def targets(attrs: dict) -> dict[str, int]:
    t = attribute_targets(attrs)
    face = attrs.get("face", {})
    for k, classes in FACE_CLASSES.items():
        t[k] = classes.index(face.get(k, "none"))
    return t


class Probe(nn.Module):
    """A small multi-head CNN over 64 px images (full-body views or portraits)."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for w in (16, 32, 64, 64):
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        classes = {**{k: len(v) for k, v in ATTRIBUTE_CLASSES.items()}, **{k: len(v) for k, v in FACE_CLASSES.items()}}
        self.heads = nn.ModuleDict({k: nn.Linear(4 * c, n) for k, n in classes.items()})

    def forward(self, x):  # [B, 3, H, W] in [0, 1]
        x = nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        f = self.body(x * 2 - 1)
        return {k: h(f) for k, h in self.heads.items()}


def _white(img):  # [H, W, 4] -> [3, H, W] on white
    return (img[..., :3] * img[..., 3:] + 1 - img[..., 3:]).permute(2, 0, 1)


def train_probe(root: Path, steps: int, seed: int = 0) -> Probe:
    """Fit the probe on every view (body keys) and portrait (face keys) of the evaluation dataset."""
    ds = MultiViewDataset(root)
    xs, ys, kind = [], [], []
    for i in range(len(ds)):
        t = targets(ds.attributes(i))
        cams = ds.cameras(i)
        for v in cams["views"]:
            xs.append(_white(load_image(ds.dirs[i] / v["file"])))
            ys.append(t)
            kind.append(0)
        xs.append(_white(load_image(ds.dirs[i] / cams["portrait"]["file"])))
        ys.append(t)
        kind.append(1)
    x = torch.stack([nn.functional.interpolate(a[None], size=(64, 64), mode="bilinear", antialias=True)[0] for a in xs])
    y = {k: torch.tensor([t[k] for t in ys]) for k in ys[0]}
    is_face = torch.tensor(kind).bool()
    torch.manual_seed(seed)
    probe = Probe()
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        out = probe(x[idx])
        loss = 0.0
        for k, logits in out.items():
            mask = is_face[idx] if k in FACE_CLASSES else torch.ones(len(idx), dtype=torch.bool)
            if mask.any():
                loss = loss + nn.functional.cross_entropy(logits[mask], y[k][idx][mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe.eval().requires_grad_(False)


def agreement(probe: Probe, images: torch.Tensor, t: dict[str, int], keys) -> float:
    """Mean over images and keys of (probe's class == target class)."""
    with torch.no_grad():
        out = probe(images)
    return float(torch.stack([(out[k].argmax(-1) == t[k]).float().mean() for k in keys]).mean())


def result_views(params, frame, background, size: int = 64):
    """Full-body orbit views and a portrait render in the synthetic dataset's framing (rescaled to the frame)."""
    from gaussianip.distill import body_keypoints
    from gaussianip.gaussians import render
    from gaussianip.views import KP

    cams = orbit_cameras(8, 2.8 * frame.scale, 0.0, 40.0, size, size)
    kp = body_keypoints(frame)
    top = float(kp[KP["left_eye"], 1]) + 0.16 * frame.scale
    bottom = float(kp[KP["neck"], 1]) - 0.3 * frame.scale
    half = (top - bottom) / 2
    dist = half / torch.tan(torch.deg2rad(torch.tensor(15.0)))
    target = torch.tensor([[float(kp[KP["neck"], 0]), (top + bottom) / 2, float(kp[KP["neck"], 2])]])
    pc = Cameras.from_fov(look_at(target + torch.tensor([[0.0, 0.0, float(dist)]]), target), 30.0, size, size)
    with torch.no_grad():
        views = render(params, cams, background)[0].permute(0, 3, 1, 2)
        portrait = render(params, pc, background)[0].permute(0, 3, 1, 2)
    return views, portrait


def garment_views(params, frame, scorer: GarmentScorer, size: int = 128, views: int = 4,
                  background=(1.0, 1.0, 1.0)) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Renders ``[C, H, W, 3]`` of a result on an orbit starting at the front (front, side, back, side for 4) and,
    per garment region, the pixels that show it: the body frame's body rasterised for the same cameras, its
    surface UV looked up in the scorer's regions, where the Gaussians cover the pixel (alpha > 0.5)."""
    from gaussianip.gaussians import render

    half = float(frame.vertices[:, 1].abs().max()) * 1.15  # the body fills about 87% of the height
    cams = orbit_cameras(views, half / float(torch.tan(torch.deg2rad(torch.tensor(20.0)))), 0.0, 40.0, size, size)
    with torch.no_grad():
        rgb, _, alpha, _ = render(params, cams, list(background))
    return rgb.clamp(0, 1), scorer.view_regions(frame.vertices, cams, alpha[..., 0])


def _mean(scores: list[dict[str, float]]) -> float | None:
    v = [x for s in scores for x in s.values()]
    return round(sum(v) / len(v), 3) if v else None


def text_faithfulness(params, frame, scorer: GarmentScorer, prompt: str, others: list[str], size: int = 128) -> dict:
    """The fraction of the prompt's garment attributes the result's renders show (per attribute too), next to the
    same fraction for other avatars' captions (what an unrelated outfit scores)."""
    rgb, regions = garment_views(params, frame, scorer, size)
    seen = scorer.read_views(rgb, regions)
    asked = parse_garments(prompt)
    own = {k: float(seen[k] == v) for k, v in asked.items() if k in seen}
    other = [{k: float(seen[k] == v) for k, v in parse_garments(c).items() if k in seen} for c in others]
    return {"prompt": _mean([own]), "other_captions_mean": _mean(other), "other_captions": len(others),
            "per_attribute": {a: own[a] for a in ATTRIBUTES if a in own},
            "seen": {a: seen[a] for a in ATTRIBUTES if a in seen}}


def evaluate(cfg, out: str | Path, overwrite: bool = False, probe_steps: int = 300, eval_avatars: int = 12) -> dict:
    """Run the measurements into ``out`` (report.json and the runs they come from)."""
    from avatar_core.data.generate import generate_dataset
    from gaussianip import gaussians as G
    from gaussianip.system import pipeline

    out = prepare_result_dir(out, kind="gaussianip.evaluate", overwrite=overwrite)
    pipeline.set_threads(cfg)
    report: dict = {"scale": {"stage1_steps": cfg.stage1.steps, "num_points": cfg.gaussians.num_points,
                              "render_size": cfg.stage1.render_size, "prior": cfg.prior.kind}}
    t0 = time.time()
    prior = pipeline.load_prior(cfg)
    report["prior_seconds"] = round(time.time() - t0, 1)
    ds = MultiViewDataset(cfg.dataset.root)
    held = list(range(len(ds) - max(cfg.dataset.held_out, 1), len(ds)))
    h = held[-1]
    attrs = ds.attributes(h)
    prompt, face = attrs["caption"], ds.dirs[h] / "portrait.png"
    eval_root = Path(cfg.dataset.root).with_name(Path(cfg.dataset.root).name + "_probe")
    generate_dataset(eval_root, num=eval_avatars, views=cfg.dataset.views, res=cfg.dataset.res,
                     seed=cfg.dataset.seed + 1000, uv_res=cfg.dataset.uv_res, progress=False)
    probe = train_probe(eval_root, probe_steps)
    frame = G.body_frame(cfg.gaussians)
    scorer = garment_scorer(cfg.gaussians.body, cfg.gaussians.body_dir, cfg.dataset.uv_res)
    asked = parse_garments(prompt)
    other_caps = [ds.attributes(j)["caption"] for j in range(len(ds)) if j != h]
    t_face = targets(attrs)
    identity = prior.face_identity(load_image(face))

    def stage1(kind: str, steps: int) -> tuple[float, float, float | None, Path]:
        c = copy.deepcopy(cfg)
        c.stage1.timesteps, c.stage1.steps = kind, steps
        t = time.time()
        res = pipeline.generate(c, prompt, face=face, out=out / f"stage1_{kind}_{steps}", overwrite=True,
                                stop_after="stage1", progress=False)
        params = G.load_gaussians(Path(res["run"]) / "stage1.safetensors")
        views, portrait = result_views(params, frame, c.stage1.background)
        rgb, regions = garment_views(params, frame, scorer)
        text = _mean([scorer.score_views(rgb, regions, asked)])
        return agreement(probe, views, t_face, BODY_KEYS), time.time() - t, text, Path(res["run"])

    N = cfg.stage1.steps
    rows = {}
    for kind, steps in (("ahds", N), ("uniform", N), ("linear", N), ("ahds", (2 * N) // 3), ("uniform", (2 * N) // 3)):
        score, sec, text, run = stage1(kind, steps)
        rows[f"{kind}@{steps}"] = {"probe_agreement": round(score, 3), "garment_text_score": text,
                                   "seconds": round(sec, 1)}
    report["timesteps"] = rows

    # VCR vs independent, from the AHDS run's stage 1; a fresh fit (stage 3) to each set of refined views.
    base = out / f"stage1_ahds_{N}"
    cons = {}
    for mode in ("vcr", "independent"):
        c = copy.deepcopy(cfg)
        c.vcr.mode = mode
        run = out / f"full_{mode}"
        run.mkdir()
        for f in ("stage1.safetensors", "settings.json", ".avatar-result.json"):
            (run / f).write_bytes((base / f).read_bytes())
        t = time.time()
        res = pipeline.continue_run(run, c, prior, prompt, identity, progress=False)
        refined = load_tensors(run / "stage2.safetensors")[0]["refined"]
        _, cams = pipeline.vcr_cameras(c)
        fit = G.load_gaussians(run / "gaussians.safetensors")
        with torch.no_grad():
            rgb = G.render(fit, cams, c.stage1.background)[0]
        cons[mode] = {"fit_psnr_db": round(float(psnr(rgb.clamp(0, 1), refined).mean()), 2),
                      "seconds": round(time.time() - t, 1)}
        if mode == "vcr":
            params = G.load_gaussians(run / "gaussians.safetensors")
            _, portrait = result_views(params, frame, c.stage1.background)
            report["text_faithfulness"] = text_faithfulness(params, frame, scorer, prompt, other_caps)
            same = agreement(probe, portrait, t_face, FACE_KEYS)
            others = [agreement(probe, portrait, targets(ds.attributes(j)), FACE_KEYS) for j in range(len(ds)) if j != h]
            report["identity"] = {"input_face": round(same, 3), "random_faces_mean": round(sum(others) / len(others), 3),
                                  "random_faces": len(others)}
            report["generate_timings_s"] = {k: round(v, 1) for k, v in res["timings"].items()}
            face_fn = getattr(prior, "face_fn", None)
            if face_fn is not None:  # paper scale with insightface: the paper's Face++-style check, as a cosine
                big, _ = result_views(params, frame, c.stage1.background, size=512)
                e_in, _ = face_fn(load_image(face))
                e_out, _ = face_fn(big[0].permute(1, 2, 0))
                report["identity"]["arcface_cosine"] = round(float(torch.nn.functional.cosine_similarity(
                    e_in[None], e_out[None])), 3)
    report["vcr_consistency"] = cons
    if cfg.dataset.views % 8 == 0:
        report["vcr_on_dataset_views"] = vcr_on_dataset_views(cfg, prior, Path(cfg.dataset.root), h)
    else:
        report["vcr_on_dataset_views"] = {"not_measured": f"the dataset has {cfg.dataset.views} views per avatar; "
                                                          "VCR's principal + key views need a multiple of 8"}
    save_json(out / "report.json", report)
    return report


def vcr_on_dataset_views(cfg, prior, root: Path, index: int, refine_steps: tuple[int, ...] = (8, 20),
                         fit_steps: int = 60) -> dict:
    """VCR vs independent refinement of an avatar's calibrated, multi-view-consistent renders (the synthetic
    dataset's views, 8 on an orbit from the front: the principal and key views) at several noise levels; each set
    of refined views gets a fresh 3DGS fit (Gaussians on that avatar's posed body surface) whose PSNR on the views
    measures their 3D consistency. The ground-truth views themselves give the ceiling."""
    from avatar_core.body import UVMapper, load_body_model
    from avatar_core.cameras import spherical_coordinates
    from gaussianip import gaussians as G
    from gaussianip.prior_train import pose_images
    from gaussianip.reconstruct import reconstruct
    from gaussianip.system.pipeline import _perceptual
    from gaussianip.vcr import refine_views

    ds = MultiViewDataset(root)
    item, attrs = ds[index], ds.attributes(index)
    cj = ds.cameras(index)
    cams = Cameras(item["viewmats"], item["Ks"], cj["width"], cj["height"])
    az, _, _ = spherical_coordinates(cams)
    az = torch.round(az * 1000) / 1000  # the orbit's exact angles, for the view plan
    white = (item["images"] + (1 - item["masks"][..., None])).clamp(0, 1)  # [V, H, W, 3]
    body = load_body_model("anny")
    with torch.no_grad():
        posed = body(shape=item["shape"][None], pose=item["pose"][None]).vertices + item["transl"]
    mapper = UVMapper(body, 128)
    fidx, bary, _ = mapper.sample_points(int(cfg.gaussians.num_points), seed=0)
    means = mapper.points_on_surface(posed, fidx, bary)[0].float()
    S = prior.image_size
    x = nn.functional.interpolate(white.permute(0, 3, 1, 2), size=(S, S), mode="bilinear", antialias=True)
    poses = nn.functional.interpolate(pose_images(item["keypoints"], cams, az.float(), "full"), size=(S, S))
    with torch.no_grad():
        z = prior.encode(x)
        tp, tn = prior.encode_text([attrs["caption"]]), prior.encode_text([cfg.prior.negative_prompt])
        ident = prior.face_identity(load_image(ds.dirs[index] / "portrait.png"))
    perceptual, _ = _perceptual(cfg)

    def fit(targets: torch.Tensor) -> float:
        c = copy.deepcopy(cfg)
        c.recon.steps, c.stage1.background = fit_steps, [1.0, 1.0, 1.0]
        n = means.shape[0]
        params = nn.ParameterDict({
            "means": nn.Parameter(means.clone()), "scales": nn.Parameter(torch.full((n, 3), 0.012).log()),
            "quats": nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1)),
            "opacities": nn.Parameter(torch.logit(torch.full((n,), 0.5))),
            "sh0": nn.Parameter(torch.zeros(n, 1, 3))})
        reconstruct(params, cams, targets, c, perceptual, progress=False)
        with torch.no_grad():
            rgb = G.render(params, cams, [1.0, 1.0, 1.0])[0]
        return round(float(psnr(rgb.clamp(0, 1), targets).mean()), 2)

    out = {"ground_truth_views": {"fit_psnr_db": fit(white)}}
    for k in refine_steps:
        for mode in ("vcr", "independent"):
            vc = copy.deepcopy(cfg.vcr)
            vc.mode, vc.refine_steps = mode, k
            with torch.no_grad():
                ref = prior.decode(refine_views(prior, z, az.tolist(), tp, tn, ident, prior.zero_identity(), poses, vc))
            ref = nn.functional.interpolate(ref, size=white.shape[1:3], mode="bilinear", antialias=True)
            ref = ref.permute(0, 2, 3, 1).clamp(0, 1)
            out[f"{mode}@{k}of{cfg.vcr.ddim_steps}"] = {"fit_psnr_db": fit(ref),
                                                        "change_from_input_psnr_db": round(float(psnr(ref, white).mean()), 2)}
    return out
