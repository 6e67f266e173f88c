import math

import pytest
import torch

from avatar_core.errors import InputError
from avatar_core.metrics import psnr, ssim


def test_psnr_closed_form():
    a = torch.zeros(2, 8, 8, 3)
    b = a + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)  # MSE 1e-2 and 1e-4
    assert torch.allclose(psnr(b, a), torch.tensor([20.0, 40.0]), atol=1e-4)


def test_ssim_identity_constants_and_degradation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 32, 32, 3, generator=g)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    # Constant images: variances vanish, SSIM = (2 a b + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.3, 0.7, 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(torch.full((1, 16, 16, 1), a, dtype=torch.float64), torch.full((1, 16, 16, 1), b, dtype=torch.float64))
    assert math.isclose(got.item(), expected, rel_tol=1e-9)
    noisy = [ssim((x + s * torch.randn(x.shape, generator=g)).clamp(0, 1), x).mean() for s in (0.02, 0.1, 0.3)]
    assert noisy[0] > noisy[1] > noisy[2]
    assert torch.allclose(ssim(x, noisy_x := x.flip(1)), ssim(noisy_x, x))


def test_metric_input_errors():
    with pytest.raises(InputError, match="shape"):
        psnr(torch.zeros(4, 4, 3), torch.zeros(4, 5, 3))
    with pytest.raises(InputError, match="at least"):
        ssim(torch.zeros(4, 4, 3), torch.zeros(4, 4, 3))
