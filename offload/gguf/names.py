"""GGUF tensor names and layouts mapped to a Hugging Face checkpoint's, and what llama.cpp changed on the way.

llama.cpp's converter renames every tensor (``blk.3.attn_q.weight`` for
``model.layers.3.self_attn.q_proj.weight``) and, for some architectures, changes values:

* llama (and Mistral-style files, which llama.cpp writes as llama): the rows of q and k
  (weights and biases) are permuted within each head, from the rotate-half layout of
  Hugging Face checkpoints to the interleaved pairs of Meta's original checkpoints, which
  llama.cpp's rotary embedding (not the NeoX one) expects. qwen2, qwen3 and gemma3 files use
  NeoX rotary embeddings and are stored unpermuted. (``transformers`` undoes the same
  permutation for llama files only: ``LlamaTensorProcessor``.)
* gemma3: every RMS norm weight is stored as ``1 + w`` (Gemma multiplies by ``1 + w``, ggml
  by the weight), so ``w`` comes back as the stored value minus one, in float32.
* mixtures of experts (qwen2moe, qwen3moe, olmoe; Mixtral written as llama): a layer's routed
  experts are stacked in one tensor per projection (``blk.3.ffn_gate_exps``, ``[experts, out,
  in]``), which offload reads as one tensor per expert (``mlp.experts.5.gate_proj``, a slice of
  the stack's bytes); files from before the stacking (early Mixtral ones) name each expert's
  tensor (``blk.3.ffn_gate.5``). Qwen2-MoE's shared expert gate is stored as a vector, where
  Hugging Face has one row.

The GGUF side of each name comes from the ``gguf`` package's own tables (``MODEL_TENSORS``,
``TENSOR_NAMES``); only the Hugging Face side is written here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from ..errors import CheckpointError, ConfigError
from ..models.registry import family_of
from .reader import GGUFFiles, StoredTensor, gguf_package

# GGUF architecture -> the Hugging Face class offload's families are registered under
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",  # MixtralForCausalLM where the file has experts (``config.hf_config``)
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
PERMUTED_ARCHITECTURES = ("llama",)  # q/k rows interleaved for llama.cpp's rotary embedding
NORM_PLUS_ONE_ARCHITECTURES = ("gemma3",)  # norm weights stored as 1 + w
CONFIG_TENSORS = ("rope_freqs.weight",)  # read into the config (llama 3's rotary scaling), not weights
APART_EXPERT = re.compile(r"blk\.(?P<bid>\d+)\.ffn_(?P<kind>gate|up|down)\.(?P<e>\d+)\.weight$")


def _hf_modules(family) -> dict:
    """The Hugging Face module of each GGUF tensor kind (``{bid}``: the layer index; ``{e}``: the expert of a
    stacked experts tensor) in a model of ``family`` (a Decoder class: a mixture of experts names its router
    and experts)."""
    T = gguf_package().MODEL_TENSOR
    layer = "model.layers.{bid}."
    experts = {}
    if hasattr(family, "expert_sources"):
        gate, up, down = (layer + family.expert_prefix + source for source in family.expert_sources)
        shared = layer + "mlp.shared_expert."
        experts = {T.FFN_GATE_INP: layer + family.router_source.removesuffix(".weight"),
                   T.FFN_GATE_EXP: gate, T.FFN_UP_EXP: up, T.FFN_DOWN_EXP: down,
                   T.FFN_GATE_SHEXP: shared + "gate_proj", T.FFN_UP_SHEXP: shared + "up_proj",
                   T.FFN_DOWN_SHEXP: shared + "down_proj", T.FFN_GATE_INP_SHEXP: layer + "mlp.shared_expert_gate"}
    return {**experts, **{
        T.TOKEN_EMBD: "model.embed_tokens",
        T.OUTPUT_NORM: "model.norm",
        T.OUTPUT: "lm_head",
        T.ATTN_NORM: layer + "input_layernorm",
        T.ATTN_Q: layer + "self_attn.q_proj",
        T.ATTN_K: layer + "self_attn.k_proj",
        T.ATTN_V: layer + "self_attn.v_proj",
        T.ATTN_OUT: layer + "self_attn.o_proj",
        T.ATTN_Q_NORM: layer + "self_attn.q_norm",
        T.ATTN_K_NORM: layer + "self_attn.k_norm",
        T.FFN_NORM: layer + "post_attention_layernorm",  # llama, qwen: the norm before the MLP
        T.ATTN_POST_NORM: layer + "post_attention_layernorm",  # gemma3: the norm after attention
        T.FFN_PRE_NORM: layer + "pre_feedforward_layernorm",
        T.FFN_POST_NORM: layer + "post_feedforward_layernorm",
        T.FFN_GATE: layer + "mlp.gate_proj",
        T.FFN_UP: layer + "mlp.up_proj",
        T.FFN_DOWN: layer + "mlp.down_proj",
    }}


def hf_names(arch: str, n_layers: int, architecture: str | None = None) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name, for every tensor an ``arch`` model of ``n_layers`` may have
    (``architecture``: its Hugging Face class, where it is not ``ARCHITECTURES[arch]``: Mixtral's). A stacked
    experts tensor's Hugging Face name has ``{e}`` for the expert (``apart_expert`` names an expert's tensor
    kept apart)."""
    gguf = gguf_package()
    arch_id = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch), None)
    if arch_id is None:
        raise ConfigError(f"the installed gguf package does not know the architecture {arch!r}: "
                          "pip install --upgrade gguf")
    modules = _hf_modules(family_of(architecture or ARCHITECTURES[arch]))
    out = {}
    for kind in gguf.MODEL_TENSORS[arch_id]:
        hf = modules.get(kind)
        if hf is None:
            continue  # a kind offload's families do not have (rope_freqs, a dense model's experts...)
        template = gguf.TENSOR_NAMES[kind]
        for bid in range(n_layers) if "{bid}" in template else [None]:
            for suffix in (".weight", ".bias"):
                out[template.format(bid=bid) + suffix] = hf.replace("{bid}", str(bid)) + suffix
    return out


