"""Nothing a user made is lost or silently replaced: result folders, dataset overwrite, argument checks, SMPL-X files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from avatar_core.cli import main as cli_main
from avatar_core.data import generate_dataset
from avatar_core.errors import ConfigError, CorruptFileError, InputError
from avatar_core.results import (
    MARKER,
    ResultExistsError,
    check_result_dir,
    check_result_file,
    check_writable,
    prepare_result_dir,
    result_name,
)

TINY = dict(num=1, views=2, res=32, seed=3, uv_res=64, progress=False)


# ---- result names (issue case 2) ------------------------------------------------------------------


def test_result_names_are_unique_per_full_prompt_seed_and_settings():
    stem = "a tall woman with long red hair in a flowing green dress and "
    a, b = result_name(stem + "white sneakers", 0), result_name(stem + "black boots", 0)
    assert a != b and a.startswith("a_tall_woman_with_long_red_hair_in_a_flo")
    assert result_name("!!!???", 0) != result_name("\U0001F600\U0001F600", 0)  # no letters: hash tells apart
    assert result_name("!!!???", 0).startswith("avatar_s0_")
    assert result_name("x", 0) != result_name("x", 1)
    assert result_name("x", 0, {"steps": 10}) != result_name("x", 0, {"steps": 20})
    assert result_name("x", 0, {"steps": 10, "cfg": 2}) == result_name("x", 0, {"cfg": 2, "steps": 10})
    assert all(c.isalnum() or c == "_" for c in result_name("é/..\\ a*b?", 5))


# ---- the result-folder rule (issue case 3) --------------------------------------------------------


def test_new_folder_is_created_and_marked(tmp_path):
    out = prepare_result_dir(tmp_path / "a" / "b", kind="test.result")
    assert out.is_dir() and json.loads((out / MARKER).read_text())["kind"] == "test.result"


def test_existing_result_needs_overwrite_which_clears_old_files(tmp_path):
    out = prepare_result_dir(tmp_path / "r", kind="test.views")
    for k in range(8):  # an earlier run with eight views
        (out / f"{k:03d}.png").write_bytes(b"old")
    with pytest.raises(ResultExistsError, match="--overwrite"):
        prepare_result_dir(out, kind="test.views")
    assert len(list(out.glob("*.png"))) == 8  # refused: nothing touched
    prepare_result_dir(out, kind="test.views", overwrite=True)
    (out / "000.png").write_bytes(b"new")
    (out / "001.png").write_bytes(b"new")
    assert sorted(p.name for p in out.glob("*.png")) == ["000.png", "001.png"]  # no stale 002..007


def test_overwrite_refuses_folders_the_toolkit_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="not a folder this toolkit wrote"):
        prepare_result_dir(mine, kind="test.result", overwrite=True)
    assert (mine / "thesis.tex").read_text() == "years of work"
    other = prepare_result_dir(tmp_path / "other", kind="test.avatar")
    (other / "avatar.bin").write_bytes(b"1")
    with pytest.raises(InputError, match="holds a test.avatar result"):
        prepare_result_dir(other, kind="test.video", overwrite=True)
    assert (other / "avatar.bin").is_file()
    # An older result without the marker, recognised by the package.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "settings.json").write_text("{}")
    prepare_result_dir(legacy, kind="test.result", overwrite=True, recognise=lambda p: (p / "settings.json").is_file())
    assert not (legacy / "settings.json").exists() and (legacy / MARKER).is_file()


def test_inputs_are_read_only(tmp_path):
    src = prepare_result_dir(tmp_path / "avatars" / "src", kind="test.avatar")
    (src / "avatar.bin").write_bytes(b"source")
    for out in (src, src / "export", tmp_path / "avatars", tmp_path):
        for overwrite in (False, True):
            with pytest.raises(InputError, match="input"):
                prepare_result_dir(out, kind="test.avatar", overwrite=overwrite, inputs=[src / "avatar.bin"])
    with pytest.raises(InputError, match="input"):
        check_result_file(src / "walk.mp4", inputs=[src])
    assert (src / "avatar.bin").read_bytes() == b"source"
    assert not (src / "export").exists()
    prepare_result_dir(tmp_path / "avatars" / "edit", kind="test.avatar", inputs=[src / "avatar.bin"])


def test_result_file_rule(tmp_path):
    f = tmp_path / "clip.mp4"
    check_result_file(f)
    f.write_bytes(b"x")
    with pytest.raises(ResultExistsError):
        check_result_file(f)
    check_result_file(f, overwrite=True)
    with pytest.raises(InputError, match="is a folder"):
        check_result_file(tmp_path)


def test_checks_write_nothing(tmp_path):
    check_result_dir(tmp_path / "new" / "deeper", kind="test.result")
    assert not (tmp_path / "new").exists()


# ---- bad output paths (issue case 10) ------------------------------------------------------------


def test_unusable_output_paths(tmp_path, monkeypatch):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        check_writable(f)
    with pytest.raises(InputError, match="lies under .*file.txt, which is a file"):
        check_writable(f / "sub" / "out")
    real_access = os.access
    ro = tmp_path / "readonly"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == os.fspath(ro) else real_access(p, mode))
    with pytest.raises(InputError, match="not writable"):
        check_writable(ro / "out")


@pytest.mark.parametrize("case", ["file", "under_file", "unwritable", "negative_seed"])
def test_make_dataset_bad_out_or_seed_is_one_line_error_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    out, seed = {"file": (f, 0), "under_file": (f / "ds", 0), "unwritable": (tmp_path / "ro" / "ds", 0),
                 "negative_seed": (tmp_path / "ds", -1)}[case]
    if case == "unwritable":
        (tmp_path / "ro").mkdir()
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == os.fspath(tmp_path / "ro")
                            else real_access(p, mode))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc = cli_main(["make-dataset", "--out", str(out), "--num", "1", "--views", "2", "--res", "32",
                   "--uv-res", "64", "--seed", str(seed)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # the message and its hint
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    with pytest.raises(InputError):
        generate_dataset(out, **{**TINY, "seed": seed})


# ---- make-dataset --overwrite deletes only a dataset (issue case 1) -------------------------------


def test_make_dataset_overwrite_refuses_a_run_folder(tmp_path):
    run = tmp_path / "tera_run"
    (run / "avatars" / "a_woman_s0").mkdir(parents=True)
    (run / "avatars" / "a_woman_s0" / "avatar.safetensors").write_bytes(b"generated")
    (run / "diffusion").mkdir()
    with pytest.raises(ConfigError, match="not an avatar dataset"):
        generate_dataset(run, **TINY, overwrite=True)
    assert (run / "avatars" / "a_woman_s0" / "avatar.safetensors").read_bytes() == b"generated"
    # A meta.json of something else is not a dataset's either.
    (run / "meta.json").write_text(json.dumps({"format": "tera.run/1"}))
    with pytest.raises(ConfigError, match="not a dataset's"):
        generate_dataset(run, **TINY, overwrite=True)
    (run / "meta.json").write_text("{broken")
    with pytest.raises(ConfigError):
        generate_dataset(run, **TINY, overwrite=True)
    assert (run / "avatars" / "a_woman_s0" / "avatar.safetensors").is_file()


# ---- damaged SMPL-X files (issue case 9) ----------------------------------------------------------


def _smplx_folder(tmp_path, content):
    d = tmp_path / "smplx"
    d.mkdir()
    if isinstance(content, dict):
        np.savez(d / "SMPLX_NEUTRAL.npz", **content)
    else:
        (d / "SMPLX_NEUTRAL.npz").write_bytes(content)
    (d / "smplx_uv.obj").write_text("vt 0 0\nf 1/1 1/1 1/1\n")
    return d


@pytest.mark.parametrize("content, expect", [
    (b"\x00garbage, not a zip" * 10, r"SMPLX_NEUTRAL\.npz is not an \.npz archive \(not a zip file"),
    ({"v_template": np.zeros((4, 3)), "f": np.zeros((1, 3), np.int64)}, r"lacks the SMPL-X arrays weights, .*shapedirs"),
])
def test_damaged_smplx_file_is_named_with_what_it_lacks(tmp_path, monkeypatch, content, expect):
    from avatar_core.body import load_body_model
    from avatar_core.env import SMPLX_ENV, body_models

    d = _smplx_folder(tmp_path, content)
    with pytest.raises(CorruptFileError, match=expect) as err:
        load_body_model("smplx", model_dir=d)
    assert str(d / "SMPLX_NEUTRAL.npz") in str(err.value)
    monkeypatch.setenv(SMPLX_ENV, str(d))
    status = body_models()["smplx"]
    assert status.startswith("not usable") and "SMPLX_NEUTRAL.npz" in status and "available" not in status
