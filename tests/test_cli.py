"""The command line: the no-argument demo, one-line errors with status 2, --plan without loading."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from offload.cli import main
from offload.models.shapes import shape_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_offloaded.py"


def run_script(*args, cache_dir, timeout=300):
    env = {**os.environ, "OFFLOAD_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


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
    (["--prompt-ids", "1,99999"], "outside the vocabulary"),
    (["--prompt", "hello", "--prompt-ids", "1"], "not allowed with"),
    (["--max-new-tokens", "600", "--prompt-ids", "1", "--max-seq-len", "64"], "exceeds --max-seq-len"),
    (["--dtype", "int3", "--prompt-ids", "1"], "unsupported dtype"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--prompts", "x.jsonl"], "--prompts needs --output"),
    (["--draft-tokens", "4", "--prompt-ids", "1"], "draft_tokens goes with a draft"),
    (["--draft", "ngram", "--draft-tokens", "100", "--prompt-ids", "1"], "at most 64"),
    (["--draft", "no/such/dir", "--prompt-ids", "1"], "draft no/such/dir: model path"),
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
