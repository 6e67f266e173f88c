"""HDS: the gradient that reaches the latents equals the paper / official formula on a toy prior."""

import torch

from gaussianip.hds import HDSConditions, hds_step
from gaussianip.prior import FaceIdentity


class ToyPrior(torch.nn.Module):
    """eps = branch value * ones: the text tensor's fill value tells the branch (neg 1, pos 2, null 3)."""

    def __init__(self, values):
        super().__init__()
        self.values = values
        self.register_buffer("alphas_cumprod", torch.linspace(0.9999, 0.01, 1000))
        self.calls = []

    def predict_noise(self, latents, t, text, identity, pose, controlnet_scale=1.0):
        self.calls.append((latents.shape[0], t.tolist()))
        branch = text[:, 0, 0].long()  # 1, 2, 3
        B = latents.shape[0] // 3
        return torch.stack([self.values[int(b)][r % B] for r, b in enumerate(branch)])


def _cond(B, L=3, D=4):
    ident = FaceIdentity(torch.zeros(B, 1, 5))
    return HDSConditions(torch.full((B, L, D), 1.0), torch.full((B, L, D), 2.0), torch.full((B, L, D), 3.0),
                         ident, ident, ident, torch.zeros(B, 3, 8, 8))


def _expected(values, a, t, s=7.5, switch=170, clip=None):
    e_neg, e_pos, e_null = values[1], values[2], values[3]
    d = e_null if t < switch else e_null - e_neg
    g = (1 - a) * (s * (e_pos - e_null) + d)
    if clip is not None:  # one norm per (batch, channel, row), along the width
        for b in range(g.shape[0]):
            for c in range(g.shape[1]):
                for r in range(g.shape[2]):
                    n = float(torch.sqrt((g[b, c, r] ** 2).sum()))
                    if n > clip:
                        g[b, c, r] = g[b, c, r] * clip / n
    return g


def test_gradient_equals_formula_both_regimes():
    B, shape = 2, (2, 4, 3, 5)
    g = torch.Generator().manual_seed(0)
    values = {k: 0.01 * torch.randn(shape, generator=g) for k in (1, 2, 3)}
    prior = ToyPrior(values)
    for t in (100, 600):  # below and above the denoiser switch at 170
        z = torch.randn(shape, requires_grad=True)
        loss, info = hds_step(prior, z, t, _cond(B), clip=None)
        loss.backward()
        a = float(prior.alphas_cumprod[t])
        torch.testing.assert_close(z.grad, _expected(values, a, t) / B)
    assert prior.calls[0] == (3 * B, [100] * (3 * B))  # one call, three branches batched


def test_norm_clip_along_width():
    B, shape = 2, (2, 4, 3, 5)
    g = torch.Generator().manual_seed(1)
    values = {k: 3.0 * torch.randn(shape, generator=g) for k in (1, 2, 3)}
    z = torch.randn(shape, requires_grad=True)
    prior = ToyPrior(values)
    loss, _ = hds_step(prior, z, 400, _cond(B), clip=1.0)
    loss.backward()
    a = float(prior.alphas_cumprod[400])
    torch.testing.assert_close(z.grad, _expected(values, a, 400, clip=1.0) / B)
    assert float((z.grad * B).norm(dim=-1).max()) <= 1.0 + 1e-5
