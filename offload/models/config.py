"""Model configuration read from a Hugging Face ``config.json``.

``config_from_dict`` finds the checkpoint's family by its ``architectures`` (or
``model_type``) in ``registry.py`` and lets the family read it: every family reads
the common fields with :func:`common_fields` and adds its own. A family with fields
of its own subclasses :class:`ModelConfig`.

Two conventions exist in the wild for rotary embeddings: transformers 4.x files
carry ``rope_theta`` and ``rope_scaling``; transformers 5.x files carry one
``rope_parameters`` dict holding ``rope_theta`` and the scaling fields. Both are
read into the same fields.

Every field the model reads is checked (its type, its range, how it fits the others);
a bad one raises a :class:`ConfigError` that names the field and its value.
"""

from __future__ import annotations

import json
import math
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..inputs import is_real

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

    def __post_init__(self):
        if not self.sliding_windows:  # every layer attends to the whole context
            object.__setattr__(self, "sliding_windows", (None,) * self.n_layers)

    def context_warning(self, max_seq_len: int | None) -> str | None:
        """What to tell a user whose KV cache reaches past the positions the model was trained on."""
        if max_seq_len is None or max_seq_len <= self.max_position_embeddings:
            return None
        return (f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                f"{self.max_position_embeddings}; output past that position may be poor")

    @property
    def attention_scale(self) -> float:
        """What attention scores are multiplied by."""
        return self.head_dim**-0.5

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse frequencies of the rotary embedding, scaled as the config asks (float32)."""
        return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)


def rope_inv_freq(dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies of a rotary embedding of ``dim`` channels, base ``theta``, scaled as ``scaling`` asks."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
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
    """Read ``config.json`` from a checkpoint directory (or the file itself), or the metadata of a GGUF file."""
    from .checkpoint import is_gguf

    path = Path(path)
    if is_gguf(path):
        from ..gguf import GGUFCheckpoint

        return config_from_dict(GGUFCheckpoint(path).config, source=path.name)
    try:  # a folder without search permission cannot be looked into: stat raises rather than saying False
        if path.suffix.lower() == ".gguf" and path.is_file():
            raise ConfigError(f"{path}: not a GGUF file (it does not begin with GGUF's magic, b'GGUF')")
        if path.is_file() and path.suffix.lower() != ".json":  # a weights file, say, given for its directory
            raise ConfigError(f"{str(path)!r} is neither a checkpoint directory (config.json + safetensors), a GGUF "
                              "file nor a config.json")
        file = path / "config.json" if path.is_dir() else path
        if not path.exists():
            raise ConfigError(f"model path {str(path)!r} does not exist")
        if not file.is_file():
            raise ConfigError(f"no config.json in {str(path)!r}")
    except OSError as e:
        raise ConfigError(f"model path {str(path)!r} cannot be read ({e.strerror or e})") from None
    config = config_from_dict(read_json_object(file), source=str(file))
    if not path.is_dir():
        return config
    # generation stops where transformers' generate stops: at generation_config.json's eos ids too
    return dataclasses.replace(config, eos_token_ids=stop_ids_of(path, config.eos_token_ids))


def stop_ids_of(directory: Path, config_eos: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The ids that end generation: ``config_eos`` (config.json's) and generation_config.json's ``eos_token_id``."""
    file = Path(directory) / "generation_config.json"
    eos = read_json_object(file).get("eos_token_id") if file.is_file() else None
    extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    if not all(is_int(t) and t >= 0 for t in extra):
        raise ConfigError(f"{file}: eos_token_id must be an integer or a list of integers, got {eos!r}")
    return tuple(dict.fromkeys([*config_eos, *extra]))  # in order, each once


