"""A batch job's output file: append-only JSONL that the job recognises as its own.

Each finished record is one line, ``json.dumps(..., ensure_ascii=False)`` of

    {"id": ..., "output_ids": [...], "prompt_tokens": N, "output_tokens": M, "finish_reason": "eos" | "length"}

(with a ``"text"`` after them when the model has a tokenizer), then ``\\n``; the line is
flushed and fsynced before the next record can finish. A job that names itself (``job``:
a hash of its records, model and generation options, see ``offload.batch.job_id``) first
writes the line ``{"offload_job": "<job>"}``, and a rerun refuses a file that names
another job. A rerun reads the file first and accepts only what the same job writes:

* the first line, if it is a job line, names this job (any job, when the reader names none);
  a file without one (written before jobs named themselves) is checked by its records alone;
* every other line that ends in ``\\n`` is a result record of this job: exactly those keys with
  those types, an id of the prompt file (of the same JSON type: ``1.0`` is not ``1``),
  that prompt's length in ``prompt_tokens``, and no id twice;
* the bytes after the last ``\\n``, if any, are either

  - a whole result record whose newline was lost: kept, and a newline is written before
    the next record; or
  - a record cut short by a crash: a proper prefix of a line in exactly the writer's form
    (its keys in its order, its separators) for an id that is not done yet, or of this job's
    job line in a file that holds nothing else. Only these bytes are ever cut, and only when
    the job writes its first record.

Anything else (another job's output, the prompt file itself, a hand-edited or corrupt
file) is refused with one line naming the line at fault, and the file's bytes are left
as they are. While a job runs it holds an exclusive lock on the file, so a second job
on the same output refuses instead of writing every id again.

JSONL is split at ``\\n`` only: JSON strings may hold U+2028, U+2029 and U+0085 raw,
and the writer leaves them raw.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

FINISH_REASONS = ("eos", "length")
RECORD_KEYS = ("id", "output_ids", "prompt_tokens", "output_tokens", "finish_reason")
OPTIONAL_KEYS = ("text",)
JOB_KEY = "offload_job"


def job_line(job: str) -> bytes:
    """The first line of the output of the job named ``job``."""
    return (json.dumps({JOB_KEY: job}) + "\n").encode("utf-8")


def result_line(record_id, prompt_tokens: int, tokens: list[int], reason: str, text: str | None = None) -> bytes:
    """One record as the job writes it (the form that a torn line is recognised by)."""
    out = {"id": record_id, "output_ids": tokens, "prompt_tokens": prompt_tokens, "output_tokens": len(tokens),
           "finish_reason": reason}
    if text is not None:
        out["text"] = text
    return (json.dumps(out, ensure_ascii=False) + "\n").encode("utf-8")


def is_record_id(value) -> bool:
    """Ids are JSON strings or integers (not floats, not booleans)."""
    return isinstance(value, (str, int)) and not isinstance(value, bool)


class ResultFile:
    """The output of a job whose ids and prompt lengths are ``prompt_tokens`` ({id: count}), named ``job``.

    Opening creates the file (and its folder) if missing, takes the lock and reads what is
    done (``done``); ``write_record`` appends one record durably (after the job line, in a new
    file of a named job); ``close`` (or the end of a ``with`` block) releases the lock. Bad or
    foreign content, another job's output among it, raises :class:`InputError` and changes nothing.
    """

    def __init__(self, path, prompt_tokens: Mapping | None = None, job: str | None = None):
        self.path = Path(path)
        self.job = job
        check_output_path(self.path)
        # closing the file (or its garbage collection) releases the lock
        self.file, self.created = _open_locked(self.path)
        self.written = False
        try:
            self.state = _read_state(_read_all(self.file.fileno()), self.path, prompt_tokens or {}, job)
        except BaseException:
            self.close()
            raise
        self.done: set = set(self.state.done)
        # Nothing is kept before the first record (a new file, or only a torn line to cut): the job line comes first.
        self.job_line_due = job is not None and self.state.keep_bytes == 0

    def write_record(self, record_id, prompt_tokens: int, tokens: list[int], reason: str,
                     text: str | None = None) -> None:
        """Append one finished record, flushed to the disk before this returns."""
        line = result_line(record_id, prompt_tokens, tokens, reason, text)
        if self.job_line_due:  # one write: a crash leaves a prefix of the two, which a rerun cuts
            line = job_line(self.job) + line
        self._write(line)
        self.job_line_due, self.written = False, True
        self.done.add(record_id)

    def _write(self, line: bytes) -> None:
        fd = self.file.fileno()
        try:
            if self.state.pending_repair:
                self._repair(fd)
            os.lseek(fd, 0, os.SEEK_END)
            _write_all(fd, line)
            os.fsync(fd)
        except OSError as e:
            raise InputError(f"cannot write to {self.path} ({e.strerror})") from None

    def _repair(self, fd: int) -> None:
        """Cut a torn last record, or end a whole one with its missing newline (before the first append)."""
        os.ftruncate(fd, self.state.keep_bytes)
        size = self.state.keep_bytes
        if self.state.newline_missing:
            os.lseek(fd, 0, os.SEEK_END)
            _write_all(fd, b"\n")
            size += 1
        self.state = _State(self.state.done, size, False, size)

    def close(self) -> None:
        if self.created and not self.written and not self.file.closed:
            # A job that ends before its first record (its plan does not fit, say) leaves no file behind.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.file.close()

    def __enter__(self) -> "ResultFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def finished_ids(path, prompt_tokens: Mapping, job: str | None = None) -> set:
    """The ids done in a job's output, read without changing, locking or creating anything (for ``--plan``)."""
    path = Path(path)
    check_output_path(path)
    if not path.exists():
        return set()
    return set(_read_state(read_regular_file(path, "output"), path, prompt_tokens, job).done)


