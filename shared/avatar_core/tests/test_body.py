"""Body models: SMPL-X against smplx's own LBS on a synthetic model file; Anny against Anny's forward."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from avatar_core.body import OPENPOSE_18, load_body_model, skin_points, unskin_points
from avatar_core.errors import ConfigError, InputError, MissingBodyModelError

# SMPL-X's kinematic tree (55 joints); a fact of the model, needed to build a loadable file.
SMPLX_PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 15, 15, 15,
                 20, 25, 26, 20, 28, 29, 20, 31, 32, 20, 34, 35, 20, 37, 38,
                 21, 40, 41, 21, 43, 44, 21, 46, 47, 21, 49, 50, 21, 52, 53]
GRID_ROWS, GRID_COLS = 419, 25  # 10,475 vertices: smplx picks extra joints by vertex id


def grid_faces(rows: int, cols: int) -> np.ndarray:
    r, c = np.meshgrid(np.arange(rows - 1), np.arange(cols - 1), indexing="ij")
    a = (r * cols + c).ravel()
    b, d, e = a + 1, a + cols, a + cols + 1
    return np.concatenate([np.stack([a, d, b], 1), np.stack([b, d, e], 1)])


def write_synthetic_smplx(folder, seed: int = 0) -> dict:
    """A random SMPL-X-layout model file (a 25 x 419 vertex sheet, 1.7 m tall) and its smplx_uv.obj."""
    rng = np.random.default_rng(seed)
    V, J = GRID_ROWS * GRID_COLS, 55
    r, c = np.meshgrid(np.arange(GRID_ROWS), np.arange(GRID_COLS), indexing="ij")
    verts = np.stack([(c.ravel() / (GRID_COLS - 1) - 0.5) * 0.5, r.ravel() / (GRID_ROWS - 1) * 1.7 - 1.1,
                      0.02 * rng.standard_normal(V)], 1)
    faces = grid_faces(GRID_ROWS, GRID_COLS)
    logits = 3.0 * rng.standard_normal((V, J))
    weights = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    regressor = np.zeros((J, V))
    for j in range(J):
        idx = rng.choice(V, 20, replace=False)
        regressor[j, idx] = rng.random(20)
    regressor /= regressor.sum(1, keepdims=True)
    # Only the 10 shape and 10 expression components the loader uses are random; zeros compress away.
    shapedirs = np.zeros((V, 3, 400), np.float32)
    shapedirs[:, :, :10] = 0.01 * rng.standard_normal((V, 3, 10))
    shapedirs[:, :, 300:310] = 0.01 * rng.standard_normal((V, 3, 10))
    data = dict(
        v_template=verts, f=faces.astype(np.uint32), weights=weights, J_regressor=regressor,
        kintree_table=np.stack([np.array(SMPLX_PARENTS, np.int64) % 2**32, np.arange(J)]),
        shapedirs=shapedirs, posedirs=0.002 * rng.standard_normal((V, 3, (J - 1) * 9), np.float32),
        hands_componentsl=rng.standard_normal((45, 45)), hands_componentsr=rng.standard_normal((45, 45)),
        hands_meanl=0.1 * rng.standard_normal(45), hands_meanr=0.1 * rng.standard_normal(45),
        lmk_faces_idx=rng.integers(0, len(faces), 51), lmk_bary_coords=rng.dirichlet(np.ones(3), 51),
        dynamic_lmk_faces_idx=rng.integers(0, len(faces), (79, 17)),
        dynamic_lmk_bary_coords=rng.dirichlet(np.ones(3), (79, 17)),
    )
    np.savez(folder / "SMPLX_NEUTRAL.npz", **data)
    uv = np.stack([0.05 + 0.9 * c.ravel() / (GRID_COLS - 1), 0.05 + 0.9 * r.ravel() / (GRID_ROWS - 1)], 1)
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in verts]
    lines += [f"vt {u:.8f} {v:.8f}" for u, v in uv]
    lines += [f"f {a + 1}/{a + 1} {b + 1}/{b + 1} {d + 1}/{d + 1}" for a, b, d in faces]
    (folder / "smplx_uv.obj").write_text("\n".join(lines) + "\n")
    return data


@pytest.fixture(scope="module")
def synthetic_smplx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smplx")
    return folder, write_synthetic_smplx(folder)


def test_smplx_matches_smplx_lbs(synthetic_smplx):
    """Our shape + expression + pose correctives + FK + LBS equal smplx.lbs.lbs on random poses."""
    from smplx.lbs import lbs

    folder, data = synthetic_smplx
    body = load_body_model("smplx", model_dir=folder, dtype=torch.float64)
    assert body.num_vertices == 10475 and body.num_joints == 55
    g = torch.Generator().manual_seed(1)
    B = 3
    shape, expr = torch.randn(B, 10, generator=g, dtype=torch.float64), torch.randn(B, 10, generator=g, dtype=torch.float64)
    pose = 0.4 * torch.randn(B, 54, 3, generator=g, dtype=torch.float64)
    orient = torch.randn(B, 3, generator=g, dtype=torch.float64)
    transl = torch.randn(B, 3, generator=g, dtype=torch.float64)
    out = body(shape=shape, pose=pose, expression=expr, global_orient=orient, transl=transl)

    t = lambda a: torch.as_tensor(np.asarray(a, np.float64))  # noqa: E731
    shapedirs = torch.cat([t(data["shapedirs"][:, :, :10]), t(data["shapedirs"][:, :, 300:310])], -1)
    posedirs = t(data["posedirs"]).reshape(-1, 486).T
    parents = torch.tensor(SMPLX_PARENTS)
    ref_v, ref_j = lbs(torch.cat([shape, expr], 1), torch.cat([orient, pose.reshape(B, -1)], 1), t(data["v_template"]),
                       shapedirs, posedirs, t(data["J_regressor"]), parents, t(data["weights"]))
    torch.testing.assert_close(out.vertices, ref_v + transl[:, None], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.joints, ref_j + transl[:, None], atol=1e-6, rtol=0)
    # The transforms are world-from-rest: skinning the rest mesh with them reproduces the vertices.
    torch.testing.assert_close(skin_points(out.rest_vertices, body.skinning_weights, out.transforms), out.vertices)
    # Inverse LBS is the inverse of LBS.
    torch.testing.assert_close(unskin_points(out.vertices, body.skinning_weights, out.transforms), out.rest_vertices)
    # Named keypoints: the face ones are smplx's own vertex ids (nose = vertex 9120).
    kp = body.keypoints(out)
    assert kp.shape == (B, 18, 3)
    torch.testing.assert_close(kp[:, OPENPOSE_18.index("nose")], out.vertices[:, 9120])
    torch.testing.assert_close(kp[:, OPENPOSE_18.index("left_wrist")], out.joints[:, 20])
    # The UV layout is read from smplx_uv.obj.
    assert body.uv_coords.shape == (10475, 2) and body.uv_faces.shape == body.faces.shape


def test_smplx_missing_files_name_them(tmp_path, monkeypatch, synthetic_smplx):
    monkeypatch.delenv("AVATAR_SMPLX_DIR", raising=False)
    with pytest.raises(MissingBodyModelError, match="AVATAR_SMPLX_DIR"):
        load_body_model("smplx")
    with pytest.raises(MissingBodyModelError, match=r"SMPLX_NEUTRAL\.npz[\s\S]*smpl-x\.is\.tue\.mpg\.de"):
        load_body_model("smplx", model_dir=tmp_path)
    monkeypatch.setenv("AVATAR_SMPLX_DIR", str(tmp_path))
    with pytest.raises(MissingBodyModelError, match="SMPLX_FEMALE.npz"):
        load_body_model("smplx", gender="female")
    shutil.copy(synthetic_smplx[0] / "SMPLX_NEUTRAL.npz", tmp_path)  # the model without its smplx_uv.obj
    body = load_body_model("smplx")  # found through the environment variable
    with pytest.raises(MissingBodyModelError, match=r"smplx_uv\.obj[\s\S]*smpl-x\.is\.tue\.mpg\.de"):
        _ = body.uv_coords


def test_unknown_model_and_bad_input():
    with pytest.raises(ConfigError, match="'anny'.*'smplx'"):
        load_body_model("smpl")
    body = load_body_model("anny")
    with pytest.raises(InputError, match="pose"):
        body(pose=torch.zeros(1, 5, 3))
    with pytest.raises(InputError, match="NaN"):
        body(shape=torch.full((1, 6), float("nan")))


@pytest.fixture(scope="module")
def anny():
    return load_body_model("anny")


def test_anny_matches_anny_forward(anny):
    """Our FK + LBS of Anny equal Anny's own forward, fed the same bone poses (its 'world' parameterization)."""
    from avatar_core.body.anny_model import ANNY_SHAPE_NAMES, ANNY_TO_CANONICAL

    g = torch.Generator().manual_seed(0)
    B = 2
    shape = torch.rand(B, 6, generator=g)
    pose = 0.3 * torch.randn(B, anny.num_joints - 1, 3, generator=g)
    out = anny(shape=shape, pose=pose, global_orient=torch.randn(B, 3, generator=g), transl=torch.randn(B, 3, generator=g))

    m = anny._anny[0]
    C = torch.eye(4, dtype=torch.float64)
    C[:3, :3] = ANNY_TO_CANONICAL
    phen = {n: shape[:, i].double() for i, n in enumerate(ANNY_SHAPE_NAMES)}
    rest_poses = m.get_rest_model(m.get_phenotype_blendshape_coefficients(**phen))["rest_bone_poses"]
    bone_poses = C.T @ out.transforms.double() @ C @ rest_poses  # Anny frame: W = T P
    ref = m(pose_parameters=bone_poses, phenotype_kwargs=phen, pose_parameterization="world")["vertices"]
    torch.testing.assert_close(out.vertices.double(), ref @ ANNY_TO_CANONICAL.T, atol=2e-5, rtol=0)


