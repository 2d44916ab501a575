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
from offload.errors import ConfigError, OffloadWarning
from offload.models.config import config_from_dict

from conftest import _ARCH, edit_config, randomize_

ATOL = 1e-4
_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, rope_theta=10000.0)
_CLASSES = {
    **_ARCH,
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
}


def _checkpoint(directory, arch: str, edits: dict, **config):
    """A tiny random ``arch`` checkpoint written by transformers, its config.json then given ``edits`` (None
    deletes a key)."""
    torch.manual_seed(0)
    config_class, model_class = _CLASSES[arch]
    model = model_class(config_class(**{**_BASE, **config})).float()
    randomize_(model, 0)
    model.save_pretrained(directory)
    raw = edit_config(json.loads((directory / "config.json").read_text()), edits)
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


# ---------------------------------------------------------------------- sliding windows


def test_qwen3_moe_slides_in_every_layer_whatever_its_layer_types(tmp_path):
    """transformers' Qwen3-MoE has no layer_types: use_sliding_window windows every layer (offload windowed only
    the layer_types' sliding layers: wrong logits)."""
    types = ["sliding_attention", "full_attention", "full_attention"]
    edits = dict(layer_types=types, use_sliding_window=True, sliding_window=4)
    _assert_same_logits(_checkpoint(tmp_path, "qwen3_moe", edits, head_dim=16, **_EXPERTS))


def _configs(model_type: str, architecture: str, **fields):
    """offload's ModelConfig and transformers' config of the same config.json fields."""
    raw = dict(architectures=[architecture], model_type=model_type, **{**_BASE, **fields})
    return config_from_dict(dict(raw)), transformers.AutoConfig.for_model(**raw)


def _their_windows(theirs) -> tuple:
    """Each layer's window in transformers' Qwen2, Qwen3 and Qwen2-MoE: the config's (0: none) in its sliding
    layers."""
    window = theirs.sliding_window or None
    return tuple(window if t == "sliding_attention" else None for t in theirs.layer_types)


_QWEN = [("qwen2", "Qwen2ForCausalLM", {}), ("qwen3", "Qwen3ForCausalLM", {}),
         ("qwen2_moe", "Qwen2MoeForCausalLM", _EXPERTS)]


@pytest.mark.parametrize("model_type, architecture, experts", _QWEN, ids=[q[0] for q in _QWEN])
@pytest.mark.parametrize("fields, windows", [
    # use_sliding_window without a window: transformers' 4096 (offload's Qwen2 and Qwen3 had none)
    (dict(use_sliding_window=True, layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
     (None, 4096, 4096)),
    # layer_types' sliding layers while use_sliding_window is off: no window (transformers sets none; offload slid)
    (dict(use_sliding_window=False, sliding_window=4,
          layer_types=["sliding_attention", "sliding_attention", "full_attention"]), (None, None, None)),
], ids=["window-left-out", "sliding-layers-switched-off"])
def test_qwen_windows_as_transformers_reads_them(model_type, architecture, experts, fields, windows):
    ours, theirs = _configs(model_type, architecture, **experts, **fields)
    assert ours.sliding_windows == windows
    if fields["use_sliding_window"]:  # (switched off, transformers' model cannot run: it finds no window)
        assert ours.sliding_windows == _their_windows(theirs)


@pytest.mark.parametrize("model_type, architecture", [("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_qwen_window_layers_left_out_start_at_transformers_28(model_type, architecture):
    """Without layer_types or max_window_layers, windows begin at layer 28 (offload's began past the last)."""
    ours, theirs = _configs(model_type, architecture, num_hidden_layers=30, use_sliding_window=True,
                            sliding_window=4)
    assert ours.sliding_windows == _their_windows(theirs) == (None,) * 28 + (4, 4)


# ---------------------------------------------------------------------- fields a family does not have


@pytest.mark.parametrize("arch, edits, config", [
    ("mistral", dict(attention_bias=True, mlp_bias=True), {}),  # Mistral has no biases (attention_bias: refused)
    ("qwen2", dict(attention_bias=True, mlp_bias=True), {}),  # Qwen2 biases q, k and v always (mlp_bias: refused)
    # Mixtral's and OLMoE's experts are intermediate_size wide (moe_intermediate_size: refused, the shapes wrong)
    ("mixtral", dict(moe_intermediate_size=48), dict(num_local_experts=4, num_experts_per_tok=2)),
    ("olmoe", dict(moe_intermediate_size=48), dict(num_experts=4, num_experts_per_tok=2)),
], ids=["mistral-biases", "qwen2-biases", "mixtral-moe-width", "olmoe-moe-width"])
def test_fields_transformers_does_not_read_for_a_family_are_ignored(tmp_path, arch, edits, config):
    _assert_same_logits(_checkpoint(tmp_path, arch, edits, **config))


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize("architecture, model_type, experts", [
    ("MixtralForCausalLM", "mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    ("OlmoeForCausalLM", "olmoe", dict(num_experts=4, num_experts_per_tok=2)),
    ("Qwen2MoeForCausalLM", "qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, use_sliding_window=True)),
    ("Qwen3MoeForCausalLM", "qwen3_moe", dict(num_experts=4, num_experts_per_tok=2)),
])
def test_a_mixture_of_experts_of_billions_of_layers_is_refused_at_once(architecture, model_type, experts):
    """A mixture of experts' family built a tuple per layer before the common fields' limit refused the count: a
    config of 2**31 - 1 layers took 16 GiB (MemoryError, or the machine's memory) instead of a ConfigError."""
    raw = dict(architectures=[architecture], model_type=model_type, **{**_BASE, "num_hidden_layers": 2**31 - 1},
               **experts)
    with pytest.raises(ConfigError, match="num_hidden_layers must be at most 65536"):
        config_from_dict(raw)



def test_an_architecture_that_its_model_type_contradicts_is_refused(tmp_path):
    """transformers builds the model its model_type names, whatever architectures says; offload built the one
    architectures names: a Mistral checkpoint labelled LlamaForCausalLM ran without its window (wrong logits)."""
    directory = _checkpoint(tmp_path, "mistral", dict(architectures=["LlamaForCausalLM"]), sliding_window=4)
    assert type(_theirs(directory)).__name__ == "MistralForCausalLM"
    with pytest.raises(ConfigError, match="architectures names 'LlamaForCausalLM' but model_type 'mistral' is "
                                          "MistralForCausalLM's"):
        offload.load_model(directory, dtype="float32", max_seq_len=64, progress=False)


_MOE = [("mixtral", "MixtralForCausalLM"), ("qwen2_moe", "Qwen2MoeForCausalLM"), ("qwen3_moe", "Qwen3MoeForCausalLM"),
        ("olmoe", "OlmoeForCausalLM")]


@pytest.mark.parametrize("model_type, architecture", _MOE, ids=[m[0] for m in _MOE])
@pytest.mark.parametrize("key", ["num_experts", "num_local_experts", None])
def test_expert_counts_read_by_the_names_and_defaults_transformers_has(model_type, architecture, key):
    """A family's transformers config takes the count of experts by the names its attribute_map has (Mixtral's
    num_experts was refused; Qwen2-MoE has no num_local_experts, offload read it) and, with the experts a token
    takes, its default where left out (they were refused)."""
    ours, theirs = _configs(model_type, architecture, **({key: 4, "num_experts_per_tok": 2} if key else {}))
    experts = getattr(theirs, "num_local_experts" if model_type in ("mixtral", "qwen3_moe") else "num_experts")
    assert (ours.n_experts, ours.top_k) == (experts, theirs.num_experts_per_tok)
