#!/usr/bin/env python3
"""Tensor parallelism composed with offloading: decode speed at TP=1, 2, ... with the same per-GPU budget.

    python benchmarks/bench_tp.py --shape llama-2-13b --gpu-memory 8GiB --tp 1,2
    python benchmarks/bench_tp.py --shape llama-2-13b --gpu-memory 8GiB --tp 2 \
        --peer-memory cuda:2=60GiB --peer-memory cuda:3=60GiB       # GPUs 2 and 3 lend memory to ranks 0 and 1

For each TP size the script starts ``torchrun --nproc-per-node N`` on itself; every
rank loads its shard of a random-weight model under the same per-GPU budget and
streams what does not fit from the host, and rank 0 reports decode ms/token at
batch 1 next to the plan's link limit (the slowest rank's streamed bytes over its
share of the host link, measured with all ranks pulling at once). The table gives
the speed-up of each TP size over TP=1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offload.cli import counts, report_bad_input  # noqa: E402
from offload.models.shapes import shape_config  # noqa: E402


def worker(args) -> None:
    import torch

    import offload

    warnings.simplefilter("ignore", offload.OffloadWarning)
    model = offload.load_model(shape_config(args.shape), random_weights=0, tp=int(os.environ["WORLD_SIZE"]),
                               dtype=args.dtype, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
                               peer_memory=args.peer_memory, max_seq_len=args.prompt_len + args.tokens,
                               cuda_graphs=not args.eager, progress=False)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    model.generate(ids, max_new_tokens=4, ignore_eos=True)  # warm-up
    result = model.generate(ids, max_new_tokens=args.tokens, ignore_eos=True, return_result=True)
    limit = max(p.predicted_step_seconds for p in model.plans)
    if model.tp.rank == 0:
        row = {"tp": model.tp.size, "graphs": not args.eager, "ms_per_token": result.ms_per_step,
               "limit_ms": 1e3 * limit,
               "host_gib_per_rank": [p.host_bytes / 2**30 for p in model.plans],
               "layers": [p.layer_map() for p in model.plans],
               "host_gb_s_per_rank": model.plan.bandwidth["host"] / 1e9,
               "peers": [list(p.budget.peer_memory) for p in model.plans]}
        Path(args.result).write_text(json.dumps(row))
    model.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-2-13b")
    p.add_argument("--gpu-memory", default="8GiB", help="budget of each GPU")
    p.add_argument("--cpu-memory", default=None, help="pinned host memory of each rank")
    p.add_argument("--peer-memory", action="append", metavar="DEVICE=SIZE",
                   help="a GPU outside the TP group lending memory (repeatable; dealt out to the ranks in turn)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--tp", default="1,2", help="TP sizes to compare, e.g. 1,2,4")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16, help="decode steps timed")
    p.add_argument("--json", help="write the rows here too")
    p.add_argument("--with-eager", action="store_true", help="also run each TP size with eager decode steps")
    p.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    # Checked here, not in the workers: there a bad shape ends in torchrun's traceback of every rank.
    shape_config(args.shape)
    sizes = counts("--tp", args.tp, "1,2,4")

    rows = []
    modes = [False, True] if args.with_eager else [False]
    for size, eager in [(s, e) for s in sizes for e in modes]:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={size}", __file__, "--worker",
                   "--result", out.name, "--shape", args.shape, "--gpu-memory", args.gpu_memory, "--dtype",
                   args.dtype, "--prompt-len", str(args.prompt_len), "--tokens", str(args.tokens)]
            if args.cpu_memory:
                cmd += ["--cpu-memory", args.cpu_memory]
            for peer in args.peer_memory or []:
                cmd += ["--peer-memory", peer]
            if eager:
                cmd.append("--eager")
            if subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode != 0:
                print(f"TP={size} failed", file=sys.stderr)
                return 1
            rows.append(json.loads(Path(out.name).read_text()))
    base = rows[0]["ms_per_token"]
    print(f"\n{args.shape}, {args.dtype}, per-GPU budget {args.gpu_memory}, batch 1")
    print(f"{'tp':>3} {'decode':>7} {'ms/token':>10} {'limit ms':>10} {'achieved/limit':>15} {'speed-up':>9}  "
          "host GiB per rank  host GB/s per rank  layers of rank 0 (R resident, H host, digit: peer)")
    for r in rows:
        mode = "graphs" if r["graphs"] else "eager"
        print(f"{r['tp']:>3} {mode:>7} {r['ms_per_token']:>10.1f} {r['limit_ms']:>10.1f} "
              f"{r['limit_ms'] / r['ms_per_token']:>15.2f} {base / r['ms_per_token']:>8.2f}x  "
              f"{', '.join(f'{g:.1f}' for g in r['host_gib_per_rank'])}  {r['host_gb_s_per_rank']:.1f}  "
              f"{r['layers'][0]}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(report_bad_input("bench_tp", main))
