"""Where weights come from: safetensors checkpoints.

A *weight source* fills a destination tensor (a view into a block, wherever the
block lives) with this rank's piece of one named checkpoint tensor:

    source.read(spec, name, out)

so loading never holds more than one tensor's piece outside its final place. A loader
first says what it will read, in its order (``source.read_in_order(specs)``): a source
of files has them read from disk ahead of it (``readahead.py``).
``CheckpointSource`` reads single-file and sharded (``model.safetensors.index.json``)
checkpoints; ``offload.synthetic.RandomSource`` is the same interface over seeded
random numbers.

Before a byte is read, ``validate`` checks that every tensor the model needs is there
with its shape and a floating-point dtype, that the checkpoint has no layers beyond
the config's ``num_hidden_layers`` and no other tensor the model would not read (a
bias, a norm or a head of another model: dropped, it would leave that model's logits),
and that each shard holds just what its index places in it.

A checkpoint that offload quantized and saved (``write_quantized``, ``scripts/quantize.py``)
holds each linear weight as its parts, ``<name>.data``, ``<name>.scale`` (and
``<name>.minimum``), whole (every rank reads its piece), and records the format in
``config.json`` under ``offload_quantization``; it is read as it is, never requantized.

While reading, each tensor is checked for NaN and infinity in host memory the read has just
touched: where it lands, or, on its way to a GPU in its own dtype, in the staging buffer (a
check on the GPU would wait for the copy); after a cast to the model's dtype (which can
overflow), where it lands.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .. import switches
from ..errors import CheckpointError, OffloadError
from ..memory.host import PinnedMemory
from .blocks import TensorSpec
from .parallel import REPLICATED, Shard
from .quant import DEQUANTIZE, QuantizedWeight, QuantScheme, dequantize, part_shapes
from .readahead import Readahead

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the dtypes weights may have
STAGING = 64 << 20  # bytes read at a time where a piece is cast or sent to a GPU (``_read_rows``)
# A read of a tensor's bytes may be cut into pieces of READ_PIECE read by READ_THREADS threads at once
# (``FileReads``): a disk (or a network volume) with several requests queued may read faster than with one. On the
# 2-core CPU machine (2026-12-07, llama-2-7b saved in int4, 4.3 GB, into fresh pageable memory: page faults) four
# threads loaded slower: 0.25 of reading against 0.30 from the disk, 0.16 against 0.18 from the page cache. One by
# default until a GPU machine times it (``load13b_ab``); OFFLOAD_READ_THREADS=N for N (read at import).
READ_THREADS = switches.integer("OFFLOAD_READ_THREADS", 1, least=1)
READ_PIECE = 8 << 20
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}
LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.")
# Tensors a checkpoint may hold that no model reads: rotary frequencies, which older checkpoints saved and
# transformers, as offload, computes from the config
UNREAD = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def is_gguf(path) -> bool:
    """Whether ``path`` is a file that starts with GGUF's magic (what a loader dispatches on: ``offload.gguf``)."""
    path = Path(path)
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None


