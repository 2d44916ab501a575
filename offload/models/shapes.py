"""Named model shapes: the ``config.json`` of real models, for checkpoints of random weights.

``make_checkpoint.py --shape llama-2-13b`` and ``bench_offload.py --shape llama-2-13b``
use these, so tests and benchmarks run real shapes without downloads.
"""

from __future__ import annotations

from ..errors import ConfigError


def _llama(vocab, hidden, inter, layers, heads, kv_heads, max_pos, theta=10000.0, eps=1e-5, **extra):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_pos, "rope_theta": theta, "rms_norm_eps": eps,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        **extra,
    }


def _qwen3(vocab, hidden, inter, layers, heads, kv_heads, tie=False):
    return {
        **_llama(vocab, hidden, inter, layers, heads, kv_heads, 40960, theta=1000000.0, eps=1e-6),
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 128, "attention_bias": False,
        "tie_word_embeddings": tie, "use_sliding_window": False, "sliding_window": None,
        "bos_token_id": 151643, "eos_token_id": 151645,
    }


def _gemma3(vocab, hidden, inter, layers, heads, kv_heads, head_dim, scalar, window):
    return {
        **_llama(vocab, hidden, inter, layers, heads, kv_heads, 131072, eps=1e-6),
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar, "sliding_window": window,
        "layer_types": ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)],
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": [1, 106],
    }


_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict] = {
    # A few MB: the demo and CI. Grouped-query attention, and every size divisible by 2 and 4.
    "tiny": _llama(1024, 128, 352, 8, 4, 2, 512),
    "llama-2-7b": _llama(32000, 4096, 11008, 32, 32, 32, 4096),
    "llama-2-13b": _llama(32000, 5120, 13824, 40, 40, 40, 4096),
    "llama-2-70b": _llama(32000, 8192, 28672, 80, 64, 8, 4096),
    "llama-3-8b": _llama(128256, 4096, 14336, 32, 32, 8, 8192, theta=500000.0,
                         bos_token_id=128000, eos_token_id=128001),
    "llama-3-70b": _llama(128256, 8192, 28672, 80, 64, 8, 8192, theta=500000.0,
                          bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": _llama(128256, 4096, 14336, 32, 32, 8, 131072, theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                           bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-405b": _llama(128256, 16384, 53248, 126, 128, 8, 131072, theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                             bos_token_id=128000, eos_token_id=128001),
    "mistral-7b": {
        **_llama(32000, 4096, 14336, 32, 32, 8, 32768, eps=1e-5),
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 4096,
    },
    "qwen2-7b": {
        **_llama(152064, 3584, 18944, 28, 28, 4, 32768, theta=1000000.0, eps=1e-6),
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_bias": True,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28,
        "bos_token_id": 151643, "eos_token_id": 151643,
    },
    "smollm2-135m": {
        **_llama(49152, 576, 1536, 30, 9, 3, 8192, theta=100000.0),
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    },
    "mixtral-8x7b": {
        **_llama(32000, 4096, 14336, 32, 32, 8, 32768, theta=1000000.0),
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 8,
        "num_experts_per_tok": 2, "sliding_window": None,
    },
    "qwen3-30b-a3b": {
        **_qwen3(151936, 2048, 6144, 48, 32, 4),
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "qwen3-235b-a22b": {
        **_qwen3(151936, 4096, 12288, 94, 64, 4),
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 1536, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "qwen3-8b": _qwen3(151936, 4096, 12288, 36, 32, 8),
    "qwen3-32b": _qwen3(151936, 5120, 25600, 64, 64, 8),
    "gemma-3-27b": _gemma3(262208, 5376, 21504, 62, 32, 16, 128, 168, 1024),
}


def shape_config(name: str) -> dict:
    """The HF ``config.json`` contents of a named shape."""
    if name not in SHAPES:
        raise ConfigError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    return dict(SHAPES[name])
