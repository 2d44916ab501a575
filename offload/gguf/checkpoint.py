"""A GGUF model as a checkpoint: its config, its tensors under Hugging Face names, read piece by piece.

:class:`GGUFCheckpoint` opens the file (or split parts), rebuilds the config dict, maps every
tensor to its Hugging Face name and reads a tensor's rows with read() (a tensor-parallel shard's
columns from the memory-mapped file): as offload's parts where the type has a
compressed form, or as dense values, with llama.cpp's q/k permutation and Gemma's ``1 + w``
norms undone. :class:`GGUFSource` puts that behind the weight-source interface of
``offload.models.checkpoint`` (``validate(specs)``, ``read(spec, name, out)``).
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..models.checkpoint import LAYER_TENSOR, FileReads, all_finite, copy_piece
from ..models.readahead import Readahead
from .config import architecture_of, hf_config
from .convert import dense_tensor, gguf_tensor_to_parts, parts_format, type_name
from .names import MappedTensor, map_tensors, unpermute_order
from .reader import GGUFFiles, gguf_package


EXPERT = re.compile(r"\.experts\.\d+\.")  # one expert's tensors: counted with every expert's


def kind_of_tensor(name: str) -> str:
    """Every layer's and expert's tensor of a kind under one name: ``model.layers.*.mlp.experts.*.up_proj.weight``."""
    return EXPERT.sub(".experts.*.", LAYER_TENSOR.sub("model.layers.*.", name))


class GGUFCheckpoint:
    """A GGUF model: ``config`` (a config.json dict), ``tensors`` (Hugging Face name -> MappedTensor)."""

    def __init__(self, path):
        self.files = GGUFFiles(path)
        self.path = self.files.path
        self.architecture = architecture_of(self.files)
        self.config = hf_config(self.files)
        self.tensors = map_tensors(self.files, self.architecture, self.config)
        self.reads = FileReads()
        self._warned: set[tuple[str, int]] = set()  # (kind of tensor, type) dequantized with a warning

    # ------------------------------------------------------------------ what the file holds

    def tensor(self, name: str) -> MappedTensor:
        mapped = self.tensors.get(name)
        if mapped is None:
            raise CheckpointError(f"{self.path.name} has no tensor for {name!r}")
        return mapped

    def type_counts(self) -> dict[str, Counter]:
        """Per kind of tensor (``self_attn.q_proj``, ``mlp.down_proj``, ``embed_tokens``...), how many
        tensors of each GGUF type: what a plan shows of a Q4_K_M file's mix."""
        out: dict[str, Counter] = {}
        for name, mapped in self.tensors.items():
            kind = kind_of_tensor(name).removeprefix("model.layers.*.").removeprefix("model.").removesuffix(".weight")
            kind = kind.replace(".experts.*.", ".experts.")
            out.setdefault(kind, Counter())[type_name(mapped.ggml_type)] += 1
        return out

    # ------------------------------------------------------------------ reading

    def raw(self, name: str, rows: tuple[int, int] | None = None,
            cols: tuple[int, int] | None = None) -> np.ndarray:
        """The stored bytes (a memory-mapped view, nothing read yet) of rows ``[lo, hi)`` and columns
        ``[lo, hi)`` of tensor ``name`` (of a vector, its elements ``[lo, hi)``), in the file's order.
        Columns must fall on block boundaries."""
        stored = self.tensor(name).stored
        data = stored.data
        if len(stored.shape) == 1 and cols is not None:
            raise CheckpointError(f"{name} is a vector; it has no columns to cut")
        lo, hi = rows or (0, stored.shape[0])
        block, type_size = _block(stored.ggml_type)
        if len(stored.shape) == 1 and block > 1:  # a vector in blocks: its data is bytes, not values
            if lo % block or hi % block:
                raise CheckpointError(f"{name}: elements {lo}..{hi} cut {type_name(stored.ggml_type)} blocks of "
                                      f"{block} values")
            return data.view(np.uint8)[lo // block * type_size : hi // block * type_size]
        data = data[lo:hi]
        if cols is None:
            return data
        if cols[0] % block or cols[1] % block:
            raise CheckpointError(f"{name}: columns {cols[0]}..{cols[1]} cut {type_name(stored.ggml_type)} blocks "
                                  f"of {block} values; a shard of its input dimension must be a multiple of {block}")
        return data.view(np.uint8)[:, cols[0] // block * type_size : cols[1] // block * type_size]

    def parts(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None,
              scale_dtype: torch.dtype = torch.float16, device=None) -> dict[str, torch.Tensor]:
        """Rows ``[lo, hi)`` (Hugging Face order) and columns of weight ``name`` as offload parts
        (``convert.gguf_tensor_to_parts``), llama.cpp's q/k permutation undone. ``device``: where the
        conversion runs (the stored bytes are copied there first; a GPU converts them in milliseconds)."""
        mapped = self.tensor(name)
        rows = self._rows(mapped, rows)
        shape = self._piece_shape(mapped, rows, cols)
        raw = self._bytes_on(name, rows, cols, device)
        parts = gguf_tensor_to_parts(raw, mapped.ggml_type, shape, scale_dtype, name)
        order = self._order(mapped, rows)
        return parts if order is None else {k: v[order.to(v.device)] for k, v in parts.items()}

    def dense(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None,
              dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """Rows and columns of tensor ``name`` as values in ``dtype`` (``convert.dense_tensor``), in Hugging
        Face order and meaning (Gemma's norms as ``w``, not ``1 + w``), computed on ``device``."""
        mapped = self.tensor(name)
        rows = self._rows(mapped, rows)
        shape = self._piece_shape(mapped, rows, cols)
        exact = dtype if mapped.norm_offset == 0 else torch.float32  # subtract before rounding
        raw = self._bytes_on(name, rows, cols, device)
        # one warning a kind of tensor and type (a file of 128 experts in 48 layers in Q3_K would give 18k)
        kind = (kind_of_tensor(name), mapped.ggml_type)
        values = dense_tensor(raw, mapped.ggml_type, shape, exact, kind[0], warn=kind not in self._warned)
        self._warned.add(kind)
        if mapped.norm_offset:
            values = (values - mapped.norm_offset).to(dtype)
        order = self._order(mapped, rows)
        return values if order is None else values[order.to(values.device)]

    def _bytes_on(self, name: str, rows, cols, device) -> torch.Tensor:
        """The stored bytes of a piece on ``device`` (None: the CPU), to convert there. Whole rows are read with
        read() (``FileReads``: through one reused host buffer on their way to a GPU); a piece of columns is
        copied from the memory map."""
        raw, stored = self.raw(name, rows, cols), self.tensor(name).stored
        if cols is not None or not len(stored.data):
            return torch.from_numpy(np.array(raw, copy=True, order="C").view(np.uint8)).to(device or "cpu")
        first, (block, type_size) = (rows[0] if rows else 0), _block(stored.ggml_type)
        row_bytes = stored.data.nbytes // len(stored.data)
        start = stored.span[0] + (first // block * type_size if len(stored.shape) == 1 and block > 1  # a vector
                                  else first * row_bytes)
        to_gpu = device is not None and torch.device(device).type != "cpu"
        out = self.reads.staged(raw.nbytes) if to_gpu else torch.empty(raw.nbytes, dtype=torch.uint8)
        self.reads.into(stored.file, start, out, stored.name)
        return out.to(device) if to_gpu else out  # a copy from pageable memory: the buffer is free after it

    def _rows(self, mapped: MappedTensor, rows):
        """The rows to read; for a permuted q/k they must be whole heads (its rows only move within a head)."""
        if rows is None or mapped.unpermute_heads is None:
            return rows
        head_dim = mapped.shape[0] // mapped.unpermute_heads
        if rows[0] % head_dim or rows[1] % head_dim:
            raise CheckpointError(f"{mapped.hf_name}: rows {rows[0]}..{rows[1]} are not whole heads of {head_dim}")
        return rows

    @staticmethod
    def _piece_shape(mapped: MappedTensor, rows, cols) -> tuple[int, ...]:
        shape = list(mapped.shape)
        if rows is not None:
            shape[0] = rows[1] - rows[0]
        if cols is not None:
            shape[1] = cols[1] - cols[0]
        return tuple(shape)

    @staticmethod
    def _order(mapped: MappedTensor, rows) -> torch.Tensor | None:
        if mapped.unpermute_heads is None:
            return None
        n = (rows[1] - rows[0]) if rows else mapped.shape[0]
        return unpermute_order(n, n // (mapped.shape[0] // mapped.unpermute_heads))

    # ------------------------------------------------------------------ text

    def tokenizer(self):
        """An ``offload.text.Tokenizer`` with the file's chat template (see ``gguf.tokenizer``)."""
        from .tokenizer import gguf_tokenizer

        return gguf_tokenizer(self.files)

    def close(self) -> None:
        self.reads.close()
        self.files.close()
        self.tensors = {}


def _block(ggml_type) -> tuple[int, int]:
    gguf = gguf_package()
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(ggml_type))]


class GGUFSource:
    """A GGUF checkpoint behind the weight-source interface (``validate(specs)``, ``read(spec, name, out)``).

    A spec without ``part`` is read dense (any type; cast to ``out``'s dtype). A spec with a
    ``part`` (``"data"``, ``"scale"``, ``"minimum"``) is that part of the tensor's compressed form,
    whose format and group size must be the spec's. A tensor piece is converted once for its
    parts: the last ``CACHED_PIECES`` pieces are kept (a fused projection's layout lists q, k and
    v's data, then their scales...), scales exact in float32 and rounded when copied into ``out``
    (the dtype of the layout's scale part).
    """

    CACHED_PIECES = 8

    def __init__(self, checkpoint: GGUFCheckpoint | str | Path, device=None, requantize: bool = False):
        """``device``: where tensors are converted (None: the CPU; the compute GPU is much faster, and its
        cache of converted pieces then lives there while loading). ``requantize``: every tensor is read dense
        (the loader quantizes it again as its layout says: the int4 draft of a GGUF target)."""
        self.checkpoint = checkpoint if isinstance(checkpoint, GGUFCheckpoint) else GGUFCheckpoint(checkpoint)
        self.device, self.requantize = device, requantize
        self._cached: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._readahead: Readahead | None = None

    def stores_parts(self, name: str) -> bool:
        """Whether tensor ``name`` is stored in a type with a compressed form (its parts are read, never
        requantized)."""
        mapped = self.checkpoint.tensors.get(name)
        return not self.requantize and mapped is not None and parts_format(mapped.ggml_type) is not None

    def validate(self, specs) -> None:
        ck = self.checkpoint
        for spec, name in specs:
            mapped = ck.tensors.get(name)
            if mapped is None:
                raise CheckpointError(f"{ck.path.name} has no tensor for {name!r}")
            if tuple(mapped.shape) != tuple(spec.full_shape):
                raise CheckpointError(f"{ck.path.name}: tensor {mapped.name!r} ({name}) has shape "
                                      f"{list(mapped.shape)}, expected {list(spec.full_shape)}")
            if spec.part and not self.requantize:
                self._check_format(spec, name, mapped)
        expected = {int(m.group(1)) for _, name in specs if (m := LAYER_TENSOR.match(name))}
        found = {int(m.group(1)) for name in ck.tensors if (m := LAYER_TENSOR.match(name))}
        if found - expected:
            raise CheckpointError(f"{ck.path.name} has layers up to {max(found)}, but the config's "
                                  f"num_hidden_layers is {len(expected)}")
        # (a bias the config does not name: the model without it would be another model); a stack of experts
        # counted once, by the file's name for it
        unused = sorted(set(ck.tensors) - {name for _, name in specs})
        stored = list(dict.fromkeys(ck.tensors[name].name.partition("[")[0] for name in unused))  # blk.1.x[7]
        if stored:
            names = ", ".join(stored[:3]) + (", ..." if len(stored) > 3 else "")
            raise CheckpointError(f"{ck.path.name} holds {len(stored)} tensor(s) the model would not use ({names}): "
                                  "its metadata and tensors describe different models")

    def _check_format(self, spec, name: str, mapped: MappedTensor) -> None:
        fmt = parts_format(mapped.ggml_type)
        want = spec.quant
        if (fmt is None or want is None or fmt.format != want.format or fmt.group_size != want.group_size
                or fmt.minimum != want.has_minimum):
            minimums = lambda kind, yes: " with minimums" if yes and kind == "int8" else ""  # noqa: E731 (int4 always)
            has = (f"{fmt.format} in groups of {fmt.group_size}{minimums(fmt.format, fmt.minimum)}" if fmt
                   else "no compressed form")
            asked = (f"{want.format} in groups of {want.group_size}{minimums(want.format, want.has_minimum)}" if want
                     else "nothing")
            raise CheckpointError(f"{self.checkpoint.path.name}: {mapped.name} is {type_name(mapped.ggml_type)} "
                                  f"({has}); the layout asks for {asked}")

    def read_in_order(self, specs, pinned: int = 0) -> None:
        """The tensors a load will :meth:`read`, in its order: their bytes are read from disk ahead of it (``pinned``,
        host memory the load may pin, is not used: a piece on its way to a GPU goes through one pageable buffer,
        ``GGUFCheckpoint._bytes_on``)."""
        stored = {name: self.checkpoint.tensors[name].stored for _, name in specs}
        self._readahead = Readahead({name: (t.file, *t.span) for name, t in stored.items()})

    def read(self, spec, name: str, out: torch.Tensor) -> None:
        if self._readahead is not None:
            self._readahead.reached(name)
        rows, cols = _cut(spec)
        if spec.part:
            piece = self._parts(name, rows, cols).get(spec.part)
            if piece is None:
                raise CheckpointError(f"{self.checkpoint.path.name}: {name} has no {spec.part!r} part")
        else:
            piece = self.checkpoint.dense(name, rows, cols, out.dtype, self.device)
        copy_piece(out, piece)
        if out.is_floating_point() and not all_finite(out):
            raise CheckpointError(f"{self.checkpoint.path.name}: tensor {name!r} holds NaN or infinite values "
                                  f"(as {str(out.dtype).removeprefix('torch.')})")

    def _parts(self, name: str, rows, cols) -> dict[str, torch.Tensor]:
        key = (name, rows, cols)
        if key not in self._cached:
            self._cached[key] = self.checkpoint.parts(name, rows, cols, torch.float32, self.device)
            while len(self._cached) > self.CACHED_PIECES:
                self._cached.popitem(last=False)
        return self._cached[key]

    def close(self) -> None:
        if self._readahead is not None:
            self._readahead.close()
            self._readahead = None
        self._cached.clear()
        self.checkpoint.close()


def _cut(spec) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    shard = spec.shard
    if shard.dim is None:
        return None, None
    return ((shard.start, shard.stop), None) if shard.dim == 0 else (None, (shard.start, shard.stop))
