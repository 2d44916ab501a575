#!/usr/bin/env python3
"""Products from compressed weights on a GPU: offload's int8/int4 kernels against bf16 and the HBM floor.

    python benchmarks/bench_quant_kernels.py                     # llama-2-7b's products, 1, 16 and 2048 rows
    python benchmarks/bench_quant_kernels.py --sweep             # and the kernels' other blockings
    python benchmarks/bench_quant_kernels.py --rows 1,16 --words # and the word kernels beside the defaults
    python benchmarks/bench_quant_kernels.py --rows 1,16 --dot   # and the tensor-core product of a few rows
    python benchmarks/bench_quant_kernels.py --rows 1 --head     # and the LM head's product (int8 where quantized)

For each product of a llama-2-7b layer, each format (bf16: offload's GEMV for one row,
cuBLAS otherwise; int8 per channel; int4 in groups of 128 and of 32, by the kernels the
rows choose; int4 dequantized then multiplied by cuBLAS, the path before the kernels) and
each number of rows:
microseconds per product and, for a few rows, floor / time, where the floor is the
product's weight bytes (compressed) over the device-copy bandwidth measured in the
run; for 2048 rows, TFLOP/s. Each product cycles through copies of its weight (600 MB
in all) inside one CUDA graph, so no weight is found in L2 and no launch gap is timed.
``--ints``: also the word GEMV with its products in integers (``quant_kernels.INT_GEMV``: four weights a
``dp4a``) against in floats, one and two rows; with ``--ints-sweep``, both on other blockings (the best three).
``--words``: also the word kernels (``quant_kernels.WORD_GEMV``: the GEMV for one or two
rows, int4's product for up to 16), checked against dequantize-then-multiply. ``--dot``: also the
tensor-core product of up to 16 rows (``quant_kernels._dot_gemv_kernel``), checked the same way; with
``--dot-sweep``, its other blockings too (features a program, pipeline stages, programs aimed at; the fields
made by Triton's operations rather than inline PTX), the best three.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload.cli import report_bad_input  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_gemv import ROTATE_BYTES, products, time_us  # noqa: E402
from offload.memory.bandwidth import measure_device_copy  # noqa: E402
from offload.models import kernels, quant_kernels  # noqa: E402
from offload.models.quant import DEQUANTIZE, FUSED, QuantizedWeight, QuantScheme, quantize, quantized_linear  # noqa: E402

FORMATS = {"bf16": None, "int8": ("int8", None), "int4-g128": ("int4", 128), "int4-g32": ("int4", 32)}


def weights_of(fmt, n, k, device, copies):
    dense = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5
    if FORMATS[fmt] is None:
        return [dense] + [dense.clone() for _ in range(copies - 1)], n * k * 2
    scheme = QuantScheme(*FORMATS[fmt], chunk_rows=1 << 30, kernel=FUSED, rounding="minmax")
    parts = quantize(dense, scheme, torch.bfloat16)
    nbytes = sum(p.numel() * p.element_size() for p in parts.values())
    made = [QuantizedWeight(parts["data"], parts["scale"], parts.get("minimum"), scheme)]
    for _ in range(copies - 1):
        made.append(QuantizedWeight(parts["data"].clone(), parts["scale"].clone(),
                                    None if parts.get("minimum") is None else parts["minimum"].clone(), scheme))
    return made, nbytes


def product(fmt, x, w, blocking=None):
    if FORMATS[fmt] is None:
        return kernels.gemv(x, w) if x.shape[0] == 1 else F.linear(x, w)
    return quant_kernels.linear(x, w, blocking=blocking)


def agrees(got, want) -> bool:
    """Whether a kernel's product is dequantize-then-multiply's (``want``, float32) to 2% of its largest."""
    return bool((got.float() - want).abs().max() <= 2e-2 * want.abs().max())


def dequantized(x, w):
    return quantized_linear(x, QuantizedWeight(w.data, w.scale, w.minimum, QuantScheme(
        w.scheme.format, w.scheme.group_size, w.rows, DEQUANTIZE)))


SWEPT = ("int8", "int4-g128")  # the formats and products whose other blockings --sweep times
SWEPT_PRODUCTS = ("gate_up", "down")


def word_blocking(m, w):
    """The word kernels' blocking for ``m`` rows of ``w``, or None where they do not take it."""
    chosen = (quant_kernels.gemv_blocking(w, words=True) if m <= quant_kernels.gemv_rows(w)
              else quant_kernels.matmul_blocking(w, m, words=True))
    return chosen if chosen[-1] else None


