"""mip-NeRF 360's distortion loss (avatar_core.render.compositing.distortion_loss) against its definition."""

import torch

from avatar_core.render.compositing import distortion_loss


def _definition(w, t0, t1):  # the double sum of Barron et al. 2022, Eq. 15, written out for one ray
    m = (t0 + t1) / 2
    total = 0.0
    for i in range(len(w)):
        for j in range(len(w)):
            total += float(w[i] * w[j] * abs(m[i] - m[j]))
        total += float(w[i] ** 2 * (t1[i] - t0[i])) / 3
    return total


def test_distortion_loss_matches_the_double_sum_batched_and_packed():
    g = torch.Generator().manual_seed(0)
    edges = torch.sort(torch.rand(3, 8, generator=g) * 4, dim=-1).values
    t0, t1 = edges[:, :-1], edges[:, 1:]
    w = torch.rand(3, 7, generator=g) / 7
    got = distortion_loss(w, t0, t1)
    for r in range(3):
        assert abs(float(got[r]) - _definition(w[r], t0[r], t1[r])) < 1e-5
    # Packed: rays of 7, 3 and 5 samples.
    lengths = [7, 3, 5]
    ridx = torch.cat([torch.full((n,), r) for r, n in enumerate(lengths)])
    pw = torch.cat([w[r, :n] for r, n in enumerate(lengths)])
    p0 = torch.cat([t0[r, :n] for r, n in enumerate(lengths)])
    p1 = torch.cat([t1[r, :n] for r, n in enumerate(lengths)])
    packed = distortion_loss(pw, p0, p1, ridx, n_rays=4)
    assert packed.shape == (4,) and float(packed[3]) == 0.0
    for r, n in enumerate(lengths):
        assert abs(float(packed[r]) - _definition(w[r, :n], t0[r, :n], t1[r, :n])) < 1e-5


def test_distortion_loss_closed_forms():
    # One interval of length d holding weight w: w^2 d / 3.
    assert abs(float(distortion_loss(torch.tensor([[0.6]]), torch.tensor([[1.0]]), torch.tensor([[1.5]]))[0])
               - 0.36 * 0.5 / 3) < 1e-7
    # Two point-like intervals a distance D apart, weights a and b: 2 a b D (plus their vanishing self terms).
    t0, t1 = torch.tensor([[0.0, 2.0]]), torch.tensor([[1e-6, 2.0 + 1e-6]])
    got = float(distortion_loss(torch.tensor([[0.3, 0.5]]), t0, t1)[0])
    assert abs(got - 2 * 0.3 * 0.5 * 2.0) < 1e-5
    # Concentrating the same total weight in one interval lowers it (what the loss rewards).
    t0, t1 = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[1.0, 2.0, 3.0]])
    spread = distortion_loss(torch.tensor([[1 / 3, 1 / 3, 1 / 3]]), t0, t1)
    peaked = distortion_loss(torch.tensor([[0.0, 1.0, 0.0]]), t0, t1)
    assert peaked < spread