def apart_expert(name: str, names: dict[str, str], n_layers: int, n_experts: int) -> str | None:
    """The Hugging Face name of ``blk.3.ffn_gate.5.weight``, an expert's tensor in a file written before experts
    were stacked (early Mixtral files), from its stack's in ``names``; None for any other name."""
    m = APART_EXPERT.match(name)
    if m is None or int(m["bid"]) >= n_layers or int(m["e"]) >= n_experts:
        return None
    stack = names.get(f"blk.{m['bid']}.ffn_{m['kind']}_exps.weight")
    return None if stack is None else stack.format(e=int(m["e"]))


@dataclass(frozen=True)
class MappedTensor:
    """A GGUF tensor under its Hugging Face name, with what reading it must undo."""

    hf_name: str
    stored: StoredTensor
    unpermute_heads: int | None = None  # llama q/k: undo llama.cpp's row permutation over this many heads
    norm_offset: float = 0.0  # gemma3 norms: subtract this (1.0) from the stored values

    @property
    def name(self) -> str:
        return self.stored.name

    @property
    def shape(self) -> tuple[int, ...]:
        """In Hugging Face orientation (``[out_features, in_features]`` for a weight)."""
        return self.stored.shape

    @property
    def ggml_type(self) -> int:
        return self.stored.ggml_type


def map_tensors(files: GGUFFiles, arch: str, config: dict) -> dict[str, MappedTensor]:
    """Every weight of the file under its Hugging Face name (``config``: the file's config dict, ``hf_config``),
    a stack of experts as each expert's tensor. A tensor with no place in an offload model (layers beyond
    ``block_count``, a kind the family does not have) raises CheckpointError."""
    n_layers = config["num_hidden_layers"]
    n_experts = config.get("num_experts") or config.get("num_local_experts") or 0
    names = hf_names(arch, n_layers, config["architectures"][0])
    out = {}
    for name, stored in files.tensors.items():
        if name in CONFIG_TENSORS:
            continue
        hf = names.get(name) or apart_expert(name, names, n_layers, n_experts)
        if hf is None:
            kind = "mixture of experts" if n_experts else "model"
            raise CheckpointError(f"{stored.file.name}: tensor {name!r} has no place in a {arch} {kind} of "
                                  f"{n_layers} layers")
        heads = None
        if arch in PERMUTED_ARCHITECTURES and ".attn_q." in name:
            heads = config["num_attention_heads"]
        elif arch in PERMUTED_ARCHITECTURES and ".attn_k." in name:
            heads = config["num_key_value_heads"]
        offset = 1.0 if arch in NORM_PLUS_ONE_ARCHITECTURES and name.endswith("norm.weight") else 0.0
        if len(stored.shape) == 1 and ".ffn_gate_inp_shexp." in name:
            stored = _as_row(stored)
        pieces = _experts(stored, hf, n_experts) if "{e}" in hf else [(hf, stored)]
        for hf_name, piece in pieces:
            if hf_name in out:  # an expert's tensor both in a stack and apart
                raise CheckpointError(f"{stored.file.name}: {piece.name} and {out[hf_name].name} both hold {hf_name}")
            out[hf_name] = MappedTensor(hf_name, piece, heads, offset)
    return out


def _experts(stored: StoredTensor, template: str, n_experts: int) -> list[tuple[str, StoredTensor]]:
    """A stacked experts tensor (``[experts, out, in]``) as each expert's: its name and its slice of the stack."""
    if len(stored.shape) != 3 or stored.shape[0] != n_experts:
        raise CheckpointError(f"{stored.file.name}: {stored.name} has shape {list(stored.shape)}; a stack of the "
                              f"file's {n_experts} experts has {n_experts} as its first dimension")
    start, end = stored.span
    each = (end - start) // n_experts
    return [(template.format(e=e), replace(stored, name=f"{stored.name}[{e}]", shape=stored.shape[1:],
                                           data=stored.data[e], span=(start + e * each, start + (e + 1) * each)))
            for e in range(n_experts)]


def _as_row(stored: StoredTensor) -> StoredTensor:
    """A vector as a matrix of one row (llama.cpp keeps Qwen2-MoE's ``[1, hidden]`` shared expert gate as a
    vector)."""
    return replace(stored, shape=(1, *stored.shape), data=stored.data.reshape(1, -1))


def unpermute_order(rows: int, heads: int) -> torch.Tensor:
    """Indices that put the rows of a llama.cpp-permuted q or k (``rows`` of them, ``heads`` heads, or a
    head-aligned piece of it) back in Hugging Face order: ``hf = stored[order]``.

    llama.cpp stores row ``h*d + 2j + t`` of head ``h`` (``d`` rows per head) where Hugging Face has
    row ``h*d + t*d/2 + j`` (``t`` in {0, 1}: the two halves that rotate together).
    """
    head_dim = rows // heads
    return torch.arange(rows).view(heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)


def permute_like_llama_cpp(w: torch.Tensor, heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q and k rows (``LlamaModel.permute``): for writing test files."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
