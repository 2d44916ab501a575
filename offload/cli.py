"""``run_offloaded``: one prompt, or a JSONL file of prompts, through an offloaded model.

    python scripts/run_offloaded.py                                   # built-in demo
    python scripts/run_offloaded.py --model M --prompt "Hello" --gpu-memory 8GiB
    python scripts/run_offloaded.py --model M --prompts in.jsonl --output out.jsonl --batch-size auto
    python scripts/run_offloaded.py --model M --gpu-memory 8GiB --plan
    torchrun --nproc-per-node 2 scripts/run_offloaded.py --model M --tp 2 --prompt-ids 1,2,3

Any bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from .api import load_model
from .batch import ResultFile, check_context, read_records, run_batch
from .distributed import TensorParallel, init_tensor_parallel
from .errors import InputError, OffloadError, OffloadWarning, PlanError
from .inputs import check_token_ids
from .loading import prepare
from .memory.budget import parse_peer_flag
from .memory.planner import format_plans
from .models.config import load_config
from .models.quant import FORMATS
from .options import LoadOptions
from .sampling import Sampling
from .synthetic import DEMO_SHAPE, demo_checkpoint
from .text import Tokenizer

DEMO_PROMPT = "offload runs transformer models that are larger than"
MAX_AUTO_BATCH = 64


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, like every other bad input
        raise InputError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="run_offloaded", description="Run a model larger than the GPU: one prompt or a batch file.")
    p.add_argument("--model", help="checkpoint directory (HF config.json + safetensors); default: a built-in demo")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json and the tokenizers package)")
    src.add_argument("--prompt-ids", help="prompt token ids, comma separated: 1,2,3")
    src.add_argument("--prompts", help="batch job: JSONL file of {id, prompt | prompt_ids[, max_new_tokens]}")
    p.add_argument("--output", help="batch job: JSONL results file (appended; finished ids are skipped)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, help="sampling temperature (implies --do-sample)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (implies --do-sample)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (implies --do-sample)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--device", help="compute device (default: cuda:LOCAL_RANK, or cpu)")
    p.add_argument("--gpu-memory", help="budget of the compute device, e.g. 20GiB")
    p.add_argument("--cpu-memory", help="pinned host memory for streamed layers, e.g. 100GiB")
    p.add_argument("--peer-memory", action="append", metavar="DEVICE=SIZE",
                   help="spare memory of another GPU, e.g. cuda:1=40GiB (repeatable)")
    p.add_argument("--max-batch", type=int, help="KV cache rows (default 1; batch jobs: --batch-size)")
    p.add_argument("--max-seq-len", type=int, help="KV cache length per row (default: what the prompts need)")
    p.add_argument("--max-step-tokens", type=int,
                   help="most tokens per forward pass (default: --max-seq-len; batch jobs: at least 2048)")
    p.add_argument("--slots", type=int, help="streaming slots on the GPU (default 2)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (launch with torchrun)")
    p.add_argument("--quantize", choices=FORMATS, help="store the layers' linear weights as int8 or int4 (default: "
                   "the model dtype)")
    p.add_argument("--group-size", type=int, help="int4: input columns per scale (default 128, or the largest "
                   "smaller power of two that divides each input dimension)")
    p.add_argument("--batch-size", default="auto", help="batch job rows: a number, or auto (default)")
    p.add_argument("--schedule", choices=["dynamic", "fifo"], default="dynamic", help="batch job scheduling")
    p.add_argument("--plan", action="store_true", help="print the placement plan and exit without loading weights")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    warnings.simplefilter("ignore", OffloadWarning)  # the printed plan carries its warnings
    try:
        return _main(build_parser().parse_args(argv))
    except OffloadError as e:
        print(f"run_offloaded: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as e:
        first = str(e).splitlines()[0] if str(e) else "out of memory"
        print(f"run_offloaded: error: {first} (lower --gpu-memory, --max-batch or --max-seq-len)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _main(args) -> int:
    tp = init_tensor_parallel(args.tp)  # under torchrun, before anything that ranks must agree on
    say = print if tp.rank == 0 else (lambda *a, **k: None)
    demo = args.model is None
    model_path = demo_checkpoint(quiet=args.quiet or tp.rank != 0) if demo else Path(args.model)
    config = load_config(model_path)
    tokenizer = Tokenizer.from_dir(model_path)
    options = _options(args)
    if args.prompts:
        return _run_job(args, model_path, config, tokenizer, options, tp, say)
    if args.output:
        raise InputError("--output goes with --prompts (a batch job)")

    prompt = None
    if not (args.plan and args.prompt is None and args.prompt_ids is None):  # --plan needs no prompt
        prompt = check_token_ids(_single_prompt(args, tokenizer, demo), config.vocab_size, "the prompt")
        needed = len(prompt) + args.max_new_tokens
        options = options.replace(max_seq_len=options.max_seq_len or needed)
        if needed > options.max_seq_len:
            raise InputError(f"the prompt ({len(prompt)} tokens) plus --max-new-tokens {args.max_new_tokens} "
                             f"exceeds --max-seq-len {options.max_seq_len}")
    if demo and args.gpu_memory is None:
        options = _demo_budget(model_path, options, say)
    if args.plan:
        say(format_plans(prepare(model_path, options).plans))
        return 0

    model = load_model(model_path, options, progress=not args.quiet)
    say(format_plans(model.plans))
    sampling = _sampling(args)
    result = model.generate([prompt], max_new_tokens=args.max_new_tokens, do_sample=sampling.do_sample,
                            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                            seed=sampling.seed, ignore_eos=args.ignore_eos, return_result=True)
    tokens = result.tokens[0]
    if tokenizer is not None:
        say(f"prompt: {tokenizer.decode(prompt)!r} ({len(prompt)} tokens)")
        say(f"output: {tokenizer.decode(tokens)!r}")
    say(f"output ids: {','.join(map(str, tokens))} ({result.finish_reasons[0]})")
    say(f"prefill: {result.prompt_tokens} tokens in {result.prefill_seconds:.3f} s "
        f"({result.prefill_tokens_per_s:.1f} tokens/s); decode: {result.decode_tokens} tokens in "
        f"{result.decode_seconds:.3f} s ({result.decode_tokens_per_s:.1f} tokens/s, {result.ms_per_step:.1f} ms/token)")
    model.close()
    return 0


def _run_job(args, model_path: Path, config, tokenizer, options: LoadOptions, tp: TensorParallel, say) -> int:
    """A batch job: check the whole prompt file, size the KV cache for it, run what is not done yet."""
    if not args.output:
        raise InputError("--prompts needs --output")
    records, done, results = _read_job(args, tokenizer, config.vocab_size, tp)
    seq = options.max_seq_len or max(len(r.prompt_ids) + r.max_new_tokens for r in records)
    check_context(records, seq)
    # A job's steps hold at least 2048 tokens, so that rows joining the batch read their prompts in few
    # steps (each step streams every weight once).
    options = options.replace(max_seq_len=seq, max_step_tokens=options.max_step_tokens or max(2048, seq))
    todo = max(sum(r.id not in done for r in records), 1)
    options = options.replace(max_batch=_batch_size(args, model_path, options, todo))
    if args.model is None and args.gpu_memory is None:
        options = _demo_budget(model_path, options, say)
    if args.plan:
        say(format_plans(prepare(model_path, options).plans))
        return 0
    model = load_model(model_path, options, progress=not args.quiet)
    say(format_plans(model.plans))
    eos = () if args.ignore_eos else config.eos_token_ids
    summary = run_batch(model, records, results, options.max_batch, _sampling(args), eos, tokenizer,
                        schedule=args.schedule, progress=tp.rank == 0 and not args.quiet)
    if results is not None:
        results.close()
    say(f"done: {summary}")
    model.close()
    return 0


def _read_job(args, tokenizer, vocab_size: int, tp: TensorParallel):
    """Rank 0 reads and checks the prompt file and the finished ids; every rank gets the same (or the error)."""
    outcome, results = None, None
    if tp.rank == 0:
        try:
            records = read_records(args.prompts, tokenizer, args.max_new_tokens, vocab_size)
            results = ResultFile(args.output)
            outcome = ("ok", records, results.done)
        except OffloadError as e:
            outcome = ("error", str(e))
    outcome = tp.broadcast_object(outcome)
    if outcome[0] == "error":
        raise InputError(outcome[1])
    _, records, done = outcome
    return records, set(done), results


def _options(args) -> LoadOptions:
    """The load options the flags give (values a job derives are added with ``replace``)."""
    return LoadOptions(
        device=args.device, dtype=args.dtype, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
        peer_memory=dict(parse_peer_flag(p) for p in args.peer_memory or []),
        max_batch=1 if args.max_batch is None else args.max_batch, max_seq_len=args.max_seq_len,
        max_step_tokens=args.max_step_tokens, tp=args.tp, slots=args.slots, quantize=args.quantize,
        group_size=args.group_size,
    )


def _sampling(args) -> Sampling:
    do_sample = args.do_sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    return Sampling(do_sample, 1.0 if args.temperature is None else args.temperature,
                    0 if args.top_k is None else args.top_k, 1.0 if args.top_p is None else args.top_p, args.seed)


def _single_prompt(args, tokenizer, demo: bool) -> list[int]:
    if args.prompt_ids:
        try:
            return [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise InputError(f"--prompt-ids expects comma-separated integers, got {args.prompt_ids!r}") from None
    text = args.prompt if args.prompt is not None else (DEMO_PROMPT if demo else None)
    if text is None:
        raise InputError("give --prompt, --prompt-ids or --prompts")
    if tokenizer is None:
        if demo:  # the demo works without the optional tokenizers package
            return [1, 306, 4966, 304, 1207]
        raise InputError(f"--prompt needs {args.model}/tokenizer.json and the tokenizers package; "
                         "use --prompt-ids instead")
    return tokenizer.encode(text)


def _batch_size(args, model_path: Path, options: LoadOptions, records: int) -> int:
    """``--batch-size N``, or for ``auto`` the most rows whose KV cache the budgets can hold (a plan per try).

    A step streams every weight once whatever the batch, so more rows are more tokens per
    byte moved; the cost is KV cache that would otherwise hold resident layers.
    """
    if args.batch_size != "auto":
        try:
            size = int(args.batch_size)
        except ValueError:
            raise InputError(f"--batch-size expects a number or auto, got {args.batch_size!r}") from None
        if size < 1:
            raise InputError("--batch-size must be >= 1")
        return size
    if args.max_batch is not None:
        return options.max_batch

    def fits(rows: int) -> bool:
        try:
            prepare(model_path, options.replace(max_batch=rows))
            return True
        except PlanError:
            return False

    lo, hi = 1, min(records, MAX_AUTO_BATCH)
    if not fits(lo):
        prepare(model_path, options.replace(max_batch=1))  # raises the planner's own explanation
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _demo_budget(model_path: Path, options: LoadOptions, say) -> LoadOptions:
    """A GPU budget that holds about half the demo's layers, so the rest stream from the host."""
    needs = prepare(model_path, options).plan.needs
    gpu = needs.fixed_bytes + (needs.n_layers // 2 + (options.slots or 2)) * needs.block_bytes
    say(f"demo: the built-in '{DEMO_SHAPE}' model (random weights) with --gpu-memory {gpu} "
        "bytes, so that half of its layers stream from host memory")
    return options.replace(gpu_memory=gpu, cpu_memory=options.cpu_memory or needs.n_layers * needs.block_bytes)
