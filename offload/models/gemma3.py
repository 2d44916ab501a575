"""Gemma 3 text models (``Gemma3ForCausalLM``).

What sets them apart from the Llama family:

* embeddings are scaled by ``sqrt(hidden_size)`` (the scale rounded to the model dtype);
* every RMS norm multiplies by ``1 + weight`` in float32 and rounds once;
* four norms per layer: before and after attention, before and after the MLP, each
  branch normalized before it is added to the residual stream;
* q and k are normalized per head before the rotary embedding;
* attention scores are scaled by ``query_pre_attn_scalar ** -0.5``;
* sliding-window layers (five of every six, or ``layer_types``) are interleaved with
  global ones, and the two kinds rotate with rotary embeddings of their own bases
  (``rope_parameters.sliding_attention`` / ``full_attention``; in transformers 4.x files
  ``rope_local_base_freq`` and ``rope_theta`` with ``rope_scaling``);
* a tanh-approximated GELU gates the MLP;
* the LM head is the embedding (tied), and the logits are soft-capped where
  ``final_logit_softcapping`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import TensorParallel
from ..errors import ConfigError
from .blocks import Entry
from .config import ModelConfig, common_fields, read_rope, rope_inv_freq
from .decoder import Decoder
from .kernels import Norm
from .llama import windows_of
from .parallel import REPLICATED, Shard, kv_shard, q_shard
from .quant import QuantizedWeight

SLIDING_WINDOW_PATTERN = 6  # transformers 4.x files: every sixth layer attends globally


@dataclass(frozen=True)
class Gemma3Config(ModelConfig):
    local_rope_theta: float = 10000.0  # the rotary embedding of sliding-window layers
    local_rope_scaling: dict | None = None
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None

    @property
    def attention_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5


@dataclass(slots=True)
class Gemma3Weights:
    input_norm: torch.Tensor
    wqkv: torch.Tensor | QuantizedWeight
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    wo: torch.Tensor | QuantizedWeight
    post_attention_norm: torch.Tensor
    pre_mlp_norm: torch.Tensor
    w_gate_up: torch.Tensor | QuantizedWeight
    w_down: torch.Tensor | QuantizedWeight
    post_mlp_norm: torch.Tensor


class Gemma3(Decoder):
    weights_class = Gemma3Weights
    groups = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}
    linear = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    qk_norm = True
    decode_kernels_per_layer = 10  # Llama's 7 with a norm after the attention, a norm after the MLP, its residual add

    @classmethod
    def fused_norms(cls, config: ModelConfig) -> int:  # the input's only: the MLP's follows a norm of its own
        return cls.input_norm_fused(config)

    @classmethod
    def read_config(cls, raw: dict, f, architecture: str) -> Gemma3Config:
        activation = f.text("hidden_activation", f.text("hidden_act", "gelu_pytorch_tanh"))
        if activation != "gelu_pytorch_tanh":
            raise ConfigError(f"{f.source}: unsupported hidden_activation {activation!r} (only 'gelu_pytorch_tanh')")
        for unsupported in ("attention_bias", "use_bidirectional_attention"):
            if f.flag(unsupported, False):
                raise ConfigError(f"{f.source}: {unsupported} is not supported")
        if raw.get("attn_logit_softcapping") is not None:
            raise ConfigError(f"{f.source}: attn_logit_softcapping is not supported (Gemma 3 sets it to null)")
        common = common_fields(raw, f, architecture, theta=1_000_000.0, head_dim=256, tie=True,
                               rope_section="full_attention")
        local_base = f.number("rope_local_base_freq", 10_000.0)  # the sliding layers' base, unless their section says
        if f.nested("rope_parameters") is not None:
            local_theta, local_scaling = read_rope(raw, f, local_base, section="sliding_attention", inherit_theta=False)
        else:  # transformers 4.x: rope_scaling is the global layers'
            local_theta, local_scaling = local_base, None
        n = common["n_layers"]
        types = raw.get("layer_types")
        if types is None:
            pattern = f.count("sliding_window_pattern", default=SLIDING_WINDOW_PATTERN)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
        return Gemma3Config(
            **common,
            sliding_windows=windows_of(types, f, n, default_window=4096),
            local_rope_theta=local_theta,
            local_rope_scaling=local_scaling,
            query_pre_attn_scalar=f.number("query_pre_attn_scalar", 256.0),
            final_logit_softcapping=f.number("final_logit_softcapping", None),
        )

    @classmethod
    def layer_entries(cls, config: ModelConfig, tp: TensorParallel) -> list[Entry]:
        d, hd, p = config.hidden_size, config.head_dim, "model.layers.{i}."
        q, kv = q_shard(config, tp), kv_shard(config, tp)
        inter = config.intermediate_size // tp.size
        mlp_rows = Shard(0, tp.rank * inter, (tp.rank + 1) * inter) if tp.size > 1 else REPLICATED
        mlp_cols = Shard(1, mlp_rows.start, mlp_rows.stop) if tp.size > 1 else REPLICATED
        qd, kvd, i = config.q_dim, config.kv_dim, config.intermediate_size
        return [
            Entry("input_norm", (d,), p + "input_layernorm.weight", REPLICATED),
            Entry("wq", (qd, d), p + "self_attn.q_proj.weight", q),
            Entry("wk", (kvd, d), p + "self_attn.k_proj.weight", kv),
            Entry("wv", (kvd, d), p + "self_attn.v_proj.weight", kv),
            Entry("q_norm", (hd,), p + "self_attn.q_norm.weight", REPLICATED),
            Entry("k_norm", (hd,), p + "self_attn.k_norm.weight", REPLICATED),
            Entry("wo", (d, qd), p + "self_attn.o_proj.weight", q_shard(config, tp, dim=1)),
            Entry("post_attention_norm", (d,), p + "post_attention_layernorm.weight", REPLICATED),
            Entry("pre_mlp_norm", (d,), p + "pre_feedforward_layernorm.weight", REPLICATED),
            Entry("w_gate", (i, d), p + "mlp.gate_proj.weight", mlp_rows),
            Entry("w_up", (i, d), p + "mlp.up_proj.weight", mlp_rows),
            Entry("w_down", (d, i), p + "mlp.down_proj.weight", mlp_cols),
            Entry("post_mlp_norm", (d,), p + "post_feedforward_layernorm.weight", REPLICATED),
        ]

    @classmethod
    def rope_inv_freqs(cls, config: Gemma3Config) -> list[torch.Tensor]:
        return [config.rope_inv_freq(), rope_inv_freq(config.head_dim, config.local_rope_theta, config.local_rope_scaling)]

    @classmethod
    def layer_rope(cls, config: ModelConfig, i: int) -> int:
        return 1 if config.sliding_windows[i] is not None else 0

    def layer(self, x: torch.Tensor, w: Gemma3Weights, chunk, kv, i: int) -> torch.Tensor:
        eps, ops = self.config.rms_norm_eps, self.ops
        qkv = ops.normed_linear(x, Norm(w.input_norm, eps, offset=True), w.wqkv)
        h = self.row_parallel(self.attention(qkv, chunk, kv, i, w.q_norm, w.k_norm, offset=True), w.wo)
        h = ops.rms_norm(h, w.post_attention_norm, eps, offset=True)
        x, h = ops.add_rms_norm(x, h, w.pre_mlp_norm, eps, offset=True)  # x + h, and its norm
        h = self.gated_down(ops.linear(h, w.w_gate_up), "gelu_tanh", w.w_down)
        return x + ops.rms_norm(h, w.post_mlp_norm, eps, offset=True)

    def embed(self, tokens: torch.Tensor, host_tokens: torch.Tensor | None = None) -> torch.Tensor:
        h = super().embed(tokens, host_tokens)
        return h * torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32).to(h.dtype)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.logits(self.ops.rms_norm(h, self.weights.final_norm, self.config.rms_norm_eps, offset=True))
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
