#!/usr/bin/env python3
"""Prefill with streamed layers against its limit: one pass of the streamed bytes, or the resident prefill.

    python benchmarks/bench_prefill.py --shape llama-2-13b --gpu-memory 8GiB --prompts 32x128,1x4096
    python benchmarks/bench_prefill.py --quick      # the tiny shape on the CPU, in seconds

For each prompt shape ROWSxTOKENS the same model (seeded random weights) is loaded
twice with a KV cache for that shape: fully resident (when it fits the GPU), and
under the budget, where the layers that do not fit stream from pinned host memory.
A prefill is one pass: each streamed layer crosses the link once and every token
goes through it in chunks of at most --max-step-tokens. The limit of the offloaded
prefill, measured in this run, is

    max(streamed bytes / measured pinned bandwidth, the resident prefill's time)

and the table gives achieved/limit (1.0 is at the limit).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload.cli import report_bad_input  # noqa: E402

import torch  # noqa: E402

import offload  # noqa: E402
from offload.errors import InputError  # noqa: E402
from offload.memory.bandwidth import PROBE_BYTES, measure_cpu_copy, measure_host  # noqa: E402
from offload.models.shapes import shape_config  # noqa: E402

REPEATS = 3  # timed prefills per load; the first warms up, the fastest of the others counts


def prefill_seconds(model, prompts: list[list[int]]) -> float:
    times = []
    for _ in range(REPEATS + 1):
        model.synchronize()
        start = time.perf_counter()
        model.extend(prompts, [0] * len(prompts))
        model.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def load(shape: dict, rows: int, tokens: int, args, **budget):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return offload.load_model(shape, random_weights=0, dtype=args.dtype, max_batch=rows, max_seq_len=tokens + 1,
                                  max_step_tokens=args.max_step_tokens, progress=False, **budget)


def prompt_shapes(text: str) -> list[tuple[int, int]]:
    """``--prompts`` as (rows, tokens) pairs, each at least 1; InputError (one line, status 2) otherwise."""
    shapes = []
    for item in text.split(","):
        try:
            rows, tokens = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise InputError(f"--prompts expects comma-separated ROWSxTOKENS such as 32x128,1x4096, "
                             f"got {text!r}") from None
        if rows < 1 or tokens < 1:
            raise InputError(f"--prompts: rows and tokens must be >= 1, got {item!r}")
        shapes.append((rows, tokens))
    return shapes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-2-13b")
    p.add_argument("--gpu-memory", default="8GiB")
    p.add_argument("--prompts", default="32x128,1x4096", help="comma-separated ROWSxTOKENS prompt shapes")
    p.add_argument("--max-step-tokens", type=int, default=2048, help="chunk size: tokens per layer call")
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", help="write the rows here too")
    p.add_argument("--quick", action="store_true", help="the tiny shape on the CPU (checks the script)")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.prompts, args.max_step_tokens = "tiny", "4x32,1x96", 64
    shape = shape_config(args.shape)
    prompts_wanted = prompt_shapes(args.prompts)  # before the bandwidth is measured and any model loads
    device = torch.device("cuda") if torch.cuda.is_available() and not args.quick else torch.device("cpu")
    host_bw = measure_host(device, PROBE_BYTES) if device.type == "cuda" else measure_cpu_copy()
    print(f"{args.shape} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}: "
          f"pinned host bandwidth {host_bw / 1e9:.1f} GB/s", flush=True)
    rows_out = []
    for rows, tokens in prompts_wanted:
        prompts = torch.randint(3, shape["vocab_size"], (rows, tokens), generator=torch.Generator().manual_seed(0))
        prompts = prompts.tolist()
        resident = load(shape, rows, tokens, args, link_bandwidth=None) if not args.quick else None
        if resident is not None and set(resident.plan.placement) != {"resident"}:
            resident.close()
            resident = None
        resident_s = prefill_seconds(resident, prompts) if resident is not None else None
        if resident is not None:
            resident.close()
        del resident
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        budget = args.gpu_memory
        if args.quick:  # room for half the layers
            n = offload.plan_model(shape, max_batch=rows, max_seq_len=tokens + 1,
                                   max_step_tokens=args.max_step_tokens).needs
            budget = n.gpu_budget_streaming(len(n.blocks) // 2)
        model = load(shape, rows, tokens, args, gpu_memory=budget, cpu_memory=shape["num_hidden_layers"] * 2**31)
        streamed = model.plan.host_bytes
        offloaded_s = prefill_seconds(model, prompts)
        chunks = len(offload.models.chunks.plan_chunks([tokens] * rows, model.max_step_tokens))
        layers = model.plan.layer_map()
        model.close()
        del model
        gc.collect()
        link_s = streamed / host_bw
        limit = max(link_s, resident_s or 0.0)
        row = dict(prompt=f"{rows}x{tokens}", layers=layers, chunks=chunks, offloaded_s=offloaded_s,
                   resident_s=resident_s, link_s=link_s, limit_s=limit, achieved_over_limit=limit / offloaded_s,
                   tokens_per_s=rows * tokens / offloaded_s)
        rows_out.append(row)
        print(f"  {row['prompt']}: {chunks} chunks, layers {layers}: offloaded {offloaded_s:.3f} s, resident "
              f"{resident_s if resident_s is None else f'{resident_s:.3f}'} s, one pass of the streamed bytes "
              f"{link_s:.3f} s: {row['achieved_over_limit']:.2f} of the limit", flush=True)
    print(f"\n{'prompt':<10}{'chunks':>7}{'offloaded s':>13}{'resident s':>12}{'link s':>9}{'limit s':>9}"
          f"{'achieved/limit':>16}{'tokens/s':>11}")
    for r in rows_out:
        res = f"{r['resident_s']:.3f}" if r["resident_s"] is not None else "-"
        print(f"{r['prompt']:<10}{r['chunks']:>7}{r['offloaded_s']:>13.3f}{res:>12}{r['link_s']:>9.3f}"
              f"{r['limit_s']:>9.3f}{r['achieved_over_limit']:>16.2f}{r['tokens_per_s']:>11,.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(report_bad_input("bench_prefill", main))
