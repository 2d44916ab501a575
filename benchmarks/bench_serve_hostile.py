#!/usr/bin/env python3
"""Serving under attack: well-behaved streaming clients mixed with slow and abusive ones, for a fixed time.

    python benchmarks/bench_serve_hostile.py --quick      # the tiny shape on the CPU, two runs of 15 s
    python benchmarks/bench_serve_hostile.py --shape llama-2-7b --gpu-memory 8GiB --seconds 60 --clients 16

One server (this process's, as bench_serve.py serves: uvicorn on one thread, the row
engine on another), the well-behaved clients in this process too, the others in a
process of their own, and two runs of --seconds each, cut in --rounds parts that take
turns (so that the load of the rest of the machine falls on both alike):

    calm     --clients well-behaved clients, each sending streaming completions one after
             another (a prompt of a fixed set, greedy, --new-tokens tokens), and nothing else
    hostile  the same clients and, all the while,
             slow clients, which must be answered as well: one sends its body over a
               second, one reads its stream a chunk every 50 ms, one half-closes its
               socket after its request and reads the answer
             abusive clients, each repeating one attack: slowloris connections (a header
               byte at a time), a 50 MB body (with its length, and chunked), bytes that
               are not HTTP, malformed requests (bad JSON, a lone surrogate, NaN, a context
               overflow, a form content type), a body just under the size limit (a long
               prompt to tokenize), a whole request and then gone, a stream and then gone

Checks: every well-behaved and slow request completes with its text (in float32 the
text the same prompt gets alone; in 16 bits, where a step's rows can move a near tie,
its token count), every attack gets the answer it should (413, 400, a closed
connection), no row is left busy, and the p99 time to first token (TTFT) of the
well-behaved requests in the hostile run is within 2x the calm run's. It prints the
figures (with the CPU seconds of this process, server and well-behaved clients, and of
the attackers) and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import random
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_serve, which puts the checkout on the path
import bench_serve  # noqa: E402
import h11  # noqa: E402
import psutil  # noqa: E402
import httpx  # noqa: E402
import openai  # noqa: E402
import torch  # noqa: E402

import offload  # noqa: E402
from offload.serve import EngineLoop, ServerThread, Service, create_app  # noqa: E402
from offload.synthetic import train_demo_tokenizer  # noqa: E402
from offload.text import Tokenizer  # noqa: E402

DEFAULTS = dict(clients=8, max_batch=None, prompt_len="16,64", new_tokens=32, seconds=60.0, request_timeout=10.0)
QUICK = dict(shape="tiny", clients=8, max_batch=16, prompt_len="8,32", new_tokens=16, seconds=15.0,
             request_timeout=3.0)
PROMPTS = 16  # distinct prompts the well-behaved clients cycle through
MB = 2**20
TTFT_BOUND = 2.0  # hostile p99 TTFT / calm p99 TTFT (--ttft-bound)
ATTACKS = ("slowloris", "big", "chunked", "garbage", "malformed", "limit", "gone", "vanish")


@dataclass
class Tally:
    """What the clients of one run saw."""

    samples: list = field(default_factory=list)  # well-behaved requests: bench_serve.Sample
    wrong: list = field(default_factory=list)  # requests that did not complete with their text, and why
    slow: Counter = field(default_factory=Counter)  # slow clients' requests answered correctly, by kind
    attacks: Counter = field(default_factory=Counter)  # attacks answered as they should be, by kind
    misanswered: Counter = field(default_factory=Counter)  # attacks answered otherwise, by kind
    cpu: float = 0.0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", help="a named model shape with random weights")
    p.add_argument("--model", help="a checkpoint directory (HF config.json + safetensors)")
    p.add_argument("--gpu-memory", help="budget of the compute GPU")
    p.add_argument("--cpu-memory", help="pinned host memory for streamed layers")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--clients", type=int, help=f"well-behaved clients (default {DEFAULTS['clients']})")
    p.add_argument("--max-batch", type=int, help="KV cache rows (default: enough for every client at once)")
    p.add_argument("--prompt-len", help=f"min,max prompt tokens (default {DEFAULTS['prompt_len']})")
    p.add_argument("--new-tokens", type=int, help=f"tokens per request (default {DEFAULTS['new_tokens']})")
    p.add_argument("--seconds", type=float, help=f"length of each run (default {DEFAULTS['seconds']:g})")
    p.add_argument("--rounds", type=int, default=2,
                   help="each run is cut in this many parts, calm and hostile taking turns (default 2)")
    p.add_argument("--request-timeout", type=float,
                   help=f"the server's deadline to send a request (default {DEFAULTS['request_timeout']:g})")
    p.add_argument("--attacks", default=",".join(ATTACKS),
                   help=f"the attacks of the hostile run, comma separated (default all: {','.join(ATTACKS)})")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--ttft-bound", type=float, default=TTFT_BOUND,
                   help=f"the most the hostile run's p99 TTFT may be, over the calm run's (default {TTFT_BOUND:g}; 0: "
                   "printed, not held: CI's test, whose machine's other work moves a p99 of 15 s runs)")
    p.add_argument("--quick", action="store_true", help="the tiny shape on the CPU, two runs of 15 s (for CI)")
    return p.parse_args(argv)


def settings(args) -> dict:
    """bench_serve's choices of model and budget, and this benchmark's; raises bench_serve.UsageError."""
    defaults = QUICK if args.quick else DEFAULTS
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults.get(name)  # noqa: E731
    clients, seconds = pick("clients"), pick("seconds")
    if clients < 1 or args.rounds < 1 or not seconds > 0 or not pick("request_timeout") > 0:
        raise bench_serve.UsageError("--clients and --rounds must be >= 1, --seconds and --request-timeout > 0")
    args.clients, args.prompt_len, args.new_tokens = clients, pick("prompt_len"), pick("new_tokens")
    args.max_batch = pick("max_batch") or 2 * clients  # room for the slow clients and the attacks that hold a row
    args.sequential = 1
    if not 0 <= args.ttft_bound < float("inf"):
        raise bench_serve.UsageError(f"--ttft-bound must be a ratio >= 0 (0: none), got {args.ttft_bound:g}")
    chosen = tuple(a for a in args.attacks.split(",") if a)
    if set(chosen) - set(ATTACKS):
        raise bench_serve.UsageError(f"--attacks: unknown {sorted(set(chosen) - set(ATTACKS))}; choose of {ATTACKS}")
    s = bench_serve.settings(args)
    return {**s, "seconds": seconds, "request_timeout": pick("request_timeout"), "attacks": chosen,
            "rounds": args.rounds}


# ---------------------------------------------------------------------- raw HTTP


async def exchange(host: str, port: int, pieces: list[bytes], gap: float = 0.0, half_close: bool = False):
    """Send ``pieces`` (``gap`` seconds apart), then read one response: (status, body), or (None, b"") when the
    server closes the connection without answering."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(gap)
        if half_close:
            writer.write_eof()
        return await read_response(reader)
    except ConnectionError:
        return None, b""
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int | None, bytes]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    client.send(h11.EndOfMessage())  # h11 parses a response only to a request it has seen
    status, body = None, b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            if not data and status is None:
                return None, b""
            client.receive_data(data)
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return status, body


