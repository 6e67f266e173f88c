"""avatar_core.render.rasterize_gaussians against gsplat's PyTorch reference and a dense renderer."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics

from avatar_core.errors import BackendUnavailableError, InputError
from avatar_core.render import _gaussians_cpu
from avatar_core.render._gaussians_dense import render_dense
from avatar_core.render.gaussians import rasterize_gaussians

W, H = 40, 32
KERNELS = [pytest.param(True, id="kernel"), pytest.param(False, id="torch")]


def look_at(eye, target=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """OpenCV world-to-camera matrix of a camera at ``eye`` looking at ``target`` with +y world up."""
    eye, target = torch.tensor(eye, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)
    fwd = (target - eye) / (target - eye).norm()
    right = torch.linalg.cross(fwd, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    right = right / right.norm()
    R = torch.stack([right, torch.linalg.cross(fwd, right), fwd])
    M = torch.eye(4, dtype=torch.float64)
    M[:3, :3] = R
    M[:3, 3] = -R @ eye
    return M


def make_scene(n=200, n_cams=3, seed=0, sh_degree=None, dtype=torch.float32, scale=(0.01, 0.09)):
    """Random Gaussians in a 1 m blob seen by cameras on a circle of radius 2.5 m (one off-centre)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * 0.4
    quats = torch.randn(n, 4, generator=g)
    scales = scale[0] + (scale[1] - scale[0]) * torch.rand(n, 3, generator=g)
    opacities = 0.05 + 0.9 * torch.rand(n, generator=g)
    if sh_degree is None:
        colors = torch.rand(n, 3, generator=g)
    else:
        colors = 0.3 * torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g)
    angles = torch.linspace(0.0, 2.0, n_cams).tolist()
    viewmats = torch.stack([look_at((2.5 * math.sin(a), 0.3, 2.5 * math.cos(a)), (0.1 * a, 0.0, 0.0)) for a in angles])
    Ks = torch.tensor([[50.0, 0.0, W / 2], [0.0, 52.0, H / 2 - 1.5], [0.0, 0.0, 1.0]]).expand(n_cams, 3, 3).clone()
    return [t.to(dtype) for t in (means, quats, scales, opacities, colors, viewmats, Ks)]


@pytest.fixture(scope="module", autouse=True)
def kernel_built():
    """Build (or load) the compiled rasterizer once; the tests below need it."""
    assert _gaussians_cpu.load_kernel() is not None, "the C++ rasterizer failed to build"


def test_projection_matches_gsplat_torch_impl():
    means, quats, scales, _, _, viewmats, Ks = make_scene(n=300, n_cams=4, dtype=torch.float64)
    means[:20, 2] += 3.0  # some Gaussians behind / beside the cameras, culled by both
    for aa in (False, True):
        ours = _gaussians_cpu.project_gaussians(means, quats, scales, viewmats, Ks, W, H, 0.3, 0.01, 1e10, aa)
        covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
        ref = _fully_fused_projection(means, covars, viewmats, Ks, W, H, 0.3, 0.01, 1e10, calc_compensations=aa)
        torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=0)  # radii, exactly
        valid = (ref[0] > 0).all(-1)
        assert 0 < int(valid.sum()) < valid.numel()
        for a, b in zip(ours[1:], ref[1:]):
            if b is not None:
                torch.testing.assert_close(a[valid], b[valid])
        assert torch.isfinite(ours[1]).all() and torch.isfinite(ours[3]).all()


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_matches_gsplat_torch_impl(degree):
    g = torch.Generator().manual_seed(degree)
    dirs = torch.randn(50, 3, generator=g, dtype=torch.float64) * 3.0
    coeffs = torch.randn(50, 16, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_gaussians_cpu.eval_sh(degree, dirs, coeffs), _spherical_harmonics(degree, dirs, coeffs))


IMAGE_CASES = [("RGB", 3, True, False), ("RGB+ED", 1, True, False), ("D", None, False, False),
               ("ED", 2, False, True), ("RGB+D", None, True, True)]


