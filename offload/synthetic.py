"""Models without downloads: seeded random weights, checkpoints of them, and the built-in demo.

``RandomSource`` is a weight source like a checkpoint (``source.read(spec, name, out)``)
that makes seeded random numbers instead, the same values whatever the
tensor-parallel split, so benchmarks and tests run real shapes without files.
``write_checkpoint`` writes those weights as a Hugging Face checkpoint (config,
safetensors, and a small demo tokenizer), and ``demo_checkpoint`` is the model that
``run_offloaded.py`` runs when given none.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path

import torch

from .distributed import TensorParallel
from .errors import InputError
from .models.config import config_from_dict
from .models.blocks import TensorSpec, checkpoint_sources
from .models.checkpoint import part_spec
from .models.parallel import REPLICATED
from .models.shapes import shape_config
from .options import cache_dir

DEMO_SHAPE = "tiny"

# A few sentences to train the demo tokenizer on: enough merges for readable ids.
_CORPUS = [
    "offload runs transformer models that are larger than the memory of one GPU.",
    "The weights of each decoder layer live in GPU memory, in pinned host memory, or on a peer GPU.",
    "While one layer computes, the next layer's weights are copied over the link on a side stream.",
    "A plan places every layer before loading and predicts the time of a decode step.",
    "The quick brown fox jumps over the lazy dog. Hello world! 0 1 2 3 4 5 6 7 8 9",
]


class RandomSource:
    """Seeded random weights: norm weights near 1, everything else normal with std ``std``.

    Each tensor is generated in row chunks, each from its own seed, so any rank's
    piece is made without making the whole tensor, and the values do not depend
    on the tensor-parallel split. Values depend on the generating device type
    (CPU and CUDA generators differ).

    ``packed``: a weight to be stored quantized is made in its parts directly: uniform
    random integers, and one scale (and minimum) giving them the spread ``std``, not
    normal numbers quantized (which takes minutes for a 70b model: a 405b one's 810 GB
    of 16-bit numbers are out of reach).
    """

    CHUNK_ELEMENTS = 1 << 22

    def __init__(self, seed: int = 0, std: float = 0.02, device: str | torch.device = "cpu", packed: bool = False):
        self.seed, self.std, self.device, self.packed = seed, std, torch.device(device), packed

    def validate(self, specs) -> None:
        pass

    def read_in_order(self, specs, pinned: int = 0) -> None:
        pass  # nothing to read ahead

    def stores_parts(self, name: str) -> bool:
        return self.packed  # else dense numbers: quantized while loading

    def read(self, spec: TensorSpec, name: str, out: torch.Tensor) -> None:
        if spec.part:
            self._read_part(spec, name, out)
            return
        self._read(spec, name, out, self._chunk)

    def _read_part(self, spec: TensorSpec, name: str, out: torch.Tensor) -> None:
        """A part of a weight made in packed form (``packed``): integers uniform over the format's range
        (int4: 0..15, int8: -127..127), the scale that gives them a spread of ``std`` and, for int4, the
        minimum that centres them on zero."""
        int4 = spec.quant.format == "int4"
        step = self.std / (4.61 if int4 else 73.61)  # the spread of uniform integers over 16 or 255 levels
        if spec.part == "scale":
            out.fill_(step)
        elif spec.part == "minimum":
            out.fill_(-7.5 * step if int4 else 0.0)
        else:
            low, high = (0, 256) if int4 else (-127, 128)  # int4: each byte two nibbles
            self._read(part_spec(spec), f"{name}.data", out,
                       lambda key, chunk, shape, dtype, norm: self._integers(key, chunk, shape, dtype, low, high))

    def _read(self, spec: TensorSpec, name: str, out: torch.Tensor, make) -> None:
        full = spec.full_shape
        cols = full[1] if len(full) == 2 else 1
        rows_per_chunk = max(1, self.CHUNK_ELEMENTS // cols)
        shard = spec.shard
        row_lo, row_hi = (shard.start, shard.stop) if shard.dim == 0 else (0, full[0])
        col = slice(shard.start, shard.stop) if shard.dim == 1 else slice(None)
        written = 0
        for chunk in range(row_lo // rows_per_chunk, -(-row_hi // rows_per_chunk)):
            lo, hi = chunk * rows_per_chunk, min((chunk + 1) * rows_per_chunk, full[0])
            values = make(name, chunk, (hi - lo, *full[1:]), out.dtype, "norm" in name)
            take = values[max(row_lo - lo, 0) : min(row_hi, hi) - lo]
            if len(full) == 2:
                take = take[:, col]
            out[written : written + take.shape[0]].copy_(take)
            written += take.shape[0]
        if out.dim() and written < out.shape[0]:
            out[written:].zero_()

    def _generator(self, name: str, chunk: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + chunk) % (2**63))
        return gen

    def _chunk(self, name: str, chunk: int, shape, dtype, norm: bool) -> torch.Tensor:
        values = torch.randn(shape, generator=self._generator(name, chunk), device=self.device, dtype=dtype)
        values.mul_(self.std)
        return values.add_(1.0) if norm else values

    def _integers(self, name: str, chunk: int, shape, dtype, low: int, high: int) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self._generator(name, chunk), device=self.device,
                             dtype=dtype)

    def full_tensor(self, spec: TensorSpec, name: str, dtype: torch.dtype, device="cpu") -> torch.Tensor:
        """The whole checkpoint tensor (what ``write_checkpoint`` writes)."""
        out = torch.empty(spec.full_shape, dtype=dtype, device=device)
        self.read(replace(spec, shard=REPLICATED, shape=spec.full_shape), name, out)
        return out

    def close(self) -> None:
        pass


def modes_as_umask_allows(*paths: Path) -> None:
    """The modes a plain mkdir and open would have given (``tempfile`` makes its directories, and safetensors
    its files, for their owner alone)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def new_directory(out, what: str = "the output directory") -> Path:
    """``out`` as a place to write a new checkpoint: named, and missing or an empty directory (a mistyped path
    must not overwrite a model)."""
    if not str(out).strip():
        raise InputError(f"{what} is empty: name a directory")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {str(out)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise InputError(f"{what} {str(out)!r} is not empty: name a new or empty directory")
    return path


def write_checkpoint(config: dict, out_dir: str | Path, dtype: torch.dtype, seed: int = 0,
                     shard_bytes: int = 2 * 2**30, device=None, progress: bool = True) -> Path:
    """Write an HF-format checkpoint of seeded random weights: ``config.json``, safetensors shards
    with ``model.safetensors.index.json`` (one ``model.safetensors`` when small), and a demo
    ``tokenizer.json`` when ``tokenizers`` is installed. The tensors are those ``RandomSource``
    gives on ``device``, so ``load_model(out_dir)`` equals ``load_model(config, random_weights=seed)``
    with the weights made on the same device type.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    cfg = config_from_dict(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = RandomSource(seed=seed, device=device)
    specs = checkpoint_sources(cfg, TensorParallel(), dtype)

    shards, size = [[]], 0  # consecutive tensors, each shard at most shard_bytes (or one tensor)
    for spec, name in specs:
        nbytes = math.prod(spec.full_shape) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((spec, name))
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    total = sum(math.prod(s.full_shape) for s, _ in specs) * dtype.itemsize
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing checkpoint", disable=not progress) as bar:
        for file, shard in zip(names, shards):
            tensors = {name: source.full_tensor(spec, name, dtype) for spec, name in shard}
            save_file(tensors, str(out / file), metadata={"format": "pt"})
            modes_as_umask_allows(out / file)
            weight_map.update({name: file for name in tensors})
            bar.update(sum(t.numel() * t.element_size() for t in tensors.values()))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    dtype_name = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype_name}, indent=2))
    try:
        train_demo_tokenizer(cfg.vocab_size).save(str(out / "tokenizer.json"))
    except ImportError:  # tokenizers is optional: ids in and out still work
        pass
    return out


def train_demo_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of at most ``vocab_size`` ids trained on a built-in text (needs ``tokenizers``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 512), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


def demo_checkpoint(quiet: bool = False) -> Path:
    """The built-in demo model: the ``tiny`` shape with seeded random weights, written once and cached."""
    path = cache_dir() / f"demo-{DEMO_SHAPE}-v1"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".demo-"))
        write_checkpoint(shape_config(DEMO_SHAPE), tmp, torch.float32, seed=0, device="cpu", progress=not quiet)
        try:
            tmp.rename(path)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return path