def check_output_path(path: Path) -> None:
    """Refuse, before any work, an output path that can never hold a job's results."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        _check_parent(path)
        return
    except OSError as e:
        raise InputError(f"cannot use {str(path)!r} as the output file ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"output {str(path)!r} is a directory; give a file name")
    if not stat.S_ISREG(mode):
        raise InputError(f"output {str(path)!r} is not a regular file (a device, pipe or socket)")


def _check_parent(path: Path) -> None:
    """The nearest existing folder above a missing output must be a folder (it is created below it)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"cannot create output {str(path)!r}: {str(parent)!r} is a file, not a directory")
            return


def _open_locked(path: Path, tries: int = 3):
    """The file, open and locked, and whether this opening created it."""
    for _ in range(tries):
        file, created = _open_and_lock(path)
        if _still_at(path, file.fileno()):
            return file, created
        # A job that ended before its first record removed the file it had made between our opening and locking
        # it: records written to that file would reach no path. Open what the path names now.
        file.close()
    raise InputError(f"output {str(path)!r} was removed or replaced while this job opened it, {tries} times; "
                     "is another program writing there?")


def _still_at(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the open file ``fd``."""
    try:
        named = os.stat(path)
    except OSError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _open_and_lock(path: Path):
    # O_NONBLOCK: should a pipe appear here after the check, opening it must not wait for a writer.
    flags = os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, created = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            fd, created = os.open(path, flags), False
    except OSError as e:
        raise InputError(f"cannot open output file {str(path)!r} for writing ({e.strerror})") from None
    file = os.fdopen(fd, "r+b", buffering=0)
    try:
        _require_regular(fd, path)
        _lock(fd, path)
    except BaseException:
        file.close()
        raise
    return file, created


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(f"another job is writing to {str(path)!r}; wait for it to end") from None
    except OSError as e:
        raise InputError(f"cannot lock output file {str(path)!r} ({e.strerror})") from None


def read_regular_file(path: Path, what: str) -> bytes:
    """The bytes of a regular file; a folder, device or pipe (which may never end) is refused unread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InputError(f"cannot read {what} {str(path)!r} ({e.strerror})") from None
    try:
        _require_regular(fd, path, what)
        return _read_all(fd)
    except OSError as e:
        raise InputError(f"cannot read {what} {str(path)!r} ({e.strerror})") from None
    finally:
        os.close(fd)


def _require_regular(fd: int, path: Path, what: str = "output") -> None:
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        raise InputError(f"{what} {str(path)!r} is a directory; give a file")
    if not stat.S_ISREG(mode):
        raise InputError(f"{what} {str(path)!r} is not a regular file (a device, pipe or socket)")


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ---------------------------------------------------------------------- reading what is there


@dataclass(frozen=True)
class _State:
    done: dict  # id -> its line number
    keep_bytes: int  # the bytes before a torn last record (all of them when there is none)
    newline_missing: bool  # the last record is whole but has no newline yet
    size: int

    @property
    def pending_repair(self) -> bool:
        return self.newline_missing or self.keep_bytes < self.size


def _read_state(data: bytes, path: Path, prompt_tokens: Mapping, job: str | None) -> _State:
    """What is done, and what a torn or unterminated last line needs; foreign content raises."""
    end = data.rfind(b"\n") + 1
    lines = data[:end].split(b"\n")[:-1]
    done: dict = {}
    for n, raw in enumerate(lines, start=1):
        if n == 1 and _is_job_line(raw, f"{path}:1", job):
            continue
        _add_done(done, _parse_record(raw, f"{path}:{n}", prompt_tokens), n, f"{path}:{n}")
    tail = data[end:]
    if not tail:
        return _State(done, len(data), False, len(data))
    if not lines and job is not None and job_line(job).startswith(tail):  # a new file's first write, cut short
        return _State(done, 0, False, len(data))
    if _is_cut_short(tail, prompt_tokens, done):
        return _State(done, end, False, len(data))
    n = len(lines) + 1
    _add_done(done, _parse_record(tail, f"{path}:{n}", prompt_tokens), n, f"{path}:{n}")
    return _State(done, len(data), True, len(data))


def _is_job_line(raw: bytes, where: str, job: str | None) -> bool:
    """Whether ``raw`` (the first line) is a job line; one that names another job than ``job`` raises."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False  # not a job line; what it is instead is said when it is read as a record
    if not (isinstance(obj, dict) and list(obj) == [JOB_KEY] and isinstance(obj[JOB_KEY], str)):
        return False
    if job is not None and obj[JOB_KEY] != job:
        raise InputError(f"{where}: written by another job (job {obj[JOB_KEY][:12]}, this is {job[:12]}): its "
                         "prompt file, model (its weight files included) or generation options differ; the file is "
                         "left as it is: give another --output")
    return True


def _add_done(done: dict, record_id, n: int, where: str) -> None:
    if record_id in done:
        raise InputError(f"{where}: id {record_id!r} is already done on line {done[record_id]}; "
                         "a job writes each id once, so this file is not its output (left as it is)")
    done[record_id] = n


def _parse_record(raw: bytes, where: str, prompt_tokens: Mapping):
    """The id of the result record ``raw``; anything else raises, naming the line."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        problem = "not UTF-8 text"
    except (ValueError, RecursionError):
        problem = "not JSON"
    else:
        problem = _record_problem(obj, prompt_tokens)
    if problem:
        raise InputError(f"{where}: not a result record of this job ({problem}); "
                         "the file is left as it is: give another --output")
    return obj["id"]


def _record_problem(obj, prompt_tokens: Mapping) -> str | None:
    """What keeps ``obj`` from being a result record of this job; None when it is one."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    keys = set(obj)
    if not set(RECORD_KEYS) <= keys or not keys <= {*RECORD_KEYS, *OPTIONAL_KEYS}:
        return f"keys {sorted(keys)}, expected {', '.join(RECORD_KEYS)}[, {', '.join(OPTIONAL_KEYS)}]"
    rid, tokens = obj["id"], obj["output_ids"]
    if not is_record_id(rid):
        return f"id {rid!r} is not a string or an integer"
    if rid not in prompt_tokens:
        return f"id {rid!r} is not in the prompt file"
    if not isinstance(tokens, list) or not all(_is_count(t) for t in tokens):
        return "output_ids is not a list of token ids"
    if not _is_count(obj["prompt_tokens"]) or obj["prompt_tokens"] != prompt_tokens[rid]:
        return f"prompt_tokens {obj['prompt_tokens']!r}, but the prompt of id {rid!r} has {prompt_tokens[rid]} tokens"
    if not _is_count(obj["output_tokens"]) or obj["output_tokens"] != len(tokens):
        return f"output_tokens {obj['output_tokens']!r} for {len(tokens)} output_ids"
    if obj["finish_reason"] not in FINISH_REASONS:
        return f"finish_reason {obj['finish_reason']!r}"
    if not isinstance(obj.get("text", ""), str):
        return "text is not a string"
    return None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---------------------------------------------------------------------- records cut short
#
# A torn record is a proper prefix of a line the writer makes. The writer's form is fixed
# (``result_line``), so its prefixes are a regular language: for each piece of the line a
# regex of the whole piece and one of its prefixes; the prefixes of a sequence are the
# whole first pieces followed by a prefix of the next.


@dataclass(frozen=True)
class _Piece:
    whole: str  # regex of the complete piece
    prefix: str  # regex of every prefix of it, from the empty one to the complete one


def _literal(text: str) -> _Piece:
    return _Piece(re.escape(text), "(?:" + "|".join(re.escape(text[:i]) for i in range(len(text), -1, -1)) + ")")


def _sequence(*pieces: _Piece) -> _Piece:
    wholes = [p.whole for p in pieces]
    prefixes = ["".join(wholes[:k]) + p.prefix for k, p in enumerate(pieces)]
    return _Piece("".join(wholes), "(?:" + "|".join(prefixes) + ")")


def _either(*pieces: _Piece) -> _Piece:
    return _Piece("(?:" + "|".join(p.whole for p in pieces) + ")", "(?:" + "|".join(p.prefix for p in pieces) + ")")


_COUNT = _Piece(r"\d+", r"\d*")
_COUNTS = _Piece(r"(?:\d+(?:, \d+)*)?", r"(?:\d+, )*(?:\d*|\d+,)")  # the inside of a list of token ids
_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'  # json.dumps(ensure_ascii=False) escapes
_STRING = _Piece(f'"{_CHAR}*"', rf'(?:"{_CHAR}*(?:\\(?:u[0-9a-fA-F]{{0,3}})?|")?)?')
# Everything after the id: ', "output_ids": [...], ..., "finish_reason": "..."}' with an optional text.
_AFTER_ID = _sequence(
    _literal(', "output_ids": ['), _COUNTS, _literal('], "prompt_tokens": '), _COUNT,
    _literal(', "output_tokens": '), _COUNT, _literal(', "finish_reason": '),
    _either(*(_literal(json.dumps(r)) for r in FINISH_REASONS)),
    _either(_literal("}"), _sequence(_literal(', "text": '), _STRING, _literal("}"))),
)
_AFTER_ID_PREFIX, _AFTER_ID_WHOLE = re.compile(_AFTER_ID.prefix), re.compile(_AFTER_ID.whole)


_HEAD = '{"id": '


def _is_cut_short(tail: bytes, prompt_tokens: Mapping, done: dict) -> bool:
    """Whether ``tail`` (the bytes after the last newline) is a proper prefix of a line the writer
    makes for an id not yet done. A crash can cut inside a UTF-8 character: an incomplete last
    character is allowed, an invalid byte is not."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(tail, final=False)
    except UnicodeDecodeError:
        return False
    if not text:  # a line of ours starts with "{", not with part of a character
        return False
    if len(text) <= len(_HEAD):
        return _HEAD.startswith(text) and any(rid not in done for rid in prompt_tokens)
    if not text.startswith(_HEAD):
        return False
    try:
        rid, end = json.JSONDecoder().raw_decode(text, len(_HEAD))
    except ValueError:
        end = len(text)
    if end == len(text):  # the id itself may be cut short: compare with the ids as the writer spells them
        partial = text[len(_HEAD):]
        return any(rid not in done and _spelled(rid).startswith(partial) for rid in prompt_tokens)
    if not is_record_id(rid) or rid not in prompt_tokens or rid in done or text[len(_HEAD):end] != _spelled(rid):
        return False
    return bool(_AFTER_ID_PREFIX.fullmatch(text, end)) and not _AFTER_ID_WHOLE.fullmatch(text, end)


def _spelled(record_id) -> str:
    return json.dumps(record_id, ensure_ascii=False)
