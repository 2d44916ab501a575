"""A Hugging Face ``config.json`` dict rebuilt from a GGUF file's metadata.

A GGUF file has no config.json: its metadata is the config, under llama.cpp's key names
(``llama.block_count``, ``llama.attention.head_count_kv``...). ``hf_config`` writes the
fields offload's families read, for the architectures offload has (llama, including
Mistral-style files and Mixtral; qwen2; qwen3; gemma3; qwen2moe, qwen3moe, olmoe), so that
``config_from_dict`` takes the dict as is.
Some fields are not in the metadata and come from what llama.cpp assumes:

* ``tie_word_embeddings``: true when the file has no ``output.weight`` (llama.cpp writes
  the LM head only when it is not the embedding);
* ``vocab_size``: the embedding's rows (llama.cpp drops Gemma 3's padding rows);
* ``head_dim``: ``attention.key_length``, else (llama) ``rope.dimension_count``, else
  hidden / heads;
* attention biases: present when the file has ``attn_q.bias`` tensors;
* Llama 3's rotary scaling: llama.cpp stores it as a ``rope_freqs`` tensor of per-frequency
  divisors rather than metadata; ``llama3_rope_scaling`` finds the parameters that give those
  divisors (and checks that they do);
* Gemma 3: sliding layers every 6 with the local base 10000 unless the file says otherwise,
  and ``query_pre_attn_scalar`` as llama.cpp sets it (``attention.scale`` when the file has
  it; for the 62-layer 27B, hidden / heads; else head_dim).
* mixtures of experts: llama.cpp routes in every layer, by a softmax, and renormalises the
  chosen experts' probabilities for qwen3moe and Mixtral (a llama file with ``expert_count``),
  not for qwen2moe and olmoe: that is ``norm_topk_prob``. An expert's width is
  ``expert_feed_forward_length``, else its tensors' (Mixtral and OLMoE files give it as
  ``feed_forward_length``); Qwen2-MoE's shared expert's is
  ``expert_shared_feed_forward_length``, else its tensors'. Another gating function, or
  weights scaled after routing, are refused.

Stop tokens: ``eos_token_id`` lists the file's eos, eot and eom ids (llama.cpp ends
generation at any of them).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError
from ..models.config import MAX_LAYERS
from .names import ARCHITECTURES, PERMUTED_ARCHITECTURES
from .reader import GGUFFiles

GEMMA3_SLIDING_PATTERN = 6  # llama.cpp: hparams.set_swa_pattern(6) for gemma3
GEMMA3_LOCAL_THETA = 10_000.0
GEMMA3_27B_LAYERS = 62  # llama.cpp's LLM_TYPE_27B, which scales attention by hidden / heads
MODEL_TYPES = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}  # the rest: arch's name
MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe", "olmoe")  # and llama, where the file has experts
NORMALISED_TOP_K = ("qwen3moe", "llama")  # llama.cpp's norm_w: the chosen experts' probabilities sum to one
SOFTMAX_GATING = 1  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX


def architecture_of(files: GGUFFiles) -> str:
    """The file's GGUF architecture, if offload has a family for it; else ConfigError naming it."""
    arch = files.value("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{files.path.name}: unsupported GGUF architecture {arch!r}; supported: "
                          f"{', '.join(ARCHITECTURES)}")
    return arch


