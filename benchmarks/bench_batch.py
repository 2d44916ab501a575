#!/usr/bin/env python3
"""A batch job of mixed-length prompts through an offloaded model: dynamic batching against plain FIFO.

    python benchmarks/bench_batch.py --shape llama-2-7b --gpu-memory 12GiB --records 256 --batch-size 32

Both schedules run the same records through the same loaded model and budget, in
one run: ``dynamic`` takes records longest first and refills a row as soon as its
sequence ends (every step, which streams every weight once, serves every row);
``fifo`` runs fixed batches in input order, each until its longest member ends.
The table gives records/s, tokens/s, steps and row occupancy, and the throughput ratio,
and the script counts the records whose greedy outputs agree: all of them in
float32; in bfloat16 a row's matrix products depend on how many rows share the
step (the GPU picks kernels by shape), so a near tie can go the other way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload.cli import report_bad_input  # noqa: E402

import torch  # noqa: E402

import offload  # noqa: E402
from offload.batch import Record, ResultFile, run_batch  # noqa: E402
from offload.errors import InputError  # noqa: E402
from offload.models.shapes import shape_config  # noqa: E402


def make_records(n: int, vocab: int, prompt_range, new_range, seed: int = 0) -> list[Record]:
    gen = torch.Generator().manual_seed(seed)
    randint = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    return [Record(f"r{i}", torch.randint(3, vocab, (randint(*prompt_range),), generator=gen).tolist(),
                   randint(*new_range), i + 1) for i in range(n)]


def token_range(flag: str, text: str) -> tuple[int, int]:
    """``LO,HI`` of ``flag`` as two integers with 1 <= LO <= HI; InputError (one line, status 2) otherwise."""
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{flag} expects LO,HI such as 16,256, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise InputError(f"{flag} needs 1 <= LO <= HI, got {lo},{hi}")
    return lo, hi


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-2-7b")
    p.add_argument("--dtype", default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--gpu-memory", default="12GiB")
    p.add_argument("--cpu-memory", default=None)
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prompt-len", default="16,256", help="min,max prompt tokens")
    p.add_argument("--new-tokens", default="4,32", help="min,max new tokens per record")
    p.add_argument("--max-step-tokens", type=int, default=4096)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    # checked before the model loads: a bad range or count would otherwise fail only after it
    prompt_range = token_range("--prompt-len", args.prompt_len)
    new_range = token_range("--new-tokens", args.new_tokens)
    for flag, value in (("--records", args.records), ("--batch-size", args.batch_size)):
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")

    warnings.simplefilter("ignore", offload.OffloadWarning)
    model = offload.load_model(shape_config(args.shape), random_weights=0, dtype=args.dtype,
                               gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory, max_batch=args.batch_size,
                               max_seq_len=prompt_range[1] + new_range[1], max_step_tokens=args.max_step_tokens)
    print(model.plan)
    records = make_records(args.records, model.config.vocab_size, prompt_range, new_range)
    run_batch(model, records[:2], None, 2, progress=False)  # warm-up

    rows, outputs = {}, {}
    for schedule in ("dynamic", "fifo"):
        with tempfile.TemporaryDirectory() as tmp:
            results = ResultFile(Path(tmp) / "out.jsonl")
            start = time.perf_counter()
            summary = run_batch(model, records, results, args.batch_size, schedule=schedule, progress=False)
            seconds = time.perf_counter() - start
            results.close()
            outputs[schedule] = {json.loads(line)["id"]: json.loads(line)["output_ids"]
                                 for line in (Path(tmp) / "out.jsonl").read_text().splitlines()}
        rows[schedule] = dict(seconds=seconds, records_per_s=len(records) / seconds,
                              tokens_per_s=summary.generated_tokens / seconds, steps=summary.steps,
                              occupancy=summary.occupancy, generated=summary.generated_tokens)
        print(f"{schedule}: {summary}")

    same = sum(outputs["dynamic"][k] == outputs["fifo"][k] for k in outputs["fifo"])
    ratio = rows["dynamic"]["tokens_per_s"] / rows["fifo"]["tokens_per_s"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{args.records} records, prompts {prompt_range[0]}-{prompt_range[1]} tokens, "
          f"{new_range[0]}-{new_range[1]} new tokens, batch {args.batch_size}, {args.shape} on {device}")
    print(f"{'schedule':<9}{'seconds':>9}{'records/s':>11}{'tokens/s':>10}{'steps':>7}{'rows busy':>11}")
    for name, r in rows.items():
        print(f"{name:<9}{r['seconds']:>9.1f}{r['records_per_s']:>11.2f}{r['tokens_per_s']:>10.1f}"
              f"{r['steps']:>7}{100 * r['occupancy']:>10.1f}%")
    print(f"dynamic / fifo throughput: {ratio:.2f}x; greedy outputs identical for {same} of {len(records)} records")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio": ratio, "identical_records": same}, indent=1))
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(report_bad_input("bench_batch", main))
