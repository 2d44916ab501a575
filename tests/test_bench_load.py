"""benchmarks/bench_load.py: loading a checkpoint against reading its files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


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


def test_rounds_turn_the_loads_order_and_report_medians(tmp_path, monkeypatch):
    """Each round reads, then loads each way, starting one further along; each figure is its rounds' median, and
    each ratio the median of its rounds' own."""
    from offload.models import checkpoint
    from offload.models.checkpoint import CheckpointSource, FileReads

    module = load_script("benchmarks/bench_load.py")
    read_rows, allow_pinned = CheckpointSource._read_rows, FileReads.allow_pinned
    seconds = {"load": [2, 4, 3], "one_reader_load": [5, 7, 6], "pageable_load": [6, 5, 9], "map_load": [8, 8, 7]}
    loads = []

    def load_seconds(path, options):  # which way: the patches in force
        way = "map_load" if CheckpointSource._read_rows is not read_rows else \
            "pageable_load" if FileReads.allow_pinned is not allow_pinned else \
            "one_reader_load" if checkpoint.READ_THREADS == 1 else "load"
        loads.append(way)
        return seconds[way][sum(w == way for w in loads) - 1], "plan"

    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    reads = iter([1.0, 4.0, 2.0, 8.0])  # the first fills the page cache (--warm), untimed
    monkeypatch.setattr(checkpoint, "READ_THREADS", 4)
    monkeypatch.setattr(module.offload, "plan_model", lambda *a, **kw: None)
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(module.torch.cuda, "init", lambda: None)
    monkeypatch.setattr(module.torch, "empty", lambda *a, **kw: None)
    monkeypatch.setattr(module, "read_seconds", lambda files: next(reads))
    monkeypatch.setattr(module, "load_seconds", load_seconds)
    result = module.measure(tmp_path, {}, warm=True, against_map=True, rounds=3)
    assert loads == ["load", "one_reader_load", "pageable_load", "map_load",
                     "one_reader_load", "pageable_load", "map_load", "load",
                     "pageable_load", "map_load", "load", "one_reader_load"]
    assert (result["read_s"], result["load_s"], result["one_reader_load_s"], result["pageable_load_s"],
            result["map_load_s"]) == (4, 3, 6, 6, 8)
    assert result["load_over_read"] == 2 and result["map_load_over_read"] == 0.5  # of (4/2, 2/4, 8/3), (4/8, 2/8, 8/7)
    assert result["load_gb_s"] == 10 / 3 / 1e9 and len(result["rounds"]) == 3
    assert checkpoint.READ_THREADS == 4  # the patches undone


def test_the_files_of_a_checkpoint(tmp_path):
    files = load_script("benchmarks/bench_load.py").checkpoint_files
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
    # (a mixture of experts' widths are its experts': qwen3-30b-a3b's pass the check, to the next one)
    (["--write", "gguf", "--shape", "qwen3-30b-a3b", "--out", "/no/such/dir/x.gguf"], "no directory /no/such/dir"),
    (["--model", "no/such/dir"], "no checkpoint files"),
    (["--quick", "--profile", "0"], "must be at least 1"),
    (["--quick", "--rounds", "0"], "--rounds must be at least 1"),
    (["--write", "gguf", "--shape", "tiny", "--out", "x.gguf"], "multiples of 256 (the K-quant block); tiny has "
                                                               "hidden_size 128"),
    (["--write", "gguf", "--shape", "smollm2-135m", "--out", "x.gguf"], "smollm2-135m has hidden_size 576"),
    (["--write", "gguf", "--shape", "llama-2-7b", "--out", "no/such/dir/x.gguf"], "no directory no/such/dir"),
    (["--quick", "--model", "some/dir"], "drop --model"),
    (["--quick", "--shape", "tiny", "--gpu-memory", "1GiB"], "drop --shape, --gpu-memory"),
])
def test_bad_input_is_one_line_and_exit_2(args, words, capsys):
    assert load_script("benchmarks/bench_load.py").main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench_load: ") and words in err, err


def test_write_gguf_refuses_an_existing_out(tmp_path, capsys):
    """As --write int4/int8 refuse a non-empty --out: the file is left as it was."""
    mine = tmp_path / "precious.txt"
    mine.write_text("precious data")
    assert load_script("benchmarks/bench_load.py").main(["--write", "gguf", "--shape", "llama-2-7b", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists: --write gguf writes a new file" in err, err
    assert mine.read_text() == "precious data"


def test_a_gguf_write_that_fails_leaves_no_file(tmp_path, monkeypatch):
    """The file is written under a hidden name and renamed once whole: a failure halfway leaves nothing."""
    import offload.gguf

    def fails_halfway(path, config, **kw):
        Path(path).write_bytes(b"GGUF" + bytes(100))
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(offload.gguf, "write_q4_k_m_like", fails_halfway)
    with pytest.raises(RuntimeError, match="disk is full"):
        load_script("benchmarks/bench_load.py").write_gguf_file(tmp_path / "m.gguf", {})
    assert list(tmp_path.iterdir()) == []


def test_a_gguf_write_is_renamed_once_whole(tmp_path):
    from offload.models.shapes import shape_config

    config = shape_config("tiny") | dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=64)  # every input width a multiple of 256
    module = load_script("benchmarks/bench_load.py")
    assert all(width % 256 == 0 for width in module.kquant_widths(config).values())
    assert module.write_gguf_file(tmp_path / "m.gguf", config) == tmp_path / "m.gguf"
    assert [f.name for f in tmp_path.iterdir()] == ["m.gguf"] and (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
