"""GGUF's tensor types as offload's parts (integers, scales, minimums), without requantizing.

The block types llama.cpp files are made of map onto offload's two formats, values and
scales carried over as they are. For a weight of ``R`` output rows and ``C`` input columns
(Hugging Face orientation) stored in groups of ``g`` columns:

    GGUF    offload  g   data                         scale        minimum      weight
    Q4_0    int4     32  uint8 [R, C/2], q in 0..15   d            -8 d         q*scale + minimum
    Q4_1    int4     32                               d            m
    Q4_K    int4     32                               d * sc       -dmin * m    (sc, m: the 6-bit values of
    Q3_K    int4     16  q in 0..7                    d * sc       -4 d * sc     each sub-block; Q3_K's sc
    Q2_K    int4     16  q in 0..3                    d * sc       -dmin * m     is signed, Q2_K's 4-bit)
    Q8_0    int8     32  int8 [R, C], q in -128..127  d            -             q*scale
    Q5_0    int8     32  int8, q - 16 in -16..15      d            -
    Q5_1    int8     32  int8, q in 0..31             d            m            q*scale + minimum
    Q5_K    int8     32  int8, q in 0..31             d * sc       -dmin * m
    Q6_K    int8     16  int8, q - 32 in -32..31      d * sc       -            q*scale
    IQ4_NL  int8     32  int8, table[q]               d            -            (table: 16 values of -127..113,
    IQ4_XS  int8     32                               d * (sc-32)  -             its 4-bit q their indices)

Three-bit and two-bit values take int4's four (Q3_K's q: its two low bits and its ``hmask`` bit, GGUF's value
``q - 4``), five-bit ones int8's eight: more bytes than the file's (Q3_K 6 bits a weight with its float16
scales and minimums against 3.44, Q2_K 6 against 2.63) but a quarter of bfloat16's, where they were dequantized.
IQ4_NL and IQ4_XS store 4-bit indices into a table of 16 int8 values: the values they index are kept as int8.

int4 packs, within each group, column j in the low 4 bits of byte j and column j + g/2 in the
high 4 bits: GGUF's own order for Q4_0 and Q4_1, whose bytes are taken as they are; Q4_K's
bytes hold two sub-blocks, one in the low nibbles and one in the high: shuffled byte-wise.

Scale rounding. GGUF stores ``d`` and ``dmin`` as float16 and the sub-block values ``sc``
and ``m`` as 6-bit (Q4_K, Q5_K) or 8-bit signed (Q6_K) integers; the products are formed in
float32, where they are exact (at most 18 significant bits), then rounded once to
``scale_dtype``:

* float32 holds every scale and minimum exactly: dequantizing the parts gives the ``gguf``
  package's ``dequantize`` bit for bit (Q4_0 and Q3_K: the same numbers, but their zeros are +0.0
  where gguf's ``d * (q - 8)`` or ``d sc (q - 4)`` gives -0.0 for a negative scale).
* float16 (the default) holds Q4_0's, Q4_1's, Q5_0's, Q5_1's and Q8_0's exactly (``d``, ``m`` and
  ``-8 d`` are float16 values; ``-8 d`` overflows only for ``|d| > 8191``, which is refused), but
  not the K-quants' products ``d * sc`` (up to 17-18 significant bits): those are rounded to
  float16's 11, a relative error of at most 2^-11 on a group's scale and minimum.
* bfloat16 keeps 8 significant bits: even ``d`` is rounded (relative error up to 2^-8).

``PartsFormat.exact_scale_dtype`` names the narrowest dtype that is exact for each type. A scale or
minimum that is not finite in ``scale_dtype`` (a corrupt file, or an overflow) raises
CheckpointError.

Any other type (IQ1-IQ3, TQ*, MXFP4...: codebooks of grids, ternary or floating-point values) has no compressed form
here:
``dense_tensor`` dequantizes it with the ``gguf`` package and warns (once a kind of tensor and
type: ``model.layers.*.mlp.experts.*.up_proj.weight``; the weight is then stored in the model
dtype, at its precision); a type the ``gguf`` package
cannot dequantize either is refused with one line.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CheckpointError, OffloadWarning
from ..models.quant import unpack_int4
from .reader import gguf_package

INT4, INT8 = "int4", "int8"  # offload.models.quant's format names
QK_K = 256  # values per K-quant super-block


@dataclass(frozen=True)
class PartsFormat:
    """How a GGUF type is kept compressed: offload's format, its group size, and whether it has minimums."""

    format: str  # "int4" or "int8"
    group_size: int
    minimum: bool
    exact_scale_dtype: torch.dtype  # the narrowest dtype that holds its scales and minimums exactly


