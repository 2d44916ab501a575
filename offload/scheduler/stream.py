"""When bytes move: a ring of slots, one copy stream per link, and events between them.

The streamed layers are loaded in a fixed cyclic order, layer after layer and
step after step: load ``t`` brings layer ``streamed[t % m]`` into slot ``t % k``.
With ``k`` slots, load ``t + k`` is issued as soon as the compute of load ``t``
has been *enqueued* (not finished): its copy stream waits, on the GPU, for the
event "slot free", copies, and records "slot ready", on which the compute stream
waits before the layer runs. The host never waits, the copies of the next step
start while this one finishes (prefetch crosses step boundaries), and the host
link and each peer link copy at the same time on their own streams.

On a CPU there are no streams: a copy happens when it is issued, into a slot
whose previous user has already finished, so the same order and the same slots
are exercised with plain synchronous copies.
"""

from __future__ import annotations

import torch

from ..memory.planner import RESIDENT
from ..models.layout import BlockLayout, LayerWeights


class Link:
    """The copy engine of one source of bytes: the host, or one peer GPU."""

    def __init__(self, name: str, compute_device, source_device):
        compute, source = torch.device(compute_device), torch.device(source_device)
        self.name = name
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


class LayerStream:
    """Gives the decoder each layer's weights in order: resident views, or a slot being filled."""

    def __init__(self, layout: BlockLayout, blocks, placement: list[str], slots: torch.Tensor, links: dict):
        self.blocks, self.slots = blocks, slots
        self.resident = {i: layout.views(b) for i, (b, t) in enumerate(zip(blocks, placement)) if t == RESIDENT}
        self.streamed = [i for i, t in enumerate(placement) if t != RESIDENT]
        self.link_of = {i: links[placement[i]] for i in self.streamed}
        self.slot_views = [layout.views(slot) for slot in slots]
        on_gpu = slots.device.type == "cuda"
        self.ready = [torch.cuda.Event() if on_gpu else None for _ in slots]
        self.free = [torch.cuda.Event() if on_gpu else None for _ in slots]
        self.device = slots.device
        self.issued = self.used = 0  # loads issued, loads whose layer has been computed

    def acquire(self, layer: int) -> LayerWeights:
        if layer in self.resident:
            return self.resident[layer]
        if self.issued == 0:
            for _ in range(len(self.slots)):
                self._issue()
        expected = self.streamed[self.used % len(self.streamed)]
        assert layer == expected, f"layer {layer} asked for while layer {expected} is next in the ring"
        slot = self.used % len(self.slots)
        if self.ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        return self.slot_views[slot]

    def release(self, layer: int) -> None:
        if layer in self.resident:
            return
        slot = self.used % len(self.slots)
        if self.free[slot] is not None:
            self.free[slot].record(torch.cuda.current_stream(self.device))
        self.used += 1
        self._issue()

    def _issue(self) -> None:
        t = self.issued
        layer, slot = self.streamed[t % len(self.streamed)], t % len(self.slots)
        self.link_of[layer].copy(self.slots[slot], self.blocks[layer], after=self.free[slot], done=self.ready[slot])
        self.issued += 1

    def reset(self) -> None:
        """Forget the loads in flight (after a step was abandoned half way); the next step starts afresh."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.issued = self.used = 0
