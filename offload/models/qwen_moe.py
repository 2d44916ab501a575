"""Qwen's mixtures of experts: Qwen2-MoE (``Qwen2MoeForCausalLM``) and Qwen3-MoE (``Qwen3MoeForCausalLM``).

Qwen2-MoE: Qwen2's attention (q, k and v biased), a shared expert of
``shared_expert_intermediate_size`` features added to the routed ones behind a
sigmoid gate. Qwen3-MoE: Qwen3's attention (q and k normalised per head), no shared
expert. Both renormalise the top-k probabilities only where ``norm_topk_prob`` says,
route in the layers ``decoder_sparse_step`` picks and ``mlp_only_layers`` leaves out
(the others have a dense MLP of ``intermediate_size``); each expert has
``moe_intermediate_size`` features.
"""

from __future__ import annotations

from .config import ModelConfig, is_int
from .moe import MoEDecoder


class Qwen2Moe(MoEDecoder):
    @classmethod
    def read_config(cls, raw: dict, f, architecture: str) -> ModelConfig:
        fields = {}
        if raw.get("layer_types") is None and f.flag("use_sliding_window", False):
            # transformers 5's Qwen2-MoE: every other layer below max_window_layers slides, from the first
            n = f.count("num_hidden_layers")
            window = f.count("sliding_window", default=None) if "sliding_window" in raw else 4096  # (null: none)
            first = raw.get("max_window_layers", 28)
            if not is_int(first) or first < 0:
                raise f.bad("max_window_layers", first, "an integer >= 0")
            fields["sliding_windows"] = tuple(window if i % 2 == 0 and i < first else None for i in range(n))
        return cls.read_moe(raw, f, architecture, expert_width=1408, qkv_bias=f.flag("qkv_bias", True),
                            shared_intermediate=f.count("shared_expert_intermediate_size", default=5632), **fields)


class Qwen3Moe(MoEDecoder):
    qk_norm = True

    @classmethod
    def read_config(cls, raw: dict, f, architecture: str) -> ModelConfig:
        bias = f.flag("attention_bias", False)
        fields = {}
        if raw.get("layer_types") is None:
            # transformers 5's Qwen3-MoE windows every layer where use_sliding_window (max_window_layers, in
            # released configs, is not read)
            n = f.count("num_hidden_layers")
            window = (f.count("sliding_window", default=None) if "sliding_window" in raw else 4096) \
                if f.flag("use_sliding_window", False) else None
            fields["sliding_windows"] = (window,) * n
        return cls.read_moe(raw, f, architecture, expert_width=768, qkv_bias=bias, o_bias=bias, **fields)
