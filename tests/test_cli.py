"""The command line: the no-argument demo, one-line errors with status 2 for every class of bad flag (before
any weights are read), --plan without loading, signals."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest

from offload.cli import main
from offload.models.shapes import shape_config
from offload.results import result_line

from hostile import PROMPTS, ROOT, SCRIPT, jsonl, mutate, one_line_exit_2, random_records, refused, run_script, \
    write_jsonl


@pytest.mark.slow
def test_no_arguments_runs_the_offloaded_demo(tmp_path):
    done = run_script(cache_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "tokens/s" in done.stdout and "output ids:" in done.stdout
    layers = next(line for line in done.stdout.splitlines() if line.strip().startswith("layers:"))
    assert "H" in layers and "R" in layers  # the demo's budget makes some layers stream from the host


def test_missing_model_prints_one_line_and_exits_2(tmp_path):
    done = run_script("--model", "does/not/exist", cache_dir=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "does/not/exist" in done.stderr
    assert "Traceback" not in done.stderr


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("run_offloaded: error:"), err
    return err


def test_truncated_safetensors(tmp_path, tiny, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    assert "truncated or corrupt" in one_line_error(capsys, ["--model", str(broken), "--prompt-ids", "1,2"])


def test_unknown_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 8}))
    err = one_line_error(capsys, ["--model", str(tmp_path), "--prompt-ids", "1"])
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err


@pytest.mark.parametrize("argv, words", [
    (["--gpu-memory", "lots", "--prompt-ids", "1"], "cannot parse 'lots'"),
    (["--peer-memory", "cuda:1", "--prompt-ids", "1"], "DEVICE=SIZE"),
    (["--prompt-ids", "1,x"], "comma-separated"),
    (["--prompt-ids", "1,,2"], "comma-separated"),
    (["--prompt-ids", "1,99999"], "outside the vocabulary"),
    (["--prompt", "hello", "--prompt-ids", "1"], "not allowed with"),
    (["--max-new-tokens", "600", "--prompt-ids", "1", "--max-seq-len", "64"], "exceeds --max-seq-len"),
    (["--dtype", "int3", "--prompt-ids", "1"], "unsupported dtype"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--prompts", "x.jsonl"], "--prompts needs --output"),
    (["--draft-tokens", "4", "--prompt-ids", "1"], "draft_tokens goes with a draft"),
    (["--draft", "ngram", "--draft-tokens", "100", "--prompt-ids", "1"], "at most 64"),
    (["--draft", "ngram", "--draft-branches", "2", "--prompt-ids", "1"], "draft_branches goes with a draft model"),
    (["--draft", "no/such/dir", "--prompt-ids", "1"], "draft 'no/such/dir': neither ngram, int8, int4 nor a checkpoint"),
    (["--prompt-ids", "1", "--batch-size", "4"], "--batch-size goes with --prompts"),
    (["--prompt-ids", "1", "--schedule", "fifo"], "--schedule goes with --prompts"),
    (["--prompt-ids", "1", "--rounding", "minmax"], "--rounding minmax is for int4 weights"),
    (["--prompt-ids", "1", "--quantize", "int8", "--rounding", "search"], "--rounding search is for int4 weights"),
    (["--prompt-ids", "1", "--max-new-tokens", "100000000", "--plan"],  # a KV cache no budget holds
     "--max-seq-len (not given, --max-seq-len is what the prompts and --max-new-tokens need)"),
])
def test_bad_flags(tiny, capsys, argv, words):
    assert words in one_line_error(capsys, ["--model", str(tiny), *argv])


def test_prompt_text_without_a_tokenizer(tiny, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny.iterdir():
        if f.name != "tokenizer.json":
            (bare / f.name).write_bytes(f.read_bytes())
    assert "--prompt-ids" in one_line_error(capsys, ["--model", str(bare), "--prompt", "hello"])


def test_plan_prints_host_layers_and_reads_no_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(shape_config("llama-2-7b")))  # no weight files at all
    assert main(["--model", str(tmp_path), "--gpu-memory", str(4 * 2**30), "--cpu-memory", "10GiB",
                 "--max-seq-len", "64", "--dtype", "bf16", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "placement plan" in out
    host = next(line for line in out.splitlines() if line.strip().startswith("host"))
    assert int(host.split()[1]) > 0  # layers on the host tier


def test_plan_with_a_byte_budget_below_the_weights(tiny, capsys):
    assert main(["--model", str(tiny), "--gpu-memory", "12000000", "--cpu-memory", "4GiB", "--max-seq-len", "64",
                 "--plan"]) == 0
    out = capsys.readouterr().out
    assert "H" in next(line for line in out.splitlines() if line.strip().startswith("layers:"))


def test_plan_that_fits_nowhere_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(shape_config("llama-2-7b")))
    err = one_line_error(capsys, ["--model", str(tmp_path), "--gpu-memory", "4GiB", "--cpu-memory", "1GiB",
                                  "--max-seq-len", "64", "--dtype", "bf16", "--plan"])
    assert "does not fit" in err


def test_single_prompt_with_text(tiny, capsys):
    assert main(["--model", str(tiny), "--prompt", "offload runs", "--max-new-tokens", "4", "--quiet",
                 "--gpu-memory", "30MiB", "--cpu-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "output:" in out and "decode:" in out


def test_text_that_stdouts_encoding_lacks_is_printed_as_question_marks(tiny, monkeypatch):
    """PYTHONIOENCODING=ascii (or a console's code page): the prompt's echo and the model's text had characters
    stdout cannot encode, and the run ended with a UnicodeEncodeError's traceback."""
    import io

    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["--model", str(tiny), "--prompt", "h\u00e9llo \U0001f600", "--max-new-tokens", "2",
                 "--gpu-memory", "30MiB", "--cpu-memory", "1GiB"]) == 0
    stdout.flush()
    assert "prompt: 'h?llo ?'" in stdout.buffer.getvalue().decode("ascii")


