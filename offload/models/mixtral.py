"""Mixtral (``MixtralForCausalLM``): Mistral's attention, eight experts a layer, two per token.

The router's top two probabilities are renormalised and stay in float32 when they
weigh the experts' outputs (as transformers computes them); ``intermediate_size`` is
each expert's; the checkpoint names experts' projections w1 (gate), w3 (up), w2 (down).
"""

from __future__ import annotations

from .config import ModelConfig, layer_count
from .moe import MoEDecoder


class Mixtral(MoEDecoder):
    router_source = "block_sparse_moe.gate.weight"
    expert_prefix = "block_sparse_moe.experts.{e}."
    expert_sources = ("w1", "w3", "w2")
    float32_routing = True

    @classmethod
    def read_config(cls, raw: dict, f, architecture: str) -> ModelConfig:
        n = layer_count(f)
        return cls.read_moe(raw, f, architecture, (8, 2), ("num_local_experts", "num_experts"), theta=1e6, eps=1e-5,
                            norm_topk_prob=True,
                            sparse_layers=(True,) * n,
                            sliding_windows=(f.count("sliding_window", default=None),) * n)
