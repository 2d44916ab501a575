"""Families as modules: Qwen3 (``offload.models.qwen3``) and Gemma 3 (``offload.models.gemma3``) against
``transformers`` on tiny random checkpoints it wrote (CPU, float32), and the registry that finds them.

For each: logits within 1e-4, greedy tokens identical (one row and a left-padded batch), half the layers
streamed from the host equal to the resident model bit for bit, tensor parallelism on 2 gloo ranks equal
to one rank.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import offload
from offload.errors import ConfigError, OffloadWarning
from offload.models.config import load_config

from conftest import CONVENTIONS
from test_llama import _hf_greedy, _hf_logits, _load, _prompt  # float32, 2 rows of MAX_SEQ; seeded prompts
from test_tensor_parallel import assert_tp_equals_one

ATOL = 1e-4
MAX_SEQ = 64
PROMPT, NEW = 12, 10  # 22 positions: past Gemma's window of 8 and Qwen3's of 6

_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
_GEMMA_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
               "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0}}
MODELS = {
    "qwen3": ("qwen3", dict(_BASE)),
    "qwen3-window": ("qwen3", dict(_BASE, use_sliding_window=True, sliding_window=6, max_window_layers=2)),
    "gemma3": ("gemma3", dict(_BASE, sliding_window=8, query_pre_attn_scalar=24, rope_parameters=_GEMMA_ROPE,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                           "sliding_attention"])),
    "gemma3-softcap": ("gemma3", dict(_BASE, vocab_size=320, sliding_window=8, final_logit_softcapping=2.0,
                                      rope_parameters=_GEMMA_ROPE, sliding_window_pattern=2)),
}
SEEDS = {key: i + 40 for i, key in enumerate(MODELS)}
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def _make(factory, key, convention="5.x"):
    arch, kwargs = MODELS[key]
    return factory(key, arch, convention, seed=SEEDS[key], **kwargs)


@pytest.fixture(scope="module", params=[(k, c) for k in MODELS for c in CONVENTIONS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, checkpoint_factory):
    key, convention = request.param
    hf, directory = _make(checkpoint_factory, key, convention)
    with _load(directory) as model:
        yield key, hf, directory, model


# ---------------------------------------------------------------------- configs


@pytest.mark.parametrize("key", list(MODELS))
def test_both_conventions_give_the_same_config(checkpoint_factory, key):
    a = load_config(_make(checkpoint_factory, key, "4.x")[1])
    b = load_config(_make(checkpoint_factory, key, "5.x")[1])
    assert a == b
    family, kwargs = MODELS[key]
    assert a.architecture == ARCHITECTURES[family]
    assert a.head_dim == 32 and a.n_kv_heads == 2
    if key == "qwen3-window":
        assert a.sliding_windows == (None, None, 6, 6)
    if family == "gemma3":
        assert a.tie_word_embeddings
        assert (a.rope_theta, a.local_rope_theta) == (100000.0, 10000.0)
        assert a.rope_scaling == {"rope_type": "linear", "factor": 4.0}
        windows = (8, 8, None, 8) if key == "gemma3" else (8, None, 8, None)
        assert a.sliding_windows == windows
        assert a.attention_scale == kwargs.get("query_pre_attn_scalar", 256) ** -0.5
        assert a.final_logit_softcapping == kwargs.get("final_logit_softcapping")


def test_gemma3_4x_config_without_layer_types_takes_every_sixth_layer_global(checkpoint_factory, tmp_path):
    _, directory = _make(checkpoint_factory, "gemma3", "4.x")
    raw = json.loads((directory / "config.json").read_text())
    raw.pop("layer_types")
    raw.pop("sliding_window_pattern", None)
    raw["num_hidden_layers"] = 7
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = load_config(tmp_path)
    assert config.sliding_windows == (8, 8, 8, 8, 8, None, 8)


@pytest.mark.parametrize("changes, words", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping is not supported"),
    ({"hidden_activation": "gelu"}, "unsupported hidden_activation 'gelu'"),
    ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar must be a positive number"),
    ({"final_logit_softcapping": "big"}, "final_logit_softcapping must be a positive number"),
    ({"layer_types": ["sliding_attention"]}, "layer_types must be a list of 4"),
])
def test_bad_gemma3_fields_are_refused_naming_them(checkpoint_factory, tmp_path, changes, words):
    _, directory = _make(checkpoint_factory, "gemma3")
    raw = {**json.loads((directory / "config.json").read_text()), **changes}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=words):
        load_config(tmp_path)


def test_an_unknown_architecture_names_the_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**_BASE, "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ConfigError, match="unsupported architecture 'FalconForCausalLM'.*Qwen3ForCausalLM.*Gemma3"):
        load_config(tmp_path)


# ---------------------------------------------------------------------- against transformers


def test_logits_match_transformers(case):
    _, hf, _, model = case
    ids = _prompt(24, model.config.vocab_size, seed=1)
    ours, ref = model(ids), _hf_logits(hf, ids)
    assert ours.shape == ref.shape == (1, 24, model.config.vocab_size)
    assert (ours - ref).abs().max().item() <= ATOL


def test_greedy_generation_matches_transformers(case):
    _, hf, _, model = case
    ids = _prompt(PROMPT, model.config.vocab_size, seed=2)
    assert torch.equal(model.generate(ids, max_new_tokens=NEW, ignore_eos=True), _hf_greedy(hf, ids))


def test_left_padded_batch_matches_transformers(case):
    """A ragged batch: rows of 12 and 7 tokens, left-padded, through logits and greedy generation."""
    _, hf, _, model = case
    vocab = model.config.vocab_size
    ids, mask = torch.zeros(2, PROMPT, dtype=torch.long), torch.zeros(2, PROMPT, dtype=torch.long)
    ids[0], mask[0] = _prompt(PROMPT, vocab, 3)[0], 1
    ids[1, PROMPT - 7:], mask[1, PROMPT - 7:] = _prompt(7, vocab, 4)[0], 1
    real = mask.bool()
    assert (model(ids, attention_mask=mask)[real] - _hf_logits(hf, ids, mask)[real]).abs().max() <= ATOL
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, ignore_eos=True),
                       _hf_greedy(hf, ids, attention_mask=mask))


def test_the_softcap_and_the_local_rotary_base_matter(checkpoint_factory, tmp_path):
    _, directory = _make(checkpoint_factory, "gemma3-softcap")
    ids = _prompt(20, 320, seed=5)
    variants = {"uncapped": dict(final_logit_softcapping=None),
                "one base": dict(rope_parameters={**_GEMMA_ROPE, "sliding_attention": _GEMMA_ROPE["full_attention"]})}
    with _load(directory) as model:
        want = model(ids)
        assert want.abs().max() <= 2.0  # tanh(x / 2) * 2
    for name, changes in variants.items():
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(directory, copy)
        raw = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**raw, **changes}))
        with _load(copy) as variant:
            assert (variant(ids) - want).abs().max() > 1e-3, name


# ---------------------------------------------------------------------- offloading and tensor parallelism


@pytest.mark.parametrize("key", ["qwen3-window", "gemma3"])
def test_half_the_layers_streamed_equal_resident_bitwise(checkpoint_factory, key):
    _, directory = _make(checkpoint_factory, key)
    ids = _prompt(20, 256, seed=6)
    with _load(directory, max_batch=1) as resident:
        logits = resident(ids)
        tokens = resident.generate(ids[:, :PROMPT], max_new_tokens=NEW, ignore_eos=True)
        needs = resident.plan.needs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        model = _load(directory, max_batch=1, gpu_memory=needs.gpu_budget_streaming(2, slots=1), cpu_memory="1GiB",
                      slots=1)  # with two slots, four blocks on the GPU would hold the whole model
    with model:
        assert model.plan.placement.count("host") == 2 and model.plan.placement.count("resident") == 2
        assert torch.equal(model(ids), logits)
        assert torch.equal(model.generate(ids[:, :PROMPT], max_new_tokens=NEW, ignore_eos=True), tokens)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["qwen3-window", "gemma3"])
def test_tensor_parallel_on_two_ranks_equals_one(checkpoint_factory, key):
    _, directory = _make(checkpoint_factory, key)
    assert_tp_equals_one(directory, _prompt(PROMPT, 256, seed=7, batch=2), ATOL, MAX_SEQ)


# ----------------------------------------------------------------------------- config.json read as transformers 5 reads it


def _both(architecture: str, model_type: str, **fields):
    """offload's ModelConfig and transformers' config of the same config.json fields."""
    import transformers

    from offload.models.config import config_from_dict

    raw = dict(architectures=[architecture], model_type=model_type, vocab_size=64, hidden_size=64,
               intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, **fields)
    return config_from_dict(dict(raw)), transformers.AutoConfig.for_model(**raw)


def test_defaults_of_fields_a_config_leaves_out_are_transformers():
    """Mixtral's rope base 1e6 and eps 1e-5, OLMoE's eps 1e-5, Qwen2-MoE's shared expert of 5632 features (a
    config without them loaded with wrong logits: found by a hostile test)."""
    ours, theirs = _both("MixtralForCausalLM", "mixtral", num_local_experts=4, num_experts_per_tok=2)
    assert (ours.rope_theta, ours.rms_norm_eps) == (theirs.rope_parameters["rope_theta"], theirs.rms_norm_eps)
    ours, theirs = _both("OlmoeForCausalLM", "olmoe", num_experts=4, num_experts_per_tok=2)
    assert ours.rms_norm_eps == theirs.rms_norm_eps == 1e-5
    ours, theirs = _both("Qwen2MoeForCausalLM", "qwen2_moe", num_experts=4, num_experts_per_tok=2)
    assert ours.shared_intermediate == theirs.shared_expert_intermediate_size == 5632


def test_qwen2_moe_reads_qkv_bias():
    ours, _ = _both("Qwen2MoeForCausalLM", "qwen2_moe", num_experts=4, num_experts_per_tok=2, qkv_bias=False)
    assert not ours.qkv_bias


@pytest.mark.parametrize("fields, windows", [
    ({}, (4096,) * 3),  # transformers' Mistral window where config.json names none
    ({"sliding_window": None}, (None,) * 3),
    ({"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention", "full_attention"]},
     (None, 8, None)),  # Ministral's alternating layers
])
def test_mistral_windows(fields, windows):
    ours, _ = _both("MistralForCausalLM", "mistral", **fields)
    assert ours.sliding_windows == windows


def test_qwen2_moe_slides_in_the_layers_transformers_5_does():
    ours, theirs = _both("Qwen2MoeForCausalLM", "qwen2_moe", num_experts=4, num_experts_per_tok=2,
                         use_sliding_window=True, sliding_window=8, max_window_layers=3)
    assert ours.sliding_windows == tuple(8 if t == "sliding_attention" else None for t in theirs.layer_types)


def test_gemma3s_sliding_layers_rotate_with_their_own_base():
    """rope_parameters holding the global layers' section only: the sliding layers' base is
    rope_local_base_freq (it was the global layers' rope_theta: wrong logits)."""
    ours, theirs = _both("Gemma3ForCausalLM", "gemma3_text", head_dim=16, rope_local_base_freq=50.0,
                         rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    assert (ours.rope_theta, ours.local_rope_theta) == (1e6, theirs.rope_parameters["sliding_attention"]["rope_theta"])
    assert ours.local_rope_theta == 50.0


@pytest.mark.parametrize("architecture, model_type, fields", [
    ("Qwen2MoeForCausalLM", "qwen2_moe", dict(use_sliding_window=True, sliding_window=None, max_window_layers=3)),
    ("Qwen3MoeForCausalLM", "qwen3_moe", dict(use_sliding_window=True)),  # no window named: 4096
    ("MistralForCausalLM", "mistral", dict(sliding_window=None, layer_types=["full_attention", "sliding_attention",
                                                                              "full_attention"])),
])
def test_a_window_left_out_or_null_as_transformers_reads_it(architecture, model_type, fields):
    """A key left out takes transformers' default window (4096); an explicit null is no window."""
    experts = dict(num_experts=4, num_experts_per_tok=2) if "Moe" in architecture else {}
    ours, theirs = _both(architecture, model_type, **experts, **fields)
    window = theirs.sliding_window or None
    types = getattr(theirs, "layer_types", None) or ["sliding_attention"] * 3
    assert ours.sliding_windows == tuple(window if t == "sliding_attention" else None for t in types)


@pytest.mark.parametrize("architecture, model_type", [("Qwen2MoeForCausalLM", "qwen2_moe"),
                                                      ("Qwen3MoeForCausalLM", "qwen3_moe")])
def test_an_experts_width_left_out_is_transformers_default(architecture, model_type):
    ours, theirs = _both(architecture, model_type, num_experts=4, num_experts_per_tok=2)
    assert ours.expert_intermediate == theirs.moe_intermediate_size