def sweep_blockings(m, w):
    """Other blockings of the kernel that takes ``m`` rows of ``w``."""
    group, per_channel = w.scheme.group_size or w.cols, w.scheme.group_size is None
    if m <= quant_kernels.gemv_rows(w):  # (BLOCK_N, BLOCK_K, SPLITS, warps, words)
        out = [(n, k, s, warps, False)
               for n, k, s, warps in itertools.product([1, 2, 4, 8], [1024, 2048], [1, 2], [2, 4])
               if (per_channel or k >= group) and 512 <= n * k <= 16384 and k * s <= w.cols]
        if quant_kernels.words_take(w):  # the word GEMV: stretches as the default's, here twice as many
            for n, k, warps in itertools.product([32, 64, 128], [128, 256, 512], [4, 8]):
                if (per_channel or k >= group) and n * k <= 65536:
                    splits = quant_kernels.gemv_blocking(w, words=True)[2]  # and a quarter: longer pipelines
                    out += [(n, k, s, warps, True) for s in dict.fromkeys((splits, 2 * splits, max(1, splits // 4)))]
        return out
    block_k = 64 if per_channel else group
    if m <= 16:  # (BLOCK_M, BLOCK_N, BLOCK_K, SPLITS, warps, stages, words)
        words = [False, True] if w.scheme.format == "int4" and group >= 128 and quant_kernels.words_take(w) else [False]
        return [(16, n, block_k, s, 4, 3, wd) for n, s, wd in itertools.product([32, 64, 128], [1, 4], words)
                if s * block_k <= w.cols]
    return [(bm, 128, block_k, 1, warps, 3, False) for bm, warps in itertools.product([64, 128], [4, 8])]


# (features, columns, warps) of a word GEMV's program: 32 words a thread or more (120-170 registers: 12-16 warps an
# SM), then 16 a thread (64-80 registers, twice the warps; more instructions a weight: 2.5-3.2 against 2.2)
INT_BLOCKINGS = [(128, 256, 4), (128, 256, 2), (64, 256, 2), (256, 256, 4), (128, 512, 4), (64, 1024, 4),
                 (32, 1024, 4), (32, 1024, 2), (16, 2048, 4),
                 (16, 1024, 4), (32, 512, 4), (64, 256, 4), (16, 512, 4)]


def integer_products(fmt, x, ws, floor, totals, sweep: bool) -> list[str]:
    """The word GEMV with its products in integers (``quant_kernels.INT_GEMV``) against in floats, on the same
    blocking, each checked against dequantize-then-multiply first; with ``sweep``, both on ``INT_BLOCKINGS`` too
    (the best three of each)."""
    if not quant_kernels.words_take(ws[0]):
        return []
    want = dequantized(x, ws[0]).float()
    chosen = quant_kernels.gemv_blocking(ws[0], words=True)
    n, k = ws[0].rows, ws[0].cols
    others = [(bn, bk, quant_kernels._splits(n, k, bn, bk), warps, True) for bn, bk, warps in INT_BLOCKINGS
              if bk % (ws[0].scheme.group_size or 1) == 0]
    out, switch = [], quant_kernels.INT_GEMV  # as the environment set it
    for ints in (False, True):
        name = "ints" if ints else "words"
        quant_kernels.INT_GEMV = ints
        try:
            got = product(fmt, x, ws[0], chosen).float()
            if not agrees(got, want):
                out.append(f"{name} DISAGREE")
                continue
            us = time_us(lambda w: product(fmt, x, w, chosen), ws)
            out.append(f"{name} {us:7.1f} ({floor / us:4.2f})")
            t = totals.setdefault((f"{fmt} {name}", x.shape[0]), [0.0, 0.0])
            t[0], t[1] = t[0] + floor, t[1] + us
            if sweep:  # each blocking checked as the chosen one was: a wrong one is not timed
                right = [b for b in others
                         if agrees(product(fmt, x, ws[0], b), want)]
                out += [f"{name} {b[0]}x{b[1]} w{b[3]} DISAGREES" for b in others if b not in right]
                times = {b: time_us(lambda w, b=b: product(fmt, x, w, b), ws) for b in right}
                best = sorted(times, key=times.get)[:3]
                out.append(f"{name} best " + " ".join(f"({b[0]}x{b[1]} s{b[2]} w{b[3]}):{times[b]:.1f}"
                                                      for b in best))
                t = totals.setdefault((f"{fmt} {name} best", x.shape[0]), [0.0, 0.0])
                t[0], t[1] = t[0] + floor, t[1] + times[best[0]]
        finally:
            quant_kernels.INT_GEMV = switch
    return out


# (features, columns, warps) whose stretches of the columns --splits-sweep varies: a GEMV of one row is the
# programs' waves, and its last, partly filled wave reads with a fraction of the SMs' loads in flight
SPLIT_BLOCKINGS = [(32, 1024, 2), (64, 1024, 4), (64, 256, 2), (128, 256, 4), (16, 2048, 4), (16, 512, 4)]


def split_products(fmt, x, ws, floor, totals) -> list[str]:
    """The integer word GEMV on ``SPLIT_BLOCKINGS`` with 1, 2, 4, ... stretches of the columns (the default's
    count, ``quant_kernels._splits``, beside them), each checked against dequantize-then-multiply: the best five."""
    w = ws[0]
    n, k, group = w.rows, w.cols, w.scheme.group_size or 1
    if not quant_kernels.words_take(w):
        return []
    want = dequantized(x, w).float()
    blockings = []
    for bn, bk, warps in SPLIT_BLOCKINGS:
        tiles = -(-k // bk)
        if bk % group == 0:
            counts = {1 << i for i in range(tiles.bit_length()) if 1 << i <= tiles}
            counts.add(quant_kernels._splits(n, k, bn, bk))
            blockings += [(bn, bk, s, warps, True) for s in sorted(counts)]
    switch, quant_kernels.INT_GEMV = quant_kernels.INT_GEMV, True
    try:
        right = [b for b in blockings if agrees(product(fmt, x, w, b), want)]
        times = {b: time_us(lambda v, b=b: product(fmt, x, v, b), ws) for b in right}
    finally:
        quant_kernels.INT_GEMV = switch
    best = sorted(times, key=times.get)[:5]
    t = totals.setdefault((f"{fmt} ints splits best", x.shape[0]), [0.0, 0.0])
    t[0], t[1] = t[0] + floor, t[1] + times[best[0]]
    return ([f"ints {b[0]}x{b[1]} s{b[2]} w{b[3]} DISAGREES" for b in blockings if b not in right]
            + ["splits best " + " ".join(f"({b[0]}x{b[1]} s{b[2]} w{b[3]}):{times[b]:.1f}" for b in best)])


def dot_blockings(m, w):
    """The tensor-core product's blockings to sweep for ``m`` rows of ``w``."""
    out = [quant_kernels.dot_blocking(w, m, block_n, programs, stages)
           for block_n, programs, stages in itertools.product([64, 128], [264, 528, 1056], [3, 4])]
    out += [quant_kernels.dot_blocking(w, m, 128, programs, 3)._replace(warps=8) for programs in (264, 528)]
    return list(dict.fromkeys(out)) + [quant_kernels.dot_blocking(w, m)._replace(asm=False)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="llama-2-7b")
    p.add_argument("--rows", default="1,16,2048")
    p.add_argument("--sweep", action="store_true", help="also time other blockings of the kernels (the best three)")
    p.add_argument("--words", action="store_true", help="also time the word kernels (quant_kernels.WORD_GEMV)")
    p.add_argument("--head", action="store_true", help="also the LM head's product (in the totals)")
    p.add_argument("--ints", action="store_true",
                   help="also time the word GEMV's products in integers (quant_kernels.INT_GEMV) against in floats")
    p.add_argument("--ints-sweep", action="store_true", help="and both on other blockings (the best three)")
    p.add_argument("--splits-sweep", action="store_true",
                   help="also the integer products' blockings with 1, 2, 4, ... stretches of the columns (best five)")
    p.add_argument("--dot", action="store_true", help="also time the tensor-core product of up to 16 rows")
    p.add_argument("--dot-sweep", action="store_true", help="and its other blockings (the best three)")
    args = p.parse_args()
    if not torch.cuda.is_available() or kernels.triton is None:
        print("bench_quant_kernels needs a GPU and Triton")
        return 2
    device = torch.device("cuda")
    hbm = measure_device_copy(device, 1 << 30)
    print(f"{torch.cuda.get_device_name()}, device copy {hbm / 1e9:.0f} GB/s")
    totals: dict[tuple[str, int], list[float]] = {}
    for name in args.shapes.split(","):
        for what, n, k in products(name)[:5 if args.head else 4]:
            for m in (int(r) for r in args.rows.split(",")):
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                line = [f"{name} {what:7s} {n:5d}x{k:5d} m={m:4d}:"]
                for fmt in FORMATS:
                    ws, nbytes = weights_of(fmt, n, k, device, max(2, -(-ROTATE_BYTES // (n * k * 2))))
                    if FORMATS[fmt] is not None:  # checked against dequantize-then-multiply
                        want = dequantized(x[:1], ws[0]).float()
                        got = product(fmt, x[:1], ws[0]).float()
                        assert agrees(got, want), f"{fmt} disagrees"
                    us = time_us(lambda w: product(fmt, x, w), ws)
                    floor = nbytes / hbm * 1e6
                    t = totals.setdefault((fmt, m), [0.0, 0.0])
                    t[0], t[1] = t[0] + floor, t[1] + us
                    shown = f"{2 * m * n * k / us / 1e6:6.0f} TF" if m > 64 else f"{floor / us:4.2f}"
                    line.append(f"{fmt} {us:7.1f} ({shown})")
                    if fmt == "int4-g128":
                        dq = time_us(lambda w: dequantized(x, w), ws[:2])
                        line.append(f"int4-dequant {dq:7.1f}")
                    if args.sweep and fmt in SWEPT and what in SWEPT_PRODUCTS:
                        times = {b: time_us(lambda w, b=b: product(fmt, x, w, b), ws[:4])
                                 for b in sweep_blockings(m, ws[0])}
                        best = sorted(times, key=times.get)[:3]
                        line.append("best " + " ".join(f"{b}:{times[b]:.1f}" for b in best))
                    words = FORMATS[fmt] is not None and args.words and word_blocking(m, ws[0])
                    if words:  # checked on all m rows: the blocking is the kernel of m rows
                        want_m = dequantized(x, ws[0]).float()
                        got = product(fmt, x, ws[0], words).float()
                        assert agrees(got, want_m), "the word kernels disagree"
                        us_words = time_us(lambda w: product(fmt, x, w, words), ws)
                        line.append(f"words {us_words:7.1f} ({floor / us_words:4.2f})")
                        t = totals.setdefault((fmt + " words", m), [0.0, 0.0])
                        t[0], t[1] = t[0] + floor, t[1] + us_words
                    if FORMATS[fmt] is not None and args.ints and m <= quant_kernels.gemv_rows(ws[0]):
                        line += integer_products(fmt, x, ws, floor, totals, args.ints_sweep and fmt in SWEPT)
                    if FORMATS[fmt] is not None and args.splits_sweep and fmt in SWEPT and m == 1:
                        line += split_products(fmt, x, ws, floor, totals)
                    dot = (FORMATS[fmt] is not None and args.dot and m <= quant_kernels.DOT_ROWS
                           and quant_kernels.dot_takes(ws[0], x.dtype))
                    if dot:  # checked on all m rows, by PTX and by Triton's operations: a wrong one is not timed
                        want_m = dequantized(x, ws[0]).float()
                        right, ptx = [], quant_kernels.dot_blocking(ws[0], m)
                        for b in (ptx, ptx._replace(asm=False)):
                            got = product(fmt, x, ws[0], b).float()
                            if agrees(got, want_m):
                                right.append(b)
                            else:
                                line.append(f"dot{'' if b.asm else ' (ops)'} DISAGREES")
                        if not right:
                            continue
                        chosen = right[0]
                        us_dot = time_us(lambda w: product(fmt, x, w, chosen), ws)
                        line.append(f"dot{'' if chosen.asm else ' (ops)'} {us_dot:7.1f} ({floor / us_dot:4.2f})")
                        t = totals.setdefault((fmt + " dot", m), [0.0, 0.0])
                        t[0], t[1] = t[0] + floor, t[1] + us_dot
                        if args.dot_sweep and fmt in SWEPT and what in SWEPT_PRODUCTS:
                            times = {b: time_us(lambda w, b=b: product(fmt, x, w, b), ws[:4])
                                     for b in dot_blockings(m, ws[0]) if b.asm == chosen.asm or not b.asm}
                            best = sorted(times, key=times.get)[:3]
                            line.append("dot best " + " ".join(
                                f"(n{b.block_n} k{b.block_k} s{b.splits} st{b.stages} w{b.warps}"
                                f"{'' if b.asm else ' ops'}):{times[b]:.1f}" for b in best))
                    del ws
                    torch.cuda.empty_cache()
                print("  ".join(line), flush=True)
    for (fmt, m), (floor, us) in totals.items():
        print(f"{fmt:10s} m={m:5d}: {us:9.1f} us in all, floor/time {floor / us:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(report_bad_input("bench_quant_kernels", main))