def test_anny_batched_differentiable_canonical_frame(anny):
    """Gradients reach pose and shape; the rest body is +Y up, faces +Z, left at +X."""
    B = 3
    pose = torch.zeros(B, anny.num_joints - 1, 3, requires_grad=True)
    shape = torch.full((B, 6), 0.5, requires_grad=True)
    out = anny(shape=shape, pose=pose)
    assert out.vertices.shape == (B, anny.num_vertices, 3) and out.transforms.shape == (B, anny.num_joints, 4, 4)
    out.vertices[:, :, 1].square().sum().backward()
    assert pose.grad.abs().sum() > 0 and shape.grad.abs().sum() > 0

    kp = anny.keypoints(out)[0]
    k = {n: kp[i] for i, n in enumerate(OPENPOSE_18)}
    assert k["nose"][1] > k["neck"][1] > k["left_hip"][1] > k["left_knee"][1] > k["left_ankle"][1]
    assert k["nose"][2] > k["neck"][2] + 0.05  # nose in front of the neck
    assert k["left_shoulder"][0] > 0.1 > -0.1 > k["right_shoulder"][0]
    assert 1.5 < anny.height() < 1.9
    # Bending the left elbow (about canonical +Z) moves the left wrist, not the right one.
    bend = torch.zeros(1, anny.num_joints - 1, 3)
    bend[0, anny.joint_index("lowerarm01.L") - 1] = torch.tensor([0.0, 0.0, 1.0])
    moved = anny.keypoints(anny(pose=bend))[0] - kp.detach()
    assert moved[OPENPOSE_18.index("left_wrist")].norm() > 0.1 and moved[OPENPOSE_18.index("right_wrist")].norm() < 1e-6


def test_axis_angle_matches_smplx_and_is_smooth_at_zero():
    """Rodrigues against smplx's batch_rodrigues; finite-difference gradients at, near and away from zero."""
    from smplx.lbs import batch_rodrigues

    from avatar_core.body import axis_angle_to_matrix

    g = torch.Generator().manual_seed(0)
    aa = torch.randn(64, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(axis_angle_to_matrix(aa), batch_rodrigues(aa), atol=1e-7, rtol=0)
    for x in (torch.zeros(2, 3), 1e-5 * torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)):
        assert torch.autograd.gradcheck(axis_angle_to_matrix, (x.double().requires_grad_(),), atol=1e-6)
