"""GGUF files (llama.cpp, Ollama, LM Studio) read as offload checkpoints, kept compressed.

Needs the ``gguf`` package (llama.cpp's reader; the ``gguf`` extra: ``pip install -e '.[gguf]'``).

    ck = GGUFCheckpoint("model.gguf")        # or any part of model-00001-of-00003.gguf
    config = config_from_dict(ck.config)     # ck.config: a Hugging Face config.json dict
    ck.tensors["model.layers.0.self_attn.q_proj.weight"]   # MappedTensor: GGUF name, type, HF shape
    parts_format(mapped.ggml_type)           # PartsFormat (int4/int8, group, minimum) or None: read dense
    ck.parts(name, rows=(lo, hi), cols=None, scale_dtype=torch.float16)   # {"data", "scale"[, "minimum"]}
    ck.dense(name, rows=None, cols=None, dtype=torch.bfloat16)            # values (any type; warns for others)
    ck.tokenizer()                           # offload.text.Tokenizer with the file's ChatTemplate
    GGUFSource(ck)                           # validate(specs) / read(spec, name, out), as CheckpointSource

Modules: ``reader`` (files, splits, corrupt files), ``config`` (the config dict), ``names``
(tensor names, llama.cpp's q/k permutation, Gemma's norms), ``convert`` (types -> parts,
dequantizing, the scale rounding), ``tokenizer`` (tokenizer and chat template), ``checkpoint``
(the above together), ``writer`` (streamed files of random blocks for tests and benchmarks).
"""

from .checkpoint import GGUFCheckpoint, GGUFSource
from .config import hf_config
from .convert import (INT4, INT8, PartsFormat, dense_tensor, dequantize_parts, gguf_tensor_to_parts, is_float_type,
                      parts_format, type_name)
from .names import MappedTensor, hf_names, permute_like_llama_cpp, unpermute_order
from .reader import GGUFFiles, is_gguf
from .tokenizer import chat_template, gguf_tokenizer
from .writer import TensorToWrite, random_blocks, write_gguf, write_q4_k_m_like

__all__ = [
    "GGUFCheckpoint", "GGUFSource", "GGUFFiles", "MappedTensor", "PartsFormat", "TensorToWrite", "INT4", "INT8",
    "chat_template", "dense_tensor", "dequantize_parts", "gguf_tensor_to_parts", "gguf_tokenizer", "hf_config",
    "hf_names", "is_float_type", "is_gguf", "parts_format", "permute_like_llama_cpp", "random_blocks", "type_name",
    "unpermute_order", "write_gguf", "write_q4_k_m_like",
]
