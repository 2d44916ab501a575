"""The row engine: requests in KV cache rows, stepped together until each finishes.

Every way of generating drives this one loop: ``OffloadedModel.generate`` (its
prompts admitted at once), batch jobs (a queue of records, a row refilled as
soon as its sequence ends) and the HTTP server (requests arriving while others
run).

    engine = RowEngine(model)
    engine.submit(Request(prompt_ids, max_new_tokens=32))
    while engine.busy:
        for row, token in engine.step():   # tokens as soon as the host can read them
            ...

One step, top to bottom:

1. admit waiting requests into free KV cache rows, lowest rows first;
2. launch one forward pass: a row just admitted adds its whole prompt, a
   generating row adds its last token; every streamed layer crosses its link
   once, whatever the rows do;
3. sample a token for every row whose prompt is in, on the device;
4. read the tokens of the pass before (the step's one wait for the GPU), and
   finish the rows that meet their stop rule (an eos id, or ``max_new_tokens``);
   their cache rows are free for the next admission.

Passes are *pipelined*: while no prompt joins, a decode pass takes its input
tokens from the previous pass's sampled ids on the device, so it is queued
before the host has read them, and the host's work for a step (reading tokens,
stop rules, building the next pass) overlaps the GPU's. A row that stops at an
eos id has then already been given one more pass, whose token is dropped; a row
that reaches ``max_new_tokens`` is known in advance and gets none (where a request
waits for a row, the pass with that last token is read at once, so the request
joins the next pass). A pass that adds prompt tokens needs every row's last token
on the host, so the pass before it is read first.

With a draft (speculative decoding, ``speculation.py``), a pass that adds no prompt
is a verify pass instead: each row adds its last token and the tokens its draft
proposes, and gains as many of them as the target accepts, plus one. Such a pass
is launched and read within one step (the next pass's drafts need its tokens).

Under tensor parallelism every rank runs the same engine on the same requests;
sampled tokens are broadcast from rank 0, so the ranks stay in step.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..inputs import check_token_ids
from ..sampling import GREEDY, Sampling, sample
from .speculation import Speculator


@dataclass(frozen=True)
class Request:
    """What a caller asks for: a prompt, how many tokens at most, how to choose them, when to stop."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling = GREEDY
    eos_ids: tuple[int, ...] = ()
    key: object = None  # the caller's name for the request (a record id, an HTTP request id)


@dataclass(eq=False)
class Row:
    """A request admitted into KV cache row ``index``."""

    request: Request
    index: int
    generator: torch.Generator | None
    cached: int = 0  # tokens of this row in the KV cache, counting passes launched but not yet read
    tokens: list[int] = field(default_factory=list)  # generated tokens the host has read
    sampled: int = 0  # tokens sampled for this row, read or not
    finish_reason: str | None = None  # "eos", "length", "cancelled" once finished

    @property
    def in_prompt(self) -> bool:
        return self.cached < len(self.request.prompt)

    @property
    def wants_pass(self) -> bool:
        """Whether another pass may still give this row a token (an eos id not yet read may stop it)."""
        return self.sampled < self.request.max_new_tokens

    def next_tokens(self) -> list[int]:
        """What this row adds to the next forward pass: the rest of its prompt, or its last token."""
        if self.in_prompt:
            return list(self.request.prompt[self.cached :])
        return [self.tokens[-1]]


@dataclass
class Stats:
    """What the engine has done so far."""

    steps: int = 0
    busy_row_steps: int = 0  # rows holding a request, summed over steps
    prompt_tokens: int = 0  # prompt tokens read
    prefill_seconds: float = 0.0  # steps that read prompt tokens
    decode_steps: int = 0  # passes over the target that add no prompt (one token a row, or its drafts)
    decode_tokens: int = 0  # tokens made by decode steps
    decode_seconds: float = 0.0
    decode_row_passes: int = 0  # rows given a decode step, summed over decode steps
    drafted_tokens: int = 0  # speculative decoding: tokens drafted
    accepted_tokens: int = 0  # drafted tokens the target accepted

    @property
    def tokens_per_pass(self) -> float:
        """Tokens a row gains from one decode pass over the target (1 without a draft)."""
        return self.decode_tokens / self.decode_row_passes if self.decode_row_passes else 0.0


