"""Batch jobs: thousands of prompts from a JSONL file through one model, nothing lost.

Input lines are ``{"id": ..., "prompt": "text"}`` (needs a tokenizer),
``{"id": ..., "prompt_ids": [...]}`` or ``{"id": ..., "messages": [{"role": "user",
"content": "..."}, ...]}`` (laid out by the model's chat template), with an optional
``max_new_tokens``; an id is a JSON string or integer. Other fields ride along unread (a
record's own metadata), but not the names of settings a record cannot make (``temperature``,
``max_tokens``...: the job's flags set them for every record), which are refused, as is a key given twice in
one object (JSON would keep its last value without a word). The file is UTF-8 (a leading
byte order mark is allowed) and is split into lines at ``\n`` only, since JSON
strings may hold U+2028, U+2029 and U+0085 raw. The whole file is checked before
the model is loaded.

Each finished record is appended to the output file (``offload.results``) as one JSON
line, flushed and fsynced, after a first line that names the job (:func:`job_id`). A
rerun of the same job skips the ids already there (a record torn by a crash is cut off
first), so a job killed at any moment and rerun ends with every id exactly once; an
output file that is not the job's own (another job's among them) is refused and left as
it is.

Scheduling (``dynamic``): the row engine has ``batch_size`` rows. Records are
taken longest first, so rows that start together end at similar times, and a
row is refilled as soon as its sequence finishes. Every step streams the weights
once and serves every row: rows still reading their prompt add (a chunk of) it,
the others add one generated token. ``fifo`` is the plain alternative for
comparison: fixed batches in input order, each run until its longest member
finishes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .chat import check_roles
from .errors import ConfigError, InputError, PlanError
from .inputs import check_token_ids, unique_keys
from .memory.budget import format_seconds
from .models.checkpoint import is_gguf
from .options import MAX_COUNT
from .results import ResultFile, is_record_id, read_regular_file
from .sampling import GREEDY, Sampling
from .scheduler.row_engine import RowEngine, Request


@dataclass
class Record:
    id: object
    prompt_ids: list[int]
    max_new_tokens: int
    line: int  # 1-based line number in the input file


def read_records(path, tokenizer, default_max_new_tokens: int, vocab_size: int) -> list[Record]:
    """Parse and check every line of a JSONL prompt file; the first problem raises, naming its line."""
    path = Path(path)
    data = read_regular_file(path, "prompt file")
    try:
        text = data.decode("utf-8-sig")  # drops a leading byte order mark
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None
    records, seen = [], {}
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip(" \t\r"):  # JSON's own whitespace; U+2028 and its kin are not blank
            continue
        where = f"{path}:{n}"
        obj = _parse_line(line, where)
        rid = obj["id"]
        if rid in seen:
            raise InputError(f"{where}: duplicate id {rid!r} (first on line {seen[rid]})")
        seen[rid] = n
        _refuse_settings(obj, where)
        records.append(Record(rid, _prompt_ids(obj, where, tokenizer, vocab_size),
                              _max_new(obj, where, default_max_new_tokens), n))
    if not records:
        raise InputError(f"{path}: no records")
    return records


def _parse_line(line: str, where: str) -> dict:
    """One input line as a JSON object with a usable id."""
    try:
        obj = json.loads(line, object_pairs_hook=unique_keys)
    except InputError as e:  # a key given twice: which of its values was meant is not ours to guess
        raise InputError(f"{where}: {e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: bad JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits, nesting without end
        raise InputError(f"{where}: bad JSON ({type(e).__name__}: {str(e).split(';')[0]})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object")
    if "id" not in obj:
        raise InputError(f"{where}: missing field 'id'")
    if not is_record_id(obj["id"]):
        raise InputError(f"{where}: 'id' must be a string or an integer, got {obj['id']!r}")
    if isinstance(obj["id"], str) and not _is_unicode(obj["id"]):
        raise InputError(f"{where}: 'id' holds an unpaired surrogate ({obj['id']!r}); it cannot be written as UTF-8")
    return obj


def _prompt_ids(obj: dict, where: str, tokenizer, vocab_size: int) -> list[int]:
    if sum(key in obj for key in ("prompt", "prompt_ids", "messages")) != 1:
        raise InputError(f"{where}: give exactly one of 'prompt', 'prompt_ids' and 'messages'")
    if "messages" in obj:
        if tokenizer is None:
            raise InputError(f"{where}: 'messages' need the model's tokenizer.json (and the tokenizers package)")
        try:
            check_roles(obj["messages"])
            ids = tokenizer.apply_chat_template(obj["messages"])
        except (InputError, ConfigError) as e:  # the record's messages, or the template failing on them
            raise type(e)(f"{where}: {e}") from None
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise InputError(f"{where}: 'prompt' must be a string")
        if not _is_unicode(obj["prompt"]):
            raise InputError(f"{where}: 'prompt' holds an unpaired surrogate (\\ud800-\\udfff alone)")
        if tokenizer is None:
            raise InputError(f"{where}: 'prompt' is text but the model has no tokenizer.json "
                             "(or the tokenizers package is missing); give 'prompt_ids'")
        ids = tokenizer.encode(obj["prompt"])
    else:
        ids = obj["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InputError(f"{where}: 'prompt_ids' must be a list of integers")
    check_token_ids(ids, vocab_size, where)
    return ids


def _is_unicode(text: str) -> bool:
    """False for strings that JSON's escapes made but UTF-8 cannot hold (unpaired surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# Settings a record might be taken to make, which the whole job's flags make (read as metadata, they would be ignored
# without a word): named, with the flag, where a record holds one.
JOB_SETTINGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "seed": "--seed",
                "do_sample": "--do-sample", "ignore_eos": "--ignore-eos", "max_tokens": None, "max_new_token": None,
                "max_length": None}


