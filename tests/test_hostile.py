"""Hostile input, class by class.

Every class of bad input is refused with one line on stderr and exit status 2 (never a
traceback), and a batch job's output file keeps its bytes unless the job recognises it
as its own. The classes that always behaved are here too, so that they keep behaving.
Each test case's id names its class.

Most cases run the command line in this process (``offload.cli.main``) against a model
directory that holds only ``config.json``: a refusal there proves the check ran before any
weights were read. The few cases that need a process of their own (signals, the script's
entry point, concurrent jobs) run ``scripts/run_offloaded.py`` in a subprocess.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload
from offload.batch import read_records
from offload.cli import main
from offload.errors import ConfigError, InputError, OffloadError
from offload.results import ResultFile, finished_ids, result_line

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_offloaded.py"
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ODD_LINE_BREAKS = "\u2028\u2029\u0085"  # JSON allows them raw in strings; str.splitlines breaks at them


def refused(capsys, argv) -> str:
    """Run the CLI in this process; it must exit 2 with exactly one line on stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("run_offloaded: error:") and "Traceback" not in err, err
    return err


def run_script(*args, cache_dir, env=None, timeout=300, **kw):
    env = {**os.environ, "OFFLOAD_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, **kw)


def one_line_exit_2(done) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def bare(tiny, tmp_path_factory) -> Path:
    """The tiny model's config.json alone: it can be planned, but loading it would fail."""
    directory = tmp_path_factory.mktemp("bare")
    shutil.copy(tiny / "config.json", directory / "config.json")
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------- flags


FLAG_CASES = [
    pytest.param(["--max-seq-len", "0"], "max_seq_len must be a positive integer", id="max-seq-len-zero"),
    pytest.param(["--max-seq-len", "-8"], "max_seq_len must be a positive integer", id="max-seq-len-negative"),
    pytest.param(["--max-seq-len", "9" * 400], "max_seq_len must be at most", id="max-seq-len-400-digits"),
    pytest.param(["--max-batch", "0"], "max_batch must be a positive integer", id="max-batch-zero"),
    pytest.param(["--max-step-tokens", "0"], "max_step_tokens must be a positive integer", id="max-step-tokens-zero"),
    pytest.param(["--slots", "0"], "slots must be a positive integer", id="slots-zero"),
    pytest.param(["--slots", "-1"], "slots must be a positive integer", id="slots-negative"),
    pytest.param(["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer", id="max-new-tokens-zero"),
    pytest.param(["--max-new-tokens", "-3"], "--max-new-tokens must be a positive integer",
                 id="max-new-tokens-negative"),
    pytest.param(["--tp", "0"], "tp must be a positive integer", id="tp-zero"),
    pytest.param(["--top-p", "0"], "top_p must be in (0, 1]", id="top-p-zero"),
    pytest.param(["--top-p", "1.5"], "top_p must be in (0, 1]", id="top-p-above-one"),
    pytest.param(["--top-p", "nan"], "top_p must be in (0, 1]", id="top-p-nan"),
    pytest.param(["--top-k", "-1"], "top_k must be an integer >= 0", id="top-k-negative"),
    pytest.param(["--temperature", "-1"], "temperature must be a number >= 0", id="temperature-negative"),
    pytest.param(["--temperature", "nan"], "temperature must be a number >= 0", id="temperature-nan"),
    pytest.param(["--temperature", "inf"], "temperature must be a number >= 0", id="temperature-inf"),
    pytest.param(["--temperature", "1e-320"], "beyond float32's range", id="temperature-underflows"),
    pytest.param(["--temperature", "1e300"], "beyond float32's range", id="temperature-overflows"),
    pytest.param(["--seed", "-1"], "seed must be an integer in [0, 2**64)", id="seed-negative"),
    pytest.param(["--seed", str(2**64)], "seed must be an integer in [0, 2**64)", id="seed-past-64-bits"),
    pytest.param(["--output", "out.jsonl"], "--output goes with --prompts", id="output-without-prompts"),
    pytest.param(["--device", "foo"], "unknown device 'foo'", id="device-unknown"),
    pytest.param(["--device", "meta"], "device meta is not supported", id="device-meta"),
    pytest.param(["--device", "mps"], "device mps is not supported", id="device-mps"),
    pytest.param(["--device", "cuda:7"], "cuda:7", id="device-cuda-absent"),
    pytest.param(["--gpu-memory", "9" * 400], "more bytes than any machine has", id="budget-400-digits"),
    pytest.param(["--cpu-memory", "1" + "0" * 30 + "GiB"], "more bytes than any machine has", id="budget-huge"),
    pytest.param(["--gpu-memory=-1GiB"], "cannot parse", id="budget-negative"),
    pytest.param(["--gpu-memory", "nan"], "cannot parse", id="budget-nan"),
    pytest.param(["--gpu-memory", "1e999"], "cannot parse", id="budget-exponent"),
    pytest.param(["--peer-memory", "cuda:1=" + "9" * 400], "more bytes than any machine has",
                 id="peer-budget-400-digits"),
    pytest.param(["--dtype", "int8"], "unsupported dtype", id="dtype-unknown"),
    pytest.param(["--no-such-flag"], "unrecognized arguments", id="flag-unknown"),
    pytest.param(["--prompt-ids", ""], "the prompt is empty", id="prompt-ids-empty"),
    pytest.param(["--prompt-ids", "1,x"], "comma-separated integers", id="prompt-ids-not-integers"),
]


@pytest.mark.parametrize("argv, words", FLAG_CASES)
def test_bad_flag_is_one_line_before_loading(bare, capsys, argv, words):
    assert words in refused(capsys, ["--model", str(bare), "--prompt-ids", "1,2", *argv])


def test_batch_size_zero_is_refused(bare, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt_ids": [1, 2]}])
    err = refused(capsys, ["--model", str(bare), "--prompts", str(prompts), "--output", str(tmp_path / "out.jsonl"),
                           "--batch-size", "0", "--plan"])
    assert "--batch-size must be >= 1" in err


def test_model_given_as_a_file(tiny, capsys):
    err = refused(capsys, ["--model", str(tiny / "config.json"), "--prompt-ids", "1"])
    assert "is a file; give the checkpoint directory" in err


def test_missing_model(tmp_path, capsys):
    assert "does not exist" in refused(capsys, ["--model", str(tmp_path / "nowhere"), "--prompt-ids", "1"])


def test_cli_temperature_zero_asks_for_greedy_decoding():
    from offload.cli import _sampling, build_parser

    assert _sampling(build_parser().parse_args(["--temperature", "0", "--seed", "3"])).greedy
    assert not _sampling(build_parser().parse_args(["--temperature", "0.5"])).greedy


@pytest.mark.slow
def test_temperature_zero_is_greedy(tiny, model, capsys):
    def ids(*flags):
        assert main(["--model", str(tiny), "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--quiet",
                     "--ignore-eos", *flags]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("output ids:"))

    assert ids("--temperature", "0", "--seed", "3", "--top-k", "5") == ids()
    greedy = model.generate([[5, 6, 7]], max_new_tokens=6, ignore_eos=True)
    for temperature in (0, 1e-40):  # a tiny temperature runs, and is all but greedy
        sampled = model.generate([[5, 6, 7]], max_new_tokens=6, ignore_eos=True, do_sample=True,
                                 temperature=temperature, seed=3)
        assert sampled == greedy


def test_half_set_torchrun_environment(bare, capsys, monkeypatch):
    base = ["--model", str(bare), "--prompt-ids", "1", "--tp", "2"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert "RANK, MASTER_ADDR, MASTER_PORT not set" in refused(capsys, base)
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setenv("RANK", "x")
    assert "RANK='x' is not an integer" in refused(capsys, base)
    monkeypatch.setenv("RANK", "2")
    assert "RANK=2 is outside WORLD_SIZE=2" in refused(capsys, base)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert "tp=2 but WORLD_SIZE=4" in refused(capsys, base)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "99999")
    assert "not a port number" in refused(capsys, base)


# ---------------------------------------------------------------------- the prompt file


PROMPT_FILE_CASES = [
    pytest.param(b"", "no records", id="empty-file"),
    pytest.param(b"\n  \t\r\n", "no records", id="only-blank-lines"),
    pytest.param(b"\xff\xfe{}\n", "not UTF-8", id="not-utf-8"),
    pytest.param(b'{"id": 1, "prompt_ids": [1]\n', "bad JSON", id="bad-json"),
    pytest.param(b'{"id": 1, "prompt_ids": [1]}\n\xef\xbb\xbf{"id": 2, "prompt_ids": [1]}\n', "bad JSON",
                 id="byte-order-mark-inside"),
    pytest.param(b'{"id": ' + b"7" * 5000 + b', "prompt_ids": [1]}\n', "bad JSON", id="integer-of-5000-digits"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000 + b"\n", "bad JSON", id="nesting-without-end"),
    pytest.param(b'{"id": 1.0, "prompt_ids": [1]}\n', "'id' must be a string or an integer", id="float-id"),
    pytest.param(b'{"id": true, "prompt_ids": [1]}\n', "'id' must be a string or an integer", id="bool-id"),
    pytest.param(b'{"id": null, "prompt_ids": [1]}\n', "'id' must be a string or an integer", id="null-id"),
    pytest.param(b'{"id": "\\ud800", "prompt_ids": [1]}\n', "unpaired surrogate", id="id-lone-surrogate"),
    pytest.param(b'{"id": 1, "prompt": "a\\udfffb"}\n', "unpaired surrogate", id="prompt-lone-surrogate"),
    pytest.param(b'{"id": 1, "prompt_ids": [1, true]}\n', "list of integers", id="bool-token-id"),
    pytest.param(b'{"id": 1, "prompt_ids": [1.0]}\n', "list of integers", id="float-token-id"),
    pytest.param(b'{"id": 1, "prompt_ids": [1], "max_new_tokens": 1e400}\n', "positive integer",
                 id="max-new-tokens-infinite"),
    pytest.param(b'{"id": 1, "prompt_ids": [1], "max_new_tokens": true}\n', "positive integer",
                 id="max-new-tokens-bool"),
    pytest.param(b'{"id": 1, "prompt_ids": [1]}\n{"id": 1, "prompt_ids": [2]}\n', "duplicate id 1",
                 id="duplicate-id"),
]


@pytest.mark.parametrize("content, words", PROMPT_FILE_CASES)
def test_bad_prompt_file_is_one_line(bare, tmp_path, capsys, content, words):
    prompts = tmp_path / "in.jsonl"
    prompts.write_bytes(content)
    err = refused(capsys, ["--model", str(bare), "--prompts", str(prompts), "--output", str(tmp_path / "out.jsonl")])
    assert words in err
    assert not (tmp_path / "out.jsonl").exists()  # input is checked before the output is touched


@pytest.mark.parametrize("kind", ["directory", "device", "fifo", "missing"])
def test_prompt_file_that_is_no_regular_file(bare, tmp_path, capsys, kind):
    path = {"directory": tmp_path, "device": Path("/dev/zero"), "missing": tmp_path / "nowhere.jsonl",
            "fifo": tmp_path / "fifo"}[kind]
    if kind == "fifo":
        os.mkfifo(path)  # reading it would wait for a writer forever
    err = refused(capsys, ["--model", str(bare), "--prompts", str(path), "--output", str(tmp_path / "out.jsonl")])
    assert {"directory": "is a directory", "device": "not a regular file", "fifo": "not a regular file",
            "missing": "No such file"}[kind] in err


def test_line_breaks_inside_json_strings_are_not_line_ends(tmp_path):
    rows = [{"id": f"a{ODD_LINE_BREAKS}b", "prompt_ids": [1]}, {"id": 2, "prompt": f"x{ODD_LINE_BREAKS}y"},
            {"id": "\u2028", "prompt_ids": [3, 4], "max_new_tokens": 2}]
    tokenizer = _Chars()
    records = read_records(write_jsonl(tmp_path / "in.jsonl", rows), tokenizer, 5, 1024)
    assert [r.id for r in records] == [f"a{ODD_LINE_BREAKS}b", 2, "\u2028"]
    assert records[1].prompt_ids == tokenizer.encode(f"x{ODD_LINE_BREAKS}y")
    assert [r.line for r in records] == [1, 2, 3]


def test_a_leading_byte_order_mark_and_crlf_line_ends_are_accepted(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": 1, "prompt_ids": [1]}\r\n\r\n{"id": "2", "prompt_ids": [2]}\r\n')
    assert [r.id for r in read_records(path, None, 4, 1024)] == [1, "2"]


class _Chars:
    """A tokenizer of one id per character (code point modulo 1000), for prompts of any text."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 1000 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


# ---------------------------------------------------------------------- the output file

PROMPTS = [{"id": 1, "prompt_ids": [5, 6, 7]}, {"id": "a", "prompt_ids": [8, 9]},
           {"id": f"b{ODD_LINE_BREAKS}", "prompt_ids": [10]}]
LENGTHS = {1: 3, "a": 2, f"b{ODD_LINE_BREAKS}": 1}


def record(rid=1, **changes) -> dict:
    out = {"id": rid, "output_ids": [11, 12], "prompt_tokens": LENGTHS.get(rid, 3), "output_tokens": 2,
           "finish_reason": "length", "text": "x\u2028y"}
    out.update(changes)
    return {k: v for k, v in out.items() if v is not _DROP}


_DROP = object()


def line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


OURS = result_line(1, 3, [11, 12], "length", "x\u2028y")

OUTPUT_CASES = [
    pytest.param(b"hello world", "not JSON", id="foreign-text-without-newline"),
    pytest.param(b'{"id": 1, "score": 0.5}\n', "keys", id="foreign-jsonl-with-ids"),
    pytest.param(line(record(1.0)), "id 1.0 is not a string or an integer", id="float-id"),
    pytest.param(line(record(True)), "id True is not a string or an integer", id="bool-id"),
    pytest.param(line(record("1")), "id '1' is not in the prompt file", id="string-id-for-an-integer-id"),
    pytest.param(line(record("zzz")), "id 'zzz' is not in the prompt file", id="id-of-another-job"),
    pytest.param(OURS + OURS, "already done on line 1", id="duplicate-id"),
    pytest.param(line(record(prompt_tokens=9)), "prompt_tokens 9", id="other-prompt"),
    pytest.param(line(record(finish_reason=_DROP)), "keys", id="missing-key"),
    pytest.param(line(record(score=1)), "keys", id="extra-key"),
    pytest.param(line(record(output_tokens=5)), "output_tokens 5", id="output-tokens-mismatch"),
    pytest.param(line(record(finish_reason="stop")), "finish_reason 'stop'", id="unknown-finish-reason"),
    pytest.param(line(record(text=5)), "text is not a string", id="text-not-a-string"),
    pytest.param(line(record(output_ids=["x", "y"])), "output_ids", id="output-ids-not-ids"),
    pytest.param(line(record(output_ids=[-1, 2])), "output_ids", id="output-ids-negative"),
    pytest.param(line(record(prompt_tokens=3.0)), "prompt_tokens 3.0", id="float-count"),
    pytest.param(OURS + b"\n", "not JSON", id="blank-line"),
    pytest.param(b"\xff" + OURS, "not UTF-8", id="not-utf-8"),
    pytest.param(b"\xef\xbb\xbf" + OURS, "not JSON", id="byte-order-mark"),
    pytest.param(b"[1, 2]\n", "not a JSON object", id="json-but-not-an-object"),
    pytest.param(OURS + OURS[:25], "not JSON", id="torn-record-of-a-done-id"),
    pytest.param(OURS + b'{"id": "a", "output_ids": [1, x', "not JSON", id="tail-that-no-writer-makes"),
    pytest.param(OURS + b"\x00" * 32, "not JSON", id="zeros-after-a-crash"),
    pytest.param(OURS + b'{"id": "a", "output_ids": [], "prompt_tokens": 2, "output_tokens": 0, '
                 b'"finish_reason": "eos"}  x', "not JSON", id="whole-record-with-trailing-bytes"),
]


@pytest.mark.parametrize("content, words", OUTPUT_CASES)
@pytest.mark.parametrize("plan", [False, True], ids=["run", "plan"])
def test_an_output_that_is_not_the_jobs_own_is_refused_and_kept(bare, tmp_path, capsys, content, words, plan):
    prompts = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    out = tmp_path / "out.jsonl"
    out.write_bytes(content)
    err = refused(capsys, ["--model", str(bare), "--prompts", str(prompts), "--output", str(out),
                           *(["--plan"] if plan else [])])
    assert words in err and "out.jsonl:" in err
    assert out.read_bytes() == content


def test_the_prompt_file_as_output_is_refused_and_kept(bare, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    before = prompts.read_bytes()
    assert "is the prompt file" in refused(capsys, ["--model", str(bare), "--prompts", str(prompts),
                                                    "--output", str(prompts)])
    assert prompts.read_bytes() == before


def _output_path(tmp_path: Path, kind: str) -> Path:
    if kind == "directory":
        return tmp_path
    if kind == "under-a-regular-file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "out.jsonl"
    if kind == "fifo":
        os.mkfifo(tmp_path / "fifo")
        return tmp_path / "fifo"
    if kind == "unwritable-file":
        (tmp_path / "ro.jsonl").write_bytes(b"")
        (tmp_path / "ro.jsonl").chmod(0o444)
        return tmp_path / "ro.jsonl"
    if kind == "unwritable-folder":
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        return tmp_path / "ro" / "out.jsonl"
    return Path(kind)  # a device


OUTPUT_PATH_CASES = [
    pytest.param("directory", "is a directory", id="directory"),
    pytest.param("under-a-regular-file", "is a file, not a directory", id="under-a-regular-file"),
    pytest.param("fifo", "not a regular file", id="fifo"),
    pytest.param("/dev/full", "not a regular file", id="dev-full"),
    pytest.param("/dev/null", "not a regular file", id="dev-null"),
    pytest.param("unwritable-file", "Permission denied", id="unwritable-file",
                 marks=pytest.mark.skipif(AS_ROOT, reason="root writes read-only files")),
    pytest.param("unwritable-folder", "Permission denied", id="unwritable-folder",
                 marks=pytest.mark.skipif(AS_ROOT, reason="root writes into read-only folders")),
]


@pytest.mark.parametrize("kind, words", OUTPUT_PATH_CASES)
def test_an_unusable_output_path_is_refused_before_loading(bare, tmp_path, capsys, kind, words):
    prompts = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    out = _output_path(tmp_path, kind)
    assert words in refused(capsys, ["--model", str(bare), "--prompts", str(prompts), "--output", str(out)])


def test_a_second_job_on_a_locked_output_is_refused(bare, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    out = tmp_path / "out.jsonl"
    out.write_bytes(OURS)
    with open(out, "rb") as holder:  # as a running job holds it
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = refused(capsys, ["--model", str(bare), "--prompts", str(prompts), "--output", str(out)])
    assert "another job is writing to" in err
    assert out.read_bytes() == OURS
    ResultFile(out, LENGTHS).close()  # the lock went with its holder


def test_plan_reads_a_torn_output_without_changing_it(bare, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    out = tmp_path / "out.jsonl"
    content = OURS + result_line("a", 2, [3, 4, 5], "eos")[:30]
    out.write_bytes(content)
    assert main(["--model", str(bare), "--prompts", str(prompts), "--output", str(out), "--plan",
                 "--batch-size", "2"]) == 0
    assert out.read_bytes() == content
    assert finished_ids(out, LENGTHS) == {1}
    assert main(["--model", str(bare), "--prompts", str(prompts), "--output", str(tmp_path / "never.jsonl"),
                 "--plan", "--batch-size", "2"]) == 0
    assert not (tmp_path / "never.jsonl").exists()  # planning creates no file


def test_a_torn_record_is_a_proper_prefix_of_a_line_the_writer_makes(tmp_path):
    """The rule that decides what may be cut: a proper prefix of a line in the writer's form, for an
    id not done yet. A whole record without its newline is kept; one byte the writer never makes
    (a raw NUL) after any prefix makes it foreign."""
    path = tmp_path / "out.jsonl"
    for rid, text in [(1, None), ("a", "é\u2028\\\"\n\x01"), (f"b{ODD_LINE_BREAKS}", "")]:
        before = b"" if rid == 1 else OURS
        written = result_line(rid, LENGTHS[rid], [0, 17, 345], "eos", text)
        for cut in range(1, len(written)):
            path.write_bytes(before + written[:cut])
            with ResultFile(path, LENGTHS) as results:
                assert (rid in results.done) == (cut == len(written) - 1), (rid, cut)  # whole but for "\n"
            assert path.read_bytes() == before + written[:cut]  # nothing changes until a record is written
            path.write_bytes(before + written[:cut] + b"\x00")
            with pytest.raises(InputError, match="not a result record"):
                ResultFile(path, LENGTHS)


def test_a_whole_last_record_without_its_newline_is_kept_and_ended(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(OURS[:-1])
    results = ResultFile(path, LENGTHS)
    assert results.done == {1}
    results.write_record("a", 2, [1], "eos")
    results.close()
    assert path.read_bytes() == OURS + result_line("a", 2, [1], "eos")


def test_a_torn_record_is_cut_only_when_the_job_writes(tmp_path):
    path = tmp_path / "out.jsonl"
    torn = OURS + result_line("a", 2, [1, 2], "length", "zz")[:-9]
    path.write_bytes(torn)
    results = ResultFile(path, LENGTHS)
    assert results.done == {1} and path.read_bytes() == torn
    results.write_record("a", 2, [1, 2], "length", "zz")
    results.close()
    assert path.read_bytes() == OURS + result_line("a", 2, [1, 2], "length", "zz")


@pytest.mark.slow
def test_a_whole_record_without_newline_is_kept_by_a_real_job(tiny, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt_ids": [i + 1, i + 2]} for i in range(4)])
    args = ["--model", str(tiny), "--prompts", str(prompts), "--max-new-tokens", "3", "--quiet"]
    assert main([*args, "--output", str(tmp_path / "full.jsonl")]) == 0
    full = (tmp_path / "full.jsonl").read_bytes()
    first = full[: full.index(b"\n")]  # one whole record, its newline lost
    (tmp_path / "part.jsonl").write_bytes(first)
    assert main([*args, "--output", str(tmp_path / "part.jsonl")]) == 0
    part = (tmp_path / "part.jsonl").read_bytes()
    assert part.startswith(first + b"\n")
    assert sorted(part.split(b"\n")) == sorted(full.split(b"\n"))
    capsys.readouterr()


# ---------------------------------------------------------------------- config.json


def _config_dir(tmp_path: Path, tiny: Path, **changes) -> Path:
    raw = json.loads((tiny / "config.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            raw.pop(key, None)
        else:
            raw[key] = value
    directory = tmp_path / "model"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


CONFIG_CASES = [
    pytest.param({"vocab_size": 0}, "vocab_size must be a positive integer, got 0", id="vocab-size-zero"),
    pytest.param({"vocab_size": "1024"}, "vocab_size must be a positive integer, got '1024'", id="string-for-number"),
    pytest.param({"vocab_size": _DROP}, "missing field 'vocab_size'", id="missing-field"),
    pytest.param({"hidden_size": -128}, "hidden_size must be a positive integer, got -128", id="hidden-negative"),
    pytest.param({"hidden_size": 128.5}, "hidden_size must be a positive integer, got 128.5", id="hidden-float"),
    pytest.param({"vocab_size": 10**30}, "vocab_size must be at most 2147483647", id="vocab-size-absurd"),
    pytest.param({"num_hidden_layers": 2**31 - 1}, "num_hidden_layers must be at most 65536", id="layers-absurd"),
    pytest.param({"intermediate_size": 0}, "intermediate_size must be a positive integer", id="intermediate-zero"),
    pytest.param({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer", id="layers-zero"),
    pytest.param({"num_attention_heads": 0}, "num_attention_heads must be a positive integer", id="heads-zero"),
    pytest.param({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0",
                 id="kv-heads-zero"),
    pytest.param({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3", id="heads-not-divisible"),
    pytest.param({"head_dim": 31}, "head_dim 31 is odd", id="head-dim-odd"),
    pytest.param({"hidden_size": 2, "num_attention_heads": 4, "num_key_value_heads": 4}, "smaller than",
                 id="head-dim-zero"),
    pytest.param({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number, got 0", id="eps-zero"),
    pytest.param({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a positive number", id="eps-string"),
    pytest.param({"rope_theta": 0}, "rope_theta must be a positive number, got 0", id="rope-theta-zero"),
    pytest.param({"rope_theta": 10**400}, "rope_theta must be a positive number", id="rope-theta-400-digits"),
    pytest.param({"rope_theta": -1.0}, "rope_theta must be a positive number, got -1.0", id="rope-theta-negative"),
    pytest.param({"rope_scaling": "linear"}, "rope_scaling must be an object or null, got 'linear'",
                 id="rope-scaling-string"),
    pytest.param({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling.factor must be a positive",
                 id="rope-factor-zero"),
    pytest.param({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4,
                                   "original_max_position_embeddings": 8192}}, "must exceed low_freq_factor",
                 id="rope-llama3-equal-factors"),
    pytest.param({"rope_scaling": {"rope_type": "yarn", "factor": 2}}, "unsupported rope type 'yarn'",
                 id="rope-type-unsupported"),
    pytest.param({"rope_parameters": [1]}, "rope_parameters must be an object or null", id="rope-parameters-list"),
    pytest.param({"rope_parameters": {"rope_theta": "big"}}, "rope_parameters.rope_theta must be a positive number",
                 id="rope-parameters-theta-string"),
    pytest.param({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer",
                 id="max-positions-zero"),
    pytest.param({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'",
                 id="bool-as-string"),
    pytest.param({"attention_bias": 1}, "attention_bias must be true or false", id="bool-as-number"),
    pytest.param({"eos_token_id": "2"}, "eos_token_id must be a token id", id="eos-string"),
    pytest.param({"eos_token_id": [2, -1]}, "eos_token_id must be a token id", id="eos-negative"),
    pytest.param({"architectures": "LlamaForCausalLM"}, "architectures must be a list", id="architectures-string"),
    pytest.param({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture", id="architecture-unsupported"),
    pytest.param({"hidden_act": "gelu"}, "unsupported hidden_act", id="activation-unsupported"),
    pytest.param({"architectures": ["MistralForCausalLM"], "sliding_window": 0},
                 "sliding_window must be a positive integer, got 0", id="sliding-window-zero"),
    pytest.param({"architectures": ["MistralForCausalLM"], "sliding_window": "4096"},
                 "sliding_window must be a positive integer", id="sliding-window-string"),
    pytest.param({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 64, "layer_types": ["full_attention"]},
                 "layer_types must be a list of 8", id="layer-types-short"),
    pytest.param({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 64, "use_sliding_window": True,
                  "max_window_layers": -1}, "max_window_layers must be an integer >= 0", id="window-layers-negative"),
]


@pytest.mark.parametrize("changes, words", CONFIG_CASES)
def test_bad_config_field_is_one_line_naming_it(tiny, tmp_path, capsys, changes, words):
    model = _config_dir(tmp_path, tiny, **changes)
    assert words in refused(capsys, ["--model", str(model), "--plan"])
    with pytest.raises(ConfigError, match="config.json"):
        offload.plan_model(model)


def test_config_with_fewer_layers_than_the_checkpoint_is_refused(tiny, tmp_path, capsys):
    fewer = tmp_path / "fewer"
    shutil.copytree(tiny, fewer)
    raw = json.loads((fewer / "config.json").read_text())
    (fewer / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 4}))
    err = refused(capsys, ["--model", str(fewer), "--prompt-ids", "1", "--quiet"])
    assert "has layers up to 7, but config.json's num_hidden_layers is 4" in err


def test_a_context_past_the_models_positions_is_warned_about(bare, capsys):
    assert main(["--model", str(bare), "--plan", "--max-seq-len", "1024"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: max_seq_len 1024 exceeds the model's max_position_embeddings 512" in err
    assert main(["--model", str(bare), "--plan", "--max-seq-len", "512"]) == 0
    assert capsys.readouterr().err == ""
    with pytest.warns(offload.OffloadWarning, match="max_position_embeddings 512"):
        offload.plan_model(bare, max_seq_len=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("error", offload.OffloadWarning)
        offload.plan_model(bare, max_seq_len=512)


# ---------------------------------------------------------------------- weights


def _broken_weights(tiny: Path, tmp_path: Path, name: str, change) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors[name] = change(tensors[name])
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


def _with(value):
    def change(t):
        t = t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t
    return change


WEIGHT_CASES = [
    pytest.param("model.layers.3.mlp.down_proj.weight", _with(float("nan")), [], "NaN or infinite", id="nan"),
    pytest.param("model.norm.weight", _with(float("inf")), [], "NaN or infinite", id="inf"),
    pytest.param("model.embed_tokens.weight", _with(1e6), ["--dtype", "fp16"], "NaN or infinite values (as float16)",
                 id="overflow-in-the-cast"),
    pytest.param("model.layers.0.self_attn.q_proj.weight", lambda t: t.to(torch.int32), [], "has dtype I32",
                 id="int32-tensor"),
    pytest.param("model.layers.5.input_layernorm.weight", lambda t: t > 0, [], "has dtype BOOL", id="bool-tensor"),
]


@pytest.mark.parametrize("name, change, flags, words", WEIGHT_CASES)
def test_bad_weights_are_refused_naming_the_tensor(tiny, tmp_path, capsys, name, change, flags, words):
    broken = _broken_weights(tiny, tmp_path, name, change)
    err = refused(capsys, ["--model", str(broken), "--prompt-ids", "1", "--quiet", *flags])
    assert words in err and name in err


def test_a_weights_file_that_is_a_pipe_is_refused_unopened(tiny, tmp_path, capsys):
    piped = tmp_path / "piped"
    piped.mkdir()
    shutil.copy(tiny / "config.json", piped / "config.json")
    os.mkfifo(piped / "model.safetensors")  # opening it would wait for a writer forever
    assert "model.safetensors: not a regular file" in refused(capsys, ["--model", str(piped), "--prompt-ids", "1"])


# ---------------------------------------------------------------------- the Python API


@pytest.fixture(scope="module")
def model(tiny):
    with offload.load_model(tiny, max_batch=2, max_seq_len=32, progress=False) as m:
        yield m


API_CASES = [
    pytest.param(lambda m: m.extend([[5000]], [0]), "outside the vocabulary", id="step-token-outside-vocabulary"),
    pytest.param(lambda m: m.extend([[1]], [-1]), "cached must be a count", id="step-negative-cached"),
    pytest.param(lambda m: m.extend([[1.0]], [0]), "list of integers", id="step-float-token"),
    pytest.param(lambda m: m.extend(5, [0]), "one list of token ids per", id="step-not-a-list"),
    pytest.param(lambda m: m.extend([None], [0]), "one list of token ids per", id="step-row-none"),
    pytest.param(lambda m: m.extend(torch.tensor([[1, 2]]), [0]), "one list of token ids per", id="step-tensor"),
    pytest.param(lambda m: m.extend([[1]], 0), "cached must be a list", id="step-cached-not-a-list"),
    pytest.param(lambda m: m.extend([[1]], [30 + 5]), "grow past max_seq_len", id="step-past-the-cache"),
    pytest.param(lambda m: m.generate(torch.tensor([[1.5, 2.0]])), "must hold integers", id="float-input-ids"),
    pytest.param(lambda m: m.generate(torch.tensor([[True]])), "must hold integers", id="bool-input-ids"),
    pytest.param(lambda m: m.generate([[1.0, 2.0]]), "must be integers", id="float-ids-in-lists"),
    pytest.param(lambda m: m.generate("hello"), "shape [batch, seq]", id="text-as-input-ids"),
    pytest.param(lambda m: m.generate([[1]], max_new_tokens="5"), "max_new_tokens must be", id="max-new-tokens-str"),
    pytest.param(lambda m: m.generate([[1]], max_new_tokens=True), "max_new_tokens must be", id="max-new-tokens-bool"),
    pytest.param(lambda m: m.generate([[1]], max_new_tokens=[2, 3]), "2 max_new_tokens values for 1",
                 id="max-new-tokens-per-row-mismatch"),
    pytest.param(lambda m: m.generate([[1]], do_sample=True, temperature=float("nan")), "temperature",
                 id="temperature-nan"),
    pytest.param(lambda m: m.generate([[1]], do_sample=True, seed=2**64), "seed", id="seed-past-64-bits"),
    pytest.param(lambda m: m.generate([[1]], do_sample=True, temperature=10**400), "temperature",
                 id="temperature-400-digits"),
    pytest.param(lambda m: m.generate([[1]], do_sample=True, temperature=1e-320), "beyond float32",
                 id="temperature-underflows"),
    pytest.param(lambda m: m.generate([[1]], do_sample="yes"), "do_sample", id="do-sample-string"),
    pytest.param(lambda m: m.generate([[1]], ignore_eos="no"), "ignore_eos must be True or False",
                 id="ignore-eos-string"),
    pytest.param(lambda m: m.generate([[1]], return_result=1), "return_result must be True or False",
                 id="return-result-number"),
    pytest.param(lambda m: m.generate([[1]], eos_token_id="2"), "eos_token_id must be", id="eos-string"),
    pytest.param(lambda m: m.generate([[1]], eos_token_id=2.0), "eos_token_id must be", id="eos-float"),
    pytest.param(lambda m: m.generate([[1], [2], [3]]), "max_batch=2", id="more-prompts-than-rows"),
    pytest.param(lambda m: m([[-1]]), "outside the vocabulary", id="forward-negative-id"),
]


@pytest.mark.parametrize("call, words", API_CASES)
def test_bad_api_arguments_raise_input_error(model, call, words):
    with pytest.raises(InputError) as info:
        call(model)
    assert words in str(info.value)


LOAD_CASES = [
    pytest.param(dict(max_batch="2"), "max_batch must be a positive integer", id="max-batch-string"),
    pytest.param(dict(slots=-1), "slots must be a positive integer", id="slots-negative"),
    pytest.param(dict(device="foo"), "unknown device", id="device-unknown"),
    pytest.param(dict(device="meta"), "not supported", id="device-meta"),
    pytest.param(dict(foo=1), "unknown option 'foo'", id="option-unknown"),
    pytest.param(dict(options=5), "options must be a LoadOptions", id="options-wrong-type"),
    pytest.param(dict(gpu_memory=float("nan")), "expected a size", id="budget-nan"),
    pytest.param(dict(gpu_memory=float("inf")), "expected a size", id="budget-inf"),
    pytest.param(dict(gpu_memory=10**400), "more bytes than any machine has", id="budget-huge-int"),
    pytest.param(dict(cpu_memory="9" * 400), "more bytes than any machine has", id="budget-400-digits"),
    pytest.param(dict(peer_memory=5), "peer memory", id="peer-memory-number"),
    pytest.param(dict(peer_memory=[5]), "peer memory", id="peer-memory-list-of-numbers"),
    pytest.param(dict(link_bandwidth={"host": -1}), "link_bandwidth", id="bandwidth-negative"),
    pytest.param(dict(dtype=torch.int8), "unsupported dtype", id="dtype-integer"),
    pytest.param(dict(tp=2), "torchrun", id="tp-without-torchrun"),
]


@pytest.mark.parametrize("kwargs, words", LOAD_CASES)
def test_bad_load_arguments_raise_offload_error(bare, kwargs, words):
    with pytest.raises(OffloadError) as info:
        offload.plan_model(bare, **kwargs)
    assert words in str(info.value)


def test_random_weights_must_be_a_seed(bare):
    with pytest.raises(InputError, match="random_weights must be an integer seed"):
        offload.load_model(json.loads((bare / "config.json").read_text()), random_weights="x", progress=False)


def test_rows_that_finish_early_do_not_overrun_the_cache(model):
    result = model.generate([[1, 2, 3], [4]], max_new_tokens=[1, 28], ignore_eos=True, return_result=True)
    assert [len(t) for t in result.tokens] == [1, 28]


@pytest.mark.slow
def test_fifo_batches_with_a_context_just_large_enough(tiny, tmp_path, capsys):
    rows = [{"id": 1, "prompt_ids": [1, 2, 3], "max_new_tokens": 1},
            {"id": 2, "prompt_ids": [1, 2, 3, 4, 5, 6, 7, 8], "max_new_tokens": 20},
            {"id": 3, "prompt_ids": [9], "max_new_tokens": 27}]
    prompts = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert main(["--model", str(tiny), "--prompts", str(prompts), "--output", str(out), "--schedule", "fifo",
                 "--batch-size", "3", "--ignore-eos", "--quiet", "--max-seq-len", "28"]) == 0
    got = {r["id"]: r["output_tokens"] for r in map(json.loads, out.read_text().split("\n")[:-1])}
    assert got == {1: 1, 2: 20, 3: 27}
    capsys.readouterr()


# ---------------------------------------------------------------------- make_checkpoint.py


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
    pytest.param("ckpt", ["--shape", "gpt-5"], "unknown shape", id="shape-unknown"),
    pytest.param("ckpt", ["--device", "foo"], "unknown device", id="device-unknown"),
    pytest.param("ckpt", ["--nope"], "unrecognized arguments", id="flag-unknown"),
])
def test_make_checkpoint_bad_input_is_one_line(make_checkpoint, tmp_path, capsys, out, flags, words):
    (tmp_path / "file").write_bytes(b"keep")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    assert make_checkpoint(["--shape", "tiny", "--out", str(tmp_path / out), *flags]) == 2  # a later --shape wins
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("make_checkpoint: error:") and words in err, err
    assert (tmp_path / "file").read_bytes() == b"keep" and not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------- in a process of its own


@pytest.mark.slow
def test_the_script_refuses_in_one_line_with_status_2(tiny, bare, tmp_path):
    prompts = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    (tmp_path / "out.jsonl").write_bytes(b"not ours")
    cases = [["--model", str(bare), "--prompts", str(prompts), "--output", str(tmp_path / "out.jsonl")],
             ["--model", str(bare), "--prompts", str(prompts), "--output", "/dev/full"],
             ["--model", str(bare), "--prompt-ids", "1", "--max-seq-len", "0"],
             ["--model", str(tiny / "config.json"), "--prompt-ids", "1"]]
    for argv in cases:
        one_line_exit_2(run_script(*argv, cache_dir=tmp_path, timeout=120))
    assert (tmp_path / "out.jsonl").read_bytes() == b"not ours"


@pytest.mark.slow
def test_ctrl_c_while_importing_exits_130_without_a_traceback(tiny, tmp_path):
    env = {**os.environ, "OFFLOAD_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # -X importtime reports each import as it ends: the first torch module means the script is importing.
    job = subprocess.Popen([sys.executable, "-X", "importtime", str(SCRIPT), "--model", str(tiny), "--prompt-ids", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for report in job.stderr:
        if report.rsplit("|", 1)[-1].strip().startswith("torch"):
            job.send_signal(signal.SIGINT)
            break
    rest = job.stderr.read()
    assert job.wait(timeout=60) == 130
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest


@pytest.mark.slow
def test_two_jobs_on_one_output_the_second_refuses(tiny, tmp_path):
    rows = [{"id": i, "prompt_ids": [1 + i % 50, 2]} for i in range(300)]
    prompts = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OFFLOAD_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, str(SCRIPT), "--model", str(tiny), "--prompts", str(prompts), "--output", str(out),
           "--max-new-tokens", "8", "--batch-size", "2", "--quiet"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 2):
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the first job ended before the second started"
    assert "another job is writing to" in one_line_exit_2(second)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    ids = [json.loads(x)["id"] for x in out.read_text().split("\n")[:-1]]
    assert sorted(ids) == list(range(300))


# ---------------------------------------------------------------------- fuzzing


ALPHABET = "ab Zé中\u2028\u2029\u0085\n\r\t\"\\\x00\x1f\x7f\ufeff😀"


def _random_text(rng: random.Random, at_most: int = 12) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, at_most)))


def _random_records(rng: random.Random, n: int) -> list[dict]:
    rows, ids = [], set()
    while len(rows) < n:
        rid = rng.choice([rng.randint(-10**20, 10**20), _random_text(rng)])
        if rid in ids:
            continue
        ids.add(rid)
        row = {"id": rid}
        if rng.random() < 0.5:
            row["prompt"] = _random_text(rng) or "x"
        else:
            row["prompt_ids"] = [rng.randrange(1024) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.3:
            row["max_new_tokens"] = rng.randint(1, 9)
        rows.append(row)
    return rows


def _jsonl(rng: random.Random, rows: list[dict]) -> bytes:
    ensure_ascii = rng.random() < 0.3
    return "".join(json.dumps(r, ensure_ascii=ensure_ascii) + rng.choice(["\n", "\r\n", "\n \n"])
                   for r in rows).encode()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    kind = rng.randrange(5)
    if kind == 0 or not data:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    if kind == 1:
        return data[: rng.randrange(len(data) + 1)]
    if kind == 2:
        i = rng.randrange(len(data))
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]
    if kind == 3:
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return data.replace(b"\n", b"", 1)


def _one_line(error: Exception) -> None:
    assert isinstance(error, InputError) and "\n" not in str(error) and str(error), repr(error)


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_the_prompt_reader(tmp_path, seed):
    """Random bytes, valid files of records with random text, and those truncated or mutated at random
    points: the reader refuses in one line or returns every record exactly once."""
    rng = random.Random(seed)
    path, tokenizer = tmp_path / "in.jsonl", _Chars()
    for trial in range(120):
        rows = _random_records(rng, rng.randint(1, 8))
        data = _jsonl(rng, rows)
        if rng.random() < 0.2:
            data = b"\xef\xbb\xbf" + data
        mutated = trial % 3 != 0
        if mutated:
            data = _mutate(rng, data)
        path.write_bytes(data)
        try:
            records = read_records(path, tokenizer, 4, 1024)
        except InputError as e:
            _one_line(e)
            assert mutated, f"a valid file was refused: {e}"
            continue
        ids = [r.id for r in records]
        assert len(ids) == len(set(ids))
        if not mutated:
            assert ids == [r["id"] for r in rows] and all(type(a) is type(r["id"]) for a, r in zip(ids, rows))


def _finish_job(path: Path, lengths: dict, rng: random.Random) -> None:
    """What a rerun does: open the output, write every record not done, close."""
    results = ResultFile(path, lengths)
    for rid in lengths:
        if rid not in results.done:
            results.write_record(rid, lengths[rid], [rng.randrange(1024) for _ in range(rng.randint(0, 4))],
                                 rng.choice(["eos", "length"]), _random_text(rng))
    results.close()


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_output_recovery(tmp_path, seed):
    """An output written by the job, then truncated, mutated or extended at random: a rerun either
    refuses in one line leaving the bytes as they were, or ends with every id exactly once and
    every whole line it found still in place."""
    rng = random.Random(seed)
    path = tmp_path / "out.jsonl"
    for trial in range(100):
        lengths = {r["id"]: rng.randint(1, 9) for r in _random_records(rng, rng.randint(1, 6))}
        path.write_bytes(b"")
        _finish_job(path, lengths, rng)
        damaged = _mutate(rng, path.read_bytes()) if trial % 4 else path.read_bytes()[: rng.randrange(10**6)]
        path.write_bytes(damaged)
        try:
            _finish_job(path, lengths, rng)
        except InputError as e:
            _one_line(e)
            assert path.read_bytes() == damaged
            continue
        final = path.read_bytes()
        assert final.startswith(damaged[: damaged.rfind(b"\n") + 1])  # no byte of a whole line was cut
        lines = final.split(b"\n")
        if lines[-1] == b"":  # else a whole record without its newline, and nothing left to write after it
            lines.pop()
        ids = [json.loads(x)["id"] for x in lines]
        assert sorted(map(repr, ids)) == sorted(map(repr, lengths))  # each id once, of its own JSON type
        with ResultFile(path, lengths) as reread:
            assert reread.done == set(lengths)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_fuzz_torn_outputs_of_a_real_job(tiny, tmp_path, capsys, seed):
    """The job itself, rerun on its own output cut at random points, ends with the uninterrupted run's records."""
    rng = random.Random(seed)
    rows = [{"id": rng.choice([i, f"r{i}{ODD_LINE_BREAKS}"]), "prompt_ids": [rng.randrange(1024) for _ in range(3)]}
            for i in range(8)]
    prompts = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["--model", str(tiny), "--prompts", str(prompts), "--max-new-tokens", "4", "--quiet"]
    assert main([*args, "--output", str(tmp_path / "full.jsonl")]) == 0
    full = (tmp_path / "full.jsonl").read_bytes()
    for _ in range(3):
        cut = tmp_path / "cut.jsonl"
        cut.write_bytes(full[: rng.randrange(len(full))])
        assert main([*args, "--output", str(cut)]) == 0
        assert sorted(cut.read_bytes().split(b"\n")) == sorted(full.split(b"\n"))
    capsys.readouterr()


def test_fuzz_inputs_are_never_a_traceback_through_the_cli(bare, tmp_path, capsys):
    """A few fuzzed prompt and output files through the command line itself (planning only)."""
    rng = random.Random(99)
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    for _ in range(15):
        rows = [{"id": r["id"], "prompt_ids": [1, 2]} for r in _random_records(rng, 3)]
        prompts.write_bytes(_mutate(rng, _jsonl(rng, rows)) if rng.random() < 0.5 else _jsonl(rng, rows))
        out.write_bytes(_mutate(rng, b"".join(result_line(r["id"], 2, [1], "eos") for r in rows)))
        before = out.read_bytes()
        code = main(["--model", str(bare), "--prompts", str(prompts), "--output", str(out), "--plan",
                     "--batch-size", "1"])
        err = capsys.readouterr().err
        assert code in (0, 2) and "Traceback" not in err
        assert out.read_bytes() == before
        if code == 2:
            assert err.count("\n") == 1


def test_an_integer_id_cut_short_may_be_the_start_of_a_longer_id(tmp_path):
    path = tmp_path / "out.jsonl"
    lengths = {1: 3, 12: 2}
    path.write_bytes(OURS + b'{"id": 1')  # 1 is done; this is the start of 12's record
    with ResultFile(path, lengths) as results:
        assert results.done == {1}
    path.write_bytes(OURS + result_line(12, 2, [1], "eos") + b'{"id": 1')  # no id left that it could start
    with pytest.raises(InputError, match="out.jsonl:3: not a result record"):
        ResultFile(path, lengths)
    path.write_bytes(b'{"id": 1.0, "output_ids": [')  # 1.0 is not how the writer spells an id
    with pytest.raises(InputError, match="out.jsonl:1: not a result record"):
        ResultFile(path, lengths)
