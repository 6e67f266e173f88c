"""3DGS PLY export: the INRIA layout, byte for byte, and exact round trips."""

import os

import numpy as np
import pytest
import torch

from avatar_core.errors import CorruptFileError, InputError
from avatar_core.io.ply import SH_C0, convert_ply, load_ply, read_ply_header, save_ply

# The header the reference 3DGS code writes for SH degree 1 (3 * 3 f_rest properties), spelled out by hand.
EXPECTED_NAMES_DEG1 = [
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2",
    "f_rest_0", "f_rest_1", "f_rest_2", "f_rest_3", "f_rest_4", "f_rest_5", "f_rest_6", "f_rest_7", "f_rest_8",
    "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
]


def _gaussians(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        means=torch.randn(n, 3, generator=g),
        quats=torch.randn(n, 4, generator=g),
        scales=torch.randn(n, 3, generator=g) * 0.5 - 4,  # log-scales
        opacities=torch.randn(n, generator=g) * 2,  # logits
        sh=torch.randn(n, k, 3, generator=g),
    )


def _read_header(path):
    raw = path.read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    return raw[:end].decode("ascii").splitlines(), raw[end:]


def test_header_layout_and_channel_major_rest(tmp_path):
    gs = _gaussians(5, 4)
    path = save_ply(tmp_path / "a.ply", gs["means"], gs["quats"], gs["scales"], gs["opacities"], sh=gs["sh"],
                    activated=False, sh_degree_fields=None)
    lines, body = _read_header(path)
    assert lines[:2] == ["ply", "format binary_little_endian 1.0"]
    assert lines[2:4] == ["comment convention opengl: +y up, facing +z (right-handed, metres)", "comment sh_degree 1"]
    assert lines[4] == "element vertex 5"
    assert lines[5:-1] == [f"property float {name}" for name in EXPECTED_NAMES_DEG1]
    assert lines[-1] == "end_header"
    # Decode the body independently: 26 little-endian float32 per vertex, in header order.
    rows = np.frombuffer(body, dtype="<f4").reshape(5, len(EXPECTED_NAMES_DEG1))
    col = {name: rows[:, i] for i, name in enumerate(EXPECTED_NAMES_DEG1)}
    sh = gs["sh"].numpy()
    for c in range(3):
        np.testing.assert_array_equal(col[f"f_dc_{c}"], sh[:, 0, c])
        for j in range(3):  # channel-major: f_rest_{c * (K - 1) + j} is coefficient j + 1 of channel c
            np.testing.assert_array_equal(col[f"f_rest_{c * 3 + j}"], sh[:, j + 1, c])
    np.testing.assert_array_equal(col["opacity"], gs["opacities"].numpy())
    np.testing.assert_array_equal(np.stack([col[f"rot_{i}"] for i in range(4)], 1), gs["quats"].numpy())
    np.testing.assert_array_equal(np.stack([col["nx"], col["ny"], col["nz"]], 1), np.zeros((5, 3), np.float32))


