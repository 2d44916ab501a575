"""scripts/make_checkpoint.py: bad input is one line on stderr and status 2, and nothing is written."""

from __future__ import annotations

import importlib.util

import pytest

from hostile import AS_ROOT, ROOT


@pytest.fixture(scope="module")
def make_checkpoint():
    spec = importlib.util.spec_from_file_location("make_checkpoint", ROOT / "scripts" / "make_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("out, flags, words", [
    pytest.param("file", [], "exists and is not a directory", id="out-is-a-file"),
    pytest.param("file/ckpt", [], "cannot write", id="out-under-a-file"),
    pytest.param("ro/ckpt", [], "Permission denied", id="out-unwritable",
                 marks=pytest.mark.skipif(AS_ROOT, reason="root writes into read-only folders")),
    pytest.param(".", [], "is not empty", id="out-not-empty"),  # a mistyped --out onto a real model
    pytest.param("ckpt", ["--shape", "gpt-5"], "unknown shape", id="shape-unknown"),
    pytest.param("ckpt", ["--device", "foo"], "unknown device", id="device-unknown"),
    pytest.param("ckpt", ["--nope"], "unrecognized arguments", id="flag-unknown"),
    pytest.param(None, [], "--out is empty", id="out-empty"),  # not the current directory
])
def test_make_checkpoint_bad_input_is_one_line(make_checkpoint, tmp_path, capsys, out, flags, words):
    (tmp_path / "file").write_bytes(b"keep")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    where = "" if out is None else str(tmp_path / out)
    assert make_checkpoint(["--shape", "tiny", "--out", where, *flags]) == 2  # a later --shape wins
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("make_checkpoint: error:") and words in err, err
    assert (tmp_path / "file").read_bytes() == b"keep" and not (tmp_path / "ckpt").exists()
