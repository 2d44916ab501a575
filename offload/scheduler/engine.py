"""The row engine: requests in KV cache rows, stepped together until each finishes.

Every way of generating drives this one loop: ``OffloadedModel.generate`` (its
prompts admitted at once), batch jobs (a queue of records, a row refilled as
soon as its sequence ends) and the HTTP server (requests arriving while others
run).

    engine = Engine(model)
    engine.submit(Request(prompt_ids, max_new_tokens=32))
    while engine.busy:
        for row, token in engine.step():   # one forward pass
            ...

One step, top to bottom:

1. admit waiting requests into free KV cache rows, lowest rows first;
2. build one forward pass: a row just admitted adds its whole prompt, a
   generating row adds its last token;
3. run it: every streamed layer crosses its link once, whatever the rows do;
4. sample a token for every row whose prompt is in (the step's one host sync);
5. finish the rows that meet their stop rule (an eos id, or ``max_new_tokens``);
   their cache rows are free for the next admission.

Under tensor parallelism every rank runs the same engine on the same requests;
sampled tokens are broadcast from rank 0, so the ranks stay in step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..inputs import check_token_ids
from ..sampling import GREEDY, Sampling, sample


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
    cached: int = 0  # tokens of this row in the KV cache
    tokens: list[int] = field(default_factory=list)  # generated so far
    finish_reason: str | None = None  # "eos", "length", "cancelled" once finished

    @property
    def in_prompt(self) -> bool:
        return self.cached < len(self.request.prompt)

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
    decode_steps: int = 0  # steps in which every row adds one generated token
    decode_tokens: int = 0  # tokens made by decode steps
    decode_seconds: float = 0.0


class Engine:
    """Runs requests through ``model`` (an ``OffloadedModel``) in at most ``rows`` KV cache rows."""

    def __init__(self, model, rows: int | None = None):
        self.model = model
        self.rows: list[Row | None] = [None] * min(rows or model.max_batch, model.max_batch)
        self.waiting: deque[Request] = deque()
        self.stats = Stats()

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(self.rows)

    def submit(self, request: Request) -> None:
        """Queue ``request``; it is admitted at the next step with a free row. Bad input raises InputError."""
        self.check(request)
        self.waiting.append(request)

    def check(self, request: Request) -> None:
        """Raise InputError where ``submit`` would refuse ``request``; reads only the model's limits, so any
        thread may call it (the HTTP server answers 400 before queuing)."""
        check_token_ids(list(request.prompt), self.model.config.vocab_size, f"request {request.key!r}")
        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {request.max_new_tokens!r}")
        if len(request.prompt) + request.max_new_tokens > self.model.max_seq_len:
            raise InputError(
                f"request {request.key!r}: {len(request.prompt)} prompt tokens + {request.max_new_tokens} new tokens "
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
        """One forward pass; returns each new token with its row (a finished row has its finish_reason)."""
        self._admit()
        if not any(self.rows):
            return []
        start = time.perf_counter()
        rows = self.rows[: max(i + 1 for i, r in enumerate(self.rows) if r is not None)]
        new_tokens = [row.next_tokens() if row else [] for row in rows]
        prompt_tokens = sum(len(t) for row, t in zip(rows, new_tokens) if row and row.in_prompt)
        logits = self.model.step(new_tokens, [row.cached if row else 0 for row in rows])
        for row, tokens in zip(rows, new_tokens):
            if row is not None:
                row.cached += len(tokens)
        ready = [row for row in rows if row is not None and not row.in_prompt]
        events = []
        for row, token in zip(ready, self._sample(logits, ready)):
            row.tokens.append(token)
            if token in row.request.eos_ids:
                row.finish_reason = "eos"
            elif len(row.tokens) == row.request.max_new_tokens:
                row.finish_reason = "length"
            if row.finish_reason is not None:
                self.rows[row.index] = None
            events.append((row, token))
        self._count(start, rows, prompt_tokens, len(ready))
        return events

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

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        if not rows:
            return []
        picked = logits[torch.tensor([row.index for row in rows], device=logits.device)]
        ids = sample(picked, [row.request.sampling for row in rows], [row.generator for row in rows])
        if not all(row.request.sampling.greedy for row in rows):
            self.model.tp.broadcast_from_first(ids)  # every rank continues with rank 0's draws
        return ids.tolist()

    def _count(self, start: float, rows: list, prompt_tokens: int, sampled: int) -> None:
        seconds = time.perf_counter() - start
        s = self.stats
        s.steps += 1
        s.busy_row_steps += sum(row is not None for row in rows)
        if prompt_tokens:
            s.prompt_tokens += prompt_tokens
            s.prefill_seconds += seconds
        else:
            s.decode_steps += 1
            s.decode_tokens += sampled
            s.decode_seconds += seconds