def post(path: str, body: bytes, content_type: str = "application/json", length: int | None = None) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n")
    return head.encode() + body


def completion_body(prompt: list[int], new_tokens: int, stream: bool) -> bytes:
    return json.dumps({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": stream}).encode()


def streamed_text(body: bytes) -> str:
    events = [e.removeprefix("data: ") for e in body.decode().split("\n\n") if e]
    if not events or events[-1] != "[DONE]":
        raise ValueError(f"the stream did not end with [DONE]: {events[-2:]}")
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e).get("choices"))


# ---------------------------------------------------------------------- the clients


@dataclass
class Scene:
    """What every client of a run shares."""

    url: str
    host: str
    port: int
    name: str
    prompts: list[list[int]]
    expected: list[str]  # each prompt's text alone (compared in float32 only)
    exact: bool
    new_tokens: int
    until: float  # time.time() at the run's end (both processes read it)
    request_timeout: float
    limit: int  # the server's body limit
    clients: int  # well-behaved
    attacks: tuple[str, ...] = ATTACKS  # of the hostile run
    tally: Tally = field(default_factory=Tally)

    def check(self, kind: str, text: str, tokens: int | None, k: int) -> None:
        if (self.exact and text != self.expected[k]) or (tokens is not None and tokens != self.new_tokens):
            self.tally.wrong.append(f"{kind}: prompt {k}: {tokens} tokens, text {text[:40]!r}")