class _SampledIds:
    """The ids a pass sampled, on their way to the host (copied without blocking it)."""

    def __init__(self, ids: torch.Tensor):
        self.on_device = ids
        if ids.is_cuda:
            self.host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self.host.copy_(ids, non_blocking=True)
            self.copied = _timing_event(ids.device)  # the pass's end, on the device's clock
        else:
            self.host, self.copied = ids, None

    def read(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()


@dataclass
class _Pass:
    """A forward pass launched on the device whose sampled tokens the host has not read yet."""

    rows: list[Row | None]  # by cache row: the rows this pass gave a token
    ids: _SampledIds
    prompt_tokens: int
    seconds: float  # host time spent launching it; on a CPU, reading its tokens adds the wait
    since: torch.cuda.Event | None  # on a GPU, its time counts from this event to ``ids.copied``


def _timing_event(device: torch.device) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


class RowEngine:
    """Runs requests through ``model`` (an ``OffloadedModel``) in at most ``rows`` KV cache rows."""

    def __init__(self, model, rows: int | None = None):
        if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
            raise InputError(f"rows must be a positive integer, got {rows!r}")
        self.model = model
        self.rows: list[Row | None] = [None] * min(rows or model.max_batch, model.max_batch)
        self.waiting: deque[Request] = deque()
        self.stats = Stats()
        self._in_flight: _Pass | None = None
        self.speculator = Speculator(model) if model.draft is not None else None

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or self.holds_rows

    @property
    def holds_rows(self) -> bool:
        """Whether rows of the model's KV cache hold this engine's running requests."""
        return any(self.rows) or self._in_flight is not None

    def release(self) -> None:
        """Give up the rows (their requests dropped): another engine may use the model's KV cache."""
        self.rows = [None] * len(self.rows)
        self._in_flight = None

    def submit(self, request: Request) -> None:
        """Queue ``request``; it is admitted at the next step with a free row. Bad input raises InputError."""
        self.check(request)
        self.waiting.append(request)

    def check(self, request: Request, where: str | None = None) -> None:
        """Raise InputError where ``submit`` would refuse ``request`` (``where``: what the messages name, by
        default the request's key); reads only the model's limits, so any thread may call it (the HTTP server
        answers 400 before queuing)."""
        where = where or f"request {request.key!r}"
        check_token_ids(request.prompt, self.model.config.vocab_size, where)
        limit = request.max_new_tokens
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {limit!r}")
        if not isinstance(request.sampling, Sampling):
            raise InputError(f"{where}: sampling must be a Sampling, got {request.sampling!r}")
        eos = request.eos_ids
        if not (isinstance(eos, (tuple, list)) and all(isinstance(i, int) and not isinstance(i, bool) for i in eos)):
            raise InputError(f"{where}: eos_ids must be a tuple of token ids, got {eos!r}")
        if len(request.prompt) + request.max_new_tokens > self.model.max_seq_len:
            raise InputError(
                f"{where}: {len(request.prompt)} prompt tokens + {request.max_new_tokens} new tokens "
                f"exceed the context of {self.model.max_seq_len} tokens (max_seq_len)"
            )

    def cancel(self, key) -> None:
        """Drop the request named ``key``: from the queue, or free its row (finish reason "cancelled")."""
        self.waiting = deque(r for r in self.waiting if r.key != key)
        for row in self.rows:
            if row is not None and row.request.key == key:
                row.finish_reason = "cancelled"
                self.rows[row.index] = None

    def step(self) -> list[tuple[Row, int]]:
        """Launch one forward pass, read the pass before it; returns each token read with its row (a
        finished row has its finish_reason). The first step of a run returns no tokens yet.

        A row that gains several tokens in one step (a verify pass) comes once per token, in order; every
        event but a finished row's last carries a copy of the row as it was then (no finish_reason yet),
        so that a reader acting on ``row.finish_reason`` acts once, on the row's last token."""
        if self.busy:
            self.model.claim_cache(self)  # (refused while another engine's rows are in the cache)
        self._admit()
        events = []
        prompt_joins = any(row is not None and row.in_prompt for row in self.rows)
        if self._in_flight is not None and (prompt_joins or self.speculator is not None or self._refills_a_row()):
            events += self._read(self._take_in_flight())  # the next pass needs every row's last token on the host
            self._admit()
            prompt_joins = any(row is not None and row.in_prompt for row in self.rows)
        previous = self._take_in_flight()
        if any(row is not None and row.wants_pass for row in self.rows):
            if self.speculator is not None and not prompt_joins:
                events += self._verify()
            else:
                self._in_flight = self._launch(previous)
        if previous is not None:
            events += self._read(previous)
        return _settled(events)

    def run(self, requests: list[Request]) -> list[Row]:
        """Submit ``requests``, step until every one has finished; their rows, in request order."""
        for request in requests:
            self.submit(request)
        finished = {}
        while self.busy:
            finished.update({id(row.request): row for row, _ in self.step() if row.finish_reason})
        return [finished[id(r)] for r in requests]

    def _admit(self) -> None:
        for i, row in enumerate(self.rows):
            if row is None and self.waiting:
                request = self.waiting.popleft()
                self.rows[i] = Row(request, i, request.sampling.generator(self.model.device))

    def _refills_a_row(self) -> bool:
        """Whether a request waits while a row only waits for its last token (``max_new_tokens``), in flight: read
        now, that pass frees the row, and the request's prompt joins this step's pass rather than the next (which
        would otherwise run with the row idle)."""
        return bool(self.waiting) and any(row is not None and not row.wants_pass for row in self.rows)

    def _take_in_flight(self) -> _Pass | None:
        taken, self._in_flight = self._in_flight, None
        return taken

    @torch.inference_mode()
    def _launch(self, previous: _Pass | None) -> _Pass:
        """Queue a pass over the rows that want one. After ``previous`` (whose tokens the host has not read)
        every such row adds the token ``previous`` sampled for it, still on the device."""
        start = time.perf_counter()
        since = self._pass_start(previous)
        rows = self._pass_rows()
        prompt_tokens = sum(len(row.request.prompt) - row.cached for row in rows if row and row.in_prompt)
        if previous is not None:
            logits = self.model.decode(previous.ids.on_device, [row.cached if row else None for row in rows])
            added = [1 if row else 0 for row in rows]
        else:
            new_tokens = [row.next_tokens() if row else [] for row in rows]
            logits = self.model.extend(new_tokens, [row.cached if row else 0 for row in rows])
            added = [len(t) for t in new_tokens]
        for row, n in zip(rows, added):
            if row is not None:
                row.cached += n
                row.sampled += 1  # a row's whole prompt goes in one pass: every row of the pass samples
        ids = _SampledIds(self._sample(logits, rows))
        return _Pass(rows, ids, prompt_tokens, time.perf_counter() - start, since)

    def _pass_rows(self) -> list[Row | None]:
        """The rows of the next pass, by cache row up to the last that wants one (None: takes no part)."""
        width = max(i + 1 for i, row in enumerate(self.rows) if row is not None and row.wants_pass)
        return [row if row is not None and row.wants_pass else None for row in self.rows[:width]]

    def _verify(self) -> list[tuple[Row, int]]:
        """A verify pass (speculative decoding), launched and read: each row gains one or more tokens."""
        start = time.perf_counter()
        rows = self._pass_rows()
        outcome = self.speculator.run(rows)
        events, accepted = [], 0
        for row, tokens in zip(rows, outcome.tokens):
            if row is None:
                continue
            row.cached += len(tokens)  # its last token and the accepted drafts are in its cache now
            row.sampled += len(tokens)
            given = 0
            for token in tokens:
                events.append((row, token))
                given += 1
                if self._give(row, token):
                    break  # an eos or max_new_tokens inside the accepted run: the rest is dropped
            accepted += min(given, len(tokens) - 1)  # accepted drafts the row kept (none past its eos)
        s = self.stats
        s.steps += 1
        s.busy_row_steps += sum(row is not None for row in rows)
        s.decode_steps += 1
        s.decode_row_passes += sum(row is not None for row in rows)
        s.decode_tokens += len(events)
        s.decode_seconds += time.perf_counter() - start  # the tokens were read: the pass is over
        s.drafted_tokens += outcome.drafted
        s.accepted_tokens += accepted
        return events

    def _pass_start(self, previous: _Pass | None) -> torch.cuda.Event | None:
        """Where a pass's time starts on the device: where ``previous``, still running, ends (so passes
        queued back to back share out the device's time), or now. Host clocks cannot tell: a launch
        may wait for the pass before it (to look up embeddings kept in host memory, the host reads
        the ids that pass sampled), and that wait would be charged to the wrong pass."""
        if self.model.device.type != "cuda":
            return None
        return previous.ids.copied if previous is not None else _timing_event(self.model.device)

    def _read(self, done: _Pass) -> list[tuple[Row, int]]:
        """Wait for ``done``'s tokens; apply them to the rows still running."""
        start = time.perf_counter()
        events = []
        for row, token in zip(done.rows, done.ids.read()):
            if row is None or self.rows[row.index] is not row:
                continue  # idle, or finished (an eos read after this pass was launched) or cancelled since
            self._give(row, token)
            events.append((row, token))
        if done.since is None:
            seconds = done.seconds + time.perf_counter() - start
        else:
            seconds = done.since.elapsed_time(done.ids.copied) / 1e3
        self._count(done, seconds, len(events))
        return events

    def _give(self, row: Row, token: int) -> bool:
        """Append ``token`` to ``row``; if that meets its stop rule, finish it and free its cache row (True)."""
        row.tokens.append(token)
        if token in row.request.eos_ids:
            row.finish_reason = "eos"
        elif len(row.tokens) == row.request.max_new_tokens:
            row.finish_reason = "length"
        if row.finish_reason is None:
            return False
        self.rows[row.index] = None
        return True

    def _sample(self, logits: torch.Tensor, rows: list[Row | None]) -> torch.Tensor:
        samplings = [row.request.sampling if row else GREEDY for row in rows]
        ids = sample(logits, samplings, [row.generator if row else None for row in rows])
        if not all(s.greedy for s in samplings):
            self.model.tp.broadcast_from_first(ids)  # every rank continues with rank 0's draws
        return ids

    def _count(self, done: _Pass, seconds: float, tokens: int) -> None:
        s = self.stats
        s.steps += 1
        s.busy_row_steps += sum(row is not None for row in done.rows)
        if done.prompt_tokens:
            s.prompt_tokens += done.prompt_tokens
            s.prefill_seconds += seconds
        else:
            s.decode_steps += 1
            s.decode_tokens += tokens
            s.decode_seconds += seconds
            s.decode_row_passes += tokens  # a row gains one token a pass; one that finished while it ran, none


def _settled(events: list[tuple[Row, int]]) -> list[tuple[Row, int]]:
    """``events`` with a finished row's earlier tokens of the step carrying a copy of the row as it was then
    (unfinished), so that ``finish_reason`` comes with its last token only."""
    last = {id(row): i for i, (row, _) in enumerate(events)}
    return [(row if last[id(row)] == i or row.finish_reason is None else dataclasses.replace(row, finish_reason=None),
             token) for i, (row, token) in enumerate(events)]
