"""Volume rendering, triplane sampling and the occupancy grid, against closed forms and nerfacc."""

import math

import pytest
import torch
from nerfacc import OccGridEstimator
from nerfacc.grid import _ray_aabb_intersect
from nerfacc.volrend import render_weight_from_density

from avatar_core.cameras import orbit_cameras
from avatar_core.render.compositing import packed_exclusive_sum, render_weights
from avatar_core.render.estimators import RayEstimator
from avatar_core.render.occupancy import OccupancyGrid, fill_occupancy_grid, occupancy_estimator
from avatar_core.render.rays import generate_rays
from avatar_core.render.triplane_sampling import sample_triplane
from avatar_core.render.volume import render_rays


def test_constant_density_slab_matches_closed_form():
    """Rays along -Z through a slab z in [-0.5, 0.5] of density sigma: T(t) = exp(-sigma (t - a))."""
    sigma, colour, bg = 3.0, torch.tensor([0.2, 0.6, 0.9]), torch.tensor([1.0, 0.0, 0.5])

    def field(x, d):
        inside = (x[:, 2].abs() <= 0.5).float()
        return colour.expand(x.shape[0], 3), sigma * inside

    rays_o = torch.tensor([[0.0, 0.0, 2.0], [0.3, -0.2, 2.0]])
    rays_d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    # 100 bins over [1, 3]: the slab [1.5, 2.5] starts and ends on bin edges.
    out = render_rays(field, rays_o, rays_d, near=1.0, far=3.0, num_samples=100, background=bg)
    opacity = 1 - math.exp(-sigma * 1.0)
    torch.testing.assert_close(out.opacity, torch.full((2, 1), opacity))
    torch.testing.assert_close(out.rgb, (colour * opacity + bg * (1 - opacity)).expand(2, 3))
    t0 = out.t_starts[0]
    dt = 0.02
    inside = (t0 >= 1.5 - 1e-6) & (t0 < 2.5 - 1e-6)
    trans = torch.where(inside, torch.exp(-sigma * (t0 - 1.5)), torch.where(t0 < 1.5, 1.0, math.exp(-sigma)))
    weights = torch.where(inside, trans * (1 - math.exp(-sigma * dt)), 0.0)
    torch.testing.assert_close(out.weights[0], weights, atol=1e-6, rtol=1e-5)
    depth = (weights * (t0 + dt / 2)).sum() / weights.sum()
    torch.testing.assert_close(out.depth[0, 0], depth)


def test_packed_weights_equal_nerfacc_batched_with_gradients():
    """The CPU packed path (own segmented scan) equals nerfacc's batched volrend on padded samples."""
    g = torch.Generator().manual_seed(0)
    counts = [5, 0, 9, 1, 7]
    S = max(counts)
    t_pad = torch.cumsum(torch.rand(len(counts), S + 1, generator=g, dtype=torch.float64) * 0.2, dim=1)
    sig_pad = torch.rand(len(counts), S, generator=g, dtype=torch.float64) * 5
    valid = torch.arange(S)[None] < torch.tensor(counts)[:, None]
    sig_pad = torch.where(valid, sig_pad, 0.0).requires_grad_(True)
    w_ref, tr_ref, _ = render_weight_from_density(t_pad[:, :-1], t_pad[:, 1:], sig_pad)
    loss_ref = (w_ref * torch.linspace(0, 1, S, dtype=torch.float64)).sum() + tr_ref[valid].sum()
    (g_ref,) = torch.autograd.grad(loss_ref, sig_pad)

    sig_packed = sig_pad.detach()[valid].clone().requires_grad_(True)
    ray_indices = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    w, tr, _ = render_weights(t_pad[:, :-1][valid], t_pad[:, 1:][valid], sig_packed, ray_indices, len(counts))
    torch.testing.assert_close(w, w_ref[valid])
    torch.testing.assert_close(tr, tr_ref[valid])
    loss = (w * torch.linspace(0, 1, S, dtype=torch.float64).expand(len(counts), S)[valid]).sum() + tr.sum()
    (g_packed,) = torch.autograd.grad(loss, sig_packed)
    torch.testing.assert_close(g_packed, g_ref[valid])


def test_packed_scan_keeps_small_rays_exact_after_a_huge_one():
    """A ray's optical depth must not be rounded against the optical depths of the rays before it."""
    ray_indices = torch.tensor([0, 0, 0, 1, 1, 1])
    values = torch.tensor([1e12, 1e12, 1e12, 1e-3, 2e-3, 3e-3])
    excl = packed_exclusive_sum(values, ray_indices)
    torch.testing.assert_close(excl[3:], torch.tensor([0.0, 1e-3, 3e-3]))
    torch.testing.assert_close(excl[:3], torch.tensor([0.0, 1e12, 2e12]))