async def well_behaved(scene: Scene, client, first: int) -> None:
    k = first
    while time.time() < scene.until:
        try:
            sample = await bench_serve.request(client, scene.name, scene.prompts[k], scene.new_tokens)
        except openai.OpenAIError as e:
            scene.tally.wrong.append(f"well-behaved: {type(e).__name__}: {e}")
        else:
            scene.tally.samples.append(sample)
            scene.check("well-behaved", sample.text, sample.tokens, k)
        k = (k + 1) % len(scene.prompts)


async def slow_sender(scene: Scene) -> None:
    """Its request's bytes come over about a second (within the server's deadline)."""
    k = 0
    while time.time() < scene.until:
        request = post("/v1/completions", completion_body(scene.prompts[k], scene.new_tokens, True))
        pieces = [request[i:i + 16] for i in range(0, len(request), 16)]
        status, body = await exchange(scene.host, scene.port, pieces, gap=1.0 / len(pieces))
        answered_correctly(scene, "slow sender", k, status, body)
        k = (k + 1) % len(scene.prompts)


async def slow_reader(scene: Scene, client: httpx.AsyncClient) -> None:
    """Reads its stream a chunk every 50 ms."""
    k = 0
    while time.time() < scene.until:
        body = b""
        async with client.stream("POST", "/v1/completions", content=completion_body(
                scene.prompts[k], scene.new_tokens, True), headers={"content-type": "application/json"}) as response:
            async for chunk in response.aiter_raw():
                body += chunk
                await asyncio.sleep(0.05)
        answered_correctly(scene, "slow reader", k, response.status_code, body)
        k = (k + 1) % len(scene.prompts)


async def half_closer(scene: Scene) -> None:
    """Shuts down its sending side after each whole request, as nc -N does, and reads the answer."""
    k = 0
    while time.time() < scene.until:
        request = post("/v1/completions", completion_body(scene.prompts[k], scene.new_tokens, False))
        status, body = await exchange(scene.host, scene.port, [request], half_close=True)
        try:
            text = json.loads(body)["choices"][0]["text"] if status == 200 else None
        except (ValueError, KeyError):
            text = None
        if text is None:
            scene.tally.wrong.append(f"half-closer: status {status}, {body[:80]!r}")
        else:
            scene.tally.slow["half-closer"] += 1
            scene.check("half-closer", text, None, k)
        k = (k + 1) % len(scene.prompts)


def answered_correctly(scene: Scene, kind: str, k: int, status: int | None, body: bytes) -> None:
    """Whether a slow client's stream came whole, with its text."""
    try:
        text = streamed_text(body) if status == 200 else None
    except (ValueError, KeyError) as e:
        text, body = None, str(e).encode()
    if text is None:
        scene.tally.wrong.append(f"{kind}: status {status}, {body[:80]!r}")
        return
    scene.tally.slow[kind] += 1
    scene.check(kind, text, None, k)


async def attack(scene: Scene, kind: str, make, expect, pause: float = 0.05) -> None:
    """Repeat one attack, ``pause`` seconds apart, until the run ends; ``expect(status, body)`` says whether it
    was answered right."""
    while time.time() < scene.until:
        status, body = await make()
        (scene.tally.attacks if expect(status, body) else scene.tally.misanswered)[kind] += 1
        await asyncio.sleep(pause)


async def slowloris(scene: Scene) -> None:
    """A header byte every 0.5 s: the server must close the connection at its deadline."""
    while time.time() < scene.until:
        reader, writer = await asyncio.open_connection(scene.host, scene.port)
        start = time.time()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        closed = False
        while time.time() < scene.until and not closed:
            try:
                writer.write(b"X")
                await writer.drain()
                closed = await asyncio.wait_for(reader.read(1), 0.5) == b""
            except asyncio.TimeoutError:
                pass
            except ConnectionError:
                closed = True
        writer.close()
        if closed:  # the server cut it, in time
            waited = time.time() - start
            good = waited < scene.request_timeout + 2
            (scene.tally.attacks if good else scene.tally.misanswered)["slowloris"] += 1


