"""Hostile input shared by the test files: the command line's one-line refusal, prompt and output files
a job may meet, and random records and mutations for fuzzing.

Every class of bad input is refused with one line on stderr and exit status 2 (never a
traceback), and a batch job's output file keeps its bytes unless the job recognises it
as its own. Most cases run the command line in the test's process (``offload.cli.main``)
against a model directory that holds only ``config.json`` (the ``bare`` fixture): a
refusal there proves the check ran before any weights were read. Cases that need a
process of their own run ``scripts/run_offloaded.py`` through :func:`run_script`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from offload.cli import main
from offload.errors import InputError
from offload.results import result_line

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_offloaded.py"
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ODD_LINE_BREAKS = "\u2028\u2029\u0085"  # JSON allows them raw in strings; str.splitlines breaks at them
DROP = object()  # a key to leave out


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


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


class Chars:
    """A tokenizer of one id per character (code point modulo 1000), for prompts of any text."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 1000 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


# ---------------------------------------------------------------------- a job's prompt and output files

PROMPTS = [{"id": 1, "prompt_ids": [5, 6, 7]}, {"id": "a", "prompt_ids": [8, 9]},
           {"id": f"b{ODD_LINE_BREAKS}", "prompt_ids": [10]}]
LENGTHS = {1: 3, "a": 2, f"b{ODD_LINE_BREAKS}": 1}
OURS = result_line(1, 3, [11, 12], "length", "x\u2028y")  # a record of the job on PROMPTS


# ---------------------------------------------------------------------- fuzzing

ALPHABET = "ab Zé中\u2028\u2029\u0085\n\r\t\"\\\x00\x1f\x7f\ufeff😀"


def random_text(rng: random.Random, at_most: int = 12) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, at_most)))


def random_records(rng: random.Random, n: int) -> list[dict]:
    rows, ids = [], set()
    while len(rows) < n:
        rid = rng.choice([rng.randint(-10**20, 10**20), random_text(rng)])
        if rid in ids:
            continue
        ids.add(rid)
        row = {"id": rid}
        if rng.random() < 0.5:
            row["prompt"] = random_text(rng) or "x"
        else:
            row["prompt_ids"] = [rng.randrange(1024) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.3:
            row["max_new_tokens"] = rng.randint(1, 9)
        rows.append(row)
    return rows


def jsonl(rng: random.Random, rows: list[dict]) -> bytes:
    ensure_ascii = rng.random() < 0.3
    return "".join(json.dumps(r, ensure_ascii=ensure_ascii) + rng.choice(["\n", "\r\n", "\n \n"])
                   for r in rows).encode()


def mutate(rng: random.Random, data: bytes) -> bytes:
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


def one_line(error: Exception) -> None:
    assert isinstance(error, InputError) and "\n" not in str(error) and str(error), repr(error)
