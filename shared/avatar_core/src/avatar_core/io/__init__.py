"""Files: safetensors tensors and checkpoints, PLY, images and videos."""

from avatar_core.io.media import image_grid, load_image, save_image, write_video
from avatar_core.io.ply import PlyGaussians, load_ply, save_ply
from avatar_core.io.tensors import atomic_write, load_json, load_tensors, save_json, save_tensors

__all__ = [
    "PlyGaussians",
    "atomic_write",
    "image_grid",
    "load_image",
    "load_json",
    "load_ply",
    "load_tensors",
    "save_image",
    "save_json",
    "save_ply",
    "save_tensors",
    "write_video",
]