@pytest.mark.parametrize("k", [1, 4, 9, 16])
def test_round_trip_exact_float32(tmp_path, k):
    gs = _gaussians(257, k, seed=k)
    path = save_ply(tmp_path / "g.ply", gs["means"], gs["quats"], gs["scales"], gs["opacities"], sh=gs["sh"],
                    activated=False)
    back = load_ply(path)
    assert back.sh_degree == int(k ** 0.5) - 1
    assert torch.equal(back.means, gs["means"])
    assert torch.equal(back.quats, gs["quats"])
    assert torch.equal(back.log_scales, gs["scales"])
    assert torch.equal(back.opacity_logits, gs["opacities"])
    assert torch.equal(back.sh, gs["sh"])
    # Activated inputs: stored as log / logit, read back activated.
    act = save_ply(tmp_path / "act.ply", gs["means"], gs["quats"], gs["scales"].exp(), torch.sigmoid(gs["opacities"]),
                   sh=gs["sh"])
    back = load_ply(act)
    torch.testing.assert_close(back.scales, gs["scales"].exp(), rtol=1e-6, atol=0)
    torch.testing.assert_close(back.opacities, torch.sigmoid(gs["opacities"]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(back.log_scales, gs["scales"], rtol=0, atol=1e-6)


def test_rgb_colours_become_sh_dc_and_writes_are_atomic(tmp_path):
    rgb = torch.tensor([[0.0, 0.5, 1.0], [0.25, 0.75, 0.1]])
    path = tmp_path / "sub" / "c.ply"
    save_ply(path, torch.zeros(2, 3), torch.tensor([[1.0, 0, 0, 0]] * 2), torch.full((2, 3), 0.01),
             torch.tensor([0.5, 1.0]), colors=rgb)
    back = load_ply(path)
    torch.testing.assert_close(back.sh[:, 0], (rgb - 0.5) / SH_C0)
    torch.testing.assert_close(back.colors, rgb)
    assert back.sh.shape == (2, 1, 3)
    assert torch.isfinite(back.opacity_logits).all()  # opacity 1 stays finite
    before = path.read_bytes()
    with pytest.raises(InputError):  # bad input: the existing file is left untouched, no temp files remain
        save_ply(path, torch.zeros(2, 3), torch.zeros(2, 4), torch.full((2, 3), -1.0), torch.ones(2), colors=rgb)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["c.ply"]
    with pytest.raises(InputError):
        save_ply(path, torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), torch.ones(2))
    path.write_bytes(before[:-10])
    with pytest.raises(CorruptFileError):
        load_ply(path)


def _inria_attributes(max_sh_degree=3):
    """The property list of the reference 3DGS code (GaussianModel.construct_list_of_attributes), degree 3."""
    names = ["x", "y", "z", "nx", "ny", "nz"]
    names += [f"f_dc_{i}" for i in range(3)]
    names += [f"f_rest_{i}" for i in range(3 * ((max_sh_degree + 1) ** 2 - 1))]
    names += ["opacity"] + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
    return names


def _inria_read(path, max_sh_degree=3):
    """GaussianModel.load_ply of the reference code, on plyfile, returning its arrays."""
    import plyfile  # declared in avatar-core[dev]
    el = plyfile.PlyData.read(str(path)).elements[0]
    xyz = np.stack([np.asarray(el["x"]), np.asarray(el["y"]), np.asarray(el["z"])], axis=1)
    dc = np.stack([np.asarray(el[f"f_dc_{i}"]) for i in range(3)], axis=1)
    extra = [p.name for p in el.properties if p.name.startswith("f_rest_")]
    extra = sorted(extra, key=lambda x: int(x.split("_")[-1]))
    assert len(extra) == 3 * (max_sh_degree + 1) ** 2 - 3  # the reference reader's own assertion
    rest = np.stack([np.asarray(el[name]) for name in extra], axis=1).reshape(len(xyz), 3, -1)
    rot = np.stack([np.asarray(el[f"rot_{i}"]) for i in range(4)], axis=1)
    return el, xyz, dc, rest.transpose(0, 2, 1), rot


@pytest.mark.parametrize("k", [1, 4])
def test_plyfile_and_reference_reader_accept_padded_files(tmp_path, k):
    gs = _gaussians(33, k, seed=3)
    path = save_ply(tmp_path / "g.ply", gs["means"], gs["quats"], gs["scales"], gs["opacities"], sh=gs["sh"],
                    activated=False)
    el, xyz, dc, rest, rot = _inria_read(path)
    assert [p.name for p in el.properties] == _inria_attributes()
    assert all(p.val_dtype in ("f4", "<f4", "float32") or np.dtype(p.val_dtype) == np.float32 for p in el.properties)
    np.testing.assert_array_equal(xyz, gs["means"].numpy())
    np.testing.assert_array_equal(dc, gs["sh"][:, 0].numpy())
    np.testing.assert_array_equal(rest[:, : k - 1], gs["sh"][:, 1:].numpy())
    assert not rest[:, k - 1:].any()  # the padding is zero
    np.testing.assert_array_equal(rot, gs["quats"].numpy())
    back = load_ply(path)  # the stated degree, not the padded one
    assert back.sh_degree == int(k ** 0.5) - 1 and torch.equal(back.sh, gs["sh"])


def test_opencv_convention_is_the_same_avatar_rotated_about_x(tmp_path):
    from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci, _spherical_harmonics

    gs = _gaussians(40, 16, seed=5)
    args = (gs["means"], gs["quats"], gs["scales"], gs["opacities"])
    gl = save_ply(tmp_path / "gl.ply", *args, sh=gs["sh"], activated=False)
    cv = save_ply(tmp_path / "cv.ply", *args, sh=gs["sh"], activated=False, convention="opencv")
    assert any(c.startswith("convention opencv") for c in read_ply_header(cv).comments)
    a, b = load_ply(gl), load_ply(cv, as_stored=True)
    rx = torch.diag(torch.tensor([1.0, -1.0, -1.0]))  # 180 degrees about x
    torch.testing.assert_close(b.means, a.means @ rx.T)
    cov_a = _quat_scale_to_covar_preci(a.quats, a.scales, compute_preci=False)[0]
    cov_b = _quat_scale_to_covar_preci(b.quats, b.scales, compute_preci=False)[0]
    torch.testing.assert_close(cov_b, rx @ cov_a @ rx.T, rtol=1e-4, atol=1e-9)
    # View-dependent colour (gsplat's SH evaluation): the same in direction d before and R d after.
    dirs = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_spherical_harmonics(3, dirs @ rx.T, b.sh), _spherical_harmonics(3, dirs, a.sh),
                               rtol=1e-4, atol=1e-5)
    back = load_ply(cv)  # read back into the kernel's convention exactly
    assert torch.equal(back.means, a.means) and torch.equal(back.quats, a.quats) and torch.equal(back.sh, a.sh)
    with pytest.raises(InputError, match="convention"):
        save_ply(tmp_path / "x.ply", *args, sh=gs["sh"], activated=False, convention="colmap")