def test_speculative_decoding_prints_tokens_per_pass_and_the_same_output(structured, capsys):
    argv = ["--model", str(structured), "--prompt-ids", "3,17,40,2,9", "--max-new-tokens", "24", "--quiet",
            "--dtype", "fp32"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--draft", "ngram", "--draft-tokens", "4"]) == 0
    out = capsys.readouterr().out
    ids = lambda text: next(line for line in text.splitlines() if line.startswith("output ids:"))  # noqa: E731
    assert ids(out) == ids(plain)
    line = next(line for line in out.splitlines() if line.startswith("speculative decoding:"))
    assert float(line.split()[2]) > 1 and "tokens per pass" in line
    assert main(argv + ["--draft", "int4", "--plan"]) == 0
    assert "  draft: int4 copy of the target" in capsys.readouterr().out


# ---------------------------------------------------------------------- every class of bad flag


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
    # other scripts' digits, which int() and float() read ("\uff14" is a full-width 4), are no number here
    pytest.param(["--max-new-tokens", "\uff14"], "--max-new-tokens: invalid int value: '\uff14'",
                 id="max-new-tokens-full-width"),
    pytest.param(["--seed", "\u0663"], "--seed: invalid int value", id="seed-arabic-indic"),
    pytest.param(["--max-seq-len", "1\uff12\uff18"], "--max-seq-len: invalid int value", id="max-seq-len-mixed-digits"),
    pytest.param(["--temperature", "\uff11.5"], "--temperature: invalid float value", id="temperature-full-width"),
    pytest.param(["--gpu-memory", "\uff14GiB"], "cannot parse '\uff14GiB'", id="budget-full-width"),
    pytest.param(["--cpu-memory", "1.\uff15GiB"], "cannot parse", id="budget-full-width-fraction"),
    pytest.param(["--peer-memory", "cuda:1=\uff14GiB"], "cannot parse", id="peer-budget-full-width"),
    pytest.param(["--prompt-ids", "1,\uff12"], "comma-separated integers", id="prompt-ids-full-width"),
]


