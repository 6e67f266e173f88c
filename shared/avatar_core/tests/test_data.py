"""The synthetic avatar dataset: determinism, resume, captions against textures, renders against geometry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from avatar_core.body import OPENPOSE_18, PART_NAMES, load_body_model
from avatar_core.cameras import Cameras
from avatar_core.cli import main as cli_main
from avatar_core.data import CaptionDataset, MultiViewDataset, PortraitDataset, generate_dataset
from avatar_core.data import generate as gen_mod
from avatar_core.data.appearance import GARMENT_COLOURS, SEGMENT_NAMES, sample_attributes
from avatar_core.data.captions import make_captions
from avatar_core.data.poses import A_POSE_ARM_DEG, build_pose
from avatar_core.errors import ConfigError, InputError, MissingFileError
from avatar_core.io import load_image, load_tensors
from avatar_core.render.lighting import DATASET_LIGHTING
from avatar_core.render.mesh import rasterize_mesh

TINY = dict(num=3, views=4, res=64, seed=7, uv_res=128, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("ds") / "a", **TINY)


def test_same_seed_same_files_and_avatar_independent_of_others(dataset, tmp_path):
    again = generate_dataset(tmp_path / "b", **TINY)
    assert _files(again) == _files(dataset)
    # Avatar 2 made alone (one shard of three) is byte-identical to avatar 2 made after 0 and 1.
    alone = generate_dataset(tmp_path / "c", **{**TINY, "progress": False}, shard=(2, 3))
    assert sorted(p.name for p in (alone / "avatars").iterdir()) == ["000002"]
    assert _files(alone / "avatars" / "000002") == _files(dataset / "avatars" / "000002")
    other = generate_dataset(tmp_path / "d", **{**TINY, "seed": 8, "num": 1})
    assert _files(other / "avatars" / "000000") != _files(dataset / "avatars" / "000000")


def test_resume_after_interruption_keeps_finished_avatars(dataset, tmp_path, monkeypatch):
    out = tmp_path / "r"
    real_save_json = gen_mod.save_json

    def failing(path, obj):  # dies while avatar 1 is half-written
        if Path(path).name == "attributes.json" and obj.get("index") == 1:
            raise KeyboardInterrupt
        return real_save_json(path, obj)

    monkeypatch.setattr(gen_mod, "save_json", failing)
    two = {**TINY, "num": 2}
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(out, **two)
    monkeypatch.setattr(gen_mod, "save_json", real_save_json)
    avatars = out / "avatars"
    assert (avatars / "000000" / "attributes.json").is_file()
    assert not (avatars / "000001").exists()  # nothing half-written under a final name
    assert any(p.name.startswith(".000001.tmp") for p in avatars.iterdir())
    finished = {p: p.stat().st_mtime_ns for p in (avatars / "000000").rglob("*")}

    generate_dataset(out, **two)
    assert {p: p.stat().st_mtime_ns for p in (avatars / "000000").rglob("*")} == finished
    assert not [p for p in avatars.iterdir() if p.name.startswith(".")]
    for i in ("000000", "000001"):  # the same avatars as an uninterrupted run
        assert _files(avatars / i) == _files(dataset / "avatars" / i)


def _nearest_palette(rgb: np.ndarray) -> str:
    names = list(GARMENT_COLOURS)
    d = [np.abs(np.asarray(GARMENT_COLOURS[n]) - rgb).sum() for n in names]
    return names[int(np.argmin(d))]


def test_captions_name_the_garments_the_texture_shows(dataset):
    data = CaptionDataset(dataset, variant="full")
    seen = 0
    for i in range(len(data)):
        attrs = data.attributes(i)
        item = data[i]
        tex = (item["texture"].numpy() * 255).round() / 255
        for g in attrs["garments"]:
            assert g["colour"] in attrs["caption"] and g["type"] in attrs["caption"]
            region = item["segments"].numpy() == SEGMENT_NAMES.index(g["type"])
            if g["pattern"] == "solid" and region.sum() > 50:
                # The texture's typical colour in the garment's region is the colour the caption names.
                assert _nearest_palette(np.median(tex[region], axis=0)) == g["colour"]
                seen += 1
        # TeRA Sec. 3.1: one description of at most 40 words and five phrase-level ones of 8-16 words
        assert len(attrs["caption"].split()) <= 40 and len(attrs["phrases"]) == 5
        assert all(8 <= len(p.split()) <= 16 for p in attrs["phrases"])
    # Many more attribute draws than avatars: every garment's colour, pattern word and type is named.
    rng = np.random.default_rng(0)
    for _ in range(300):
        a = sample_attributes(rng)
        caps = make_captions(a)
        text = caps["caption"]
        assert len(text.split()) <= 40 and all(8 <= len(p.split()) <= 16 for p in caps["phrases"])
        assert all(any(g["colour"] in p and g["type"] in p for g in a["garments"]) for p in caps["phrases"])
        for g in a["garments"]:
            assert g["colour"] in text and g["type"] in text
            word = {"striped": "striped", "checked": "checked", "dotted": "polka-dot"}.get(g["pattern"])
            assert word is None or word in text
    assert seen >= 1


def test_renders_are_solid_silhouettes_of_the_saved_body(dataset):
    body = load_body_model("anny")
    hands = torch.zeros(body.num_vertices, dtype=torch.bool)
    hands[body.faces[body.face_parts() == PART_NAMES.index("hands")].flatten()] = True
    data = MultiViewDataset(dataset)
    for i in range(len(data)):
        item = data[i]
        with torch.no_grad():
            out = body.forward(shape=item["shape"][None], pose=item["pose"][None], transl=item["transl"][None])
        verts = out.vertices[0]
        cams = Cameras(item["viewmats"], item["Ks"], 64, 64)
        alpha = item["masks"]
        cover = alpha.float().mean((1, 2))
        assert ((cover > 0.02) & (cover < 0.5)).all(), cover
        assert set(torch.unique(alpha).tolist()) <= {0.0, 1.0}
        # No holes: the alpha is exactly the silhouette of a fresh rasterization (no culling) of the saved body.
        frags = rasterize_mesh(verts, body.faces, cams)
        assert torch.equal(alpha > 0.5, frags.mask)
        # Independent of the rasterizer: every vertex projects into the alpha mask, give or take one pixel
        # (hands are left out: at 64 px fingers are thinner than a pixel and miss pixel centres).
        px, _ = cams.project(verts[~hands])
        col, row = px[..., 0].floor().long().clamp(0, 63), px[..., 1].floor().long().clamp(0, 63)
        grown = torch.nn.functional.max_pool2d(alpha[:, None], 3, stride=1, padding=1)[:, 0]
        inside = grown[torch.arange(len(cams))[:, None], row, col] > 0.5
        assert inside.float().mean() > 0.999
        # Every covered pixel got a painted texel (an unpainted one would be exactly black).
        rgb = item["images"][alpha > 0.5]
        assert (rgb.sum(-1) == 0).float().mean() < 0.005
        # Keypoints saved with the body match the body's keypoints of the saved parameters.
        torch.testing.assert_close(body.keypoints(out, OPENPOSE_18)[0], item["keypoints"], atol=1e-5, rtol=0)


def test_front_view_shows_the_face(dataset):
    """View 0 is in front (+Z): the nose is nearer to it than the back of the head, and vice versa for the back view."""
    data = MultiViewDataset(dataset)
    item = data[0]
    nose = item["keypoints"][OPENPOSE_18.index("nose")]
    neck = item["keypoints"][OPENPOSE_18.index("neck")]
    cams = Cameras(item["viewmats"], item["Ks"], 64, 64)
    _, depth = cams.project(torch.stack([nose, neck]))
    assert depth[0, 0] < depth[0, 1] and depth[2, 0] > depth[2, 1]  # views 0 and 2 of 4: front and back


def test_existing_folder_rules(dataset, tmp_path):
    with pytest.raises(ConfigError, match="different settings"):
        generate_dataset(dataset, **{**TINY, "views": 5})
    stranger = tmp_path / "s"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an avatar dataset"):
        generate_dataset(stranger, **TINY)
    assert (stranger / "notes.txt").read_text() == "mine"
    out = generate_dataset(tmp_path / "o", **{**TINY, "num": 1})
    generate_dataset(out, **{**TINY, "num": 1, "views": 2, "overwrite": True})
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["views"] == 2
    assert meta["lighting"] == DATASET_LIGHTING  # how every view is lit (avatar_core.render.lighting)
    assert len(list((out / "avatars" / "000000" / "views").iterdir())) == 2


@pytest.mark.parametrize("kw, err", [
    ({"body": "mannequin"}, ConfigError), ({"num": 0}, InputError), ({"res": 8}, InputError),
    ({"views": 0}, InputError),
])
def test_bad_inputs(kw, err, tmp_path):
    with pytest.raises(err):
        generate_dataset(tmp_path / "x", **{**TINY, **kw})
    assert not (tmp_path / "x").exists()


def test_cli_reports_errors(tmp_path, capsys):
    assert cli_main(["make-dataset", "--out", str(tmp_path / "x"), "--num", "-1"]) == 2
    assert "--num" in capsys.readouterr().err


def test_dataset_classes(dataset, tmp_path):
    mv = MultiViewDataset(dataset, views=[0, 2])
    item = mv[1]
    assert item["images"].shape == (2, 64, 64, 3) and item["masks"].shape == (2, 64, 64)
    assert item["viewmats"].shape == (2, 4, 4) and item["Ks"].shape == (2, 3, 3)
    assert item["shape"].shape == (6,) and item["pose"].shape == (103, 3)
    pt = PortraitDataset(dataset)[0]
    assert pt["portrait"].shape == (64, 64, 3) and pt["texture"].shape == (128, 128, 3)
    assert pt["images"].shape == (4, 64, 64, 3)
    batch = next(iter(torch.utils.data.DataLoader(CaptionDataset(dataset), batch_size=3)))
    assert len(batch["caption"]) == 3 and batch["texture"].shape == (3, 128, 128, 3)
    assert batch["targets"]["top_colour"].shape == (3,)
    with pytest.raises(MissingFileError, match="not an avatar dataset"):
        MultiViewDataset(tmp_path)
    with pytest.raises(InputError):
        MultiViewDataset(dataset, views=[9])
    body, meta = load_tensors(dataset / "avatars" / "000000" / "body.safetensors")
    assert meta["body"] == "anny" and body["transl"].shape == (3,)
    assert load_image(dataset / "contact_sheet.png").shape[-1] == 3


def test_a_pose_is_straight_armed_at_the_stated_angle():
    body = load_body_model("anny")
    pose = build_pose(body)
    out = body.forward(pose=pose[None])
    j = out.joints[0]
    for side, sign in (("L", 1.0), ("R", -1.0)):
        s, e, w = (j[body.joint_index(f"{n}.{side}")] for n in ("upperarm01", "lowerarm01", "wrist"))
        up, fore = e - s, w - e
        assert torch.nn.functional.cosine_similarity(up, fore, dim=0) > 0.9999  # elbow straight
        below = math.degrees(math.atan2(-float(up[1]), sign * float(up[0])))
        assert abs(below - A_POSE_ARM_DEG) < 0.1 and abs(float(up[2])) < 1e-4
