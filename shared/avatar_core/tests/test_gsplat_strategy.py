"""gsplat's own densification strategy driven by the kernel rasterizer's meta on the CPU backend."""

from __future__ import annotations

import math
import re

import pytest
import torch
from gsplat.strategy import DefaultStrategy

from avatar_core.render import rasterize_gaussians

W, H = 48, 40
SMALL, LARGE = 0.004, 0.05  # metres; DefaultStrategy duplicates below grow_scale3d * scene_scale, splits above
GROW_SCALE3D = 0.01


def _camera():
    viewmat = torch.eye(4)
    viewmat[2, 3] = 2.5  # camera at z = -2.5 looking down +z at the origin (OpenCV)
    K = torch.tensor([[60.0, 0.0, W / 2], [0.0, 60.0, H / 2], [0.0, 0.0, 1.0]])
    return viewmat[None], K[None]


def _scene(seed=0):
    """16 small and 16 large Gaussians in view, 6 faint ones behind the camera (never seen)."""
    g = torch.Generator().manual_seed(seed)
    n_vis, n_hidden = 32, 6
    means = torch.cat([0.5 * (torch.rand(n_vis, 3, generator=g) - 0.5),
                       torch.tensor([[0.0, 0.0, -4.0]]) + 0.1 * torch.rand(n_hidden, 3, generator=g)])
    scale = torch.tensor([SMALL] * 16 + [LARGE] * 16 + [SMALL] * n_hidden)
    opac = torch.tensor([0.6] * n_vis + [0.01] * n_hidden)  # the hidden ones are below prune_opa
    params = torch.nn.ParameterDict({
        "means": means,
        "quats": torch.randn(n_vis + n_hidden, 4, generator=g),
        "scales": scale.log()[:, None].expand(-1, 3).clone(),
        "opacities": torch.logit(opac),
        "colors": torch.rand(n_vis + n_hidden, 3, generator=g),
    })
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    return params, optimizers, n_vis, n_hidden


def _run(params, optimizers, strategy, steps):
    state = strategy.initialize_state(scene_scale=1.0)
    strategy.check_sanity(params, optimizers)
    viewmats, Ks = _camera()
    target = torch.zeros(1, H, W, 3)
    target[:, H // 4: 3 * H // 4, W // 4: 3 * W // 4] = torch.tensor([0.9, 0.2, 0.1])
    for step in range(steps):
        img, _, meta = rasterize_gaussians(
            params["means"], params["quats"], params["scales"].exp(), torch.sigmoid(params["opacities"]),
            params["colors"], viewmats, Ks, W, H,
        )
        assert meta["backend"].startswith("cpu")
        strategy.step_pre_backward(params, optimizers, state, step, meta)
        loss = (img - target).abs().mean()
        loss.backward()
        strategy.step_post_backward(params, optimizers, state, step, meta, packed=False)
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
    return state


def _strategy(grow_grad2d):
    return DefaultStrategy(
        prune_opa=0.05, grow_grad2d=grow_grad2d, grow_scale3d=GROW_SCALE3D, refine_start_iter=1,
        refine_every=3, refine_stop_iter=100, reset_every=10_000, verbose=True,
    )


def _counts(text):
    """(duplicated, split, pruned) from DefaultStrategy's verbose report of the refinement at step 3."""
    grow = re.search(r"Step 3: (\d+) GSs duplicated, (\d+) GSs split", text)
    prune = re.search(r"Step 3: (\d+) GSs pruned", text)
    return int(grow[1]), int(grow[2]), int(prune[1])


def test_meta_carries_gsplat_keys():
    params, _, _, _ = _scene()
    viewmats, Ks = _camera()
    _, _, meta = rasterize_gaussians(params["means"], params["quats"], params["scales"].exp(),
                                     torch.sigmoid(params["opacities"]), params["colors"], viewmats, Ks, W, H)
    assert meta["width"] == W and meta["height"] == H and meta["n_cameras"] == 1
    assert meta["gaussian_ids"] is None and meta["camera_ids"] is None
    assert meta["radii"].shape == (1, 38, 2) and meta["means2d"].shape == (1, 38, 2)
    assert meta["means2d"].requires_grad


def test_default_strategy_duplicates_splits_and_prunes_on_cpu(capsys):
    """Threshold 0: every Gaussian seen by the camera grows, small ones by a copy, large ones by a split
    (one replaced by two); the never-seen faint ones only get pruned."""
    params, optimizers, n_vis, n_hidden = _scene()
    n0 = len(params["means"])
    _run(params, optimizers, _strategy(grow_grad2d=0.0), steps=4)
    dup, split, pruned = _counts(capsys.readouterr().out)
    assert (dup, split, pruned) == (16, 16, n_hidden)
    assert len(params["means"]) == n0 + 16 + 16 - n_hidden
    # Optimizer state follows the parameters (gsplat's ops rewrite Adam's moments too).
    for k, opt in optimizers.items():
        assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].shape == params[k].shape
    # Split children are 1.6x smaller than their parent (3DGS Sec. 5.2); copies keep their scale.
    sizes = params["scales"].exp().max(-1).values
    assert int(torch.isclose(sizes, torch.tensor(LARGE / 1.6), rtol=0.05).sum()) == 2 * 16
    assert int(torch.isclose(sizes, torch.tensor(SMALL), rtol=0.05).sum()) == 2 * 16


@pytest.mark.parametrize("grow_grad2d, expect", [(math.inf, "none"), ("median", "some")])
def test_default_strategy_gradient_threshold(capsys, grow_grad2d, expect):
    """Above every Gaussian's screen-space gradient nothing grows; at the median, some but not all do."""
    if grow_grad2d == "median":
        params, optimizers, _, _ = _scene()
        state = _run(params, optimizers, _strategy(grow_grad2d=math.inf), steps=3)
        avg = state["grad2d"] / state["count"].clamp_min(1)  # accumulated over steps 0-2
        grow_grad2d = float(avg[state["count"] > 0].median())
        capsys.readouterr()
    params, optimizers, n_vis, n_hidden = _scene()
    _run(params, optimizers, _strategy(grow_grad2d=grow_grad2d), steps=4)
    dup, split, pruned = _counts(capsys.readouterr().out)
    assert pruned == n_hidden
    if expect == "none":
        assert dup == split == 0 and len(params["means"]) == n_vis
    else:
        assert 0 < dup + split < n_vis