@pytest.mark.parametrize("argv, words", FLAG_CASES)
def test_bad_flag_is_one_line_before_loading(bare, capsys, argv, words):
    assert words in refused(capsys, ["--model", str(bare), "--prompt-ids", "1,2", *argv])


def test_comma_separated_counts_are_written_in_ascii_digits():
    """(A benchmark's --batch 1,\uff11\uff16, full-width digits that int() reads, ran a batch of 16.)"""
    from offload.cli import counts
    from offload.errors import InputError

    assert counts("--batch", "16, 1,", "1,16") == [1, 16]
    with pytest.raises(InputError, match="--batch expects comma-separated positive integers such as 1,16"):
        counts("--batch", "1,\uff11\uff16", "1,16")


@pytest.mark.parametrize("size, words", [("0", "--batch-size must be >= 1"), ("abc", "expects a number or auto"),
                                         ("\uff14", "expects a number or auto")])
def test_a_bad_batch_size_is_refused_before_the_prompt_file_is_read(bare, tmp_path, capsys, size, words):
    """(It was refused after: a missing prompt file was the error given.)"""
    err = refused(capsys, ["--model", str(bare), "--prompts", str(tmp_path / "none.jsonl"), "--output",
                           str(tmp_path / "out.jsonl"), "--batch-size", size, "--plan"])
    assert words in err


