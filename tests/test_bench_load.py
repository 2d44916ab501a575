"""benchmarks/bench_load.py: loading a checkpoint against reading its files."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "benchmarks" / "bench_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_writes_a_saved_int4_checkpoint_and_times_its_load_against_its_files(tmp_path):
    out = tmp_path / "load.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "benchmarks/bench_load.py", "--quick", "--against-map", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("bench_load: loading at ")
    data = json.loads(out.read_text())
    assert data["files"] == 1 and data["bytes"] > 0 and data["read_s"] > 0 and data["load_s"] > 0
    assert data["map_load_s"] > 0 and "copied from the memory map" in proc.stdout  # the load as before, timed too
    assert "as stored" in data["plan"] and "H" in data["plan"]  # read as saved, half the layers streamed


def test_the_files_of_a_checkpoint(tmp_path):
    files = bench_module().checkpoint_files
    (tmp_path / "dir").mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json"):
        (tmp_path / "dir" / name).write_bytes(b"x")
    assert [f.name for f in files(tmp_path / "dir")] == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    for k in (1, 2, 3):
        (tmp_path / f"m-0000{k}-of-00003.gguf").write_bytes(b"x")
    (tmp_path / "other.gguf").write_bytes(b"x")
    assert len(files(tmp_path / "m-00002-of-00003.gguf")) == 3 and len(files(tmp_path / "other.gguf")) == 1


@pytest.mark.parametrize("args, words", [
    ([], "give --model PATH, or --write FORMAT"),
    (["--write", "int4"], "--write needs --shape and --out"),
    (["--write", "int4", "--shape", "nope", "--out", "x"], "unknown shape"),
    (["--write", "int3"], "invalid choice"),
    (["--write", "gguf", "--shape", "qwen3-8b", "--out", "x"], "writes llama and qwen3moe files"),
    (["--model", "no/such/dir"], "no checkpoint files"),
])
def test_bad_input_is_one_line_and_exit_2(args, words, capsys):
    assert bench_module().main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench_load: ") and words in err, err