def hf_config(files: GGUFFiles) -> dict:
    """The Hugging Face config.json fields of the model in ``files``."""
    arch = architecture_of(files)
    key = _Keys(files, arch)
    n_heads = key.count("attention.head_count")
    hidden = key.count("embedding_length")
    n_layers = key.count("block_count")
    if n_layers > MAX_LAYERS:  # before anything is built per layer (Gemma 3's layer_types)
        raise ConfigError(f"{files.path.name}: metadata {arch}.block_count must be at most {MAX_LAYERS}, got "
                          f"{n_layers}")
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": MODEL_TYPES.get(arch, arch),
        "vocab_size": _vocab_size(files),
        "hidden_size": hidden,
        "intermediate_size": key.count("feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": key.count("attention.head_count_kv", n_heads),
        "head_dim": _head_dim(key, arch, hidden, n_heads),
        "rms_norm_eps": key.number("attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": key.count("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in files.tensors,
        "bos_token_id": files.value("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _stop_ids(files),
        "hidden_act": "gelu_pytorch_tanh" if arch == "gemma3" else "silu",
    }
    if "blk.0.attn_q.bias" in files.tensors:
        config["attention_bias"] = True
    if "blk.0.ffn_up.bias" in files.tensors:
        config["mlp_bias"] = True  # which the families refuse with a clear message
    config["rope_theta"] = key.number("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10_000.0)
    config["rope_scaling"] = _rope_scaling(files, key, config)  # gemma3: its global layers'
    if arch == "gemma3":
        config.update(_gemma3_fields(key, config))
    if arch == "llama":
        config.update(_llama_kind(files, key))
    config.update(_experts(files, key, arch))
    return config


class _Keys:
    """Typed reads of ``{arch}.*`` metadata; a value of the wrong type raises ConfigError naming the key."""

    def __init__(self, files: GGUFFiles, arch: str):
        self.files, self.arch = files, arch

    def get(self, name: str, default=None):
        return self.files.value(f"{self.arch}.{name}", default)

    def count(self, name: str, default=None) -> int:
        value = self.get(name, default)
        if value is None:
            raise ConfigError(f"{self.files.path.name}: metadata {self.arch}.{name} is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{self.files.path.name}: metadata {self.arch}.{name} must be a positive integer, "
                              f"got {value!r}")
        return value

    def number(self, name: str, default=None) -> float | None:
        value = self.get(name, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{self.files.path.name}: metadata {self.arch}.{name} must be a number, got {value!r}")
        return None if value is None else float(value)


def _vocab_size(files: GGUFFiles) -> int:
    embedding = files.tensors.get("token_embd.weight")
    if embedding is None:
        raise ConfigError(f"{files.path.name}: no token_embd.weight tensor")
    return embedding.shape[0]


def _head_dim(key: _Keys, arch: str, hidden: int, n_heads: int) -> int:
    if key.get("attention.key_length") is not None:
        head_dim = key.count("attention.key_length")
        if key.get("attention.value_length", head_dim) != head_dim:
            raise ConfigError(f"{key.files.path.name}: attention.key_length {head_dim} differs from "
                              f"attention.value_length {key.get('attention.value_length')}; offload's attention "
                              "needs them equal")
        return head_dim
    if arch in PERMUTED_ARCHITECTURES and key.get("rope.dimension_count") is not None:
        return key.count("rope.dimension_count")  # llama rotates the whole head
    return hidden // n_heads


# tokens that end generation by their text, as llama.cpp finds them (its files often name only the eos: a Gemma 3
# instruct file's <eos>, not the <end_of_turn> its chat template ends a turn with)
END_OF_GENERATION = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                     "<|end_of_text|>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<end_of_utterance>")


def _stop_ids(files: GGUFFiles) -> list[int] | int | None:
    """The eos, eot and eom ids the metadata names, then those of the tokens in ``END_OF_GENERATION``."""
    ids = [files.value(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    tokens = files.value("tokenizer.ggml.tokens") or []
    ids += [i for i, t in enumerate(tokens) if t in END_OF_GENERATION]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    return ids[0] if len(ids) == 1 else ids or None


def _rope_scaling(files: GGUFFiles, key: _Keys, config: dict) -> dict | None:
    """Linear scaling from the metadata; Llama 3's from its rope_freqs tensor; any other kind passed on by
    name, for config_from_dict to refuse."""
    kind = key.get("rope.scaling.type")
    if kind in (None, "none"):
        if "rope_freqs.weight" in files.tensors:
            return llama3_rope_scaling(files, config)
        return None
    scaling = {"rope_type": kind}
    if key.get("rope.scaling.factor") is not None:
        scaling["factor"] = key.number("rope.scaling.factor")
    if key.get("rope.scaling.original_context_length") is not None:
        scaling["original_max_position_embeddings"] = key.count("rope.scaling.original_context_length")
    return scaling


def llama3_rope_scaling(files: GGUFFiles, config: dict) -> dict:
    """The ``llama3`` rope_scaling whose per-frequency divisors are the file's ``rope_freqs`` tensor.

    llama.cpp's converter writes ``factor`` for wavelengths beyond ``old / low``, 1 below
    ``old / high``, and ``1 / ((1 - s) / factor + s)`` between, with
    ``s = (old / wavelength - low) / (high - low)``: linear in 1 / wavelength, so two divisors of
    the middle band give ``old / (high - low)`` and ``low / (high - low)``; ``low`` is taken as 1
    (Llama 3.1-3.3's value; any other gives the same frequencies). The result is checked against
    every divisor.
    """
    stored = files.tensors["rope_freqs.weight"]
    divisors = np.asarray(stored.data, dtype=np.float64).reshape(-1)
    head_dim = config["head_dim"]
    if divisors.size != head_dim // 2:
        raise ConfigError(f"{files.path.name}: rope_freqs has {divisors.size} values, expected head_dim / 2 = "
                          f"{head_dim // 2}")
    theta = config["rope_theta"]
    wavelength = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    factor = float(divisors.max())
    middle = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if factor <= 1 or middle.sum() < 2:
        raise ConfigError(f"{files.path.name}: rope_freqs does not follow Llama 3's rotary scaling "
                          "(offload reads no other per-frequency scaling)")
    s = (1 / divisors[middle] - 1 / factor) / (1 - 1 / factor)
    a, minus_b = np.polyfit(1 / wavelength[middle], s, 1)  # s = a / wavelength - b
    b = -minus_b
    if b <= 0:
        raise ConfigError(f"{files.path.name}: rope_freqs does not follow Llama 3's rotary scaling "
                          "(offload reads no other per-frequency scaling)")
    low, high = 1.0, 1.0 + 1.0 / b  # b = low / (high - low), a = old / (high - low)
    old = round(a / b)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
               "high_freq_factor": float(np.round(high, 6)), "original_max_position_embeddings": old}
    if not np.allclose(_llama3_divisors(wavelength, scaling), divisors, rtol=1e-5, atol=0):
        raise ConfigError(f"{files.path.name}: rope_freqs does not follow Llama 3's rotary scaling "
                          "(offload reads no other per-frequency scaling)")
    return scaling


def _llama3_divisors(wavelength: np.ndarray, scaling: dict) -> np.ndarray:
    """What llama.cpp's converter stores in rope_freqs for these parameters."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    smooth = (old / wavelength - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelength < old / high, 1.0, np.where(wavelength > old / low, factor, between))


def _llama_kind(files: GGUFFiles, key: _Keys) -> dict:
    """Mistral-style files are written as llama; the name says which, and the window (if stored) applies."""
    name = f"{files.value('general.name', '')} {files.value('general.basename', '')}".lower()
    window = key.get("attention.sliding_window")
    if "mistral" in name or window is not None:
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": window}
    return {}


def _experts(files: GGUFFiles, key: _Keys, arch: str) -> dict:
    """A mixture of experts' fields (none for a dense model): how many experts, how many a token uses, their
    widths, whether the chosen ones' probabilities are renormalised."""
    if arch not in MOE_ARCHITECTURES and key.get("expert_count") in (None, 0):  # llama.cpp: 0 experts, a dense model
        if key.get("expert_used_count") not in (None, 0):
            raise ConfigError(f"{files.path.name}: metadata {arch}.expert_used_count is "
                              f"{key.get('expert_used_count')!r} in a model of no experts")
        return {}
    n, used = key.count("expert_count"), key.count("expert_used_count")
    if key.get("expert_gating_func", SOFTMAX_GATING) != SOFTMAX_GATING:
        raise ConfigError(f"{files.path.name}: metadata {arch}.expert_gating_func is "
                          f"{key.get('expert_gating_func')!r}; offload's experts are chosen by a softmax "
                          f"({SOFTMAX_GATING})")
    if key.number("expert_weights_scale", 0.0) not in (0.0, 1.0):
        raise ConfigError(f"{files.path.name}: metadata {arch}.expert_weights_scale is "
                          f"{key.number('expert_weights_scale')}; offload does not scale its experts' weights")
    width = key.count("expert_feed_forward_length") if key.get("expert_feed_forward_length") is not None else \
        _rows_of(files, ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_gate.0.weight"), key.count("feed_forward_length"))
    fields = {"num_experts_per_tok": used, "norm_topk_prob": arch in NORMALISED_TOP_K, "decoder_sparse_step": 1,
              "mlp_only_layers": []}
    if arch == "llama":  # Mixtral: intermediate_size is each expert's
        return {**fields, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": n,
                "intermediate_size": width}
    fields.update(num_experts=n, moe_intermediate_size=width)
    if arch == "qwen2moe":
        shared = key.get("expert_shared_feed_forward_length") is not None
        fields["shared_expert_intermediate_size"] = key.count("expert_shared_feed_forward_length") if shared else \
            _rows_of(files, ("blk.0.ffn_gate_shexp.weight",), key.count("feed_forward_length"))
    return fields


def _rows_of(files: GGUFFiles, names: tuple[str, ...], default: int) -> int:
    """The output features of the first of ``names`` the file has (a stack of experts': each one's), else
    ``default``."""
    stored = next((files.tensors[n] for n in names if n in files.tensors), None)
    return default if stored is None else stored.shape[-2]


def _gemma3_fields(key: _Keys, config: dict) -> dict:
    n_layers = config["num_hidden_layers"]
    scale = key.number("attention.scale")
    if scale is not None:
        scalar = scale**-2
    elif n_layers == GEMMA3_27B_LAYERS:
        scalar = config["hidden_size"] / config["num_attention_heads"]
    else:
        scalar = config["head_dim"]
    fields = {
        "rope_local_base_freq": key.number("rope.freq_base_swa", GEMMA3_LOCAL_THETA),
        "query_pre_attn_scalar": scalar,
        "layer_types": _gemma3_layer_types(key, n_layers),
        "sliding_window": key.get("attention.sliding_window"),
    }
    cap = key.number("final_logit_softcapping")
    if cap:
        fields["final_logit_softcapping"] = cap
    if key.number("attn_logit_softcapping"):
        fields["attn_logit_softcapping"] = key.number("attn_logit_softcapping")  # refused by the family
    return fields


def _gemma3_layer_types(key: _Keys, n_layers: int) -> list[str]:
    """Which layers slide: ``sliding_window_pattern`` as a period or one flag per layer, else every layer but
    each sixth; none when the file has no sliding window."""
    if key.get("attention.sliding_window") is None:
        return ["full_attention"] * n_layers
    pattern = key.get("attention.sliding_window_pattern", GEMMA3_SLIDING_PATTERN)
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise ConfigError(f"{key.files.path.name}: sliding_window_pattern has {len(pattern)} entries for "
                              f"{n_layers} layers")
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
