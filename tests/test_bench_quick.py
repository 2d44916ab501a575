"""The benchmark's --quick mode (what CI runs): the tiny shape on the CPU, every run with positive numbers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAVE_ACCELERATE = all(importlib.util.find_spec(m) for m in ("accelerate", "transformers"))


@pytest.mark.slow
def test_bench_quick_writes_runs_with_positive_numbers(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "benchmarks/bench_offload.py", "--quick", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("bench_offload: ")  # the one-line summary

    data = json.loads(out.read_text())
    names = {row["run"] for row in data["runs"]}
    assert {"resident", "host"} <= names
    if HAVE_ACCELERATE:
        assert "accelerate" in names, data["skipped"]
        assert all(data["weights_check"]["same_next_token"].values())  # the same weights on every side
    for row in data["runs"]:
        for key in ("prefill_tokens_per_s", "decode_ms_per_step", "decode_tokens_per_s", "limit_ms",
                    "achieved_over_limit"):
            assert row[key] > 0, (row["run"], key, row[key])
    host = [row for row in data["runs"] if row["run"] == "host"]
    assert host[0]["layers"]["host"] > 0 and host[0]["layers"]["resident"] > 0  # the quick budget streams some layers
    assert sorted(row["batch"] for row in host) == data["batches"]


@pytest.mark.slow
def test_a_time_limit_still_reports_what_was_measured(tmp_path):
    """SIGTERM (a stage's time limit) after the first batch of the second run: the table and the JSON keep the
    runs and batches measured, and name what the signal stopped."""
    import signal

    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-u", "benchmarks/bench_offload.py", "--quick", "--batch", "1,2",
                             "--json", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("  batch 1:") and any(s.startswith("host, batch 1") for s in seen):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    text = "".join(seen) + rest
    assert proc.returncode == 0, text
    assert "SIGTERM, reporting what was measured" in text
    data = json.loads(out.read_text())
    assert {(row["run"], row["batch"]) for row in data["runs"]} == {("resident", 1), ("resident", 2), ("host", 1)}
    assert "SIGTERM" in data["skipped"]["accelerate"] and "SIGTERM" in data["skipped"]["host, batch 2"]



@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_offload", "bench_prefill", "bench_batch", "bench_throughput",
                                    "moe_host_time"])
def test_bench_bad_input_is_one_line_and_exit_2(script):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, f"benchmarks/{script}.py", "--shape", "no-such-shape"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "no-such-shape" in proc.stderr


@pytest.mark.slow
def test_moe_host_time_measures_a_narrowed_mixture_of_experts():
    proc = subprocess.run([sys.executable, "benchmarks/moe_host_time.py", "--steps", "3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("moe_host_time: qwen3-30b-a3b narrowed") and float(summary.split()[4]) > 0


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ACCELERATE, reason="needs accelerate and transformers")
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_accelerate_runs_a_mixture_of_experts_with_the_same_weights(tmp_path, checkpoint_factory, arch):
    """transformers 5 stacks a layer's experts: the benchmark stacks the checkpoint's per-expert tensors so that
    accelerate computes with the same weights (its next-token logits match ours)."""
    from test_moe import _BASE, MODELS

    _, directory = checkpoint_factory(f"moe-{arch}", arch, "5.x", seed=5, **_BASE, **MODELS[arch])
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "benchmarks/bench_offload.py", "--model", str(directory), "--runs", "host",
                           "--batch", "1", "--prompt-len", "8", "--decode-tokens", "2", "--accelerate-tokens", "2",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert "accelerate" in {row["run"] for row in data["runs"]}, data["skipped"]
    assert all(data["weights_check"]["same_next_token"].values())