def attacks(scene: Scene) -> list:
    """The abusive clients of the hostile run (coroutines), those of ``scene.attacks``."""
    host, port, rng = scene.host, scene.port, random.Random(0)
    big = b"x" * (50 * MB)
    chunked_head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                    b"Content-Type: application/json\r\n\r\n")
    chunked_big = b"".join(b"%x\r\n%s\r\n" % (MB, b"x" * MB) for _ in range(50)) + b"0\r\n\r\n"
    near_limit = json.dumps({"prompt": "hello world " * ((scene.limit - 200) // 12), "max_tokens": 1}).encode()
    malformed = [post("/v1/completions", b"{not json"),
                 post("/v1/completions", b'{"prompt": "hi \\ud800", "max_tokens": 2}'),
                 post("/v1/completions", b'{"prompt": "hi", "temperature": NaN}'),
                 post("/v1/completions", json.dumps({"prompt": scene.prompts[0], "max_tokens": 10**9}).encode()),
                 post("/v1/completions", b'{"prompt": "hi", "max_tokens": 2}', "application/x-www-form-urlencoded"),
                 post("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}')]
    gone = post("/v1/completions", completion_body(scene.prompts[1], scene.new_tokens, False))
    vanishing_stream = post("/v1/completions", completion_body(scene.prompts[2], scene.new_tokens, True))
    # The costly attacks come once a second: hostile clients, not a flood of bytes (a 50 MB body a second is
    # 50 MB/s of junk to read and drop), nor of CPU work (a prompt at the limit takes about a second to tokenize).
    every = {
        "slowloris": lambda: [slowloris(scene) for _ in range(10)],
        "big": lambda: [attack(scene, "50 MB body", lambda: exchange(
            host, port, [post("/v1/completions", b"", length=len(big)), big]), lambda status, body: status == 413,
            pause=1.0)],
        "chunked": lambda: [attack(scene, "50 MB chunked body", lambda: exchange(
            host, port, [chunked_head, chunked_big]), lambda status, body: status == 413, pause=1.0)],
        "garbage": lambda: [attack(scene, "not HTTP", lambda: exchange(
            host, port, [bytes(rng.randrange(256) for _ in range(300)) + b"\r\n\r\n"]),
            lambda status, body: status in (400, None))],
        "malformed": lambda: [attack(scene, "malformed request", lambda: exchange(host, port, [rng.choice(malformed)]),
                                     lambda status, body: status == 400)],
        "limit": lambda: [attack(scene, "body at the limit", lambda: exchange(
            host, port, [post("/v1/completions", near_limit)]),
            lambda status, body: status == 400 and b"context_length_exceeded" in body, pause=1.0)],
        "gone": lambda: [attack(scene, "request, then gone", lambda: _vanish(host, port, gone, wait_for=None),
                                lambda status, body: True)],
        "vanish": lambda: [attack(scene, "stream, then gone", lambda: _vanish(
            host, port, vanishing_stream, wait_for=b"data: "), lambda status, body: status == 200)],
    }
    return [client for name in scene.attacks for client in every[name]()]


async def _vanish(host: str, port: int, request: bytes, wait_for: bytes | None):
    """Send a whole request and close the connection (after the first bytes of ``wait_for``, if given)."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    await writer.drain()
    status = None
    if wait_for is not None:
        seen = b""
        while wait_for not in seen:
            data = await reader.read(4096)
            if not data:
                break
            seen += data
        status = int(seen.split()[1]) if seen.startswith(b"HTTP/1.1 ") else None
    else:
        await asyncio.sleep(0.2)
    writer.close()
    return status, b""


# ---------------------------------------------------------------------- a run


async def well_behaved_clients(scene: Scene) -> Tally:
    async with openai.AsyncOpenAI(base_url=scene.url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        await asyncio.gather(*(well_behaved(scene, client, (5 * k) % len(scene.prompts))
                               for k in range(scene.clients)))
    return scene.tally


async def hostile_clients(scene: Scene) -> Tally:
    async with httpx.AsyncClient(base_url=scene.url, timeout=600) as raw:
        await asyncio.gather(slow_sender(scene), slow_reader(scene, raw), half_closer(scene), *attacks(scene))
    return scene.tally


def hostile_process(scene: Scene, pipe) -> None:
    """The slow and abusive clients, in a process of their own: their work (50 MB bodies sent as fast as the
    socket takes them) must not take the interpreter from the server, which a real attacker's would not."""
    pipe.send("ready")
    scene.until = pipe.recv()
    cpu = psutil.Process().cpu_times()
    tally = asyncio.run(hostile_clients(scene))
    after = psutil.Process().cpu_times()
    tally.cpu = after.user + after.system - cpu.user - cpu.system
    pipe.send(tally)


def run(scene: Scene, seconds: float, hostile: bool) -> tuple[Tally, Tally]:
    """The well-behaved clients here for ``seconds`` (and their tally, with this process's CPU seconds: the
    server's and theirs); with ``hostile``, the others meanwhile in a child process (and theirs)."""
    child, ours = None, None
    if hostile:
        ours, theirs = multiprocessing.get_context("spawn").Pipe()
        child = multiprocessing.get_context("spawn").Process(target=hostile_process, args=(scene, theirs),
                                                             daemon=True)
        child.start()
        assert ours.recv() == "ready"  # started and imported: the run starts now for both
    scene.until = time.time() + seconds
    if ours is not None:
        ours.send(scene.until)
    start = psutil.Process().cpu_times()
    tally = asyncio.run(well_behaved_clients(scene))
    others = ours.recv() if ours is not None else Tally()
    end = psutil.Process().cpu_times()
    tally.cpu = end.user + end.system - start.user - start.system
    if child is not None:
        child.join()
    return tally, others


async def alone(url: str, name: str, prompts: list[list[int]], new_tokens: int) -> list[str]:
    """Each prompt's text served alone (and the server warmed up)."""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        return [(await bench_serve.request(client, name, p, new_tokens)).text for p in prompts]


def rows_left_busy(url: str, seconds: float = 30.0) -> float:
    """The rows still busy once the server has had ``seconds`` to free them (0 when none is left)."""
    deadline = time.monotonic() + seconds
    while True:
        busy = bench_serve_metric(url, "offload_rows_busy") + bench_serve_metric(url, "offload_requests_running")
        if busy == 0 or time.monotonic() > deadline:
            return busy
        time.sleep(0.1)


def bench_serve_metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


# ---------------------------------------------------------------------- report


def merge(tally: Tally, others: Tally, more: Tally, more_others: Tally) -> None:
    for into, new in ((tally, more), (others, more_others)):
        into.samples += new.samples
        into.wrong += new.wrong
        into.slow.update(new.slow)
        into.attacks.update(new.attacks)
        into.misanswered.update(new.misanswered)
        into.cpu += new.cpu


def summarize(name: str, tally: Tally, others: Tally, seconds: float) -> dict:
    """A run's figures: the well-behaved clients' (``tally``), and what the slow and abusive ones saw."""
    ttft = [s.ttft for s in tally.samples]
    return dict(name=name, requests=len(tally.samples), tokens=sum(s.tokens for s in tally.samples),
                seconds=seconds, ttft_p50=bench_serve.percentile(ttft, 50) if ttft else None,
                ttft_p99=bench_serve.percentile(ttft, 99) if ttft else None,
                latency_p99=bench_serve.percentile([s.latency for s in tally.samples], 99) if ttft else None,
                wrong=(tally.wrong + others.wrong)[:10], wrong_count=len(tally.wrong) + len(others.wrong),
                slow=dict(others.slow), attacks=dict(others.attacks), misanswered=dict(others.misanswered),
                cpu_server_and_clients=tally.cpu, cpu_attackers=others.cpu)


def print_report(runs: list[dict]) -> None:
    print(f"{'run':<9}{'requests':>9}{'tokens':>8}{'TTFT p50':>10}{'p99':>8}{'latency p99':>13}{'wrong':>7}"
          f"{'CPU s: server+clients':>23}{'attackers':>11}")
    for r in runs:
        print(f"{r['name']:<9}{r['requests']:>9}{r['tokens']:>8}{r['ttft_p50']:>9.3f}s{r['ttft_p99']:>7.3f}s"
              f"{r['latency_p99']:>12.3f}s{r['wrong_count']:>7}{r['cpu_server_and_clients']:>23.1f}"
              f"{r['cpu_attackers']:>11.1f}")
    hostile = runs[-1]
    print("slow clients answered correctly: " + ", ".join(f"{k} {n}" for k, n in sorted(hostile["slow"].items())))
    print("attacks answered as they should be: " + ", ".join(f"{k} {n}" for k, n in sorted(hostile["attacks"].items())))
    if hostile["misanswered"]:
        print("attacks answered otherwise: " + ", ".join(f"{k} {n}" for k, n in sorted(hostile["misanswered"].items())))
    for r in runs:
        for line in r["wrong"]:
            print(f"  {r['name']}: wrong: {line}")


def verdict(runs: list[dict], rows_busy: float, bound: float = TTFT_BOUND) -> tuple[bool, str]:
    """Whether every request and attack was answered as it should be and the TTFT ``bound`` held (0: none), and
    the summary line."""
    calm, hostile = runs
    ratio = hostile["ttft_p99"] / calm["ttft_p99"]
    failures = [f"{r['name']}: {r['wrong_count']} requests not answered correctly" for r in runs if r["wrong_count"]]
    failures += [f"attacks answered otherwise: {hostile['misanswered']}"] if hostile["misanswered"] else []
    if bound and ratio > bound:
        failures.append(f"hostile p99 TTFT is {ratio:.2f}x the calm run's (bound {bound:g}x)")
    failures += [f"{rows_busy:g} rows or requests still busy after the runs"] if rows_busy else []
    missing = {"slow sender", "slow reader", "half-closer"} - set(hostile["slow"])
    failures += [f"slow clients without an answer: {sorted(missing)}"] if missing else []
    held = f"bound {bound:g}x" if bound else "no bound"
    summary = (f"p99 TTFT {calm['ttft_p99']:.3f} s calm, {hostile['ttft_p99']:.3f} s hostile ({ratio:.2f}x, {held}); "
               f"{calm['requests']} + {hostile['requests']} well-behaved requests, "
               f"{sum(hostile['slow'].values())} slow, {sum(hostile['attacks'].values())} attacks answered")
    return not failures, summary + ("" if not failures else "; FAILED: " + "; ".join(failures))


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore", offload.OffloadWarning)
    try:
        s = settings(args)
        device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.quick else torch.device("cpu")
        if args.quick:
            torch.set_num_threads(1)  # the tiny model gains nothing from threads; one keeps CI's timings steady
        model = bench_serve.load(s, args, device)
    except (bench_serve.UsageError, offload.OffloadError) as e:
        print(f"bench_serve_hostile: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    label = s["model"] or f"{s['shape']} (random weights, seed {bench_serve.SEED})"
    gen = torch.Generator().manual_seed(bench_serve.SEED)
    low, high = s["prompt_len"]
    prompts = [torch.randint(3, model.config.vocab_size, (int(torch.randint(low, high + 1, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(PROMPTS)]
    exact = model.dtype == torch.float32
    print(f"bench_serve_hostile {date}  torch {torch.__version__}  offload {offload.__version__}")
    print(f"hardware: {bench_serve.hardware()}")
    print(f"model: {label}, {str(model.dtype).removeprefix('torch.')}, on {device}; {model.max_batch} rows; "
          f"{s['clients']} well-behaved clients, prompts {low}-{high} tokens, {s['new_tokens']} new tokens each; "
          f"runs of {s['seconds']:g} s; request deadline {s['request_timeout']:g} s; outputs checked "
          + ("exactly (float32)" if exact else "by token count (16 bits)"))
    # A tokenizer, so that text prompts are tokenized (a checkpoint's own, or the demo's for random weights).
    tokenizer = (Tokenizer.from_dir(s["model"]) if s["model"] else None) or Tokenizer(
        train_demo_tokenizer(model.config.vocab_size))
    service = Service(EngineLoop(model, model.max_batch), tokenizer, "bench", max_queue=64)
    # log_level error: uvicorn warns of every request that is not HTTP, and the attacks send hundreds
    with ServerThread(create_app(service), request_timeout=s["request_timeout"], log_level="error") as server:
        host, port = server.url.removeprefix("http://").split(":")
        expected = asyncio.run(alone(server.url, "bench", prompts, s["new_tokens"]))
        tallies = {"calm": (Tally(), Tally()), "hostile": (Tally(), Tally())}
        for _ in range(s["rounds"]):  # alternating, so that the load of the rest of the machine hits both alike
            for name, (tally, others) in tallies.items():
                scene = Scene(server.url, host, int(port), "bench", prompts, expected, exact, s["new_tokens"], 0.0,
                              s["request_timeout"], service.max_request_bytes, s["clients"], s["attacks"])
                merge(tally, others, *run(scene, s["seconds"] / s["rounds"], hostile=name == "hostile"))
        runs = [summarize(name, tally, others, s["seconds"]) for name, (tally, others) in tallies.items()]
        rows_busy = rows_left_busy(server.url)
    print_report(runs)
    ok, summary = verdict(runs, rows_busy, args.ttft_bound)
    summary = f"bench_serve_hostile: {label} on {bench_serve.hardware()}: {summary}"
    if args.json:
        Path(args.json).write_text(json.dumps(dict(date=date, hardware=bench_serve.hardware(),
                                                   torch=torch.__version__, model=label, runs=runs, ok=ok,
                                                   rows_busy=rows_busy, summary=summary), indent=1) + "\n")
    print(summary)
    model.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
