"""The Llama family: Llama 2 and 3, Mistral, Qwen2.

Pre-norm decoder layers: RMS norm, self-attention with rotary embeddings (grouped
kv heads; Qwen2 biases q, k and v; Mistral and some Qwen2 layers attend within a
sliding window), a residual add, RMS norm, a SiLU-gated MLP, a residual add.

The arithmetic mirrors transformers' op for op (the same norms in float32, the same
rotary tables, SDPA for prompts), so on the same device and dtype the logits agree
to the bit where the kernels are the same; decode steps attend as transformers'
eager attention does, equal to SDPA to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import TensorParallel
from ..errors import ConfigError
from .blocks import Entry
from .quant import QuantizedWeight
from .config import ModelConfig, common_fields, is_int
from .decoder import Decoder
from .kernels import Norm
from .parallel import REPLICATED, Shard, kv_shard, q_shard


@dataclass(slots=True)
class LlamaWeights:
    """One decoder layer's tensors: views into its block (resident or in a slot)."""

    input_norm: torch.Tensor
    wqkv: torch.Tensor | QuantizedWeight  # this rank's rows of q, k and v, stacked: [q + 2 kv, hidden]
    wo: torch.Tensor | QuantizedWeight
    post_norm: torch.Tensor
    w_gate_up: torch.Tensor | QuantizedWeight  # this rank's rows of gate and up, stacked: [2 intermediate, hidden]
    w_down: torch.Tensor | QuantizedWeight
    bqkv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # Qwen3: per-head RMS norm of q and k
    k_norm: torch.Tensor | None = None


class Llama(Decoder):
    weights_class = LlamaWeights
    groups = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "w_gate_up": ("w_gate", "w_up")}
    linear = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

    @classmethod
    def read_config(cls, raw: dict, f, architecture: str) -> ModelConfig:
        if f.text("hidden_act", "silu") != "silu":
            raise ConfigError(f"{f.source}: unsupported hidden_act {raw['hidden_act']!r} (only 'silu')")
        llama = architecture == "LlamaForCausalLM"  # Mistral's and Qwen2's layers read neither bias field
        if llama and f.flag("mlp_bias", False):
            raise ConfigError(f"{f.source}: mlp_bias is not supported")
        attention_bias = llama and f.flag("attention_bias", False)  # q, k, v and o
        qkv_bias = architecture == "Qwen2ForCausalLM" or attention_bias  # Qwen2's always
        common = common_fields(raw, f, architecture)
        return ModelConfig(**common, qkv_bias=qkv_bias, o_bias=attention_bias,
                           sliding_windows=sliding_windows(raw, f, architecture, common["n_layers"]))

    @classmethod
    def layer_entries(cls, config: ModelConfig, tp: TensorParallel) -> list[Entry]:
        p = "model.layers.{i}."
        return (cls.attention_entries(config, tp)
                + [Entry("post_norm", (config.hidden_size,), p + "post_attention_layernorm.weight", REPLICATED)]
                + mlp_entries(config, tp, config.intermediate_size, p + "mlp."))

    @classmethod
    def attention_entries(cls, config: ModelConfig, tp: TensorParallel) -> list[Entry]:
        """The input norm and the attention's weights (and biases, and q/k norms) of layer ``{i}``."""
        d, p = config.hidden_size, "model.layers.{i}."
        q, kv = q_shard(config, tp), kv_shard(config, tp)
        qd, kvd = config.q_dim, config.kv_dim
        entries = [
            Entry("input_norm", (d,), p + "input_layernorm.weight", REPLICATED),
            Entry("wq", (qd, d), p + "self_attn.q_proj.weight", q),
            Entry("wk", (kvd, d), p + "self_attn.k_proj.weight", kv),
            Entry("wv", (kvd, d), p + "self_attn.v_proj.weight", kv),
        ]
        if config.qkv_bias:
            entries += [
                Entry("bq", (qd,), p + "self_attn.q_proj.bias", q),
                Entry("bk", (kvd,), p + "self_attn.k_proj.bias", kv),
                Entry("bv", (kvd,), p + "self_attn.v_proj.bias", kv),
            ]
        if config.o_bias:
            entries.append(Entry("bo", (d,), p + "self_attn.o_proj.bias", REPLICATED))
        if cls.qk_norm:
            entries += [
                Entry("q_norm", (config.head_dim,), p + "self_attn.q_norm.weight", REPLICATED),
                Entry("k_norm", (config.head_dim,), p + "self_attn.k_norm.weight", REPLICATED),
            ]
        return entries + [Entry("wo", (d, qd), p + "self_attn.o_proj.weight", q_shard(config, tp, dim=1))]

    def layer(self, x: torch.Tensor, w: LlamaWeights, chunk, kv, i: int) -> torch.Tensor:
        eps, ops = self.config.rms_norm_eps, self.ops
        qkv = ops.normed_linear(x, Norm(w.input_norm, eps), w.wqkv, w.bqkv)
        x = self.row_parallel(self.attention(qkv, chunk, kv, i, w.q_norm, w.k_norm), w.wo, w.bo, residual=x)
        gate_up = ops.normed_linear(x, Norm(w.post_norm, eps), w.w_gate_up)
        return self.gated_down(gate_up, "silu", w.w_down, residual=x)


