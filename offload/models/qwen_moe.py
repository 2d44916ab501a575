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

from .config import ModelConfig
from .moe import MoEDecoder


class Qwen2Moe(MoEDecoder):
    @classmethod
    def read_config(cls, raw: dict, f, architecture: str) -> ModelConfig:
        return cls.read_moe(raw, f, architecture, qkv_bias=True,
                            shared_intermediate=f.count("shared_expert_intermediate_size", default=None) or 0)


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
            window = f.count("sliding_window", default=None) if f.flag("use_sliding_window", False) else None
            fields["sliding_windows"] = (window,) * n
        return cls.read_moe(raw, f, architecture, qkv_bias=bias, o_bias=bias, **fields)