class CheckpointSource:
    """Tensors of a safetensors checkpoint directory, read piece by piece."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_file():
            raise CheckpointError(f"checkpoint {str(self.path)!r} is a file; give its directory "
                                  "(config.json + safetensors)")
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {str(self.path)!r} does not exist")
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, dict[str, Entry]] = {}
        self._reads = FileReads()
        self._indexed = False  # set by _index where model.safetensors.index.json maps the tensors to shards
        self._file_of = self._index()
        self._readahead: Readahead | None = None

    def _index(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: "
                                      f"{str(e)[:200]})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
            for name, file in weight_map.items():
                if not (isinstance(file, str) and file and Path(file).name == file):
                    raise CheckpointError(f"{index}: tensor {name!r} is in {file!r}, not a file name in the "
                                          "checkpoint directory")
            files = {name: self.path / file for name, file in weight_map.items()}
            for file in sorted(set(files.values())):
                if not file.is_file():
                    raise CheckpointError(f"{index} lists {file.name}, which does not exist")
            single = self.path / "model.safetensors"
            if single not in set(files.values()) and single.is_file():  # transformers reads it, not the index
                raise CheckpointError(f"checkpoint {str(self.path)!r} holds both model.safetensors and {index.name}, "
                                      "which does not list it: remove whichever is stale")
            self._indexed = True
            return files
        try:
            files = sorted(self.path / name for name in os.listdir(self.path) if name.endswith(".safetensors"))
        except OSError as e:
            raise CheckpointError(f"checkpoint directory {str(self.path)!r} cannot be read "
                                  f"({e.strerror or e})") from None
        if not files:
            raise CheckpointError(f"no *.safetensors files in {str(self.path)!r}")
        found = {}
        for file in files:
            for name in self._open(file).keys():
                if name in found:  # which would win is only a matter of the files' names
                    raise CheckpointError(f"tensor {name!r} is in both {found[name].name} and {file.name}; remove "
                                          "the stale file (or give model.safetensors.index.json)")
                found[name] = file
        return found

    def _open(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            if not file.is_file():  # a folder, or a pipe that opening would wait on forever
                raise CheckpointError(f"{file}: not a regular file")
            try:
                open(file, "rb").close()  # safetensors reports a file it may not read as one not found
            except OSError as e:
                raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({e})") from None
            self._handles[file] = handle
        return handle

    def stores_parts(self, name: str) -> bool:
        """Whether tensor ``name`` is stored quantized (its parts are read as they are, not quantized again)."""
        return f"{name}.data" in self._file_of

    def stored(self, name: str) -> tuple[str, int | None, bool] | None:
        """How a saved quantized checkpoint stores tensor ``name``: (format, group size, minimum), None if dense."""
        if f"{name}.data" not in self._file_of:
            return None
        data, scale = (self.shape(f"{name}.{part}") for part in ("data", "scale"))
        fmt = "int4" if self._dtype(f"{name}.data") == "U8" else "int8"
        group = self._group(name, fmt, data, scale)
        self._check_record(name, fmt, group)
        return fmt, group, f"{name}.minimum" in self._file_of and fmt == "int8"

    @functools.cached_property
    def _record(self) -> dict | None:
        """The format config.json records (``offload.quantized.stored_quantization``), read once."""
        from ..quantized import stored_quantization

        return stored_quantization(self.path)

    def _check_record(self, name: str, fmt: str, group: int | None) -> None:
        """A weight's parts in the format and group size config.json records (``write_quantized`` writes every
        layer's so, the LM head in int8 per output channel; an int4 group size recorded as null is each weight's
        default). Parts stored otherwise were not written with the rest: read as their shapes say, they would load
        quietly, and another run's scales beside this run's data (whose nibbles a group size orders) read other
        weights."""
        from ..quantized import RECORD

        record = self._record
        if record is None:
            return  # refused where the parts are read (``_check_dense_of_parts``, ``_weight_format``)
        want = ("int8", None) if name == "lm_head.weight" else (record["format"], record.get("group_size"))
        if fmt != want[0] or (group != want[1] and not (fmt == "int4" and want[1] is None)):
            raise CheckpointError(f"{self._file_of[f'{name}.data'].name}: {name} is stored {_grouping(fmt, group)}, "
                                  f"but config.json records {_grouping(*want)} ({RECORD}): its parts were not "
                                  "written with the rest of the checkpoint")

    def _group(self, name: str, fmt: str, data: tuple[int, ...], scale: tuple[int, ...]) -> int | None:
        """The columns each scale of weight ``name`` covers (None: one a row), from its parts' shapes: a matrix of
        integers and a scale a row (int8), or a matrix of scales that divides its columns into groups (of an even
        number for int4, whose bytes hold two). Any other shapes are no weight the layers could compute with."""
        cols = data[1] * (2 if fmt == "int4" else 1) if len(data) == 2 else 0
        if cols and len(scale) == 1 and fmt == "int8":
            return None
        if cols and len(scale) == 2 and scale[1] and cols % scale[1] == 0:
            group = cols // scale[1]
            if fmt == "int8" or group % 2 == 0:
                return group
        raise CheckpointError(f"{self._file_of[f'{name}.scale'].name}: {name}.scale has shape {list(scale)}, which "
                              f"is no {fmt} grouping of {name}.data of shape {list(data)}")

    def shape(self, name: str) -> tuple[int, ...]:
        """Tensor ``name``'s shape, from the file's header."""
        return tuple(self._slice(name).get_shape())

    def _dtype(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def _slice(self, name: str):
        file = self._file_of.get(name)
        if file is None:
            raise CheckpointError(f"checkpoint {str(self.path)!r} has no tensor {name!r}")
        try:
            return self._open(file).get_slice(name)
        except SafetensorError:
            raise CheckpointError(f"{file.name}: tensor {name!r} is missing") from None

    def validate(self, specs: list[tuple[TensorSpec, str]]) -> None:
        """Check every tensor's presence, shape and dtype, the number of layers, and that the checkpoint holds no
        tensor the model would not read, before any bytes are read."""
        used = set()
        for spec, name in specs:
            part = spec.part and self.stores_parts(name)
            if part:  # a saved quantized weight's part: its own tensor, whole
                name, spec = f"{name}.{spec.part}", part_spec(spec)
            elif not spec.part and name not in self._file_of and self.stores_parts(name):
                self._check_dense_of_parts(spec, name)  # read dense from its parts (``read``)
                used.update(f"{name}.{p}" for p in ("data", "scale", "minimum"))
                continue
            used.add(name)
            tensor = self._slice(name)
            shape, dtype, file = tuple(tensor.get_shape()), tensor.get_dtype(), self._file_of[name]
            if shape != spec.full_shape:
                raise CheckpointError(
                    f"{file.name}: tensor {name!r} has shape {list(shape)}, expected {list(spec.full_shape)}"
                )
            if part and TORCH_DTYPES.get(dtype) != spec.dtype:  # read as it is: never cast
                raise CheckpointError(f"{file.name}: tensor {name!r} has dtype {dtype}; its format keeps it as "
                                      f"{str(spec.dtype).removeprefix('torch.')}")
            if not part and dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{file.name}: tensor {name!r} has dtype {dtype}; weights must be "
                                      f"floating point ({', '.join(FLOAT_DTYPES)})")
        self._check_layer_count(specs)
        self._check_shards()
        self._check_unused(used)

    def _check_shards(self) -> None:
        """Each shard holds the tensors the index places in it and no others: transformers loads every tensor of
        the shards it opens, so one the index leaves out (or places in another shard too) is one it would load
        where offload would not."""
        if not self._indexed:
            return  # the map was read from the files themselves, each tensor in one (``_index``)
        for file in sorted(set(self._file_of.values())):
            for name in self._open(file).keys():
                listed = self._file_of.get(name)
                if listed is None:
                    raise CheckpointError(f"{file.name} holds tensor {name!r}, which model.safetensors.index.json "
                                          "does not list: the index and its shards disagree")
                if listed != file:
                    raise CheckpointError(f"tensor {name!r} is in both {file.name} and {listed.name} (which "
                                          "model.safetensors.index.json names): remove the stale copy")

    def _check_unused(self, used: set[str]) -> None:
        """Refuse tensors the model would not read (``used`` names those it reads): a bias, a norm or a head that
        config.json does not describe belongs to another model, whose logits dropping it would not give."""
        unused = sorted(name for name in self._file_of if name not in used and not UNREAD.fullmatch(name))
        if "lm_head.weight" in unused and "model.embed_tokens.weight" in used:  # tied: the head is the embedding
            self._check_tied_head()
            unused.remove("lm_head.weight")
        if unused:
            names = ", ".join(unused[:3]) + (", ..." if len(unused) > 3 else "")
            files = ", ".join(sorted({self._file_of[name].name for name in unused}))
            raise CheckpointError(f"checkpoint {str(self.path)!r} holds {len(unused)} tensor(s) the model would not "
                                  f"use ({names}, in {files}): config.json and the weights describe different models")

    def _check_tied_head(self) -> None:
        """A head stored beside the embedding it is tied to (tie_word_embeddings) must be a copy of it: one that
        differs is a head of its own, which transformers 5 computes with (and 4 drops), so the config is wrong."""
        head, embedding = self._slice("lm_head.weight"), self._slice("model.embed_tokens.weight")
        shape = tuple(embedding.get_shape())  # (validated: the vocabulary's rows)
        step = max(1, STAGING // max(1, 8 * math.prod(shape[1:])))  # rows compared at a time, as float64
        if tuple(head.get_shape()) != shape or not all(
                torch.equal(head[row : row + step].double(), embedding[row : row + step].double())
                for row in range(0, shape[0], step)):
            raise CheckpointError(f"{self._file_of['lm_head.weight'].name} holds an lm_head.weight that differs from "
                                  "model.embed_tokens.weight, but config.json ties them (tie_word_embeddings): set it "
                                  "to false to compute with that head, or remove the head")

    def _check_layer_count(self, specs: list[tuple[TensorSpec, str]]) -> None:
        """A config that claims fewer layers than the checkpoint holds would run a different, truncated model."""
        expected = {int(m.group(1)) for _, name in specs if (m := LAYER_TENSOR.match(name))}
        found = {int(m.group(1)) for name in self._file_of if (m := LAYER_TENSOR.match(name))}
        if found - expected:
            raise CheckpointError(f"checkpoint {str(self.path)!r} has layers up to {max(found)}, but config.json's "
                                  f"num_hidden_layers is {len(expected)}")

    def read_in_order(self, specs: list[tuple[TensorSpec, str]], pinned: int = 0) -> None:
        """The tensors a load will :meth:`read`, in its order: their bytes are read from disk ahead of it. ``pinned``:
        host memory the load may pin beside the plan's (pieces on their way to a GPU are staged in it)."""
        self._reads.allow_pinned(pinned)
        names = [name for name in dict.fromkeys(self._stored_name(spec, name) for spec, name in specs)
                 if name in self._file_of]  # not a weight read dense from its parts (:meth:`read`, from the map)
        entries = {name: self._entry(name) for name in names}
        self._readahead = Readahead({name: (self._file_of[name], entries[name].start, entries[name].end)
                                     for name in names})

    def _entry(self, name: str) -> Entry:
        file = self._file_of[name]
        if file not in self._headers:
            self._headers[file] = _header(file)
        return self._headers[file][name]

    def _stored_name(self, spec: TensorSpec, name: str) -> str:
        """The name a piece is read from: a saved quantized weight's part is its own tensor."""
        return f"{name}.{spec.part}" if spec.part and self.stores_parts(name) else name

    def read(self, spec: TensorSpec, name: str, out: torch.Tensor) -> None:
        if spec.part:  # a part of a weight stored quantized (``stores_parts``)
            name, spec = f"{name}.{spec.part}", part_spec(spec)
        elif name not in self._file_of and self.stores_parts(name):
            copy_piece(out, self._dense_of_parts(spec, name).to(out.dtype))
            return _check_finite(out, self._file_of[f"{name}.scale"], name)  # (a scale's NaN spreads to its row)
        if self._readahead is not None:
            self._readahead.reached(name)
        file = self._file_of[name]
        if self._read_rows(spec, name, out):  # (checked as it read)
            return
        try:
            piece = _cut(self._open(file).get_slice(name), spec)
        except SafetensorError as e:
            raise CheckpointError(f"{file.name}: cannot read tensor {name!r} ({e})") from None
        copy_piece(out, piece)
        _check_finite(out, file, name)

    def _read_rows(self, spec: TensorSpec, name: str, out: torch.Tensor) -> bool:
        """Read this rank's rows of tensor ``name`` with read() (:class:`FileReads`): straight into ``out`` where it
        is host memory of the stored dtype, else ``STAGING`` bytes at a time through a host buffer (cast, or sent to
        a GPU). False for a piece of columns (a tensor-parallel column shard is not one stretch of the file): the
        caller cuts it from the memory map."""
        entry = self._entry(name)
        dtype, shape = TORCH_DTYPES.get(entry.dtype), entry.shape
        if dtype is None or spec.shard.dim not in (None, 0) or not shape or tuple(out.shape[1:]) != shape[1:]:
            return False
        first, last = (spec.shard.start, spec.shard.stop) if spec.shard.dim == 0 else (0, shape[0])
        rows = last - first
        if out.shape[0] < rows:
            return False
        out[rows:].zero_()  # rows past the piece: vocabulary padding
        row_bytes = (entry.end - entry.start) // shape[0] if shape[0] else 0
        file, start = self._file_of[name], entry.start + first * row_bytes
        if out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous():
            self._reads.into(file, start, out[:rows], name)
            _check_finite(out[:rows], file, name)
            return True
        step = max(1, STAGING // max(row_bytes, 1))
        for row in range(0, rows, step):
            n = min(step, rows - row)
            piece = self._reads.staged(n * row_bytes).view(dtype).view(n, *shape[1:])
            self._reads.into(file, start + row * row_bytes, piece, name)
            if out.dtype == dtype:  # checked here, not on the GPU: a check there would wait for the copy
                _check_finite(piece, file, name)
            self._reads.send(piece, out[row : row + n])
        if out.dtype != dtype:
            _check_finite(out[:rows], file, name)  # after the cast, which can overflow
        return True

    def _check_dense_of_parts(self, spec: TensorSpec, name: str) -> None:
        """That weight ``name``, stored as its parts, can be read dense as ``spec`` asks: its shape, and a piece of
        whole rows (an LM head that tensor-parallel ranks pad is stored in int8 by a one-rank ``write_quantized``),
        in a checkpoint whose config.json records its format (else its layers would be read dense, quietly)."""
        from ..quantized import RECORD

        if self._record is None:
            raise CheckpointError(f"checkpoint {str(self.path)!r} stores {name} as quantized parts ({name}.data...), "
                                  f"but config.json records no {RECORD}, as scripts/quantize.py writes it")
        fmt, group, _ = self.stored(name)
        rows, cols = self.shape(f"{name}.data")
        shape = (rows, cols * 2 if fmt == "int4" else cols)
        if shape != spec.full_shape:
            raise CheckpointError(f"checkpoint {str(self.path)!r}: {name} has shape {list(shape)}, expected "
                                  f"{list(spec.full_shape)}")
        if spec.shard.dim not in (None, 0):
            raise CheckpointError(f"checkpoint {str(self.path)!r} stores {name} quantized; its columns cannot be "
                                  "read dense on tensor-parallel ranks")

    def _dense_of_parts(self, spec: TensorSpec, name: str) -> torch.Tensor:
        """This rank's rows of weight ``name``, stored as its parts, dequantized (in float32)."""
        fmt, group, minimum = self.stored(name)
        parts = {part: _cut(self._open(self._file_of[f"{name}.{part}"]).get_slice(f"{name}.{part}"), spec)
                 for part in ("data", "scale", "minimum") if f"{name}.{part}" in self._file_of}
        scheme = QuantScheme(fmt, group, 1 << 30, DEQUANTIZE, minimum=minimum)
        return dequantize(QuantizedWeight(parts["data"], parts["scale"], parts.get("minimum"), scheme), torch.float32)

    def close(self) -> None:
        if self._readahead is not None:
            self._readahead.close()
            self._readahead = None
        self._handles.clear()
        self._reads.close()


class FileReads:
    """Byte ranges of files read() into tensors, the files kept open. Loading copies with this, not from a memory
    map: a map's copy faults its pages in one at a time, 0.8-3.3 GB/s on 2 cores where read() copied the same page
    cache into touched memory at 10 (measured 2026-12-06). A range of several ``READ_PIECE`` is read by
    ``READ_THREADS`` threads at once (``os.preadv`` lets go of the GIL while it waits)."""

    def __init__(self):
        self.files: dict[Path, int] = {}  # open file descriptors
        self.pool: ThreadPoolExecutor | None = None
        self.pinned_room = 0  # host memory the staging buffers may pin (:meth:`allow_pinned`)
        self.pinned: list[PinnedMemory] = []
        self.buffers: list[torch.Tensor] = []  # staging buffers (:meth:`staged`)
        self.sent: list = [None, None]  # each buffer's last copy to a GPU (a CUDA event), or None
        self.turn = 0  # the buffer in use

    def into(self, file: Path, offset: int, out: torch.Tensor, what: str) -> None:
        """Fill ``out`` (contiguous host memory) with the bytes of ``file`` from ``offset``; ``what``: the tensor's
        name, for errors."""
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())  # view: never a copy that the read would fill
        try:
            fd = self.files.get(file)
            if fd is None:
                fd = self.files[file] = os.open(file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            pieces = [(buffer[at : at + READ_PIECE], offset + at) for at in range(0, len(buffer), READ_PIECE)]
            if len(pieces) > 1 and READ_THREADS > 1 and hasattr(os, "preadv"):
                if self.pool is None:
                    self.pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="offload-read")
                futures = [self.pool.submit(_read_fully, fd, *piece) for piece in pieces]
                try:
                    filled = [future.result() for future in futures]
                finally:  # after a failure: the pieces not begun are dropped, those begun waited for (none may
                    for future in futures:  # write into ``out`` once the caller has the error)
                        future.cancel()
                    wait(futures)
            else:
                filled = [_read_fully(fd, *piece) for piece in pieces]
        except OSError as e:
            raise CheckpointError(f"{file.name}: cannot read tensor {what!r} ({e.strerror or e})") from None
        if not all(filled):
            raise CheckpointError(f"{file.name}: ends inside tensor {what!r} (truncated)")

    def staged(self, nbytes: int) -> torch.Tensor:
        """A host buffer of ``nbytes`` (uint8) for a piece on its way to its place (:meth:`send`): two in turn, pinned
        where the host budget leaves room for them (:meth:`allow_pinned`), each free once its last copy has run; else
        one pageable buffer. Its pages are touched once."""
        self.turn = 1 - self.turn if len(self.buffers) == 2 else 0
        if not self.buffers or self.buffers[self.turn].numel() < nbytes:
            self._allocate(nbytes)
        if self.sent[self.turn] is not None:
            self.sent[self.turn].synchronize()  # the copy that last read this buffer
        return self.buffers[self.turn][:nbytes]

    def send(self, piece: torch.Tensor, out: torch.Tensor) -> None:
        """Copy ``piece`` (from :meth:`staged`) into ``out``: from a pinned buffer to a GPU queued (the next read fills
        the other buffer meanwhile), else at once."""
        queued = out.is_cuda and piece.is_pinned()
        out.copy_(piece, non_blocking=queued)
        if queued:  # on the stream the copy went to: out's GPU's (a peer GPU's is not the current GPU's)
            self.sent[self.turn] = torch.cuda.Event()
            self.sent[self.turn].record(torch.cuda.current_stream(out.device))

    def allow_pinned(self, nbytes: int) -> None:
        """Host memory the reads may pin, for staging pieces on their way to a GPU (``nbytes`` the budget's room)."""
        self.pinned_room = nbytes

    def _allocate(self, nbytes: int) -> None:
        self.close_buffers()
        size = max(nbytes, STAGING)
        if torch.cuda.is_available() and 2 * size <= self.pinned_room:
            try:
                self.pinned = [PinnedMemory(size) for _ in range(2)]
            except OffloadError:  # pinning refused: a speed-up lost, not the load (one pageable buffer)
                pass
        self.buffers = [memory.tensor for memory in self.pinned] or [torch.empty(nbytes, dtype=torch.uint8)]
        self.sent = [None] * len(self.buffers)

    def close_buffers(self) -> None:
        for event in self.sent:  # the last copies from the buffers, on any GPU: unpinning waits for the current one's
            if event is not None:
                event.synchronize()
        for memory in self.pinned:
            memory.close()
        self.pinned, self.buffers, self.sent, self.turn = [], [], [None, None], 0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()
        self.close_buffers()


