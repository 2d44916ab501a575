"""Triton kernels that multiply straight from compressed weights: int4 and int8, per channel or in groups.

A compressed projection is its parts (``quant.py``): integers ``[rows, cols]`` (int4:
two per byte, a group's two halves in the two nibbles), scales and, for int4 (and some GGUF
formats), minimums ``[rows, groups]``. These kernels read the parts where they lie (a
resident block or a slot) and never write a dequantized copy: each program turns the
tile it is about to use into numbers in registers. So a compressed layer costs its
compressed bytes of HBM traffic, resident or streamed.

* **A few rows** (decode, ``gemv_rows`` or fewer): ``_gemv_kernel``. A program owns
  ``BLOCK_N`` output features of one row of ``x`` and a stretch of their input columns
  (``SPLITS`` stretches per row, summed in a fixed order, so that enough programs keep
  enough bytes in flight while the result stays the same bits every time: no atomic
  additions). The last program of a tile to finish sums the stretches (``_last_sums``):
  one kernel a product, the same bits as ``_sum_splits_kernel``, which sums them where
  ``kernels.LAST_SUMS`` is off. Its tiles are ``[BLOCK_N, groups, group]``, made by
  pointer arithmetic (no reshapes); per group it computes
  ``scale * sum(q * x) + minimum * sum(x)``, so the weights themselves are never
  formed: per weight, an unpack, an integer-to-float conversion done as a float
  subtraction (the integer written into the mantissa of 2^23) and a multiply-add.
  ``_gemv_words_kernel`` computes the same sums from 32-bit words, each field turned into
  a float where it lies in the word (no unpacking): fewer instructions a weight (int4: less
  than half). It is int4's GEMV where it takes the weight (``words_take``), int8's where its
  products are integers, and, where ``WORD_GEMV`` turns it on, int8's every GEMV and int4's
  product of up to 16 rows (``_matmul_kernel``'s WORDS), which reads its groups the same way.
  For int4 in groups of 128 or more, and int8 per channel in rows of whole 2048-column tiles
  (``ints_chosen``), the word GEMV's products are integers (``_integer_sums``): each group's
  inputs in 16-bit fixed point, four products of a field and a byte a ``dp4a``.
* **More rows** (prefill chunks, batched decode): ``_matmul_kernel``, tiles of
  ``[BLOCK_M, group] x [group, BLOCK_N]`` (or 64 columns for int8 per channel), each
  weight tile dequantized in float32, rounded once to the activations' dtype (as
  ``quant.dequantize`` rounds) and multiplied on the tensor cores; int4's low and high
  nibbles (a group's first and second halves) are two products against the two halves of
  the group's columns of ``x``, each a contiguous load.
* **3 to 16 rows on the tensor cores** (by default int4 in groups of 128 or more on large
  weights, ``dot_chooses``): ``_dot_gemv_kernel``. The weights are the left operand (64
  features a program fill the MMA's rows; ``x``'s few rows are its columns), each pair of
  bytes made four exact 16-bit numbers ``OFFSET + v`` by inline PTX, a group's sums scaled
  in float32 after its products; its loads are pipelined by Triton.

Every blocking is fixed by the shapes alone (no timing), so two models compute the same
bits. Which projections use them is decided when the model is laid out
(``quant.scheme_for``: ``kernel == FUSED`` for int8 per channel and groups of a power
of two of at least 16), on models whose ops are offload's kernels (``ops.choose``).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .. import switches
from . import kernels
from .kernels import DTYPES, Norm, dependent_launch, gate_code, norm_args, tile_counters, triton
from .quant import FUSED, INT4, QuantizedWeight

if triton is not None:
    import triton.language as tl

    from .kernels import finish_product, gemv_input, inverse_rms, prefetch, wait_for_inputs

    def _nibbles_ptx(low: int, high: int):
        """Two bytes (packed in a word's low half) as four 16-bit numbers: ``prmt`` spreads the bytes into the
        word's two halves; ``(t & 0x000F000F) | low`` (lop3 0xEA) makes the low fields' two numbers, and after a
        shift ``(t & 0x000F000F) ^ high`` (lop3 0x6A) the high fields' (``high`` has bit 3 set where a signed
        byte's top bit is to be flipped)."""
        return tl.constexpr(f"{{ .reg .b32 t; prmt.b32 t, $2, 0, 0x5140; lop3.b32 $0, t, 0x000F000F, {low:#010x}, "
                            f"0xEA; shr.b32 t, t, 4; lop3.b32 $1, t, 0x000F000F, {high:#010x}, 0x6A; }}")

    _NIBBLES_PTX_BF16 = _nibbles_ptx(0x43004300, 0x43004300)
    _NIBBLES_PTX_BF16_SIGNED = _nibbles_ptx(0x43004300, 0x43084308)
    _NIBBLES_PTX_F16 = _nibbles_ptx(0x64006400, 0x64006400)
    _NIBBLES_PTX_F16_SIGNED = _nibbles_ptx(0x64006400, 0x64086408)

GEMV_ROWS = 2  # up to this many rows of x: the GEMV kernel (each row's programs read the weight: twice from HBM)
# A word GEMV of fewer tiles of 128 x 256 than this takes tiles of 32 x 128: more programs, each done sooner. On an
# H200 (2026-12-06) a decode step of SmolLM2-135M's shape in int4 (groups of 64: every product 8-72 tiles) took
# 0.77 ms against 0.97 (llama-2-7b's products, 384-1536 tiles, keep theirs).
FEW_TILES = 256
# Such a small weight's GEMV takes up to this many rows: bound by its latency, its bytes stay in L2 for every row's
# programs, and each row's product is the same bits as alone (a draft model's spare rows, ``drafts.py``, draft what
# its rows would). On an H100 (2026-12-06) SmolLM2-135M's shape in int4 decoded 4 rows in 0.96 ms a step against 0.99
# with the tiled product (0.72 for one row: the rest of a row's cost is elsewhere). OFFLOAD_SMALL_GEMV_ROWS=N for N
# (read at import).
SMALL_GEMV_ROWS = switches.integer("OFFLOAD_SMALL_GEMV_ROWS", 4, least=1)
TARGET_PROGRAMS = 1024  # GEMV programs to aim for (about eight per SM of an H100 or H200): bytes in flight
INT_PROGRAMS = 512  # the integer GEMV's (``gemv_blocking``): about four an SM; more stretches were slower
MAGIC = 0x4B000000  # the bits of the float 2^23
# The word kernels: ``_gemv_words_kernel`` for one or two rows, ``_matmul_kernel``'s WORDS for up to 16 rows of
# int4 in groups of 128 or 256. Timed on an H200 (2026-12-05, ``bench_quant_kernels.py --words``, llama-2-7b's four
# products of a layer): int4's GEMV 1.33x faster at one row (groups of 128: 70.8 against 94.0 us) and 1.55x at two,
# and llama-2-7b's resident int4 decode 2.90 against 3.60 ms a step; but int8's GEMV 0.90x and int4's 16-row
# product 0.63x. So by default (None) int4's GEMV reads words, and int8's where its products are integers
# (``ints_chosen``), nothing else; OFFLOAD_WORD_GEMV=1 turns every word kernel on, =0 every one off (read once, at
# import).
WORD_GEMV = switches.choice("OFFLOAD_WORD_GEMV", switches.ON_OFF, None)
# The word GEMV's products in integers (``_integer_sums``: four weights a ``dp4a``), by default (None) where they were
# timed faster (``ints_chosen``); OFFLOAD_INT_GEMV=1 for every word GEMV (int8's GEMV then reads words too), =0 for
# none (read once, at import).
INT_GEMV = switches.choice("OFFLOAD_INT_GEMV", switches.ON_OFF, None)
INT_PTX = True  # their dp4a by inline PTX (False: by Triton's integer operations, as the interpreter computes them)
# The tensor-core product of up to DOT_ROWS rows (``_dot_gemv_kernel``): for every product it takes with
# OFFLOAD_DOT_GEMV=1, for none with =0; by default (None) where it was timed faster (``dot_chooses``).
DOT_ROWS = 16
DOT_WEIGHTS = 1 << 23  # the least weights a product needs for the tensor-core kernel by default
DOT_GEMV = switches.choice("OFFLOAD_DOT_GEMV", switches.ON_OFF, None)
DOT_PROGRAMS = 528  # the tensor-core product's programs to aim for: about four per SM of an H100 or H200
DOT_PTX = switches.choice("OFFLOAD_DOT_PTX", switches.ON_OFF, True)  # its fields made by inline PTX (=0: by Triton's)
# Its 16-bit numbers ``OFFSET + v`` for a 4-bit field ``v``: the field OR-ed into the mantissa of OFFSET, whose
# last place is 1 (bfloat16: 128, 0x4300; float16: 1024, 0x6400). Exact, and no conversion instruction.
DOT_OFFSET = {torch.bfloat16: (128.0, 0x4300), torch.float16: (1024.0, 0x6400)}


def takes(x: torch.Tensor, w: QuantizedWeight) -> bool:
    """Whether the kernels compute ``x @ W.T`` for ``x [..., K]`` (16 bits, the last dimension contiguous)."""
    return w.scheme.kernel == FUSED and x.dtype in DTYPES and x.stride(-1) == 1 and x.device == w.data.device


def linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None, blocking=None, *,
           gate: str | None = None, residual: torch.Tensor | None = None, norm: Norm | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias) (+ residual)`` for the weight ``W`` that ``w``'s parts hold (``blocking``: another kernel
    blocking, for benchmarks/bench_quant_kernels.py's sweep: ``gemv_blocking``'s or ``matmul_blocking``'s items, or
    a ``DotBlocking``: the tensor-core product of up to ``DOT_ROWS`` rows, with a residual but no gate or norm).
    ``gate``, ``residual`` and ``norm`` (up to ``gemv_rows(w)`` rows): ``x`` is a gated MLP's ``[gate | up]``,
    ``residual`` is added to the rounded product, ``x`` is RMS-normalized first, as ``kernels.gemv`` takes them."""
    k, n = w.cols, w.rows
    rows = x.reshape(-1, 2 * k if gate else k)
    m = rows.shape[0]
    if isinstance(blocking, DotBlocking) or (blocking is None and gate is None and norm is None
                                             and dot_chooses(w, m, x.dtype)):
        if gate is not None or norm is not None:
            raise ValueError("the tensor-core product neither gates nor normalizes its input")
        return _dot_linear(rows, w, bias, residual, blocking or dot_blocking(w, m)).view(*x.shape[:-1], n)
    most = gemv_rows(w)
    gemv = m <= most if blocking is None else len(blocking) == 5  # a blocking given names its kernel: the GEMV's
    if (gate is not None or residual is not None or norm is not None) and not (gemv and m <= most):
        raise ValueError(f"a gate, a residual or a norm goes into the GEMV's products of at most {most} rows, "
                         f"not {m}")
    if gate is not None and norm is not None:
        raise ValueError("a product gates its input or normalizes it, not both")
    out = x.new_empty(m, n)
    group = w.scheme.group_size or k
    common = dict(INT4=w.scheme.format == INT4, PER_CHANNEL=w.scheme.group_size is None,
                  HAS_MIN=w.minimum is not None)
    minimum = w.minimum if w.minimum is not None else w.scale
    if gemv:
        block_n, block_k, splits, warps, words = blocking or gemv_blocking(w)
        if words:
            tiles = -(-k // (splits * block_k))
            splits = -(-k // (tiles * block_k))  # no empty stretch
        partial = out if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        counters = tile_counters(x.device, triton.cdiv(n, block_n) * m) if splits > 1 else None
        norm_weight, eps, norm_code = norm_args(norm, out)
        args = (rows, w.data, w.scale, minimum, bias if bias is not None else out,
                residual if residual is not None else out, norm_weight, partial, out,
                counters if counters is not None else out, n, k, rows.stride(0), w.data.stride(0), w.groups, eps)
        final = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, GATE=gate_code(gate),
                     NORM=norm_code, NORM_BLOCK=triton.next_power_of_2(k) if norm else 1, FINAL=splits == 1,
                     LAST=counters is not None, SPLITS=splits, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                     **common, **dependent_launch(x.device))
        if words:
            if not words_take(w):
                raise ValueError("the word GEMV takes int8 per channel or in groups of 16 to 256 columns, or int4 "
                                 "in groups of 32 to 256, in rows of whole 4-byte words")
            ints = ints_chosen(w)
            _gemv_words_kernel[(triton.cdiv(n, block_n), splits, m)](
                *args, tiles, MAGIC, GROUP=block_k if w.scheme.group_size is None else group,
                EVEN=n % block_n == 0 and k % block_k == 0, INTS=ints,
                ASM=ints and INT_PTX and os.environ.get("TRITON_INTERPRET") != "1", **final)
        else:
            _gemv_kernel[(triton.cdiv(n, block_n), splits, m)](
                *args, triton.cdiv(k, splits * block_k) * block_k,
                GROUP=block_k if w.scheme.group_size is None else group, **final)
    else:
        block_m, block_n, block_k, splits, warps, stages, words = blocking or matmul_blocking(w, m)
        if words and not (common["INT4"] and group >= 128 and words_take(w)):
            raise ValueError("the word product takes int4 in groups of 128 or 256, in rows of whole 4-byte words")
        partial = out if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        counters = tile_counters(x.device, triton.cdiv(m, block_m) * triton.cdiv(n, block_n)) if splits > 1 else None
        _matmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)](
            rows, w.data, w.scale, minimum, bias if bias is not None else out, partial, out,
            counters if counters is not None else out, m, n, k, rows.stride(0), w.data.stride(0), w.groups,
            triton.cdiv(k, splits * block_k) * block_k, MAGIC, HAS_BIAS=bias is not None, FINAL=splits == 1,
            LAST=counters is not None, SPLITS=splits, WORDS=words, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, GROUP=block_k if w.scheme.group_size is None else group, num_warps=warps,
            num_stages=stages, **common)
    if splits > 1 and counters is None:
        _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](
            partial, bias if bias is not None else out, residual if residual is not None else out, out, m * n, n,
            SPLITS=splits, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, BLOCK=1024,
            **dependent_launch(x.device))
    return out.view(*x.shape[:-1], n)


def fuses(x: torch.Tensor, w: QuantizedWeight) -> bool:
    """Whether the GEMV takes ``x`` (its rows a few) with a gate, a residual or a norm: ``linear``'s ``gate``
    (``x`` a gated MLP's ``[gate | up]``, ``2 K`` columns), ``residual`` and ``norm``."""
    return takes(x, w) and x.numel() <= gemv_rows(w) * x.shape[-1]


def gemv_rows(w: QuantizedWeight) -> int:
    """The most rows of ``x`` whose product with ``w`` the GEMV computes: ``GEMV_ROWS``, or ``SMALL_GEMV_ROWS`` for a
    weight of fewer than ``FEW_TILES`` tiles of 128 x 256 (each row's programs find its bytes in L2)."""
    small = -(-w.rows // 128) * -(-w.cols // 256) < FEW_TILES
    return max(GEMV_ROWS, SMALL_GEMV_ROWS) if small else GEMV_ROWS


def gemv_gates(w: QuantizedWeight) -> bool:
    """Whether the GEMV should gate a gated MLP's input itself for ``w``: each of its tiles of features gates the
    whole input, cheap where they are few (``kernels.GATING_WORK``)."""
    return -(-w.rows // gemv_blocking(w)[0]) * w.cols <= kernels.GATING_WORK


def gemv_norms(w: QuantizedWeight) -> bool:
    """Whether the GEMV should RMS-normalize its input itself for ``w``: each of its programs reads the whole row
    for the norm (``kernels.NORMING_WORK``)."""
    block_n, _, splits, _, _ = gemv_blocking(w)
    return -(-w.rows // block_n) * splits * w.cols <= kernels.NORMING_WORK and w.cols <= kernels.NORM_COLUMNS


def gemv_blocking(w: QuantizedWeight, words: bool | None = None) -> tuple[int, int, int, int, bool]:
    """(BLOCK_N, BLOCK_K, SPLITS, warps, words) of the GEMV for ``w``: ``_gemv_kernel``'s tiles of 8 features by
    1024 columns (whole groups), and as many stretches of the columns as bring the programs to about
    ``TARGET_PROGRAMS``. With ``words`` (by default: int4, and int8 where its products are integers, unless
    ``WORD_GEMV`` says otherwise), where ``_gemv_words_kernel`` takes ``w``, its tiles of 128 features by 256
    columns, or of 32 by 128 where a weight has fewer than ``FEW_TILES`` of those.

    Integer products (``ints_chosen``) aim at ``INT_PROGRAMS``: int4's take 32 features by 1024 columns on two warps
    where the columns are whole 1024-column tiles, and int8's 16 features by 2048 columns, one stretch. Timed on an
    H100 (2026-12-06, ``bench_quant_kernels.py --ints-sweep``, ``--splits-sweep``), llama-2-7b's one-row products,
    us: int4 qkv 13.4 (two stretches: 14.0), o 6.6 (128 x 256: 7.8), gate_up 22.2 (23.2), down 13.8 (128 x 256 in
    16 stretches; in 32: 16.5); int8 qkv 19.2, o 8.2 and gate_up 31.7 against the byte GEMV's 20.2, 9.0, 33.2."""
    n, k, int4, ints = w.rows, w.cols, w.scheme.format == INT4, ints_chosen(w)
    if words is None:
        words = (int4 or ints) if WORD_GEMV is None else WORD_GEMV
    if words and words_take(w):
        block_n, block_k, warps, programs = 128, 256, 4, TARGET_PROGRAMS
        if -(-n // block_n) * -(-k // block_k) < FEW_TILES:  # a small weight: its latency, not its bytes, bounds it
            block_n, block_k = 32, max(128, w.scheme.group_size or 0)
        elif ints:
            programs = INT_PROGRAMS
            if int4 and k % 1024 == 0:  # rows of whole 1024-column tiles: 32 of them, two warps
                block_n, block_k, warps = 32, 1024, 2
            elif not int4 and k % 2048 == 0:  # 16 rows of 2048 columns: already many programs, one stretch
                block_n, block_k, programs = 16, 2048, 1
        return block_n, block_k, _splits(n, k, block_n, block_k, programs), warps, True
    block_n, block_k = 8, 1024 if w.scheme.group_size is None else max(1024, w.scheme.group_size)
    return block_n, block_k, _splits(n, k, block_n, block_k), 4, False


def ints_chosen(w: QuantizedWeight) -> bool:
    """Whether the word GEMV computes its products in integers for ``w``: with ``INT_GEMV`` on, always; by default,
    int4 in groups of 128 or more, and int8 per channel in rows of whole 2048-column tiles. Timed on an H100
    (2026-12-06, ``bench_quant_kernels.py --ints``): llama-2-7b's four one-row products in int4, groups of 128, took
    61.4 us against 67.8 in floats (its resident decode 2.51 against 2.73 ms a step); in groups of 32, 102.2 against
    93.5 (a group's fixed point and sums cost more than its products save). int8's, in tiles of 16 by 2048 (see
    ``gemv_blocking``), 59.1 us against the byte GEMV's 62.4 for qkv, o and gate_up; its down product (11008
    columns) keeps the byte GEMV."""
    if INT_GEMV is not None:
        return INT_GEMV
    if w.scheme.format == INT4:
        return (w.scheme.group_size or 0) >= 128
    return w.scheme.group_size is None and w.cols % 2048 == 0


def _splits(n: int, k: int, block_n: int, block_k: int, programs: int = TARGET_PROGRAMS) -> int:
    """Stretches of the columns that bring a GEMV's programs to about ``programs``."""
    return min(max(1, -(-k // block_k)), max(1, programs // -(-n // block_n)))


def words_take(w: QuantizedWeight) -> bool:
    """Whether the word kernels take ``w``: rows of whole 4-byte words, and groups of four words to a tile's 256
    columns. (Where ``torch.compile`` traces, which cannot read a pointer, the start is taken to be aligned, as
    every part of a block is: offsets of 256 bytes.)"""
    group, int4 = w.scheme.group_size, w.scheme.format == INT4
    words = w.data.stride(1) == 1 and w.data.stride(0) % 4 == 0 and w.cols % (8 if int4 else 4) == 0
    if words and not torch.compiler.is_compiling():
        words = w.data.data_ptr() % 4 == 0
    if int4:
        return words and group is not None and 32 <= group <= 256
    return words and (group is None or 16 <= group <= 256)


class DotBlocking(NamedTuple):
    """``_dot_gemv_kernel``'s blocking: features a program, columns a step, stretches of the columns (their
    partial sums added by the last program of each tile), warps, pipeline stages, and whether the 4-bit
    fields become 16-bit numbers by inline PTX (two a ``lop3``) or by Triton's operations (the interpreter)."""

    block_n: int
    block_k: int
    splits: int
    warps: int
    stages: int
    asm: bool


def dot_takes(w: QuantizedWeight, dtype: torch.dtype) -> bool:
    """Whether ``_dot_gemv_kernel`` takes ``w`` under inputs of ``dtype``: int4 in groups of 32 to 256, int8 per
    channel or in groups of 16 to 256 (powers of two: ``quant.fused_takes``), whole column steps
    (``dot_blocking``), rows of contiguous bytes."""
    group, k = w.scheme.group_size, w.cols
    if dtype not in DOT_OFFSET or w.data.stride(-1) != 1 or w.scheme.kernel != FUSED:
        return False
    if w.scheme.format == INT4:
        return group is not None and 32 <= group <= 256 and k % group == 0
    return (group is None and k % 16 == 0) or (group is not None and 16 <= group <= 256 and k % group == 0)


def dot_chooses(w: QuantizedWeight, m: int, dtype: torch.dtype) -> bool:
    """Whether a product of ``m`` rows goes to the tensor-core kernel: with ``DOT_GEMV`` on, every one it takes; by
    default, int4 in groups of 128 or more, 3 to 16 rows (the GEMVs keep one or two), weights of at least
    ``DOT_WEIGHTS``. Timed on an H100 (2026-12-06, ``bench_quant_kernels.py --dot``): llama-2-7b's four products in
    int4 (groups of 128) took 78 us at 16 rows against the tiled product's 120 (its decode at batch 16: 3.82
    against 4.91 ms a step), but 80 against the word GEMV's 73 at one row; int8's 112 against 112 at 16 rows;
    groups of 32, 196 against 195; SmolLM2-135M's shape decoded 4 rows 5% slower. bfloat16 only by default: that
    is what ran on a GPU (float16 on the interpreter)."""
    if DOT_GEMV is not None:
        return DOT_GEMV and m <= DOT_ROWS and dot_takes(w, dtype)
    return (gemv_rows(w) < m <= DOT_ROWS and w.scheme.format == INT4 and (w.scheme.group_size or 0) >= 128
            and w.rows * w.cols >= DOT_WEIGHTS and dtype == torch.bfloat16 and dot_takes(w, dtype))


def dot_blocking(w: QuantizedWeight, m: int = 1, block_n: int | None = None, programs: int = DOT_PROGRAMS,
                 stages: int = 3) -> DotBlocking:
    """The tensor-core product's blocking for ``w``: 64 features a program (one warpgroup's MMA; on an H100, the
    best of llama-2-7b's sweep for 7 of 8 products, formats and rows), a column step of 128 columns or of the
    group if larger (per channel: the largest power of two up to 128 that divides the columns), and as many
    stretches of the columns as bring the programs to about ``programs``, each at least ``stages`` steps long where
    the columns allow (the loads of a step are in flight ``stages - 1`` steps ahead)."""
    n, k, group = w.rows, w.cols, w.scheme.group_size
    block_n = block_n or 64
    if group is None:
        block_k = next(b for b in (128, 64, 32, 16) if k % b == 0)
    else:
        block_k = max(group, 128) if k % max(group, 128) == 0 else group
    steps = k // block_k
    splits = max(1, min(-(-programs // -(-n // block_n)), steps // stages))
    splits = -(-steps // -(-steps // splits))  # no empty stretch
    return DotBlocking(block_n, block_k, splits, 4, stages, DOT_PTX and os.environ.get("TRITON_INTERPRET") != "1")


def _dot_linear(rows: torch.Tensor, w: QuantizedWeight, bias, residual, blocking: DotBlocking) -> torch.Tensor:
    """``rows @ W.T (+ bias) (+ residual)`` by ``_dot_gemv_kernel``, ``rows [m <= DOT_ROWS, K]``."""
    if not dot_takes(w, rows.dtype):
        raise ValueError("the tensor-core product takes int4 in groups of 32 to 256 or int8 per channel or in "
                         "groups of 16 to 256, whole column steps, 16-bit inputs")
    m, k, n = rows.shape[0], w.cols, w.rows
    if m > DOT_ROWS:
        raise ValueError(f"the tensor-core product takes up to {DOT_ROWS} rows, not {m}")
    block_n, block_k, splits, warps, stages, asm = blocking
    group = w.scheme.group_size or block_k
    if block_k % group or k % block_k or (w.scheme.format == INT4 and group < 32):
        raise ValueError(f"a column step of {block_k} does not hold whole groups of {group} within {k} columns")
    steps = k // block_k
    tiles = -(-steps // splits)
    splits = -(-steps // tiles)
    out = rows.new_empty(m, n)
    partial = out if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=rows.device)
    counters = tile_counters(rows.device, triton.cdiv(n, block_n)) if splits > 1 else None
    offset, magic = DOT_OFFSET[rows.dtype]
    _dot_gemv_kernel[(triton.cdiv(n, block_n), splits)](
        rows, w.data, w.scale, w.minimum if w.minimum is not None else w.scale, bias if bias is not None else out,
        residual if residual is not None else out, partial, out, counters if counters is not None else out, m, n,
        k, rows.stride(0), w.data.stride(0), w.groups, tiles * block_k, offset,
        GROUP=group, INT4=w.scheme.format == INT4, PER_CHANNEL=w.scheme.group_size is None,
        HAS_MIN=w.minimum is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        FINAL=splits == 1, LAST=counters is not None, SPLITS=splits, ASM=asm, MAGIC=magic,
        FP16=rows.dtype == torch.float16, EVEN=n % block_n == 0, BLOCK_N=block_n, BLOCK_M=8 if m <= 8 else 16,
        BLOCK_K=block_k, num_warps=warps, num_stages=stages, **dependent_launch(rows.device))
    if splits > 1 and counters is None:
        _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](
            partial, bias if bias is not None else out, residual if residual is not None else out, out, m * n, n,
            SPLITS=splits, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, BLOCK=1024,
            **dependent_launch(rows.device))
    return out


def matmul_blocking(w: QuantizedWeight, m: int, words: bool | None = None) -> tuple[int, int, int, int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLITS, warps, stages, words) for ``m`` rows of ``w``: narrow tiles, and
    stretches of the columns summed afterwards, for a few rows (the weights' bytes bound the time: many programs
    keep many in flight), square tiles for many (the tensor cores bound it). A column step is one group (its
    scale is one per feature), two of int4's groups of 16, or 64 columns per channel. With ``words`` (by default
    ``WORD_GEMV``), up to 16 rows of int4 in groups of 128 or 256 are read as words."""
    n, k, group, per_channel = w.rows, w.cols, w.scheme.group_size or w.cols, w.scheme.group_size is None
    block_k = 64 if per_channel else max(group, 32) if w.scheme.format == INT4 else group
    words = ((bool(WORD_GEMV) if words is None else words) and m <= 16 and w.scheme.format == INT4 and group >= 128
             and words_take(w))
    if m <= 16:
        block_m, block_n, warps = 16, 128 if words else 64, 4
    elif m <= 64:
        block_m, block_n, warps = 64, 64, 4
    else:
        block_m, block_n, warps = 128, 128, 4
    tiles = -(-m // block_m) * -(-n // block_n)
    splits = 1 if m > 64 else min(-(-k // block_k), max(1, TARGET_PROGRAMS // 2 // tiles))
    return block_m, block_n, block_k, splits, warps, 3, words


if triton is not None:

    @triton.jit
    def _to_float(q):
        """Non-negative integers below 2^23 as float32, without a conversion instruction (they run at a
        quarter of the FMA rate): the integer OR-ed into the mantissa of 2^23, minus 2^23."""
        return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _int8_to_float(q):
        """int8 as float32 the same way: ``q + 128`` in the mantissa of 2^23, minus 2^23 + 128."""
        return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _gemv_kernel(x_ptr, data_ptr, scale_ptr, min_ptr, bias_ptr, res_ptr, nw_ptr, out_ptr, final_ptr, count_ptr, N,
                     K, s_x, s_data, GROUPS, eps, SPAN, GROUP: tl.constexpr, INT4: tl.constexpr,
                     PER_CHANNEL: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, GATE: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr,
                     FINAL: tl.constexpr, LAST: tl.constexpr, SPLITS, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PDL: tl.constexpr):
        """Features ``[pid0 * BLOCK_N, +BLOCK_N)``, columns ``[pid1 * SPAN, +SPAN)`` of row ``pid2`` of x: the
        output itself (FINAL), or this stretch's float32 partial sums ``out[pid1, pid2, features]`` (LAST: and the
        output ``final``, by the last stretch's program to finish)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rows < N
        _prefetch_tile(data_ptr, rows, n_ok, s_data, tl.program_id(1) * SPAN, K, BLOCK_K, INT4, PDL)
        wait_for_inputs(PDL)
        x_row = x_ptr + tl.program_id(2).to(tl.int64) * s_x
        inverse = inverse_rms(x_row, K, eps, NORM, NORM_BLOCK)
        NG: tl.constexpr = BLOCK_K // GROUP  # groups per tile (per channel: "groups" of GROUP columns)
        g = tl.arange(0, NG)
        r3 = rows[:, None, None].to(tl.int64)
        n3 = n_ok[:, None, None]
        acc = tl.zeros([BLOCK_N, NG], dtype=tl.float32)
        start = tl.program_id(1) * SPAN
        for k0 in range(start, tl.minimum(start + SPAN, K), BLOCK_K):
            cols = k0 + g[:, None] * GROUP  # the first column of each group of the tile, [NG, 1]
            if INT4:
                j = tl.arange(0, GROUP // 2)[None, :]  # byte j of a group: its columns j and j + GROUP / 2
                inside = (cols + j) < K
                b = tl.load(data_ptr + r3 * s_data + ((cols // 2 + j)[None, :, :]),
                            mask=n3 & inside[None, :, :], other=0, eviction_policy="evict_first").to(tl.int32)
                xl = gemv_input(x_row, cols + j, inside, K, False, GATE, nw_ptr, inverse, NORM)
                xh = gemv_input(x_row, cols + GROUP // 2 + j, inside, K, False, GATE, nw_ptr, inverse, NORM)
                qx = _to_float(b & 15) * xl[None, :, :] + _to_float(b >> 4) * xh[None, :, :]
                xsum = tl.sum(xl + xh, axis=1)
            else:
                j = tl.arange(0, GROUP)[None, :]
                inside = (cols + j) < K
                q = tl.load(data_ptr + r3 * s_data + ((cols + j)[None, :, :]), mask=n3 & inside[None, :, :], other=0,
                            eviction_policy="evict_first")
                xv = gemv_input(x_row, cols + j, inside, K, False, GATE, nw_ptr, inverse, NORM)
                qx = _int8_to_float(q) * xv[None, :, :]
                xsum = tl.sum(xv, axis=1)
            qx = tl.sum(qx, axis=2)  # [BLOCK_N, NG]: each group's sum of q * x
            if PER_CHANNEL:
                acc += qx
            else:
                at = rows[:, None].to(tl.int64) * GROUPS + (k0 // GROUP + g)[None, :]
                g_ok = n_ok[:, None] & ((k0 + g * GROUP) < K)[None, :]
                acc += qx * tl.load(scale_ptr + at, mask=g_ok, other=0.0).to(tl.float32)
                if HAS_MIN:
                    acc += xsum[None, :] * tl.load(min_ptr + at, mask=g_ok, other=0.0).to(tl.float32)
        total = tl.sum(acc, axis=1)
        if PER_CHANNEL:
            total *= tl.load(scale_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)
        _store_gemv(total, rows, n_ok, N, bias_ptr, res_ptr, out_ptr, final_ptr, count_ptr, HAS_BIAS, HAS_RESIDUAL,
                    FINAL, LAST, SPLITS)

    @triton.jit
    def _prefetch_tile(data_ptr, rows, ok, s_data, first, K, BLOCK_K: tl.constexpr, INT4: tl.constexpr,
                       PDL: tl.constexpr):
        """Under a dependent launch of level 2: ask L2 for the bytes of ``rows`` (where ``ok``) that hold columns
        ``[first, first + BLOCK_K)`` (of ``K``), a program's first tile, while the kernel before this one finishes."""
        if PDL >= 2:
            BYTES: tl.constexpr = BLOCK_K // 2 if INT4 else BLOCK_K
            LINES: tl.constexpr = (BYTES + 127) // 128
            at = (first // 2 if INT4 else first) + tl.arange(0, LINES) * 128
            pointers = data_ptr + rows[:, None].to(tl.int64) * s_data + at[None, :]
            prefetch(pointers, ok[:, None] & (at < (K // 2 if INT4 else K))[None, :])

    @triton.jit
    def _store_gemv(total, rows, n_ok, N, bias_ptr, res_ptr, out_ptr, final_ptr, count_ptr, HAS_BIAS: tl.constexpr,
                    HAS_RESIDUAL: tl.constexpr, FINAL: tl.constexpr, LAST: tl.constexpr, SPLITS):
        """A GEMV program's sums for features ``rows`` of row ``pid2`` of x: the output (FINAL, with the bias and the
        residual), or this stretch's float32 partial sums ``out[pid1, pid2, features]`` (LAST: then summed into
        ``final`` by the tile's last program to finish)."""
        row = tl.program_id(2).to(tl.int64) * N + rows
        if FINAL:
            out = finish_product(total, bias_ptr, res_ptr, rows, row, n_ok, out_ptr.dtype.element_ty, HAS_BIAS,
                                 HAS_RESIDUAL)
            tl.store(out_ptr + row, out, mask=n_ok)
        else:
            stride = tl.num_programs(2) * N  # of a stretch's partial sums (one or two rows)
            tl.store(out_ptr + tl.program_id(1) * stride + row, total, mask=n_ok)
            if LAST:
                tile = tl.program_id(0) * tl.num_programs(2) + tl.program_id(2)
                _last_sums(out_ptr, final_ptr, bias_ptr, res_ptr, count_ptr, tile, row, rows, n_ok, stride, HAS_BIAS,
                           HAS_RESIDUAL, SPLITS)

    @triton.jit
    def _last_sums(partial_ptr, out_ptr, bias_ptr, res_ptr, count_ptr, tile, at, features, ok, stride,
                   HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SPLITS):
        """Called by each of a tile's ``SPLITS`` programs once it has stored its stretch's partial sums at
        ``partial + split * stride + at``: the last to finish adds every stretch's in order, and the bias, into
        ``out + at``, as ``_sum_splits_kernel`` would (the same bits, whichever program comes last), then sets the
        tile's counter back to zero for the next kernel. The barrier and the counter's release order this
        program's stores before its arrival; the last program's acquire orders its loads (which skip the SM's
        own cache, ``.cg``) after every arrival."""
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:
            total = tl.zeros(at.shape, dtype=tl.float32)
            for split in range(SPLITS):
                total += tl.load(partial_ptr + split * stride + at, mask=ok, other=0.0, cache_modifier=".cg")
            out = finish_product(total, bias_ptr, res_ptr, features, at, ok, out_ptr.dtype.element_ty, HAS_BIAS,
                                 HAS_RESIDUAL)
            tl.store(out_ptr + at, out, mask=ok)
            tl.store(count_ptr + tile, 0)

    @triton.jit
    def _gemv_words_kernel(x_ptr, data_ptr, scale_ptr, min_ptr, bias_ptr, res_ptr, nw_ptr, out_ptr, final_ptr,
                           count_ptr, N, K, s_x, s_data, GROUPS, eps, TILES, MAGIC, GROUP: tl.constexpr,
                           INT4: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_MIN: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATE: tl.constexpr,
                           NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, FINAL: tl.constexpr, LAST: tl.constexpr,
                           SPLITS, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PDL: tl.constexpr, INTS: tl.constexpr, ASM: tl.constexpr):
        """``_gemv_kernel``'s product in fewer instructions a byte (int4: less than half; the one-row product
        is bound by them, not by its bytes): the weights are read as 32-bit words, and each 4-bit or 8-bit field becomes
        a float with one bit operation and one subtraction, where it lies in the word. The field under bits
        ``b``..``b + 3`` (int4; bits ``b``..``b + 7``, int8, its sign bit flipped in the same operation) is
        OR-ed into the mantissa of 2^23: ``2^23 + q 2^b`` (exact below bit 23; the word's top fields are
        shifted down once a word). Minus 2^23 that is ``q 2^b`` exactly, and it meets ``x 2^-b``, also exact:
        so per weight one bit operation, one subtraction and one multiply-add, no extraction, no conversion.
        ``MAGIC`` is 2^23's bits (0x4B000000), an argument so that the compiler keeps it in a register and
        gives each bit operation its mask as an immediate. Columns ``[pid1 * TILES * BLOCK_K, +TILES *
        BLOCK_K)``; EVEN: no tile passes the end of the rows or columns (no masks).

        The words of a tile ``[BLOCK_N, groups, words of a group]``: int4's word ``t`` of a group holds
        columns ``4t..4t+3`` of its first half in its low nibbles and of its second half in its high ones;
        int8's holds columns ``4t..4t+3`` (per channel, a "group" is the tile). Each thread sums its four
        adjacent words before the scale and the minimum apply.

        INTS: the products in integers instead (``_integer_sums``: four weights a ``dp4a``, no float a weight)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rows < N
        start = tl.program_id(1) * TILES * BLOCK_K
        _prefetch_tile(data_ptr, rows, n_ok, s_data, start, K, BLOCK_K, INT4, PDL)
        wait_for_inputs(PDL)
        x_row = x_ptr + tl.program_id(2).to(tl.int64) * s_x
        inverse = inverse_rms(x_row, K, eps, NORM, NORM_BLOCK)
        NG: tl.constexpr = BLOCK_K // GROUP
        HALF: tl.constexpr = GROUP // 2
        WG: tl.constexpr = GROUP // 8 if INT4 else GROUP // 4  # words of a group
        g = tl.arange(0, NG)[:, None]
        t = tl.arange(0, WG)[None, :]
        words = data_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None, None].to(tl.int64) * (s_data // 4)
        four = tl.arange(0, 4)[None, None, :]
        acc = tl.zeros([BLOCK_N, NG, WG // 4], dtype=tl.float32)
        for k0 in range(start, tl.minimum(start + TILES * BLOCK_K, K), BLOCK_K):
            first = k0 + g * GROUP  # each group's first column, [NG, 1]
            at = (k0 // GROUP * WG if INT4 else k0 // 4) + g * WG + t  # each word's place in its row, [NG, WG]
            columns = (first + 4 * t)[:, :, None] + four  # the columns of each word's first four fields
            ok = first + 4 * t < K  # whole words: K is a multiple of 4 (of 8, int4)
            if EVEN:
                w = tl.load(words + at[None, :, :], eviction_policy="evict_first")
            else:
                w = tl.load(words + at[None, :, :], mask=n_ok[:, None, None] & ok[None, :, :], other=0,
                            eviction_policy="evict_first")
            if INTS:
                x = gemv_input(x_row, columns, ok[:, :, None], K, EVEN, GATE, nw_ptr, inverse, NORM)
                if INT4:
                    h = gemv_input(x_row, columns + HALF, ok[:, :, None], K, EVEN, GATE, nw_ptr, inverse, NORM)
                    s = _integer_sums(w, x, h, True, ASM)
                    xsum = tl.sum(x, axis=2) + tl.sum(h, axis=2)
                else:
                    s = _integer_sums(w, x, x, False, ASM)
                    xsum = tl.sum(x, axis=2)
            else:
                x0, x1, x2, x3 = _four(gemv_input(x_row, columns, ok[:, :, None], K, EVEN, GATE, nw_ptr, inverse,
                                                  NORM))
                if INT4:
                    h0, h1, h2, h3 = _four(gemv_input(x_row, columns + HALF, ok[:, :, None], K, EVEN, GATE, nw_ptr,
                                                       inverse, NORM))
                    high = w >> 12  # nibbles 5..7 under bits 8..19
                    s = _field(w, 0xF, MAGIC, 8388608.0, x0)
                    s += _field(w, 0xF0, MAGIC, 8388608.0, h0 * 0.0625)
                    s += _field(w, 0xF00, MAGIC, 8388608.0, x1 * 0.00390625)
                    s += _field(w, 0xF000, MAGIC, 8388608.0, h1 * 0.000244140625)
                    s += _field(w, 0xF0000, MAGIC, 8388608.0, x2 * 0.0000152587890625)
                    s += _field(high, 0xF00, MAGIC, 8388608.0, h2 * 0.00390625)
                    s += _field(high, 0xF000, MAGIC, 8388608.0, x3 * 0.000244140625)
                    s += _field(high, 0xF0000, MAGIC, 8388608.0, h3 * 0.0000152587890625)
                    xsum = ((x0 + h0) + (x1 + h1)) + ((x2 + h2) + (x3 + h3))
                else:  # int8: the sign bit flipped (q + 128) by the same operation
                    high = w >> 16
                    s = _field(w, 0xFF, MAGIC + 0x80, 8388736.0, x0)
                    s += _field(w, 0xFF00, MAGIC + 0x8000, 8421376.0, x1 * 0.00390625)
                    s += _field(high, 0xFF, MAGIC + 0x80, 8388736.0, x2)
                    s += _field(high, 0xFF00, MAGIC + 0x8000, 8421376.0, x3 * 0.00390625)
                    xsum = (x0 + x1) + (x2 + x3)
                s = tl.sum(tl.reshape(s, [BLOCK_N, NG, WG // 4, 4]), axis=3)  # a thread's four adjacent words
            if PER_CHANNEL:
                acc += s
            else:
                xsum = tl.sum(tl.reshape(xsum, [NG, WG // 4, 4]), axis=2)
                parts = rows[:, None].to(tl.int64) * GROUPS + (k0 // GROUP + tl.arange(0, NG))[None, :]
                if EVEN:
                    scale = tl.load(scale_ptr + parts).to(tl.float32)
                else:
                    g_ok = n_ok[:, None] & ((k0 + tl.arange(0, NG) * GROUP) < K)[None, :]
                    scale = tl.load(scale_ptr + parts, mask=g_ok, other=0.0).to(tl.float32)
                acc += scale[:, :, None] * s
                if HAS_MIN:
                    if EVEN:
                        minimum = tl.load(min_ptr + parts).to(tl.float32)
                    else:
                        minimum = tl.load(min_ptr + parts, mask=g_ok, other=0.0).to(tl.float32)
                    acc += minimum[:, :, None] * xsum[None, :, :]
        total = tl.sum(tl.sum(acc, axis=2), axis=1)
        if PER_CHANNEL:
            total *= tl.load(scale_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)
        _store_gemv(total, rows, n_ok, N, bias_ptr, res_ptr, out_ptr, final_ptr, count_ptr, HAS_BIAS, HAS_RESIDUAL,
                    FINAL, LAST, SPLITS)

    @triton.jit
    def _integer_sums(w, x, h, INT4: tl.constexpr, ASM: tl.constexpr):
        """``sum q x`` over each thread's four adjacent words of ``w [BLOCK_N, groups, words]``
        (``_gemv_words_kernel``'s tile), computed in integers: ``[BLOCK_N, groups, words // 4]``, in float32. ``x``
        (float32 ``[groups, words, 4]``) holds the columns of each word's first four fields (int4: its low nibbles),
        ``h`` those of int4's high nibbles.

        Each group's inputs become 16-bit integers ``v = x 2^(14 - e)`` (``e``: the exponent of the group's largest
        ``|x|``, so ``|v| < 2^15`` for 16-bit inputs, which every caller rounds to first; rounded to nearest), split
        into a signed high byte and an unsigned low one (``v = 256 hi + lo``) and packed four to a word in the
        weights' column order. ``dp4a`` then adds four products of a
        weight's field and a byte at a time, exact in int32; ``(256 sum q hi + sum q lo) 2^(e - 14)`` is the sum (one
        conversion to float a thread's four words). An
        input keeps 16 bits under its group's largest: one whose exponent is within 7 of the largest's keeps every
        bit of a bfloat16 (float16: within 4); a smaller one is rounded, by at most 2^-15 of the largest. A NaN or
        infinite input makes its group's sum NaN.
        Per int4 word (8 weights): two bit operations and four ``dp4a``; per int8 word (4 weights), two ``dp4a``. In
        sm_90 SASS compiled here, a step of 128 x 256 takes 2.2 instructions a weight in int4 (against 3.8 in floats)
        and 1.5 in int8 (4.1)."""
        big = tl.max(tl.max(_magnitude(x), axis=2), axis=1)
        if INT4:
            big = tl.maximum(big, tl.max(tl.max(_magnitude(h), axis=2), axis=1))
        exponent = tl.maximum((big.to(tl.int32, bitcast=True) >> 23) & 0xFF, 15)  # biased; at least 2^-112's
        up = ((268 - exponent) << 23).to(tl.float32, bitcast=True)[:, None, None]  # 2^(14 - e)
        down = ((exponent - 14) << 23).to(tl.float32, bitcast=True)  # 2^(e - 14)
        down = tl.where(exponent == 255, float("nan"), down)[None, :, None]  # an infinite or NaN input: NaN
        x_lo, x_hi = _fixed_point_bytes(x, up)
        if INT4:
            h_lo, h_hi = _fixed_point_bytes(h, up)
            low = w & 0x0F0F0F0F  # the first half's four fields, a byte each
            high = (w >> 4) & 0x0F0F0F0F  # the second half's
            hi = _dp4a(low, x_hi[None, :, :], _dp4a(high, h_hi[None, :, :], tl.zeros_like(w), False, True, ASM),
                       False, True, ASM)
            lo = _dp4a(low, x_lo[None, :, :], _dp4a(high, h_lo[None, :, :], tl.zeros_like(w), False, False, ASM),
                       False, False, ASM)
        else:
            hi = _dp4a(w, x_hi[None, :, :], tl.zeros_like(w), True, True, ASM)
            lo = _dp4a(w, x_lo[None, :, :], tl.zeros_like(w), True, False, ASM)
        n: tl.constexpr = w.shape[0]
        g: tl.constexpr = w.shape[1]
        t: tl.constexpr = w.shape[2]
        hi = tl.sum(tl.reshape(hi, [n, g, t // 4, 4]), axis=3)
        lo = tl.sum(tl.reshape(lo, [n, g, t // 4, 4]), axis=3)
        return (hi * 256 + lo).to(tl.float32) * down  # below 2^27: int4's below 2^24, exact in float32

    @triton.jit
    def _magnitude(x):
        """``|x|``, a NaN as infinity: a maximum skips NaN, and an infinite largest makes the group's sum NaN."""
        return tl.where(x == x, tl.abs(x), float("inf"))

    @triton.jit
    def _fixed_point_bytes(x, up):
        """``x [groups, words, 4]`` times ``up`` (a power of two: ``|x up| < 2^15``) rounded to integers ``v``, as
        two words a word of columns: the four low bytes (unsigned) and the four high bytes (signed), ``v = 256 hi +
        lo``. Adding 1.5 2^23 rounds ``x up`` to an integer held in the float's low 16 bits (two's complement)."""
        v0, v1, v2, v3 = _four((x * up + 12582912.0).to(tl.int32, bitcast=True))
        lo = (v0 & 0xFF) | ((v1 & 0xFF) << 8) | ((v2 & 0xFF) << 16) | (v3 << 24)
        hi = ((v0 >> 8) & 0xFF) | (v1 & 0xFF00) | ((v2 & 0xFF00) << 8) | ((v3 >> 8) << 24)
        return lo, hi

    @triton.jit
    def _dp4a(a, b, c, SIGNED_A: tl.constexpr, SIGNED_B: tl.constexpr, ASM: tl.constexpr):
        """``c`` plus the sum of the products of ``a``'s and ``b``'s four bytes (each signed or not), in int32: one
        ``dp4a`` instruction with ASM, Triton's integer operations without (the interpreter; the same integers).
        The four instructions are spelled out whole: a string built from constexprs is untried on the Triton of
        the lent GPUs, where these four ran."""
        if ASM:
            if SIGNED_A:
                if SIGNED_B:
                    return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                                     dtype=tl.int32, is_pure=True, pack=1)
                else:
                    return tl.inline_asm_elementwise("dp4a.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                                     dtype=tl.int32, is_pure=True, pack=1)
            else:
                if SIGNED_B:
                    return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                                     dtype=tl.int32, is_pure=True, pack=1)
                else:
                    return tl.inline_asm_elementwise("dp4a.u32.u32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                                     dtype=tl.int32, is_pure=True, pack=1)
        else:
            total = c
            for k in tl.static_range(4):
                if SIGNED_A:
                    a_k = (a << (24 - 8 * k)) >> 24
                else:
                    a_k = (a >> (8 * k)) & 0xFF
                if SIGNED_B:
                    b_k = (b << (24 - 8 * k)) >> 24
                else:
                    b_k = (b >> (8 * k)) & 0xFF
                total += a_k * b_k
            return total

    @triton.jit
    def _field(w, mask: tl.constexpr, magic, bias: tl.constexpr, x):
        """``x`` times the field of ``w`` under ``mask`` (bits below 23) as a float: ``(w & mask) ^ magic`` is
        the float ``bias + field``; ``magic`` carries 2^23's exponent (and int8's flipped sign bit)."""
        return (((w & mask) ^ magic).to(tl.float32, bitcast=True) - bias) * x

    @triton.jit
    def _field_product(acc, w, mask: tl.constexpr, magic, scale, minimum, x_at, m_ok):
        """``acc`` plus ``x @ W``: ``W``'s integers are the fields of ``w`` under ``mask``, times 2^shift as
        ``_field`` makes them (``scale`` is divided by 2^shift), ``x``'s columns are at ``x_at``."""
        q = ((w & mask) ^ magic).to(tl.float32, bitcast=True) - 8388608.0
        x = tl.load(x_at, mask=m_ok[:, None], other=0.0)
        return tl.dot(x, (q * scale + minimum).to(x_at.dtype.element_ty), acc)

    @triton.jit
    def _four(x):
        """The four values along the last axis (of 4) of ``x`` as four tensors."""
        a, b = tl.split(tl.reshape(x, [x.shape[0], x.shape[1], 2, 2]))
        x0, x2 = tl.split(a)
        x1, x3 = tl.split(b)
        return x0, x1, x2, x3

    @triton.jit
    def _dot_gemv_kernel(x_ptr, data_ptr, scale_ptr, min_ptr, bias_ptr, res_ptr, out_ptr, final_ptr, count_ptr, M,
                         N, K, s_x, s_data, GROUPS, SPAN, OFFSET, GROUP: tl.constexpr, INT4: tl.constexpr,
                         PER_CHANNEL: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_RESIDUAL: tl.constexpr, FINAL: tl.constexpr, LAST: tl.constexpr, SPLITS,
                         ASM: tl.constexpr, MAGIC: tl.constexpr, FP16: tl.constexpr, EVEN: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                         PDL: tl.constexpr):
        """Features ``[pid0 * BLOCK_N, +BLOCK_N)`` of up to BLOCK_M rows of x, columns ``[pid1 * SPAN, +SPAN)``, on
        the tensor cores: ``W x^T``, the weights the left operand (BLOCK_N of them fill its 64 or 128 rows, where x's
        few rows would fill 1 of 16). Each byte becomes two 16-bit numbers ``OFFSET + v`` (``_nibbles``), exact, so
        a group's products need no scale inside them: per group ``D = sum (OFFSET + q) x`` and ``S = sum x`` (a
        product with ones, which lands in D's layout), and ``scale (D - OFFSET S) + minimum S`` is added, in float32.
        int8 is its two halves: ``q + 128 = 16 h + l``. Where Triton pipelines the loads (``num_stages``), a
        program's next steps are in flight while it computes this one. EVEN: ``N`` is a multiple of BLOCK_N."""
        features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = features < N
        if EVEN:
            features = tl.max_contiguous(tl.multiple_of(features, BLOCK_N), BLOCK_N)
            n_ok = tl.full([BLOCK_N], True, tl.int1)
        _prefetch_tile(data_ptr, features, n_ok, s_data, tl.program_id(1) * SPAN, K, BLOCK_K, INT4, PDL)
        wait_for_inputs(PDL)
        m = tl.arange(0, BLOCK_M)
        m_ok = m < M
        HALF: tl.constexpr = GROUP // 2 if INT4 else GROUP  # a group's columns in one half (int8: all of them)
        NG: tl.constexpr = BLOCK_K // GROUP
        j = tl.arange(0, HALF)
        w_rows = data_ptr + features[:, None].to(tl.int64) * s_data
        x_cols = x_ptr + m[None, :].to(tl.int64) * s_x
        ones = tl.full([BLOCK_N, HALF], 1.0, tl.float16 if FP16 else tl.bfloat16)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        start = tl.program_id(1) * SPAN
        for k0 in range(start, tl.minimum(start + SPAN, K), BLOCK_K):
            for g in tl.static_range(NG):
                first = tl.multiple_of(k0 + g * GROUP, GROUP)
                at = tl.multiple_of(first // 2, HALF) if INT4 else first  # the group's first byte in its row
                # int4: byte j of a group holds its columns j (low 4 bits) and j + HALF (high 4 bits)
                b = tl.load(w_rows + (at + j)[None, :], mask=n_ok[:, None], other=0, eviction_policy="evict_first")
                low, high = _nibbles(b, ASM, MAGIC, not INT4, FP16)
                x_low = tl.load(x_cols + (first + j)[:, None], mask=m_ok[None, :], other=0.0)
                if INT4:  # d = sum (OFFSET + q) x
                    x_high = tl.load(x_cols + (first + HALF + j)[:, None], mask=m_ok[None, :], other=0.0)
                    d = tl.dot(high, x_high, tl.dot(low, x_low))
                    s = tl.dot(ones, x_high, tl.dot(ones, x_low))
                    offset = OFFSET
                else:  # q + 128 = 16 h + l: d = sum (16 (OFFSET + h) + OFFSET + l) x = sum q x + (17 OFFSET + 128) s
                    d = tl.dot(low, x_low, tl.dot(high, x_low) * 16.0)
                    s = tl.dot(ones, x_low)
                    offset = 17.0 * OFFSET + 128.0
                if PER_CHANNEL:
                    acc += d - offset * s
                else:  # scale (d - offset s) + minimum s
                    at = features.to(tl.int64) * GROUPS + first // GROUP
                    scale = tl.load(scale_ptr + at, mask=n_ok, other=0.0).to(tl.float32)[:, None]
                    shift = -offset * scale
                    if HAS_MIN:
                        shift += tl.load(min_ptr + at, mask=n_ok, other=0.0).to(tl.float32)[:, None]
                    acc += scale * d + shift * s
        if PER_CHANNEL:
            acc *= tl.load(scale_ptr + features, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        at = m[None, :].to(tl.int64) * N + features[:, None]
        ok = n_ok[:, None] & m_ok[None, :]
        if FINAL:
            out = finish_product(acc, bias_ptr, res_ptr, features[:, None], at, ok, out_ptr.dtype.element_ty,
                                 HAS_BIAS, HAS_RESIDUAL)
            tl.store(out_ptr + at, out, mask=ok)
        else:
            stride = M * N  # of a stretch's partial sums
            tl.store(out_ptr + tl.program_id(1) * stride + at, acc, mask=ok)
            if LAST:
                _last_sums(out_ptr, final_ptr, bias_ptr, res_ptr, count_ptr, tl.program_id(0), at, features[:, None],
                           ok, stride, HAS_BIAS, HAS_RESIDUAL, SPLITS)

    @triton.jit
    def _nibbles(b, ASM: tl.constexpr, MAGIC: tl.constexpr, SIGNED: tl.constexpr, FP16: tl.constexpr):
        """Bytes ``b`` as two 16-bit numbers each, ``OFFSET + low 4 bits`` and ``OFFSET + high 4 bits`` (SIGNED, an
        int8 ``q``: of ``q + 128``), ``MAGIC`` being OFFSET's bits: each field OR-ed into its mantissa. With ASM, two
        bytes at a time by inline PTX: ``prmt`` spreads them into the two halves of a word, then one ``lop3`` makes
        two numbers (the high fields after a shift; a signed byte's top bit flipped by the same ``lop3``)."""
        if ASM:
            if FP16:
                if SIGNED:
                    low, high = _asm_nibbles_f16(b, _NIBBLES_PTX_F16_SIGNED)
                else:
                    low, high = _asm_nibbles_f16(b, _NIBBLES_PTX_F16)
            else:
                if SIGNED:
                    low, high = _asm_nibbles_bf16(b, _NIBBLES_PTX_BF16_SIGNED)
                else:
                    low, high = _asm_nibbles_bf16(b, _NIBBLES_PTX_BF16)
        else:
            u = b.to(tl.int16) & 0xFF
            if SIGNED:
                u = u ^ 0x80
            low = ((u & 15) | MAGIC).to(tl.float16 if FP16 else tl.bfloat16, bitcast=True)
            high = ((u >> 4) | MAGIC).to(tl.float16 if FP16 else tl.bfloat16, bitcast=True)
        return low, high

    @triton.jit
    def _asm_nibbles_bf16(b, asm: tl.constexpr):
        return tl.inline_asm_elementwise(asm=asm, constraints="=r,=r,r", args=[b], dtype=(tl.bfloat16, tl.bfloat16),
                                         is_pure=True, pack=2)

    @triton.jit
    def _asm_nibbles_f16(b, asm: tl.constexpr):
        return tl.inline_asm_elementwise(asm=asm, constraints="=r,=r,r", args=[b], dtype=(tl.float16, tl.float16),
                                         is_pure=True, pack=2)

    @triton.jit
    def _sum_splits_kernel(partial_ptr, bias_ptr, res_ptr, out_ptr, TOTAL, N, SPLITS: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                           PDL: tl.constexpr):
        """``out = sum over the splits of partial (+ bias) (+ residual)``, the splits added in order."""
        wait_for_inputs(PDL)
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < TOTAL
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(SPLITS):
            total += tl.load(partial_ptr + s * TOTAL + i, mask=ok, other=0.0)
        out = finish_product(total, bias_ptr, res_ptr, i % N, i, ok, out_ptr.dtype.element_ty, HAS_BIAS, HAS_RESIDUAL)
        tl.store(out_ptr + i, out, mask=ok)

    @triton.jit
    def _matmul_kernel(x_ptr, data_ptr, scale_ptr, min_ptr, bias_ptr, out_ptr, final_ptr, count_ptr, M, N, K, s_x,
                       s_data, GROUPS, SPAN, MAGIC, INT4: tl.constexpr, PER_CHANNEL: tl.constexpr,
                       HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, FINAL: tl.constexpr, LAST: tl.constexpr,
                       SPLITS, WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
        """Tile ``[pid0 * BLOCK_M, +BLOCK_M) x [pid1 * BLOCK_N, +BLOCK_N)`` over columns ``[pid2 * SPAN, +SPAN)``:
        the output (FINAL) or this stretch's float32 partial sums ``out[pid2]`` (LAST: and the output ``final``, by
        the last stretch's program to finish); a column step of ``BLOCK_K`` columns is one group (one scale per
        feature), or two of int4's groups of 16 (``GROUP``: a product's 16-bit inputs take at least 16 columns, a
        group's half 8). WORDS (int4 in groups of 128 or 256): the group read as 32-bit words, each of its eight
        nibbles made a float where it lies (as ``_gemv_words_kernel`` does), and multiplied in eight products of
        ``BLOCK_K / 8`` columns."""
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = m < M, rows < N
        x_rows = x_ptr + m[:, None].to(tl.int64) * s_x
        w_rows = data_ptr + rows[None, :].to(tl.int64) * s_data
        dtype = x_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        start = tl.program_id(2) * SPAN
        for k0 in range(start, tl.minimum(start + SPAN, K), BLOCK_K):
            if not PER_CHANNEL and GROUP == BLOCK_K:  # a step is a group: a row's scale (and minimum)
                at = rows.to(tl.int64) * GROUPS + k0 // BLOCK_K
                scale = tl.load(scale_ptr + at, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                minimum = tl.load(min_ptr + at, mask=n_ok, other=0.0).to(tl.float32)[None, :] if HAS_MIN else 0.0
            elif not PER_CHANNEL:  # two of int4's groups of 16: each byte's group's, [BLOCK_K / 2, BLOCK_N]
                group = k0 // GROUP + tl.arange(0, BLOCK_K // 2) // (GROUP // 2)
                at = rows.to(tl.int64)[None, :] * GROUPS + group[:, None]
                # a last step's second group lies past the row (a masked weight's 0 times its scale, plus its
                # minimum, would be the next row's, or past the last row's, memory: NaN or inf there is NaN)
                kept = n_ok[None, :] & (group < GROUPS)[:, None]
                scale = tl.load(scale_ptr + at, mask=kept, other=0.0).to(tl.float32)
                minimum = tl.load(min_ptr + at, mask=kept, other=0.0).to(tl.float32) if HAS_MIN else 0.0
            if WORDS:
                t = tl.arange(0, BLOCK_K // 8)
                w = tl.load(data_ptr.to(tl.pointer_type(tl.int32)) + rows[None, :].to(tl.int64) * (s_data // 4)
                            + (k0 // 8 + t)[:, None], mask=n_ok[None, :], other=0)  # [BLOCK_K / 8, BLOCK_N]
                high = w >> 12  # nibbles 5..7 under bits 8..19
                x_at = x_rows + (k0 + 4 * t)[None, :]  # each word's first column (of the group's first half)
                H: tl.constexpr = BLOCK_K // 2  # its second half
                acc = _field_product(acc, w, 0xF, MAGIC, scale, minimum, x_at, m_ok)
                acc = _field_product(acc, w, 0xF0, MAGIC, scale * 0.0625, minimum, x_at + H, m_ok)
                acc = _field_product(acc, w, 0xF00, MAGIC, scale * 0.00390625, minimum, x_at + 1, m_ok)
                acc = _field_product(acc, w, 0xF000, MAGIC, scale * 0.000244140625, minimum, x_at + H + 1, m_ok)
                acc = _field_product(acc, w, 0xF0000, MAGIC, scale * 0.0000152587890625, minimum, x_at + 2, m_ok)
                acc = _field_product(acc, high, 0xF00, MAGIC, scale * 0.00390625, minimum, x_at + H + 2, m_ok)
                acc = _field_product(acc, high, 0xF000, MAGIC, scale * 0.000244140625, minimum, x_at + 3, m_ok)
                acc = _field_product(acc, high, 0xF0000, MAGIC, scale * 0.0000152587890625, minimum, x_at + H + 3,
                                     m_ok)
            elif INT4:
                j = tl.arange(0, BLOCK_K // 2)
                if GROUP == BLOCK_K:  # byte j's low nibble's column (a plain range: x's loads stay wide)
                    low = k0 + j
                else:
                    low = k0 + j // (GROUP // 2) * GROUP + j % (GROUP // 2)
                inside = low < K
                b = tl.load(w_rows + (k0 // 2 + j)[:, None], mask=inside[:, None] & n_ok[None, :], other=0).to(tl.int32)
                xl = tl.load(x_rows + low[None, :], mask=m_ok[:, None] & inside[None, :], other=0.0)
                xh = tl.load(x_rows + (low + GROUP // 2)[None, :], mask=m_ok[:, None] & inside[None, :], other=0.0)
                lo, hi = _to_float(b & 15), _to_float(b >> 4)  # [BLOCK_K / 2, BLOCK_N]: the group's two halves
                if not PER_CHANNEL:
                    lo, hi = lo * scale + minimum, hi * scale + minimum
                acc = tl.dot(xl, lo.to(dtype), acc)
                acc = tl.dot(xh, hi.to(dtype), acc)
            else:
                kk = k0 + tl.arange(0, BLOCK_K)
                inside = kk < K
                w = _int8_to_float(tl.load(w_rows + kk[:, None], mask=inside[:, None] & n_ok[None, :], other=0))
                if not PER_CHANNEL:
                    w = w * scale + minimum
                xv = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & inside[None, :], other=0.0)
                acc = tl.dot(xv, w.to(dtype), acc)
        if PER_CHANNEL:  # int8's integers are exact in 16 bits: the scale applies to the sums
            acc *= tl.load(scale_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if FINAL and HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        at = m[:, None].to(tl.int64) * N + rows[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        if FINAL:
            tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            stride = M * N  # of a stretch's partial sums (only products of at most 64 rows are split)
            tl.store(out_ptr + tl.program_id(2) * stride + at, acc, mask=ok)
            if LAST:
                tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
                _last_sums(out_ptr, final_ptr, bias_ptr, bias_ptr, count_ptr, tile, at, rows[None, :], ok, stride,
                           HAS_BIAS, False, SPLITS)
