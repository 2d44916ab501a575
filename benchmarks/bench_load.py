#!/usr/bin/env python3
"""How fast a checkpoint loads, against reading its files.

    python benchmarks/bench_load.py --model PATH --gpu-memory 24GiB --cpu-memory 100GiB
    python benchmarks/bench_load.py --write int4 --shape llama-2-70b --out /tmp/70b-int4 --gpu-memory 24GiB \\
        --cpu-memory 100GiB          # a saved int4 checkpoint of random weights, written first
    python benchmarks/bench_load.py --write gguf --shape llama-2-13b --out /tmp/13b.gguf --gpu-memory 4GiB \\
        --cpu-memory 16GiB           # a Q4_K_M-like GGUF file of random blocks, written first
    python benchmarks/bench_load.py --quick      # the tiny shape saved in int4 (the tests run this)

Two timings of the same bytes:

read   every file of the checkpoint read once, front to back, into one buffer (the speed
       of the disk, or of the page cache);
load   ``offload.load_model`` under the budget: the plan (links measured beforehand),
       every tier allocated (pinned host memory included), each tensor read into its
       place and, where the file's format is not the model's, converted.

With ``--against-map`` the load is timed again the ways loads read before: where OFFLOAD_READ_THREADS
has a range read by several threads at once, by one (the default); on a GPU with the pieces
on their way to it staged in one pageable buffer, each copy waited for (before 2026-12-07; now two
pinned buffers in turn where the host budget has room: ``FileReads.allow_pinned`` off), and each
tensor copied out of the file's memory map (before 2026-12-06: ``CheckpointSource._read_rows`` off).

Both are reported as GB/s of the files' bytes, and load / read is the figure to read
(1.0: loading costs what reading the files costs). Before each timing the files' pages
are dropped from the page cache (``posix_fadvise(DONTNEED)``), so both read the disk;
``--warm`` reads them once first instead, so both read the page cache.

Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

import offload  # noqa: E402
from offload.cli import Parser, report_bad_input  # noqa: E402
from offload.gguf.convert import QK_K  # noqa: E402
from offload.models import checkpoint  # noqa: E402
from offload.models.checkpoint import CheckpointSource, FileReads  # noqa: E402
from offload.models.shapes import SHAPES, shape_config  # noqa: E402

READ_CHUNK = 64 * 2**20
WRITES = ("int4", "int8", "gguf")
GGUF_WRITES = ("LlamaForCausalLM", "Qwen3MoeForCausalLM")  # what offload.gguf.write_q4_k_m_like makes


def parse_args(argv) -> argparse.Namespace:
    p = Parser(prog="bench_load", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a checkpoint directory or GGUF file to load")
    p.add_argument("--write", choices=WRITES, help="first write --out from random weights of --shape: a saved "
                                                   "int4/int8 checkpoint, or a Q4_K_M-like GGUF file")
    p.add_argument("--shape", help=f"the shape to write ({', '.join(SHAPES)})")
    p.add_argument("--out", help="where --write writes (then loaded)")
    p.add_argument("--group-size", type=int, help="int4 groups of --write int4 (default: the format's)")
    p.add_argument("--gpu-memory", help="budget of the compute GPU (default: its free memory)")
    p.add_argument("--cpu-memory", help="pinned host memory for streamed layers")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--warm", action="store_true", help="read the page cache, not the disk")
    p.add_argument("--against-map", action="store_true", help="time the load again as before: on a GPU staged in "
                   "pageable memory (before 2026-12-07), and copied from the file's memory map (before 2026-12-06)")
    p.add_argument("--profile", type=int, metavar="N", help="then load once more under cProfile and print the N "
                   "functions the loading thread spent most time in (reads, copies, pinning, quantizing)")
    p.add_argument("--rounds", type=int, default=1, help="time reading and each load this many times, the loads' "
                   "order turned each round; report the medians (default 1)")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--quick", action="store_true", help="the tiny shape saved in int4, on the CPU")
    args = p.parse_args(argv)
    if args.profile is not None and args.profile < 1:
        p.error(f"--profile N prints the N costliest functions: N must be at least 1, got {args.profile}")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.quick:
        # --quick sets these itself: one given beside it would be silently ignored
        given = [flag for flag in ("--model", "--write", "--shape", "--out", "--group-size", "--gpu-memory")
                 if getattr(args, flag[2:].replace("-", "_")) is not None]
        if given:
            p.error(f"--quick writes and loads the tiny shape in int4 under its own budget; drop {', '.join(given)}")
        return args
    if bool(args.model) == bool(args.write):
        p.error("give --model PATH, or --write FORMAT --shape NAME --out PATH")
    if args.write and not (args.shape and args.out):
        p.error("--write needs --shape and --out")
    if args.shape and args.shape not in SHAPES:
        p.error(f"unknown shape {args.shape!r}; choose from {', '.join(SHAPES)}")
    if args.write == "gguf":
        check_gguf_write(p, args.shape, Path(args.out))
    return args


def check_gguf_write(p, shape: str, out: Path) -> None:
    """Refuse, before anything is written, a GGUF file the writer cannot make or one that would replace a file."""
    config = shape_config(shape)
    if config["architectures"][0] not in GGUF_WRITES:
        p.error(f"--write gguf writes llama and qwen3moe files; {shape} is neither")
    # The writer makes Q4_K/Q6_K blocks of QK_K values along each matrix's input dimension: a width that is not a
    # multiple of QK_K fails halfway through the file.
    for name, width in kquant_widths(config).items():
        if width % QK_K:
            p.error(f"--write gguf needs input widths that are multiples of {QK_K} (the K-quant block); "
                    f"{shape} has {name} {width}")
    if out.exists():  # as --write int4/int8 refuse a non-empty --out
        p.error(f"--out {out} exists: --write gguf writes a new file")
    if not out.parent.is_dir():
        p.error(f"--out {out}: no directory {out.parent} to write it in")


def kquant_widths(config: dict) -> dict[str, int]:
    """The input dimensions of a model's matrices, which the GGUF writer stores in K-quant blocks (a mixture of
    experts': its experts' width, not the dense one it does not use)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    mlp = ("moe_intermediate_size", config["moe_intermediate_size"]) if config.get("num_experts") else \
        ("intermediate_size", config["intermediate_size"])
    return {"hidden_size": config["hidden_size"], "heads x head_dim": heads * head_dim, mlp[0]: mlp[1]}


