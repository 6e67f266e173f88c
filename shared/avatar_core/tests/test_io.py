"""File I/O: safetensors + JSON metadata, atomic writes, images, grids and videos."""

from __future__ import annotations

import logging

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import avatar_core.io.tensors as tensors_mod
from avatar_core.errors import CorruptFileError, InputError, MissingFileError
from avatar_core.io import (
    atomic_write,
    image_grid,
    load_image,
    load_json,
    load_tensors,
    save_image,
    save_json,
    save_tensors,
    write_video,
)


def test_tensors_round_trip(tmp_path):
    shared = torch.randn(4, 5)
    tensors = {"w": shared, "tied": shared, "half": torch.randn(3).bfloat16(), "idx": torch.arange(7),
               "mask": torch.rand(2, 2) > 0.5, "view": torch.randn(6, 6)[:, 1]}  # a non-contiguous view
    meta = {"step": 12, "config": {"lr": 1e-3, "names": ["a", "b"], "none": None}}
    save_tensors(tmp_path / "t.safetensors", tensors, meta)
    loaded, loaded_meta = load_tensors(tmp_path / "t.safetensors")
    assert loaded_meta == meta
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    # A file written by other tools gives its raw string metadata.
    save_file({"x": torch.ones(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    assert load_tensors(tmp_path / "other.safetensors")[1] == {"format": "pt"}
    with pytest.raises(InputError, match="JSON"):
        save_tensors(tmp_path / "bad.safetensors", tensors, {"obj": object()})


def test_truncated_and_missing_safetensors(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_tensors(path, {"a": torch.randn(100)}, {"step": 1})
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 6):
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptFileError, match="ckpt.safetensors") as err:
            load_tensors(path)
        assert "previous checkpoint" in str(err.value)
    with pytest.raises(MissingFileError):
        load_tensors(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):  # MissingFileError is also the builtin kind
        load_tensors(tmp_path / "nope.safetensors")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    save_json(path, {"version": 1})
    with pytest.raises(RuntimeError, match="disk died"):
        with atomic_write(path) as tmp:
            tmp.write_text('{"version": 2, "trunc')  # half of the new content, then a crash
            raise RuntimeError("disk died")
    assert load_json(path) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp file left behind

    # Same for a safetensors writer failing after writing part of the file.
    st = tmp_path / "w.safetensors"
    save_tensors(st, {"a": torch.zeros(3)})

    def half_write(data, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00")
        raise OSError("no space left on device")

    monkeypatch.setattr(tensors_mod, "save_file", half_write)
    with pytest.raises(OSError, match="no space"):
        save_tensors(st, {"a": torch.ones(3)})
    assert torch.equal(load_tensors(st)[0]["a"], torch.zeros(3))

    path.write_text("{not json")
    with pytest.raises(CorruptFileError, match="state.json"):
        load_json(path)


def test_images_round_trip_and_errors(tmp_path):
    rgba = torch.rand(9, 11, 4)
    save_image(tmp_path / "a.png", rgba)
    back = load_image(tmp_path / "a.png")
    assert back.shape == (9, 11, 4) and back.dtype == torch.float32
    assert (back - rgba).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit quantisation only
    grey = (torch.rand(5, 6, 1) * 255).to(torch.uint8)
    save_image(tmp_path / "g.png", grey)
    assert torch.equal((load_image(tmp_path / "g.png") * 255).round().to(torch.uint8), grey)
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    with pytest.raises(CorruptFileError, match="junk.png"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(MissingFileError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="channels-last"):
        save_image(tmp_path / "chw.png", torch.rand(3, 8, 8))


def test_image_grid_layout():
    imgs = torch.stack([torch.full((2, 3, 3), float(k) / 10) for k in range(5)])  # [5, 2, 3, 3]
    grid = image_grid(imgs, nrow=3, padding=1, pad_value=1.0)
    assert grid.shape == (1 + 2 * 3, 1 + 3 * 4, 3)
    for k in range(5):
        r, c = divmod(k, 3)
        y, x = 1 + r * 3, 1 + c * 4
        assert torch.equal(grid[y:y + 2, x:x + 3], imgs[k])
    assert torch.all(grid[0] == 1.0) and torch.all(grid[4:7, 9:12] == 1.0)  # border and the empty sixth cell


def _moving_gradient(t: int, h: int, w: int) -> torch.Tensor:
    """Smooth frames (video codecs keep them well): a colour gradient sliding right by 2 px per frame."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    frames = [torch.stack([(xs + 0.05 * i) % 1.0 * 0.8, ys * 0.8, 0.5 * torch.ones_like(xs)], -1) for i in range(t)]
    return torch.stack(frames)  # [T, H, W, 3]


def test_write_video_mp4(tmp_path):
    frames = _moving_gradient(7, 33, 45)  # odd sizes: padded to 34 x 46 for yuv420p
    out = write_video(tmp_path / "turntable.mp4", frames, fps=10)
    assert out == tmp_path / "turntable.mp4"
    with imageio.get_reader(out, format="FFMPEG") as reader:
        assert reader.get_meta_data()["fps"] == 10
        back = np.stack(list(reader.iter_data()))
    assert back.shape == (7, 34, 46, 3)
    err = np.abs(back[:, :33, :45].astype(np.float32) / 255 - frames.numpy()).mean()
    assert err < 0.03, err


def test_write_video_falls_back_to_gif(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "no-ffmpeg-here"))
    frames = (_moving_gradient(5, 16, 20) * 255).round().to(torch.uint8)
    with caplog.at_level(logging.WARNING, logger="avatar_core.io.media"):
        out = write_video(tmp_path / "turntable.mp4", frames, fps=12)
    assert out == tmp_path / "turntable.gif"
    assert "GIF" in caplog.text
    assert not (tmp_path / "turntable.mp4").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["turntable.gif"]
    back = imageio.mimread(out)
    assert len(back) == 5 and back[0].shape[:2] == (16, 20)
