"""Compressed weights: the int8 and int4 formats of a decoder layer's linear weights.

Weight-only quantization: the matrices of q, k, v, o, gate, up and down are
stored as small integers plus scales; norms, biases, the embedding and the LM
head stay in the model dtype. Each quantized weight is a few *parts*, named
shapes in the block layout like any other tensor, so a compressed block is
still one flat buffer of bytes that the pool, the planner and the copy rings
move without knowing what it holds. For a weight of ``rows`` output channels
and ``cols`` input columns (this rank's shard), with groups of ``g`` columns:

    format  part     dtype        shape              holds
    int8    data     int8         [rows, cols]       q = round(w / scale), in [-127, 127]
            scale    scale dtype  [rows] or          max |w| of the row (or group) / 127
                                  [rows, cols / g]
            minimum  scale dtype  [rows, cols / g]   only some GGUF formats (Q5_K): w = q * scale + minimum
    int4    data     uint8        [rows, cols / 2]   q in [0, 15]; byte j of a group: column j of the group in
                                                     the low 4 bits, column j + g/2 in the high 4 bits
            scale    scale dtype  [rows, cols / g]   the group's step
            minimum  scale dtype  [rows, cols / g]   the group's offset

    int8: w ~ q * scale (+ minimum)        int4: w ~ q * scale + minimum

offload's own int8 has one scale per output channel; grouped int8 and the scale
dtype float16 come from GGUF files (``scale_dtype``; otherwise the model dtype).

int4's nibble order within a group (GGUF's Q4_0 and Q4_1 order for g = 32) lets a kernel
multiply the low nibbles of a group's bytes by one contiguous half of ``x`` and the high
nibbles by the other.

Every part has one row per output channel, so the parts of q, k and v (and of
gate and up) are stored back to back and seen as one fused projection, as the
dense layout does with the matrices themselves.

int4 groups run along the input dimension, 128 columns unless ``group_size``
says otherwise. Where 128 does not divide a weight's input dimension (576 = 64 x 9),
that weight takes the largest smaller power of two that does; a group size
the user gave must divide every input dimension. Under tensor parallelism the
input dimension is the rank's shard (o and down are split along it), so a
group never straddles two ranks. Each group's scale and minimum are chosen to
minimise the group's squared error (``rounding="search"``: a search over its
range, then least squares, as llama.cpp's k-quants do), or are its range
(``rounding="minmax"``).

Compute (``quantized_linear``): on a GPU in 16 bits, the Triton kernels of
``quant_kernels.py`` multiply straight from the parts; elsewhere the weight's
output rows are dequantized in chunks of at most ``chunk_rows`` into the model
dtype and multiplied, and ``scratch_bytes`` is what the planner reserves for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import InputError

INT8, INT4 = "int8", "int4"
FORMATS = (INT8, INT4)
STORED = "stored"  # a checkpoint stored quantized (GGUF, scripts/quantize.py) kept in its own formats
DEFAULT_GROUP_SIZE = 128
DEQUANTIZE = "dequantize"  # the kernel: dequantize a chunk of rows, then a dense matrix product
FUSED = "fused"  # the Triton kernels of quant_kernels.py: products straight from the parts
ROUNDINGS = ("search", "minmax")
DEQUANT_CHUNK_BYTES = 64 * 2**20  # rows dequantized at a time hold at most this many bytes (or one row)
QUANTIZE_CHUNK_ELEMENTS = 1 << 22  # loading quantizes this many weights at a time on the compute device

@dataclass(frozen=True)
class QuantScheme:
    """How one weight (or fused projection) is stored and computed."""

    format: str  # "int8" or "int4"
    group_size: int | None  # input columns per scale (and minimum); None: one scale per output row (int8)
    chunk_rows: int  # output rows dequantized at a time (where the weight is dequantized to multiply)
    kernel: str = DEQUANTIZE
    minimum: bool = False  # int8 with a minimum per group (int4 always has one)
    scale_dtype: torch.dtype | None = None  # the scales' and minimums' dtype; None: the model dtype
    rounding: str = "search"  # how offload's own int4 groups are rounded (see the module's notes)

    @property
    def has_minimum(self) -> bool:
        return self.format == INT4 or self.minimum


@dataclass(frozen=True)
class WeightFormat:
    """What the user asked for: a format, for int4 a group size (None: the default rule) and a rounding; or,
    for a file whose weights are stored compressed already (a GGUF file), each tensor's own format."""

    format: str
    group_size: int | None = None
    kernel: str = DEQUANTIZE
    chunk_bytes: int = DEQUANT_CHUNK_BYTES
    rounding: str = "search"
    per_tensor: Callable[[str], tuple[str, int, bool] | None] | None = None  # a checkpoint tensor's (format,
    # group size, minimum), or None where it is stored dense
    scale_dtype: torch.dtype | None = None


