"""Images, image grids and turntable videos.

Images are channels-last ``[H, W, C]`` (see :mod:`avatar_core.conventions`): float in ``[0, 1]``
or ``uint8``, ``C`` in 1 (grey), 3 (RGB) or 4 (RGBA). Every file is written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from avatar_core.errors import CorruptFileError, InputError, MissingFileError
from avatar_core.io.tensors import PathLike, atomic_write

log = logging.getLogger(__name__)

ImageLike = torch.Tensor | np.ndarray


def to_uint8(img: ImageLike, name: str = "image") -> np.ndarray:
    """Float ``[0, 1]`` or uint8 array/tensor -> uint8 numpy array of the same shape (floats are clamped and rounded)."""
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{name}: dtype {arr.dtype} is not supported", "pass float values in [0, 1] or uint8")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or infinite values", "check the renderer/model output before saving")
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def _as_hwc(arr: np.ndarray, name: str) -> np.ndarray:
    """Accept ``[H, W]`` as grey and check ``[H, W, C]`` with C in 1/3/4."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{name} has shape {tuple(arr.shape)}; expected [H, W, C] with C in 1, 3 or 4",
                         "images are channels-last; permute a [C, H, W] tensor with .permute(1, 2, 0)")
    return arr


def save_image(path: PathLike, img: ImageLike) -> Path:
    """Save one image (``[H, W, C]`` float in [0, 1] or uint8) as PNG (or the format ``path``'s suffix names)."""
    arr = _as_hwc(to_uint8(img), "save_image")
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    if fmt == "JPEG" and pil.mode == "RGBA":
        raise InputError(f"cannot save an RGBA image as JPEG: {path}", "use a .png path, or drop the alpha channel")
    with atomic_write(path) as tmp:
        pil.save(tmp, format=fmt)
    return Path(path)


def load_image(path: PathLike) -> torch.Tensor:
    """Load an image file as a float32 tensor ``[H, W, C]`` in [0, 1]; C is 1 (grey), 3 (RGB) or 4 (RGBA)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"image not found: {path}", "check the path")
    try:
        with Image.open(path) as pil:
            pil.load()
            if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(pil, dtype=np.float32) / 65535.0
            else:
                keep = {"L": "L", "RGB": "RGB", "RGBA": "RGBA", "LA": "RGBA", "1": "L"}
                if pil.mode in keep:
                    target = keep[pil.mode]
                else:
                    target = "RGBA" if ("transparency" in pil.info or "A" in pil.getbands()) else "RGB"
                arr = np.asarray(pil.convert(target), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptFileError(f"{path} is not a readable image ({e})",
                               "check that it is a complete PNG/JPEG file; regenerate it if it was truncated") from e
    return torch.from_numpy(np.ascontiguousarray(_as_hwc(arr, str(path))))


def image_grid(images: torch.Tensor | Sequence[torch.Tensor], nrow: int, padding: int = 2,
               pad_value: float = 1.0) -> torch.Tensor:
    """Tile images ``[N, H, W, C]`` (or a list of ``[H, W, C]``, sizes may differ) into one ``[H', W', C]`` grid.

    ``nrow`` images per row, ``padding`` pixels of ``pad_value`` between and around them; uint8
    inputs give uint8 output (``pad_value`` scaled by 255), anything else float32.
    """
    if nrow < 1:
        raise InputError(f"image_grid: nrow must be >= 1, got {nrow}")
    imgs = list(images.unbind(0)) if isinstance(images, torch.Tensor) else [torch.as_tensor(i) for i in images]
    if not imgs:
        raise InputError("image_grid: no images given")
    imgs = [i[:, :, None] if i.ndim == 2 else i for i in imgs]
    channels = {i.shape[-1] for i in imgs}
    if any(i.ndim != 3 for i in imgs) or len(channels) != 1:
        raise InputError(f"image_grid: images must all be [H, W, C] with the same C; got {[tuple(i.shape) for i in imgs]}")
    is_u8 = all(i.dtype == torch.uint8 for i in imgs)
    dtype = torch.uint8 if is_u8 else torch.float32
    fill = round(pad_value * 255) if is_u8 else pad_value
    h = max(i.shape[0] for i in imgs)
    w = max(i.shape[1] for i in imgs)
    ncol = min(nrow, len(imgs))
    nrows = -(-len(imgs) // ncol)
    grid = torch.full((padding + nrows * (h + padding), padding + ncol * (w + padding), channels.pop()), fill,
                      dtype=dtype)
    for k, img in enumerate(imgs):
        r, c = divmod(k, ncol)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        img = img.detach().cpu()
        grid[y:y + img.shape[0], x:x + img.shape[1]] = img.to(dtype) if is_u8 else img.float()
    return grid


def _video_frames(frames: ImageLike) -> np.ndarray:
    """Frames ``[T, H, W, 3]`` (float or uint8; 1 or 4 channels accepted) -> uint8 RGB ``[T, H, W, 3]``."""
    arr = to_uint8(frames, "write_video frames")
    if arr.ndim != 4 or arr.shape[0] == 0 or arr.shape[-1] not in (1, 3, 4):
        raise InputError(f"write_video: frames have shape {tuple(arr.shape)}; expected [T, H, W, 3] with T >= 1",
                         "stack the frames along a new first axis, channels last")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])  # alpha is dropped: video codecs here carry none


def _write_mp4(path: Path, frames: np.ndarray, fps: float) -> None:
    """H.264 MP4 through imageio-ffmpeg; sizes padded to even (edge pixels repeated) as yuv420p requires."""
    import imageio_ffmpeg

    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    writer = imageio_ffmpeg.write_frames(
        str(path), (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264", pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p", macro_block_size=1, quality=8, ffmpeg_log_level="error",
    )
    writer.send(None)  # start the ffmpeg process
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    """Looping GIF through Pillow (identical consecutive frames are merged by the GIF encoder)."""
    pils = [Image.fromarray(f) for f in frames]
    duration_ms = max(int(round(1000.0 / fps)), 20)  # GIF stores centiseconds; browsers clamp below 20 ms
    pils[0].save(path, format="GIF", save_all=True, append_images=pils[1:], duration=duration_ms, loop=0)


def write_video(path: PathLike, frames: ImageLike, fps: float = 24) -> Path:
    """Write frames ``[T, H, W, 3]`` (float in [0, 1] or uint8) as an MP4; returns the path actually written.

    A ``.gif`` path writes a GIF. If ffmpeg is missing or fails, a GIF is written next to ``path``
    (same name, ``.gif`` suffix), a warning is logged and that path is returned.
    """
    path = Path(path)
    if not fps > 0:
        raise InputError(f"write_video: fps must be positive, got {fps}")
    arr = _video_frames(frames)
    if path.suffix.lower() != ".gif":
        try:
            with atomic_write(path) as tmp:
                _write_mp4(tmp, arr, fps)
            return path
        except Exception as e:  # noqa: BLE001 - any ffmpeg failure (missing binary, codec, broken pipe) falls back
            log.warning("writing %s with ffmpeg failed (%s: %s); writing a GIF instead", path, type(e).__name__, e)
            path = path.with_suffix(".gif")
    with atomic_write(path) as tmp:
        _write_gif(tmp, arr, fps)
    return path
