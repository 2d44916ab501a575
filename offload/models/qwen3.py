"""Qwen3 (``Qwen3ForCausalLM``): the Llama family's layer with q and k normalized per head.

Each head of q and k goes through an RMS norm of its own (``q_norm``, ``k_norm``, one
weight of ``head_dim`` shared by every head) before the rotary embedding; no biases
unless ``attention_bias``, which then biases q, k, v and o as in Llama; head_dim 128
unless the config says otherwise.
"""

from __future__ import annotations

from ..errors import ConfigError
from .config import ModelConfig, common_fields
from .llama import Llama, sliding_windows


class Qwen3(Llama):
    qk_norm = True

    @classmethod
    def read_config(cls, raw: dict, f, architecture: str) -> ModelConfig:
        if f.text("hidden_act", "silu") != "silu":
            raise ConfigError(f"{f.source}: unsupported hidden_act {raw['hidden_act']!r} (only 'silu')")
        bias = f.flag("attention_bias", False)
        common = common_fields(raw, f, architecture, head_dim=128)
        return ModelConfig(**common, qkv_bias=bias, o_bias=bias,
                           sliding_windows=sliding_windows(raw, f, architecture, common["n_layers"]))
