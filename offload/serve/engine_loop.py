"""The engine thread: the one thread that steps the row engine, between the HTTP handlers and the model.

Handlers put messages in an inbox (submit a request, cancel one, stop); before
each step the engine thread takes what has arrived, applies it, and steps. A
request joins the running batch at the next step with a free row and leaves it
when it finishes; each new token goes to its request's sink (a callable the
handler gave, called on this thread).

Under tensor parallelism every rank runs this loop on an identical engine. Rank 0
decides what each step applies (its inbox) and broadcasts it; the other ranks
apply the same and step with it (the engine broadcasts sampled tokens itself).
While idle, rank 0 still broadcasts an empty step every ``heartbeat`` seconds, so
that the other ranks' collectives do not time out.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..scheduler.row_engine import RowEngine, Request
from .metrics import Metrics

log = logging.getLogger("offload.serve")

# Called on the engine thread with each new token and the row's finish reason ("eos", "length", or None
# while it goes on); with (None, "error") when the engine failed and the request is dropped.
Sink = Callable[[int | None, str | None], None]


@dataclass
class StepInputs:
    """What rank 0 decided since the last step; every rank applies the same before stepping."""

    submit: list[Request] = field(default_factory=list)
    cancel: list = field(default_factory=list)  # request keys
    stop: bool = False


class EngineLoop:
    """Owns an :class:`RowEngine` of ``rows`` rows over ``model``; ``run`` is the engine thread's body."""

    def __init__(self, model, rows: int, heartbeat: float = 10.0):
        self.model = model
        self.engine = RowEngine(model, rows)
        self.metrics = Metrics(rows=len(self.engine.rows))
        self.heartbeat = heartbeat
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sinks: dict[object, Sink] = {}  # engine thread only
        self.thread: threading.Thread | None = None
        self.ended = False  # the loop has returned: nothing collects the inbox any more

    # ------------------------------------------------------------------ any thread

    def check(self, request: Request, where: str | None = None) -> None:
        """Raise InputError if the engine would refuse ``request`` (``where``: what the message names)."""
        self.engine.check(request, where)

    def submit(self, request: Request, sink: Sink) -> None:
        self.inbox.put(("submit", request, sink))
        if self.ended:  # since the caller checked: no step will collect it
            self._refuse_waiting()

    def cancel(self, key) -> None:
        """Drop the request named ``key``; its row is free at the next step."""
        self.inbox.put(("cancel", key))

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="offload-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop the loop (on every rank) and wait for it."""
        self.inbox.put(("stop",))
        if self.thread is not None:
            self.thread.join()

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    # ------------------------------------------------------------------ the engine thread

    def run(self) -> None:
        """Step until stopped. Rank 0 runs this on a thread of its own; other ranks in their main thread."""
        if self.model.device.type == "cuda":
            torch.cuda.set_device(self.model.device)  # the current device is per thread
        tp = self.model.tp
        try:
            while True:
                inputs = tp.broadcast_object(self._collect() if tp.rank == 0 else None)
                if inputs.stop:
                    break
                self._apply(inputs)
                if self.engine.busy:
                    self._step()
                self._count_rows()
        finally:  # stopped, or failed outside a step (a collective under TP): nothing more will come
            self.ended = True  # before the inbox is emptied: a request queued after it is refused by ``submit``
            for key in list(self.sinks):
                self._drop(key)
            self._refuse_waiting()

    def _refuse_waiting(self) -> None:
        """End the requests still in the inbox with an error: no step will collect them."""
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "submit":
                message[2](None, "error")

    def _collect(self) -> StepInputs:
        """What has arrived in the inbox; waits for something while the engine has nothing to do."""
        inputs = StepInputs()
        wait = not self.engine.busy
        timeout = self.heartbeat if self.model.tp.size > 1 else None
        while True:
            try:
                message = self.inbox.get(timeout=timeout) if wait else self.inbox.get_nowait()
            except queue.Empty:
                return inputs
            wait = False
            if message[0] == "submit":
                _, request, sink = message
                inputs.submit.append(request)
                self.sinks[request.key] = sink
            elif message[0] == "cancel":
                inputs.cancel.append(message[1])
                self.sinks.pop(message[1], None)
            else:
                inputs.stop = True
                return inputs

    def _apply(self, inputs: StepInputs) -> None:
        for request in inputs.submit:
            try:
                self.engine.submit(request)
            except InputError:  # handlers check requests first; this one slipped through
                log.exception("request %r refused", request.key)
                self._drop(request.key)
        for key in inputs.cancel:
            self.engine.cancel(key)

    def _step(self) -> None:
        start = time.perf_counter()
        before = dataclasses.replace(self.engine.stats)
        try:
            events = self.engine.step()
        except Exception:
            # Drop every request and carry on with a fresh engine: a failed step leaves rows half written,
            # and a new engine fills its rows from position 0.
            # The new engine is in place before any request hears of the failure.
            log.exception("engine step failed; dropping %d requests", len(self.sinks))
            self.engine.release()
            self.engine = RowEngine(self.model, len(self.engine.rows))
            for key in list(self.sinks):
                self._drop(key)
            return
        seconds = time.perf_counter() - start
        for row, token in events:
            key = row.request.key
            sink = self.sinks.pop(key, None) if row.finish_reason else self.sinks.get(key)
            if sink is not None:
                sink(token, row.finish_reason)
        self.metrics.observe_step(seconds, len(events))
        self.metrics.observe_passes(before, self.engine.stats)
        if self.model.experts is not None:  # direct reads' counts as of the latest copy (the pass in flight runs on)
            self.metrics.expert_hits, self.metrics.expert_misses = self.model.experts.counts(wait=False)

    def _count_rows(self) -> None:
        self.metrics.rows_busy = sum(row is not None for row in self.engine.rows)
        self.metrics.queued = len(self.engine.waiting)

    def _drop(self, key) -> None:
        sink = self.sinks.pop(key, None)
        if sink is not None:
            sink(None, "error")
