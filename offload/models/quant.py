"""Compressed weights: the int8 and int4 formats of a decoder layer's linear weights.

Weight-only quantization: the matrices of q, k, v, o, gate, up and down are
stored as small integers plus scales; norms, biases, the embedding and the LM
head stay in the model dtype. Each quantized weight is a few *parts*, named
shapes in the block layout like any other tensor, so a compressed block is
still one flat buffer of bytes that the pool, the planner and the copy rings
move without knowing what it holds. For a weight of ``rows`` output channels
and ``cols`` input columns (this rank's shard), with groups of ``g`` columns:

    format  part     dtype        shape              holds
    int8    data     int8         [rows, cols]       round(w / scale), in [-127, 127]
            scale    model dtype  [rows]             max |w| of the row / 127
    int4    data     uint8        [rows, cols / 2]   q in [0, 15]: column 2j in the low 4 bits, 2j+1 in the high
            scale    model dtype  [rows, cols / g]   (max - min) of the group / 15
            minimum  model dtype  [rows, cols / g]   the group's smallest weight

    int8: w ~ data * scale        int4: w ~ q * scale + minimum

Every part has one row per output channel, so the parts of q, k and v (and of
gate and up) are stored back to back and seen as one fused projection, as the
dense layout does with the matrices themselves.

int4 groups run along the input dimension, 128 columns unless ``group_size``
says otherwise. Where 128 does not divide a weight's input dimension (576 = 64 x 9),
that weight takes the largest smaller power of two that does; a group size
the user gave must divide every input dimension. Under tensor parallelism the
input dimension is the rank's shard (o and down are split along it), so a
group never straddles two ranks.

Compute: ``quantized_linear`` dequantizes the weight's output rows in chunks
into the model dtype and multiplies: at most ``chunk_rows`` rows exist in the
model dtype at a time, and ``scratch_bytes`` is what the planner reserves for
it. ``choose_kernel`` is the one place that picks how a quantized projection
computes on a device (see there for adding a fused kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import InputError

INT8, INT4 = "int8", "int4"
FORMATS = (INT8, INT4)
DEFAULT_GROUP_SIZE = 128
DEQUANTIZE = "dequantize"  # the kernel: dequantize a chunk of rows, then a dense matrix product
DEQUANT_CHUNK_BYTES = 64 * 2**20  # rows dequantized at a time hold at most this many bytes (or one row)
QUANTIZE_CHUNK_ELEMENTS = 1 << 22  # loading quantizes this many weights at a time on the compute device

# The parts of each format: (name, dtype or None for the model dtype, shape from rows, cols, group size).
PARTS = {
    INT8: (
        ("data", torch.int8, lambda rows, cols, group: (rows, cols)),
        ("scale", None, lambda rows, cols, group: (rows,)),
    ),
    INT4: (
        ("data", torch.uint8, lambda rows, cols, group: (rows, cols // 2)),
        ("scale", None, lambda rows, cols, group: (rows, cols // group)),
        ("minimum", None, lambda rows, cols, group: (rows, cols // group)),
    ),
}


@dataclass(frozen=True)
class QuantScheme:
    """How one weight (or fused projection) is stored and computed."""

    format: str  # "int8" or "int4"
    group_size: int | None  # int4: input columns per scale and minimum; int8: None (one scale per row)
    chunk_rows: int  # output rows dequantized at a time
    kernel: str = DEQUANTIZE


@dataclass(frozen=True)
class WeightFormat:
    """What the user asked for: a format, and for int4 a group size (None: the default rule)."""

    format: str
    group_size: int | None = None
    kernel: str = DEQUANTIZE
    chunk_bytes: int = DEQUANT_CHUNK_BYTES


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
    def dtype(self) -> torch.dtype:
        return self.scale.dtype


# ----------------------------------------------------------------------------- choices


def check_request(quantize, group_size) -> None:
    """Refuse a format this module does not have, or a group size that cannot be used."""
    if quantize is not None and quantize not in FORMATS:
        raise InputError(f"unsupported quantize {quantize!r}; use int8 or int4 (or none)")
    if group_size is None:
        return
    if quantize != INT4:
        why = "int8 has one scale per output channel" if quantize == INT8 else "nothing is quantized"
        raise InputError(f"a group size ({group_size!r}) is for int4 quantization; {why}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
        raise InputError(f"group_size must be an even positive integer (two 4-bit values share a byte), "
                         f"got {group_size!r}")


def choose_kernel(format: str, device: torch.device) -> str:
    """How quantized projections compute on ``device``: the one place to change that choice.

    Today every device dequantizes a chunk of rows and multiplies (``DEQUANTIZE``): on a
    GPU the step is bound by its links, and dequantizing a streamed layer overlaps the
    copy of the next. A fused kernel goes in here after measuring: add it to
    ``quantized_linear`` and ``scratch_bytes`` and return its name for the device. The
    int8 parts are already what ``torch._weight_int8pack_mm`` takes (int8 ``[rows, cols]``
    and one scale per row in the activations' dtype); its CPU kernel crashes on input
    dimensions that are not a multiple of 8 (torch 2.13), so a guard belongs with it.
    ``torch._weight_int4pack_mm`` needs its own packed layout, made on the device by
    ``torch._convert_weight_to_int4pack``, and scales and zeros as ``[groups, rows, 2]``:
    that would be a third format in ``PARTS``, packed at load time on the compute device.
    """
    return DEQUANTIZE


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
               name: str) -> QuantScheme:
    """How a weight of ``cols`` input columns on this rank is stored in ``fmt``."""
    group = group_size_for(cols, full_cols, ranks, fmt.group_size, name) if fmt.format == INT4 else None
    chunk_rows = max(1, fmt.chunk_bytes // (cols * dtype.itemsize))
    return QuantScheme(fmt.format, group, chunk_rows, fmt.kernel)


def part_shapes(scheme: QuantScheme, rows: int, cols: int, dtype: torch.dtype):
    """The parts of a ``[rows, cols]`` weight stored in ``scheme``: (part name, shape, dtype)."""
    return [(part, shape(rows, cols, scheme.group_size), part_dtype or dtype)
            for part, part_dtype, shape in PARTS[scheme.format]]


# ----------------------------------------------------------------------------- quantizing


def quantize(w: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The parts of ``w`` (``[rows, cols]``, any float dtype) in ``scheme``, scales in ``dtype``.

    Scales are rounded to ``dtype`` before the integers are computed from them, so the
    stored parts reproduce ``w`` to half a step (and ``dtype``'s own rounding).
    """
    w = w.float()
    if scheme.format == INT8:
        return _quantize_int8(w, dtype)
    return _quantize_int4(w, scheme.group_size, dtype)


def _quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    scale = (w.abs().amax(dim=1) / 127).to(dtype)
    q = w / _nonzero(scale)[:, None]
    return {"data": q.round_().clamp_(-127, 127).to(torch.int8), "scale": scale}


def _quantize_int4(w: torch.Tensor, group: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    rows, cols = w.shape
    grouped = w.view(rows, cols // group, group)
    minimum = grouped.amin(dim=-1).to(dtype)
    scale = ((grouped.amax(dim=-1) - minimum.float()) / 15).to(dtype)
    q = (grouped - minimum.float()[..., None]).div_(_nonzero(scale)[..., None])
    q = q.round_().clamp_(0, 15).to(torch.uint8).view(rows, cols)
    return {"data": q[:, 0::2] | (q[:, 1::2] << 4), "scale": scale, "minimum": minimum}


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


def dequantize(w: QuantizedWeight, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """Rows ``[lo, hi)`` of the weight, ``[hi - lo, cols]`` in the model dtype."""
    hi = w.rows if hi is None else hi
    if w.scheme.format == INT8:
        return w.data[lo:hi].to(w.dtype).mul_(w.scale[lo:hi, None])
    data, group = w.data[lo:hi], w.scheme.group_size
    out = torch.empty(hi - lo, data.shape[1], 2, dtype=w.dtype, device=data.device)
    out[..., 0] = data & 15  # one uint8 temporary of half the chunk at a time
    out[..., 1] = data >> 4
    grouped = out.view(hi - lo, -1, group)
    grouped.mul_(w.scale[lo:hi, :, None]).add_(w.minimum[lo:hi, :, None])
    return out.view(hi - lo, -1)


def quantized_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the weight ``W`` that ``w`` stores, dequantized ``chunk_rows`` rows at a time."""
    chunk = w.scheme.chunk_rows
    if chunk >= w.rows:
        return F.linear(x, dequantize(w), bias)
    out = x.new_empty(*x.shape[:-1], w.rows)
    for lo in range(0, w.rows, chunk):
        hi = min(lo + chunk, w.rows)
        out[..., lo:hi] = F.linear(x, dequantize(w, lo, hi), None if bias is None else bias[lo:hi])
    return out


def scratch_bytes(shapes: dict[str, QuantizedShape], dtype: torch.dtype, max_tokens: int) -> int:
    """Peak bytes ``quantized_linear`` allocates beyond its output, for any of the projections
    ``shapes`` over at most ``max_tokens`` tokens (0 when nothing is quantized).

    A chunk of rows in the model dtype (int4: twice that, as a GPU's graph pool was seen to hold: each half
    of the unpacked values passes through a uint8 and a cast temporary on its way into the
    strided chunk) and, when the weight takes more than one chunk, the chunk's product
    before it is copied into the output.
    """
    peak = 0
    for scheme, rows, cols in shapes.values():
        chunk = min(rows, scheme.chunk_rows)
        weight = chunk * cols * dtype.itemsize * (2 if scheme.format == INT4 else 1)
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