def _refuse_settings(obj: dict, where: str) -> None:
    for key, flag in JOB_SETTINGS.items():
        if key in obj and flag:
            raise InputError(f"{where}: a record cannot set {key!r} ({flag} sets it for the job)")
        if key in obj:
            raise InputError(f"{where}: {key!r} is not a record field; a record's token limit is 'max_new_tokens'")


def _max_new(obj: dict, where: str, default: int) -> int:
    value = obj.get("max_new_tokens", default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{where}: 'max_new_tokens' must be a positive integer")
    if value > MAX_COUNT:
        raise InputError(f"{where}: 'max_new_tokens' must be at most {MAX_COUNT}, got {value}")
    return value


def check_context(records: list[Record], max_seq_len: int) -> None:
    for r in records:
        if len(r.prompt_ids) + r.max_new_tokens > max_seq_len:
            raise InputError(
                f"line {r.line} (id {r.id!r}): {len(r.prompt_ids)} prompt tokens + {r.max_new_tokens} new tokens "
                f"exceed the context of {max_seq_len} tokens"
            )


def prompt_lengths(records: list[Record]) -> dict:
    """{id: prompt tokens}: what the output file's records are checked against."""
    return {r.id: len(r.prompt_ids) for r in records}


def job_id(records: list[Record], model_path, dtype, quantize: str | None, group_size: int | None,
           sampling: Sampling, eos_ids: tuple[int, ...], rounding: str = "search") -> str:
    """A hash of what makes a job's outputs what they are: each record (its line, which seeds its sampling, its
    id, prompt ids and token limit), the model (its folder, config.json, and each weight file's size and time of
    last change: weights rewritten in place are another model), the dtype and quantization, the sampling and the
    stop ids. A rerun of the same command continues the job's output; a change in any of
    these is another job, whose output file is refused. Batch size and schedule are not in it: a rerun may
    change them (outputs are the same in float32); nor are a greedy job's seed, temperature and filters, which
    change nothing it writes (a rerun with or without ``--seed`` continues it)."""
    model_path = Path(model_path)
    config = model_path / "config.json"
    described = {
        "records": [[r.line, r.id, r.prompt_ids, r.max_new_tokens] for r in records],
        "model": str(model_path.resolve()),
        "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "weights": _weight_files(model_path),
        "dtype": str(dtype), "quantize": quantize, "group_size": group_size,
        "sampling": dataclasses.asdict(GREEDY if sampling.greedy else sampling), "eos_ids": list(eos_ids),
    }
    if quantize == "int4" and rounding != "search":  # only where it changes the weights (and old ids stay)
        described["rounding"] = rounding
    return hashlib.sha256(json.dumps(described, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _weight_files(model_path: Path) -> list:
    """[name, size, time of last change] of the model's weight files (a GGUF file: itself): reading every byte of
    a large model to name a job would take minutes."""
    if is_gguf(model_path):
        from .gguf.reader import split_parts

        files = split_parts(model_path)  # a split GGUF file: every part
    elif model_path.is_file():
        files = [model_path]
    elif model_path.is_dir():
        files = sorted(p for p in model_path.iterdir() if p.suffix in (".safetensors", ".gguf") and p.is_file())
    else:
        return []
    return [[p.name, (s := p.stat()).st_size, s.st_mtime_ns] for p in files]


# ---------------------------------------------------------------------- planning for throughput

BATCH_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


@dataclass(frozen=True)
class JobForecast:
    """The predicted time of a job run on ``rows`` rows."""

    rows: int
    passes: int
    prefill_seconds: float  # passes that read prompts (they also decode the rows already running)
    decode_seconds: float
    generated_tokens: int

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (f"{self.rows} row{'s' if self.rows != 1 else ''}: {self.passes} passes, prefill "
                f"{format_seconds(self.prefill_seconds)} + decode {format_seconds(self.decode_seconds)}, "
                f"{self.tokens_per_s:.1f} generated tokens/s")


def forecast_job(shapes: list[tuple[int, int]], rows: int, pass_seconds) -> JobForecast:
    """Predict a job of ``(prompt tokens, new tokens)`` records scheduled as ``run_batch`` does.

    Records are taken longest first and a row is refilled as soon as it frees; a pass reads
    the prompts of the rows just admitted and one token of every running row, and costs
    ``pass_seconds(tokens, keys)`` (``keys``: cached keys attended to, summed over its tokens).
    Every record is assumed to run to its ``max_new_tokens``.
    """
    queue = sorted(shapes, key=lambda s: s[0] + s[1], reverse=True)
    running: list[list[int]] = []  # per row: [tokens still to make, tokens in its cache]
    passes, prefill, decode = 0, 0.0, 0.0
    while queue or running:
        admitted, queue = queue[: rows - len(running)], queue[rows - len(running) :]
        if admitted:  # a pass that reads the new prompts (and makes their first tokens)
            keys = sum(p * (p + 1) // 2 for p, _ in admitted) + sum(cached for _, cached in running)
            prefill += pass_seconds(sum(p for p, _ in admitted) + len(running), keys)
            running = [[left - 1, cached + 1] for left, cached in running] + [[n - 1, p] for p, n in admitted]
            passes += 1
        running = [row for row in running if row[0] > 0]
        if running and not (queue and len(running) < rows):
            steps = min(left for left, _ in running)  # decode passes until the next row frees
            keys = sum(cached for _, cached in running) + len(running) * (steps - 1) / 2  # the middle pass's
            decode += steps * pass_seconds(len(running), keys)
            running = [[left - steps, cached + steps] for left, cached in running if left > steps]
            passes += steps
    return JobForecast(rows, passes, prefill, decode, sum(n for _, n in shapes))


def choose_batch_size(shapes: list[tuple[int, int]], plans_for, most: int) -> tuple[JobForecast, list[JobForecast]]:
    """The number of rows, and with it the placement, that makes the job's tokens soonest.

    ``plans_for(rows)`` gives every rank's plan for that many KV cache rows (a larger batch
    leaves less memory for resident layers, so more streaming) or raises ``PlanError``; each
    candidate is forecast with its own plans. Returns the best and every forecast made.
    """
    forecasts = []
    for rows in sorted({r for r in BATCH_CANDIDATES if r <= most} | {most}):
        try:
            plans = plans_for(rows)
        except PlanError:
            if not forecasts:
                raise
            break  # more rows fit no better
        cost = lambda tokens, keys: max(p.pass_seconds(tokens, keys) for p in plans)  # noqa: E731
        forecasts.append(forecast_job(shapes, rows, cost))
    return max(forecasts, key=lambda f: f.tokens_per_s), forecasts


# ---------------------------------------------------------------------- running


@dataclass
class JobSummary:
    records: int = 0
    skipped: int = 0  # already in the output file
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    occupancy: float = 0.0  # the share of row-steps in which a row held a record
    tokens_per_pass: float = 0.0  # tokens a row gained per pass after its prompt (above 1: speculative decoding)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (
            f"{self.records} records ({self.skipped} already done), {self.prompt_tokens} prompt tokens, "
            f"{self.generated_tokens} generated tokens in {self.seconds:.1f} s: "
            f"{self.tokens_per_s:.1f} tokens/s, {self.records / max(self.seconds, 1e-9):.2f} records/s, "
            f"{self.steps} steps, rows busy {100 * self.occupancy:.0f}% of the time"
            + (f", {self.tokens_per_pass:.2f} tokens per row and pass" if self.tokens_per_pass > 1 else "")
        )


def run_batch(model, records: list[Record], results: ResultFile | None, batch_size: int,
              sampling: Sampling = GREEDY, eos_ids: tuple[int, ...] = (), tokenizer=None,
              schedule: str = "dynamic", progress: bool = True) -> JobSummary:
    """Run every record not yet in ``results``; ``results`` is None on ranks that do not write.

    Record ``r`` samples with the seed ``seed + r.line``, so its output does not depend on
    which records share its steps, nor on a rerun. With a draft, a sampled record's may: its draft
    lengths follow the acceptance measured over the records before it, and they change which
    random numbers its tokens take (their distribution stays the model's; greedy output is the same).
    """
    done = results.done if results is not None else set()
    todo = [r for r in records if r.id not in done]
    summary = JobSummary(records=len(todo), skipped=len(records) - len(todo),
                         prompt_tokens=sum(len(r.prompt_ids) for r in todo))
    engine = RowEngine(model, rows=batch_size)
    if schedule == "dynamic":  # longest first: rows that start together end at similar times
        waves = [sorted(todo, key=lambda r: len(r.prompt_ids) + r.max_new_tokens, reverse=True)]
    else:  # fifo: fixed batches in input order, each until its longest member ends
        waves = [todo[k : k + len(engine.rows)] for k in range(0, len(todo), len(engine.rows))]
    bar = tqdm(total=len(todo), unit="prompt", desc="batch", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for wave in waves:
            for r in wave:
                engine.submit(Request(tuple(r.prompt_ids), r.max_new_tokens, sampling.with_seed_offset(r.line),
                                      eos_ids, key=r))
            while engine.busy:
                for row, _ in engine.step():
                    if row.finish_reason is not None:
                        _write(results, row.request.key, row.tokens, row.finish_reason, tokenizer)
                        summary.generated_tokens += len(row.tokens)
                        bar.update(1)
                        rate = summary.generated_tokens / max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    summary.steps = engine.stats.steps
    summary.occupancy = engine.stats.busy_row_steps / max(engine.stats.steps * len(engine.rows), 1)
    summary.tokens_per_pass = engine.stats.tokens_per_pass
    return summary


def _write(results: ResultFile | None, record: Record, tokens: list[int], reason: str, tokenizer) -> None:
    if results is None:
        return
    shown = tokens[:-1] if reason == "eos" else tokens  # the stop token ends the text: the CLI and server show none
    text = tokenizer.decode(shown) if tokenizer is not None else None
    results.write_record(record.id, len(record.prompt_ids), tokens, reason, text)
