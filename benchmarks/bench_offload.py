"""How fast each placement decodes, against the limit of the links and against accelerate.

    python benchmarks/bench_offload.py --shape llama-2-13b --gpu-memory 8GiB
    python benchmarks/bench_offload.py --model path/to/checkpoint --gpu-memory 20GiB --json out.json
    python benchmarks/bench_offload.py --quick      # the tiny shape on the CPU, in seconds (CI runs this)

The same model (seeded random weights, or a checkpoint) is loaded once per run,
each time with the same budget on the compute GPU:

    resident     the whole model on the GPU (only when it fits in the GPU's free memory)
    host         the layers that do not fit stream from pinned host RAM
    peer         ... from a second GPU's memory (two or more GPUs)
    host+peer    ... from both: the peer holds about half of them
    host prefetch  (a mixture of experts) host, each routed layer guessing the next one's experts and copying
                 them ahead
    ... direct / ... copied  (a mixture of experts) the run with its experts computed the other way: read
                 where they live (the default where every expert fits), or copied into the cache (the
                 default where they stream)
    accelerate   transformers + accelerate (``infer_auto_device_map`` / ``dispatch_model``),
                 the same weights as ordinary pageable CPU tensors, the same budget

On a GPU each of our runs is made twice: with decode steps replayed as CUDA graphs
(the default; a mixture of experts whose experts are copied replays graph pieces, each
layer up to its routing) and eager ("... eager", every kernel launched from Python).

Limits, every figure measured in this run on this machine:

    decode step   t >= max(bytes streamed over each link / that link's bandwidth,
                           all layer bytes / HBM bandwidth)
        A decode step reads every weight once. Streamed weights must first cross their
        link; the links copy at the same time, so the slowest one bounds the step, and
        nothing is faster than reading every weight from HBM. ``plan.link_seconds()``
        gives each term, for a plan made with the bandwidths measured here. For
        accelerate the streamed bytes are those of the modules it put on "cpu", over the
        pinned bandwidth: what the link allows (it copies from pageable memory, whose
        bandwidth is printed beside it, so it cannot reach that).
    prefill       t >= max(bytes streamed / bandwidth, the resident run's prefill time)
        (the HBM floor stands in for compute when there is no resident run).

    achieved/limit = limit / achieved time: 1.0 is at the limit.

Timing: our runs load the model once per batch size (the KV cache and the
activations are reserved for that batch, as a user would), generate PASSES times
and keep each phase's fastest pass (the first warms up); accelerate, at seconds
per step, gets one short warm-up and one pass of --accelerate-tokens. Prefill is
one forward pass (max_step_tokens = batch x prompt length); a decode step makes
one token per row.

With --quick there is no GPU: every tier is RAM and every link a memcpy, so the
figures check that the benchmark works, not how fast anything is; accelerate
offloads to disk there (its only offload target on a CPU).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import platform
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

import offload  # noqa: E402
from offload.cli import counts
from offload.distributed import TensorParallel
from offload.memory.bandwidth import PROBE_BYTES, measure_cpu_copy, measure_device_copy, measure_host, measure_peer
from offload.memory.bandwidth import peer_is_direct
from offload.memory.planner import HOST, RESIDENT
from offload.models.checkpoint import CheckpointSource
from offload.models.config import config_from_dict
from offload.models.quant import FORMATS, STORED
from offload.models.blocks import checkpoint_sources
from offload.models.registry import family_of
from offload.models.shapes import SHAPES, shape_config
from offload.synthetic import RandomSource

SEED = 0
COPY_REPEATS = 5
PASSES = 3  # generations per batch in our runs: the first warms up, the fastest counts
GPU_HEADROOM = 2 * 2**30  # left free on a peer for its CUDA context and allocator slack
WARMUP_PROMPT = 8  # tokens of accelerate's warm-up prompt
QUICK = dict(shape="tiny", prompt_len=16, decode_tokens=8, batch="1,4", accelerate_tokens=4)
DEFAULTS = dict(prompt_len=128, decode_tokens=16, batch="1,16", accelerate_tokens=4, gpu_memory="8GiB")
TIER_LETTER = {RESIDENT: "R", HOST: "H", "peer": "P", "disk": "D"}
# Every name our_runs can give (less " eager"), on some machine and model; --quantize adds "host FORMAT" and its twins.
OUR_RUNS = ("resident", "host", "host prefetch", "resident direct", "resident copied", "host direct", "host copied",
            "peer", "host+peer")
EXPERT_TWINS = ("", " direct", " copied")
QUANTIZE_FORMATS = (*FORMATS, STORED)  # what load_model's quantize takes


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


@dataclass
class Bench:
    """What every run shares: the model, the device, the budget, the workload and the links."""

    model: object  # what load_model takes: a config dict (random weights) or a checkpoint path
    config: offload.ModelConfig
    label: str
    device: torch.device
    dtype: torch.dtype
    gpu_memory: int
    prompt_len: int
    decode_tokens: int
    batches: list[int]
    accelerate_tokens: int
    quick: bool
    quantized: list[tuple[str, int | None]] = field(default_factory=list)  # (format, GPU budget or None: the same)
    wanted: set[str] | None = None  # --runs: the names of our runs to make (None: every one)
    links: dict[str, float] = field(default_factory=dict)  # bytes/s: host, pageable, hbm, and each peer

    @property
    def random(self) -> bool:
        return isinstance(self.model, dict)

    @property
    def peers(self) -> list[str]:
        return [name for name in self.links if name.startswith("cuda:")]

    @property
    def layer_bytes(self) -> int:
        return family_of(self.config.architecture).layer_layout(self.config, TensorParallel(), self.dtype).nbytes

    def load_args(self, batch: int) -> dict:
        """The arguments of every ``plan_model`` / ``load_model`` call but the budgets.

        Each batch size gets its own load: a user decoding one sequence reserves a KV cache
        for one, not for the largest batch of the benchmark.
        """
        return dict(
            device=self.device, dtype=self.dtype, max_batch=batch,
            max_seq_len=self.prompt_len + self.decode_tokens,  # small, so the KV cache is small
            max_step_tokens=batch * self.prompt_len,  # the prefill is one step
            link_bandwidth={k: v for k, v in self.links.items() if k != "pageable"},  # plan and table agree
        )


@dataclass
class Timing:
    prompt_tokens: int
    prefill_seconds: float
    decode_steps: int
    decode_tokens: int
    decode_seconds: float

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_seconds / self.decode_steps

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds


@dataclass
class Run:
    name: str
    layers: dict[int, dict[str, int]] = field(default_factory=dict)  # by batch: layers per place (TIER_LETTER keys)
    link_seconds: dict[int, dict[str, float]] = field(default_factory=dict)  # by batch: each link's copy time
    whole_layer_seconds: dict[int, float] = field(default_factory=dict)  # by batch: streaming every expert (MoE)
    timings: dict[int, Timing] = field(default_factory=dict)  # by batch size
    logits: torch.Tensor | None = None  # row 0's next-token logits: the weights must be the same everywhere
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------- command line


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", help=f"a named model shape with random weights: {', '.join(SHAPES)}")
    p.add_argument("--model", help="a checkpoint directory (HF config.json + safetensors)")
    p.add_argument("--gpu-memory", help=f"budget of the compute GPU for every run (default {DEFAULTS['gpu_memory']})")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--prompt-len", type=int, help=f"prompt tokens per row (default {DEFAULTS['prompt_len']})")
    p.add_argument("--decode-tokens", type=int, help=f"new tokens per row (default {DEFAULTS['decode_tokens']})")
    p.add_argument("--batch", help=f"comma-separated batch sizes (default {DEFAULTS['batch']})")
    p.add_argument("--accelerate-tokens", type=int,
                   help=f"new tokens per row for accelerate, which is slow (default {DEFAULTS['accelerate_tokens']})")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--quick", action="store_true", help="the tiny shape on the CPU, a few tokens (for CI)")
    p.add_argument("--skip-accelerate", action="store_true", help="leave out the accelerate run")
    p.add_argument("--runs", help="only these of our runs, comma separated (e.g. resident,peer); "
                   "each comes with its eager twin on a GPU")
    p.add_argument("--quantize", help="also run the host tier with compressed layers: FORMAT[@BUDGET],... "
                   "e.g. int8@8GiB,int4@4GiB (the budget defaults to --gpu-memory)")
    return p.parse_args(argv)


def bench_from_args(args) -> Bench:
    """Check the command line and settle every choice; raises UsageError or OffloadError on bad input."""
    if args.quick:
        given = [flag for flag, value in [("--shape", args.shape), ("--model", args.model),
                                          ("--gpu-memory", args.gpu_memory), ("--dtype", args.dtype)] if value]
        if given:
            raise UsageError(f"--quick chooses the model, device, dtype and budget itself; drop {', '.join(given)}")
        defaults = QUICK
    else:
        if bool(args.shape) == bool(args.model):
            raise UsageError("give exactly one of --shape NAME or --model PATH (or --quick)")
        defaults = DEFAULTS
    setting = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults[name]  # noqa: E731
    prompt_len, decode_tokens = setting("prompt_len"), setting("decode_tokens")
    accelerate_tokens, batches = setting("accelerate_tokens"), counts("--batch", setting("batch"), "1,16")
    if prompt_len < 1:
        raise UsageError(f"--prompt-len must be >= 1, got {prompt_len}")
    if decode_tokens < 2 or accelerate_tokens < 2:
        raise UsageError("--decode-tokens and --accelerate-tokens must be >= 2 (the first token comes from prefill)")

    if args.model:
        model, label, config = str(Path(args.model)), args.model, offload.load_config(args.model)
    else:
        shape = QUICK["shape"] if args.quick else args.shape
        model = shape_config(shape)
        config, label = config_from_dict(model), f"{shape} (random weights, seed {SEED})"
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.quick else torch.device("cpu")
    dtype = offload.parse_dtype(args.dtype, device)
    # --quick sizes its budget from the plan once the links are known (quick_budget, in main).
    gpu_memory = 0 if args.quick else offload.parse_size(setting("gpu_memory"), "--gpu-memory")
    quantized = parse_quantize(args.quantize or "", checkpoint=bool(args.model))
    return Bench(model, config, label, device, dtype, gpu_memory, prompt_len, decode_tokens, batches,
                 accelerate_tokens, args.quick, quantized, wanted=parse_runs(args.runs, quantized))


def parse_quantize(text: str, checkpoint: bool) -> list[tuple[str, int | None]]:
    """--quantize as (format, GPU budget or None); an unknown format is refused here, not skipped after every run."""
    quantized = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        fmt, _, size = item.partition("@")
        if fmt not in QUANTIZE_FORMATS:
            raise UsageError(f"--quantize: unknown format {fmt!r}; choose from {', '.join(QUANTIZE_FORMATS)}")
        if fmt == STORED and not checkpoint:  # random weights are never stored compressed
            raise UsageError("--quantize stored keeps a checkpoint's own compressed formats: it goes with --model")
        quantized.append((fmt, offload.parse_size(size, "--quantize budget") if size else None))
    return quantized


def parse_runs(text: str | None, quantized: list[tuple[str, int | None]]) -> set[str] | None:
    """--runs as a set of run names (None: every run); a name no machine could make is refused, since it would
    leave nothing of ours to run."""
    if text is None:
        return None
    wanted = {name.strip() for name in text.split(",") if name.strip()}
    known = [*OUR_RUNS, *(f"host {fmt}{twin}" for fmt, _ in quantized for twin in EXPERT_TWINS)]
    unknown = sorted(wanted - set(known))
    if unknown or not wanted:
        what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "no run named"
        raise UsageError(f"--runs: {what}; choose from {', '.join(known)} (host FORMAT with --quantize FORMAT; "
                         f"each run's eager twin comes with it on a GPU; accelerate runs unless --skip-accelerate)")
    return wanted


# ---------------------------------------------------------------------- links


def measure_links(device: torch.device) -> dict[str, float]:
    """Bytes/s of every link into ``device``, measured now (the planner's cache is not consulted)."""
    if device.type != "cuda":
        memcpy = measure_cpu_copy()  # on a CPU every tier is RAM and every link a memcpy
        return {"host": memcpy, "pageable": memcpy, "hbm": memcpy}
    links = {"host": measure_host(device, PROBE_BYTES), "pageable": measure_pageable(device, PROBE_BYTES),
             "hbm": measure_device_copy(device, PROBE_BYTES)}
    for index in range(torch.cuda.device_count()):
        if index != device.index:
            links[f"cuda:{index}"] = measure_peer(device, torch.device("cuda", index), PROBE_BYTES)
    return links


def measure_pageable(device: torch.device, size: int) -> float:
    """Bytes/s of a plain CPU tensor copied to the GPU: how a model loaded the usual way streams."""
    src = torch.empty(size, dtype=torch.uint8).fill_(1)  # touched, so the pages are real and not the zero page
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    dst.copy_(src)  # warm-up
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(COPY_REPEATS):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return COPY_REPEATS * size / (time.perf_counter() - start)


def print_links(bench: Bench) -> None:
    links, gb_s = bench.links, lambda bw: f"{bw / 1e9:8.1f} GB/s"  # noqa: E731
    if bench.device.type != "cuda":
        print(f"links: none (no GPU); a RAM copy moves {gb_s(links['host']).strip()}")
        return
    print(f"links into {bench.device}, measured now with {PROBE_BYTES // 2**20} MiB copies:")
    print(f"  host, pinned       {gb_s(links['host'])}")
    print(f"  host, pageable     {gb_s(links['pageable'])}   (what accelerate streams from)")
    for peer in bench.peers:
        how = "peer-to-peer" if peer_is_direct(bench.device, peer) else "no peer access: through host memory"
        print(f"  {peer:<18} {gb_s(links[peer])}   ({how})")
    print(f"  HBM copy (r + w)   {gb_s(links['hbm'])}")


# ---------------------------------------------------------------------- our runs


def our_runs(bench: Bench) -> list[tuple[str, dict]]:
    """(name, budget) of every placement this machine can show, all with the same GPU budget."""
    try:
        needs = offload.plan_model(bench.model, **bench.load_args(bench.batches[0])).needs
    except offload.PlanError:  # too large for this machine in 16 bits (405b): its compressed runs alone
        if not bench.quantized:
            raise
        needs = offload.plan_model(bench.model, **bench.load_args(bench.batches[0]), quantize=bench.quantized[0][0],
                                   gpu_memory=bench.quantized[0][1] or bench.gpu_memory, cpu_memory=2**50).needs
        everything = len(needs.blocks) * needs.largest_block + needs.embedding_bytes
        everything += needs.experts.total_bytes if needs.experts else 0
        runs = [(f"host {fmt}", dict(gpu_memory=gpu_memory or bench.gpu_memory, cpu_memory=everything, quantize=fmt))
                for fmt, gpu_memory in bench.quantized]
        if needs.experts:  # beside the default way to compute the experts, the other
            runs += [expert_twin(bench, name, budget) for name, budget in runs]
        return runs
    experts = needs.experts.total_bytes if needs.experts else 0
    # Room for every layer (the planner counts each streamed one as the largest: a GGUF file's layers differ), the
    # embedding table and every expert: this budget never binds.
    everything = len(needs.blocks) * needs.largest_block + needs.embedding_bytes + experts
    host = dict(gpu_memory=bench.gpu_memory, cpu_memory=everything)
    runs = [("resident", {}), ("host", host)]
    if needs.experts:  # the next layer's experts guessed and copied ahead; or read where they live, not copied
        runs.append(("host prefetch", dict(host, prefetch_experts=True)))
        runs += [expert_twin(bench, "resident", {}), expert_twin(bench, "host", host)]
    if bench.peers:
        peer = bench.peers[0]
        room = min(everything, max(torch.cuda.mem_get_info(torch.device(peer))[0] - GPU_HEADROOM, 0))
        streamed = offload.plan_model(bench.model, **bench.load_args(bench.batches[0]), **host).blocks_on(HOST)
        half = len(streamed) // 2 * bench.layer_bytes  # the peer takes half, so both links carry bytes
        runs.append(("peer", dict(gpu_memory=bench.gpu_memory, cpu_memory=0, peer_memory={peer: room})))
        runs.append(("host+peer", dict(host, peer_memory={peer: half})))
    if bench.device.type == "cuda":  # each beside its eager twin: decode steps launched one kernel at a time
        runs = [r for name, budget in runs for r in [(name, budget), (f"{name} eager", {**budget, "cuda_graphs": False})]]
    for fmt, gpu_memory in bench.quantized:  # compressed layers: fewer bytes per streamed layer, more resident
        runs.append((f"host {fmt}", dict(gpu_memory=gpu_memory or bench.gpu_memory, cpu_memory=everything,
                                          quantize=fmt)))
    return runs


def expert_twin(bench: Bench, name: str, budget: dict) -> tuple[str, dict]:
    """Run ``name`` of a mixture of experts the other way: copied where its default reads the experts directly
    (every expert on the GPU), read directly where it copies them (experts streamed)."""
    direct = offload.plan_model(bench.model, **bench.load_args(max(bench.batches)), **budget).needs.experts.direct
    if direct:
        return f"{name} copied", dict(budget, direct_experts=False)
    return f"{name} direct", dict(budget, direct_experts=True)


def quick_budget(bench: Bench) -> int:
    """With --quick: room for half the layers besides what must stay (and the slots), so the other half streams."""
    needs = offload.plan_model(bench.model, **bench.load_args(max(bench.batches))).needs
    return needs.gpu_budget_streaming(len(needs.blocks) // 2)


def why_not(bench: Bench, name: str, budget: dict) -> str | None:
    """Why run ``name`` cannot be made here, or None."""
    if name.startswith("host+peer") and not budget["peer_memory"][bench.peers[0]]:
        return "fewer than 2 layers stream, nothing to share between host and peer"
    try:  # the largest batch reserves the most
        plan = offload.plan_model(bench.model, **bench.load_args(max(bench.batches)), **budget)
    except offload.OffloadError as e:
        return str(e)
    if name.startswith("resident") and plan.blocks_on(RESIDENT) != list(range(bench.config.n_layers)):
        return f"the model does not fit in the free memory of {bench.device}"
    return None


class TimeUp(BaseException):
    """SIGTERM (a stage's time limit): the batches measured so far are reported, the rest skipped. ``partial``: the
    run that was under way, with what it had measured."""

    partial = None


def _time_up(signum, frame):
    raise TimeUp


def run_ours(bench: Bench, name: str, budget: dict, ids: torch.Tensor) -> Run:
    run = Run(name)
    try:
        return _measure_batches(bench, run, budget, ids)
    except TimeUp as stop:
        stop.partial = run
        raise


def _measure_batches(bench: Bench, run: Run, budget: dict, ids: torch.Tensor) -> Run:
    name = run.name
    for batch in bench.batches:
        print(f"\n{name}, batch {batch}: loading", flush=True)
        with offload.load_model(bench.model, **bench.load_args(batch), **budget, progress=False,
                                random_weights=SEED if bench.random else None) as model:
            plan = model.plan
            print("\n".join("  " + line for line in str(plan).splitlines()), flush=True)
            run.layers[batch] = {RESIDENT: len(plan.blocks_on(RESIDENT)), HOST: len(plan.blocks_on(HOST)),
                                 "peer": sum(len(plan.blocks_on(p)) for p in plan.budget.peer_memory)}
            run.link_seconds[batch] = plan.link_seconds(batch)  # a mixture of experts: more rows, more experts
            if (whole := whole_layer_seconds(plan)) is not None:
                run.whole_layer_seconds[batch] = whole
            if run.logits is None and not (bench.random and budget.get("quantize")):  # random int8/int4 weights
                run.logits = model(ids[:1])[0, -1].float().cpu()  # are made packed: not the dense ones
            run.timings[batch] = fastest_pass(model, ids[:batch], bench.decode_tokens)
            print(f"  batch {batch}: {describe(run.timings[batch])}", flush=True)
        release_memory(bench.device)
    return run


def fastest_pass(model, ids: torch.Tensor, new_tokens: int) -> Timing:
    """Prefill and decode timed over PASSES identical generations, each phase's fastest kept.

    The first pass warms up: besides kernels and the allocator, cuDNN's attention builds a
    plan for every new KV length on first use (tens of ms each on an H200). Noise only
    ever adds time, so the fastest of the rest is the steadiest figure.
    """
    passes = []
    for _ in range(PASSES):
        model.synchronize()  # copies still in flight from the pass before must not count
        passes.append(model.generate(ids, max_new_tokens=new_tokens, ignore_eos=True, return_result=True))
    prefill = min(passes, key=lambda r: r.prefill_seconds)
    decode = min(passes, key=lambda r: r.decode_seconds)
    return Timing(prefill.prompt_tokens, prefill.prefill_seconds, decode.decode_steps, decode.decode_tokens,
                  decode.decode_seconds)


def describe(t: Timing) -> str:
    return (f"prefill {t.prompt_tokens} tokens in {t.prefill_seconds * 1e3:.1f} ms, "
            f"{t.decode_steps} decode steps of {t.ms_per_step:.1f} ms")


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # every GPU's cache, so the next run finds the same free memory


# ---------------------------------------------------------------------- accelerate


def accelerate_missing() -> str | None:
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install transformers accelerate)"
    return None


def run_accelerate(bench: Bench, ids: torch.Tensor) -> Run:
    """transformers + accelerate as users run it: pageable CPU weights, infer_auto_device_map, dispatch_model."""
    import accelerate
    from accelerate.utils import compute_module_sizes

    print("\naccelerate: loading", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_offload_") as offload_dir:
        model = hf_model_with_our_weights(bench)
        layer_class = type(model.model.layers[0]).__name__
        device_map = accelerate.infer_auto_device_map(
            model, max_memory=accelerate_memory(bench, model), no_split_module_classes=[layer_class], dtype=bench.dtype)
        sizes = compute_module_sizes(model, dtype=bench.dtype)
        if bench.device.type == "cuda":
            accelerate.dispatch_model(model, device_map)
        else:  # a CPU has no faster memory to offload from: accelerate's only offload target is the disk
            accelerate.dispatch_model(model, device_map, main_device="cpu", offload_dir=offload_dir)
        run = Run("accelerate")
        for batch in bench.batches:  # one device map serves every batch
            run.layers[batch] = accelerate_layers(bench, device_map)
            run.link_seconds[batch] = accelerate_link_seconds(bench, device_map, sizes)
        print(f"  device map: {compact_map(device_map)}", flush=True)
        # A short warm-up: its steps take seconds, beside which first-use costs of milliseconds vanish.
        time_hf(model, ids[:1, :WARMUP_PROMPT], 2, bench.device)
        for batch in bench.batches:
            run.timings[batch], logits = time_hf(model, ids[:batch], bench.accelerate_tokens, bench.device)
            if run.logits is None:
                run.logits = logits
            print(f"  batch {batch}: {describe(run.timings[batch])}", flush=True)
        del model
    link_seconds = run.link_seconds[bench.batches[0]]
    if "host" in link_seconds:
        pageable_ms = 1e3 * link_seconds["host"] * bench.links["host"] / bench.links["pageable"]
        run.notes.append(f"accelerate copies from pageable memory: at {bench.links['pageable'] / 1e9:.1f} GB/s "
                         f"its streamed bytes need {pageable_ms:.1f} ms per step")
    if bench.device.type != "cuda":
        run.notes.append("accelerate on a CPU offloads to disk (read back through the page cache)")
    return run


def hf_model_with_our_weights(bench: Bench):
    """The transformers model of the same config, holding the same weights as plain CPU tensors."""
    import accelerate
    import transformers

    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(hf_config(bench), dtype=bench.dtype)
    weights = pageable_weights(bench)
    names = {name for name, _ in model.named_parameters()}
    if any(name.endswith("experts.gate_up_proj") for name in names):  # transformers 5 stacks a layer's experts
        weights = stacked_experts(weights, names)
    result = model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()  # a tied LM head has no tensor of its own in the checkpoint
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if result.unexpected_keys or meta:
        raise RuntimeError(f"transformers names differ from the checkpoint's: unexpected {result.unexpected_keys}, "
                           f"not filled {meta}")
    return model.eval()


EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                    r"(w1|gate_proj|w3|up_proj|w2|down_proj)\.weight")
ROUTER = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight")


def stacked_experts(weights: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    """A mixture of experts' checkpoint tensors (one per expert and projection) as transformers 5 holds them:
    per layer ``mlp.experts.gate_up_proj [E, 2 I, d]`` (gate's rows, then up's) and ``down_proj [E, d, I]``,
    the router as ``mlp.gate``. ``weights`` is emptied as it is read, and each layer's per-expert tensors are
    dropped once stacked: the host holds one copy of the model and one layer's stack at most."""
    experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for name in list(weights):
        t = weights.pop(name)
        if found := EXPERT.fullmatch(name):
            layer, e, role = int(found[1]), int(found[2]), found[3]
            role = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(role, role)
            experts.setdefault(layer, {}).setdefault(e, {})[role] = t
        elif found := ROUTER.fullmatch(name):
            out[f"model.layers.{found[1]}.mlp.gate.weight"] = t
        else:
            out[name] = t
    for layer, by_expert in experts.items():
        ordered = [by_expert[e] for e in sorted(by_expert)]
        prefix = f"model.layers.{layer}.mlp.experts."
        if prefix + "gate_up_proj" not in names:
            raise RuntimeError(f"transformers holds layer {layer}'s experts otherwise than as {prefix}gate_up_proj")
        out[prefix + "gate_up_proj"] = torch.stack([torch.cat([p["gate_proj"], p["up_proj"]]) for p in ordered])
        out[prefix + "down_proj"] = torch.stack([p["down_proj"] for p in ordered])
        by_expert.clear()
    return out


def hf_config(bench: Bench):
    import transformers

    if not bench.random:
        return transformers.AutoConfig.from_pretrained(bench.model)
    raw = dict(bench.model)
    return transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)


def pageable_weights(bench: Bench) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor in ordinary (pageable) CPU memory, as ``from_pretrained`` leaves them.

    Random weights come from the generator ``load_model`` uses (on the compute device: the
    values depend on the generating device type), so both sides compute with the same numbers.
    """
    tp = TensorParallel()
    if bench.random:
        source = RandomSource(seed=SEED, device=bench.device)
        read = lambda spec, name: source.full_tensor(spec, name, bench.dtype, device="cpu")  # noqa: E731
    else:
        source = CheckpointSource(bench.model)
        read = lambda spec, name: read_whole(source, spec, name, bench.dtype)  # noqa: E731
    specs = checkpoint_sources(bench.config, tp, bench.dtype)
    try:
        return {name: read(spec, name) for spec, name in specs}
    finally:
        source.close()


def read_whole(source: CheckpointSource, spec, name: str, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(spec.full_shape, dtype=dtype)
    source.read(spec, name, out)  # with one rank every spec is the whole tensor
    return out


def accelerate_memory(bench: Bench, model) -> dict:
    """accelerate's max_memory: the same budget for the compute device, room for everything else."""
    everything = sum(p.numel() for p in model.parameters()) * bench.dtype.itemsize
    if bench.device.type == "cuda":
        return {bench.device.index: bench.gpu_memory, "cpu": 2 * everything}
    return {"cpu": bench.gpu_memory}  # the rest goes to "disk"


def accelerate_tier(where, device: torch.device) -> str:
    """Our name for a place in accelerate's device map ("cpu" is the compute device itself on a CPU)."""
    if where == "disk":
        return "disk"
    return HOST if where == "cpu" and device.type == "cuda" else RESIDENT


def accelerate_layers(bench: Bench, device_map: dict) -> dict[str, int]:
    layers = {RESIDENT: 0, HOST: 0, "disk": 0}
    for i in range(bench.config.n_layers):
        layers[accelerate_tier(module_device(device_map, f"model.layers.{i}"), bench.device)] += 1
    return layers


def accelerate_link_seconds(bench: Bench, device_map: dict, sizes: dict) -> dict[str, float]:
    """Seconds per decode step that the bytes accelerate offloads need at the pinned host bandwidth, and the HBM floor."""
    offloaded = {HOST: 0, "disk": 0}
    for module, where in device_map.items():
        tier = accelerate_tier(where, bench.device)
        if tier != RESIDENT:
            offloaded[tier] += sizes[module]
    seconds = {"hbm": bench.config.n_layers * bench.layer_bytes / bench.links["hbm"]}
    # Disk reads come back through the page cache: at best a RAM copy, which is what "host" holds on a CPU.
    seconds.update({tier: n / bench.links["host"] for tier, n in offloaded.items() if n})
    return seconds


def module_device(device_map: dict, module: str):
    """Where ``device_map`` puts ``module``: the entry of its longest prefix ("" is the whole model)."""
    owners = [k for k in device_map if k == "" or module == k or module.startswith(k + ".")]
    return device_map[max(owners, key=len)] if owners else None


def compact_map(device_map: dict) -> str:
    counts: dict[str, int] = {}
    for where in device_map.values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return ", ".join(f"{n} module(s) on {where}" for where, n in counts.items())


@torch.inference_mode()
def time_hf(model, ids: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[Timing, torch.Tensor]:
    """Prefill, then ``new_tokens - 1`` greedy decode steps with the KV cache, each timed apart."""
    ids = ids.to(device)
    synchronize(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    prefill = time.perf_counter() - start
    logits = out.logits[0, -1].float().cpu()
    cache = out.past_key_values
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
        cache, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    steps = new_tokens - 1
    return Timing(ids.numel(), prefill, steps, steps * ids.shape[0], time.perf_counter() - start), logits


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- limits and the table


def table_rows(runs: list[Run]) -> list[dict]:
    """One row per run and batch: the measured speeds, the limit of the same run, and the speed-up."""
    resident = next((r for r in runs if r.name == "resident"), None)
    accelerate = next((r for r in runs if r.name == "accelerate"), None)
    rows = []
    for run in runs:
        for batch, t in run.timings.items():
            link_seconds = run.link_seconds[batch]
            bound = max(link_seconds, key=link_seconds.get)
            limit = link_seconds[bound]
            rows.append(dict(
                run=run.name, placement=placement(run.layers[batch]), layers=run.layers[batch], batch=batch,
                prefill_seconds=t.prefill_seconds, prefill_tokens_per_s=t.prefill_tokens_per_s,
                prefill_limit_seconds=prefill_limit(run, batch, resident),
                decode_steps=t.decode_steps, decode_ms_per_step=t.ms_per_step,
                decode_tokens_per_s=t.decode_tokens_per_s,
                limit_ms=1e3 * limit, bound=bound, achieved_over_limit=1e3 * limit / t.ms_per_step,
                link_ms={k: 1e3 * v for k, v in link_seconds.items()},
                speedup_vs_accelerate=(accelerate.timings[batch].ms_per_step / t.ms_per_step
                                       if accelerate and batch in accelerate.timings and run is not accelerate
                                       else None),
                whole_layer_limit_ms=1e3 * run.whole_layer_seconds[batch] if batch in run.whole_layer_seconds else None,
            ))
    return rows


def whole_layer_seconds(plan) -> float | None:
    """The least time of a decode step that streams its layers whole, as an offloader without expert blocks
    does (every expert every step): the slowest link's copy time of all it holds. None without streamed experts."""
    experts = plan.experts
    if experts is None or all(tier == RESIDENT for tier in experts.placement):
        return None
    held = {t: experts.bytes_on(t) + sum(plan.needs.blocks[i] for i in plan.blocks_on(t))
            for t in plan.streamed_tiers}
    return max(nbytes / plan.bandwidth[t] for t, nbytes in held.items())


def prefill_limit(run: Run, batch: int, resident: Run | None) -> float:
    """max(bytes streamed / bandwidth over every link, compute): the resident prefill time, else the HBM floor."""
    link_seconds = run.link_seconds[batch]
    streaming = max([s for link, s in link_seconds.items() if link != "hbm"], default=0.0)
    if resident is not None and run is not resident and batch in resident.timings:
        return max(streaming, resident.timings[batch].prefill_seconds)
    return max(streaming, link_seconds["hbm"])


def placement(layers: dict[str, int]) -> str:
    return " ".join(f"{TIER_LETTER[tier]}{n}" for tier, n in layers.items() if n)


def print_table(rows: list[dict]) -> None:
    header = (f"{'run':<17}{'layers':<12}{'batch':>5}{'prefill tok/s':>15}{'decode ms/step':>16}"
              f"{'decode tok/s':>14}{'limit ms':>10}  {'bound':<7}{'achieved/limit':>15}{'vs accelerate':>15}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        speedup = f"{r['speedup_vs_accelerate']:.1f}x" if r["speedup_vs_accelerate"] else "-"
        print(f"{r['run']:<17}{r['placement']:<12}{r['batch']:>5}{r['prefill_tokens_per_s']:>15,.1f}"
              f"{figure(r['decode_ms_per_step']):>16}{r['decode_tokens_per_s']:>14,.1f}{figure(r['limit_ms']):>10}  "
              f"{r['bound']:<7}{figure(r['achieved_over_limit']):>15}{speedup:>15}")
    print("layers: R resident, H pinned host, P peer GPU, D disk. A decode step makes one token per row.\n"
          "limit: the slowest link's copy time per decode step, or the HBM floor (bound 'hbm'); "
          "achieved/limit = limit / decode ms/step, 1.0 is at the limit")
    for r in (r for r in rows if r["whole_layer_limit_ms"]):
        print(f"{r['run']}, batch {r['batch']}: streaming whole layers (every expert every step) needs at least "
              f"{r['whole_layer_limit_ms']:,.1f} ms a step over these links; this run is "
              f"{r['whole_layer_limit_ms'] / r['decode_ms_per_step']:.1f}x faster than that bound")


def figure(x: float) -> str:
    """Two decimals, or two significant digits for the small figures of tiny models."""
    return f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.2g}"


def weights_check(runs: list[Run]) -> dict | None:
    """How far the runs' first next-token logits are from each other: the comparison is of the same model."""
    reference = next((r for r in runs if r.logits is not None and r.name != "accelerate"), None)
    others = [r for r in runs if r.logits is not None and r is not reference]
    if reference is None or not others:
        return None
    scale = reference.logits.abs().max().item()
    diffs = {r.name: (r.logits - reference.logits).abs().max().item() for r in others}
    same_token = {r.name: bool(r.logits.argmax() == reference.logits.argmax()) for r in others}
    return dict(reference=reference.name, max_abs_logit=scale, max_abs_diff=diffs, same_next_token=same_token)


def summary_line(bench: Bench, rows: list[dict], hardware: str) -> str:
    batch = bench.batches[0]
    parts = []
    for r in (r for r in rows if r["batch"] == batch):
        extra = [f"{r['achieved_over_limit']:.2f} of limit"]
        if r["speedup_vs_accelerate"]:
            extra.append(f"{r['speedup_vs_accelerate']:.1f}x accelerate")
        if r["whole_layer_limit_ms"]:
            extra.append(f"{r['whole_layer_limit_ms'] / r['decode_ms_per_step']:.1f}x the whole-layer bound")
        parts.append(f"{r['run']} {r['decode_ms_per_step']:.1f} ({', '.join(extra)})")
    dtype = str(bench.dtype).removeprefix("torch.")
    return (f"bench_offload: {bench.label}, {dtype}, on {hardware}: decode ms/step at batch {batch}: "
            + ("; ".join(parts) or "no run finished"))


# ---------------------------------------------------------------------- main


def hardware() -> dict:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return dict(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_bytes=props.total_memory,
                    cpu=platform.processor() or platform.machine())
    return dict(gpu=None, gpu_count=0, cpu=platform.processor() or platform.machine())


def versions() -> dict:
    out = dict(python=platform.python_version(), torch=torch.__version__, offload=offload.__version__)
    for name in ("transformers", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def hardware_words(hw: dict) -> str:
    return f"{hw['gpu_count']} x {hw['gpu']}" if hw["gpu"] else f"CPU ({hw['cpu']}, no GPU)"


def pick_runs(bench: Bench, runs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The runs --runs names, of those this machine and model can make; UsageError where that leaves none."""
    if bench.wanted is None:
        return runs
    picked = [(n, b) for n, b in runs if n.removesuffix(" eager") in bench.wanted]
    if not picked:
        here = dict.fromkeys(n.removesuffix(" eager") for n, _ in runs)
        raise UsageError(f"none of --runs {', '.join(sorted(bench.wanted))} can be made here; this machine and "
                         f"model make {', '.join(here)}")
    return picked


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        bench = bench_from_args(args)
    except (UsageError, offload.OffloadError) as e:
        print(f"bench_offload: {e}", file=sys.stderr)
        return 2
    quiet_libraries()
    if bench.quick:
        torch.set_num_threads(1)  # the tiny model gains nothing from threads; one keeps a shared CI machine's timings steady
    hw, date = hardware(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"bench_offload {date}  " + "  ".join(f"{k} {v}" for k, v in versions().items() if v))
    print(f"hardware: {hardware_words(hw)}" + (f", {hw['gpu_memory_bytes'] / 2**30:.1f} GiB each" if hw["gpu"] else ""))
    bench.links = measure_links(bench.device)
    print_links(bench)
    try:
        if bench.quick:
            bench.gpu_memory = quick_budget(bench)
        runs_wanted = pick_runs(bench, our_runs(bench))
    except (UsageError, offload.OffloadError) as e:
        print(f"bench_offload: {e}", file=sys.stderr)
        return 2
    print(f"model: {bench.label}, {str(bench.dtype).removeprefix('torch.')}, {bench.config.n_layers} layers x "
          f"{offload.format_size(bench.layer_bytes)}; prompt {bench.prompt_len} tokens, {bench.decode_tokens} new "
          f"({bench.accelerate_tokens} for accelerate), batches {','.join(map(str, bench.batches))}; "
          f"budget of {bench.device}: {offload.format_size(bench.gpu_memory)}")

    ids = torch.randint(0, bench.config.vocab_size, (max(bench.batches), bench.prompt_len),
                        generator=torch.Generator().manual_seed(SEED))
    skipped = {name: why for name, budget in runs_wanted if (why := why_not(bench, name, budget))}
    if "host" in skipped and any(n == "host" for n, _ in runs_wanted):  # a budget that cannot work is bad input
        print(f"bench_offload: {skipped['host']}", file=sys.stderr)
        return 2
    runs = []
    signal.signal(signal.SIGTERM, _time_up)  # a time limit still prints what was measured
    try:
        for name, budget in runs_wanted:
            if name not in skipped:
                run, reason = attempt(run_ours, bench, name, budget, ids)
                runs += [run] if run else []
                skipped.update({name: reason} if reason else {})
                release_memory(bench.device)
        reason = "--skip-accelerate" if args.skip_accelerate else accelerate_missing()
        if reason is None:
            run, reason = attempt(run_accelerate, bench, ids, any_error=True)
            runs += [run] if run else []
            release_memory(bench.device)
        if reason:
            skipped["accelerate"] = reason
    except TimeUp as stop:
        if stop.partial is not None and stop.partial.timings:
            runs.append(stop.partial)
            for batch in [b for b in bench.batches if b not in stop.partial.timings]:
                skipped[f"{stop.partial.name}, batch {batch}"] = "stopped: SIGTERM (a time limit) came first"
        done = {run.name for run in runs}
        for name in [n for n, _ in runs_wanted] + ["accelerate"]:
            if name not in done and name not in skipped:
                skipped[name] = "stopped: SIGTERM (a time limit) came first"
        print("\nbench_offload: SIGTERM, reporting what was measured", flush=True)

    rows = table_rows(runs)
    print_table(rows)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for run in runs:
        for note in run.notes:
            print(f"note ({run.name}): {note}")
    check = weights_check(runs)
    if check:
        print(f"same weights: next-token logits differ from the {check['reference']} run's by at most "
              + ", ".join(f"{name} {d:.2g}" for name, d in check["max_abs_diff"].items())
              + f" (largest logit {check['max_abs_logit']:.2g})")
    summary = summary_line(bench, rows, hardware_words(hw))
    if args.json:
        write_json(args.json, dict(
            date=date, hardware=hw, versions=versions(), model=bench.label,
            dtype=str(bench.dtype).removeprefix("torch."), quick=bench.quick, device=str(bench.device),
            gpu_budget_bytes=bench.gpu_memory, prompt_len=bench.prompt_len, decode_tokens=bench.decode_tokens,
            accelerate_tokens=bench.accelerate_tokens, batches=bench.batches, links=bench.links, runs=rows,
            skipped=skipped, notes={r.name: r.notes for r in runs if r.notes}, weights_check=check, summary=summary))
    print(summary)
    return 0


def attempt(run, *args, any_error: bool = False) -> tuple[Run | None, str | None]:
    """``(run(*args), None)``, or ``(None, why)`` when it failed in a way that skips the run.

    An OffloadError or running out of GPU memory skips a run; with ``any_error`` (the
    accelerate run, whose libraries change under us) so does any exception, traceback printed.
    """
    try:
        return run(*args), None
    except offload.OffloadError as e:
        return None, str(e)
    except torch.cuda.OutOfMemoryError as e:
        return None, f"out of GPU memory ({str(e).splitlines()[0]})"
    except Exception as e:
        if not any_error:
            raise
        traceback.print_exc()
        return None, f"failed: {type(e).__name__}: {e}"


def quiet_libraries() -> None:
    """The table says what the plan warnings and accelerate's notices would."""
    warnings.filterwarnings("ignore", category=offload.OffloadWarning)
    for name in ("transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def write_json(path: str, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
