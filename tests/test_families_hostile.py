"""config.json files that transformers reads one way and offload read another (found by a hostile test of the
families): each tiny random checkpoint is written by transformers, its config.json edited, and the same directory
loaded by ``AutoModelForCausalLM.from_pretrained`` (which reads the file as a user's transformers does, with its
heuristics) and by offload; logits of a prompt and of decode steps within 1e-4 (CPU, float32), or offload's own
error. Fields whose effect shows only past thousands of tokens or dozens of layers are compared config to config.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers

import offload
from offload.errors import OffloadWarning

from conftest import randomize_

ATOL = 1e-4
_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, rope_theta=10000.0)
_CLASSES = {
    "llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
    "qwen3_moe": transformers.Qwen3MoeForCausalLM, "mixtral": transformers.MixtralForCausalLM,
    "olmoe": transformers.OlmoeForCausalLM, "gemma3": transformers.Gemma3ForCausalLM,
}
_CONFIGS = {
    "llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen3_moe": transformers.Qwen3MoeConfig,
    "mixtral": transformers.MixtralConfig, "olmoe": transformers.OlmoeConfig, "gemma3": transformers.Gemma3TextConfig,
}


def _checkpoint(directory, arch: str, edits: dict, **config):
    """A tiny random ``arch`` checkpoint written by transformers, its config.json then given ``edits`` (None
    deletes a key)."""
    torch.manual_seed(0)
    model = _CLASSES[arch](_CONFIGS[arch](**{**_BASE, **config})).float()
    randomize_(model, 0)
    model.save_pretrained(directory)
    raw = json.loads((directory / "config.json").read_text())
    for key, value in edits.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


def _theirs(directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _assert_same_logits(directory, prompt: int = 20, steps: int = 4):
    """offload's logits of a prompt and of ``steps`` greedy decode steps are transformers'."""
    hf = _theirs(directory)
    ids = torch.randint(3, _BASE["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        model = offload.load_model(directory, dtype="float32", max_batch=1, max_seq_len=64, progress=False)
    with model, torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= ATOL
        row = ids[0].tolist()
        out = model.extend([row], [0])
        for _ in range(steps):
            row.append(int(out[0].argmax()))
            out = model.extend([row[-1:]], [len(row) - 1])
            assert (out[0] - hf(torch.tensor([row])).logits[0, -1]).abs().max().item() <= ATOL


# ---------------------------------------------------------------------- rotary embeddings


@pytest.mark.parametrize("arch, edits", [
    # transformers 5 reads rope_scaling as rope_parameters: a rope_theta inside it is the base
    ("llama", dict(rope_parameters=None, rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0,
                                                                           "rope_theta": 50.0})),
    # ... and where both are given, rope_scaling (Gemma 3: rope_scaling over the global layers' section)
    ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                   rope_scaling={"rope_type": "linear", "factor": 4.0})),
    ("gemma3", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    ("gemma3", dict(rope_parameters=None, rope_theta=10000.0, rope_local_base_freq=100.0,
                    rope_scaling={"rope_type": "linear", "factor": 4.0, "rope_theta": 77.0})),
    # llama3 scaling: a top-level original_max_position_embeddings wins over rope_parameters' own ...
    ("llama", dict(rope_parameters={**_LLAMA3, "original_max_position_embeddings": 256},
                   original_max_position_embeddings=8)),
    # ... and without either, max_position_embeddings (it was refused)
    ("llama", dict(rope_parameters=_LLAMA3, max_position_embeddings=16)),
], ids=["4x-theta-in-rope-scaling", "rope-scaling-over-rope-parameters", "gemma3-rope-scaling-over-global",
        "gemma3-4x-theta-in-rope-scaling", "llama3-top-level-original-positions", "llama3-original-positions-left-out"])
def test_rotary_fields_read_as_transformers_reads_them(tmp_path, arch, edits):
    extra = dict(head_dim=16, sliding_window=4, sliding_window_pattern=2) if arch == "gemma3" else {}
    _assert_same_logits(_checkpoint(tmp_path, arch, edits, **extra))
