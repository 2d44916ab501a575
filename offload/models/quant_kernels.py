"""Triton kernels that multiply straight from compressed weights: int4 and int8, per channel or in groups.

A compressed projection is its parts (``quant.py``): integers, scales and, for int4
(and some GGUF formats), minimums. These kernels read the parts where they lie (a
resident block or a slot) and never write a dequantized copy: each program turns the
tile it is about to use into numbers in registers. So a compressed layer costs its
compressed bytes of HBM traffic, resident or streamed.

* **A few rows** (decode, ``GEMV_ROWS`` or fewer): ``_gemv_kernel``. A program owns
  ``BLOCK_N`` output features of one row of ``x`` and walks their input columns.
  Per group it computes ``scale * sum(q * x) + minimum * sum(x)``: the weights are
  never formed, one multiply-add per weight. int8 per channel scales once at the end.
* **More rows** (prefill chunks, batched decode): ``_matmul_kernel``, tiles of
  ``[BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]``; each weight tile is dequantized in
  float32, rounded once to the activations' dtype (as ``quant.dequantize`` rounds)
  and multiplied on the tensor cores.

Every blocking is fixed by the shapes alone (no timing), so two models compute the same
bits. Which projections use them is decided when the model is laid out
(``quant.scheme_for``: ``kernel == FUSED`` for int8 per channel and groups of a power
of two), on models whose ops are offload's kernels (``ops.choose``).
"""

from __future__ import annotations

import torch

from .kernels import DTYPES, triton
from .quant import FUSED, INT4, QuantizedWeight

if triton is not None:
    import triton.language as tl

GEMV_ROWS = 2  # up to this many rows of x: the GEMV kernel, one program per row and block of features


def takes(x: torch.Tensor, w: QuantizedWeight) -> bool:
    """Whether the kernels compute ``x @ W.T`` for ``x [..., K]`` (16 bits, the last dimension contiguous)."""
    return w.scheme.kernel == FUSED and x.dtype in DTYPES and x.stride(-1) == 1 and x.device == w.data.device


def linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None, blocking=None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the weight ``W`` that ``w``'s parts hold (``blocking``: another kernel blocking,
    for benchmarks/bench_quant_kernels.py's sweep)."""
    k, n = w.cols, w.rows
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    out = x.new_empty(m, n)
    group = k if w.scheme.group_size is None else w.scheme.group_size
    minimum = w.minimum if w.minimum is not None else w.scale
    common = dict(GROUP=group, INT4=w.scheme.format == INT4, PER_CHANNEL=w.scheme.group_size is None,
                  HAS_MIN=w.minimum is not None, HAS_BIAS=bias is not None)
    bias = bias if bias is not None else out
    if m <= GEMV_ROWS:
        block_n, block_k, warps = blocking or gemv_blocking(w, group)
        _gemv_kernel[(triton.cdiv(n, block_n), m)](
            rows, w.data, w.scale, minimum, bias, out, n, k, rows.stride(0), w.data.stride(0), w.groups,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, **common)
    else:
        block_m, block_n, block_k, warps, stages = blocking or matmul_blocking(m, w, group)
        _matmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            rows, w.data, w.scale, minimum, bias, out, m, n, k, rows.stride(0), w.data.stride(0), w.groups,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages, **common)
    return out.view(*x.shape[:-1], n)


def gemv_blocking(w: QuantizedWeight, group: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) of the GEMV: 16-byte loads per thread, whole groups per tile."""
    block_k = 512 if w.scheme.format == INT4 else 256
    if w.scheme.group_size is not None:
        block_k = max(block_k, group)
    return 4, block_k, 4


def matmul_blocking(m: int, w: QuantizedWeight, group: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) by the number of rows: narrow tiles and many programs for
    a few rows (the weights' bytes bound the time), square ones for many (the tensor cores do)."""
    if m <= 16:
        block_m, block_n, block_k, warps, stages = 16, 32, 128, 4, 3
    elif m <= 64:
        block_m, block_n, block_k, warps, stages = 64, 64, 64, 4, 3
    else:
        block_m, block_n, block_k, warps, stages = 128, 128, 64, 8, 3
    if w.scheme.group_size is not None:
        block_k = max(block_k, group)
    return block_m, block_n, block_k, warps, stages


