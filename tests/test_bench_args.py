"""The benchmarks' argument checks: bad input is one line on stderr and status 2, before any model loads.

Each script's ``main`` runs in this process, as ``python benchmarks/SCRIPT.py`` runs it (through
``report_bad_input``); every case here is refused before the script measures or loads anything.
"""

from __future__ import annotations

import pytest

from offload.cli import report_bad_input

from conftest import load_script



@pytest.mark.parametrize("script, args, words", [
    ("bench_batch", ["--shape", "tiny", "--prompt-len", "a,b"], "--prompt-len expects LO,HI"),
    ("bench_batch", ["--shape", "tiny", "--prompt-len", "5"], "--prompt-len expects LO,HI"),
    ("bench_batch", ["--shape", "tiny", "--prompt-len", "10,5"], "--prompt-len needs 1 <= LO <= HI, got 10,5"),
    ("bench_batch", ["--shape", "tiny", "--new-tokens", "0,4"], "--new-tokens needs 1 <= LO <= HI"),
    ("bench_batch", ["--shape", "tiny", "--records", "0"], "--records must be >= 1, got 0"),
    ("bench_batch", ["--shape", "tiny", "--records", "-3"], "--records must be >= 1, got -3"),
    ("bench_batch", ["--shape", "tiny", "--batch-size", "0"], "--batch-size must be >= 1"),
    ("bench_prefill", ["--shape", "tiny", "--prompts", "2x"], "--prompts expects comma-separated ROWSxTOKENS"),
    ("bench_prefill", ["--shape", "tiny", "--prompts", "abc"], "--prompts expects comma-separated ROWSxTOKENS"),
    ("bench_prefill", ["--shape", "tiny", "--prompts", "4x32,0x8"], "rows and tokens must be >= 1, got '0x8'"),
    ("bench_throughput", ["--shape", "tiny", "--sweep", "a"], "--sweep expects comma-separated positive integers such as 8,16,32, got 'a'"),
    ("bench_throughput", ["--shape", "tiny", "--sweep", "0,4"], "--sweep expects comma-separated positive integers such as 8,16,32, got '0,4'"),
    ("bench_throughput", ["--shape", "tiny", "--probe-steps", "0"], "--probe-steps must be >= 1, got 0"),
    ("bench_throughput", ["--shape", "tiny", "--new-tokens", "0"], "--new-tokens must be >= 1, got 0"),
    ("bench_throughput", ["--shape", "tiny", "--records", "0"], "--records must be >= 1"),
    ("bench_throughput", ["--shape", "tiny", "--gpu-memory", "garbage"], "--gpu-memory: cannot parse 'garbage'"),
    ("bench_tp", ["--shape", "tiny", "--tp", "a"], "--tp expects comma-separated positive integers such as 1,2,4, got 'a'"),
    ("bench_tp", ["--shape", "tiny", "--tp", "1,0"], "--tp expects comma-separated positive integers such as 1,2,4, got '1,0'"),
    ("bench_tp", ["--shape", "nosuch"], "unknown shape 'nosuch'"),
    ("bench_offload", ["--quick", "--batch", "1,x"], "--batch expects comma-separated positive integers such as 1,16"),  # here, not in torchrun's workers
    ("moe_host_time", ["--shape", "tiny"], "tiny has no routed experts; give a mixture-of-experts shape: mixtral"),
    ("moe_host_time", ["--steps", "1"], "--steps must be >= 2"),
    ("bench_serve_hostile", ["--quick", "--ttft-bound", "-1"], "--ttft-bound must be a ratio >= 0"),
    ("bench_offload", ["--shape", "tiny", "--runs", "nosuch"], "--runs: unknown 'nosuch'; choose from resident, host"),
    ("bench_offload", ["--shape", "tiny", "--runs", "host eager"], "--runs: unknown 'host eager'"),
    ("bench_offload", ["--shape", "tiny", "--runs", "host int4"], "--runs: unknown 'host int4'"),  # no --quantize
    ("bench_offload", ["--shape", "tiny", "--runs", ","], "--runs: no run named"),
    ("bench_offload", ["--shape", "tiny", "--quantize", "int3"], "--quantize: unknown format 'int3'"),
    ("bench_offload", ["--shape", "tiny", "--quantize", "int8,int3@4GiB"], "--quantize: unknown format 'int3'"),
    ("bench_offload", ["--shape", "tiny", "--quantize", "stored"], "it goes with --model"),
])
def test_bad_input_is_one_line_and_exit_2(script, args, words, capsys):
    module = load_script(f"benchmarks/{script}.py")
    assert report_bad_input(script, lambda: module.main(args)) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith(f"{script}: ") and words in err, err
    assert captured.out == "", captured.out  # refused before the script printed (measured, loaded) anything


def test_bench_offload_takes_a_quantized_run_by_name():
    """--runs "host int4" is one of our runs once --quantize int4 adds it (GPU sessions ask for it so)."""
    module = load_script("benchmarks/bench_offload.py")
    assert module.parse_runs("host int4,host", module.parse_quantize("int4@4GiB", checkpoint=False)) == {
        "host int4", "host"}
    assert module.parse_runs(None, []) is None  # every run
