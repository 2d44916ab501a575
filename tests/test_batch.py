"""Batch jobs: input checked up front (every class of bad prompt file), output durable across SIGKILL, results
equal single-prompt runs."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import offload
from offload.batch import ResultFile, prompt_lengths, read_records, run_batch
from offload.cli import main
from offload.errors import InputError

from hostile import ODD_LINE_BREAKS, Chars, jsonl, mutate, one_line, one_line_exit_2, random_records, refused, \
    run_script, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def write_prompts(path: Path, n: int, seed: int = 0, name=lambda i: f"p{i}") -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        length = int(torch.randint(1, 40, (1,), generator=gen))
        record = {"id": name(i), "prompt_ids": torch.randint(0, 1024, (length,), generator=gen).tolist()}
        if i % 4 == 0:
            record["max_new_tokens"] = int(torch.randint(1, 12, (1,), generator=gen))
        records.append(record)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return records


def read_output(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.split("\n")[:-1]]  # JSON strings may hold U+2028 and U+0085
    if list(lines[0]) == ["offload_job"]:  # the line that names the job (a job run from the command line)
        lines.pop(0)
    ids = [r["id"] for r in lines]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["id"]: r for r in lines}


@pytest.mark.parametrize("line, words", [
    ("{not json", "bad JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"prompt_ids": [1]}', "missing field 'id'"),
    ('{"id": 1}', "exactly one of 'prompt', 'prompt_ids' and 'messages'"),
    ('{"id": 1, "prompt_ids": [1], "prompt": "x"}', "exactly one of"),
    ('{"id": 1, "prompt_ids": ["a"]}', "list of integers"),
    ('{"id": 1, "prompt_ids": []}', "empty"),
    ('{"id": 1, "prompt_ids": [5000]}', "outside the vocabulary"),
    ('{"id": 1, "prompt_ids": [1], "max_new_tokens": 0}', "positive integer"),
    ('{"id": 1, "prompt_ids": [1], "temperature": 0.7}', "cannot set 'temperature' (--temperature sets it for"),
    ('{"id": 1, "prompt_ids": [1], "max_new_token": 5}', "'max_new_token' is not a record field"),
    ('{"id": 1, "prompt_ids": [1], "ignore_eos": true}', "cannot set 'ignore_eos' (--ignore-eos sets it for"),
    ('{"id": "a", "prompt_ids": [1]}', "duplicate id 'a'"),
    ('{"id": 1, "prompt_ids": ' + json.dumps(list(range(600))) + "}", "exceed the context"),
])
def test_bad_input_is_refused_before_loading_naming_the_line(tiny, tmp_path, capsys, line, words):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"id": "a", "prompt_ids": [1, 2]}\n' + line + "\n")
    code = main(["--model", str(tiny), "--prompts", str(prompts), "--output", str(tmp_path / "out.jsonl"),
                 "--max-seq-len", "512"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{prompts}:2:" in err or "line 2" in err, err
    assert words in err
    assert not (tmp_path / "out.jsonl").exists()


def test_text_prompts_need_a_tokenizer(tiny, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"id": 1, "prompt": "hello"}\n')
    with pytest.raises(offload.InputError, match="no tokenizer"):
        read_records(prompts, None, 8, 1024)


@pytest.mark.slow
def test_batch_greedy_outputs_equal_single_prompt_runs(tiny, tmp_path):
    write_prompts(tmp_path / "in.jsonl", 12)
    records = read_records(tmp_path / "in.jsonl", None, 6, 1024)
    kw = dict(max_batch=5, max_seq_len=64, max_step_tokens=64)
    needs = offload.plan_model(tiny, **kw).needs
    model = offload.load_model(tiny, **kw, progress=False, cpu_memory="1GiB",
                               gpu_memory=needs.fixed_bytes + 5 * needs.largest_block)  # 3 layers + 2 slots
    assert "host" in model.plan.placement
    results = ResultFile(tmp_path / "out.jsonl", prompt_lengths(records))
    summary = run_batch(model, records, results, batch_size=5, eos_ids=(2,), progress=False)
    results.close()
    assert summary.records == 12 and summary.generated_tokens > 0
    got = read_output(tmp_path / "out.jsonl")
    for r in records:
        single = model.generate([r.prompt_ids], max_new_tokens=r.max_new_tokens, eos_token_id=2, return_result=True)
        assert got[r.id]["output_ids"] == single.tokens[0], r.id
        assert got[r.id]["finish_reason"] == single.finish_reasons[0]


def test_rerun_of_a_finished_job_loads_nothing(tiny, tmp_path, monkeypatch, capsys):
    write_prompts(tmp_path / "in.jsonl", 3)
    args = ["--model", str(tiny), "--prompts", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
            "--max-new-tokens", "2", "--quiet"]
    assert main(args) == 0
    written = (tmp_path / "out.jsonl").read_bytes()
    monkeypatch.setattr("offload.cli.load_model", lambda *a, **k: pytest.fail("a finished job loaded its model"))
    monkeypatch.setattr("offload.cli.prepare", lambda *a, **k: pytest.fail("a finished job planned its model"))
    capsys.readouterr()
    assert main(args) == 0
    assert "nothing to do: the 3 record(s) are all in" in capsys.readouterr().out
    assert main([*args, "--plan"]) == 0  # no forecast for records that are not there
    assert "nothing to do: the 3 record(s) are all in" in capsys.readouterr().out
    assert (tmp_path / "out.jsonl").read_bytes() == written


@pytest.mark.slow
def test_fifo_and_dynamic_schedules_agree(tiny, tmp_path):
    write_prompts(tmp_path / "in.jsonl", 10, seed=1)
    outs = {}
    for schedule in ("dynamic", "fifo"):
        out = tmp_path / f"{schedule}.jsonl"
        assert main(["--model", str(tiny), "--prompts", str(tmp_path / "in.jsonl"), "--output", str(out),
                     "--batch-size", "3", "--schedule", schedule, "--max-new-tokens", "5", "--quiet"]) == 0
        outs[schedule] = read_output(out)
    assert outs["dynamic"] == outs["fifo"]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_a_job_stopped_by_an_error_after_some_records_goes_on_where_it_stopped(structured, tmp_path, monkeypatch,
                                                                              one_thread, sampled):
    """A job that fails after writing some records (a write raising), rerun with another batch size and schedule:
    every id once, each record as an uninterrupted run wrote it (a sampled record's draws are seeded by its line)."""
    from offload.structured import corpus_of

    corpus, gen = corpus_of(structured), torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 16, (12,), generator=gen).tolist()
    lines = [{"id": i if i % 2 else f"r{i}", "prompt_ids": corpus.sample(1, n, seed=i)[0].tolist(),
              "max_new_tokens": 1 + i % 7} for i, n in enumerate(lengths)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    args = ["--model", str(structured), "--prompts", str(tmp_path / "in.jsonl"), "--quiet"]
    args += ["--temperature", "1.5", "--seed", "4"] if sampled else []
    assert main([*args, "--output", str(tmp_path / "whole.jsonl"), "--batch-size", "3"]) == 0
    whole = (tmp_path / "whole.jsonl").read_text()
    write = ResultFile.write_record
    for stop_after in (0, 1, 7):
        out, written = tmp_path / f"stopped-{stop_after}.jsonl", []

        def failing(self, *a, **kw):
            if len(written) == stop_after:
                raise RuntimeError("the job failed here")
            written.append(a[0])
            return write(self, *a, **kw)

        with monkeypatch.context() as patch:
            patch.setattr(ResultFile, "write_record", failing)
            with pytest.raises(RuntimeError, match="the job failed here"):
                main([*args, "--output", str(out), "--batch-size", "2"])
        assert main([*args, "--output", str(out), "--batch-size", "4", "--schedule", "fifo"]) == 0
        assert read_output(out) == read_output(tmp_path / "whole.jsonl"), stop_after
        assert out.read_text().splitlines()[0] == whole.splitlines()[0]  # the same job


@pytest.mark.slow
def test_torn_last_line_is_cut_and_redone(tiny, tmp_path):
    write_prompts(tmp_path / "in.jsonl", 6, seed=2)
    args = ["--model", str(tiny), "--prompts", str(tmp_path / "in.jsonl"), "--max-new-tokens", "4", "--quiet"]
    assert main([*args, "--output", str(tmp_path / "full.jsonl")]) == 0
    full = (tmp_path / "full.jsonl").read_text()
    cut = [i for i, c in enumerate(full) if c == "\n"][2] + 10  # the job line, two whole records, a torn third
    (tmp_path / "part.jsonl").write_text(full[:cut])
    assert main([*args, "--output", str(tmp_path / "part.jsonl")]) == 0
    assert read_output(tmp_path / "part.jsonl") == read_output(tmp_path / "full.jsonl")


def odd_name(i: int):
    """Ids holding characters that str.splitlines() takes for line ends; some integer ids among them."""
    return [f"p{i}\u2028", f"\u0085p{i}", i, f"p\u2029{i}"][i % 4]


@pytest.fixture(scope="module")
def odd_text_model(tiny, tmp_path_factory) -> Path:
    """The tiny model with a tokenizer whose every token holds U+2028 or U+0085, so every generated text does."""
    tokenizers = pytest.importorskip("tokenizers")
    directory = tmp_path_factory.mktemp("odd-text")
    for f in tiny.iterdir():
        if f.name != "tokenizer.json":
            shutil.copy(f, directory / f.name)
    vocab = {(f"<{i}\u2028>" if i % 2 else f"<\u0085{i}>"): i for i in range(1024)}
    tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<\u00850>")).save(
        str(directory / "tokenizer.json"))
    return directory