def checkpoint_files(path: Path) -> list[Path]:
    """The files whose bytes a load reads: a directory's safetensors, or a GGUF file and its split parts."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
    elif "-of-" in path.name:  # name-00001-of-00003.gguf
        files = sorted(path.parent.glob(path.name.rsplit("-", 3)[0] + "-*-of-*.gguf"))
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise offload.InputError(f"{path}: no checkpoint files (safetensors or GGUF) found")
    return files


def drop_cached(files: list[Path]) -> bool:
    """Drop the files' pages from the page cache; False where the system cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def read_seconds(files: list[Path]) -> float:
    """Seconds to read every file front to back into one reused buffer."""
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    start = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - start


def write(args) -> Path:
    """Write ``args.out`` from random weights of ``args.shape``, as ``args.write`` says."""
    out, config = Path(args.out), shape_config(args.shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.write == "gguf":
        return write_gguf_file(out, config)
    from offload.quantized import write_quantized

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return write_quantized(config, out, args.write, args.group_size, rounding="minmax", dtype=dtype,
                           device=device, random_weights=0)


def write_gguf_file(out: Path, config: dict) -> Path:
    """A Q4_K_M-like GGUF file at ``out``, written under a hidden name and renamed once whole: a write that fails
    or is interrupted leaves no truncated file behind (one killed by a signal leaves its hidden ``.partial``)."""
    from offload.gguf import write_q4_k_m_like

    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")  # this process's own: a second run has its own
    try:
        write_q4_k_m_like(partial, config, seed=0, progress=True)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)  # gone already once renamed
    return out


LOADS = {  # the ways a load may read, timed with --against-map: the patches that make each
    "load": (),
    "one_reader_load": ((checkpoint, "READ_THREADS", 1),),  # one read at a time (where OFFLOAD_READ_THREADS says more)
    "pageable_load": ((FileReads, "allow_pinned", lambda *a: None),  # one pageable buffer, each copy waited for
                      (checkpoint, "READ_THREADS", 1)),
    "map_load": ((CheckpointSource, "_read_rows", lambda *a: False),),  # copied from the memory map
}