if triton is not None:

    @triton.jit
    def _weight_tile(data_ptr, rows, n_ok, k0, K, s_data, INT4: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """The integers of rows ``rows`` and columns ``[k0, k0 + BLOCK_K)``, in float32, ``[BLOCK_N, BLOCK_K]``
        (int4: the two nibbles of each byte side by side, the low one first)."""
        if INT4:
            j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            inside = n_ok[:, None] & (j[None, :] < K // 2)
            b = tl.load(data_ptr + rows[:, None].to(tl.int64) * s_data + j[None, :], mask=inside, other=0,
                        eviction_policy="evict_first")
            q = tl.join((b & 15).to(tl.float32), (b >> 4).to(tl.float32))
            return tl.reshape(q, [BLOCK_N, BLOCK_K])
        k = k0 + tl.arange(0, BLOCK_K)
        inside = n_ok[:, None] & (k[None, :] < K)
        q = tl.load(data_ptr + rows[:, None].to(tl.int64) * s_data + k[None, :], mask=inside, other=0,
                    eviction_policy="evict_first")
        return q.to(tl.float32)

    @triton.jit
    def _group_params(scale_ptr, min_ptr, rows, n_ok, k0, GROUPS, GROUP: tl.constexpr, HAS_MIN: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        """The scales (and minimums) of the tile's groups, ``[BLOCK_N, BLOCK_K // GROUP]`` in float32."""
        g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        inside = n_ok[:, None] & (g[None, :] < GROUPS)
        at = rows[:, None].to(tl.int64) * GROUPS + g[None, :]
        scale = tl.load(scale_ptr + at, mask=inside, other=0.0).to(tl.float32)
        minimum = tl.load(min_ptr + at, mask=inside, other=0.0).to(tl.float32) if HAS_MIN else scale * 0.0
        return scale, minimum

    @triton.jit
    def _gemv_kernel(x_ptr, data_ptr, scale_ptr, min_ptr, bias_ptr, out_ptr, N, K, s_x, s_data, GROUPS,
                     GROUP: tl.constexpr, INT4: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_MIN: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Features ``[pid_n * BLOCK_N, +BLOCK_N)`` of row ``pid_m`` of x."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rows < N
        x_row = x_ptr + tl.program_id(1).to(tl.int64) * s_x
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + k, mask=k < K, other=0.0, eviction_policy="evict_last").to(tl.float32)
            qx = _weight_tile(data_ptr, rows, n_ok, k0, K, s_data, INT4, BLOCK_N, BLOCK_K) * x[None, :]
            if PER_CHANNEL:
                acc += tl.sum(qx, axis=1)
            else:  # per group: scale * sum(q x) + minimum * sum(x)
                scale, minimum = _group_params(scale_ptr, min_ptr, rows, n_ok, k0, GROUPS, GROUP, HAS_MIN, BLOCK_K)
                qx = tl.sum(tl.reshape(qx, [BLOCK_N, BLOCK_K // GROUP, GROUP]), axis=2)
                part = scale * qx
                if HAS_MIN:
                    part += minimum * tl.sum(tl.reshape(x, [BLOCK_K // GROUP, GROUP]), axis=1)[None, :]
                acc += tl.sum(part, axis=1)
        if PER_CHANNEL:
            acc *= tl.load(scale_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)
        out = out_ptr + tl.program_id(1).to(tl.int64) * N + rows
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _matmul_kernel(x_ptr, data_ptr, scale_ptr, min_ptr, bias_ptr, out_ptr, M, N, K, s_x, s_data, GROUPS,
                       GROUP: tl.constexpr, INT4: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_MIN: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Tile ``[pid_m * BLOCK_M, +BLOCK_M) x [pid_n * BLOCK_N, +BLOCK_N)`` of the output."""
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = m < M, rows < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m[:, None].to(tl.int64) * s_x + k[None, :], mask=m_ok[:, None] & (k[None, :] < K),
                        other=0.0)
            w = _weight_tile(data_ptr, rows, n_ok, k0, K, s_data, INT4, BLOCK_N, BLOCK_K)
            if not PER_CHANNEL:  # dequantized in float32, rounded once
                scale, minimum = _group_params(scale_ptr, min_ptr, rows, n_ok, k0, GROUPS, GROUP, HAS_MIN, BLOCK_K)
                w = tl.reshape(w, [BLOCK_N, BLOCK_K // GROUP, GROUP]) * scale[:, :, None]
                if HAS_MIN:
                    w += minimum[:, :, None]
                w = tl.reshape(w, [BLOCK_N, BLOCK_K])
            acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc)
        if PER_CHANNEL:  # int8's integers are exact in 16 bits: the scale applies to the sums
            acc *= tl.load(scale_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + m[:, None].to(tl.int64) * N + rows[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