@pytest.mark.parametrize("align_corners", [False, True])
def test_triplane_sampling_equals_manual_bilinear(align_corners):
    g = torch.Generator().manual_seed(1)
    B, C, H, W = 2, 4, 6, 8
    planes = torch.randn(B, 3, C, H, W, generator=g, dtype=torch.float64)
    points = (torch.rand(B, 10, 3, generator=g, dtype=torch.float64) * 2 - 1) * 0.8
    feats = sample_triplane(planes, points, align_corners=align_corners)
    assert feats.shape == (B, 10, 3, C)

    def bilinear(img, u, v):  # img [C, H, W]; u along width, v along height, both in [-1, 1]
        if align_corners:
            x, y = (u + 1) / 2 * (W - 1), (v + 1) / 2 * (H - 1)
        else:
            x, y = ((u + 1) * W - 1) / 2, ((v + 1) * H - 1) / 2
        x0, y0 = math.floor(x), math.floor(y)
        fx, fy = x - x0, y - y0
        at = lambda yy, xx: img[:, min(max(yy, 0), H - 1), min(max(xx, 0), W - 1)]  # noqa: E731
        return ((1 - fx) * (1 - fy) * at(y0, x0) + fx * (1 - fy) * at(y0, x0 + 1)
                + (1 - fx) * fy * at(y0 + 1, x0) + fx * fy * at(y0 + 1, x0 + 1))

    for b in range(B):
        for n in range(10):
            x, y, z = points[b, n].tolist()
            for p, (u, v) in enumerate([(x, y), (x, z), (y, z)]):  # xy, xz, yz
                torch.testing.assert_close(feats[b, n, p], bilinear(planes[b, p], u, v))
    torch.testing.assert_close(sample_triplane(planes, points, "sum", align_corners), feats.sum(2))
    torch.testing.assert_close(sample_triplane(planes, points, "concat", align_corners), feats.reshape(B, 10, 3 * C))


def _sphere_density(x):  # empty outside radius 0.5, smooth inside
    return 40.0 * torch.clamp(1 - (x.norm(dim=-1) / 0.5) ** 2, min=0) ** 2


def test_skipping_on_and_off_agree_and_halve_samples():
    torch.manual_seed(0)
    planes = torch.randn(1, 3, 4, 16, 16) * 0.5

    def field(x, d):  # colour from a triplane, density of a ball
        f = sample_triplane(planes, x[None], reduce="sum")[0]
        return torch.sigmoid(f[:, :3]), _sphere_density(x)

    cams = orbit_cameras(2, radius=2.5, elevation_deg=20, fov_deg=40, width=40, height=40)
    o, d = generate_rays(cams)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    near, far, S = 1.0, 4.0, 64
    dense = render_rays(field, o, d, near, far, num_samples=S)
    grid = occupancy_estimator([-1, -1, -1, 1, 1, 1], resolution=32, device="cpu")
    assert isinstance(grid, OccupancyGrid)
    step = (far - near) / S
    fill_occupancy_grid(grid, lambda x: _sphere_density(x) * step, num_updates=16, dilate=1)
    skipped = render_rays(field, o, d, near, far, num_samples=S, estimator=grid)
    assert dense.opacity.max() > 0.9  # the ball is actually seen
    torch.testing.assert_close(skipped.rgb, dense.rgb, atol=1e-3, rtol=0)
    torch.testing.assert_close(skipped.opacity, dense.opacity, atol=1e-3, rtol=0)
    assert skipped.num_evaluated <= dense.num_evaluated / 2
    # Gradients reach the triplane through the packed path too.
    planes.requires_grad_(True)
    seen = dense.opacity[:, 0] > 0.5
    render_rays(field, o[seen], d[seen], near, far, num_samples=S, estimator=grid).rgb.sum().backward()
    assert planes.grad is not None and planes.grad.abs().sum() > 0


def test_update_rule_matches_nerfacc_occ_grid_estimator():
    """nerfacc's update path is pure PyTorch: run both on the same seeds through warm-up and mixed updates."""
    aabb = [-1.0, -0.5, -1.0, 1.0, 1.5, 1.0]
    ref = OccGridEstimator(aabb, resolution=[12, 16, 12], levels=2)
    ours = OccupancyGrid(aabb, resolution=[12, 16, 12], levels=2)
    cams = orbit_cameras(3, radius=3.0, fov_deg=30, width=32, height=32, target=(0.0, 0.5, 0.0))
    for est in (ref, ours):
        est.mark_invisible_cells(cams.Ks, cams.c2w, 32, 32, near_plane=0.5)
    assert torch.equal(ref.occs, ours.occs) and bool((ours.occs < 0).any())

    def occ_fn(x):
        return (_sphere_density(x - torch.tensor([0.0, 0.5, 0.0])) * 0.01)[:, None]

    for est in (ref, ours):
        torch.manual_seed(7)
        for step in range(40):
            est.update_every_n_steps(step, occ_fn, occ_thre=0.01, ema_decay=0.9, warmup_steps=12, n=4)
    assert torch.equal(ref.occs, ours.occs)
    assert torch.equal(ref.binaries, ours.binaries)
    assert 0 < ours.binaries.sum() < ours.binaries.numel()
    ours.eval()
    with pytest.raises(RuntimeError):
        ours.update_every_n_steps(0, occ_fn)


