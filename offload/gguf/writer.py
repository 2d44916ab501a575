"""Writing GGUF files with the ``gguf`` package's writer, tensor by tensor: for tests and benchmarks.

``write_gguf`` streams: every tensor's header first, then each tensor's bytes made, written
and dropped in turn, so a file of any size needs one tensor's memory (a 13B-shaped file is
7.9 GB). ``random_blocks`` makes valid blocks of any block type from random bytes (finite
float16 scales of a trained weight's size); ``write_q4_k_m_like`` writes a llama model, or a
Qwen3-MoE one (its experts stacked), of any shape in the mix llama.cpp's Q4_K_M gives: Q4_K for
most matrices, Q6_K for the embedding, the output and the attn_v / ffn_down of the layers
llama.cpp gives more bits, F32 norms and routers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .reader import gguf_package

# byte offsets of the float16 d / dmin fields in each block type's block
_HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
                "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,),
                "IQ2_XXS": (0,), "TQ1_0": (52,)}


@dataclass(frozen=True)
class TensorToWrite:
    name: str  # the GGUF name (``blk.0.attn_q.weight``)
    ggml_type: int
    shape: tuple[int, ...]  # numpy order: [out_features, in_features] for a weight
    make: Callable[[], np.ndarray]  # its data: float32/float16 values, or uint8 blocks [rows, bytes per row]


def write_gguf(path, arch: str, metadata: dict, tensors: Iterable[TensorToWrite], split_max_tensors: int = 0,
               progress: bool = False) -> list[Path]:
    """Write a GGUF file (or split parts, ``split_max_tensors`` per part) holding ``metadata`` (key -> value;
    ``general.architecture`` is ``arch``) and ``tensors``, one tensor in memory at a time. Returns the files."""
    gguf = gguf_package()
    tensors = list(tensors)
    writer = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    for key, value in metadata.items():
        _add(writer, key, value)
    for t in tensors:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.ggml_type)]
        nbytes = math.prod(t.shape) // block * type_size
        writer.add_tensor_info(t.name, list(t.shape), np.dtype(np.float32), nbytes, raw_dtype=t.ggml_type)
    files = writer.format_shard_names(Path(path)) if split_max_tensors else [Path(path)]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    start = time.perf_counter()
    for i, t in enumerate(tensors):
        data = np.ascontiguousarray(t.make())
        writer.write_tensor_data(data.view(np.uint8).reshape(-1))
        if progress and (i + 1) % 20 == 0:
            print(f"  {i + 1}/{len(tensors)} tensors, {time.perf_counter() - start:.0f} s", flush=True)
    writer.close()
    return files


def _add(writer, key: str, value) -> None:
    """One metadata value with the GGUF type a llama.cpp converter gives it."""
    gguf = gguf_package()
    V = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        kinds = {type(v) for v in value}
        if kinds == {int}:  # token types are int32 in llama.cpp's files
            writer.add_key_value(key, list(value), V.ARRAY, sub_type=V.INT32)
        else:
            writer.add_array(key, list(value))
    else:
        raise TypeError(f"metadata {key!r}: cannot write {type(value).__name__}")


def random_blocks(ggml_type, rows: int, cols: int, rng: np.random.Generator, scale: float = 1e-3,
                  signed: bool = False) -> np.ndarray:
    """``rows`` rows of ``cols`` values in ``ggml_type`` as random valid blocks (uint8 ``[rows, bytes per row]``):
    random bytes, with each float16 d / dmin set to a random value below ``scale`` in magnitude (positive,
    as llama.cpp's K-quants make them, unless ``signed``; Q4_0/Q8_0 blocks have negative ones too), so every
    value is finite."""
    gguf = gguf_package()
    kind = gguf.GGMLQuantizationType(int(ggml_type))
    block, type_size = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, size=(rows * cols // block, type_size), dtype=np.uint8)
    for at in _HALF_FIELDS[kind.name]:
        halves = rng.random(len(blocks), dtype=np.float32) * scale
        if signed:
            halves *= rng.choice(np.array([-1, 1], dtype=np.float32), len(blocks))
        halves = halves.astype(np.float16)
        blocks[:, at : at + 2] = halves.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def uses_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the layers whose attn_v and ffn_down Q4_K_M stores in Q6_K."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def model_metadata(arch: str, config: dict, name: str) -> dict:
    """The ``{arch}.*`` metadata llama.cpp's converter writes for a Hugging Face config (``llama``, or
    ``qwen3moe``: its heads' width and its experts)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim", config["hidden_size"] // heads)
    eps = config.get("rms_norm_eps", 1e-5 if arch == "llama" else 1e-6)
    meta = {
        "general.name": name,
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.context_length": config.get("max_position_embeddings", 4096),
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": config.get("num_key_value_heads", heads),
        f"{arch}.rope.freq_base": float(config.get("rope_theta", 1e4 if arch == "llama" else 1e6)),
        f"{arch}.attention.layer_norm_rms_epsilon": float(eps),
        f"{arch}.vocab_size": config["vocab_size"],
    }
    if arch == "llama":
        meta["llama.rope.dimension_count"] = head_dim
    else:
        meta.update({f"{arch}.attention.key_length": head_dim, f"{arch}.attention.value_length": head_dim,
                     f"{arch}.expert_count": config["num_experts"],
                     f"{arch}.expert_used_count": config["num_experts_per_tok"],
                     f"{arch}.expert_feed_forward_length": config["moe_intermediate_size"]})
    return meta


def llama_metadata(config: dict, name: str = "offload synthetic llama") -> dict:
    """The ``llama.*`` metadata llama.cpp's converter writes for a Hugging Face Llama config."""
    return model_metadata("llama", config, name)


def q4_k_m_like_tensors(config: dict, seed: int = 0) -> list[TensorToWrite]:
    """The tensors of a llama or Qwen3-MoE model (``num_experts``) shaped by ``config`` (HF field names) in a
    Q4_K_M-like mix, each made from its own seed when written."""
    T = gguf_package().GGMLQuantizationType
    d, n = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim", d // heads)
    kv = config.get("num_key_value_heads", heads) * head_dim
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    experts, width = config.get("num_experts", 0), config.get("moe_intermediate_size", 0)

    def blocks(kind, rows, cols, key):
        return lambda: random_blocks(kind, rows, cols, np.random.default_rng([seed, *key]))

    def norm(size, key):
        return lambda: (1 + 0.1 * np.random.default_rng([seed, *key]).standard_normal(size)).astype(np.float32)

    def router(shape, key):
        return lambda: (0.02 * np.random.default_rng([seed, *key]).standard_normal(shape)).astype(np.float32)

    out = [TensorToWrite("token_embd.weight", T.Q6_K, (vocab, d), blocks(T.Q6_K, vocab, d, (0,)))]
    for i in range(n):
        more = T.Q6_K if uses_more_bits(i, n) else T.Q4_K
        layer = [("attn_norm", T.F32, (d,)), ("attn_q", T.Q4_K, (heads * head_dim, d)), ("attn_k", T.Q4_K, (kv, d)),
                 ("attn_v", more, (kv, d)), ("attn_output", T.Q4_K, (d, heads * head_dim)), ("ffn_norm", T.F32, (d,))]
        if experts:  # Qwen3-MoE: q and k normalised per head, a router, each projection's experts stacked
            layer += [("attn_q_norm", T.F32, (head_dim,)), ("attn_k_norm", T.F32, (head_dim,)),
                      ("ffn_gate_inp", T.F32, (experts, d)), ("ffn_gate_exps", T.Q4_K, (experts, width, d)),
                      ("ffn_up_exps", T.Q4_K, (experts, width, d)), ("ffn_down_exps", more, (experts, d, width))]
        else:
            layer += [("ffn_gate", T.Q4_K, (inter, d)), ("ffn_up", T.Q4_K, (inter, d)), ("ffn_down", more, (d, inter))]
        for j, (kind, ggml_type, shape) in enumerate(layer):
            key = (1 + i, j)
            if ggml_type != T.F32:
                make = blocks(ggml_type, math.prod(shape[:-1]), shape[-1], key)
            else:
                make = router(shape, key) if kind == "ffn_gate_inp" else norm(shape[0], key)
            out.append(TensorToWrite(f"blk.{i}.{kind}.weight", ggml_type, shape, make))
    out.append(TensorToWrite("output_norm.weight", T.F32, (d,), norm(d, (n + 1, 0))))
    out.append(TensorToWrite("output.weight", T.Q6_K, (vocab, d), blocks(T.Q6_K, vocab, d, (n + 1, 1))))
    return out


def write_q4_k_m_like(path, config: dict, seed: int = 0, split_max_tensors: int = 0,
                      progress: bool = False) -> list[Path]:
    """A llama GGUF file shaped by ``config`` (HF field names: ``shape_config("llama-2-13b")`` gives the 13B
    one, 7.9 GB), or a Qwen3-MoE one (``shape_config("qwen3-30b-a3b")``), in a Q4_K_M-like mix of random blocks,
    streamed to disk. Returns the file(s) written."""
    arch = "qwen3moe" if config.get("num_experts") else "llama"
    metadata = model_metadata(arch, config, f"offload synthetic {arch}")
    metadata["general.file_type"] = int(gguf_package().LlamaFileType.MOSTLY_Q4_K_M)
    return write_gguf(path, arch, metadata, q4_k_m_like_tensors(config, seed), split_max_tensors, progress)