def measure(path: Path, options: dict, warm: bool, against_map: bool = False, profile: int = 0,
            rounds: int = 1) -> dict:
    """Reading the files and loading them, ``rounds`` times; with ``against_map`` each round also loads the earlier
    ways (``LOADS``), in an order turned by one each round (the first load after a read ran slower on every machine
    tried, whichever way it read). Each figure is the median of its rounds; a ratio, of each round's own."""
    files = checkpoint_files(path)
    nbytes = sum(f.stat().st_size for f in files)
    offload.plan_model(path, **options)  # measures (and records) the links: not part of the load timed below
    if torch.cuda.is_available():
        torch.cuda.init()
        torch.empty(1, device="cuda")  # the CUDA context too
    cold = not warm and drop_cached(files)
    if not cold:
        read_seconds(files)  # into the page cache
    ways = [w for w in LOADS if against_map and (w != "pageable_load" or torch.cuda.is_available())
            and (w != "one_reader_load" or checkpoint.READ_THREADS > 1)] or ["load"]
    timed, plan = [], ""
    for r in range(rounds):
        times = {"read": read_seconds(files)}
        for way in ways[r % len(ways):] + ways[: r % len(ways)]:
            if cold:
                drop_cached(files)
            with contextlib.ExitStack() as patches:
                for target, name, value in LOADS[way]:
                    patches.enter_context(mock.patch.object(target, name, value))
                times[way], plan = load_seconds(path, options)
        timed.append(times)
        if cold:
            drop_cached(files)
    read = statistics.median(t["read"] for t in timed)
    result = dict(files=len(files), bytes=nbytes, read_s=read, read_gb_s=nbytes / read / 1e9, cold=cold, plan=plan,
                  rounds=timed)
    for way in ways:
        result[f"{way}_s"] = statistics.median(t[way] for t in timed)
        result[f"{way}_over_read"] = statistics.median(t["read"] / t[way] for t in timed)
    result["load_gb_s"] = nbytes / result["load_s"] / 1e9
    if profile:
        if cold:
            drop_cached(files)
        result["profile"] = profiled_load(path, options, profile)
    return result


def profiled_load(path: Path, options: dict, top: int) -> str:
    """A load under cProfile: the ``top`` functions by their own time in the loading thread (the readahead thread is
    not profiled: a read() that waits for the disk counts as the read's own time)."""
    profiler = cProfile.Profile()
    profiler.enable()
    seconds, _ = load_seconds(path, options)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return f"a load under cProfile: {seconds:.2f} s\n{out.getvalue()}"


def load_seconds(path: Path, options: dict) -> tuple[float, str]:
    start = time.perf_counter()
    model = offload.load_model(path, progress=False, **options)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    plan = str(model.plan)
    model.close()
    return seconds, plan


def run(args) -> int:
    warnings.simplefilter("ignore", offload.OffloadWarning)
    with tempfile.TemporaryDirectory() as scratch:
        if args.quick:
            args.write, args.shape, args.out, args.group_size = "int4", "tiny", f"{scratch}/tiny-int4", 32
            args.cpu_memory = args.cpu_memory or "1GiB"
        path = write(args) if args.write else Path(args.model)
        options = dict(gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory, dtype=args.dtype)
        if args.quick:  # half the layers stream
            needs = offload.plan_model(path, **options).needs
            options["gpu_memory"] = needs.gpu_budget_streaming(len(needs.blocks) // 2)
        result = measure(path, options, args.warm, args.against_map, args.profile or 0, args.rounds)
    date = datetime.date.today().isoformat()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    print(f"bench_load {date} on {device}, torch {torch.__version__}")
    print(result["plan"])
    source = "disk (pages dropped first)" if result["cold"] else "page cache"
    rounds = f" (medians of {len(result['rounds'])} rounds)" if len(result["rounds"]) > 1 else ""
    print(f"\n{path}: {result['files']} file(s), {result['bytes'] / 1e9:.2f} GB, read from the {source}{rounds}")
    print(f"  read  {result['read_s']:8.2f} s  {result['read_gb_s']:6.2f} GB/s")
    for way, label in (("load", "load" if checkpoint.READ_THREADS == 1 else
                        f"load, {checkpoint.READ_THREADS} reads at a time"),
                       ("one_reader_load", "load, one read at a time (as before)"),
                       ("pageable_load", "load, staged in pageable memory (as before)"),
                       ("map_load", "load, copied from the memory map (as before)")):
        if f"{way}_s" in result:
            print(f"  {label}  {result[f'{way}_s']:8.2f} s  {result['bytes'] / result[f'{way}_s'] / 1e9:6.2f} GB/s: "
                  f"{result[f'{way}_over_read']:.2f} of reading")
    if "profile" in result:
        print(result["profile"])
    if args.json:
        Path(args.json).write_text(json.dumps(dict(result, date=date, device=device, model=str(path)), indent=1))
    print(f"bench_load: loading at {result['load_over_read']:.2f} of the speed of reading the files")
    return 0


def main(argv=None) -> int:
    try:
        return run(parse_args(argv))
    except offload.OffloadError as e:
        print(f"bench_load: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(report_bad_input("bench_load", main))
