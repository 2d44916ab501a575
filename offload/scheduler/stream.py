"""When bytes move: per link, a copy stream and a ring of slots, with events between them.

Each link (the host, each peer GPU) streams its blocks ``blocks[0..m)`` in a
fixed cyclic order, block after block and pass after pass. The ring's j-th block
always lands in slot ``j % k``, so a streamed block is read from the same address
every pass (which a captured CUDA graph needs). A load is issued as soon as the
previous user of its slot has been *enqueued* for compute (not finished): the
link's copy stream waits, on the GPU, for the event "slot free", copies, and
records "slot ready", on which the compute stream waits before the layer runs.
The host never waits, the copies of the next pass start while this one finishes
(prefetch crosses pass boundaries), and the links copy at the same time, each
into its own slots.

The decoder takes its layers' weights in *segments* (:func:`segments`): a
streamed layer alone, a run of resident layers together, so that between two
segments the host can make the compute stream wait for a slot and free one.

A pass over streamed layers can also be captured whole in one CUDA graph, its copies
inside it (``graphs.WHOLE_PASS``): while its work is captured (:meth:`WeightStream.one_pass`)
each ring issues only the pass's own loads, on events of its own, and skips the wait for
the loads issued before the pass (the graph's replay is preceded by :meth:`wait_issued`).
After a replay, :meth:`passed` moves the counters on as the pass would have, marks every
slot free behind the graph and issues the next pass's first loads: the host queues a
pass in a handful of calls, where a ring's acquire and release per layer took it 60-100 us.

On a CPU there are no streams: a copy happens when it is issued, into a slot
whose previous user has already finished, so the same order and the same slots
are exercised with plain synchronous copies.
"""

from __future__ import annotations

import contextlib

import torch

from ..memory.planner import RESIDENT
from ..models.blocks import BlockSpec


class CopyStream:
    """Copies from one source of bytes (the host, or one peer GPU) into the compute device, on a side stream."""

    def __init__(self, compute_device, source_device):
        compute, source = torch.device(compute_device), torch.device(source_device)
        self.stream = torch.cuda.Stream(compute) if compute.type == "cuda" else None
        # A copy between two GPUs runs on the source GPU's current stream (and is fenced
        # against the destination's), so a peer link needs a stream on each side.
        cross_gpu = source.type == "cuda" and source != compute
        self.source_stream = torch.cuda.Stream(source) if cross_gpu and self.stream else None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after, done) -> None:
        """``dst <- src`` once the event ``after`` has happened; record ``done`` when the bytes have landed."""
        if self.stream is None:
            dst.copy_(src)
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(after)
            if self.source_stream is None:
                dst.copy_(src, non_blocking=True)
            else:
                with torch.cuda.stream(self.source_stream):
                    dst.copy_(src, non_blocking=True)
            done.record(self.stream)


class Ring:
    """The blocks one link streams, each always into the same one of that link's slots.

    Load ``t`` brings block ``blocks[t % m]`` into slot ``(t % m) % k``, and is issued once
    the slot's previous load has been released (its layer's compute enqueued). Each link
    has its own ring, so a slow host copy never holds a slot that a fast peer copy needs.
    """

    def __init__(self, blocks: list[int], specs: list[BlockSpec], buffers, slots: torch.Tensor, copies: CopyStream):
        self.blocks, self.buffers, self.slots, self.copies = blocks, buffers, slots, copies
        # The bytes of the slot that block i always lands in, and its tensors there.
        self.parts = {i: slots[j % len(slots)][: buffers[i].numel()] for j, i in enumerate(blocks)}
        self.weights = {i: specs[i].layout.views(self.parts[i]) for i in blocks}
        on_gpu = slots.device.type == "cuda"
        self.ready = [torch.cuda.Event() if on_gpu else None for _ in slots]
        self.free = [torch.cuda.Event() if on_gpu else None for _ in slots]
        # a whole pass's capture records its own (the graph's edges), so the eager ones keep their meaning
        self.captured_events = ([torch.cuda.Event() if on_gpu else None for _ in slots],
                                [torch.cuda.Event() if on_gpu else None for _ in slots])
        self.device = slots.device
        self.reset_counters()

    def reset_counters(self) -> None:
        self.issued = self.used = 0  # loads issued, loads whose layer has been computed (enqueued)
        self.last_load = [-1] * len(self.slots)  # per slot: the latest load issued into it
        self.capture = None  # while a whole pass is captured: (its first load not issued before it, its end)

    def slot_of(self, load: int) -> int:
        return (load % len(self.blocks)) % len(self.slots)

    def acquire(self, block: int):
        self._issue_ready()
        expected = self.blocks[self.used % len(self.blocks)]
        assert block == expected, f"layer {block} asked for while layer {expected} is next in the ring"
        slot = self.slot_of(self.used)
        issued_before = self.capture is not None and self.used < self.capture[0]  # waited for before the graph
        if self.ready[slot] is not None and not issued_before:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        return self.weights[block]

    def release(self) -> None:
        slot = self.slot_of(self.used)
        if self.free[slot] is not None:
            self.free[slot].record(torch.cuda.current_stream(self.device))
        self.used += 1
        self._issue_ready()

    def _issue_ready(self) -> None:
        """Issue, in ring order, every load whose slot's previous load has been released (while a whole pass is
        captured, only the pass's own)."""
        while self.last_load[self.slot_of(self.issued)] < self.used and (self.capture is None
                                                                         or self.issued < self.capture[1]):
            t, slot = self.issued, self.slot_of(self.issued)
            block = self.blocks[t % len(self.blocks)]
            self.copies.copy(self.parts[block], self.buffers[block], after=self.free[slot], done=self.ready[slot])
            self.last_load[slot] = t
            self.issued += 1

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.reset_counters()

    def wait_issued(self) -> None:
        """At a pass's start: its first loads issued, and the current stream waits for them."""
        self._issue_ready()
        if self.device.type == "cuda":
            for t in range(self.used, self.issued):
                torch.cuda.current_stream(self.device).wait_event(self.ready[self.slot_of(t)])

    @contextlib.contextmanager
    def one_pass(self):
        """While a whole pass is captured: its own loads only, on the capture's events; the counters and events
        as they were afterwards. (A capture that failed half way joins its copies first: a stream forked into a
        capture and left there would fail the capture's end, hiding the error.)"""
        kept = self.issued, self.used, list(self.last_load), self.ready, self.free
        self.capture = (self.issued, self.used + len(self.blocks))
        self.ready, self.free = self.captured_events
        try:
            yield
        except BaseException:
            if self.device.type == "cuda":
                for t in range(self.capture[0], self.issued):
                    torch.cuda.current_stream(self.device).wait_event(self.ready[self.slot_of(t)])
            raise
        finally:
            self.issued, self.used, self.last_load, self.ready, self.free = kept
            self.capture = None

    def at_pass_start(self) -> bool:
        """Whether the ring is where every pass starts (what a whole pass's graph was captured from): at its
        first block, the loads of its first ``min(k, m)`` blocks issued."""
        return self.used % len(self.blocks) == 0 and self.issued - self.used == len(self.slots)

    def passed(self) -> None:
        """After a whole pass's graph: the loads it made counted (each slot's last one is a load of this pass, so
        none is below ``used`` again), every slot free once the graph has run, the next pass's first loads
        issued."""
        end = self.used + len(self.blocks)
        for t in range(end - len(self.slots), end):
            self.last_load[self.slot_of(t)] = t
        self.issued = self.used = end
        if self.device.type == "cuda":
            for event in self.free:
                event.record(torch.cuda.current_stream(self.device))
        self._issue_ready()