def mlp_entries(config: ModelConfig, tp: TensorParallel, inter: int, prefix: str, names=("w_gate", "w_up", "w_down"),
                sources=("gate_proj", "up_proj", "down_proj")) -> list[Entry]:
    """A SiLU-gated MLP of ``inter`` features at checkpoint ``prefix``: gate and up split by rows over the
    ranks, down by columns (the Megatron split)."""
    d, per = config.hidden_size, inter // tp.size
    rows = Shard(0, tp.rank * per, (tp.rank + 1) * per) if tp.size > 1 else REPLICATED
    cols = Shard(1, rows.start, rows.stop) if tp.size > 1 else REPLICATED
    return [
        Entry(names[0], (inter, d), f"{prefix}{sources[0]}.weight", rows),
        Entry(names[1], (inter, d), f"{prefix}{sources[1]}.weight", rows),
        Entry(names[2], (d, inter), f"{prefix}{sources[2]}.weight", cols),
    ]


MISTRAL_WINDOW = 4096  # transformers' Mistral window where config.json names none (null: no window)
QWEN_WINDOW = 4096  # transformers' Qwen window where config.json names none (null: no window)
QWEN_WINDOW_LAYERS = 28  # transformers' Qwen max_window_layers where config.json names none


def sliding_windows(raw: dict, f, architecture: str, n_layers: int) -> tuple[int | None, ...]:
    """Each layer's attention window (None: full attention), from Mistral's or Qwen2's and Qwen3's fields."""
    if architecture == "LlamaForCausalLM":
        return (None,) * n_layers
    if architecture != "MistralForCausalLM":  # Qwen2, Qwen3: windows from max_window_layers on
        return qwen_windows(raw, f, n_layers, lambda i, first: i >= first)
    if "sliding_window" in raw and raw["sliding_window"] is None:  # null: no window (left out: 4096)
        return (None,) * n_layers
    if raw.get("layer_types") is not None:  # Ministral's alternating layers (transformers loads it so)
        return windows_of(raw["layer_types"], f, n_layers, MISTRAL_WINDOW)
    return (f.count("sliding_window", default=MISTRAL_WINDOW),) * n_layers


def qwen_window(raw: dict, f) -> int | None:
    """The window of a Qwen model's sliding layers as transformers reads it: none unless use_sliding_window
    (whatever sliding_window and layer_types say), then sliding_window (4096 where left out, none where null)."""
    if not f.flag("use_sliding_window", False):
        return None
    return f.count("sliding_window", default=None) if "sliding_window" in raw else QWEN_WINDOW


def qwen_windows(raw: dict, f, n_layers: int, sliding) -> tuple[int | None, ...]:
    """Each layer's window in Qwen2 and Qwen3 (and Qwen2-MoE): ``qwen_window`` in the sliding layers of
    layer_types, or where there are none, in the layers ``sliding(i, max_window_layers)`` picks."""
    window, types = qwen_window(raw, f), raw.get("layer_types")
    if types is None:
        first = raw.get("max_window_layers")
        first = QWEN_WINDOW_LAYERS if first is None else first
        if not is_int(first) or first < 0:
            raise f.bad("max_window_layers", first, "an integer >= 0")
        types = ["sliding_attention" if sliding(i, first) else "full_attention" for i in range(n_layers)]
    return tuple(window if t == "sliding_attention" else None for t in layer_types(types, f, n_layers))


LAYER_KINDS = ("full_attention", "sliding_attention")


def layer_types(types, f, n_layers: int) -> list[str]:
    """``layer_types``, checked: one of ``LAYER_KINDS`` per layer."""
    if not isinstance(types, list) or len(types) != n_layers or not all(t in LAYER_KINDS for t in types):
        raise f.bad("layer_types", types, f"a list of {n_layers} of {', '.join(LAYER_KINDS)}")
    return types


def windows_of(types, f, n_layers: int, default_window: int | None = None) -> tuple[int | None, ...]:
    """The windows of ``layer_types`` (``sliding_attention`` layers take ``sliding_window``, required unless
    the family has a ``default_window``)."""
    if "sliding_attention" not in layer_types(types, f, n_layers):
        return (None,) * n_layers
    window = f.count("sliding_window") if default_window is None else f.count("sliding_window", default_window)
    return tuple(window if t == "sliding_attention" else None for t in types)