@pytest.mark.slow
def test_sigkill_then_rerun_leaves_every_id_once_with_uninterrupted_outputs(odd_text_model, tmp_path):
    write_prompts(tmp_path / "in.jsonl", 400, seed=3, name=odd_name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "run_offloaded.py"), "--model", str(odd_text_model), "--prompts",
           str(tmp_path / "in.jsonl"), "--max-new-tokens", "12", "--batch-size", "4", "--quiet",
           "--gpu-memory", "20MiB", "--cpu-memory", "1GiB"]
    assert subprocess.run([*cmd, "--output", str(tmp_path / "full.jsonl")], env=env).returncode == 0
    full = read_output(tmp_path / "full.jsonl")
    texts = "".join(r["text"] for r in full.values())
    assert "\u2028" in texts and "\u0085" in texts  # what the rerun has to read back

    out = tmp_path / "killed.jsonl"
    job = subprocess.Popen([*cmd, "--output", str(out)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 40):
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    written = out.read_bytes().count(b"\n")
    assert 0 < written < 400, "the kill did not land mid-run"
    assert subprocess.run([*cmd, "--output", str(out)], env=env).returncode == 0
    assert read_output(out) == full
    assert set(full) == {odd_name(i) for i in range(400)}


def test_a_batch_job_with_a_draft_writes_plain_greedy_outputs(structured, tmp_path, one_thread):
    """Prompt lookup (4 tokens a pass) in a batch job: each record once, with the tokens of plain greedy decoding;
    rows refilled while others are mid-run; the summary counts the tokens gained per pass."""
    from offload.structured import corpus_of

    corpus, gen = corpus_of(structured), torch.Generator().manual_seed(4)
    records = [{"id": i, "prompt_ids": corpus.sample(1, int(torch.randint(2, 20, (1,), generator=gen)), seed=i)[0]
                .tolist(), "max_new_tokens": int(torch.randint(3, 30, (1,), generator=gen))} for i in range(9)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    records = read_records(tmp_path / "in.jsonl", None, 8, 64)
    kw = dict(dtype="float32", max_batch=3, max_seq_len=64, progress=False)
    model = offload.load_model(structured, draft="ngram", draft_tokens=4, **kw)
    results = ResultFile(tmp_path / "out.jsonl", prompt_lengths(records))
    summary = run_batch(model, records, results, batch_size=3, progress=False)
    results.close()
    assert summary.tokens_per_pass > 1 and "tokens per row and pass" in str(summary)
    got = read_output(tmp_path / "out.jsonl")
    plain = offload.load_model(structured, **kw)
    for r in records:
        assert got[r.id]["output_ids"] == plain.generate([r.prompt_ids], max_new_tokens=r.max_new_tokens,
                                                         return_result=True).tokens[0], r.id
    model.close()
    plain.close()


# ---------------------------------------------------------------------- every class of bad prompt file


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
    pytest.param(b'{"id": 1, "prompt": "a", "prompt": "b"}\n', "in.jsonl:1: the key 'prompt' is given twice",
                 id="duplicate-key"),  # json would read the last value without a word
    pytest.param(b'{"id": 1, "prompt_ids": [1]}\n{"id": 2, "messages": [{"role": "user", "role": "system", '
                 b'"content": "x"}]}\n', "in.jsonl:2: the key 'role' is given twice", id="duplicate-key-inside"),
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
    tokenizer = Chars()
    records = read_records(write_jsonl(tmp_path / "in.jsonl", rows), tokenizer, 5, 1024)
    assert [r.id for r in records] == [f"a{ODD_LINE_BREAKS}b", 2, "\u2028"]
    assert records[1].prompt_ids == tokenizer.encode(f"x{ODD_LINE_BREAKS}y")
    assert [r.line for r in records] == [1, 2, 3]


def test_a_leading_byte_order_mark_and_crlf_line_ends_are_accepted(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": 1, "prompt_ids": [1]}\r\n\r\n{"id": "2", "prompt_ids": [2]}\r\n')
    assert [r.id for r in read_records(path, None, 4, 1024)] == [1, "2"]


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_the_prompt_reader(tmp_path, seed):
    """Random bytes, valid files of records with random text, and those truncated or mutated at random
    points: the reader refuses in one line or returns every record exactly once."""
    rng = random.Random(seed)
    path, tokenizer = tmp_path / "in.jsonl", Chars()
    for trial in range(120):
        rows = random_records(rng, rng.randint(1, 8))
        data = jsonl(rng, rows)
        if rng.random() < 0.2:
            data = b"\xef\xbb\xbf" + data
        mutated = trial % 3 != 0
        if mutated:
            data = mutate(rng, data)
        path.write_bytes(data)
        try:
            records = read_records(path, tokenizer, 4, 1024)
        except InputError as e:
            one_line(e)
            assert mutated, f"a valid file was refused: {e}"
            continue
        ids = [r.id for r in records]
        assert len(ids) == len(set(ids))
        if not mutated:
            assert ids == [r["id"] for r in rows] and all(type(a) is type(r["id"]) for a, r in zip(ids, rows))


@pytest.mark.slow
def test_fifo_batches_with_a_context_just_large_enough(tiny, tmp_path, capsys):
    rows = [{"id": 1, "prompt_ids": [1, 2, 3], "max_new_tokens": 1},
            {"id": 2, "prompt_ids": [1, 2, 3, 4, 5, 6, 7, 8], "max_new_tokens": 20},
            {"id": 3, "prompt_ids": [9], "max_new_tokens": 27}]
    prompts = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert main(["--model", str(tiny), "--prompts", str(prompts), "--output", str(out), "--schedule", "fifo",
                 "--batch-size", "3", "--ignore-eos", "--quiet", "--max-seq-len", "28"]) == 0
    got = {r["id"]: r["output_tokens"] for r in map(json.loads, out.read_text().split("\n")[1:-1])}  # after the job
    assert got == {1: 1, 2: 20, 3: 27}
    capsys.readouterr()


def test_a_chat_record_with_a_lone_surrogate_is_one_line(tiny_chat, tmp_path, capsys):
    prompts = tmp_path / "in.jsonl"
    prompts.write_bytes(b'{"id": "x", "prompt_ids": [1]}\n{"id": "y", "messages": [{"role": "user", "content": "hi '
                        b'\\ud800"}]}\n')
    out = tmp_path / "out.jsonl"
    err = refused(capsys, ["--model", str(tiny_chat), "--prompts", str(prompts), "--output", str(out)])
    assert f"{prompts}:2: messages[0].content is not valid Unicode" in err
    assert not out.exists()


def test_a_chat_record_with_a_role_the_server_refuses_is_refused_too(tiny_chat, tmp_path, capsys):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"id": "x", "messages": [{"role": "user", "content": "hi"}, {"role": "bogus", "content": '
                       '"x"}]}\n')
    err = refused(capsys, ["--model", str(tiny_chat), "--prompts", str(prompts), "--output",
                           str(tmp_path / "out.jsonl")])
    assert f"{prompts}:1: messages[1].role 'bogus' is not one of system, developer, user" in err


@pytest.mark.slow
def test_a_chat_record_with_a_lone_surrogate_is_one_line_through_the_script(tiny_chat, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_bytes(b'{"id": "y", "messages": [{"role": "user", "content": "hi \\ud800"}]}\n')
    (tmp_path / "out.jsonl").write_bytes(b"")
    done = run_script("--model", str(tiny_chat), "--prompts", str(prompts), "--output", str(tmp_path / "out.jsonl"),
                      cache_dir=tmp_path)
    assert "messages[0].content is not valid Unicode" in one_line_exit_2(done)
    assert (tmp_path / "out.jsonl").read_bytes() == b""


@pytest.mark.parametrize("max_new, words", [(10**12, "'max_new_tokens' must be at most 2147483647"),
                                             (10**9, "")])  # within the count, past any budget
def test_a_record_whose_token_limit_passes_any_context_is_one_line(bare, tmp_path, capsys, max_new, words):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"id": "y", "prompt_ids": [1, 2], "max_new_tokens": max_new}])
    err = refused(capsys, ["--model", str(bare), "--prompts", str(prompts), "--output", str(tmp_path / "out.jsonl")])
    assert words in err and "warning" not in err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_a_record_whose_token_limit_passes_any_context_is_one_line_through_the_script(tiny, tmp_path):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"id": "y", "prompt_ids": [1, 2], "max_new_tokens": 10**12}])
    done = run_script("--model", str(tiny), "--prompts", str(prompts), "--output", str(tmp_path / "out.jsonl"),
                      cache_dir=tmp_path)
    assert "'max_new_tokens' must be at most" in one_line_exit_2(done)
    assert not (tmp_path / "out.jsonl").exists()



