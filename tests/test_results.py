"""A batch job's output file (``offload.results``): its own records recognised, anything else (another job's
output among it) refused and left as it is, a record torn by a crash cut, the file locked while a job runs."""

from __future__ import annotations

import fcntl
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offload import results
from offload.cli import main
from offload.errors import InputError
from offload.results import ResultFile, finished_ids, job_line, result_line

from hostile import (AS_ROOT, DROP, LENGTHS, ODD_LINE_BREAKS, OURS, PROMPTS, ROOT, SCRIPT, mutate, one_line,
                     one_line_exit_2, random_records, random_text, refused, run_script, write_jsonl)


def record(rid=1, **changes) -> dict:
    out = {"id": rid, "output_ids": [11, 12], "prompt_tokens": LENGTHS.get(rid, 3), "output_tokens": 2,
           "finish_reason": "length", "text": "x\u2028y"}
    out.update(changes)
    return {k: v for k, v in out.items() if v is not DROP}


def line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


OUTPUT_CASES = [
    pytest.param(b"hello world", "not JSON", id="foreign-text-without-newline"),
    pytest.param(b'{"id": 1, "score": 0.5}\n', "keys", id="foreign-jsonl-with-ids"),
    pytest.param(line(record(1.0)), "id 1.0 is not a string or an integer", id="float-id"),
    pytest.param(line(record(True)), "id True is not a string or an integer", id="bool-id"),
    pytest.param(line(record("1")), "id '1' is not in the prompt file", id="string-id-for-an-integer-id"),
    pytest.param(line(record("zzz")), "id 'zzz' is not in the prompt file", id="id-of-another-job"),
    pytest.param(OURS + OURS, "already done on line 1", id="duplicate-id"),
    pytest.param(line(record(prompt_tokens=9)), "prompt_tokens 9", id="other-prompt"),
    pytest.param(line(record(finish_reason=DROP)), "keys", id="missing-key"),
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
    first = full[: full.index(b"\n", full.index(b"\n") + 1)]  # the job line and a whole record, its newline lost
    (tmp_path / "part.jsonl").write_bytes(first)
    assert main([*args, "--output", str(tmp_path / "part.jsonl")]) == 0
    part = (tmp_path / "part.jsonl").read_bytes()
    assert part.startswith(first + b"\n")
    assert sorted(part.split(b"\n")) == sorted(full.split(b"\n"))
    capsys.readouterr()


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
    ids = [json.loads(x)["id"] for x in out.read_text().split("\n")[1:-1]]  # after the line naming the job
    assert sorted(ids) == list(range(300))


def _finish_job(path: Path, lengths: dict, rng: random.Random) -> None:
    """What a rerun does: open the output, write every record not done, close."""
    results = ResultFile(path, lengths)
    for rid in lengths:
        if rid not in results.done:
            results.write_record(rid, lengths[rid], [rng.randrange(1024) for _ in range(rng.randint(0, 4))],
                                 rng.choice(["eos", "length"]), random_text(rng))
    results.close()


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_output_recovery(tmp_path, seed):
    """An output written by the job, then truncated, mutated or extended at random: a rerun either
    refuses in one line leaving the bytes as they were, or ends with every id exactly once and
    every whole line it found still in place."""
    rng = random.Random(seed)
    path = tmp_path / "out.jsonl"
    for trial in range(100):
        lengths = {r["id"]: rng.randint(1, 9) for r in random_records(rng, rng.randint(1, 6))}
        path.write_bytes(b"")
        _finish_job(path, lengths, rng)
        damaged = mutate(rng, path.read_bytes()) if trial % 4 else path.read_bytes()[: rng.randrange(10**6)]
        path.write_bytes(damaged)
        try:
            _finish_job(path, lengths, rng)
        except InputError as e:
            one_line(e)
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


# ---------------------------------------------------------------------- the job that wrote a file

JOB, OTHER = "a" * 64, "b" * 64  # two jobs' names (hashes, see offload.batch.job_id)


def test_a_named_job_writes_its_job_line_first_and_another_job_is_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    with ResultFile(path, LENGTHS, JOB) as results:
        results.write_record(1, 3, [11, 12], "length", "x\u2028y")
        results.write_record("a", 2, [1], "eos")
    written = path.read_bytes()
    assert written == job_line(JOB) + OURS + result_line("a", 2, [1], "eos")
    with ResultFile(path, LENGTHS, JOB) as again:
        assert again.done == {1, "a"}
    with pytest.raises(InputError, match="out.jsonl:1: written by another job [(]job aaaaaaaaaaaa, this is bbbb"):
        ResultFile(path, LENGTHS, OTHER)
    with pytest.raises(InputError, match="written by another job"):
        finished_ids(path, LENGTHS, OTHER)
    assert path.read_bytes() == written
    assert finished_ids(path, LENGTHS) == {1, "a"}  # a reader that names no job takes any job's


def test_a_job_that_removes_its_new_output_while_another_opens_it_leaves_the_other_a_file_at_the_path(
        tmp_path, monkeypatch):
    """A job that ends before its first record removes the output it created. Should that happen after a second job
    opened the file and before it locked it, the second job locked the removed file and wrote every record there."""
    path = tmp_path / "out.jsonl"
    first = ResultFile(path, LENGTHS, JOB)  # a new file, no record yet
    lock = results._lock

    def first_ends_then_lock(fd, where):
        if not first.file.closed:
            first.close()  # removes the file and lets its lock go
        lock(fd, where)

    monkeypatch.setattr(results, "_lock", first_ends_then_lock)
    with ResultFile(path, LENGTHS, JOB) as second:
        second.write_record(1, 3, [11, 12], "length", "x\u2028y")
    assert path.read_bytes() == job_line(JOB) + OURS


def test_a_first_write_cut_short_anywhere_is_cut_and_written_again(tmp_path):
    path = tmp_path / "out.jsonl"
    first = job_line(JOB) + OURS  # what a job writes first, in one write
    for cut in [*range(1, len(job_line(JOB)) + 2), len(first) - 2, len(first) - 1]:  # (records: see above)
        path.write_bytes(first[:cut])
        with ResultFile(path, LENGTHS, JOB) as results:
            results.write_record("a", 2, [1], "eos")
        kept = OURS if cut == len(first) - 1 else b""  # a whole record without its newline is kept
        assert path.read_bytes() == job_line(JOB) + kept + result_line("a", 2, [1], "eos"), cut
    path.write_bytes(job_line(OTHER)[:30])  # another job's line, cut short: not this job's to cut
    with pytest.raises(InputError, match="out.jsonl:1: not a result record"):
        ResultFile(path, LENGTHS, JOB)
    assert path.read_bytes() == job_line(OTHER)[:30]


def test_an_output_from_before_jobs_were_named_is_checked_by_its_records(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(OURS)
    with ResultFile(path, LENGTHS, JOB) as results:
        assert results.done == {1}
        results.write_record("a", 2, [1], "eos")
    assert path.read_bytes() == OURS + result_line("a", 2, [1], "eos")  # no job line in the middle


@pytest.fixture(scope="module")
def job_output(tiny, tmp_path_factory):
    """Prompt files a and b (the same ids and prompt lengths, other prompts: the check of records alone cannot
    tell their outputs apart), and the output of a job on a: (a, b, output file, its bytes, the job's flags)."""
    folder = tmp_path_factory.mktemp("job")
    a = write_jsonl(folder / "a.jsonl", [{"id": i, "prompt_ids": [1 + i, 2]} for i in range(3)])
    b = write_jsonl(folder / "b.jsonl", [{"id": i, "prompt_ids": [7 + i, 9]} for i in range(3)])
    out = folder / "out.jsonl"
    flags = ["--model", str(tiny), "--output", str(out), "--max-new-tokens", "2", "--quiet"]
    assert main([*flags, "--prompts", str(a)]) == 0
    return a, b, out, out.read_bytes(), flags


@pytest.mark.parametrize("other", [
    pytest.param(["b"], id="other-prompt-file"),
    pytest.param(["b", "--plan"], id="other-prompt-file-plan"),
    pytest.param(["a", "--temperature", "0.7", "--seed", "1"], id="sampling"),
    pytest.param(["a", "--ignore-eos"], id="stop-tokens"),
    pytest.param(["a", "--max-new-tokens", "3"], id="token-limit"),
    pytest.param(["a", "--dtype", "bf16"], id="dtype"),
])
def test_another_jobs_output_is_refused_and_left_as_it_is(job_output, capsys, other):
    a, b, out, written, flags = job_output
    assert list(json.loads(written.split(b"\n")[0])) == ["offload_job"]  # the line that names the job
    prompts = {"a": a, "b": b}[other[0]]
    assert "out.jsonl:1: written by another job" in refused(capsys, [*flags, "--prompts", str(prompts), *other[1:]])
    assert out.read_bytes() == written


def test_a_model_whose_weights_were_rewritten_is_another_job(tiny, tmp_path, capsys):
    """Weights replaced in place (the same folder and config.json) make other outputs: the rerun refuses the file
    rather than mix two models' records in it."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = shutil.copytree(tiny, tmp_path / "model")
    prompts = write_jsonl(tmp_path / "a.jsonl", [{"id": i, "prompt_ids": [1 + i, 2]} for i in range(3)])
    flags = ["--model", str(model), "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "2", "--quiet",
             "--prompts", str(prompts)]
    assert main(flags) == 0
    written = (tmp_path / "out.jsonl").read_bytes()
    assert main(flags) == 0  # the same job: done already
    weights = next(model.glob("*.safetensors"))
    state = load_file(weights)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].flip(0).contiguous()
    save_file(state, weights)
    assert "out.jsonl:1: written by another job" in refused(capsys, flags)
    assert (tmp_path / "out.jsonl").read_bytes() == written


def test_every_part_of_a_split_gguf_file_names_the_job(tmp_path):
    from offload.batch import _weight_files

    parts = [tmp_path / f"m-0000{k}-of-00002.gguf" for k in (1, 2)]
    for part in parts:
        part.write_bytes(b"GGUF" + bytes(28))
    before = _weight_files(parts[0])
    assert [row[0] for row in before] == [p.name for p in parts]
    parts[1].write_bytes(b"GGUF" + bytes(60))  # the second part rewritten
    assert _weight_files(parts[0]) != before


@pytest.mark.slow
def test_another_jobs_output_is_refused_by_the_script_and_the_same_job_goes_on(job_output, tmp_path, capsys):
    a, b, out, written, flags = job_output
    done = run_script(*flags, "--prompts", str(b), cache_dir=tmp_path)
    assert "out.jsonl:1: written by another job" in one_line_exit_2(done)
    assert out.read_bytes() == written
    assert main([*flags, "--prompts", str(a), "--batch-size", "2"]) == 0  # the same job on other rows: all done
    assert out.read_bytes() == written
    capsys.readouterr()