def test_mesh_ply_names_the_missing_fields(tmp_path):
    path = tmp_path / "mesh.ply"
    path.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
                     b"property float z\nend_header\n" + np.zeros(3, "<f4").tobytes())
    with pytest.raises(CorruptFileError, match="f_dc_0, f_dc_1, f_dc_2, opacity, scale_0"):
        load_ply(path)


def test_convert_ply_to_opencv_and_back_is_exact(tmp_path):
    gs = _gaussians(20, 9, seed=7)
    src = save_ply(tmp_path / "in" / "avatar.ply", gs["means"], gs["quats"], gs["scales"], gs["opacities"],
                   sh=gs["sh"], activated=False)
    (tmp_path / "in" / "mesh.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 0\n"
                                               b"property float x\nend_header\n")
    [cv] = convert_ply(tmp_path / "in", tmp_path / "cv", "opencv")  # the mesh is left out
    assert cv == tmp_path / "cv" / "avatar.ply"
    assert read_ply_header(cv).comment_value("convention").startswith("opencv")
    assert torch.equal(load_ply(cv, as_stored=True).means, gs["means"] * torch.tensor([1.0, -1.0, -1.0]))
    [gl] = convert_ply(cv, tmp_path / "gl.ply", "opengl")
    a, b = load_ply(src), load_ply(gl)
    for f in ("means", "quats", "log_scales", "opacity_logits", "sh", "normals"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    with pytest.raises(InputError, match="exists"):
        convert_ply(cv, tmp_path / "gl.ply", "opengl")
    with pytest.raises(InputError, match="exists"):
        convert_ply(cv, cv, "opengl", overwrite=True)
    with pytest.raises(CorruptFileError, match="lacks"):
        convert_ply(tmp_path / "in" / "mesh.ply", tmp_path / "m.ply")
