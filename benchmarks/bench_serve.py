#!/usr/bin/env python3
"""Serving under load: N concurrent streaming clients, against the same requests served one at a time.

    python benchmarks/bench_serve.py --shape llama-2-13b --gpu-memory 8GiB --clients 32
    python benchmarks/bench_serve.py --model path/to/checkpoint --gpu-memory 20GiB --clients 16
    python benchmarks/bench_serve.py --quick      # the tiny shape on the CPU, in seconds

One offloaded model (seeded random weights of a named shape, or a checkpoint) is
served by this process's HTTP server (uvicorn on one thread, the row engine on
another) on a loopback port, as ``scripts/serve.py`` serves it. Each client sends
one streaming completion request with the official openai client: a prompt of
random token ids, ``--new-tokens`` tokens, greedy, ignoring eos so that every
request makes the same number of tokens.

    concurrent   every client at once: requests join the running batch of --max-batch
                 rows (default: as many as clients, fewer if the budget cannot hold
                 their KV cache) and leave it when done
    sequential   the first --sequential of the same requests, one at a time: each
                 client waits for the previous answer (batch 1, as a plain loop serves)

For each: generated tokens/s over the run's wall time, time to first token (TTFT:
request sent -> first streamed text) and request latency percentiles, and the
engine's steps and mean step time; then the throughput ratio. Every step streams
each offloaded weight once whatever the batch, so concurrent requests share the
bytes that one request alone would wait for. Greedy outputs of the requests both
runs served are compared (equal in float32; in bfloat16 a step's row count can move
a near tie).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import openai  # noqa: E402
import torch  # noqa: E402

import offload  # noqa: E402
from offload.memory.planner import DEFAULT_SLOTS  # noqa: E402
from offload.models.shapes import SHAPES, shape_config  # noqa: E402
from offload.serve import EngineLoop, ServerThread, Service, create_app  # noqa: E402
from offload.text import Tokenizer  # noqa: E402

SEED = 0
DEFAULTS = dict(clients=32, prompt_len="16,128", new_tokens=32, sequential=8)
QUICK = dict(shape="tiny", clients=8, max_batch=4, prompt_len="8,32", new_tokens=8, sequential=8)


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


@dataclass
class Sample:
    """One request as its client saw it."""

    ttft: float  # seconds from sending the request to its first streamed text
    latency: float  # seconds from sending it to its last chunk
    tokens: int
    text: str


@dataclass
class RunResult:
    name: str
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    latency_p50: float
    latency_p99: float
    steps: int
    ms_per_step: float


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", help=f"a named model shape with random weights: {', '.join(SHAPES)}")
    p.add_argument("--model", help="a checkpoint directory (HF config.json + safetensors)")
    p.add_argument("--gpu-memory", help="budget of the compute GPU (default: its free memory less 2 GiB)")
    p.add_argument("--cpu-memory", help="pinned host memory for streamed layers (default: 80%% of available RAM)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--clients", type=int, help=f"concurrent clients, one request each (default {DEFAULTS['clients']})")
    p.add_argument("--max-batch", type=int, help="KV cache rows (default: --clients, halved until the plan fits)")
    p.add_argument("--prompt-len", help=f"min,max prompt tokens (default {DEFAULTS['prompt_len']})")
    p.add_argument("--new-tokens", type=int, help=f"tokens generated per request (default {DEFAULTS['new_tokens']})")
    p.add_argument("--sequential", type=int,
                   help=f"requests served one at a time for the baseline; 0: all (default {DEFAULTS['sequential']})")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--quick", action="store_true", help="the tiny shape on the CPU, a few tokens (for CI)")
    return p.parse_args(argv)


def settings(args) -> dict:
    """Every choice, checked; raises UsageError."""
    if args.quick:
        given = [f for f, v in [("--shape", args.shape), ("--model", args.model), ("--gpu-memory", args.gpu_memory),
                                ("--dtype", args.dtype)] if v]
        if given:
            raise UsageError(f"--quick chooses the model, device, dtype and budget itself; drop {', '.join(given)}")
        defaults = QUICK
    elif bool(args.shape) == bool(args.model):
        raise UsageError("give exactly one of --shape NAME or --model PATH (or --quick)")
    else:
        defaults = DEFAULTS
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults.get(name)  # noqa: E731
    try:
        low, high = (int(v) for v in pick("prompt_len").split(","))
    except ValueError:
        raise UsageError(f"--prompt-len expects min,max such as 16,128, got {pick('prompt_len')!r}") from None
    s = dict(shape=pick("shape"), model=args.model, clients=pick("clients"), max_batch=pick("max_batch"),
             prompt_len=(low, high), new_tokens=pick("new_tokens"), sequential=pick("sequential"))
    if not 1 <= low <= high:
        raise UsageError(f"--prompt-len needs 1 <= min <= max, got {low},{high}")
    max_batch = 1 if s["max_batch"] is None else s["max_batch"]  # None: --clients, halved until the plan fits
    if s["clients"] < 1 or s["new_tokens"] < 1 or s["sequential"] < 0 or max_batch < 1:
        raise UsageError("--clients, --new-tokens and --max-batch must be >= 1, --sequential >= 0")
    s["sequential"] = min(s["sequential"] or s["clients"], s["clients"])
    return s


# ---------------------------------------------------------------------- the model and its server


def load(s: dict, args, device: torch.device):
    """The model with the most KV cache rows (up to --max-batch or --clients) that its budgets can hold."""
    source = str(Path(s["model"])) if s["model"] else shape_config(s["shape"])
    seq = s["prompt_len"][1] + s["new_tokens"]
    kwargs = dict(device=device, dtype=args.dtype, max_seq_len=seq, all_logits=False,  # as the server loads it
                  gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory)
    if args.quick:  # room for half of the layers: the other half streams
        needs = offload.plan_model(source, max_batch=s["max_batch"], **kwargs).needs
        kwargs["gpu_memory"] = needs.gpu_budget_streaming(len(needs.blocks) // 2)
        kwargs["cpu_memory"] = needs.weight_bytes
    rows = s["max_batch"] or s["clients"]
    while True:
        try:
            offload.plan_model(source, max_batch=rows, **kwargs)
            break
        except offload.PlanError:
            if rows == 1 or s["max_batch"]:
                raise
            rows = max(rows // 2, 1)
    random = None if s["model"] else SEED
    return offload.load_model(source, random_weights=random, max_batch=rows, progress=not args.quick, **kwargs)


async def request(client, name: str, prompt: list[int], new_tokens: int) -> Sample:
    sent = time.perf_counter()
    stream = await client.completions.create(model=name, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    first, pieces, tokens = None, [], 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    done = time.perf_counter()
    return Sample((first or done) - sent, done - sent, tokens, "".join(pieces))


async def serve_all(url: str, name: str, prompts: list[list[int]], new_tokens: int, concurrent: bool):
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600) as client:
        start = time.perf_counter()
        if concurrent:
            samples = await asyncio.gather(*(request(client, name, p, new_tokens) for p in prompts))
        else:
            samples = [await request(client, name, p, new_tokens) for p in prompts]
        return list(samples), time.perf_counter() - start


def run(name: str, server, service: Service, prompts, new_tokens: int, concurrent: bool):
    metrics = service.metrics
    steps, step_seconds = metrics.steps, metrics.step_seconds
    samples, seconds = asyncio.run(serve_all(server.url, service.model_name, prompts, new_tokens, concurrent))
    steps, step_seconds = metrics.steps - steps, metrics.step_seconds - step_seconds
    tokens = sum(s.tokens for s in samples)
    ttft, latency = [s.ttft for s in samples], [s.latency for s in samples]
    result = RunResult(name, len(samples), tokens, seconds, tokens / seconds, percentile(ttft, 50),
                       percentile(ttft, 90), percentile(ttft, 99), percentile(latency, 50), percentile(latency, 99),
                       steps, 1e3 * step_seconds / max(steps, 1))
    return result, samples


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


# ---------------------------------------------------------------------- report


def print_table(results: list[RunResult]) -> None:
    print(f"{'run':<11}{'requests':>9}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'TTFT p50':>10}{'p90':>8}"
          f"{'p99':>8}{'latency p50':>13}{'p99':>8}{'steps':>7}{'ms/step':>9}")
    for r in results:
        print(f"{r.name:<11}{r.requests:>9}{r.tokens:>8}{r.seconds:>9.2f}{r.tokens_per_s:>10.1f}{r.ttft_p50:>9.2f}s"
              f"{r.ttft_p90:>7.2f}s{r.ttft_p99:>7.2f}s{r.latency_p50:>12.2f}s{r.latency_p99:>7.2f}s{r.steps:>7}"
              f"{r.ms_per_step:>9.1f}")


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, no GPU)"


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore", offload.OffloadWarning)
    try:
        s = settings(args)
        device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.quick else torch.device("cpu")
        if args.quick:
            torch.set_num_threads(1)  # the tiny model gains nothing from threads; one keeps CI's timings steady
        model = load(s, args, device)
    except (UsageError, offload.OffloadError) as e:
        print(f"bench_serve: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    label = s["model"] or f"{s['shape']} (random weights, seed {SEED})"
    rows, clients = model.max_batch, s["clients"]
    print(f"bench_serve {date}  torch {torch.__version__}  offload {offload.__version__}")
    print(f"hardware: {hardware()}")
    print(model.plan)
    gen = torch.Generator().manual_seed(SEED)
    low, high = s["prompt_len"]
    prompts = [torch.randint(3, model.config.vocab_size, (int(torch.randint(low, high + 1, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(clients)]
    print(f"model: {label}, {str(model.dtype).removeprefix('torch.')}, on {device}; {rows} rows "
          f"(KV cache of {model.max_seq_len} tokens each), {clients} clients, prompts {low}-{high} tokens, "
          f"{s['new_tokens']} new tokens each; sequential baseline: the first {s['sequential']} requests")

    tokenizer = Tokenizer.from_dir(s["model"]) if s["model"] else None
    service = Service(EngineLoop(model, rows), tokenizer, "bench", max_queue=clients)
    with ServerThread(create_app(service)) as server:
        run("warm-up", server, service, prompts[:1], 2, concurrent=False)
        concurrent, together = run("concurrent", server, service, prompts, s["new_tokens"], concurrent=True)
        sequential, alone = run("sequential", server, service, prompts[: s["sequential"]], s["new_tokens"],
                                concurrent=False)
    results = [concurrent, sequential]
    print_table(results)
    same = sum(a.text == b.text for a, b in zip(together, alone))
    ratio = concurrent.tokens_per_s / sequential.tokens_per_s
    print(f"concurrent / sequential throughput: {ratio:.2f}x; greedy outputs equal for {same} of {len(alone)} "
          "requests served both ways")
    summary = (f"bench_serve: {label} on {hardware()}, {clients} clients in {rows} rows: "
               f"{concurrent.tokens_per_s:.1f} tokens/s against {sequential.tokens_per_s:.1f} one at a time "
               f"({ratio:.2f}x); TTFT p50 {concurrent.ttft_p50:.2f} s, p99 {concurrent.ttft_p99:.2f} s "
               f"(alone: p50 {sequential.ttft_p50:.2f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            date=date, hardware=hardware(), torch=torch.__version__, model=label, device=str(device),
            dtype=str(model.dtype).removeprefix("torch."), rows=rows, clients=clients, prompt_len=[low, high],
            new_tokens=s["new_tokens"], gpu_memory=args.gpu_memory, runs=[asdict(r) for r in results],
            ratio=ratio, equal_outputs=same, compared=len(alone), summary=summary), indent=1) + "\n")
    print(summary)
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
