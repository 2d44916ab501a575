"""Quantized checkpoints saved once: quantize a model's linear weights a tensor at a time and write them.

    write_quantized("path/to/Llama-2-70b-hf", "path/to/out", "int4")   # or scripts/quantize.py

Each linear weight of the decoder layers (and of routed experts) is written as its
parts, ``<name>.data``, ``<name>.scale`` (and ``<name>.minimum``), whole, in
offload's packing (``offload.models.quant``), and so is an untied LM head, in int8
(``quant.head_format``); every other tensor as it is, in the chosen dtype.
``config.json`` records the format under ``offload_quantization``, and the
tokenizer and generation files are copied, so ``load_model(out)`` reads the
blocks as they are, at the speed of reading its files, with no requantizing: the
logits are those of ``load_model(model, quantize=...)`` bit for bit in the dtype saved (on one rank;
under tensor parallelism int8's per-row scale is the whole row's rather than each
rank's piece's; a checkpoint saved before the LM head was stored in int8 keeps a
dense head).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from .distributed import TensorParallel
from .models.blocks import checkpoint_sources, global_layout
from .models.checkpoint import CheckpointSource, is_gguf
from .models.config import config_from_dict, load_config
from .models.parallel import REPLICATED
from .models.quant import DEQUANTIZE, WeightFormat, head_format, part_shapes, quantize
from .models.registry import family_of
from .errors import ConfigError, InputError
from .options import DTYPES
from .synthetic import RandomSource, modes_as_umask_allows, new_directory

COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json", "tokenizer.model")
RECORD = "offload_quantization"


def write_quantized(model, out, quantize_as: str, group_size: int | None = None, rounding: str = "search",
                    dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    shard_bytes: int = 2 * 2**30, progress: bool = True, random_weights: int | None = None) -> Path:
    """Quantize checkpoint ``model`` into ``out``; returns ``out``. With ``random_weights=SEED``, ``model`` is a
    config (a dict of Hugging Face fields) and its weights are seeded random numbers made on ``device``, as
    ``load_model(config, random_weights=SEED, quantize=...)`` makes them (the quantized ones in packed form):
    a large model's quantized checkpoint without its 16-bit one on disk first, at the speed of writing it."""
    random = random_weights is not None
    if not random and is_gguf(model):
        raise InputError(f"{model} is a GGUF file, compressed already: load it as it is (--model {model})")
    config = config_from_dict(model) if random else load_config(Path(model))  # (names a missing checkpoint)
    raw = dict(model) if random else json.loads((Path(model) / "config.json").read_text())
    tp, out = TensorParallel(), _checked_out(out, None if random else Path(model))
    if raw.get(RECORD):
        raise InputError(f"{model} is quantized already")
    fmt = WeightFormat(quantize_as, group_size, DEQUANTIZE, rounding=rounding)
    blocks = family_of(config.architecture).blocks(config, tp, dtype, fmt)
    layouts = [global_layout(config, tp, dtype, head_format(fmt)).sources()] + [block.sources() for block in blocks]
    quantized = {name: spec.quant for sources in layouts for spec, name in sources if spec.quant is not None}
    source = RandomSource(random_weights, device=device, packed=True) if random else CheckpointSource(Path(model))
    sources = checkpoint_sources(config, tp, dtype)
    if not random:  # what load_model refuses (another model's tensors, shapes or layers) is not written either
        source.validate(sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(out)
    writer = _ShardWriter(staging, shard_bytes)
    try:
        for layout_spec, name in tqdm(sources, desc="quantizing", unit="tensor", disable=not progress):
            spec = _dense_spec(name, layout_spec.full_shape if random else source.shape(name), dtype)
            if random and name in quantized:  # made in its parts
                for part, shape, part_dtype in part_shapes(quantized[name], *spec.full_shape, dtype):
                    values = torch.empty(shape, dtype=part_dtype, device=device)
                    source.read(replace(spec, shape=shape, dtype=part_dtype, part=part, quant=quantized[name]), name,
                                values)
                    writer.add(f"{name}.{part}", values.cpu())
                continue
            tensor = torch.empty(spec.full_shape, dtype=dtype, device=device if random else "cpu")
            source.read(spec, name, tensor)
            if name in quantized:
                for part, values in quantize(tensor.to(device), quantized[name], dtype).items():
                    writer.add(f"{name}.{part}", values.cpu())
            else:
                writer.add(name, tensor.cpu())
        writer.close()
        raw[RECORD] = {"format": quantize_as, "group_size": group_size, "rounding": rounding,
                       "dtype": str(dtype).removeprefix("torch.")}
        (staging / "config.json").write_text(json.dumps({**raw, "torch_dtype": raw[RECORD]["dtype"]}, indent=2))
        for name in () if random else COMPANIONS:
            if (Path(model) / name).is_file():
                shutil.copy(Path(model) / name, staging / name)
        modes_as_umask_allows(staging, *staging.iterdir())
        staging.rename(out)  # replaces an empty directory; a non-empty one was refused before any work
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        source.close()
    return out


def _staging(out: Path) -> Path:
    """A new directory beside ``out`` to write the checkpoint into, renamed to ``out`` once whole: an interrupted
    run leaves no checkpoint at ``out``. Named for this machine and process, so that a later run removes those
    that killed runs left (shards of gigabytes) and no other live run's."""
    mine = f"{socket.gethostname()}-"
    for old in out.parent.iterdir():
        pid = old.name.removesuffix(".partial").rpartition("-")[2]
        if old.name == f".{out.name}.{mine}{pid}.partial" and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    staging = out.parent / f".{out.name}.{mine}{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run that had this process's number
    staging.mkdir()
    return staging


def _checked_out(out, model: Path | None) -> Path:
    """``out`` as a place to write a new checkpoint: not empty, not an existing file or a directory with anything
    in it, neither the checkpoint ``model`` nor inside it (nor it inside ``out``)."""
    out = new_directory(out)
    if model is not None:
        mine, theirs = out.resolve(), model.resolve()
        if mine == theirs or theirs in mine.parents or mine in theirs.parents:
            raise InputError(f"{out} is the checkpoint {model} itself, inside it or around it: write elsewhere")
    return out


def stored_quantization(path) -> dict | None:
    """The format a saved quantized checkpoint records (``{"format", "group_size", "rounding", "dtype"}``), or None."""
    config = Path(path) / "config.json"
    if not Path(path).is_dir() or not config.is_file():
        return None
    try:
        record = json.loads(config.read_text()).get(RECORD)
    except (OSError, ValueError, AttributeError):
        return None  # load_config says what is wrong with the file
    if record is None:
        return None
    if not (isinstance(record, dict) and record.get("format") in ("int4", "int8")
            and str(record.get("dtype")).lower() in DTYPES):
        raise ConfigError(f"{config}: {RECORD} must be an object with a format (int4 or int8) and the dtype of its "
                          f"scales, as scripts/quantize.py writes it; got {json.dumps(record)[:200]}")
    return record


def _dense_spec(name: str, shape: tuple[int, ...], dtype: torch.dtype):
    """A spec that reads the whole tensor ``name`` (of ``shape``) in ``dtype``."""
    from .models.blocks import TensorSpec

    return TensorSpec(name, shape, shape, name, REPLICATED, dtype, 0)


class _ShardWriter:
    """Tensors written to ``model-0000k.safetensors`` shards of at most ``shard_bytes`` (or one tensor), with
    ``model.safetensors.index.json``."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.shard_bytes = out, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size, self.files, self.weight_map = 0, [], {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.size += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        file = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.out / file), metadata={"format": "pt"})
        self.weight_map.update({name: file for name in self.pending})
        self.files.append(file)
        self.pending, self.size = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        index = {"metadata": {"total_size": sum((self.out / f).stat().st_size for f in self.files)},
                 "weight_map": self.weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


