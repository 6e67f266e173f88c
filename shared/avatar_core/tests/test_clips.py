"""Synthetic clips: a view clip starts at its reference and orbits, a pose clip keeps its camera and follows its
motion, renders agree with the body's silhouette, and clips round-trip through their files."""

from __future__ import annotations

import pytest
import torch

from avatar_core.body import load_body_model
from avatar_core.data.clips import ClipMaker, list_clips, load_clip, write_clips
from avatar_core.data.generate import default_settings
from avatar_core.errors import ConfigError, InputError
from avatar_core.render.conditions import silhouette


@pytest.fixture(scope="module")
def maker():
    return ClipMaker(default_settings(2, 1, 32, 0, "anny", uv_res=64), load_body_model("anny"))


def test_view_clip_starts_at_the_reference_and_orbits(maker):
    clip = maker.make(0, "view", 4)
    torch.testing.assert_close(clip.rgba[0], clip.ref_rgba)
    torch.testing.assert_close(clip.cameras.viewmats[0], clip.ref_camera.viewmats[0])
    c = clip.cameras.centers
    assert float((c[2] + c[0]).norm()) < 1e-4  # frame 2 of 4 is opposite frame 0 about the centred body
    assert bool((clip.pose == clip.ref_pose).all())
    # Alpha is the posed body's silhouette from the kernel's conditioning renderer.
    v = maker.body.forward(shape=clip.shape[None], pose=clip.ref_pose[None], transl=clip.transl[:1]).vertices[0]
    sil = silhouette(v, maker.body, clip.cameras)[..., 0]
    torch.testing.assert_close(clip.rgba[..., 3], sil)
    assert bool(((clip.normals.sum(-1) > 0) == (sil > 0)).all())


def test_pose_clip_keeps_its_camera_and_follows_the_motion(maker):
    clip = maker.make(1, "pose", 3, motion="wave")
    assert bool((clip.cameras.viewmats == clip.ref_camera.viewmats).all())
    assert clip.pose.shape == (3, maker.body.num_joints - 1, 3, 3)
    assert not torch.allclose(clip.rgba[0], clip.rgba[1])
    with pytest.raises(InputError):
        maker.make(1, "pose", 3, motion=torch.zeros(3, 5, 3))
    with pytest.raises(InputError):
        maker.make(1, "dance", 3)


def test_clips_round_trip_through_files(tmp_path):
    root = write_clips(tmp_path / "clips", 1, 2, res=32, uv_res=64, progress=False, motion="walk")
    paths = list_clips(root)
    assert [p.name for p in paths] == ["000000_pose", "000000_view"]
    clip = load_clip(paths[0])
    assert clip.kind == "pose" and clip.rgba.shape == (2, 32, 32, 4) and (paths[0] / "preview.png").is_file()
    with pytest.raises(ConfigError):
        write_clips(tmp_path / "clips", 1, 3, res=32, uv_res=64, progress=False, motion="walk")
