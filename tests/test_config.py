"""config.json: every class of bad field is refused in one line naming it, by the command line and by
``plan_model``, before any weights are read; a context past the model's positions is warned about."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

import offload
from offload.cli import main
from offload.errors import ConfigError

from conftest import edit_config
from hostile import DROP, refused


def _config_dir(tmp_path: Path, tiny: Path, **changes) -> Path:
    raw = edit_config(json.loads((tiny / "config.json").read_text()), changes, drop=DROP)
    directory = tmp_path / "model"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


CONFIG_CASES = [
    pytest.param({"vocab_size": 0}, "vocab_size must be a positive integer, got 0", id="vocab-size-zero"),
    pytest.param({"vocab_size": "1024"}, "vocab_size must be a positive integer, got '1024'", id="string-for-number"),
    pytest.param({"vocab_size": DROP}, "missing field 'vocab_size'", id="missing-field"),
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
    pytest.param({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 0},
                 "sliding_window must be a positive integer, got 0", id="sliding-window-zero"),
    pytest.param({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": "4096"},
                 "sliding_window must be a positive integer", id="sliding-window-string"),
    pytest.param({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 64,
                  "layer_types": ["full_attention"]}, "layer_types must be a list of 8", id="layer-types-short"),
    pytest.param({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 64,
                  "use_sliding_window": True, "max_window_layers": -1}, "max_window_layers must be an integer >= 0",
                 id="window-layers-negative"),
    pytest.param({"architectures": ["MistralForCausalLM"]}, "architectures names 'MistralForCausalLM' but model_type "
                 "'llama' is LlamaForCausalLM's", id="architecture-against-model-type"),
]


@pytest.mark.parametrize("changes, words", CONFIG_CASES)
def test_bad_config_field_is_one_line_naming_it(tiny, tmp_path, capsys, changes, words):
    model = _config_dir(tmp_path, tiny, **changes)
    assert words in refused(capsys, ["--model", str(model), "--plan"])
    with pytest.raises(ConfigError, match="config.json"):
        offload.plan_model(model)


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