def read_json_object(file: Path) -> dict:
    """The JSON object in ``file`` (a config), or a :class:`ConfigError` saying why it cannot be read as one."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, or not UTF-8; and nesting without end
        raise ConfigError(f"{file}: not readable JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return data


def config_from_dict(raw: dict, source: str = "config") -> ModelConfig:
    """Build a :class:`ModelConfig` from the fields of an HF ``config.json``."""
    from .registry import family_of

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    _refuse_quantized(raw, source)
    f = _Fields(raw, source)
    architecture = _architecture(raw, f)
    return family_of(architecture).read_config(raw, f, architecture)


def common_fields(raw: dict, f: "_Fields", architecture: str, theta: float = 10000.0, eps: float = 1e-6,
                  head_dim: int | None = None, tie: bool = False, rope_section: str | None = None) -> dict:
    """The :class:`ModelConfig` fields every family reads the same way (``theta``, ``eps``, ``head_dim``, ``tie``:
    the family's defaults, transformers' for a field the config leaves out; ``rope_section``: see ``read_rope``)."""
    hidden, n_heads = f.count("hidden_size"), f.count("num_attention_heads")
    n_layers = layer_count(f)
    n_kv_heads = f.count("num_key_value_heads", default=n_heads)
    if n_heads % n_kv_heads:
        raise ConfigError(f"{f.source}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads "
                          f"{n_kv_heads}")
    rope_theta, rope_scaling = read_rope(raw, f, theta, rope_section)
    return dict(
        architecture=architecture,
        vocab_size=f.count("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f.count("intermediate_size"),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=_head_dim(hidden, n_heads, f, head_dim),
        rms_norm_eps=f.number("rms_norm_eps", eps),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=f.count("max_position_embeddings", default=4096),
        tie_word_embeddings=f.flag("tie_word_embeddings", tie),
        eos_token_ids=_eos_ids(raw, f),
    )


def layer_count(f: "_Fields") -> int:
    """``num_hidden_layers``, within the runtime's limit: a family that builds something per layer before
    ``common_fields`` reads them counts them so (a corrupt count would take memory, not be refused)."""
    return f.count("num_hidden_layers", most=MAX_LAYERS)


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


_REQUIRED = object()
MAX_SIZE = 2**31 - 1  # sizes are indexed with 32-bit integers
MAX_LAYERS = 2**16  # the runtime keeps a few objects per layer


class _Fields:
    """Typed reads of a config's fields (``prefix`` names a nested object); a missing or bad field
    raises a ConfigError naming it and its value. A field given as null takes its default."""

    def __init__(self, raw: dict, source: str, prefix: str = ""):
        self.raw, self.source, self.prefix = raw, source, prefix

    def _get(self, key: str, default):
        value = self.raw.get(key)
        if value is not None:
            return value
        if default is _REQUIRED:
            raise ConfigError(f"{self.source}: missing field {self.prefix + key!r}")
        return default

    def bad(self, key: str, value, expected: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.prefix + key} must be {expected}, got {value!r}")

    def count(self, key: str, default=_REQUIRED, most: int = MAX_SIZE) -> int:
        """A positive integer up to ``most`` (or ``default``, which may be None)."""
        value = self._get(key, default)
        if value is not None and (not is_int(value) or value < 1):
            raise self.bad(key, value, "a positive integer")
        if value is not None and value > most:
            raise self.bad(key, value, f"at most {most}")
        return value

    def number(self, key: str, default=_REQUIRED) -> float | None:
        """A positive finite number (or ``default``, which may be None)."""
        value = self._get(key, default)
        if value is None:
            return None
        if not is_real(value) or value <= 0:
            raise self.bad(key, value, "a positive number")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.bad(key, value, "true or false")
        return value

    def text(self, key: str, default=_REQUIRED) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self.bad(key, value, "a string")
        return value

    def nested(self, key: str) -> "_Fields | None":
        """The object ``key`` (None when absent or null)."""
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.bad(key, value, "an object or null")
        return _Fields(value, self.source, f"{self.prefix}{key}.")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _architecture(raw: dict, f: _Fields) -> str:
    from .registry import ARCHITECTURES_BY_MODEL_TYPE, FAMILIES

    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise f.bad("architectures", archs, "a list of class names")
    model_type = f.text("model_type", "")
    arch = archs[0] if archs else ARCHITECTURES_BY_MODEL_TYPE.get(model_type, "")
    if arch not in FAMILIES:
        raise ConfigError(
            f"{f.source}: unsupported architecture {arch or raw.get('model_type') or '(none given)'!r}; "
            f"supported: {', '.join(FAMILIES)}"
        )
    named = ARCHITECTURES_BY_MODEL_TYPE.get(model_type, arch)
    if named != arch:  # transformers builds by model_type (vLLM by architectures): either might be meant
        raise ConfigError(f"{f.source}: architectures names {arch!r} but model_type {model_type!r} is {named}'s; "
                          "transformers would build the model model_type names: make the two agree")
    return arch


def _head_dim(hidden: int, n_heads: int, f: _Fields, default: int | None) -> int:
    head_dim = f.count("head_dim", default=default)
    if head_dim is None:
        head_dim = hidden // n_heads
        if head_dim < 1:
            raise ConfigError(f"{f.source}: hidden_size {hidden} is smaller than num_attention_heads {n_heads}")
    if head_dim % 2:
        raise ConfigError(f"{f.source}: head_dim {head_dim} is odd; rotary embeddings need an even head_dim")
    return head_dim


def read_rope(raw: dict, f: _Fields, default_theta: float = 10000.0, section: str | None = None,
              inherit_theta: bool = True) -> tuple[float, dict | None]:
    """(theta, scaling) from either config convention, as transformers 5 reads them; scaling is None for plain
    RoPE. ``section`` names the entry of ``rope_parameters`` to read where it holds one per kind of layer
    (Gemma 3's); a section without its ``rope_theta`` takes the config's own, or with ``inherit_theta=False``
    ``default_theta``. A ``rope_scaling`` (4.x) stands in for ``rope_parameters`` (Gemma 3: it goes over the
    ``full_attention`` section), its own ``rope_theta`` first: transformers 5 reads it so."""
    params = f.nested("rope_parameters")  # transformers 5.x
    if params is not None and section is not None:
        params = params.nested(section)
    old = f.nested("rope_scaling")  # transformers 4.x
    if old is not None and old.raw and section in (None, "full_attention"):
        params = old if params is None or section is None else _Fields({**params.raw, **old.raw}, f.source,
                                                                        old.prefix)
    params = params or _Fields({}, f.source, f"rope_parameters.{section}." if section else "rope_parameters.")
    theta = params.number("rope_theta", f.number("rope_theta", default_theta) if inherit_theta else default_theta)
    rope_type = params.raw.get("rope_type") or params.raw.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{f.source}: unsupported rope type {rope_type!r}; "
                          f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    needed = {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor"]}[rope_type]
    scaling = {"rope_type": rope_type, **{k: params.number(k) for k in needed}}
    if rope_type == "llama3":
        scaling["original_max_position_embeddings"] = _original_positions(f, params, section)
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise ConfigError(f"{f.source}: {params.prefix}high_freq_factor {scaling['high_freq_factor']} must "
                              f"exceed low_freq_factor {scaling['low_freq_factor']}")
    return theta, scaling


def _original_positions(f: _Fields, params: _Fields, section: str | None) -> float:
    """llama3 scaling's pretraining context as transformers 5 reads it: a top-level
    ``original_max_position_embeddings`` (where the config has one rope: Phi-3's convention), else the rope's
    own, else ``max_position_embeddings``."""
    top = f.number("original_max_position_embeddings", None) if section is None else None
    value = top or params.number("original_max_position_embeddings", f.number("max_position_embeddings", None))
    if value is None:
        raise ConfigError(f"{f.source}: missing field {params.prefix + 'original_max_position_embeddings'!r} "
                          "(llama3 rope scaling; or max_position_embeddings)")
    return value


def _eos_ids(raw: dict, f: _Fields) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(is_int(i) and i >= 0 for i in ids):
        raise f.bad("eos_token_id", eos, "a token id or a list of them")
    return tuple(ids)