def _formats() -> dict[int, PartsFormat]:
    T = gguf_package().GGMLQuantizationType
    return {
        T.Q4_0: PartsFormat(INT4, 32, True, torch.float16),
        T.Q4_1: PartsFormat(INT4, 32, True, torch.float16),
        T.Q4_K: PartsFormat(INT4, 32, True, torch.float32),
        T.Q3_K: PartsFormat(INT4, 16, True, torch.float32),
        T.Q2_K: PartsFormat(INT4, 16, True, torch.float32),
        T.Q8_0: PartsFormat(INT8, 32, False, torch.float16),
        T.Q5_0: PartsFormat(INT8, 32, False, torch.float16),
        T.Q5_1: PartsFormat(INT8, 32, True, torch.float16),
        T.Q5_K: PartsFormat(INT8, 32, True, torch.float32),
        T.Q6_K: PartsFormat(INT8, 16, False, torch.float32),
        T.IQ4_NL: PartsFormat(INT8, 32, False, torch.float16),
        T.IQ4_XS: PartsFormat(INT8, 32, False, torch.float32),
    }


def parts_format(ggml_type) -> PartsFormat | None:
    """The compressed form of ``ggml_type``, or None when it has none (float types and the rest)."""
    return _formats().get(int(ggml_type))


def type_name(ggml_type) -> str:
    return gguf_package().GGMLQuantizationType(int(ggml_type)).name


def is_float_type(ggml_type) -> bool:
    T = gguf_package().GGMLQuantizationType
    return int(ggml_type) in (T.F32, T.F16, T.BF16)


# ----------------------------------------------------------------------------- bytes in


def as_bytes(raw, ggml_type, shape: tuple[int, ...]) -> torch.Tensor:
    """``raw`` (a numpy array or memory-mapped view, or a torch tensor on any device) as uint8
    ``[rows, bytes per row]`` for a tensor of ``shape`` (``[rows, cols]``, or ``[cols]``) in ``ggml_type``.

    A numpy view is copied once into a tensor of its own: only those bytes are read from the file.
    """
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    block, type_size = gguf_package().GGML_QUANT_SIZES[gguf_package().GGMLQuantizationType(int(ggml_type))]
    if cols % block:
        raise CheckpointError(f"{type_name(ggml_type)} stores rows in blocks of {block} values; "
                              f"a row of {cols} does not split into them")
    if isinstance(raw, torch.Tensor):
        data = raw.contiguous().view(torch.uint8)
    else:
        data = torch.from_numpy(np.array(raw, copy=True, order="C").view(np.uint8))
    row_bytes = cols // block * type_size
    if data.numel() != rows * row_bytes:
        raise CheckpointError(f"{type_name(ggml_type)} tensor of shape {list(shape)} needs {rows * row_bytes} bytes, "
                              f"got {data.numel()}")
    return data.reshape(rows, row_bytes)


def _blocks(data: torch.Tensor, ggml_type) -> torch.Tensor:
    _, type_size = gguf_package().GGML_QUANT_SIZES[gguf_package().GGMLQuantizationType(int(ggml_type))]
    return data.reshape(-1, type_size)


def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte ``at`` of each block, as float32 ``[blocks, 1]``."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


# ----------------------------------------------------------------------------- GGUF blocks -> values
#
# Each decoder takes a tensor's blocks (uint8 [blocks, bytes per block]) and returns (values, scale,
# minimum) per block: int4 types their values already packed two to a byte in column order (uint8
# [blocks, values / 2]), int8 types one int8 per value; scale and minimum float32 [blocks, groups].


