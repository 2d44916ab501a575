"""Where weights come from: safetensors checkpoints, or seeded random numbers.

A *weight source* fills a destination tensor (a view into a block, wherever the
block lives) with this rank's piece of one named checkpoint tensor:

    source.read(spec, name, out)

so loading never holds more than one tensor's piece outside its final place.
``CheckpointSource`` reads single-file and sharded (``model.safetensors.index.json``)
checkpoints; ``RandomSource`` makes seeded random weights, the same values
whatever the tensor-parallel split, so benchmarks and tests need no files.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from .layout import TensorSpec
from .parallel import REPLICATED


class CheckpointSource:
    """Tensors of a safetensors checkpoint directory, read piece by piece."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {str(self.path)!r} does not exist")
        self._handles: dict[Path, object] = {}
        self._file_of = self._index()

    def _index(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = {name: self.path / file for name, file in weight_map.items()}
            for file in sorted(set(files.values())):
                if not file.is_file():
                    raise CheckpointError(f"{index} lists {file.name}, which does not exist")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {str(self.path)!r}")
        return {name: file for file in files for name in self._open(file).keys()}

    def _open(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({e})") from None
            self._handles[file] = handle
        return handle

    def validate(self, specs: list[tuple[TensorSpec, str]]) -> None:
        """Check that every tensor exists with its expected shape before any bytes are read."""
        for spec, name in specs:
            file = self._file_of.get(name)
            if file is None:
                raise CheckpointError(f"checkpoint {str(self.path)!r} has no tensor {name!r}")
            handle = self._open(file)
            try:
                shape = tuple(handle.get_slice(name).get_shape())
            except SafetensorError:
                raise CheckpointError(f"{file.name}: tensor {name!r} is missing") from None
            if shape != spec.full_shape:
                raise CheckpointError(
                    f"{file.name}: tensor {name!r} has shape {list(shape)}, expected {list(spec.full_shape)}"
                )

    def read(self, spec: TensorSpec, name: str, out: torch.Tensor) -> None:
        file = self._file_of[name]
        try:
            piece = _cut(self._open(file).get_slice(name), spec)
        except SafetensorError as e:
            raise CheckpointError(f"{file.name}: cannot read tensor {name!r} ({e})") from None
        _copy_piece(out, piece)

    def close(self) -> None:
        self._handles.clear()


def _cut(tensor_slice, spec: TensorSpec) -> torch.Tensor:
    shard = spec.shard
    if shard.dim is None:
        return tensor_slice[:]
    if shard.dim == 0:
        return tensor_slice[shard.start : shard.stop]
    return tensor_slice[:, shard.start : shard.stop]


def _copy_piece(out: torch.Tensor, piece: torch.Tensor) -> None:
    """Copy ``piece`` into ``out``; rows of ``out`` past the piece (vocabulary padding) become zero."""
    rows = piece.shape[0] if piece.dim() else 1
    if out.dim() and rows < out.shape[0]:
        out[rows:].zero_()
        out = out[:rows]
    out.copy_(piece)


class RandomSource:
    """Seeded random weights: norm weights near 1, everything else normal with std ``std``.

    Each tensor is generated in row chunks, each from its own seed, so any rank's
    piece is made without making the whole tensor, and the values do not depend
    on the tensor-parallel split. Values depend on the generating device type
    (CPU and CUDA generators differ).
    """

    CHUNK_ELEMENTS = 1 << 22

    def __init__(self, seed: int = 0, std: float = 0.02, device: str | torch.device = "cpu"):
        self.seed, self.std, self.device = seed, std, torch.device(device)

    def validate(self, specs) -> None:
        pass

    def read(self, spec: TensorSpec, name: str, out: torch.Tensor) -> None:
        full = spec.full_shape
        cols = full[1] if len(full) == 2 else 1
        rows_per_chunk = max(1, self.CHUNK_ELEMENTS // cols)
        shard = spec.shard
        row_lo, row_hi = (shard.start, shard.stop) if shard.dim == 0 else (0, full[0])
        col = slice(shard.start, shard.stop) if shard.dim == 1 else slice(None)
        written = 0
        for chunk in range(row_lo // rows_per_chunk, -(-row_hi // rows_per_chunk)):
            lo, hi = chunk * rows_per_chunk, min((chunk + 1) * rows_per_chunk, full[0])
            values = self._chunk(name, chunk, (hi - lo, *full[1:]), out.dtype, norm="norm" in name)
            take = values[max(row_lo - lo, 0) : min(row_hi, hi) - lo]
            if len(full) == 2:
                take = take[:, col]
            out[written : written + take.shape[0]].copy_(take)
            written += take.shape[0]
        if out.dim() and written < out.shape[0]:
            out[written:].zero_()

    def _chunk(self, name: str, chunk: int, shape, dtype, norm: bool) -> torch.Tensor:
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + chunk) % (2**63))
        values = torch.randn(shape, generator=gen, device=self.device, dtype=dtype)
        values.mul_(self.std)
        return values.add_(1.0) if norm else values

    def full_tensor(self, spec: TensorSpec, name: str, dtype: torch.dtype, device="cpu") -> torch.Tensor:
        """The whole checkpoint tensor (what ``write_checkpoint`` writes)."""
        out = torch.empty(spec.full_shape, dtype=dtype, device=device)
        self.read(replace(spec, shard=REPLICATED, shape=spec.full_shape), name, out)
        return out

    def close(self) -> None:
        pass


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

    from .config import config_from_dict
    from .layout import checkpoint_sources
    from .parallel import TensorParallel

    cfg = config_from_dict(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = RandomSource(seed=seed, device=device)
    tp = TensorParallel()
    specs = checkpoint_sources(cfg, tp, dtype)

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
            weight_map.update({name: file for name in tensors})
            bar.update(sum(t.numel() * t.element_size() for t in tensors.values()))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    dtype_name = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype_name}, indent=2))
    _write_demo_tokenizer(out, cfg.vocab_size)
    return out


def _write_demo_tokenizer(out: Path, vocab_size: int) -> None:
    try:
        from ..text import train_demo_tokenizer

        train_demo_tokenizer(vocab_size).save(str(out / "tokenizer.json"))
    except ImportError:  # tokenizers is optional: ids in and out still work
        pass
