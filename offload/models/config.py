"""Model configuration read from a Hugging Face ``config.json``.

Two conventions exist in the wild for rotary embeddings: transformers 4.x files
carry ``rope_theta`` and ``rope_scaling``; transformers 5.x files carry one
``rope_parameters`` dict holding ``rope_theta`` and the scaling fields. Both are
read into the same :class:`ModelConfig`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", ...}; None for plain RoPE
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False  # Llama's attention_bias also biases o_proj; Qwen2's qkv bias does not
    # One entry per layer: the sliding attention window, or None for full attention.
    sliding_windows: tuple[int | None, ...] = ()
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse frequencies of the rotary embedding, scaled as the config asks (float32)."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scaling = self.rope_scaling
        if scaling is None:
            return inv_freq
        if scaling["rope_type"] == "linear":
            return inv_freq / scaling["factor"]
        # llama3: keep high frequencies, divide low ones by `factor`, interpolate between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
        return torch.where(medium, smoothed, scaled)


def load_config(path: str | Path) -> ModelConfig:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise ConfigError(f"model path {str(path)!r} does not exist")
    if not file.is_file():
        raise ConfigError(f"no config.json in {str(path)!r}")
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not a readable JSON config ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return config_from_dict(raw, source=str(file))


def config_from_dict(raw: dict, source: str = "config") -> ModelConfig:
    """Build a :class:`ModelConfig` from the fields of an HF ``config.json``."""
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else _ARCH_BY_MODEL_TYPE.get(raw.get("model_type", ""), "")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{source}: unsupported architecture {arch or raw.get('model_type') or '(none given)'!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        hidden = int(raw["hidden_size"])
        n_heads = int(raw["num_attention_heads"])
        n_layers = int(raw["num_hidden_layers"])
        cfg = dict(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
            head_dim=int(raw.get("head_dim") or hidden // n_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            o_bias=arch != "Qwen2ForCausalLM" and bool(raw.get("attention_bias", False)),
        )
    except KeyError as e:
        raise ConfigError(f"{source}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: bad value ({e})") from None
    _refuse_quantized(raw, source)
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: unsupported hidden_act {raw['hidden_act']!r} (only 'silu')")
    if raw.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias is not supported")
    if n_heads % cfg["n_kv_heads"]:
        raise ConfigError(f"{source}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads")
    theta, scaling = _read_rope(raw, source)
    eos = raw.get("eos_token_id")
    return ModelConfig(
        **cfg,
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_windows=_sliding_windows(raw, arch, n_layers),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
    )


def _refuse_quantized(raw: dict, source: str) -> None:
    """A checkpoint stored quantized (GPTQ, AWQ, bitsandbytes...) holds tensors offload does not read."""
    spec = raw.get("quantization_config")
    if not spec:
        return
    method = spec.get("quant_method") if isinstance(spec, dict) else None
    raise ConfigError(
        f"{source}: the checkpoint is already quantized ({method or 'quantization_config'}), a format offload "
        "does not read; give a bfloat16, float16 or float32 checkpoint (offload quantizes it while loading: "
        "--quantize int8|int4)"
    )


_ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _read_rope(raw: dict, source: str) -> tuple[float, dict | None]:
    """(theta, scaling) from either config convention; scaling is None for plain RoPE."""
    params = raw.get("rope_parameters")  # transformers 5.x
    if params is None:
        params = dict(raw.get("rope_scaling") or {})  # transformers 4.x
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters must be an object")
    params = dict(params)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    needed = {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings"]}[rope_type]
    missing = [k for k in needed if k not in params]
    if missing:
        raise ConfigError(f"{source}: rope type {rope_type!r} needs {', '.join(missing)}")
    return theta, {"rope_type": rope_type, **{k: float(params[k]) for k in needed}}


def _sliding_windows(raw: dict, arch: str, n_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if arch == "MistralForCausalLM":
        return (window,) * n_layers
    if arch == "Qwen2ForCausalLM" and window is not None:
        types = raw.get("layer_types")
        if types is None:  # transformers 4.x: sliding only when enabled, from max_window_layers on
            use = raw.get("use_sliding_window", False)
            first = raw.get("max_window_layers", n_layers)
            types = ["sliding_attention" if use and i >= first else "full_attention" for i in range(n_layers)]
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (None,) * n_layers
