"""Model families, found by the ``architectures`` name of a checkpoint's ``config.json``.

A family is one module under ``offload/models/``: a :class:`~offload.models.decoder.Decoder`
subclass that reads its config fields, lays out its blocks and computes its layers.
Adding a family is writing that module and a line here.
"""

from __future__ import annotations

import importlib

# architectures name -> (module, class)
FAMILIES = {
    "LlamaForCausalLM": ("llama", "Llama"),
    "MistralForCausalLM": ("llama", "Llama"),
    "Qwen2ForCausalLM": ("llama", "Llama"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3"),
    "MixtralForCausalLM": ("mixtral", "Mixtral"),
    "Qwen2MoeForCausalLM": ("qwen_moe", "Qwen2Moe"),
    "Qwen3MoeForCausalLM": ("qwen_moe", "Qwen3Moe"),
    "OlmoeForCausalLM": ("olmoe", "Olmoe"),
}

# for config.json files that name a model_type but no architectures
ARCHITECTURES_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
}


def family_of(architecture: str):
    """The :class:`Decoder` subclass that computes models of ``architecture`` (a key of ``FAMILIES``)."""
    module, name = FAMILIES[architecture]
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)
