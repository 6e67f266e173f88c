"""Turntables: orbit order and image orientation, rendered by the Gaussian rasterizer and the volume renderer."""

import torch

from avatar_core.render.turntable import gaussian_render_fn, turntable, volume_render_fn


def test_gaussian_turntable_orientation_and_video(tmp_path):
    # A red Gaussian at the target and a blue one on +X (the body's left side).
    means = torch.tensor([[0.0, 0.0, 0.0], [0.4, 0.0, 0.0]])
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2)
    scales = torch.full((2, 3), 0.06)
    opacities = torch.tensor([0.95, 0.95])
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    render = gaussian_render_fn(means, quats, scales, opacities, colors, background=(1.0, 1.0, 1.0))
    frames = turntable(render, num_frames=4, radius=2.0, fov_deg=40, width=48, height=48, batch_size=3,
                       path=tmp_path / "turn.mp4", fps=4)
    assert frames.shape == (4, 48, 48, 3)
    # Red stays at the image centre, except at azimuth 90 (camera on +X) where blue is in front of it.
    centre = frames[:, 23:25, 23:25].mean(dim=(1, 2))
    red, blue = centre[:, 0] - centre[:, 2], centre[:, 2] - centre[:, 0]
    assert bool((red[[0, 2, 3]] > 0.7).all()) and blue[1] > 0.7

    def blue_column(img):
        blue = (img[..., 2] - img[..., 0]).clamp_min(0)
        cols = torch.arange(48, dtype=torch.float32) + 0.5
        return (blue.sum(0) * cols).sum() / blue.sum()

    assert blue_column(frames[0]) > 30  # front view: +X on the image's right
    assert blue_column(frames[2]) < 18  # back view: on the left
    written = list(tmp_path.iterdir())
    assert len(written) == 1 and written[0].stat().st_size > 0


def test_volume_turntable_sees_the_ball():
    def field(x, d):
        return torch.tensor([0.1, 0.8, 0.2]).expand(x.shape[0], 3), 30.0 * (x.norm(dim=-1) < 0.4).float()

    render = volume_render_fn(field, near=1.0, far=3.0, background=(0.0, 0.0, 0.0), num_samples=32)
    frames = turntable(render, num_frames=2, radius=2.0, width=16, height=16)
    assert frames.shape == (2, 16, 16, 3)
    torch.testing.assert_close(frames[:, 8, 8], torch.tensor([0.1, 0.8, 0.2]).expand(2, 3), atol=1e-3, rtol=0)
    assert frames[:, 0, 0].abs().max() == 0
