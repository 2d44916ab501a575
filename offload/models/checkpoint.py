"""Where weights come from: safetensors checkpoints.

A *weight source* fills a destination tensor (a view into a block, wherever the
block lives) with this rank's piece of one named checkpoint tensor:

    source.read(spec, name, out)

so loading never holds more than one tensor's piece outside its final place.
``CheckpointSource`` reads single-file and sharded (``model.safetensors.index.json``)
checkpoints; ``offload.synthetic.RandomSource`` is the same interface over seeded
random numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from .layout import TensorSpec


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
