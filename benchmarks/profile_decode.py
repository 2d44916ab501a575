#!/usr/bin/env python3
"""Where a decode step's time goes: the GPU's time per pass against what generate sees, and the kernels.

    python benchmarks/profile_decode.py --shape llama-2-7b --prompts 32,128 --compile --kernels
    python benchmarks/profile_decode.py --shape llama-2-7b --quantize int4 --batch 16

For each prompt length, after a warm-up generation (it captures the decode graphs):

    generate   generate's decode ms/step (pipelined passes, host reads included)
    gpu        ms per decode pass with the host out of the way: passes queued back to back
               on the same inputs, timed by CUDA events
    floor      layer weights (compressed, with --quantize) / the device-copy bandwidth measured in the run

``generate`` near ``gpu`` means the host keeps ahead of the GPU; ``gpu`` near ``floor``
means the kernels read the weights at the speed of HBM. With ``--kernels``, the
profiler's table of one pass's kernels.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload.cli import report_bad_input  # noqa: E402

import torch  # noqa: E402

import offload  # noqa: E402
from offload.memory.bandwidth import measure_device_copy  # noqa: E402
from offload.models.shapes import shape_config  # noqa: E402

PROBE_BYTES = 1 << 30
PASSES = 50


def gpu_ms_per_pass(model, positions: int, rows: int = 1) -> float:
    tokens = torch.ones(rows, dtype=torch.long, device=model.device)
    model.decode(tokens, [positions] * rows)  # this bucket is captured already; one more as a warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(PASSES):
        model.decode(tokens, [positions] * rows)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / PASSES


def kernel_table(model, positions: int, rows: int = 1) -> str:
    tokens = torch.ones(rows, dtype=torch.long, device=model.device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            model.decode(tokens, [positions] * rows)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-2-7b")
    p.add_argument("--gpu-memory", default=None)
    p.add_argument("--prompts", default="32,128", help="prompt lengths, comma-separated")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None)
    p.add_argument("--batch", type=int, default=1, help="rows decoded together")
    p.add_argument("--kernels", action="store_true", help="print the profiler's kernel table per prompt length")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("profile_decode needs a GPU")
        return 2
    shape = shape_config(args.shape)
    lengths = [int(x) for x in args.prompts.split(",")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = offload.load_model(shape, random_weights=0, progress=False, gpu_memory=args.gpu_memory,
                                   max_batch=args.batch, max_seq_len=max(lengths) + args.new_tokens + 1,
                                   compile=args.compile, cuda_graphs=not args.no_cuda_graphs, quantize=args.quantize)
    hbm = measure_device_copy(model.device, PROBE_BYTES)
    floor_ms = 1e3 * model.plan.needs.weight_bytes / hbm
    print(f"{args.shape} {args.quantize or 'bf16'} batch {args.batch}: {model.plan.layer_map()}, "
          f"compile={args.compile}, graphs={not args.no_cuda_graphs}, "
          f"HBM copy {hbm / 1e9:.0f} GB/s, floor {floor_ms:.2f} ms")
    gen = torch.Generator().manual_seed(0)
    for length in lengths:
        ids = torch.randint(3, shape["vocab_size"], (args.batch, length), generator=gen)
        for _ in range(3):  # the first captures (and compiles) this bucket
            result = model.generate(ids, max_new_tokens=args.new_tokens, ignore_eos=True, return_result=True)
        gpu = gpu_ms_per_pass(model, length + args.new_tokens // 2, args.batch)
        predicted = 1e3 * model.plan.step_seconds(args.batch, args.batch * (length + args.new_tokens // 2))
        print(f"prompt {length}: generate {result.ms_per_step:.2f} ms/step, gpu {gpu:.2f} ms/pass, "
              f"floor {floor_ms:.2f} ms; generate/floor {result.ms_per_step / floor_ms:.2f}, "
              f"gpu/floor {gpu / floor_ms:.2f}; plan predicted {predicted:.2f} ms (gpu/predicted "
              f"{gpu / predicted:.2f})", flush=True)
        if args.kernels:
            print(kernel_table(model, length + args.new_tokens // 2, args.batch), flush=True)
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(report_bad_input("profile_decode", main))
