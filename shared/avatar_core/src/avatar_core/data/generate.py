"""Writing the synthetic avatar dataset (``avatar-core make-dataset``).

Layout of a dataset folder::

    meta.json                  settings, format version, camera rig, label names
    uv_parts.png               body-part label of every UV texel (index into PART_NAMES, 255 outside)
    contact_sheet.png          16 avatars, front and back views, on white
    avatars/000000/
        views/000.png ...      V RGBA renders on an orbit; view 0 is the front (azimuth 0)
        portrait.png           RGBA front upper-body portrait (top of the head to mid-chest)
        cameras.json           every camera (OpenCV world-to-camera ``viewmat``, pixel ``K``), views and portrait
        body.safetensors       shape, pose, global_orient, transl (+ posed joints and OpenPose keypoints)
        texture.png            RGB UV texture (4-texel gutter around every chart, black beyond)
        segments.png           per-texel appearance label (index into SEGMENT_NAMES)
        attributes.json        sampled attributes, caption and phrase variants

Avatar ``i`` depends on ``(seed, i)`` only, so runs can resume or be sharded and give the same files. Each
avatar is written into a hidden temporary folder and renamed when complete; a rerun skips complete avatars
and removes leftover temporary folders.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from avatar_core.body import OPENPOSE_18, PART_NAMES, BodyModel, load_body_model
from avatar_core.cameras import Cameras, look_at, orbit_cameras, spherical_coordinates
from avatar_core.data.appearance import (
    SEGMENT_NAMES,
    TexturePainter,
    describe_body,
    phenotype_vector,
    sample_attributes,
)
from avatar_core.data.captions import make_captions
from avatar_core.data.poses import build_pose, sample_pose_params
from avatar_core.errors import ConfigError, InputError
from avatar_core.io import image_grid, load_image, save_image, save_json, save_tensors
from avatar_core.io.tensors import fsync_dir
from avatar_core.render.lighting import DATASET_LIGHTING, camera_lights, shade
from avatar_core.results import check_writable
from avatar_core.train.lock import pid_alive

log = logging.getLogger(__name__)

FORMAT = "avatar_core.synthetic_avatars/1"
#: Settings that must match for a rerun to continue an existing dataset (``num`` may grow).
_MATCHING = ("views", "res", "seed", "body", "uv_res", "a_pose_fraction", "camera_radius", "fov_deg",
             "elevation_deg", "portrait_fov_deg")
MIN_RES = 32
#: Body models whose shape parameters are phenotypes the attribute sampler can drive.
DATASET_BODIES = ("anny",)


class Timer:
    """Accumulated wall and process-CPU time per named stage (for the benchmark's breakdown)."""

    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.total[name] += time.perf_counter() - start
            self.cpu[name] += time.process_time() - cpu


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def render_textured(
    vertices: Tensor,  # [V, 3] world
    faces: Tensor,  # [F, 3]
    uv_corners: Tensor,  # [F, 3, 2] per-corner UVs (v = 0 at the bottom)
    texture: Tensor,  # [R, R, 3] in [0, 1], row 0 = top (v = 1)
    cameras: Cameras,
    ambient: float = DATASET_LIGHTING["ambient"],
    chunk: int = 48,
    timer: Timer | None = None,
) -> Tensor:  # [C, H, W, 4]
    """RGBA renders: bilinear texture lookup times Lambert shading from a light above-right of each camera
    (:mod:`avatar_core.render.lighting`)."""
    from avatar_core.render.mesh import interpolate, rasterize_mesh

    timer = timer or Timer()
    normals = torch.nn.functional.normalize(_vertex_normals(vertices, faces), dim=-1)  # [V, 3]
    corner_attrs = torch.cat([uv_corners.float(), normals[faces]], -1)  # [F, 3, 5] one interpolation pass
    tex = texture.permute(2, 0, 1)[None].float()  # [1, 3, R, R]
    out = []
    for s in range(0, len(cameras), chunk):
        cams = cameras[s:s + chunk]
        with timer("rasterize"):
            # The body is a closed mesh: culling back faces gives the same image for half the work.
            frags = rasterize_mesh(vertices, faces, cams, cull_backfaces=True)
        with timer("shade"):
            mask = frags.mask
            attrs = interpolate(frags, corner_attrs)[mask]  # [N, 5]: uv, normal
            uv, nn = attrs[:, :2], torch.nn.functional.normalize(attrs[:, 2:], dim=-1)
            grid = torch.stack([uv[:, 0] * 2 - 1, 1 - uv[:, 1] * 2], -1)  # [N, 2] grid_sample coordinates
            colour = torch.nn.functional.grid_sample(tex, grid[None, :, None], mode="bilinear",
                                                     padding_mode="border", align_corners=False)[0, :, :, 0].T
            cam_of_pix = torch.arange(len(cams))[:, None, None].expand_as(mask)[mask]
            # Each pixel's normal lit by its own camera's light (avatar_core.render.lighting), two-sided.
            light, forward = camera_lights(cams.viewmats), cams.viewmats[:, 2, :3]
            lit = shade(nn, forward[cam_of_pix], light[cam_of_pix], ambient)
            rgba = torch.zeros(*mask.shape, 4)
            rgba[mask] = torch.cat([(colour * lit[:, None]).clamp(0, 1), torch.ones_like(lit)[:, None]], -1)
        out.append(rgba)
    return torch.cat(out)


def _vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    from avatar_core.body import vertex_normals

    return vertex_normals(vertices[None], faces)[0]


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


def default_settings(num: int, views: int, res: int, seed: int, body: str, uv_res: int = 512,
                     a_pose_fraction: float = 0.5) -> dict[str, Any]:
    return {
        "num": int(num), "views": int(views), "res": int(res), "seed": int(seed), "body": str(body).lower(),
        "uv_res": int(uv_res), "a_pose_fraction": float(a_pose_fraction),
        # A fixed rig for every avatar (bodies are centred, not rescaled), so sizes stay comparable.
        "camera_radius": 2.8, "fov_deg": 40.0, "elevation_deg": 0.0, "portrait_fov_deg": 30.0,
    }


def _validate(settings: dict[str, Any]) -> None:
    from avatar_core.body import BODY_MODELS

    if settings["body"] not in BODY_MODELS:
        raise ConfigError(f"unknown body model {settings['body']!r}",
                          f"use one of: {', '.join(repr(n) for n in BODY_MODELS)} (the default is 'anny')")
    if settings["body"] not in DATASET_BODIES:
        raise ConfigError(f"the synthetic dataset samples phenotypes (age, gender, weight, ...), which "
                          f"{settings['body']!r} does not have", "use --body anny")
    if settings["num"] <= 0:
        raise InputError(f"--num must be a positive number of avatars, got {settings['num']}", "pass e.g. --num 100")
    if settings["views"] <= 0:
        raise InputError(f"--views must be positive, got {settings['views']}", "pass e.g. --views 36")
    if settings["res"] < MIN_RES:
        raise InputError(f"--res {settings['res']} is too small to show a body",
                         f"use at least {MIN_RES} pixels, e.g. --res 256")
    if settings["uv_res"] < 64:
        raise InputError(f"uv_res {settings['uv_res']} is too small for faces and garments", "use e.g. 512")
    if not 0.0 <= settings["a_pose_fraction"] <= 1.0:
        raise InputError(f"a_pose_fraction must be in [0, 1], got {settings['a_pose_fraction']}")
    if settings["seed"] < 0:
        raise InputError(f"--seed must be a non-negative integer, got {settings['seed']}", "pass e.g. --seed 0")


def is_dataset(root: str | os.PathLike) -> bool:
    """``root`` holds a dataset this generator wrote: its ``meta.json`` names the dataset format."""
    try:
        meta = json.loads((Path(root) / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and str(meta.get("format", "")).split("/")[0] == FORMAT.split("/")[0]


def _check_existing(out: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """An existing folder must be this dataset (same settings) unless ``overwrite``; returns whether to clear it.

    Only a folder whose ``meta.json`` says it is a dataset of this generator is ever cleared; anything else
    that is not empty (a training run, a folder of avatars, a damaged dataset) is refused, with or without
    ``overwrite``. Nothing is deleted here: the caller clears after every check has passed.
    """
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if not is_dataset(out):
        what = "its meta.json is not a dataset's" if (out / "meta.json").exists() else "no meta.json"
        raise ConfigError(f"{out} is not empty and is not an avatar dataset ({what}); make-dataset will not "
                          "write into it" + (" or delete anything in it" if overwrite else ""),
                          "choose an empty or new --out folder")
    if overwrite:
        return True
    old = json.loads((out / "meta.json").read_text()).get("settings", {})
    diff = [f"{k}: {old.get(k)!r} there, {settings[k]!r} now" for k in _MATCHING if old.get(k) != settings[k]]
    if diff:
        raise ConfigError(f"{out} holds a dataset made with different settings ({'; '.join(diff)})",
                          "pass the same settings to continue it, choose another --out, or add --overwrite "
                          "to delete it and start again")
    return False


def _remove_ours(out: Path) -> None:
    """Delete what this generator writes, nothing else."""
    shutil.rmtree(out / "avatars", ignore_errors=True)
    for name in ("meta.json", "uv_parts.png", "contact_sheet.png"):
        (out / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# One avatar
# --------------------------------------------------------------------------------------------------


class AvatarGenerator:
    """Makes avatar ``i`` of a dataset: attributes, body, texture, renders, files."""

    def __init__(self, settings: dict[str, Any], body: BodyModel | None = None):
        self.settings = settings
        self.body = body if body is not None else load_body_model(settings["body"])
        self.painter = TexturePainter(self.body, settings["uv_res"])
        self.uv_corners = self.body.uv_coords[self.body.uv_faces].float()  # [F, 3, 2]
        self.timer = Timer()
        s = settings
        self.view_cameras = orbit_cameras(s["views"], radius=s["camera_radius"], elevation_deg=s["elevation_deg"],
                                          fov_deg=s["fov_deg"], width=s["res"], height=s["res"])

    def rng(self, index: int) -> np.random.Generator:
        """Avatar ``index``'s random stream: a function of ``(seed, index)`` only."""
        return np.random.default_rng([int(self.settings["seed"]), int(index)])

    def make(self, index: int) -> dict[str, Any]:
        """Everything for one avatar, in memory: images as uint8 arrays, tensors, JSON-ready dicts."""
        s, body, t = self.settings, self.body, self.timer
        rng = self.rng(index)
        attributes = sample_attributes(rng)
        a_pose = bool(rng.random() < s["a_pose_fraction"])
        pose_params = {} if a_pose else sample_pose_params(rng)
        paint_seed = int(rng.integers(0, 2**31 - 1))
        with t("body"), torch.no_grad():
            attributes["phenotype"]["height"] = solve_height(body, attributes)
            shape = phenotype_vector(attributes, body.shape_names)[None].to(body.template_vertices.dtype)
            pose = build_pose(body, shape[0], pose_params)[None]
            rest_vertices, _ = body.rest_state(shape, None, 1)
            height = float(rest_vertices[0, :, 1].max() - rest_vertices[0, :, 1].min())
            posed = body.forward(shape=shape, pose=pose)
            v = posed.vertices[0]
            lo, hi = v.min(0).values, v.max(0).values
            # Centre the body in y on its bounding box and on the pelvis in x/z, so the fixed rig frames it.
            # A translation moves vertices, joints and keypoints alike (keypoint weights sum to one), so it
            # is added here rather than by another forward pass; body.forward(..., transl) gives the same.
            transl = torch.stack([-posed.joints[0, 0, 0], -(lo[1] + hi[1]) / 2, -posed.joints[0, 0, 2]])
            posed.vertices = posed.vertices + transl
            posed.joints = posed.joints + transl
            vertices = posed.vertices[0].float()
            keypoints = body.keypoints(posed, OPENPOSE_18)[0]
        attributes["height_m"] = round(height, 3)
        attributes["body_words"] = describe_body(attributes, height)
        attributes["pose"] = "a-pose" if a_pose else "natural"
        attributes["pose_params_deg"] = {k: round(v_, 2) for k, v_ in pose_params.items()}
        captions = make_captions(attributes)
        with t("texture"):
            texture, segments = self.painter.paint(attributes, np.random.default_rng(paint_seed))
        portrait = self.portrait_camera(keypoints)
        with t("render"):
            rgba = render_textured(vertices, body.faces, self.uv_corners, texture,
                                   Cameras.cat([self.view_cameras, portrait]), timer=t)
        to8 = lambda x: (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # noqa: E731
        return {
            "views": [to8(img) for img in rgba[:-1]],
            "portrait": to8(rgba[-1]),
            "texture": to8(texture),
            "segments": segments.numpy(),
            "body": {"shape": shape[0], "pose": pose[0], "global_orient": torch.zeros(3), "transl": transl,
                     "joints": posed.joints[0], "keypoints": keypoints},
            "cameras": self.cameras_json(portrait),
            "attributes": {"index": index, **attributes, **captions},
        }

    def portrait_camera(self, keypoints: Tensor) -> Cameras:
        """A front camera framing the upper body: from 16 cm above the eyes (the top of the head) to 30 cm below the neck."""
        k = {n: keypoints[i] for i, n in enumerate(OPENPOSE_18)}
        top = float((k["left_eye"][1] + k["right_eye"][1]) / 2) + 0.16
        bottom = float(k["neck"][1]) - 0.3
        centre_y = (top + bottom) / 2
        half = (top - bottom) / 2
        fov = self.settings["portrait_fov_deg"]
        dist = half / math.tan(math.radians(fov) / 2)
        target = torch.tensor([float(k["neck"][0]), centre_y, float(k["neck"][2])])
        eye = target + torch.tensor([0.0, 0.0, dist])
        res = self.settings["res"]
        return Cameras.from_fov(look_at(eye[None], target[None]), fov, res, res)

    def cameras_json(self, portrait: Cameras) -> dict[str, Any]:
        az, el, radius = spherical_coordinates(self.view_cameras)
        views = [{"file": f"views/{k:03d}.png", "viewmat": self.view_cameras.viewmats[k].tolist(),
                  "K": self.view_cameras.Ks[k].tolist(), "azimuth_deg": round(float(az[k]), 4),
                  "elevation_deg": round(float(el[k]), 4), "radius": round(float(radius[k]), 4)}
                 for k in range(len(self.view_cameras))]
        return {"convention": "opencv world-to-camera viewmat, pixel K (see avatar_core.conventions)",
                "width": self.settings["res"], "height": self.settings["res"], "views": views,
                "portrait": {"file": "portrait.png", "viewmat": portrait.viewmats[0].tolist(),
                             "K": portrait.Ks[0].tolist()}}

    def write(self, index: int, root: Path) -> Path:
        """Make avatar ``index`` and write it to ``root/avatars/NNNNNN`` atomically (temp folder + rename)."""
        data = self.make(index)
        final = avatar_dir(root, index)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "views").mkdir(parents=True)
        with self.timer("png"):
            for k, img in enumerate(data["views"]):
                _write_png(tmp / "views" / f"{k:03d}.png", img)
            _write_png(tmp / "portrait.png", data["portrait"])
            _write_png(tmp / "texture.png", data["texture"])
            _write_png(tmp / "segments.png", data["segments"])
        save_tensors(tmp / "body.safetensors", data["body"],
                     metadata={"body": self.settings["body"], "shape_names": list(self.body.shape_names),
                               "keypoint_names": list(OPENPOSE_18)})
        save_json(tmp / "cameras.json", data["cameras"])
        save_json(tmp / "attributes.json", data["attributes"])
        if final.exists():  # only reached with overwrite, or a rerun racing another worker
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return final


def solve_height(body: BodyModel, attributes: dict[str, Any]) -> float:
    """Anny's ``height`` phenotype that gives ``attributes["height_target_m"]`` (height is linear in it)."""
    heights = []
    for h in (0.0, 1.0):
        pheno = {**attributes["phenotype"], "height": h}
        shape = phenotype_vector({"phenotype": pheno}, body.shape_names)[None].to(body.template_vertices.dtype)
        v, _ = body.rest_state(shape, None, 1)
        heights.append(float(v[0, :, 1].max() - v[0, :, 1].min()))
    value = (attributes["height_target_m"] - heights[0]) / (heights[1] - heights[0])
    return round(min(max(value, 0.0), 1.0), 6)


def _write_png(path: Path, arr: np.ndarray) -> None:
    # Fixed encoder settings so identical pixels give identical bytes; level 1 is ~3x faster than 6.
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def avatar_dir(root: Path, index: int) -> Path:
    return Path(root) / "avatars" / f"{index:06d}"


def is_complete(root: Path, index: int) -> bool:
    return (avatar_dir(root, index) / "attributes.json").is_file()


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


def generate_dataset(
    out: str | os.PathLike,
    num: int,
    views: int = 36,
    res: int = 256,
    seed: int = 0,
    body: str = "anny",
    overwrite: bool = False,
    uv_res: int = 512,
    a_pose_fraction: float = 0.5,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    body_model: BodyModel | None = None,
) -> Path:
    """Write ``num`` synthetic avatars to ``out`` (see the module docstring for the layout); returns ``out``.

    Resumes an interrupted run with the same settings (``num`` may grow: avatar ``i`` does not depend on it);
    other differences from an existing dataset raise :class:`ConfigError` unless ``overwrite``, which deletes
    the generator's files there (only those, and only in a folder whose ``meta.json`` says it is a dataset:
    anything else is refused) and starts again. ``out`` must be a folder that can be written.
    ``shard=(k, n)`` makes only avatars with ``i % n == k``; shards may write into the same folder concurrently (without ``overwrite``), and the
    contact sheet is written by whichever run finds the first 16 avatars complete.
    """
    settings = default_settings(num, views, res, seed, body, uv_res, a_pose_fraction)
    _validate(settings)
    k, n = shard
    if not (0 <= k < n):
        raise InputError(f"shard {k}/{n} is not valid", "pass shard=(k, n) with 0 <= k < n")
    root = Path(out)
    check_writable(root)
    clear = _check_existing(root, settings, overwrite)
    gen = AvatarGenerator(settings, body_model)  # the body loads before anything is written or deleted
    if clear:
        _remove_ours(root)
    root.mkdir(parents=True, exist_ok=True)
    _write_meta(root, settings, gen)  # first: from here on the folder is recognisably a dataset
    (root / "avatars").mkdir(exist_ok=True)
    for leftover in (root / "avatars").glob(".*.tmp-*"):
        # A run that stopped while writing this avatar; a live process's folder is another shard at work.
        pid = leftover.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid))):
            shutil.rmtree(leftover, ignore_errors=True)
    todo = [i for i in range(k, num, n) if overwrite or not is_complete(root, i)]
    if len(todo) < len(range(k, num, n)):
        log.info("%s: %d of %d avatars already complete, continuing", root, len(range(k, num, n)) - len(todo),
                 len(range(k, num, n)))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(range(k, num, n)), initial=len(range(k, num, n)) - len(todo), unit="avatar",
               desc="avatars", disable=not progress)
    for i in todo:
        gen.write(i, root)
        bar.update(1)
    bar.close()
    if all(is_complete(root, i) for i in range(min(16, num))):
        write_contact_sheet(root)
    return root


def _write_meta(root: Path, settings: dict[str, Any], gen: AvatarGenerator) -> None:
    meta_path = root / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        settings = {**settings, "num": max(int(old["settings"].get("num", 0)), settings["num"])}
    meta = {
        "format": FORMAT,
        "settings": settings,
        "part_names": list(PART_NAMES),
        "segment_names": list(SEGMENT_NAMES),
        "keypoint_names": list(OPENPOSE_18),
        "shape_names": list(gen.body.shape_names),
        "files": {"views": "avatars/NNNNNN/views/VVV.png", "portrait": "portrait.png",
                  "cameras": "cameras.json", "body": "body.safetensors", "texture": "texture.png",
                  "segments": "segments.png", "attributes": "attributes.json"},
        "portrait": "front camera, top of the head to ~30 cm below the neck keypoint (upper body)",
        "lighting": dict(DATASET_LIGHTING),  # every view is lit this way (avatar_core.render.lighting)
    }
    save_json(meta_path, meta)
    parts = gen.painter.mapper.part_label_map()
    img = torch.where(parts >= 0, parts, torch.full_like(parts, 255)).to(torch.uint8).numpy()
    if not (root / "uv_parts.png").is_file():
        _write_png(root / "uv_parts.png", img)


def write_contact_sheet(root: str | os.PathLike, count: int = 16) -> Path:
    """``contact_sheet.png``: the first ``count`` avatars, each as (front, back), four avatars a row, on white."""
    root = Path(root)
    meta = json.loads((root / "meta.json").read_text())
    views = meta["settings"]["views"]
    front, back = 0, views // 2  # view k sits at azimuth 360 k / V; V // 2 is the one most nearly behind
    tiles = []
    for i in range(min(count, meta["settings"]["num"])):
        if not is_complete(root, i):
            continue
        for v in (front, back):
            img = load_image(avatar_dir(root, i) / "views" / f"{v:03d}.png")
            rgb, a = img[..., :3], img[..., 3:]
            tiles.append(rgb * a + (1 - a))
    sheet = image_grid(tiles, nrow=8, padding=2, pad_value=0.8)
    path = root / "contact_sheet.png"
    save_image(path, sheet)
    return path