class WeightStream:
    """Gives the decoder each segment's weights in order: resident views, or slots of their links' rings.

    Block ``i`` is layer ``i``'s (the blocks every pass uses, one per layer, in order).
    """

    def __init__(self, specs: list[BlockSpec], buffers: list[torch.Tensor], placement: list[str],
                 slots: dict[str, torch.Tensor], copies: dict[str, CopyStream]):
        self.resident = {i: specs[i].layout.views(b) for i, (b, t) in enumerate(zip(buffers, placement))
                         if t == RESIDENT}
        self.rings = [Ring([i for i, t in enumerate(placement) if t == tier], specs, buffers, slots[tier], stream)
                      for tier, stream in copies.items()]
        self.ring_of = {block: ring for ring in self.rings for block in ring.blocks}
        self.segments = segments(placement)

    def acquire(self, segment: list[int]) -> list:
        """The weights of the segment's layers (on a GPU, the compute stream waits for a streamed one's copy)."""
        return [self.resident[i] if i in self.resident else self.ring_of[i].acquire(i) for i in segment]

    def release(self, segment: list[int]) -> None:
        """The segment has been computed (enqueued): its slots may be refilled, the next copies are issued."""
        for i in segment:
            if i in self.ring_of:
                self.ring_of[i].release()

    def fixed_weights(self, segment: list[int]) -> list:
        """Where the segment's weights are whenever it runs: resident views, or those of the one slot a
        streamed block always lands in (no waiting, no copies: for capturing a graph)."""
        return [self.resident[i] if i in self.resident else self.ring_of[i].weights[i] for i in segment]

    def reset(self) -> None:
        """Forget the loads in flight (after a pass was abandoned half way); the next pass starts afresh."""
        for ring in self.rings:
            ring.reset()

    @property
    def captures_copies(self) -> bool:
        """Whether a whole pass, copies and all, can be captured in one graph: every link's copies come from
        host memory (a peer's run on a stream of the other GPU)."""
        return all(ring.copies.source_stream is None for ring in self.rings)

    def wait_issued(self) -> None:
        """At a pass's start (before a whole pass's graph, or its capture): the current stream waits for the
        loads already issued."""
        for ring in self.rings:
            ring.wait_issued()

    @contextlib.contextmanager
    def one_pass(self):
        """Around the work of a whole pass captured in one graph (:class:`Ring`'s ``one_pass``)."""
        with contextlib.ExitStack() as stack:
            for ring in self.rings:
                stack.enter_context(ring.one_pass())
            yield

    def check_pass_start(self) -> None:
        """Before a whole pass's graph: every ring where its capture found it (a pass abandoned half way and not
        reset would have the graph read the wrong blocks)."""
        for ring in self.rings:
            assert ring.at_pass_start(), f"a ring at load {ring.used} ({ring.issued} issued) where a pass starts"

    def passed(self) -> None:
        """After a replay of a whole pass's graph (:meth:`Ring.passed`)."""
        for ring in self.rings:
            ring.passed()


def segments(placement: list[str]) -> list[list[int]]:
    """Layers cut where the host must act between them: each streamed layer alone, each run of resident
    layers together."""
    out, run = [], []
    for i, tier in enumerate(placement):
        if tier == RESIDENT:
            run.append(i)
            continue
        if run:
            out.append(run)
            run = []
        out.append([i])
    return out + ([run] if run else [])