def test_batch_size_and_max_batch_together_are_refused(bare, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt_ids": [1, 2]}])
    err = refused(capsys, ["--model", str(bare), "--prompts", str(prompts), "--output", str(tmp_path / "out.jsonl"),
                           "--batch-size", "4", "--max-batch", "2", "--plan"])
    assert "--batch-size and --max-batch both give a batch job's rows" in err


def test_a_batch_size_past_the_records_reserves_rows_for_the_records_alone(bare, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt_ids": [1, 2]} for i in range(3)])
    assert main(["--model", str(bare), "--prompts", str(prompts), "--output", str(tmp_path / "out.jsonl"),
                 "--batch-size", "100", "--plan", "--quiet", "--gpu-memory", "1GiB", "--cpu-memory", "1GiB"]) == 0
    assert "3 rows" in capsys.readouterr().out


def test_model_given_as_a_file(tiny, capsys):
    err = refused(capsys, ["--model", str(tiny / "config.json"), "--prompt-ids", "1"])
    assert "is neither a checkpoint directory (config.json + safetensors) nor a GGUF file" in err


def test_missing_model(tmp_path, capsys):
    assert "does not exist" in refused(capsys, ["--model", str(tmp_path / "nowhere"), "--prompt-ids", "1"])


@pytest.mark.parametrize("flag", ["--model", "--prompts", "--output"])
def test_an_empty_path_is_refused(tmp_path, capsys, monkeypatch, flag):
    """--prompts "" was taken for no --prompts (the demo ran its own prompt, status 0), --model "" for the current
    folder."""
    monkeypatch.chdir(tmp_path)
    argv = {"--model": ["--model", "", "--prompt-ids", "1"], "--prompts": ["--prompts", ""],
            "--output": ["--prompts", "in.jsonl", "--output", ""]}[flag]
    assert f"{flag} is empty; give a path" in refused(capsys, argv)


def test_empty_prompt_names_its_flag(tiny, capsys):
    assert "--prompt: the prompt is empty" in refused(capsys, ["--model", str(tiny), "--prompt", ""])


def test_cli_temperature_zero_asks_for_greedy_decoding():
    from offload.cli import _sampling, build_parser

    assert _sampling(build_parser().parse_args(["--temperature", "0", "--seed", "3"])).greedy
    assert not _sampling(build_parser().parse_args(["--temperature", "0.5"])).greedy


def test_rounding_goes_with_an_int4_draft_spelled_any_way():
    """--draft INT4 is the int4 copy, as load_model takes it: its rounding may be chosen."""
    from offload.cli import _rounding, build_parser
    from offload.errors import InputError

    assert _rounding(build_parser().parse_args(["--draft", "INT4", "--rounding", "minmax"])) == "minmax"
    with pytest.raises(InputError, match="is for int4 weights"):
        _rounding(build_parser().parse_args(["--draft", "int8", "--rounding", "minmax"]))


@pytest.mark.slow
def test_temperature_zero_is_greedy(tiny, tiny_model, capsys):
    def ids(*flags):
        assert main(["--model", str(tiny), "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--quiet",
                     "--ignore-eos", *flags]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("output ids:"))

    assert ids("--temperature", "0", "--seed", "3", "--top-k", "5") == ids()
    greedy = tiny_model.generate([[5, 6, 7]], max_new_tokens=6, ignore_eos=True)
    for temperature in (0, 1e-40):  # a tiny temperature runs, and is all but greedy
        sampled = tiny_model.generate([[5, 6, 7]], max_new_tokens=6, ignore_eos=True, do_sample=True,
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
    monkeypatch.setenv("RANK", "\uff12")  # a full-width 2, which int() reads (as 2, refused: no rank waits)
    assert "RANK='\uff12' is not an integer" in refused(capsys, base)
    monkeypatch.setenv("RANK", "2")
    assert "RANK=2 is outside WORLD_SIZE=2" in refused(capsys, base)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert "tp=2 but WORLD_SIZE=4" in refused(capsys, base)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "99999")
    assert "not a port number" in refused(capsys, base)


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


def test_a_reader_of_stdout_that_goes_away_ends_the_run_without_a_traceback(bare, tmp_path):
    """run_offloaded ... | head: printing the plan into the closed pipe was a BrokenPipeError's traceback."""
    env = {**os.environ, "OFFLOAD_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, str(SCRIPT), "--model", str(bare), "--max-seq-len", "64", "--plan"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    job.stdout.close()  # before the plan is printed: importing torch takes seconds
    err = job.stderr.read()
    assert job.wait(timeout=120) == 128 + signal.SIGPIPE and err == "", err


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


# ---------------------------------------------------------------------- fuzzed files through the command line


def test_fuzz_inputs_are_never_a_traceback_through_the_cli(bare, tmp_path, capsys):
    """A few fuzzed prompt and output files through the command line itself (planning only)."""
    rng = random.Random(99)
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    for _ in range(15):
        rows = [{"id": r["id"], "prompt_ids": [1, 2]} for r in random_records(rng, 3)]
        prompts.write_bytes(mutate(rng, jsonl(rng, rows)) if rng.random() < 0.5 else jsonl(rng, rows))
        out.write_bytes(mutate(rng, b"".join(result_line(r["id"], 2, [1], "eos") for r in rows)))
        before = out.read_bytes()
        code = main(["--model", str(bare), "--prompts", str(prompts), "--output", str(out), "--plan",
                     "--batch-size", "1"])
        err = capsys.readouterr().err
        assert code in (0, 2) and "Traceback" not in err
        assert out.read_bytes() == before
        if code == 2:
            assert err.count("\n") == 1


# ---------------------------------------------------------------------- text that is not Unicode


def test_a_prompt_that_is_not_utf8_is_one_line(tiny, capsys):
    err = refused(capsys, ["--model", str(tiny), "--prompt", "caf\udce9", "--plan"])  # Python's reading of caf\xe9
    assert "--prompt is not valid Unicode" in err and "the byte 0xe9" in err


@pytest.mark.slow
def test_a_prompt_that_is_not_utf8_is_one_line_through_the_script(tiny, tmp_path):
    done = run_script("--model", str(tiny), "--prompt", b"caf\xe9", "--max-new-tokens", "2", cache_dir=tmp_path)
    assert "--prompt is not valid Unicode" in one_line_exit_2(done)


# ---------------------------------------------------------------------- budgets and limits


@pytest.mark.parametrize("peer", ["meta=100MiB", "cpu=1GiB"])
def test_a_peer_that_is_not_a_gpu_is_one_line(bare, capsys, peer):
    err = refused(capsys, ["--model", str(bare), "--prompt-ids", "1", "--peer-memory", peer, "--plan"])
    assert f"--peer-memory '{peer}': {peer.split('=')[0]} is not a GPU" in err


@pytest.mark.parametrize("max_new", [10**12, 10**9])
def test_a_token_limit_past_any_context_is_one_line_without_a_warning(bare, capsys, max_new):
    """Without --max-seq-len the cache is sized for the prompt and the answer: far past the model's 512
    positions (a warning) and more than any budget holds (an error). Only the error is said."""
    err = refused(capsys, ["--model", str(bare), "--prompt-ids", "1", "--max-new-tokens", str(max_new), "--plan"])
    assert "warning" not in err


@pytest.mark.slow
def test_a_peer_that_is_not_a_gpu_is_one_line_through_the_script(bare, tmp_path):
    done = run_script("--model", str(bare), "--prompt-ids", "1", "--peer-memory", "meta=100MiB", cache_dir=tmp_path)
    assert "meta is not a GPU" in one_line_exit_2(done)


# ---------------------------------------------------------------------- first contact


@pytest.mark.parametrize("parser", ["run_offloaded", "serve"])
def test_every_flag_has_a_help_text_and_the_budgets_state_their_defaults(parser):
    from offload.cli import build_parser
    from offload.serve.cli import build_parser as build_serve_parser

    p = {"run_offloaded": build_parser, "serve": build_serve_parser}[parser]()
    helps = {a.option_strings[-1]: a.help for a in p._actions if a.option_strings and a.dest != "help"}
    assert all(helps.values()), [flag for flag, text in helps.items() if not text]
    assert "default" in helps["--max-new-tokens" if parser == "run_offloaded" else "--log-level"]
    shown = " ".join(p.format_help().split())
    assert "budget of the compute device, e.g. 20GiB (default: its free memory less 2 GiB; on a CPU, 80% of the " \
           "available RAM)" in shown
    assert "(default with a GPU: 80% of the available RAM; on a CPU: 0, nothing streams)" in shown


def test_the_demo_says_its_weights_are_random_and_states_its_budget(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE_DIR", str(tmp_path))  # where the demo checkpoint is made
    assert main(["--plan", "--quiet"]) == 0
    demo = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("demo:"))
    assert "weights are random (its output ids mean nothing" in demo
    size, flag = demo.split("in a budget of ")[1].split(" that holds")[0].split(" (--gpu-memory ")
    assert size.endswith(" MiB") and int(flag.rstrip(")")) > 2**20  # formatted, and the exact flag to repeat it


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_the_demo_runs_in_its_own_budget_quantized(tmp_path, capsys, monkeypatch, quantize):
    """The demo's host budget holds its streamed layers and its embedding table, which int4 layers no longer
    outweigh."""
    monkeypatch.setenv("OFFLOAD_CACHE_DIR", str(tmp_path))
    assert main(["--quantize", quantize, "--max-new-tokens", "2", "--quiet"]) == 0
    assert "output ids:" in capsys.readouterr().out


@pytest.mark.slow
def test_the_demo_prints_ids_not_noise(tmp_path):
    done = run_script("--max-new-tokens", "4", "--quiet", cache_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "output ids:" in done.stdout and "output: " not in done.stdout


@pytest.mark.slow
def test_a_gguf_file_answers_a_chat_with_its_own_tokenizer_and_template(smollm2_gguf, capsys):
    """``--model file.gguf``: the file's vocabulary and chat template make the prompt, its eos id ends the
    answer, and the answer is right (SmolLM2-135M-Instruct knows its capitals)."""
    assert main(["--model", str(smollm2_gguf), "--prompt", "What is the capital of France?", "--chat",
                 "--max-new-tokens", "24", "--gpu-memory", "2GiB"]) == 0
    out = capsys.readouterr().out
    prompt = out.split("prompt: ")[1].split(" tokens)")[0]
    assert "You are a helpful AI assistant" in prompt and prompt.index("France?") < prompt.index("assistant\\n'")
    answer = out.split("output: ")[1].split("\n")[0]
    assert "Paris" in answer and "(eos)" in out