def _read_fully(fd: int, buffer: memoryview, offset: int) -> bool:
    """Fill ``buffer`` with the bytes of file ``fd`` from ``offset``; False where the file ends first."""
    while len(buffer):
        n = os.preadv(fd, [buffer], offset) if hasattr(os, "preadv") else _seek_and_read(fd, buffer, offset)
        if not n:
            return False
        buffer, offset = buffer[n:], offset + n
    return True


def _seek_and_read(fd: int, buffer: memoryview, offset: int) -> int:
    """One read into ``buffer`` from ``offset`` where the system has no ``preadv`` (one thread reads then)."""
    os.lseek(fd, offset, os.SEEK_SET)
    with open(fd, "rb", buffering=0, closefd=False) as f:
        return f.readinto(buffer)


@dataclass(frozen=True)
class Entry:
    """A tensor's entry in a safetensors file's header: its dtype's name, its shape, and where its bytes lie."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _header(file: Path) -> dict[str, Entry]:
    """Each tensor of a safetensors file (opened by ``safe_open`` already, so whole and valid): the format is an
    8-byte little-endian header length, the JSON header, then the data its offsets count from."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    return {name: Entry(entry["dtype"], tuple(entry["shape"]), base + entry["data_offsets"][0],
                         base + entry["data_offsets"][1])
            for name, entry in header.items() if name != "__metadata__"}


