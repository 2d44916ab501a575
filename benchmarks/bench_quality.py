"""What quantization costs in quality: perplexity and next-token KL divergence, none vs int8 vs int4.

    python benchmarks/bench_quality.py --model path/to/checkpoint --text some.txt
    python benchmarks/bench_quality.py --model M --token-ids ids.json --formats none,int4 --group-size 64
    python benchmarks/bench_quality.py --model M --text some.txt --formats none,int8,int4@64:minmax,int4@64
    python benchmarks/bench_quality.py --quick      # a tiny model trained on the CPU in seconds (CI runs this)

A format is ``none``, ``int8`` or ``int4``, an int4 one optionally with ``@G`` (its group size)
and ``:minmax`` (plain min/max rounding of each group; default ``:search``, each group's scale
and minimum searched to minimise its error). The model is loaded once per format
(``load_model(..., quantize=...)``, with any
budget flags, so a model larger than the GPU is measured offloaded). The text
(tokenized with the checkpoint's ``tokenizer.json``) or the token ids are cut
into windows of ``--window`` tokens; each window is one forward pass, and every
token after a window's first is predicted from the ones before it.

    perplexity   exp(mean negative log-likelihood of the predicted tokens)
    KL           KL(p_none || p_format) of each predicted token's next-token distribution,
                 in nats: the mean and the max over the first --kl-tokens positions
                 (the unquantized model's log-probabilities are kept for those)
    top-1        how often the format's most likely next token is the unquantized model's

``--quick`` uses the structured model of ``offload.structured`` (a small Llama
trained for a few seconds on a Markov corpus, cached in ~/.cache/offload) and
held-out sequences of its corpus, in float32 on the CPU.

Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

import offload  # noqa: E402
from offload.models.quant import FORMATS  # noqa: E402
from offload.structured import corpus_of, structured_checkpoint  # noqa: E402
from offload.text import Tokenizer  # noqa: E402

NONE = "none"
QUICK_ROWS, QUICK_LENGTH, QUICK_SEED = 32, 64, 12345  # held-out sequences: seeds the training never used
DEFAULT_WINDOW, DEFAULT_KL_TOKENS, DEFAULT_BATCH = 512, 4096, 4


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


@dataclass
class Row:
    format: str
    layer_bytes: int
    weight_format: str
    tokens: int  # predicted tokens
    perplexity: float
    kl_mean: float | None = None
    kl_max: float | None = None
    top1_agreement: float | None = None
    seconds: float = 0.0


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a checkpoint directory (HF config.json + safetensors)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="a text file (needs tokenizer.json in the checkpoint and the tokenizers package)")
    src.add_argument("--token-ids", help="a JSON file of token ids: a list, or a list of lists (one per sequence)")
    p.add_argument("--formats", default="none,int8,int4", help="comma-separated, from none,int8,int4 (none first)")
    p.add_argument("--group-size", type=int, help="int4's group size (default: offload's rule)")
    p.add_argument("--window", type=int, help=f"tokens per forward pass (default {DEFAULT_WINDOW}, "
                   "at most the model's context)")
    p.add_argument("--max-windows", type=int, help="use at most this many windows")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="windows per forward pass")
    p.add_argument("--kl-tokens", type=int, default=DEFAULT_KL_TOKENS,
                   help="positions whose KL divergence is measured (the reference log-probabilities are kept)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--device", help="compute device (default: cuda when present, else cpu)")
    p.add_argument("--gpu-memory", help="budget of the compute device, e.g. 8GiB")
    p.add_argument("--cpu-memory", help="pinned host memory for streamed layers, e.g. 64GiB")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--quick", action="store_true", help="the structured tiny model on the CPU (for CI)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------- input


def formats_from(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f != NONE and parse_format(f) is None]
    if unknown or not formats or formats[0] != NONE or len(set(formats)) != len(formats):
        raise UsageError(f"--formats takes none followed by any of {', '.join(FORMATS)} (int4 also as int4@G and "
                         f"int4:minmax; each once), got {text!r}")
    return formats


def parse_format(text: str) -> tuple[str, int | None, str] | None:
    """(format, group size, rounding) of ``int8``, ``int4``, ``int4@64``, ``int4:minmax``, ``int4@64:minmax``."""
    name, _, rounding = text.partition(":")
    name, _, group = name.partition("@")
    if name not in FORMATS or rounding not in ("", "search", "minmax") or (name != "int4" and (group or rounding)):
        return None
    if group and (not group.isdigit() or int(group) < 2 or int(group) % 2):
        return None
    return name, int(group) if group else None, rounding or "search"


def sequences_from(args, model: Path, vocab: int) -> list[list[int]]:
    """The token ids to evaluate, one list per sequence."""
    if args.quick:
        return corpus_of(model).sample(QUICK_ROWS, QUICK_LENGTH, QUICK_SEED).tolist()
    if args.text:
        tokenizer = Tokenizer.from_dir(model)
        if tokenizer is None:
            raise UsageError(f"--text needs {model}/tokenizer.json and the tokenizers package; use --token-ids")
        sequences = [tokenizer.encode(_read(args.text))]
    elif args.token_ids:
        try:
            data = json.loads(_read(args.token_ids))
        except json.JSONDecodeError as e:
            raise UsageError(f"{args.token_ids}: not JSON ({e})") from None
        sequences = data if data and isinstance(data[0], list) else [data]
    else:
        raise UsageError("give --text FILE or --token-ids FILE (or --quick)")
    for s in sequences:
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in s):
            raise UsageError(f"token ids must be integers in [0, {vocab}); the model's vocabulary has {vocab}")
    return sequences


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


def windows_of(sequences: list[list[int]], window: int, limit: int | None) -> list[list[int]]:
    """Consecutive pieces of ``window`` tokens (a sequence's last piece may be shorter; pieces of one token
    predict nothing and are dropped)."""
    pieces = [s[i : i + window] for s in sequences for i in range(0, len(s), window)]
    pieces = [p for p in pieces if len(p) > 1]
    return pieces[:limit] if limit else pieces


# ---------------------------------------------------------------------- measuring


def batches_of(windows: list[list[int]], batch: int) -> list[list[list[int]]]:
    """Consecutive windows of one length, at most ``batch`` together (one forward pass, no padding)."""
    groups: list[list[list[int]]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch and len(groups[-1][0]) == len(w):
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


def evaluate(model, windows: list[list[int]], batch: int, kl_tokens: int):
    """(negative log-likelihood of each predicted token, log-probabilities of the first ``kl_tokens``
    predicted positions)."""
    nll, kept = [], []
    for group in batches_of(windows, batch):
        ids = torch.tensor(group)
        log_p = torch.log_softmax(model(ids)[:, :-1].float().cpu(), dim=-1)
        targets = ids[:, 1:]
        nll.append(-log_p.gather(2, targets[..., None])[..., 0].flatten())
        room = kl_tokens - sum(len(k) for k in kept)
        if room > 0:
            kept.append(log_p.flatten(0, 1)[:room])
    return torch.cat(nll), torch.cat(kept)


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, from log-probabilities ``[positions, vocab]``."""
    return (reference.exp() * (reference - other)).sum(-1).clamp(min=0)


