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

from .config import ModelConfig, layer_count
from .llama import qwen_window, qwen_windows
from .moe import MoEDecoder


class Qwen2Moe(MoEDecoder):
    @classmethod
    def read_config(cls, raw: dict, f, architecture: str) -> ModelConfig:
        # transformers 5's Qwen2-MoE: without layer_types, every other layer below max_window_layers slides
        n = layer_count(f)
        windows = qwen_windows(raw, f, n, lambda i, first: i % 2 == 0 and i < first)
        return cls.read_moe(raw, f, architecture, (60, 4), ("num_experts",), expert_width=1408,
                            qkv_bias=f.flag("qkv_bias", True), sliding_windows=windows,
                            shared_intermediate=f.count("shared_expert_intermediate_size", default=5632))


class Qwen3Moe(MoEDecoder):
    qk_norm = True

    @classmethod
    def read_config(cls, raw: dict, f, architecture: str) -> ModelConfig:
        bias = f.flag("attention_bias", False)
        # transformers 5's Qwen3-MoE windows every layer where use_sliding_window (it reads no layer_types, and
        # max_window_layers, in released configs, is not read)
        windows = (qwen_window(raw, f),) * layer_count(f)
        return cls.read_moe(raw, f, architecture, (128, 8), ("num_local_experts", "num_experts"),
                            expert_width=768, qkv_bias=bias, o_bias=bias, sliding_windows=windows)