class QuantizedShape(NamedTuple):
    """A quantized projection of a layout: its scheme, output rows and input columns on this rank."""

    scheme: QuantScheme
    rows: int
    cols: int


@dataclass(slots=True)
class QuantizedWeight:
    """One projection's parts: views into its block, used where a weight tensor would be."""

    data: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None
    scheme: QuantScheme

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def cols(self) -> int:
        return self.data.shape[1] * (2 if self.scheme.format == INT4 else 1)

    @property
    def groups(self) -> int:
        return 1 if self.scale.dim() == 1 else self.scale.shape[1]


@dataclass(slots=True)
class StackedWeight:
    """A fused projection whose members are stored in different formats (a GGUF file's q, k and v): its
    product is each member's, side by side."""

    members: list  # tensors and QuantizedWeights, in output order


# ----------------------------------------------------------------------------- choices


def check_request(quantize, group_size, rounding: str = "search", draft_copy: bool = False) -> None:
    """Refuse a format this module does not have, or a group size or rounding that cannot be used
    (``draft_copy``: a compressed copy of the model is its draft, whose groups are the default ones)."""
    if quantize is not None and quantize not in (*FORMATS, STORED):
        raise InputError(f"unsupported quantize {quantize!r}; use int8, int4 or stored (or none)")
    if rounding not in ROUNDINGS:
        raise InputError(f"unsupported rounding {rounding!r}; use {' or '.join(ROUNDINGS)}")
    if group_size is None:
        return
    if quantize != INT4:
        why = {INT8: "int8 has one scale per output channel",
               STORED: "quantize='stored' keeps the checkpoint's own groups"}.get(quantize, "nothing is quantized")
        if quantize is None and draft_copy:
            why = "the layers are not quantized (a draft's compressed copy takes the default group sizes)"
        raise InputError(f"a group size ({group_size!r}) is for int4 quantization (quantize='int4'); {why}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
        raise InputError(f"group_size must be an even positive integer (two 4-bit values share a byte), "
                         f"got {group_size!r}")


def choose_kernel(fused: bool) -> str:
    """How quantized projections compute: ``FUSED`` where the model runs offload's Triton kernels (``ops.choose``),
    else ``DEQUANTIZE``. A scheme the kernels do not take (``quant_kernels.takes``) dequantizes all the same."""
    return FUSED if fused else DEQUANTIZE


def group_size_for(cols: int, full_cols: int, ranks: int, requested: int | None, name: str) -> int:
    """The int4 group size of a weight with ``cols`` input columns on this rank (``full_cols`` in all).

    ``requested`` must divide ``cols``; None picks ``DEFAULT_GROUP_SIZE`` or, where that
    does not divide ``cols``, the largest smaller power of two that does.
    """
    if cols % 2:
        raise InputError(f"int4 needs an even input dimension; {name} has {cols} input columns")
    if requested is not None:
        if cols % requested:
            sharded = ranks > 1 and cols != full_cols
            split = f" ({full_cols} split over {ranks} tensor-parallel ranks)" if sharded else ""
            raise InputError(f"group size {requested} does not divide the input dimension {cols} of {name}{split}; "
                             "choose a group size that divides every input dimension, or leave it to the default")
        return requested
    group = DEFAULT_GROUP_SIZE
    while cols % group:
        group //= 2
    return group


def scheme_for(fmt: WeightFormat, cols: int, full_cols: int, ranks: int, dtype: torch.dtype,
               name: str, source: str = "") -> QuantScheme | None:
    """How a weight of ``cols`` input columns on this rank is stored in ``fmt`` (None: dense; ``source``: its
    checkpoint tensor, for formats per tensor)."""
    chunk_rows = max(1, fmt.chunk_bytes // (cols * dtype.itemsize))
    if fmt.per_tensor is not None:
        stored = fmt.per_tensor(source)
        if stored is None:
            return None
        kind, group, minimum = stored
        if group is not None and cols % group:
            raise InputError(f"{source} is stored in groups of {group} columns, which do not divide this rank's "
                             f"{cols} (of {full_cols}); use fewer tensor-parallel ranks")
        scheme = QuantScheme(kind, group, chunk_rows, DEQUANTIZE, minimum=minimum and kind == INT8,
                             scale_dtype=fmt.scale_dtype)
    else:
        group = group_size_for(cols, full_cols, ranks, fmt.group_size, name) if fmt.format == INT4 else None
        scheme = QuantScheme(fmt.format, group, chunk_rows, DEQUANTIZE, rounding=fmt.rounding)
    if fmt.kernel == FUSED and fused_takes(scheme, cols):
        scheme = replace(scheme, kernel=FUSED)
    return scheme


def head_format(fmt: WeightFormat | None) -> WeightFormat | None:
    """The LM head's format in a model whose layers are in ``fmt``: a file's own, tensor by tensor (a GGUF file's
    output tensor, or a saved checkpoint's head as it was written); int8 per channel (one scale a row of the
    vocabulary) where the layers are quantized as asked, int8 or int4: a decode step reads the head once (250 MiB
    of llama-2-7b's 12.6 GiB in bfloat16, 1 GiB of llama-3-8b's 15 GiB), so it halves those bytes, with one
    rounding of a weight at 2^-8 of its row's largest; None (dense) for a dense model."""
    if fmt is None or fmt.per_tensor is not None:
        return fmt
    return WeightFormat(INT8, kernel=fmt.kernel, chunk_bytes=fmt.chunk_bytes)


def fused_takes(scheme: QuantScheme, cols: int) -> bool:
    """Whether the Triton kernels multiply from this scheme's parts: int8 per channel, or groups of a power
    of two of at least 16 columns (a tile holds whole groups)."""
    group = scheme.group_size
    return group is None or (group >= 16 and group & (group - 1) == 0 and cols % group == 0)


def part_shapes(scheme: QuantScheme, rows: int, cols: int, dtype: torch.dtype):
    """The parts of a ``[rows, cols]`` weight stored in ``scheme``: (part name, shape, dtype)."""
    scales = (rows,) if scheme.group_size is None else (rows, cols // scheme.group_size)
    scale_dtype = scheme.scale_dtype or dtype
    if scheme.format == INT4:
        parts = [("data", (rows, cols // 2), torch.uint8)]
    else:
        parts = [("data", (rows, cols), torch.int8)]
    parts.append(("scale", scales, scale_dtype))
    if scheme.has_minimum:
        parts.append(("minimum", scales, scale_dtype))
    return parts


# ----------------------------------------------------------------------------- quantizing


def quantize(w: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The parts of ``w`` (``[rows, cols]``, any float dtype) in ``scheme``, scales in ``dtype``.

    Scales are rounded to ``dtype`` before the integers are computed from them, so the
    stored parts reproduce ``w`` to half a step (and ``dtype``'s own rounding).
    """
    w, dtype = w.float(), scheme.scale_dtype or dtype
    if scheme.format == INT8:
        return _quantize_int8(w, scheme.group_size, dtype)
    if scheme.rounding == "search":
        return _quantize_int4_searched(w, scheme.group_size, dtype)
    return _quantize_int4(w, scheme.group_size, dtype)


def _quantize_int8(w: torch.Tensor, group: int | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    rows, cols = w.shape
    grouped = w.view(rows, 1 if group is None else cols // group, -1)
    scale = (grouped.abs().amax(dim=-1) / 127).to(dtype)
    q = grouped / _nonzero(scale)[..., None]
    return {"data": q.round_().clamp_(-127, 127).to(torch.int8).view(rows, cols),
            "scale": scale.view(rows) if group is None else scale}


def _quantize_int4(w: torch.Tensor, group: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    rows, cols = w.shape
    grouped = w.view(rows, cols // group, group)
    minimum = grouped.amin(dim=-1).to(dtype)
    scale = ((grouped.amax(dim=-1) - minimum.float()) / 15).to(dtype)
    return _pack_int4(grouped, scale, minimum)


def _pack_int4(grouped: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parts of ``grouped`` ``[rows, groups, g]`` rounded to ``q * scale + minimum`` (scales already rounded)."""
    q = (grouped - minimum.float()[..., None]).div_(_nonzero(scale)[..., None])
    q = q.round_().clamp_(0, 15).to(torch.uint8)
    return {"data": pack_int4(q), "scale": scale, "minimum": minimum}


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``q [rows, groups, g]`` (uint8 in [0, 15]) as bytes ``[rows, groups * g / 2]``: byte j of a group holds its
    column j in the low nibble and column j + g/2 in the high one."""
    half = q.shape[2] // 2
    return (q[..., :half] | (q[..., half:] << 4)).view(q.shape[0], -1)


def unpack_int4(data: torch.Tensor, group: int) -> torch.Tensor:
    """The integers of ``data [rows, cols / 2]`` as ``[rows, cols / g, g]`` uint8 (``pack_int4`` undone)."""
    grouped = data.view(data.shape[0], -1, group // 2)
    return torch.cat([grouped & 15, grouped >> 4], dim=-1)


SEARCH_STEPS = 21  # candidate steps per group, from the range / 15 shrunk by up to SEARCH_SHRINK
SEARCH_SHRINK = 0.25


def _quantize_int4_searched(w: torch.Tensor, group: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """int4 groups whose scale and minimum minimise the group's squared error.

    For each candidate step (the group's range / 15, shrunk by up to a quarter: outliers may
    clip), the values are rounded from the group's minimum, then the scale and minimum that fit
    those integers best are solved by least squares and the values rounded again; each group
    keeps the candidate with the least error, and min/max rounding's when none beats it (as
    llama.cpp's make_qkx quantizers do; HQQ searches the same way with a different fit).
    """
    rows, cols = w.shape
    x = w.view(rows, cols // group, group)
    low, high = x.amin(dim=-1), x.amax(dim=-1)
    best = _pack_int4(x, ((high - low) / 15).to(dtype), low.to(dtype))
    best_error = _int4_error(x, best)
    for step in range(SEARCH_STEPS):  # the first: min/max rounding's integers, refitted
        shrink = 1 - SEARCH_SHRINK * step / (SEARCH_STEPS - 1)
        span = (high - low) * shrink
        q = ((x - low[..., None]) / torch.where(span == 0, 1.0, span / 15)[..., None]).round_().clamp_(0, 15)
        scale, minimum = _least_squares(x, q)
        candidate = _pack_int4(x, scale.to(dtype), minimum.to(dtype))
        error = _int4_error(x, candidate)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        for name in ("scale", "minimum"):
            best[name] = torch.where(better, candidate[name], best[name])
        best["data"] = torch.where(better.repeat_interleave(group // 2, dim=1), candidate["data"], best["data"])
    return best


def _least_squares(x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and minimum with ``q * scale + minimum`` closest to ``x`` (per group, over the last dimension)."""
    n = x.shape[-1]
    sq, sx = q.sum(-1), x.sum(-1)
    sqq, sqx = (q * q).sum(-1), (q * x).sum(-1)
    det = n * sqq - sq * sq
    flat = det == 0  # every value rounded alike: the mean
    scale = torch.where(flat, 0.0, (n * sqx - sq * sx) / torch.where(flat, 1.0, det))
    minimum = torch.where(flat, sx / n, (sqq * sx - sq * sqx) / torch.where(flat, 1.0, det))
    return scale.clamp_(min=0), minimum


def _int4_error(x: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each group's squared error of the stored values against ``x`` ``[rows, groups, g]``."""
    q = unpack_int4(parts["data"], x.shape[2]).float()
    stored = q * parts["scale"].float()[..., None] + parts["minimum"].float()[..., None]
    return (stored - x).pow_(2).sum(-1)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` in float32 with zeros (all-zero rows or constant groups) replaced by 1: their q is 0."""
    scale = scale.float()
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_into(piece: torch.Tensor, parts: dict[str, torch.Tensor], scheme: QuantScheme,
                  device: torch.device) -> None:
    """Quantize ``piece`` (``[rows, cols]``, on the host) into ``parts`` (views into a block, anywhere).

    Rows go to ``device`` a chunk at a time (``QUANTIZE_CHUNK_ELEMENTS`` weights: on a GPU a few
    tens of MiB of temporaries, inside the workspace the plan reserves and before the KV cache
    and the activations exist).
    """
    rows, cols = piece.shape
    step = max(1, QUANTIZE_CHUNK_ELEMENTS // cols)
    dtype = parts["scale"].dtype
    for lo in range(0, rows, step):
        packed = quantize(piece[lo : lo + step].to(device), scheme, dtype)
        for name, values in packed.items():
            parts[name][lo : lo + step].copy_(values)


# ----------------------------------------------------------------------------- computing


def dequantize(w: QuantizedWeight, dtype: torch.dtype, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """Rows ``[lo, hi)`` of the weight, ``[hi - lo, cols]`` in ``dtype`` (rounded once from the float32 product)."""
    hi = w.rows if hi is None else hi
    data, rows = w.data[lo:hi], hi - lo
    if w.scheme.format == INT8:
        grouped = data.float().view(rows, w.groups, -1)
    else:
        grouped = unpack_int4(data, w.scheme.group_size).float()
    grouped.mul_(w.scale[lo:hi].float().view(rows, w.groups, 1))
    if w.minimum is not None:
        grouped.add_(w.minimum[lo:hi].float().view(rows, w.groups, 1))
    return grouped.view(rows, -1).to(dtype)


def quantized_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the weight ``W`` that ``w`` stores, dequantized ``chunk_rows`` rows at a time."""
    chunk = w.scheme.chunk_rows
    if chunk >= w.rows:
        return F.linear(x, dequantize(w, x.dtype), bias)
    out = x.new_empty(*x.shape[:-1], w.rows)
    for lo in range(0, w.rows, chunk):
        hi = min(lo + chunk, w.rows)
        out[..., lo:hi] = F.linear(x, dequantize(w, x.dtype, lo, hi), None if bias is None else bias[lo:hi])
    return out


def scratch_bytes(shapes: dict[str, QuantizedShape], dtype: torch.dtype, max_tokens: int) -> int:
    """Peak bytes ``quantized_linear`` allocates beyond its output, for any of the projections
    ``shapes`` over at most ``max_tokens`` tokens (0 when nothing is quantized).

    A chunk of rows in float32 (where the values are scaled) and in the model dtype, the
    chunk's integers unpacked to uint8, and, when the weight takes more than one
    chunk, the chunk's product before it is copied into the output.
    """
    peak = 0
    for scheme, rows, cols in shapes.values():
        if scheme.kernel == FUSED:
            continue  # the kernels keep their tiles in registers
        chunk = min(rows, scheme.chunk_rows)
        weight = chunk * cols * (4 + dtype.itemsize + 1)
        product = max_tokens * chunk * dtype.itemsize if chunk < rows else 0
        peak = max(peak, weight + product)
    return peak


def describe(shapes: dict[str, QuantizedShape], fmt: WeightFormat) -> str:
    """The format and its group sizes, and why, for the plan:
    ``int4, group size 128 for wo, w_down; 64 for wqkv, w_gate_up (128 does not divide 576)``."""
    if fmt.format == INT8:
        how = "int8, one scale per output channel"
    else:
        by_group: dict[int, list[tuple[str, int]]] = {}
        for name, shape in shapes.items():
            by_group.setdefault(shape.scheme.group_size, []).append((name, shape.cols))
        sizes = []
        for group, members in sorted(by_group.items(), reverse=True):
            which = "" if len(by_group) == 1 else " for " + ", ".join(name for name, _ in members)
            dims = ", ".join(str(c) for c in sorted({c for _, c in members}))
            chosen = fmt.group_size or group == DEFAULT_GROUP_SIZE
            why = "" if chosen else f" ({DEFAULT_GROUP_SIZE} does not divide {dims})"
            sizes.append(f"{group}{which}{why}")
        how = "int4, group size " + "; ".join(sizes)
    return how
