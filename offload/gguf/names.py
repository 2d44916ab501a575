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

The GGUF side of each name comes from the ``gguf`` package's own tables (``MODEL_TENSORS``,
``TENSOR_NAMES``); only the Hugging Face side is written here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from .reader import GGUFFiles, StoredTensor, gguf_package

# GGUF architecture -> the Hugging Face class offload's families are registered under
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
PERMUTED_ARCHITECTURES = ("llama",)  # q/k rows interleaved for llama.cpp's rotary embedding
NORM_PLUS_ONE_ARCHITECTURES = ("gemma3",)  # norm weights stored as 1 + w
CONFIG_TENSORS = ("rope_freqs.weight",)  # read into the config (llama 3's rotary scaling), not weights


def _hf_modules() -> dict:
    """The Hugging Face module of each GGUF tensor kind (``{bid}``: the layer index)."""
    T = gguf_package().MODEL_TENSOR
    layer = "model.layers.{bid}."
    return {
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
    }


def hf_names(arch: str, n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name, for every tensor an ``arch`` model of ``n_layers`` may have."""
    gguf = gguf_package()
    arch_id = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    modules = _hf_modules()
    out = {}
    for kind in gguf.MODEL_TENSORS[arch_id]:
        hf = modules.get(kind)
        if hf is None:
            continue  # a kind offload's families do not have (experts, rope_freqs...)
        template = gguf.TENSOR_NAMES[kind]
        for bid in range(n_layers) if "{bid}" in template else [None]:
            for suffix in (".weight", ".bias"):
                out[template.format(bid=bid) + suffix] = hf.format(bid=bid) + suffix
    return out


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


def map_tensors(files: GGUFFiles, arch: str, n_layers: int, n_heads: int, n_kv_heads: int) -> dict[str, MappedTensor]:
    """Every weight of the file under its Hugging Face name. A tensor with no place in an offload model
    (experts, layers beyond ``block_count``, a kind the family does not have) raises CheckpointError."""
    names = hf_names(arch, n_layers)
    out = {}
    for name, stored in files.tensors.items():
        if name in CONFIG_TENSORS:
            continue
        hf = names.get(name)
        if hf is None:
            raise CheckpointError(f"{stored.file.name}: tensor {name!r} has no place in a {arch} model of "
                                  f"{n_layers} layers (offload reads dense decoders: no experts, no extra tensors)")
        heads = None
        if arch in PERMUTED_ARCHITECTURES and ".attn_q." in name:
            heads = n_heads
        elif arch in PERMUTED_ARCHITECTURES and ".attn_k." in name:
            heads = n_kv_heads
        offset = 1.0 if arch in NORM_PLUS_ONE_ARCHITECTURES and name.endswith("norm.weight") else 0.0
        out[hf] = MappedTensor(hf, stored, heads, offset)
    return out


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