@pytest.mark.parametrize("cone_angle", [0.0, 0.05])
def test_marcher_contract_on_full_grid(cone_angle):
    """All cells occupied: samples are the marching lattice restricted to the box, grouped by ray."""
    grid = OccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=8)
    grid.binaries.fill_(True)
    g = torch.Generator().manual_seed(2)
    o = torch.randn(50, 3, generator=g) * 0.3 + torch.tensor([0.0, 0.0, 3.0])
    d = torch.nn.functional.normalize(torch.randn(50, 3, generator=g) * 0.2 + torch.tensor([0.0, 0.0, -1.0]), dim=-1)
    step, near = 0.05, 0.5
    ridx, ts, te = grid.sampling(o, d, near_plane=near, far_plane=10.0, render_step_size=step, cone_angle=cone_angle)
    assert bool((ridx[1:] >= ridx[:-1]).all())
    expected_dt = torch.clamp(ts * cone_angle, min=step)
    torch.testing.assert_close(te - ts, expected_dt, atol=1e-5, rtol=1e-4)
    mid = o[ridx] + d[ridx] * ((ts + te) / 2)[:, None]
    assert bool((mid.abs() <= 1 + 1e-5).all())
    for r in range(50):  # each ray's samples are consecutive lattice cells covering the box crossing
        t_r = ts[ridx == r]
        if t_r.numel() > 1:
            gaps = t_r[1:] - te[ridx == r][:-1]
            assert gaps.abs().max() < 1e-4
    if cone_angle == 0:
        # Exactly the lattice points near + (k + 1/2) step inside nerfacc's ray-box intersection.
        lattice = (ts - near) / step
        torch.testing.assert_close(lattice, lattice.round(), atol=1e-3, rtol=0)
        t_min, t_max, hit = _ray_aabb_intersect(o, d, torch.tensor([[-1.0, -1, -1, 1, 1, 1]]))
        k = torch.arange(200)
        mids = near + (k + 0.5) * step
        expected = ((mids[None] >= t_min) & (mids[None] < t_max) & hit).sum(1)
        assert torch.equal(torch.bincount(ridx, minlength=50), expected)
        assert 0 < (expected == 0).sum() < 50  # some rays miss the box, most hit it


def test_marcher_reads_the_finest_level_containing_each_point():
    grid = OccupancyGrid([-0.5, -0.5, -0.5, 0.5, 0.5, 0.5], resolution=8, levels=2)  # level 1 spans [-1, 1]^3
    o = torch.tensor([[0.0, 0.0, 3.0], [0.3, -0.2, 3.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    for inner in (True, False):
        grid.binaries.zero_()
        grid.binaries[0 if inner else 1] = True
        ridx, ts, te = grid.sampling(o, d, near_plane=0.0, render_step_size=0.01)
        z = (o[ridx] + d[ridx] * ((ts + te) / 2)[:, None])[:, 2]
        if inner:  # only the inner box's crossing, 1.0 long
            assert z.abs().max() < 0.5 and ridx.numel() == 2 * 100
        else:  # the outer shell only: 2 x 0.5 on each ray
            assert bool((z.abs() > 0.5).all()) and z.abs().max() < 1 and ridx.numel() == 2 * 100


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_marcher_matches_nerfacc_cuda_marcher():
    """Same binary grid: the project's marcher and nerfacc's CUDA traversal render the same image."""
    dev = torch.device("cuda")
    ours = OccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=32).to(dev)
    step = 3.0 / 64
    fill_occupancy_grid(ours, lambda x: _sphere_density(x) * step, num_updates=16, dilate=1)
    ref = occupancy_estimator([-1, -1, -1, 1, 1, 1], resolution=32, device=dev)
    assert isinstance(ref, OccGridEstimator)
    ref.binaries.copy_(ours.binaries)
    ref.occs.copy_(ours.occs)
    cams = orbit_cameras(2, radius=2.5, elevation_deg=20, fov_deg=40, width=48, height=48).to(dev)
    o, d = (t.reshape(-1, 3) for t in generate_rays(cams))

    def field(x, _):
        return torch.sigmoid(x * 3), _sphere_density(x)

    a = render_rays(field, o, d, 1.0, 4.0, num_samples=64, estimator=ours)
    b = render_rays(field, o, d, 1.0, 4.0, num_samples=64, estimator=ref)
    torch.testing.assert_close(a.rgb, b.rgb, atol=1e-3, rtol=0)
    assert abs(a.t_starts.numel() - b.t_starts.numel()) <= 0.01 * b.t_starts.numel()


def test_both_estimators_satisfy_the_interface():
    """nerfacc's OccGridEstimator and the kernel's grid take every argument of RayEstimator.sampling, same defaults."""
    import inspect

    from nerfacc import OccGridEstimator

    want = inspect.signature(RayEstimator.sampling).parameters
    for est in (OccGridEstimator(roi_aabb=[-1.0, -1, -1, 1, 1, 1], resolution=8), OccupancyGrid([-1, -1, -1, 1, 1, 1], 8)):
        assert isinstance(est, RayEstimator)
        have = inspect.signature(type(est).sampling).parameters
        for name, p in want.items():
            assert name in have and have[name].default == p.default, (type(est).__name__, name)
