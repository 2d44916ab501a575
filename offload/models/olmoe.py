"""OLMoE (``OlmoeForCausalLM``): Llama's layer with 64 experts, 8 per token.

q and k are RMS-normalised over their whole projection (every head together, not per
head), then optionally clamped, v too (``clip_qkv``); ``intermediate_size`` is each
expert's; the top-k probabilities are renormalised only where ``norm_topk_prob`` says.
Normalising across heads would need the heads of every rank: tensor parallelism is
refused.
"""

from __future__ import annotations

import torch

from ..distributed import TensorParallel
from ..errors import ConfigError
from .blocks import Entry
from .config import ModelConfig, layer_count
from .kernels import Norm
from .moe import MoEDecoder
from .parallel import REPLICATED


class Olmoe(MoEDecoder):
    @classmethod
    def read_config(cls, raw: dict, f, architecture: str) -> ModelConfig:
        bias = f.flag("attention_bias", False)
        n = layer_count(f)
        return cls.read_moe(raw, f, architecture, (64, 8), eps=1e-5, qkv_bias=bias, o_bias=bias,
                            sparse_layers=(True,) * n, clip_qkv=f.number("clip_qkv", None), sliding_windows=(None,) * n)

    @classmethod
    def attention_entries(cls, config: ModelConfig, tp: TensorParallel) -> list[Entry]:
        if tp.size > 1:
            raise ConfigError("OLMoE normalises q and k across all heads: tensor parallelism is not supported")
        p = "model.layers.{i}.self_attn."
        entries = super().attention_entries(config, tp)
        return entries[:-1] + [Entry("q_norm", (config.q_dim,), p + "q_norm.weight", REPLICATED),
                               Entry("k_norm", (config.kv_dim,), p + "k_norm.weight", REPLICATED), entries[-1]]

    def attend(self, x, w, chunk, kv, i):
        eps, ops, q_dim, kv_dim = self.config.rms_norm_eps, self.ops, self.config.q_dim, self.config.kv_dim
        qkv = ops.normed_linear(x, Norm(w.input_norm, eps), w.wqkv, w.bqkv)
        q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
        qkv = torch.cat([ops.rms_norm(q.contiguous(), w.q_norm, eps), ops.rms_norm(k.contiguous(), w.k_norm, eps), v],
                        dim=-1)
        if self.config.clip_qkv is not None:
            qkv = qkv.clamp(-self.config.clip_qkv, self.config.clip_qkv)
        h = self.row_parallel(self.attention(qkv, chunk, kv, i), w.wo, w.bo)
        return ops.add_rms_norm(x, h, w.post_norm, eps)
