"""``serve``: an offloaded model behind an OpenAI-compatible HTTP API.

    python scripts/serve.py --model M --gpu-memory 8GiB --cpu-memory 64GiB --max-batch 8 --port 8000
    torchrun --nproc-per-node 2 scripts/serve.py --model M --tp 2 --gpu-memory 8GiB   # rank 0 serves HTTP

The model is loaded with the same flags as ``run_offloaded.py``. Any bad input
prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import math
import signal
import socket
import sys
from pathlib import Path

from ..api import load_model
from ..chat import stop_token_ids
from ..cli import (STEP_TOKENS_HELP, Parser, add_load_flags, add_model_flag, add_quiet_flag, demo_budget, join_ranks,
                   load_options, run_main)
from ..errors import InputError
from ..loading import DEFAULT_MAX_SEQ_LEN
from ..memory.budget import format_size, parse_size
from ..memory.planner import format_plans
from ..models.config import load_config
from ..synthetic import DEMO_SHAPE, demo_checkpoint
from ..text import Tokenizer
from .app import DEFAULT_MAX_REQUEST_BYTES, Service, create_app
from .engine_loop import EngineLoop
from .server import REQUEST_TIMEOUT, serve

DEFAULT_ROWS = 8


def build_parser() -> Parser:
    p = Parser(prog="serve", description="Serve a model larger than the GPU over an OpenAI-compatible HTTP API.")
    add_model_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a row; beyond them the server answers 429 (default 64)")
    p.add_argument("--max-request-bytes", default=str(DEFAULT_MAX_REQUEST_BYTES),
                   help="largest request body taken, e.g. 8MiB; a larger one is answered 413 before it is read "
                        f"(default {format_size(DEFAULT_MAX_REQUEST_BYTES)})")
    p.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT,
                   help="seconds a client has to send a whole request, from its connection or its previous answer; "
                        f"a slower one is disconnected (default {REQUEST_TIMEOUT:g})")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the checkpoint folder's or GGUF file's name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="what the server logs: each request at info (default info)")
    p.add_argument("--api-docs", action="store_true",
                   help="also serve the API's OpenAPI schema at /openapi.json and pages about it at /docs")
    add_load_flags(p, max_batch_help=f"rows of the running batch: requests generated at once (default {DEFAULT_ROWS})",
                   max_seq_len_help=f"KV cache length per row: prompt + answer (default: the model's context, at "
                                    f"most {DEFAULT_MAX_SEQ_LEN})",
                   max_step_tokens_help=STEP_TOKENS_HELP)
    add_quiet_flag(p)
    return p


def main(argv=None) -> int:
    return run_main("serve", build_parser(), _main, argv)


def _main(args) -> int:
    tp = join_ranks(args)
    say = print if tp.rank == 0 else (lambda *a, **k: None)
    if not 0 <= args.port < 2**16:
        raise InputError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue < 0:
        raise InputError(f"--max-queue must be >= 0, got {args.max_queue}")
    max_request_bytes = parse_size(args.max_request_bytes, "--max-request-bytes")
    if max_request_bytes < 1024:  # a chat request's JSON alone takes a hundred bytes
        raise InputError(f"--max-request-bytes must be at least 1KiB, got {args.max_request_bytes}")
    if not 0 < args.request_timeout < math.inf:  # NaN too; none would let a client hold a connection for ever
        raise InputError(f"--request-timeout must be a positive number of seconds, got {args.request_timeout}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise InputError("--served-model-name must not be empty")
    if tp.rank == 0:
        _check_port(args.host, args.port)  # before minutes of loading
    demo = args.model is None
    model_path = demo_checkpoint(quiet=args.quiet or tp.rank != 0) if demo else Path(args.model)
    config = load_config(model_path)
    tokenizer = Tokenizer.from_checkpoint(model_path)
    if tokenizer is not None and tokenizer.chat_template is not None:
        tokenizer.chat_template.check()  # a broken template is reported now, not at the first chat
    eos = stop_token_ids(model_path, config.eos_token_ids)
    options = load_options(args, max_batch=DEFAULT_ROWS)
    seq = options.max_seq_len or min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    options = options.replace(max_seq_len=seq)
    if demo and args.gpu_memory is None:
        options = demo_budget(model_path, options, say)
    model = load_model(model_path, options, progress=not args.quiet)
    say(format_plans(model.plans))
    loop = EngineLoop(model, rows=options.max_batch)
    if tp.rank != 0:
        return _follow(loop, tp.rank)
    name = args.served_model_name or (f"demo-{DEMO_SHAPE}" if demo else model_path.resolve().name)
    service = Service(loop, tokenizer, name, eos, args.max_queue, aliases=() if demo else (args.model,),
                      max_request_bytes=max_request_bytes)
    say(f"serving {name!r} at http://{args.host}:{args.port}/v1: {options.max_batch} rows of {seq} tokens, "
        f"{args.max_queue} more requests may wait")
    serve(create_app(service, api_docs=args.api_docs), args.host, args.port, args.log_level, args.request_timeout)
    model.close()
    return 0


def _follow(loop: EngineLoop, rank: int) -> int:
    """A rank other than 0: step with rank 0 until it stops. Signals are rank 0's to act on (torchrun sends them
    to every rank), so that all ranks stop together, after rank 0's last broadcast."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        loop.run()
    except RuntimeError as e:  # rank 0 is gone: its collectives fail
        print(f"serve: rank {rank}: stopped following rank 0 ({str(e).splitlines()[0]})", file=sys.stderr)
        return 1
    loop.model.close()
    return 0


def _check_port(host: str, port: int) -> None:
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
