#!/usr/bin/env python3
"""Speculative decoding: what a verify pass costs, and what each draft gains.

    python benchmarks/bench_speculative.py --model SmolLM2 --gpu-memory stream --cpu-memory 4GiB \\
        --drafts none,ngram,int4,int4@4,path/to/draft,path/to/draft@4
    python benchmarks/bench_speculative.py --shape llama-2-13b --gpu-memory 8GiB --cpu-memory 64GiB
    python benchmarks/bench_speculative.py --quick      # the structured model on the CPU, in seconds (CI runs this)

Two measurements, both on the model loaded under the given budget (layers that do not
fit stream from pinned host memory, so on a GPU a pass is bound by its link; with
``--gpu-memory stream``, each run's budget is the least under which every layer streams,
plus what its draft keeps on the GPU):

passes     a verify pass of W tokens per row (W = 1, 2, 4, ... 32: the row's last token
           and W - 1 drafts) at batch 1 and 8, against a one-token pass (W = 1, a decode
           step); with graphs, also the host's time queueing each (near the pass's: the host
           sets the pace, not the link). From them, for acceptance rates 50-90%, the
           tokens/s a draft that costs nothing (prompt lookup) would give at the best W,
           against plain decoding:
           ``batch x E(a, W - 1) / t(W)`` with ``E(a, k) = (1 - a^(k+1)) / (1 - a)``.
           With random weights (``--shape``) a measured acceptance means nothing, so these
           forecasts are all this part reports.
generation with ``--model`` (or ``--quick``), for each of ``--drafts`` (``int4@4``: the int4 draft's
           trees, four tokens at each depth): greedy batch-1
           generation of a few prompts, decode tokens/s, tokens per pass, the share of
           drafts accepted, and whether the tokens equal plain greedy decoding's (with
           ``--temperature T``: sampled, seeded, and the tokens differ from run to run of
           the draft; the tests check that their distribution is the model's). Prompts:
           the chat template applied to built-in questions when the checkpoint has a
           tokenizer, else samples of the structured model's corpus.

``--quick`` runs the structured model of ``offload.structured`` in float32 on the CPU with a
fixed draft length (a CPU computes rather than streams, so the plan's cost model would draft
nothing): the figures check that the benchmark works, not how fast anything is.

Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

import offload  # noqa: E402
from offload.models.shapes import SHAPES, shape_config  # noqa: E402
from offload.speculative import expected_tokens  # noqa: E402
from offload.structured import corpus_of, structured_checkpoint  # noqa: E402
from offload.text import Tokenizer  # noqa: E402

WIDTHS = (1, 2, 4, 8, 16, 32)
BATCHES = (1, 8)
ACCEPTANCES = (0.5, 0.6, 0.7, 0.8, 0.9)
CONTEXT = 128  # cached tokens per row before a timed verify pass
REPEATS = 3  # timed passes per point after one warm-up; the fastest counts
QUESTIONS = ["What is the capital of France? Answer in one sentence.", "Write a haiku about the sea.",
             "Repeat exactly: 'The quick brown fox jumps over the lazy dog, and the dog sleeps on.'",
             "Explain in two sentences why the sky is blue."]
QUICK_DRAFT_TOKENS = 4
DRAFT_STEPS = 32  # a draft model's decode steps timed alone, on a GPU
STREAM = "stream"  # --gpu-memory: every layer streams


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="a checkpoint directory: pass times and each draft's generation")
    source.add_argument("--shape", help=f"random weights of a named shape, pass times only ({', '.join(SHAPES)})")
    source.add_argument("--quick", action="store_true", help="the structured model on the CPU (for CI)")
    p.add_argument("--drafts", default="none,ngram,int4,int4@4", help="comma-separated: none (first), ngram, int4, "
                   "int8, or checkpoint directories; DRAFT@M: a draft model's trees of M tokens a depth "
                   "(default none,ngram,int4,int4@4)")
    p.add_argument("--draft-tokens", type=int, help="a fixed draft length (default: chosen per pass)")
    p.add_argument("--gpu-memory", help="budget of the compute GPU (default: its free memory; stream: every layer "
                                        "streams, the draft's bytes besides)")
    p.add_argument("--cpu-memory", help="pinned host memory for streamed layers")
    p.add_argument("--slots", type=int, help="slots of each link's ring (default: the plan's, 2): more let copies run "
                   "further ahead of the compute")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default 0: greedy)")
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="verify widths to time (tokens per row)")
    p.add_argument("--eager", action="store_true", help="also time the verify passes without CUDA graphs (on a GPU)")
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--trace", help="with --profile: the profiled generation's timeline as a Chrome trace to this file "
                   "(gzipped where it ends in .gz; DRAFT's index before the suffix where several drafts are profiled)")
    p.add_argument("--profile", action="store_true", help="and where a pass's time goes with each model draft: the "
                   "host's time in each phase of a pass, the draft's steps a pass, the kernels (on a GPU)")
    args = p.parse_args(argv)
    if not (args.model or args.shape or args.quick):
        raise UsageError("give --model PATH, --shape NAME or --quick")
    if args.shape and args.shape not in SHAPES:
        raise UsageError(f"unknown shape {args.shape!r}; choose from {', '.join(SHAPES)}")
    drafts = [d.strip() for d in args.drafts.split(",") if d.strip()]
    if not drafts or drafts[0] != "none":
        raise UsageError(f"--drafts starts with none (the reference), got {args.drafts!r}")
    for draft in drafts:
        name, branches = tree_of(draft)
        if name != draft and not 1 <= branches <= 4:
            raise UsageError(f"a draft's trees take 1 to 4 tokens a depth (DRAFT@M), got {draft!r}")
    try:
        args.widths = sorted({int(w) for w in args.widths.split(",")})
    except ValueError:
        raise UsageError(f"--widths takes integers, got {args.widths!r}") from None
    if args.widths[0] < 1 or args.widths[-1] > 65:
        raise UsageError("--widths must lie in [1, 65]")
    if args.gpu_memory == STREAM and not args.cpu_memory:
        raise UsageError("--gpu-memory stream needs --cpu-memory: the host memory the streamed layers live in")
    if args.slots is not None and args.slots < 1:  # not left to the plan's default, as 0 would be
        raise UsageError(f"--slots must be >= 1, got {args.slots}")
    if not 0.0 <= args.temperature <= 10.0:
        raise UsageError(f"--temperature must lie in [0, 10], got {args.temperature}")
    args.drafts = drafts
    return args


# ---------------------------------------------------------------------- verify passes


def time_passes(model, widths: list[int], batches: tuple[int, ...], vocab: int) -> list[dict]:
    """The fastest of REPEATS verify passes of each width at each batch size, after a warm-up."""
    gen = torch.Generator().manual_seed(0)
    rows = max(batches)
    context = [torch.randint(0, vocab, (CONTEXT,), generator=gen).tolist() for _ in range(rows)]
    model.extend(context, [0] * rows)
    out = []
    for batch in batches:
        for width in widths:
            tokens = [torch.randint(0, vocab, (width,), generator=gen).tolist() for _ in range(batch)]
            times, queued = [], []
            for _ in range(REPEATS + 1):
                model.synchronize()
                start = time.perf_counter()
                model.verify(tokens, [CONTEXT] * batch)  # the same positions each time: the cache is rewritten
                queued.append(time.perf_counter() - start)
                model.synchronize()
                times.append(time.perf_counter() - start)
            best = min(range(1, REPEATS + 1), key=times.__getitem__)
            out.append(dict(batch=batch, width=width, ms=1e3 * times[best], host_ms=1e3 * queued[best]))
    one = {p["batch"]: p["ms"] for p in out if p["width"] == 1}
    for p in out:
        p["over_one_token"] = p["ms"] / one[p["batch"]] if p["batch"] in one else None
    return out


def forecast(passes: list[dict]) -> list[dict]:
    """For each batch and acceptance rate: the width whose pass gains the most tokens/s with a free draft."""
    out = []
    for batch in sorted({p["batch"] for p in passes}):
        mine = [p for p in passes if p["batch"] == batch]
        plain = next((p for p in mine if p["width"] == 1), None)
        for a in ACCEPTANCES:
            best = max(mine, key=lambda p: expected_tokens(a, p["width"] - 1) / p["ms"])
            rate = 1e3 * batch * expected_tokens(a, best["width"] - 1) / best["ms"]
            out.append(dict(batch=batch, acceptance=a, width=best["width"], tokens_per_s=rate,
                            speedup=rate / (1e3 * batch / plain["ms"]) if plain else None))
    return out


# ---------------------------------------------------------------------- generation with each draft


def prompts_for(model_path: Path, quick: bool, vocab: int) -> list[list[int]]:
    """The built-in questions (chat-templated where the model has a template), or samples of the structured
    model's corpus, or (a model with neither tokenizer nor corpus) seeded random ids."""
    tokenizer = None if quick else Tokenizer.from_checkpoint(model_path)
    if tokenizer is not None and tokenizer.chat_template is not None:
        return [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    if tokenizer is not None:
        return [tokenizer.encode(q) for q in QUESTIONS]
    if (model_path / "corpus.json").is_file():
        return corpus_of(model_path).sample(len(QUESTIONS), 12, seed=4321).tolist()
    print("  (no tokenizer: prompts of random ids, so what a draft gains says little)")
    return torch.randint(0, vocab, (len(QUESTIONS), 12), generator=torch.Generator().manual_seed(4321)).tolist()


def tree_of(draft: str) -> tuple[str, int]:
    """``DRAFT@M`` -> (DRAFT, M); anything else (a path may hold an @) -> (draft, 0): the shape chosen per pass."""
    name, at, branches = draft.rpartition("@")
    return (name, int(branches)) if at and branches.isdigit() else (draft, 0)


def streaming(source, options: dict) -> dict:
    """``options`` with the least GPU budget under which every layer streams, beside the draft they name (where
    the plan declines the draft there, the budget without it: the run is plain decoding's, streaming); through
    fewer slots than the layers (a ring as large as the model would hold it: the plan keeps its layers then)."""
    plan = offload.plan_model(source, **dict(options, gpu_memory=None))
    options = dict(options, slots=plan.needs.streaming_slots(options.get("slots")))
    for _ in range(3):  # a GGUF file's layers on a CPU: expanded under a large budget, compressed under a small
        budget = plan.needs.gpu_budget_streaming(0, options["slots"])
        plan = offload.plan_model(source, **dict(options, gpu_memory=budget))
        if options.get("draft") and "declined" in plan.draft:
            alone = streaming(source, dict(options, draft=None, draft_tokens=None, draft_branches=None))
            return dict(options, gpu_memory=alone["gpu_memory"], slots=alone["slots"])
        if set(plan.layer_map()) == {"H"}:
            break
    return dict(options, gpu_memory=budget)


def run_draft(model_path: Path, draft: str, prompts: list[list[int]], options: dict, max_new: int,
              temperature: float = 0.0, profile: bool = False, trace: str | None = None) -> dict:
    """Batch-1 generation of every prompt with ``draft`` (``DRAFT@M``: trees of ``M`` tokens a depth), greedy
    or sampled at ``temperature`` (seeded): tokens, decode tokens/s, tokens per pass."""
    sampling = dict(do_sample=True, temperature=temperature, seed=0) if temperature > 0 else {}
    name, branches = tree_of(draft)
    options = dict(options, draft=None if draft == "none" else name, draft_branches=branches or None)
    if options["gpu_memory"] == STREAM:
        options = streaming(model_path, options)
    model = offload.load_model(model_path, progress=False, **options)
    used = draft == "none" or model.draft is not None
    for prompt in prompts:  # warm-up: the same passes, so the timed ones replay graphs captured here
        model.generate([prompt], max_new_tokens=max_new, ignore_eos=True, **sampling)
    captured, prices = captures(model), model.speculation_prices
    before = (prices.passes, prices.drafting_seconds, prices.verifying_seconds)
    guessed = list(getattr(model.draft, "guessed", (0, 0)))
    counted = dataclasses.replace(model.draft.steps) if hasattr(model.draft, "steps") else None
    tokens, seconds, decoded, passes, row_passes, drafted, accepted = [], 0.0, 0, 0, 0, 0, 0
    for prompt in prompts:
        r = model.generate([prompt], max_new_tokens=max_new, ignore_eos=True, return_result=True, **sampling)
        tokens.append(r.tokens[0])
        seconds += r.decode_seconds
        decoded, passes, row_passes = decoded + r.decode_tokens, passes + r.decode_steps, row_passes + r.decode_row_passes
        drafted, accepted = drafted + r.drafted_tokens, accepted + r.accepted_tokens
    row = dict(draft=draft, used=used, plan=model.plan.draft, layers=model.plan.layer_map(),
               tokens_per_s=decoded / seconds if seconds else 0.0, ms_per_pass=1e3 * seconds / max(passes, 1),
               tokens_per_pass=decoded / max(row_passes, 1), acceptance=accepted / drafted if drafted else None,
               tokens=tokens, captures_timed=captures(model) - captured,
               measured_over_priced={name: getattr(prices, name).scale if getattr(prices, name).ratios else None
                                     for name in ("verify", "draft_step")},  # measured on a GPU only
               **split_of_a_pass(prices, before),
               drafted_ahead=[a - b for a, b in zip(getattr(model.draft, "guessed", (0, 0)), guessed)],
               draft_steps_a_pass=steps_a_pass(model.draft.steps, counted, passes) if counted else None,
               draft_step=draft_step_times(model.draft.model, len(prompts[0]), DRAFT_STEPS)
               if hasattr(model.draft, "model") and model.device.type == "cuda" else None)
    if profile and hasattr(model.draft, "model"):
        row["profile"] = profile_passes(model, prompts[0], max_new, sampling, trace)
    model.close()
    return row


PHASES = {"propose": ("draft", "propose"), "verify": ("model", "verify"), "accept": ("speculation", "accept"),
          "update": ("draft", "update")}


def profile_passes(model, prompt: list[int], max_new: int, sampling: dict, trace: str | None = None) -> dict:
    """One prompt's generation under the profiler: each phase of a pass (``PHASES``: the draft proposing, the
    target's pass being queued, the tokens chosen and read, the draft rolled back) as the host's wall time a
    pass, the draft's decode steps a pass, and on a GPU the kernels' table. A phase ends when the host leaves
    it: the host waits for the GPU where it reads (a proposal's tokens, the chosen tokens). ``trace``: a file for
    the timeline (Chrome's trace format): where the GPU waits on the host between a pass's phases."""
    from offload.scheduler import speculation

    owners = {"draft": model.draft, "model": model, "speculation": speculation}
    steps = [0]
    originals = {name: getattr(owners[owner], attr) for name, (owner, attr) in PHASES.items()}
    decode = model.draft.model.decode

    def timed(name, fn):
        def run(*args, **kwargs):
            with torch.profiler.record_function(f"pass.{name}"):
                return fn(*args, **kwargs)
        return run

    def counted_decode(*args, **kwargs):
        steps[0] += 1
        return decode(*args, **kwargs)

    shapes, draft_shape = [], speculation.Speculator.draft_shape

    def recorded_shape(self, *args, **kwargs):
        shape = draft_shape(self, *args, **kwargs)
        shapes.append(shape)
        return shape

    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    try:
        for name, (owner, attr) in PHASES.items():
            setattr(owners[owner], attr, timed(name, originals[name]))
        model.draft.model.decode = counted_decode
        speculation.Speculator.draft_shape = recorded_shape
        with torch.profiler.profile(activities=activities) as prof:
            r = model.generate([prompt], max_new_tokens=max_new, ignore_eos=True, return_result=True, **sampling)
    finally:
        for name, (owner, attr) in PHASES.items():
            setattr(owners[owner], attr, originals[name])
        model.draft.model.decode = decode
        speculation.Speculator.draft_shape = draft_shape
    if trace:
        prof.export_chrome_trace(trace)
    passes = max(r.decode_steps, 1)
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    host = {name: sum(e.cpu_time_total for e in prof.events() if e.name == f"pass.{name}" and e.device_type == cpu)
            for name in PHASES}  # the ranges on the host (on a GPU the profiler also marks them on its timeline)
    depths = sorted({k for k, _ in shapes})
    out = dict(passes=r.decode_steps, draft_steps_a_pass=steps[0] / passes,
               ms_a_pass_total=1e3 * r.decode_seconds / passes,
               depths={k: sum(1 for d, _ in shapes if d == k) for k in depths},
               host_ms_a_pass={name: us / 1e3 / passes for name, us in host.items()})
    if model.device.type == "cuda":  # the GPU's own work: kernels and copies, not the host's operations
        kernels = sorted((e for e in prof.key_averages() if e.device_type == cuda and e.self_device_time_total > 0
                          and not e.key.startswith("pass.")), key=lambda e: -e.self_device_time_total)
        out["kernels_ms_a_pass"] = sum(e.self_device_time_total for e in kernels) / 1e3 / passes
        out["kernels"] = [dict(name=e.key[:70], count_a_pass=e.count / passes,
                               us_a_pass=e.self_device_time_total / passes) for e in kernels[:25]]
    return out


def steps_a_pass(now, before, passes: int) -> dict:
    """A model draft's chain steps (``drafts.StepCounts``) since ``before``, a pass."""
    passes = max(passes, 1)
    paced = max(now.paced - before.paced, 1)
    return dict(ahead=(now.ahead - before.ahead) / passes, served=(now.served - before.served) / passes,
                after=(now.after - before.after) / passes, waited_ms=1e3 * (now.waited - before.waited) / passes,
                beside_ms=(now.beside_ms - before.beside_ms) / paced,
                window_ms=(now.window_ms - before.window_ms) / paced)


def trace_file(trace: str | None, index: int, drafts: int) -> str | None:
    """``--trace``'s file for the ``index``-th of ``drafts`` drafts: the index before its suffix where several."""
    if not trace or drafts == 1:
        return trace
    path = Path(trace)
    suffixes = "".join(path.suffixes)
    return str(path.with_name(f"{path.name[: len(path.name) - len(suffixes)]}-{index}{suffixes}"))


def split_of_a_pass(prices, before: tuple) -> dict:
    """The timed passes' mean ms drafting and ms verifying (measured on a GPU only; None elsewhere)."""
    passes = prices.passes - before[0]
    if not passes:
        return dict(ms_drafting=None, ms_verifying=None)
    return dict(ms_drafting=1e3 * (prices.drafting_seconds - before[1]) / passes,
                ms_verifying=1e3 * (prices.verifying_seconds - before[2]) / passes)


def draft_step_times(draft, position: int, steps: int) -> dict:
    """Where a draft model's decode step goes, on a GPU: the sum of its kernels' times (the profiler's) against a
    step's wall time (the host's work and the gaps between kernels included), over ``steps`` back-to-back steps
    of one row. Close: the kernels bound it (fewer or faster kernels would help); far apart: the host does."""
    token = torch.ones(1, dtype=torch.long, device=draft.device)
    draft.decode(token, [position])  # replayed from its graph (captured while generating)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            draft.decode(token, [position])
        torch.cuda.synchronize()
    kernels = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / steps
    began = time.perf_counter()
    for _ in range(steps):
        draft.decode(token, [position])
    torch.cuda.synchronize()
    return dict(kernels_ms=kernels, wall_ms=1e3 * (time.perf_counter() - began) / steps)


def captures(model) -> int:
    """Buckets of CUDA graphs the target and a draft model have captured so far."""
    models = [model] + ([model.draft.model] if hasattr(model.draft, "model") else [])
    return sum(m.graphs.captures for m in models if m.graphs is not None)


def first_difference(tokens: list[list[int]], reference: list[list[int]]) -> int | None:
    """The earliest position, over the prompts, where ``tokens`` leaves ``reference`` (None: identical)."""
    found = [next((i for i, (a, b) in enumerate(zip(t, r)) if a != b), None if len(t) == len(r) else min(len(t), len(r)))
             for t, r in zip(tokens, reference)]
    return min((i for i in found if i is not None), default=None)


# ---------------------------------------------------------------------- main


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        return run(args)
    except (UsageError, offload.OffloadError) as e:
        print(f"bench_speculative: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def run(args) -> int:
    warnings.simplefilter("ignore", offload.OffloadWarning)
    quick = args.quick
    if quick or not torch.cuda.is_available():
        torch.set_num_threads(1)  # small models' many tiny products only wait for a second thread (on a CPU)
    model_path = structured_checkpoint() if quick else (Path(args.model) if args.model else None)
    source = shape_config(args.shape) if args.shape else model_path
    dtype = "float32" if quick else args.dtype
    draft_tokens = QUICK_DRAFT_TOKENS if quick and args.draft_tokens is None else args.draft_tokens
    budget = dict(dtype=dtype, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
                  **({"slots": args.slots} if args.slots else {}), **({"device": "cpu"} if quick else {}))
    # verify passes: the plan reserves batch 8 x the widest pass
    pass_options = dict(max_batch=max(BATCHES), max_seq_len=CONTEXT + max(args.widths) + 1, draft="ngram",
                        draft_tokens=max(max(args.widths) - 1, 1))
    if quick and args.gpu_memory is None:  # about half the layers stream (on a CPU every link is a memcpy), through
        needs = offload.plan_model(source, dtype=dtype, device="cpu", **pass_options).needs  # fewer slots than they
        resident, slots = needs.streaming_half(args.slots)
        budget.update(gpu_memory=needs.gpu_budget_streaming(resident, slots), cpu_memory="1GiB", slots=slots)
    if args.gpu_memory == STREAM:
        budget_of_passes = streaming(source, dict(budget, **pass_options))
    else:
        budget_of_passes = dict(budget, **pass_options)
    date = datetime.date.today().isoformat()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not quick else f"CPU ({platform.processor() or platform.machine()})"
    print(f"bench_speculative {date} on {device}, torch {torch.__version__}")

    model = offload.load_model(source, random_weights=0 if args.shape else None, progress=False, **budget_of_passes)
    print(model.plan)
    vocab, graphs = model.config.vocab_size, model.graphs is not None
    passes = time_passes(model, args.widths, BATCHES, vocab)
    model.close()
    if args.eager and graphs:
        model = offload.load_model(source, random_weights=0 if args.shape else None, progress=False,
                                   cuda_graphs=False, **budget_of_passes)
        print(f"eagerly (no graphs' memory: the plan may keep more layers resident): {model.plan.layer_map()}")
        for p, eager in zip(passes, time_passes(model, args.widths, BATCHES, vocab)):
            p["eager_ms"] = eager["ms"]
        model.close()
    print(f"\nverify pass of W tokens per row (ms{', CUDA graphs' if graphs else ''}), and over a one-token pass"
          + (" (widths padded to a power of two)" if graphs else ""))
    print(f"  {'batch':>5}" + "".join(f"{'W=' + str(w):>15}" for w in args.widths))
    for batch in BATCHES:
        mine = {p["width"]: p for p in passes if p["batch"] == batch}
        print(f"  {batch:>5}" + "".join(_cell(mine[w]["ms"], mine[w]["over_one_token"]) for w in args.widths))
    if graphs:  # near 1: the host's launches and copies set the pace, not the link
        print("the host's time queueing that pass (ms), and its share of the pass")
        for batch in BATCHES:
            mine = {p["width"]: p for p in passes if p["batch"] == batch}
            print(f"  {batch:>5}" + "".join(_cell(mine[w]["host_ms"], mine[w]["host_ms"] / mine[w]["ms"])
                                            for w in args.widths))
    if any("eager_ms" in p for p in passes):
        print("eager passes (ms), and over the graphs' time")
        for batch in BATCHES:
            mine = {p["width"]: p for p in passes if p["batch"] == batch}
            print(f"  {batch:>5}" + "".join(_cell(mine[w]["eager_ms"], mine[w]["eager_ms"] / mine[w]["ms"])
                                            for w in args.widths))
    predicted = forecast(passes)
    print("\nforecast for a draft that costs nothing (prompt lookup): tokens/s at the best width, "
          "against plain decoding")
    for f in predicted:
        print(f"  batch {f['batch']}, acceptance {f['acceptance']:.0%}: W={f['width']:<3} {f['tokens_per_s']:9.1f} "
              f"tokens/s" + (f"  {f['speedup']:.2f}x" if f["speedup"] else ""))
    if args.shape:
        print("  (random weights: a measured acceptance would mean nothing, so none is measured)")

    drafts = []
    if model_path is not None:
        prompts = prompts_for(model_path, quick, vocab)
        options = dict(budget, max_batch=1, max_seq_len=max(len(p) for p in prompts) + args.max_new_tokens,
                       draft_tokens=draft_tokens)
        for index, draft in enumerate(args.drafts):
            opts = {k: v for k, v in options.items() if not (draft == "none" and k == "draft_tokens")}
            drafts.append(run_draft(model_path, draft, prompts, opts, args.max_new_tokens, args.temperature,
                                    args.profile, trace_file(args.trace, index, len(args.drafts))))
        reference = drafts[0]["tokens"]
        mode = f"sampled at temperature {args.temperature:g}" if args.temperature else "greedy"
        print(f"\n{mode} generation, batch 1, {len(prompts)} prompts x {args.max_new_tokens} tokens")
        print(f"  {'draft':<24}{'tokens/s':>10}{'x none':>8}{'tokens/pass':>13}{'accepted':>10}{'ms/pass':>9}  "
              "identical")
        for d in drafts:
            d["first_difference"] = None if args.temperature else first_difference(d["tokens"], reference)
            d["identical"] = d["first_difference"] is None if not args.temperature else None  # draws differ
            d["speedup"] = d["tokens_per_s"] / drafts[0]["tokens_per_s"] if drafts[0]["tokens_per_s"] else None
            accepted = f"{d['acceptance']:.0%}" if d["acceptance"] is not None else "-"
            print(f"  {d['draft'][-24:]:<24}{d['tokens_per_s']:>10.1f}{d['speedup']:>7.2f}x{d['tokens_per_pass']:>13.2f}"
                  f"{accepted:>10}{d['ms_per_pass']:>9.1f}  {_yes_no(d['identical'], d['first_difference'])}"
                  + ("" if d["used"] else "  (the plan declined it)")
                  + (f"  ({d['captures_timed']} graph captures while timed)" if d["captures_timed"] else ""))
        if not exact_dtype(dtype) and not all(d["identical"] is not False for d in drafts):
            print(f"  ({dtype or 'bfloat16'}: a pass of several tokens rounds its products differently from one-token passes, "
                  "so a near tie can go the other way; float32 output is identical, as the tests check)")
        for d in drafts:
            if d["plan"]:
                scales = {k: f"{v:.2f}x" for k, v in d["measured_over_priced"].items() if v is not None}
                print(f"  plan, {d['draft']}: {d['plan']}" + (f"; measured over priced (median of the last passes): "
                                                             f"{', '.join(f'{k} {v}' for k, v in scales.items())}"
                                                             if scales else ""))
            if d.get("ms_drafting") is not None:
                hits, tries = d.get("drafted_ahead") or (0, 0)
                print(f"  a pass of {d['draft']}: {d['ms_drafting']:.2f} ms drafting, {d['ms_verifying']:.2f} ms "
                      "verifying (the host's wall time, mean of the timed passes)"
                      + (f"; drafted ahead for {hits} of {tries} passes (the verdicts guessed)" if tries else ""))
            if d.get("draft_steps_a_pass"):
                c = d["draft_steps_a_pass"]
                print(f"  the draft's chain steps a pass: {c['ahead']:.2f} queued beside the target's pass, "
                      f"{c['served']:.2f} of them used, {c['after']:.2f} after its verdict; the host waited "
                      f"{c['waited_ms']:.2f} ms a pass for the side stream's chains")
                if c.get("window_ms"):
                    print(f"  beside a pass the side stream's steps took {c['beside_ms']:.2f} ms of the "
                          f"{c['window_ms']:.2f} ms from its start to the target's verdict (the GPU's clock)")
            if d.get("draft_step"):
                s = d["draft_step"]
                print(f"  a step of the draft {d['draft']}: its kernels {s['kernels_ms']:.3f} ms, wall "
                      f"{s['wall_ms']:.3f} ms (one row, {len(prompts[0])} keys, {DRAFT_STEPS} steps)")
            if d.get("profile"):
                f = d["profile"]
                phases = ", ".join(f"{k} {v:.2f}" for k, v in f["host_ms_a_pass"].items())
                print(f"  profile of {d['draft']} (one prompt, {f['passes']} passes): {f['ms_a_pass_total']:.2f} ms a "
                      f"pass under the profiler; the host's ms a pass in each phase: {phases}; "
                      f"{f['draft_steps_a_pass']:.1f} draft steps a pass; depths chosen {f['depths']}"
                      + (f"; kernels {f['kernels_ms_a_pass']:.2f} ms a pass:" if "kernels" in f else ""))
                for k in f.get("kernels", []):
                    print(f"    {k['us_a_pass']:8.1f} us a pass  {k['count_a_pass']:6.1f} x  {k['name']}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(date=date, device=device, quick=quick, model=str(args.model or ""),
                                                   shape=args.shape, passes=passes, forecast=predicted,
                                                   drafts=[{k: v for k, v in d.items() if k != "tokens"}
                                                           for d in drafts]), indent=1))
    best = max((d for d in drafts[1:] if d["used"]), key=lambda d: d["tokens_per_s"], default=None)
    identical = None if args.temperature else all(d["identical"] for d in drafts)
    first = min((d["first_difference"] for d in drafts if d.get("first_difference") is not None), default=None)
    summary = (f"best draft {best['draft']}: {best['speedup']:.2f}x plain decoding's tokens/s, "
               f"{best['tokens_per_pass']:.2f} tokens per pass, identical tokens: {_yes_no(identical, first)}" if best else
               f"verify pass of {max(args.widths)} tokens at batch 1: "
               f"{next(p['over_one_token'] for p in passes if p['batch'] == 1 and p['width'] == max(args.widths)):.2f}x "
               "a one-token pass")
    print(f"bench_speculative: {summary}")
    return 0 if not exact_dtype(dtype) or all(d["identical"] is not False for d in drafts) else 1


def exact_dtype(dtype: str | None) -> bool:
    """float32 (the default on a CPU): where greedy speculation gives plain decoding's tokens to the bit."""
    return dtype in ("float32", "fp32") or (dtype is None and not torch.cuda.is_available())


def _cell(ms: float, ratio: float | None) -> str:
    """A table cell of milliseconds and a ratio, 15 characters (a 70b pass takes thousands of milliseconds)."""
    return f"{ms:.2f}{f' {ratio:.1f}x' if ratio else '':>6}".rjust(15)


def _yes_no(identical: bool | None, first: int | None = None) -> str:
    return "-" if identical is None else "yes" if identical else f"NO (from token {first})"


if __name__ == "__main__":
    sys.exit(main())