# The PyTorch fallback (slower) is checked on the first two cases only.
@pytest.mark.parametrize(
    "use_kernel,mode,sh_degree,background,aa",
    [(True, *c) for c in IMAGE_CASES] + [(False, *c) for c in IMAGE_CASES[:2]],
)
def test_images_match_dense_reference(use_kernel, mode, sh_degree, background, aa):
    scene = make_scene(n=600, n_cams=3, seed=1, sh_degree=sh_degree)
    bgs = torch.rand(3, 3, generator=torch.Generator().manual_seed(5)) if background else None
    rmode = "antialiased" if aa else "classic"
    ours, alpha, meta = _gaussians_cpu.rasterize_cpu(
        *scene, W, H, 0.01, 1e10, 0.3, sh_degree, bgs, mode, rmode, use_kernel=use_kernel
    )
    ref, ref_alpha, _ = render_dense(*scene, W, H, sh_degree=sh_degree, backgrounds=bgs, render_mode=mode,
                                     rasterize_mode=rmode)
    assert ours.shape == ref.shape and alpha.shape == (3, H, W, 1)
    assert 0.05 < float(alpha.mean()) < 0.95  # a scene with both coverage and holes
    if not aa:
        assert float(alpha.max()) > 1 - 2e-4  # some pixels reach the transmittance stop
    # Colours to 1e-4 absolute; depth channels (~2.5 m) to 1e-4 relative.
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alpha, ref_alpha, rtol=0, atol=1e-4)
    assert meta["radii"].shape == (3, 600, 2) and meta["means2d"].shape == (3, 600, 2)


@pytest.mark.parametrize("use_kernel", KERNELS)
def test_gradients_match_dense_reference(use_kernel):
    scene = make_scene(n=150, n_cams=2, seed=2, sh_degree=3)
    bgs = torch.rand(2, 3, generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(7)
    w_img, w_alpha = torch.rand(2, H, W, 4, generator=g), torch.rand(2, H, W, 1, generator=g)
    grads = []
    for which in ("ours", "dense"):
        xs = [t.clone().requires_grad_(True) for t in scene]
        bg = bgs.clone().requires_grad_(True)
        if which == "ours":
            img, alpha, meta = rasterize_gaussians(*xs, W, H, sh_degree=3, backgrounds=bg, render_mode="RGB+ED") \
                if use_kernel else _gaussians_cpu.rasterize_cpu(
                    *xs, W, H, 0.01, 1e10, 0.3, 3, bg, "RGB+ED", "classic", use_kernel=False)
            means2d = meta["means2d"]
        else:
            img, alpha, means2d = render_dense(*xs, W, H, sh_degree=3, backgrounds=bg, render_mode="RGB+ED")
            means2d.retain_grad()
        ((img * w_img).sum() + (alpha * w_alpha).sum()).backward()
        grads.append([x.grad for x in xs] + [bg.grad, means2d.grad])
    names = ("means", "quats", "scales", "opacities", "sh", "viewmats", "Ks", "backgrounds", "means2d")
    for name, a, b in zip(names, *grads):
        assert a is not None and torch.isfinite(a).all(), name
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()), msg=name)


def test_kernel_backward_passes_gradcheck():
    """Hand-written backward of the compiled compositor against finite differences in float64."""
    means, quats, scales, _, _, viewmats, Ks = make_scene(n=6, n_cams=2, seed=3, dtype=torch.float64, scale=(0.05, 0.15))
    _, means2d, depths, conics, _ = _gaussians_cpu.project_gaussians(means, quats, scales, viewmats, Ks, W, H)
    g = torch.Generator().manual_seed(4)
    colors = torch.rand(2, 6, 4, generator=g, dtype=torch.float64)
    opac = 0.2 + 0.6 * torch.rand(2, 6, generator=g, dtype=torch.float64)
    valid = torch.ones(2, 6, dtype=torch.bool)

    def fn(m2d, con, col, op):
        img, alpha = _gaussians_cpu.rasterize_projected(m2d, con, col, op, depths, valid, W, H, use_kernel=True)
        return img, alpha

    inputs = [t.detach().clone() for t in (means2d, conics, colors, opac)]
    assert float(fn(*inputs)[1].max()) > 0.3
    # One input at a time: in fast mode a joint check lets the largest gradients (conics) hide
    # errors in the smaller ones.
    for k in range(len(inputs)):
        def fn_k(x, k=k):
            return fn(*inputs[:k], x, *inputs[k + 1 :])

        assert torch.autograd.gradcheck(fn_k, (inputs[k].clone().requires_grad_(True),), eps=1e-6, atol=1e-7,
                                        rtol=1e-4, fast_mode=True)


def test_means2d_gradient_is_retained_for_densification():
    scene = make_scene(n=100, n_cams=2, seed=8)
    xs = [t.clone().requires_grad_(True) for t in scene]
    img, _, meta = rasterize_gaussians(*xs, W, H)
    img.sum().backward()
    grad = meta["means2d"].grad
    assert grad is not None and grad.shape == (2, 100, 2)
    visible = (meta["radii"] > 0).all(-1)
    assert grad[visible].abs().sum() > 0 and grad[~visible].abs().sum() == 0