def run_format(args, model_path, fmt: str, windows, window: int) -> tuple[Row, torch.Tensor]:
    """Load the model in ``fmt`` and evaluate it: its row of the table and its kept log-probabilities."""
    quantize, group, rounding = (None, None, "search") if fmt == NONE else parse_format(fmt)
    options = dict(dtype=args.dtype, device=args.device, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
                   max_batch=args.batch, max_seq_len=window, max_step_tokens=args.batch * window,
                   quantize=quantize, group_size=(group or args.group_size) if quantize == "int4" else None,
                   rounding=rounding)
    start = time.perf_counter()
    with offload.load_model(model_path, progress=False, **options) as model:
        nll, logprobs = evaluate(model, windows, args.batch, args.kl_tokens)
        needs = model.plan.needs
    row = Row(fmt, needs.largest_block, needs.weight_format or str(model.dtype).removeprefix("torch."),
              len(nll), math.exp(nll.mean().item()), seconds=time.perf_counter() - start)
    return row, logprobs


# ---------------------------------------------------------------------- output


def table(rows: list[Row]) -> str:
    base = rows[0].perplexity
    lines = [f"{'format':<18}{'bytes/layer':>13}{'perplexity':>12}{'vs none':>9}{'KL mean':>11}{'KL max':>11}"
             f"{'top-1':>9}"]
    for r in rows:
        kl = (f"{r.kl_mean:>11.2e}{r.kl_max:>11.2e}{100 * r.top1_agreement:>8.2f}%" if r.kl_mean is not None
              else f"{'-':>11}{'-':>11}{'-':>9}")
        lines.append(f"{r.format:<18}{offload.format_size(r.layer_bytes):>13}{r.perplexity:>12.4f}"
                     f"{r.perplexity / base:>9.4f}{kl}")
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.quick and (args.model or args.text or args.token_ids or args.dtype or args.device):
            raise UsageError("--quick chooses the model, the tokens, the device and the dtype itself")
        formats = formats_from(args.formats)
        for name in ("window", "max_windows", "batch", "kl_tokens"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if args.quick:
            torch.set_num_threads(1)  # a tiny model gains nothing from threads; one keeps shared CI machines steady
            args.device, args.dtype = "cpu", "float32"
            model_path = structured_checkpoint()
        elif args.model:
            model_path = Path(args.model)
        else:
            raise UsageError("give --model PATH (or --quick)")
        config = offload.load_config(model_path)
        window = min(args.window or DEFAULT_WINDOW, config.max_position_embeddings)
        if window < 2:
            raise UsageError(f"--window must be >= 2, got {window}")
        windows = windows_of(sequences_from(args, model_path, config.vocab_size), window, args.max_windows)
        if not windows:
            raise UsageError("no window of two or more tokens to evaluate")
        rows, reference = [], None
        for fmt in formats:
            row, logprobs = run_format(args, model_path, fmt, windows, window)
            if reference is None:
                reference = logprobs
            else:
                kl = kl_divergence(reference, logprobs)
                row.kl_mean, row.kl_max = kl.mean().item(), kl.max().item()
                row.top1_agreement = (logprobs.argmax(-1) == reference.argmax(-1)).float().mean().item()
            rows.append(row)
    except (UsageError, offload.OffloadError) as e:
        print(f"bench_quality: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2

    source = "held-out sequences of its Markov corpus" if args.quick else (args.text or args.token_ids)
    print(f"model: {model_path} ({'structured, trained on the CPU' if args.quick else config.architecture}), "
          f"{len(windows)} window(s) of up to {max(map(len, windows))} tokens from {source}; "
          f"KL over the first {min(args.kl_tokens, rows[0].tokens)} positions")
    for r in rows:
        print(f"  {r.format}: {r.weight_format} ({r.seconds:.1f} s)")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model_path), "window": window, "windows": len(windows),
                                               "rows": [asdict(r) for r in rows]}, indent=2))
    worst = max(rows[1:], key=lambda r: r.perplexity, default=rows[0])
    print(f"bench_quality: {len(rows)} format(s); worst perplexity {worst.format} "
          f"{worst.perplexity / rows[0].perplexity:.4f}x of none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