def _split_subblocks(qs: torch.Tensor) -> torch.Tensor:
    """Bytes ``[..., 32]`` holding sub-block A in their low nibbles and sub-block B in their high ones (Q4_K's
    order) as A's 16 bytes then B's, each in offload's order (byte j: value j low, value j + 16 high).
    Works on the bytes, never unpacking."""
    first, second = qs[..., :16], qs[..., 16:]
    return torch.cat([(first & 15) | (second << 4), (first >> 4) | (second & 0xF0)], dim=-1)


def _q4_0(b):
    d = _half(b, 0)
    return b[:, 2:18], d, -8 * d  # w = d * (q - 8); GGUF's nibble order is offload's


def _q4_1(b):
    return b[:, 4:20], _half(b, 0), _half(b, 2)


def _q8_0(b):
    return b[:, 2:34].contiguous().view(torch.int8), _half(b, 0), None


def _five_bits(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0's and Q5_1's 32 values (0..31) as int8: the low 4 bits as Q4_0's nibbles (value j low in byte j, j + 16
    high), the fifth bit j of the little-endian word ``qh``."""
    low = torch.cat([qs & 15, qs >> 4], dim=1)
    high = torch.stack([(qh >> i) & 1 for i in range(8)], dim=2).reshape(-1, 32)
    return (low | (high << 4)).view(torch.int8)


def _q5_0(b):
    return _five_bits(b[:, 2:6], b[:, 6:22]) - 16, _half(b, 0), None  # w = d * (q - 16)


def _q5_1(b):
    return _five_bits(b[:, 4:8], b[:, 8:24]), _half(b, 0), _half(b, 2)


def _two_bits(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K's and Q3_K's low two bits of 256 values: each 32 bytes hold four runs of 32 values, bits 0-1 first."""
    return torch.stack([(qs.reshape(-1, 2, 32) >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(-1, QK_K)


def _int4_groups_of_16(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 ``[blocks, 256]`` packed as int4 in groups of 16: byte j of a group holds its value j low and
    j + 8 high."""
    q = q.reshape(-1, QK_K // 16, 2, 8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, QK_K // 2)


def _q2_k(b):
    """16 sub-blocks of 16 values: a byte each of scale (low 4 bits) and minimum (high 4)."""
    scales, d, dmin = b[:, :16], _half(b, 80), _half(b, 82)
    return _int4_groups_of_16(_two_bits(b[:, 16:80])), d * (scales & 15).float(), -(dmin * (scales >> 4).float())


def _q3_k(b):
    """Two low bits as Q2_K's and a third in ``hmask`` (bit i of byte j: value 32 i + j), set where GGUF's value
    ``q - 4`` is not offset (q = the bits, 0..7); 16 signed 6-bit scales packed in 12 bytes."""
    hmask, scales, d = b[:, :32], b[:, 96:108], _half(b, 108)
    high = torch.stack([(hmask >> i) & 1 for i in range(8)], dim=1).reshape(-1, QK_K)
    q = _two_bits(b[:, 32:96]) | (high << 2)
    low = torch.stack([scales[:, :8] & 15, scales[:, :8] >> 4], dim=1).reshape(-1, 16)
    top = torch.stack([(scales[:, 8:12] >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(-1, 16)
    dl = d * ((low | (top << 4)).view(torch.int8) - 32).float()
    return _int4_groups_of_16(q), dl, -4 * dl


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and minimums of a Q4_K/Q5_K super-block, packed in 12 bytes
    (``gguf.quants.Q4_K.get_scale_min``)."""
    s = scales.contiguous().reshape(-1, 3, 4)  # a small copy: ops on narrow strided columns are slow
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return sc.float(), mn.float()


def _q4_k(b):
    """128 bytes of values: each 32 bytes hold two 32-value sub-blocks, the first in the low nibbles."""
    sc, m = _k_scale_min(b[:, 4:16])
    d, dmin = _half(b, 0), _half(b, 2)
    return _split_subblocks(b[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 128), d * sc, -(dmin * m)


def _q5_k(b):
    """Q4_K's low 4 bits, and a fifth bit per value: bit i of byte j is value j of sub-block i."""
    sc, m = _k_scale_min(b[:, 4:16])
    d, dmin = _half(b, 0), _half(b, 2)
    qs = b[:, 48:176].reshape(-1, 4, 32)
    low = torch.stack([qs & 15, qs >> 4], dim=2).reshape(-1, QK_K)
    qh = b[:, 16:48]
    high = torch.stack([(qh >> i) & 1 for i in range(8)], dim=1).reshape(-1, QK_K)
    return (low | (high << 4)).view(torch.int8), d * sc, -(dmin * m)


def _q6_k(b):
    """Per 128 values: 64 bytes of low 4 bits (low nibbles first) and 32 bytes of high 2 bits (four per
    byte, lowest first); 16 int8 scales of 16 values each."""
    ql = b[:, :128].reshape(-1, 2, 64)
    low = torch.stack([ql & 15, ql >> 4], dim=2).reshape(-1, QK_K)
    qh = b[:, 128:192].reshape(-1, 2, 32)
    high = torch.stack([qh & 3, (qh >> 2) & 3, (qh >> 4) & 3, qh >> 6], dim=2).reshape(-1, QK_K)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    return (low | (high << 4)).view(torch.int8) - 32, _half(b, 208) * sc, None


def _iq4_values(qs: torch.Tensor) -> torch.Tensor:
    """IQ4's int8 values of bytes ``[..., 16]`` of 4-bit indices (value j in byte j's low nibble, j + 16 in its
    high one) into its table: ``[..., 32]``."""
    table = torch.tensor(gguf_package().quants.IQ4_NL.kvalues, dtype=torch.int8, device=qs.device)
    return table[torch.cat([qs & 15, qs >> 4], dim=-1).long()]


def _iq4_nl(b):
    return _iq4_values(b[:, 2:18]), _half(b, 0), None


def _iq4_xs(b):
    """Eight sub-blocks of 32: their 6-bit scales in 4 bits (``scales_l``, two a byte) and 2 (``scales_h``, a
    little-endian word), minus 32."""
    low = torch.stack([b[:, 4:8] & 15, b[:, 4:8] >> 4], dim=2).reshape(-1, 8)
    high = torch.stack([(b[:, 2:4] >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(-1, 8)
    sc = (low | (high << 4)).float() - 32
    return _iq4_values(b[:, 8:136].reshape(-1, 8, 16)).reshape(-1, QK_K), _half(b, 0) * sc, None


def _decoders() -> dict:
    T = gguf_package().GGMLQuantizationType
    return {T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q4_K: _q4_k, T.Q3_K: _q3_k, T.Q2_K: _q2_k, T.Q8_0: _q8_0, T.Q5_0: _q5_0,
            T.Q5_1: _q5_1, T.Q5_K: _q5_k, T.Q6_K: _q6_k, T.IQ4_NL: _iq4_nl, T.IQ4_XS: _iq4_xs}


# ----------------------------------------------------------------------------- the public conversions


def gguf_tensor_to_parts(raw, ggml_type, shape: tuple[int, int], scale_dtype: torch.dtype = torch.float16,
                         name: str = "tensor") -> dict[str, torch.Tensor]:
    """The parts of a ``[rows, cols]`` weight stored in ``ggml_type`` (a type of the module's table, or some of
    its rows: the bytes of whole rows), on the device ``raw`` is on.

    Returns ``{"data", "scale"}`` plus ``"minimum"`` where the format has one (see the module's
    table); scales and minimums in ``scale_dtype``, rounded once from their exact float32 values.
    """
    fmt = parts_format(ggml_type)
    if fmt is None:
        raise CheckpointError(f"{name}: {type_name(ggml_type)} has no compressed form in offload "
                              "(read it with dense_tensor)")
    if len(shape) != 2:
        raise CheckpointError(f"{name}: only a matrix is kept compressed, got shape {list(shape)}")
    rows, cols = shape
    values, scale, minimum = _decoders()[int(ggml_type)](_blocks(as_bytes(raw, ggml_type, shape), ggml_type))
    parts = {"data": values.reshape(rows, -1), "scale": _rounded(scale, scale_dtype, rows, name, "scale")}
    if minimum is not None:
        parts["minimum"] = _rounded(minimum, scale_dtype, rows, name, "minimum")
    return parts


def _rounded(values: torch.Tensor, dtype: torch.dtype, rows: int, name: str, what: str) -> torch.Tensor:
    """``values`` (exact float32) rounded once to ``dtype``; non-finite ones, or ones beyond ``dtype``'s range
    (checked in float32, where the check is cheap), raise CheckpointError."""
    finite = bool(torch.isfinite(values).all())
    if not finite or (values.numel() and float(values.abs().max()) > torch.finfo(dtype).max):
        raise CheckpointError(f"{name}: a {what} is not finite in {str(dtype).removeprefix('torch.')} "
                              "(a corrupt file, or a value beyond the dtype's range: use a wider scale dtype)")
    return values.to(dtype).reshape(rows, -1)


def dequantize_parts(parts: dict[str, torch.Tensor], format: str | PartsFormat) -> torch.Tensor:
    """The float32 ``[rows, cols]`` weight that ``parts`` hold: ``q * scale (+ minimum)`` per group, in
    that order of operations (a product, then a sum), as the ``gguf`` package computes it."""
    format = format.format if isinstance(format, PartsFormat) else format
    data, groups = parts["data"], parts["scale"].shape[1]
    if format == INT4:
        q = unpack_int4(data, data.shape[1] * 2 // groups).reshape(data.shape[0], -1)
    else:
        q = data
    rows, cols = q.shape
    w = q.float().reshape(rows, groups, cols // groups) * parts["scale"].float()[..., None]
    if parts.get("minimum") is not None:
        w = w + parts["minimum"].float()[..., None]
    return w.reshape(rows, cols)


def dense_tensor(raw, ggml_type, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 name: str = "tensor", warn: bool = True) -> torch.Tensor:
    """The values of a tensor (or some of its rows) of any type, in ``dtype``.

    F32, F16 and BF16 are exact in float32; the types ``parts_format`` knows are dequantized
    through their parts (bit for bit the ``gguf`` package's values in float32); any other type
    goes through the ``gguf`` package's ``dequantize``, with a warning (unless not ``warn``) naming the tensor
    and the precision it keeps in ``dtype``. Either way the result is then rounded once to ``dtype``.
    """
    gguf = gguf_package()
    T = gguf.GGMLQuantizationType
    kind = T(int(ggml_type))
    data = as_bytes(raw, ggml_type, shape)
    if kind in (T.F32, T.F16, T.BF16):
        source = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[kind]
        return data.view(source).reshape(shape).to(dtype)
    fmt = parts_format(kind)
    if fmt is not None and len(shape) == 2:
        parts = gguf_tensor_to_parts(data, kind, shape, torch.float32, name)
        return dequantize_parts(parts, fmt).to(dtype)
    try:
        with np.errstate(all="ignore"):  # a corrupt block's overflow: the finiteness check names the tensor
            values = gguf.quants.dequantize(data.cpu().numpy(), kind)
    except NotImplementedError:
        raise CheckpointError(f"{name}: tensor type {kind.name} cannot be read (neither offload nor the gguf "
                              "package dequantizes it)") from None
    if warn:
        warnings.warn(f"{name}: {kind.name} has no compressed form in offload; dequantized and stored in "
                      f"{str(dtype).removeprefix('torch.')} ({_precision(dtype)})", OffloadWarning, stacklevel=2)
    return torch.from_numpy(values).reshape(shape).to(device=data.device, dtype=dtype)


def _precision(dtype: torch.dtype) -> str:
    bits = {torch.float32: None, torch.float16: 11, torch.bfloat16: 8}.get(dtype)
    if bits is None:
        return "its values exactly"
    return f"each value rounded to {bits} significant bits"