def test_empty_and_culled_scenes_render_background():
    means, quats, scales, opac, colors, _, Ks = make_scene(n=50, n_cams=2, seed=9)
    bgs = torch.tensor([[0.1, 0.2, 0.3], [1.0, 0.5, 0.0]])
    # Two cameras at z = 2.5 looking towards -z; every Gaussian sits at z > 4, behind both.
    viewmats = torch.stack([look_at((0.0, 0.3, 2.5)), look_at((0.6, 0.0, 2.5))]).float()
    behind = means * 0.3 + torch.tensor([0.0, 0.0, 4.5])
    xs = [t.clone().requires_grad_(True) for t in (behind, quats, scales, opac, colors)]
    for n, inputs in ((50, xs), (0, [t[:0].detach().clone().requires_grad_(True) for t in xs])):
        img, alpha, meta = rasterize_gaussians(*inputs, viewmats, Ks, W, H, backgrounds=bgs)
        torch.testing.assert_close(img, bgs[:, None, None, :].expand(2, H, W, 3))
        assert alpha.abs().max() == 0 and meta["radii"].shape == (2, n, 2) and (meta["radii"] == 0).all()
        img.sum().backward()  # backward through an empty image must work too
        assert all(x.grad is None or torch.isfinite(x.grad).all() for x in inputs)


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda s: s.update(quats=s["quats"][:-1]), "quats"),
        (lambda s: s.update(colors=s["colors"][:, :2].T), "colors"),
        (lambda s: s.update(Ks=s["Ks"][:1]), "Ks"),
        (lambda s: s.update(means=s["means"].clone().index_fill_(0, torch.tensor([3]), float("nan"))), "NaN"),
        (lambda s: s.update(viewmats=s["viewmats"].clone().fill_(float("inf"))), "NaN or infinite"),
        (lambda s: s.update(scales=s["scales"].clone().index_fill_(0, torch.tensor([1]), 0.0)), "scale"),
        (lambda s: s.update(scales=-s["scales"]), "scale"),
        (lambda s: s.update(opacities=s["opacities"] + 1.0), "opacities"),
        (lambda s: s.update(quats=s["quats"].double()), "dtype"),
        (lambda s: s.update(width=0), "width"),
        (lambda s: s.update(render_mode="RGBD"), "render_mode"),
        (lambda s: s.update(sh_degree=4), "sh_degree"),
        (lambda s: s.update(backgrounds=torch.zeros(2, 4)), "backgrounds"),
    ],
)
def test_bad_input_raises_input_error(change, needle):
    names = ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")
    args = dict(zip(names, make_scene(n=20, n_cams=2, seed=10)), width=W, height=H)
    change(args)
    with pytest.raises(InputError, match=needle):
        rasterize_gaussians(**args)


def test_gsplat_backend_on_cpu_says_why():
    with pytest.raises(BackendUnavailableError, match="GPU"):
        rasterize_gaussians(*make_scene(n=10, n_cams=1), W, H, backend="gsplat")


def test_build_failure_falls_back_to_pytorch(monkeypatch, caplog):
    def broken():
        raise RuntimeError("no compiler")

    scene = make_scene(n=80, n_cams=2, seed=11)
    expected, _, _ = rasterize_gaussians(*scene, W, H)
    monkeypatch.setattr(_gaussians_cpu, "_compile_kernel", broken)
    monkeypatch.setattr(_gaussians_cpu, "_kernel", None)
    monkeypatch.setattr(_gaussians_cpu, "_kernel_tried", False)
    with caplog.at_level(logging.WARNING):
        img, _, meta = rasterize_gaussians(*scene, W, H)
    assert "no compiler" in caplog.text and meta["backend"] == "cpu-torch"
    torch.testing.assert_close(img, expected, rtol=0, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat's rasterizer needs a CUDA GPU")
def test_cpu_backend_matches_gsplat_on_cuda():
    scene = make_scene(n=400, n_cams=3, seed=12, sh_degree=2)
    bgs = torch.rand(3, 3)
    outs = []
    for device, backend in (("cpu", "torch"), ("cuda", "gsplat")):
        xs = [t.to(device).requires_grad_(True) for t in scene]
        img, alpha, meta = rasterize_gaussians(*xs, W, H, sh_degree=2, backgrounds=bgs.to(device),
                                               render_mode="RGB+ED", backend=backend)
        (img.sum() + alpha.sum()).backward()
        outs.append([img, alpha, meta["radii"]] + [x.grad for x in xs[:5]])
    cpu, gpu = outs
    torch.testing.assert_close(cpu[0], gpu[0].cpu(), rtol=0, atol=1e-3)
    torch.testing.assert_close(cpu[1], gpu[1].cpu(), rtol=0, atol=1e-4)
    for a, b in zip(cpu[3:], gpu[3:]):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-2, atol=1e-2 * float(b.abs().max()))
