"""The quality benchmark's --quick mode (what CI runs): the structured model, none vs int8 vs int4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args, cache):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OFFLOAD_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "benchmarks/bench_quality.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_quick_prints_a_table_and_writes_each_format(structured, tmp_path):
    out = tmp_path / "quality.json"
    proc = run_bench("--quick", "--json", str(out), cache=structured.parent)  # the fixture's model: no retraining
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("bench_quality: 3 format(s)")
    assert any(line.split()[:1] == ["int4"] and "%" in line for line in lines)  # a row of the table
    rows = {row["format"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["none", "int8", "int4"]
    none = rows["none"]
    assert none["kl_mean"] is None and none["tokens"] > 1000
    assert rows["int8"]["layer_bytes"] < none["layer_bytes"] / 3  # float32 to int8
    assert rows["int4"]["layer_bytes"] < rows["int8"]["layer_bytes"]
    for fmt, ppl_limit, kl_limit in [("int8", 1.005, 1e-3), ("int4", 1.03, 0.05)]:
        row = rows[fmt]
        assert row["perplexity"] <= ppl_limit * none["perplexity"], fmt
        assert 0 < row["kl_mean"] <= row["kl_max"] <= kl_limit, fmt
        assert row["top1_agreement"] >= 0.99, fmt


@pytest.mark.parametrize("args, words", [
    (["--quick", "--formats", "none,int3"], "--formats takes none followed by"),
    (["--quick", "--formats", "int8"], "--formats takes none followed by"),
    (["--quick", "--model", "x"], "--quick chooses"),
    (["--model", "does/not/exist", "--token-ids", "x.json"], "does/not/exist"),
    (["--quick", "--window", "0"], "--window must be >= 1"),
    (["--quick", "--group-size", "x"], "invalid int value"),
])
def test_bad_input_is_one_line_and_exit_2(args, words, capsys):
    assert load_script("benchmarks/bench_quality.py").main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench_quality: error:") and words in err, err


@pytest.mark.slow
def test_token_ids_file_with_a_checkpoint(structured, tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[1, 5, 9, 3, 7, 2, 4, 8] * 4, [3, 1, 4, 1, 5, 9, 2, 6]]))
    proc = run_bench("--model", str(structured), "--token-ids", str(ids), "--window", "16", "--formats", "none,int8",
                     cache=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 window(s) of up to 16 tokens" in proc.stdout and "int8" in proc.stdout.splitlines()[-2]
