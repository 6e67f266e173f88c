"""Users' portraits: RGBA of any aspect or RGB + mask, framed like the training portraits; clear errors."""

from __future__ import annotations

import pytest
import torch

from avatar_core.errors import InputError
from avatar_core.io import save_image
from rodinhd.portrait import TOP_MARGIN, frame_portrait, load_user_portrait


def _person(H, W, top, left, width, height):
    """An RGBA image with an opaque coloured rectangle (the 'person') on a transparent background."""
    img = torch.zeros(H, W, 4)
    img[top:top + height, left:left + width] = torch.tensor([0.8, 0.3, 0.1, 1.0])
    return img


def test_framing_puts_the_person_where_the_training_portraits_have_it():
    # A tall full-body-like image: person 40 px wide from row 30 down to the bottom, off-centre to the right.
    img = _person(200, 120, 30, 70, 40, 170)
    framed = frame_portrait(img)
    side = 40
    assert framed.shape == (side, side, 4)
    a = framed[..., 3] > 0.5
    rows = torch.nonzero(a.any(1)).flatten()
    cols = torch.nonzero(a.any(0)).flatten()
    assert int(rows[0]) == round(TOP_MARGIN * side)  # the head's top just below the upper edge
    assert int(cols[0]) == 0 and int(cols[-1]) == side - 1  # shoulders fill the width
    assert int(rows[-1]) == side - 1  # the body runs off the bottom edge
    # Near the top edge the square reaches outside the image: padded with transparent pixels.
    near_top = frame_portrait(_person(100, 100, 0, 30, 40, 100))
    assert near_top.shape == (40, 40, 4) and near_top[:2, :, 3].max() == 0 and near_top[2, :, 3].min() == 1
    # A square image already framed like the dataset's stays as it is.
    ds = _person(64, 64, 3, 0, 64, 61)
    torch.testing.assert_close(frame_portrait(ds), ds)


def test_rgb_with_mask_equals_rgba_and_bad_inputs_get_one_line_errors(tmp_path):
    rgba = _person(90, 60, 10, 10, 40, 80)
    rgba[..., :3] += torch.rand(90, 60, 3) * 0.1  # some colour texture
    rgba = rgba.clamp(0, 1)
    save_image(tmp_path / "p.png", rgba)
    save_image(tmp_path / "rgb.png", rgba[..., :3])
    save_image(tmp_path / "mask.png", rgba[..., 3:].expand(90, 60, 3).contiguous())
    a = load_user_portrait(tmp_path / "p.png")
    b = load_user_portrait(tmp_path / "rgb.png", tmp_path / "mask.png")
    assert a.shape == (40, 40, 4)
    # RGB + mask composites like the RGBA file (the RGB of transparent pixels differs, so compare on white).
    on_white = lambda x: x[..., :3] * x[..., 3:] + (1 - x[..., 3:])  # noqa: E731
    torch.testing.assert_close(on_white(a), on_white(b), atol=1 / 255, rtol=0)
    with pytest.raises(InputError, match="no alpha channel and no mask"):
        load_user_portrait(tmp_path / "rgb.png")
    save_image(tmp_path / "small_mask.png", torch.ones(10, 10, 1))
    with pytest.raises(InputError, match="mask"):
        load_user_portrait(tmp_path / "rgb.png", tmp_path / "small_mask.png")
    save_image(tmp_path / "grey.png", rgba[..., :1])
    with pytest.raises(InputError, match="grayscale"):
        load_user_portrait(tmp_path / "grey.png")
    grey_rgba = rgba.clone()
    grey_rgba[..., :3] = rgba[..., :1]
    save_image(tmp_path / "grey_rgba.png", grey_rgba)
    with pytest.raises(InputError, match="grayscale"):
        load_user_portrait(tmp_path / "grey_rgba.png")
    save_image(tmp_path / "tiny.png", rgba[:20, :20])
    with pytest.raises(InputError, match="only 20x20"):
        load_user_portrait(tmp_path / "tiny.png")
    save_image(tmp_path / "thin.png", _person(90, 60, 10, 10, 8, 80))
    with pytest.raises(InputError, match="8 pixels wide"):
        load_user_portrait(tmp_path / "thin.png")
    save_image(tmp_path / "empty.png", torch.zeros(64, 64, 4))
    with pytest.raises(InputError, match="fully transparent"):
        load_user_portrait(tmp_path / "empty.png")
