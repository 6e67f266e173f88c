"""The input of GAS: one image of a person plus one parameters file (body parameters and camera) next to it.

The official code derives these with Grounded-SAM (mask), HMR2 (SMPL and camera) and Blender; here the user gives
them (or takes them from the synthetic dataset): an RGBA image, or an RGB image with a mask file, and a JSON file
(default: the image's name with ``.json``) in the kernel's conventions (:mod:`avatar_core.conventions`)::

    {
      "body": "anny",                       # the body model the parameters belong to
      "shape": [0.5, ...],                  # [shape_dim]: Anny phenotypes in [0, 1] / SMPL-X betas
      "pose": [[0.0, 0.0, 0.0], ...],       # [J-1, 3] axis-angle per joint (kernel pose convention)
      "global_orient": [0.0, 0.0, 0.0],     # optional, axis-angle of the root
      "transl": [0.0, 0.05, 0.0],           # optional, metres
      "camera": {"K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]],    # pixel intrinsics of this image
                 "viewmat": [[...4 x 4 world-to-camera, OpenCV axes...]],
                 "width": 256, "height": 256}
    }

:func:`export_reference` writes such a pair for a synthetic clip's reference frame (the README's example).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from avatar_core.body import BodyModel
from avatar_core.cameras import Cameras
from avatar_core.errors import CorruptFileError, InputError, MissingFileError
from avatar_core.io import load_image, save_image, save_json


@dataclass
class Reference:
    rgba: Tensor  # [H, W, 4] straight alpha
    camera: Cameras  # 1 camera at the image's size
    shape: Tensor  # [S]
    pose: Tensor  # [J-1, 3]
    global_orient: Tensor  # [3]
    transl: Tensor  # [3]
    source: str = ""


def params_path_for(image: Path) -> Path:
    return image.with_suffix(".json")


def load_reference(image: str | Path, body: BodyModel, params: str | Path | None = None,
                   mask: str | Path | None = None, res: int | None = None) -> Reference:
    """Read and validate an input (module docstring); ``res`` resizes image and camera to ``res x res``."""
    image = Path(image)
    params = Path(params) if params else params_path_for(image)
    if not image.is_file():
        raise MissingFileError(f"image not found: {image}", "pass the path of an RGBA image (or RGB + --mask)")
    if not params.is_file():
        raise MissingFileError(f"no parameters file {params} for {image.name}",
                               "put the body parameters + camera JSON next to the image (see the gas README)")
    img = load_image(image)
    if img.shape[-1] == 4 and mask is None:
        rgba = img
    elif mask is not None:
        m = load_image(mask)
        m = m[..., :1] if m.shape[-1] in (1, 3) else m[..., 3:]
        if m.shape[:2] != img.shape[:2]:
            raise InputError(f"mask {tuple(m.shape[:2])} and image {tuple(img.shape[:2])} differ in size",
                             "give a mask of the image's size")
        rgba = torch.cat([img[..., :3] if img.shape[-1] >= 3 else img.expand(-1, -1, 3), m], -1)
    else:
        raise InputError(f"{image.name} has no alpha channel and no mask was given",
                         "pass an RGBA image, or the person's mask with --mask MASK.png")
    try:
        p = json.loads(params.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{params} is not valid JSON ({e})", "see the gas README for the layout") from e
    if p.get("body", "anny") != body.name:
        raise InputError(f"{params.name} holds {p.get('body')!r} parameters, the model uses {body.name!r}",
                         f"give {body.name} parameters, or run with body={p.get('body')} (and its files)")
    try:
        shape = torch.tensor(p["shape"], dtype=torch.float32)
        pose = torch.tensor(p["pose"], dtype=torch.float32)
        cam = p["camera"]
        K, viewmat = torch.tensor(cam["K"], dtype=torch.float32), torch.tensor(cam["viewmat"], dtype=torch.float32)
        W, H = int(cam["width"]), int(cam["height"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(f"{params} lacks or mis-shapes {e}", "see the gas README for the layout") from e
    if tuple(shape.shape) != (body.shape_dim,) or tuple(pose.shape) != (body.num_joints - 1, 3):
        raise InputError(f"{params.name}: shape {tuple(shape.shape)} / pose {tuple(pose.shape)} do not fit "
                         f"{body.name} (expects [{body.shape_dim}] and [{body.num_joints - 1}, 3])",
                         "write the parameters of this body model")
    if (W, H) != (rgba.shape[1], rgba.shape[0]):
        raise InputError(f"the camera is {W}x{H} but the image {rgba.shape[1]}x{rgba.shape[0]}",
                         "give the intrinsics of this image")
    camera = Cameras(viewmat[None], K[None], W, H)
    go = torch.tensor(p.get("global_orient", [0.0, 0.0, 0.0]), dtype=torch.float32)
    tr = torch.tensor(p.get("transl", [0.0, 0.0, 0.0]), dtype=torch.float32)
    if res is not None and (W, H) != (res, res):
        if W != H:
            raise InputError(f"the image is {W}x{H}; the model takes square images", "crop the image to a square")
        rgba = torch.nn.functional.interpolate(rgba.permute(2, 0, 1)[None], size=(res, res), mode="area")[0]
        rgba = rgba.permute(1, 2, 0)
        camera = camera.resized(res, res)
    return Reference(rgba.contiguous(), camera, shape, pose, go, tr, str(image))


def export_reference(out_image: Path, rgba: Tensor, camera: Cameras, body: BodyModel, shape: Tensor, pose: Tensor,
                     transl: Tensor, global_orient: Tensor | None = None) -> tuple[Path, Path]:
    """Write an input pair (RGBA PNG + parameters JSON) in the layout :func:`load_reference` reads."""
    save_image(out_image, rgba)
    params = params_path_for(out_image)
    save_json(params, {
        "body": body.name, "shape": shape.tolist(), "pose": pose.tolist(),
        "global_orient": (global_orient if global_orient is not None else torch.zeros(3)).tolist(),
        "transl": transl.tolist(),
        "camera": {"K": camera.Ks[0].tolist(), "viewmat": camera.viewmats[0].tolist(),
                   "width": camera.width, "height": camera.height},
    })
    return out_image, params
