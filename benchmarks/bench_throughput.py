#!/usr/bin/env python3
"""Batch-job throughput in FlexGen's protocol: --batch-size auto against a sweep of batch sizes and accelerate.

    python benchmarks/bench_throughput.py --shape llama-2-70b --gpu-memory 40GiB
    python benchmarks/bench_throughput.py --quick      # the tiny shape on the CPU, in seconds

The job: RECORDS prompts of --prompt-len tokens (seeded random ids), --new-tokens
generated tokens each, greedy; throughput = generated tokens / (prefill + decode
time), as FlexGen reports it. Every run loads the model (seeded random weights)
under the same GPU budget, with a KV cache for its own number of rows, so each
batch size gets its own placement.

    auto        the rows (and with them the placement) --batch-size auto picks from the plans'
                cost model; the whole job is run (run_batch) and timed
    sweep N     N rows; measured: one prefill pass of N prompts and --probe-steps decode passes,
                extrapolated to the job (prefill + (new tokens - 1) decode passes per wave of N);
                the auto choice is probed the same way, so sweep and auto compare like for like
    accelerate  transformers + accelerate, the same weights placed by infer_auto_device_map under
                the same budget (the rest as pageable CPU tensors); the process may allocate no more
                than the budget on the GPU (torch.cuda.set_per_process_memory_fraction), and the
                largest batch that runs within it (the sweep's sizes, then halving) is measured and
                extrapolated like the sweep

The table gives each run's tokens/s and the forecast of the cost model for it.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload.cli import counts, report_bad_input  # noqa: E402

import torch  # noqa: E402

import offload  # noqa: E402
from offload.batch import Record, choose_batch_size, forecast_job, run_batch  # noqa: E402
from offload.distributed import TensorParallel  # noqa: E402
from offload.errors import InputError  # noqa: E402
from offload.models.blocks import checkpoint_sources  # noqa: E402
from offload.models.shapes import shape_config  # noqa: E402
from offload.synthetic import RandomSource  # noqa: E402

SEED = 0


def make_records(n: int, prompt_len: int, vocab: int, new_tokens: int) -> list[Record]:
    gen = torch.Generator().manual_seed(SEED)
    return [Record(f"r{i}", torch.randint(3, vocab, (prompt_len,), generator=gen).tolist(), new_tokens, i + 1)
            for i in range(n)]


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def load(shape: dict, options: offload.LoadOptions, rows: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return offload.load_model(shape, options.replace(max_batch=rows), random_weights=SEED, progress=False)


def forecast(plan, records: list[Record], rows: int) -> float:
    shapes = [(len(r.prompt_ids), r.max_new_tokens) for r in records]
    return forecast_job(shapes, rows, plan.pass_seconds).tokens_per_s


def probe(model, records: list[Record], rows: int, steps: int) -> dict:
    """One prefill pass of ``rows`` prompts and ``steps`` decode passes, timed; the job's tokens/s extrapolated."""
    wave = records[:rows]
    prompts, new = [r.prompt_ids for r in wave], wave[0].max_new_tokens
    model.extend([p[:8] for p in prompts], [0] * rows)  # warm-up (and capture of the decode graphs below)
    model.extend([[1]] * rows, [8] * rows)
    model.synchronize()
    start = time.perf_counter()
    logits = model.extend(prompts, [0] * rows)
    tokens = logits.argmax(-1).tolist()  # waits for the pass
    prefill = time.perf_counter() - start
    cached = [len(p) for p in prompts]
    start = time.perf_counter()
    for _ in range(steps):
        tokens = model.extend([[t] for t in tokens], cached).argmax(-1).tolist()
        cached = [c + 1 for c in cached]
    decode = (time.perf_counter() - start) / steps
    waves = -(-len(records) // rows)
    seconds = waves * (prefill + (new - 1) * decode)
    return dict(rows=rows, prefill_s=prefill, decode_ms=1e3 * decode, tokens_per_s=len(records) * new / seconds)


def run_ours(shape, options, records, rows, steps, full: bool) -> dict:
    model = load(shape, options, rows)
    try:
        row = probe(model, records, rows, steps)
        row.update(layers=model.plan.layer_map(), forecast_tokens_per_s=forecast(model.plan, records, rows))
        if full:  # the whole job, as a batch job runs it
            start = time.perf_counter()
            summary = run_batch(model, records, None, rows, progress=False)
            row["job_tokens_per_s"] = summary.generated_tokens / (time.perf_counter() - start)
        return row
    finally:
        model.close()
        del model
        release()


def run_accelerate(shape: dict, dtype: torch.dtype, gpu_budget: int, records, rows_to_try, steps) -> dict:
    """transformers + accelerate under the same GPU budget: weights made where its device map puts them."""
    import accelerate
    import transformers

    raw = dict(shape)
    hf_config = transformers.AutoConfig.for_model(raw.pop("model_type"), **{k: v for k, v in raw.items()
                                                                            if k != "architectures"})
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    layer_class = type(model.model.layers[0]).__name__
    device_map = accelerate.infer_auto_device_map(model, max_memory={0: gpu_budget, "cpu": 2**50},
                                                  no_split_module_classes=[layer_class], dtype=dtype)
    config = offload.models.config.config_from_dict(shape)
    source = RandomSource(seed=SEED, device="cuda")  # the generator our runs use: the same weights
    for spec, name in checkpoint_sources(config, TensorParallel(), dtype):
        owner = max((k for k in device_map if k == "" or name.startswith(k + ".")), key=len)
        where = "cuda:0" if device_map[owner] in (0, "cuda:0") else "cpu"
        model.load_state_dict({name: source.full_tensor(spec, name, dtype, device=where)}, strict=False, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to("cuda")
    accelerate.dispatch_model(model.eval(), device_map)
    on_cpu = sum(1 for i in range(config.n_layers) if device_map.get(f"model.layers.{i}") == "cpu")
    # The same promise as ours: the KV cache and activations fit inside the budget too.
    torch.cuda.set_per_process_memory_fraction(gpu_budget / torch.cuda.get_device_properties(0).total_memory)
    for rows in rows_to_try:  # the largest batch that runs
        try:
            row = probe_hf(model, records, rows, steps)
            row["layers"] = f"R{config.n_layers - on_cpu} H{on_cpu}"
            return row
        except torch.cuda.OutOfMemoryError:
            print(f"  accelerate: {rows} rows exceed the budget", flush=True)
            release()
    raise RuntimeError("no batch size ran")


@torch.inference_mode()
def probe_hf(model, records, rows: int, steps: int) -> dict:
    wave = records[:rows]
    ids = torch.tensor([r.prompt_ids for r in wave], device="cuda")
    new = wave[0].max_new_tokens
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - start
    cache, start = out.past_key_values, time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    decode = (time.perf_counter() - start) / steps
    waves = -(-len(records) // rows)
    seconds = waves * (prefill + (new - 1) * decode)
    return dict(rows=rows, prefill_s=prefill, decode_ms=1e3 * decode, tokens_per_s=len(records) * new / seconds)


def check_counts(args) -> None:
    """Every count at least 1, checked before the auto job runs (a bad one would fail only after it)."""
    for flag in ("--records", "--prompt-len", "--new-tokens", "--probe-steps"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-2-70b")
    p.add_argument("--gpu-memory", default="40GiB")
    p.add_argument("--cpu-memory", default=None)
    p.add_argument("--records", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--sweep", default="8,16,32,64", help="batch sizes to measure besides the auto choice")
    p.add_argument("--probe-steps", type=int, default=3, help="decode passes timed per sweep point")
    p.add_argument("--skip-accelerate", action="store_true")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--quick", action="store_true", help="the tiny shape on the CPU (checks the script)")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.records, args.prompt_len, args.new_tokens, args.sweep = "tiny", 8, 32, 4, "2,4,8"
        args.skip_accelerate = True
    shape = shape_config(args.shape)
    check_counts(args)
    sweep = set(counts("--sweep", args.sweep, "8,16,32"))
    budget = offload.parse_size(args.gpu_memory, "--gpu-memory")  # parsed on a CPU too, where it goes unused
    cuda = torch.cuda.is_available() and not args.quick
    gpu_budget = budget if cuda else None
    options = offload.LoadOptions(device="cuda" if cuda else "cpu", gpu_memory=gpu_budget, cpu_memory=args.cpu_memory,
                                  max_seq_len=args.prompt_len + args.new_tokens, max_step_tokens=2048)
    records = make_records(args.records, args.prompt_len, shape["vocab_size"], args.new_tokens)
    shapes = [(len(r.prompt_ids), r.max_new_tokens) for r in records]
    if args.quick:  # a budget that holds half the tiny model's layers at 8 rows
        needs = offload.plan_model(shape, options.replace(max_batch=8)).needs
        options = options.replace(gpu_memory=needs.gpu_budget_streaming(len(needs.blocks) // 2),
                                  cpu_memory="1GiB")
    print(f"{args.shape}, {args.records} prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens each, "
          f"GPU budget {args.gpu_memory if cuda else options.gpu_memory}, on "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}", flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best, tried = choose_batch_size(
            shapes, lambda rows: [offload.plan_model(shape, options.replace(max_batch=rows))], len(records))
    print("forecasts: " + ", ".join(f"{f.rows} rows {f.tokens_per_s:.1f} tok/s" for f in tried), flush=True)
    print(f"auto: {best.rows} rows", flush=True)

    rows_out = {}
    rows_out["auto"] = run_ours(shape, options, records, best.rows, args.probe_steps, full=True)
    print(f"  auto {rows_out['auto']}", flush=True)
    for rows in sorted(sweep - {best.rows}):
        if rows > len(records):
            continue
        try:
            rows_out[f"sweep {rows}"] = run_ours(shape, options, records, rows, args.probe_steps, full=False)
            print(f"  sweep {rows}: {rows_out[f'sweep {rows}']}", flush=True)
        except (offload.OffloadError, torch.cuda.OutOfMemoryError) as e:
            print(f"  sweep {rows}: does not run ({str(e).splitlines()[0][:150]})", flush=True)
            release()
    if not args.skip_accelerate and cuda:
        try:
            largest = max(r["rows"] for r in rows_out.values())
            halvings = [largest >> k for k in range(largest.bit_length())]
            rows_to_try = sorted({r["rows"] for r in rows_out.values()} | set(halvings), reverse=True)
            rows_out["accelerate"] = run_accelerate(shape, offload.parse_dtype(None, "cuda"), gpu_budget, records,
                                                    rows_to_try, args.probe_steps)
            print(f"  accelerate: {rows_out['accelerate']}", flush=True)
        except Exception:
            traceback.print_exc()
        release()

    print(f"\n{'run':<12}{'rows':>5}  {'layers':<22}{'prefill s':>10}{'decode ms':>11}{'tokens/s':>10}"
          f"{'forecast':>10}{'whole job':>11}")
    for name, r in rows_out.items():
        layers = r.get("layers", "")
        layers = layers if len(layers) <= 20 else f"R{layers.count('R')} H{layers.count('H')}"
        print(f"{name:<12}{r['rows']:>5}  {layers:<22}{r['prefill_s']:>10.2f}{r['decode_ms']:>11.1f}"
              f"{r['tokens_per_s']:>10.1f}{r.get('forecast_tokens_per_s', float('nan')):>10.1f}"
              f"{r.get('job_tokens_per_s', float('nan')):>11.1f}")
    ours = [r for name, r in rows_out.items() if name != "accelerate"]
    top = max(ours, key=lambda r: r["tokens_per_s"])
    print(f"auto chose {best.rows} rows: {rows_out['auto']['tokens_per_s'] / top['tokens_per_s']:.2f} of the best "
          f"measured ({top['rows']} rows, {top['tokens_per_s']:.1f} tokens/s)"
          + (f"; {rows_out['auto']['tokens_per_s'] / rows_out['accelerate']['tokens_per_s']:.1f}x accelerate"
             if "accelerate" in rows_out else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(report_bad_input("bench_throughput", main))
