"""The speculative decoding benchmark's --quick mode (what CI runs): the structured model on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args, cache=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if cache is not None:
        env["OFFLOAD_CACHE_DIR"] = str(cache)
    return subprocess.run([sys.executable, "benchmarks/bench_speculative.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quick_times_passes_and_runs_every_draft(structured, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--quick", "--json", str(out), cache=structured.parent)  # the fixture's model: no retraining
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("bench_speculative: best draft")
    data = json.loads(out.read_text())
    assert {(p["batch"], p["width"]) for p in data["passes"]} == {(b, w) for b in (1, 8) for w in (1, 2, 4, 8, 16, 32)}
    assert all(p["ms"] > 0 for p in data["passes"])
    assert len(data["forecast"]) == 10 and all(f["tokens_per_s"] > 0 for f in data["forecast"])
    assert [d["draft"] for d in data["drafts"]] == ["none", "ngram", "int4", "int4@4"]
    assert all(d["identical"] for d in data["drafts"])
    ngram, int4, tree = data["drafts"][1:]
    assert ngram["tokens_per_pass"] > 1 and 0 < ngram["acceptance"] <= 1
    assert ngram["draft_steps_a_pass"] is None  # no model: no steps
    steps = int4["draft_steps_a_pass"]  # a CPU drafts nothing ahead (no graphs): every step after the verdict
    assert steps["ahead"] == steps["served"] == 0 and steps["after"] >= 1
    assert tree["used"] and tree["tokens_per_pass"] > 1  # the int4 draft's trees, four tokens a depth


@pytest.mark.slow
def test_quick_samples_with_a_temperature(structured, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--quick", "--temperature", "0.8", "--drafts", "none,int4@4", "--widths", "1,4", "--json",
                     str(out), cache=structured.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sampled at temperature 0.8 generation" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].endswith("identical tokens: -")
    none, tree = json.loads(out.read_text())["drafts"]
    assert none["identical"] is None and tree["used"] and tree["tokens_per_pass"] > 1


@pytest.mark.slow
def test_profile_reports_each_phase_of_a_pass_and_the_draft_steps(structured, tmp_path):
    """``--profile``: the host's time in each phase of a pass, the draft's steps a pass (a catch-up and the chain's
    steps: at least one where the pass drafted), the depths the speculator chose; the phases are put back after."""
    out = tmp_path / "bench.json"
    proc = run_bench("--quick", "--drafts", "none,int4", "--widths", "1", "--profile", "--json", str(out),
                     cache=structured.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    none, draft = json.loads(out.read_text())["drafts"]
    assert "profile" not in none
    profile = draft["profile"]
    assert set(profile["host_ms_a_pass"]) == {"propose", "verify", "accept", "update"}
    assert all(ms > 0 for ms in profile["host_ms_a_pass"].values())
    assert profile["passes"] > 0 and profile["draft_steps_a_pass"] >= 1
    assert sum(profile["depths"].values()) >= profile["passes"] and all(int(k) >= 0 for k in profile["depths"])
    assert "profile of int4" in proc.stdout


@pytest.mark.slow
def test_every_layer_streams_in_every_run_with_gpu_memory_stream(structured, structured_draft, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--quick", "--gpu-memory", "stream", "--cpu-memory", "1GiB", "--drafts",
                     f"none,ngram,{structured_draft}", "--widths", "1,2", "--json", str(out), cache=structured.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = json.loads(out.read_text())["drafts"]
    assert [set(d["layers"]) for d in runs] == [{"H"}] * 3 and runs[2]["used"]


@pytest.mark.parametrize("args, words", [
    ([], "give --model PATH, --shape NAME or --quick"),
    (["--shape", "no-such-shape"], "unknown shape"),
    (["--quick", "--drafts", "ngram"], "starts with none"),
    (["--quick", "--drafts", "none,int4@5"], "1 to 4 tokens a depth"),
    (["--quick", "--widths", "0,4"], "[1, 65]"),
    (["--quick", "--temperature", "-1"], "--temperature must lie in [0, 10]"),
    (["--quick", "--gpu-memory", "stream"], "--gpu-memory stream needs --cpu-memory"),
    (["--quick", "--slots", "0"], "--slots must be >= 1, got 0"),
    (["--model", "no/such/dir"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(args, words, capsys):
    assert load_script("benchmarks/bench_speculative.py").main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench_speculative: ") and words in err, err