def _grouping(fmt: str, group) -> str:
    """How a format's scales are laid out, in words: ``int4 in groups of 32``, ``int8 per output channel``."""
    return f"{fmt} per output channel" if group is None else f"{fmt} in groups of {group!r}"


def part_spec(spec: TensorSpec) -> TensorSpec:
    """The spec of a quantized weight's part as its own whole tensor: its full shape and this rank's piece (a
    column shard of the weight is a shard of half as many int4 bytes, and of its groups' scales)."""
    scheme, (rows, cols), shard = spec.quant, spec.full_shape, spec.shard
    full = {name: shape for name, shape, _ in part_shapes(scheme, rows, cols, spec.dtype)}[spec.part]
    if shard.dim != 1:
        return replace(spec, full_shape=full)
    per = {"data": 2 if scheme.format == "int4" else 1}.get(spec.part, scheme.group_size)
    if per is None:  # int8's one scale per row: the whole row's, on every rank
        return replace(spec, full_shape=full, shard=REPLICATED)
    return replace(spec, full_shape=full, shard=Shard(1, shard.start // per, shard.stop // per))


def _cut(tensor_slice, spec: TensorSpec) -> torch.Tensor:
    shard = spec.shard
    if shard.dim is None:
        return tensor_slice[:]
    if shard.dim == 0:
        return tensor_slice[shard.start : shard.stop]
    return tensor_slice[:, shard.start : shard.stop]


def copy_piece(out: torch.Tensor, piece: torch.Tensor) -> None:
    """Copy ``piece`` into ``out``; rows of ``out`` past the piece (vocabulary padding) become zero."""
    rows = piece.shape[0] if piece.dim() else 1
    if out.dim() and rows < out.shape[0]:
        out[rows:].zero_()
        out = out[:rows]
    out.copy_(piece)


def _check_finite(t: torch.Tensor, file: Path, name: str) -> None:
    if t.is_floating_point() and not all_finite(t):
        raise CheckpointError(f"{file.name}: tensor {name!r} holds NaN or infinite values "
                              f"(as {str(t.dtype).removeprefix('torch.')})")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``, checked on its own device: its minimum and maximum are finite (a NaN is
    carried into both). One vectorised reduction with no temporary of the tensor's size: on a CPU it reads
    bf16 at about 17 GB/s a core where ``isfinite(t).all()`` reads 0.4 (measured 2026-12-05)."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(low) & torch.isfinite(high))
