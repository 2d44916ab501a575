"""``run_offloaded``: one prompt, or a JSONL file of prompts, through an offloaded model.

    python scripts/run_offloaded.py                                   # built-in demo
    python scripts/run_offloaded.py --model M --prompt "Hello" --gpu-memory 8GiB
    python scripts/run_offloaded.py --model M --chat --prompt "What is the capital of France?"
    python scripts/run_offloaded.py --model M --prompts in.jsonl --output out.jsonl --batch-size auto
    python scripts/run_offloaded.py --model M --gpu-memory 8GiB --plan
    torchrun --nproc-per-node 2 scripts/run_offloaded.py --model M --tp 2 --prompt-ids 1,2,3

Any bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from .api import load_model
from .batch import check_context, choose_batch_size, forecast_job, job_id, prompt_lengths, read_records, run_batch
from .chat import stop_token_ids
from .distributed import TensorParallel, init_tensor_parallel
from .drafts import draft_kind
from .errors import InputError, OffloadError, PlanError, PlanWarning
from .inputs import ascii_float, ascii_int, check_token_ids, check_unicode
from .loading import prepare
from .memory.budget import GPU_HEADROOM, HOST_HEADROOM_FRACTION, format_size, parse_peer_flag
from .memory.planner import format_plans
from .offloaded_model import result_of
from .models.checkpoint import is_gguf
from .models.config import load_config
from .models.quant import FORMATS, INT4, ROUNDINGS, STORED
from .options import MAX_COUNT, LoadOptions, parse_device, parse_dtype
from .results import ResultFile, finished_ids
from .sampling import Sampling
from .scheduler.row_engine import RowEngine, Request, Row, Stats
from .synthetic import DEMO_SHAPE, demo_checkpoint
from .text import IdText, TextStream, Tokenizer

DEMO_PROMPT = "offload runs transformer models that are larger than"
MAX_AUTO_BATCH = 128


class Parser(argparse.ArgumentParser):
    """argparse whose errors are InputError: one line on stderr and status 2, like any bad input. Its flags of
    ``type=int`` and ``type=float`` read ASCII digits alone (``int("４")`` is 4): anything else is "invalid int
    value", as any other text that is no number."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse converts a flag's text with the function its registry holds for the flag's type (the type itself
        # where it holds none), and names the type in its message: one place for every number flag.
        self.register("type", int, ascii_int)
        self.register("type", float, ascii_float)

    def error(self, message):
        raise InputError(message)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="run_offloaded", description="Run a model larger than the GPU: one prompt or a batch file.")
    add_model_flag(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer: tokenizer.json or a GGUF "
                                      "file's own, and the tokenizers package)")
    src.add_argument("--prompt-ids", help="prompt token ids, comma separated: 1,2,3")
    src.add_argument("--prompts",
                     help="batch job: JSONL file of {id, prompt | prompt_ids | messages[, max_new_tokens]}")
    p.add_argument("--chat", action="store_true",
                   help="lay --prompt out as a user message with the model's chat template (instruct models)")
    p.add_argument("--output", help="batch job: JSONL results file (appended; finished ids are skipped)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="most tokens to generate (default 32; a batch record's max_new_tokens wins)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, help="sampling temperature (implies --do-sample)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (implies --do-sample)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (implies --do-sample)")
    p.add_argument("--seed", type=int, help="sampling seed (default: a fresh one each run; greedy decoding, without "
                   "--do-sample or a flag that implies it, has none)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    add_load_flags(p, max_batch_help="KV cache rows (default 1; batch jobs: --batch-size)",
                   max_seq_len_help="KV cache length per row (default: what the prompts need)",
                   max_step_tokens_help=STEP_TOKENS_HELP)
    p.add_argument("--batch-size", help="batch job rows: a number, or auto (default)")
    p.add_argument("--schedule", choices=["dynamic", "fifo"], help="batch job scheduling: dynamic "
                   "(default: longest records first, a finished row takes the next at once) or fifo (records in "
                   "input order, a batch at a time)")
    p.add_argument("--plan", action="store_true", help="print the placement plan and exit without loading weights")
    add_quiet_flag(p)
    return p


STEP_TOKENS_HELP = ("most tokens per chunk of a forward pass (default: the largest of 2048, 1024, ... 128 whose "
                    "temporaries take no more memory than a layer)")


def add_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (HF config.json + safetensors) or GGUF file; default: a "
                   "built-in demo")


def add_load_flags(p: argparse.ArgumentParser, max_batch_help: str, max_seq_len_help: str,
                   max_step_tokens_help: str) -> None:
    """The flags that say how a model is loaded (read back by :func:`load_options`); the server takes them too."""
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--device", help="compute device (default: cuda:LOCAL_RANK, or cpu)")
    host_share = f"{100 * (1 - HOST_HEADROOM_FRACTION):.0f}%% of the available RAM"  # argparse formats help with %
    p.add_argument("--gpu-memory", help=f"budget of the compute device, e.g. 20GiB (default: its free memory less "
                                        f"{GPU_HEADROOM / 2**30:g} GiB; on a CPU, {host_share})")
    p.add_argument("--cpu-memory", help=f"pinned host memory for streamed layers, e.g. 100GiB (default with a GPU: "
                                        f"{host_share}; on a CPU: 0, nothing streams)")
    p.add_argument("--peer-memory", action="append", metavar="DEVICE=SIZE",
                   help="spare memory of another GPU, e.g. cuda:1=40GiB (repeatable)")
    p.add_argument("--max-batch", type=int, help=max_batch_help)
    p.add_argument("--max-seq-len", type=int, help=max_seq_len_help)
    p.add_argument("--max-step-tokens", type=int, help=max_step_tokens_help)
    p.add_argument("--slots", type=int, help="streaming slots on the GPU (default 2)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly instead of replaying "
                   "CUDA graphs (graphs are used only on a GPU)")
    p.add_argument("--compile", action="store_true", help="compile the decode layer with torch.compile before capturing "
                   "it (no measurable gain over offload's kernels; seconds of compiling per bucket)")
    p.add_argument("--prefetch-experts", action="store_true", help="a mixture of experts whose experts stream: "
                   "guess each next layer's experts with its router and copy them ahead (results unchanged)")
    p.add_argument("--direct-experts", action=argparse.BooleanOptionalAction, help="a mixture of experts: decode "
                   "steps read each routed expert where it lives (HBM or pinned host memory) inside their kernels, "
                   "no copies and no wait for the host (graphs as a dense model's; experts not on peers); default: "
                   "where every expert stays on the GPU")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (launch with torchrun)")
    p.add_argument("--quantize", choices=[*FORMATS, STORED], help="store the layers' linear weights as int8 or "
                   "int4 (default: the model dtype); stored: keep a GGUF file's own formats on a CPU too (which "
                   "otherwise expands them where they fit in half its budget; a GPU keeps them)")
    p.add_argument("--rounding", choices=ROUNDINGS, help="int4 (--quantize or --draft): each group's scale and minimum "
                   "searched to minimise its squared error (default), or minmax: the group's range")
    p.add_argument("--group-size", type=int, help="int4: input columns per scale (default 128, or the largest "
                   "smaller power of two that divides each input dimension)")
    p.add_argument("--draft", help="speculative decoding: ngram (prompt lookup), int4 or int8 (a copy of the "
                   "model's own weights in int4 or int8, kept on the GPU if the plan predicts a gain; int8: twice "
                   "the memory, accepted more often) or the directory of a smaller checkpoint with the same "
                   "vocabulary (kept on the GPU)")
    p.add_argument("--draft-tokens", type=int, help="tokens drafted per row and pass (default: chosen before each "
                   "pass from the measured acceptance and the plan's cost of a pass)")
    p.add_argument("--draft-branches", type=int, help="a draft model's tokens at each depth, verified "
                   "as a tree: its likeliest and the next ones (at most 4; 1: a chain; default: chosen before each "
                   "pass from how often the alternatives were right)")


def add_quiet_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv=None) -> int:
    return run_main("run_offloaded", build_parser(), _main, argv)