def test_a_records_text_ends_before_its_stop_token():
    """A record's tokens keep the stop token that ended it; its text does not (as the CLI's and the server's): a
    tokenizer that does not mark the token special would otherwise write its text."""
    from offload.batch import Record, _write

    class Words:
        def decode(self, ids):
            return " ".join(f"w{i}" for i in ids)

    class Results:
        def write_record(self, *args):
            self.args = args

    results, record = Results(), Record("a", [1, 2], 8, 1)
    _write(results, record, [5, 6, 2], "eos", Words())
    assert results.args == ("a", 2, [5, 6, 2], "eos", "w5 w6")
    _write(results, record, [5, 6, 2], "length", Words())
    assert results.args[-1] == "w5 w6 w2"


def test_a_records_own_fields_ride_along_unread(tmp_path):
    """Fields a record keeps for itself (metadata) are not refused; settings the job's flags make are."""
    from offload.batch import read_records

    path = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt_ids": [1, 2], "source": "docs", "meta": {"k": 2}}])
    [record] = read_records(path, None, 4, 100)
    assert (record.id, record.prompt_ids, record.max_new_tokens) == (1, [1, 2], 4)


def test_a_greedy_jobs_seed_and_filters_do_not_make_it_another_job(tiny, tmp_path, capsys):
    """A greedy job's seed and temperature 0 (greedy) change nothing it writes: a rerun with them continues its
    output (it was refused as another job's), where a sampled job's seed still names another job."""
    write_prompts(tmp_path / "in.jsonl", 3)
    args = ["--model", str(tiny), "--prompts", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
            "--max-new-tokens", "2", "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--seed", "7"]) == 0 and main([*args, "--temperature", "0", "--top-k", "5"]) == 0
    assert "nothing to do: the 3 record(s) are all in" in capsys.readouterr().out
    sampled = [*args, "--do-sample", "--temperature", "0.8", "--output", str(tmp_path / "sampled.jsonl")]
    assert main([*sampled, "--seed", "1"]) == 0
    assert main([*sampled, "--seed", "2"]) == 2
    assert "another job" in capsys.readouterr().err
