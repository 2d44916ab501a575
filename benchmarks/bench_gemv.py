#!/usr/bin/env python3
"""One-row matrix products of real models' shapes: offload's GEMV kernel against cuBLAS and the HBM floor.

    python benchmarks/bench_gemv.py                       # llama-2-7b, llama-2-13b, llama-3-8b, llama-2-70b at TP=2
    python benchmarks/bench_gemv.py --shapes llama-2-7b --sweep

For each product of a decoder layer (q/k/v, output, gate/up, down) and the LM head, at
batch 1 in bfloat16: microseconds per product and floor / time, where the floor is
the weight's bytes over the device-copy bandwidth measured in the run. Each product
cycles through copies of its weight (600 MB in all) inside one CUDA graph, so no
weight is found in L2 and no launch gap is timed. ``--sweep`` adds the kernel's
other blockings (columns per step / warps), the best four per product.
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

from offload.memory.bandwidth import measure_device_copy  # noqa: E402
from offload.models import kernels  # noqa: E402
from offload.models.shapes import shape_config  # noqa: E402

ROTATE_BYTES = 600 << 20
DEFAULT_SHAPES = "llama-2-7b,llama-2-13b,llama-3-8b,llama-2-70b@2"


def products(name: str) -> list[tuple[str, int, int]]:
    """(product, output rows, input columns) of one rank of ``name`` (``shape@tp`` for a tensor-parallel rank)."""
    shape, _, tp = name.partition("@")
    c, tp = shape_config(shape), int(tp or 1)
    d, inter, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd // tp, max(c["num_key_value_heads"] // tp, 1) * hd
    return [("qkv", q + 2 * kv, d), ("o", d, q), ("gate_up", 2 * inter // tp, d), ("down", d, inter // tp),
            ("head", -(-c["vocab_size"] // tp), d)]


def time_us(fn, weights: list[torch.Tensor], reps: int = 4) -> float:
    """Microseconds per ``fn(w)``, cycling through ``weights`` inside one CUDA graph (best of three replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compiles the kernel, picks cuBLAS's algorithm
        for w in weights:
            fn(w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for w in weights:
                fn(w)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / (reps * len(weights)))
    return best


def launch(x, w, out, block_k: int, warps: int) -> torch.Tensor:
    kernels._gemv_kernel[(w.shape[0],)](x, w, out, out, out, out, w.shape[1], 0.0, BLOCK_K=block_k,
                                        EVEN_K=w.shape[1] % block_k == 0, HAS_BIAS=False, HAS_RESIDUAL=False, GATE=0,
                                        NORM=0, NORM_BLOCK=1, num_warps=warps,
                                        **kernels.dependent_launch(x.device))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="named shapes, comma-separated; shape@tp for a TP rank")
    p.add_argument("--sweep", action="store_true", help="also time the kernel's other blockings")
    args = p.parse_args()
    if not torch.cuda.is_available() or kernels.triton is None:
        print("bench_gemv needs a GPU and Triton")
        return 2
    device = torch.device("cuda")
    hbm = measure_device_copy(device, 1 << 30)
    print(f"{torch.cuda.get_device_name()}, device copy {hbm / 1e9:.0f} GB/s; us per product (floor / time)")
    blockings = [(k, w) for k, w in itertools.product([512, 1024, 2048, 4096], [2, 4, 8]) if k // (32 * w) >= 4]
    totals = {"floor": 0.0, "gemv": 0.0, "cublas": 0.0}
    for name in args.shapes.split(","):
        for product, n, k in products(name):
            nbytes = n * k * 2
            weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5
                       for _ in range(max(2, -(-ROTATE_BYTES // nbytes)))]
            x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
            got, want = kernels.gemv(x, weights[0]).float(), F.linear(x, weights[0]).float()
            assert (got - want).abs().max() <= 1e-2 * want.abs().max(), "gemv disagrees with F.linear"
            floor = nbytes / hbm * 1e6
            ours, cublas = time_us(lambda w: kernels.gemv(x, w), weights), time_us(lambda w: F.linear(x, w), weights)
            for key, value in (("floor", floor), ("gemv", ours), ("cublas", cublas)):
                totals[key] += value
            line = (f"{name:14s} {product:8s} {n:6d} x {k:5d}: floor {floor:6.1f}  "
                    f"gemv {ours:6.1f} ({floor / ours:.2f})  cublas {cublas:6.1f} ({floor / cublas:.2f})")
            if args.sweep:
                out = torch.empty(1, n, device=device, dtype=torch.bfloat16)
                times = {b: time_us(lambda w, b=b: launch(x, w, out, *b), weights) for b in blockings}
                best = sorted(times, key=times.get)[:4]
                line += "  best: " + ", ".join(f"{b[0]}/{b[1]} {times[b]:.1f}" for b in best)
            print(line, flush=True)
            del weights
            torch.cuda.empty_cache()
    print(f"all products: gemv {totals['floor'] / totals['gemv']:.3f} of the floor, "
          f"cublas {totals['floor'] / totals['cublas']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(report_bad_input("bench_gemv", main))