def run_main(prog: str, parser: argparse.ArgumentParser, body, argv=None) -> int:
    """``body(parsed args)``, with any bad input printed as one line on stderr and status 2 (never a traceback),
    and a warning as one line (the plan's are printed with the plan)."""
    # A character stdout's encoding lacks (PYTHONIOENCODING=ascii, a Windows console) is printed as "?": a model's
    # text or a prompt echoed would otherwise end the run with a traceback.
    with contextlib.suppress(AttributeError, ValueError):  # (a stdout that is no text file: as it is)
        sys.stdout.reconfigure(errors="replace")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanWarning)
        warnings.showwarning = lambda message, *_: print(f"{prog}: warning: {message}", file=sys.stderr)
        return _reporting_errors(prog, body, parser, argv)


def _reporting_errors(prog: str, body, parser: argparse.ArgumentParser, argv) -> int:
    args = None  # (the parser's own errors are InputErrors)
    try:
        args = parser.parse_args(argv)
        return body(args)
    except OffloadError as e:
        return _bad_input(prog, _derived_length(e, args))
    except torch.cuda.OutOfMemoryError as e:
        first = str(e).splitlines()[0] if str(e) else "out of memory"
        print(f"{prog}: error: {first} (lower --gpu-memory, --max-batch or --max-seq-len)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout's reader has gone (| head): end as a program that SIGPIPE ends, no traceback
        _silence_stdout()
        return 128 + 13
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _silence_stdout() -> None:
    """Point stdout at /dev/null: Python's flush of it at exit would otherwise fail again, with a message."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # (a stdout that is no file: nothing to flush)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def report_bad_input(prog: str, main) -> int:
    """``main()``'s exit status, with bad input (an :class:`OffloadError`) printed as one line on stderr and
    status 2: for scripts whose ``main`` parses its own arguments (the benchmarks)."""
    try:
        return main() or 0
    except OffloadError as e:
        return _bad_input(prog, e)


def _derived_length(e: OffloadError, args) -> OffloadError:
    """A plan that names --max-seq-len where the user gave none says where the KV cache's length came from."""
    if isinstance(e, PlanError) and "--max-seq-len" in str(e) and getattr(args, "max_seq_len", 0) is None \
            and getattr(args, "max_new_tokens", None) is not None:
        return PlanError(f"{e} (not given, --max-seq-len is what the prompts and --max-new-tokens need)")
    return e


def counts(flag: str, text: str, example: str) -> list[int]:
    """``flag``'s comma-separated positive integers (``example``: such as 1,16), sorted and each once; an
    InputError (one line, status 2) otherwise."""
    try:
        values = sorted({ascii_int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise InputError(f"{flag} expects comma-separated positive integers such as {example}, got {text!r}")
    return values


def _bad_input(prog: str, error: OffloadError) -> int:
    """``error`` as one line on stderr; the exit status of bad input."""
    print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def _main(args) -> int:
    options, sampling = load_options(args), _sampling(args)  # every flag is checked before anything runs
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if args.max_new_tokens > MAX_COUNT:
        raise InputError(f"--max-new-tokens must be at most {MAX_COUNT}, got {args.max_new_tokens}")
    for flag, given in (("--model", args.model), ("--prompts", args.prompts), ("--output", args.output)):
        if given == "":  # the path "" is the current folder: --prompts "" ran the demo's prompt, --model "" the folder
            raise InputError(f"{flag} is empty; give a path")
    for flag, given in (("--output", args.output), ("--batch-size", args.batch_size), ("--schedule", args.schedule)):
        if given is not None and not args.prompts:
            raise InputError(f"{flag} goes with --prompts (a batch job)")
    if args.batch_size is not None and args.max_batch is not None:
        raise InputError("--batch-size and --max-batch both give a batch job's rows; give one")
    if args.batch_size not in (None, "auto"):
        _batch_rows(args.batch_size)  # refused before the prompt file is read and the model planned
    tp = join_ranks(args)  # under torchrun, before anything that ranks must agree on
    say = print if tp.rank == 0 else (lambda *a, **k: None)
    demo = args.model is None
    model_path = demo_checkpoint(quiet=args.quiet or tp.rank != 0) if demo else _model_path(args.model)
    config = load_config(model_path)
    tokenizer = Tokenizer.from_checkpoint(model_path)
    if args.chat and args.prompt is None:
        raise InputError("--chat goes with --prompt (batch records carry 'messages' for a chat)")
    if args.prompts:
        return _run_job(args, model_path, config, tokenizer, options, sampling, tp, say)

    prompt = None
    if not (args.plan and args.prompt is None and args.prompt_ids is None):  # --plan needs no prompt
        prompt = check_token_ids(_single_prompt(args, tokenizer, demo), config.vocab_size,
                                 "--prompt-ids" if args.prompt_ids is not None else "--prompt")
        needed = len(prompt) + args.max_new_tokens
        options = options.replace(max_seq_len=options.max_seq_len or needed)
        if needed > options.max_seq_len:
            raise InputError(f"the prompt ({len(prompt)} tokens) plus --max-new-tokens {args.max_new_tokens} "
                             f"exceeds --max-seq-len {options.max_seq_len}")
    if demo and args.gpu_memory is None:
        options = demo_budget(model_path, options, say)
    if args.plan:
        setup = prepare(model_path, options)
        _warn_context(config, options.max_seq_len, tp)  # once nothing can fail: a failure is one line alone
        say(format_plans(setup.plans))
        if prompt is not None:
            cost = lambda tokens, keys: max(p.pass_seconds(tokens, keys) for p in setup.plans)  # noqa: E731
            say(f"predicted for this prompt: {forecast_job([(len(prompt), args.max_new_tokens)], 1, cost)}"
                f"{_cpu_caveat(setup.device)}")
        return 0

    model = load_model(model_path, options, progress=not args.quiet)
    _warn_context(config, options.max_seq_len, tp)
    say(format_plans(model.plans))
    if tokenizer is not None:
        say(f"prompt: {tokenizer.decode(prompt, special=True)!r} ({len(prompt)} tokens)")
    eos = () if args.ignore_eos else stop_token_ids(model_path, config.eos_token_ids)
    # The demo's random weights make noise, not text: it shows only the ids.
    show = (lambda text: print(text, end="", flush=True)) if tp.rank == 0 and not demo else (lambda text: None)
    row, stats = generate_showing(model, Request(tuple(prompt), args.max_new_tokens, sampling, eos),
                                  tokenizer or IdText(), show)
    result = result_of([row], stats)
    if tokenizer is not None and not demo:
        say(f"output: {tokenizer.decode(row.tokens)!r}")
    say(f"output ids: {','.join(map(str, row.tokens))} ({row.finish_reason})")
    say(f"prefill: {result.prompt_tokens} tokens in {result.prefill_seconds:.3f} s "
        f"({result.prefill_tokens_per_s:.1f} tokens/s); decode: {result.decode_tokens} tokens in "
        f"{result.decode_seconds:.3f} s ({result.decode_tokens_per_s:.1f} tokens/s, {result.ms_per_token:.1f} ms/token)")
    if model.draft is not None and result.decode_steps:  # (none where the prompt's pass made every token)
        say(f"speculative decoding: {result.tokens_per_pass:.2f} tokens per pass over the model "
            f"({result.decode_steps} passes, {result.ms_per_step:.1f} ms each), {result.accepted_tokens} of "
            f"{result.drafted_tokens} drafted tokens accepted")
    if model.experts is not None:
        say(model.experts.summary())
    model.close()
    return 0


def generate_showing(model, request: Request, tokenizer, show) -> tuple[Row, Stats]:
    """Run one request through the row engine, passing the text of each token to ``show`` as soon as it is
    final (a closing eos token shows nothing), then a newline. Returns the finished row and the engine's stats."""
    engine = RowEngine(model, rows=1)
    engine.submit(request)
    text = TextStream(tokenizer, prompt=request.prompt)
    finished = None
    while engine.busy:
        for row, token in engine.step():
            if row.finish_reason != "eos":
                show(text.add(token))
            if row.finish_reason is not None:
                finished = row
    show(text.finish() + "\n")
    return finished, engine.stats


def _run_job(args, model_path: Path, config, tokenizer, options: LoadOptions, sampling: Sampling,
             tp: TensorParallel, say) -> int:
    """A batch job: check the whole prompt file and the output, size the KV cache, run what is not done yet."""
    if not args.output:
        raise InputError("--prompts needs --output")
    eos = () if args.ignore_eos else stop_token_ids(model_path, config.eos_token_ids)
    name_job = lambda records: job_id(records, model_path, _job_dtype(options), options.quantize,  # noqa: E731
                                      options.group_size, sampling, eos, options.rounding)
    records, done, results = _read_job(args, tokenizer, config.vocab_size, options, tp, name_job)
    try:
        return _run_records(args, model_path, config, tokenizer, options, sampling, eos, tp, say, records, done,
                            results)
    finally:
        if results is not None:
            results.close()  # releases the output's lock


def _run_records(args, model_path: Path, config, tokenizer, options: LoadOptions, sampling: Sampling, eos,
                 tp: TensorParallel, say, records, done, results) -> int:
    if all(r.id in done for r in records):  # a rerun of a finished job loads nothing (and plans nothing)
        say(f"nothing to do: the {len(records)} record(s) are all in {args.output}")
        return 0
    options = options.replace(max_seq_len=_job_context(records, options))
    if args.model is None and args.gpu_memory is None:
        options = demo_budget(model_path, options, say)
    shapes = [(len(r.prompt_ids), r.max_new_tokens) for r in records if r.id not in done]
    options = options.replace(max_batch=_batch_size(args, model_path, options, shapes, say))
    setup = prepare(model_path, options)
    _warn_context(config, options.max_seq_len, tp)  # once the plan is made: a job that cannot run says so in one line alone
    say(format_plans(setup.plans))
    cost = lambda tokens, keys: max(p.pass_seconds(tokens, keys) for p in setup.plans)  # noqa: E731
    say(f"predicted for this job: {forecast_job(shapes, options.max_batch, cost)}{_cpu_caveat(setup.device)}")
    if args.plan:
        return 0
    model = load_model(model_path, options, progress=not args.quiet)
    summary = run_batch(model, records, results, options.max_batch, sampling, eos, tokenizer,
                        schedule=args.schedule or "dynamic", progress=tp.rank == 0 and not args.quiet)
    say(f"done: {summary}")
    if model.experts is not None:
        say(model.experts.summary())
    model.close()
    return 0


def _cpu_caveat(device: torch.device) -> str:
    return (" (a CPU's forecast counts weight reads and matrix work alone: the per-layer overhead of each step "
            "can make a small model several times slower)" if device.type == "cpu" else "")


def _read_job(args, tokenizer, vocab_size: int, options: LoadOptions, tp: TensorParallel, name_job):
    """Rank 0 checks the prompt file, then the output file (which it locks, unless only planning), which must
    be this job's (``name_job(records)``); every rank gets the records and the finished ids (or the error)."""
    outcome, results = None, None
    if tp.rank == 0:
        try:
            records = read_records(args.prompts, tokenizer, args.max_new_tokens, vocab_size)
            check_context(records, _job_context(records, options))
            if _same_file(args.prompts, args.output):
                raise InputError(f"--output {args.output!r} is the prompt file; give another file")
            job = name_job(records)
            if args.plan:
                done = finished_ids(args.output, prompt_lengths(records), job)
            else:
                results = ResultFile(args.output, prompt_lengths(records), job)
                done = results.done
            outcome = ("ok", records, done)
        except OffloadError as e:
            outcome = ("error", str(e))
    outcome = tp.broadcast_object(outcome)
    if outcome[0] == "error":
        raise InputError(outcome[1])
    _, records, done = outcome
    return records, set(done), results


def _job_dtype(options: LoadOptions) -> torch.dtype:
    """The dtype a job runs in: its default is bfloat16 on a GPU, float32 on a CPU (as ``load_model`` decides)."""
    device = options.device if options.device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return parse_dtype(options.dtype, "cuda" if str(device).startswith("cuda") else "cpu")


def _job_context(records, options: LoadOptions) -> int:
    """The KV cache length of a job: --max-seq-len, or what its longest record needs."""
    return options.max_seq_len or max(len(r.prompt_ids) + r.max_new_tokens for r in records)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # the output does not exist yet
        return False


def _model_path(model: str) -> Path:
    path = Path(model)
    if path.is_file() and not is_gguf(path):
        raise InputError(f"--model {model!r} is neither a checkpoint directory (config.json + safetensors) nor a "
                         "GGUF file")
    return path


def _warn_context(config, max_seq_len: int | None, tp: TensorParallel) -> None:
    """One line on stderr when the KV cache reaches past the positions the model was trained on."""
    message = config.context_warning(max_seq_len)
    if message and tp.rank == 0:
        print(f"run_offloaded: warning: {message}", file=sys.stderr)


def _rounding(args) -> str:
    """``--rounding``, which only int4 weights have: those of ``--quantize int4`` or of ``--draft int4``."""
    if args.rounding is not None and INT4 not in (args.quantize, draft_kind(args.draft)):
        raise InputError(f"--rounding {args.rounding} is for int4 weights (--quantize int4 or --draft int4); "
                         "nothing here is rounded to int4")
    return args.rounding or "search"


def join_ranks(args) -> TensorParallel:
    """This process's place among ``--tp`` ranks under torchrun: NCCL, or gloo where ``--device cpu``."""
    return init_tensor_parallel(args.tp, args.device and parse_device(args.device))


def load_options(args, max_batch: int = 1) -> LoadOptions:
    """The load options the flags of :func:`add_load_flags` give (``max_batch`` when --max-batch is not given;
    values a job derives are added with ``replace``)."""
    return LoadOptions(
        device=args.device, dtype=args.dtype, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
        peer_memory=dict(_peer(text) for text in args.peer_memory or []),
        max_batch=max_batch if args.max_batch is None else args.max_batch, max_seq_len=args.max_seq_len,
        max_step_tokens=args.max_step_tokens, tp=args.tp, slots=args.slots, cuda_graphs=not args.no_cuda_graphs,
        compile=args.compile, quantize=args.quantize, group_size=args.group_size, rounding=_rounding(args),
        draft=args.draft, draft_tokens=args.draft_tokens, draft_branches=args.draft_branches,
        prefetch_experts=args.prefetch_experts, direct_experts=args.direct_experts,
        all_logits=False,  # generation reads each row's last logits alone
    )


def _peer(text: str) -> tuple[str, int]:
    """``--peer-memory cuda:1=40GiB``: a peer is another GPU."""
    name, size = parse_peer_flag(text)
    if not name.startswith("cuda:"):
        raise InputError(f"--peer-memory {text!r}: {name} is not a GPU; a peer is another CUDA device, "
                         "such as cuda:1=40GiB")
    return name, size


def _sampling(args) -> Sampling:
    do_sample = args.do_sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    return Sampling(do_sample, 1.0 if args.temperature is None else args.temperature,
                    0 if args.top_k is None else args.top_k, 1.0 if args.top_p is None else args.top_p, args.seed)


def _single_prompt(args, tokenizer, demo: bool) -> list[int]:
    if args.prompt_ids is not None:
        try:
            ids = args.prompt_ids.split(",") if args.prompt_ids.strip() else []  # (empty: refused)
            return [ascii_int(t) for t in ids]
        except ValueError:
            raise InputError(f"--prompt-ids expects comma-separated integers, got {args.prompt_ids!r}") from None
    text = args.prompt if args.prompt is not None else (DEMO_PROMPT if demo else None)
    if text is None:
        raise InputError("give --prompt, --prompt-ids or --prompts")
    check_unicode(text, "--prompt")
    if tokenizer is None:
        if demo:  # the demo works without the optional tokenizers package
            return [1, 306, 4966, 304, 1207]
        raise InputError(f"--prompt needs {args.model}/tokenizer.json and the tokenizers package; "
                         "use --prompt-ids instead")
    if args.chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return tokenizer.encode(text)


def _batch_rows(text: str) -> int:
    """``--batch-size N``'s N."""
    try:
        size = ascii_int(text)
    except ValueError:
        raise InputError(f"--batch-size expects a number or auto, got {text!r}") from None
    if size < 1:
        raise InputError("--batch-size must be >= 1")
    return size


def _batch_size(args, model_path: Path, options: LoadOptions, shapes: list[tuple[int, int]], say) -> int:
    """``--batch-size N``; for ``auto`` the rows (and with them the placement) that make the job's
    tokens soonest by the plans' cost model, tried against every batch size that fits."""
    if args.batch_size not in (None, "auto"):
        return min(_batch_rows(args.batch_size), len(shapes))  # rows past the records would only hold KV cache
    if args.max_batch is not None:
        return options.max_batch
    plans_for = lambda rows: prepare(model_path, options.replace(max_batch=rows)).plans  # noqa: E731
    best, tried = choose_batch_size(shapes, plans_for, min(len(shapes), MAX_AUTO_BATCH))
    others = ", ".join(f"{f.rows}: {f.tokens_per_s:.1f}" for f in tried if f is not best)
    say(f"batch size auto: {best.rows} row{'s' if best.rows != 1 else ''}, predicted {best.tokens_per_s:.1f} "
        "generated tokens/s"
        + (f" (other batch sizes, tokens/s: {others})" if others else ""))
    return best.rows


def demo_budget(model_path: Path, options: LoadOptions, say) -> LoadOptions:
    """A GPU budget that holds about half the demo's layers, so the rest stream from the host (fewer where the
    ring's slots would take the room of every layer that streams: then nothing would)."""
    needs = prepare(model_path, options).plan.needs
    resident, slots = needs.streaming_half(options.slots)
    gpu = needs.gpu_budget_streaming(resident, slots)
    say(f"demo: the built-in '{DEMO_SHAPE}' model, whose weights are random (its output ids mean nothing; the "
        f"plan and the speed are the point), in a budget of {format_size(gpu)} (--gpu-memory {gpu}) that holds "
        f"{resident} of its {len(needs.blocks)} layers: the rest stream from host memory")
    return options.replace(gpu_memory=gpu, cpu_memory=options.cpu_memory or needs.weight_bytes + needs.embedding_bytes,
                           slots=slots)
