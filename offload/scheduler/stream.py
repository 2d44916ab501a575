"""When bytes move: per link, a copy stream and a ring of slots, with events between them.

Each link (the host, each peer GPU) loads its streamed layers in a fixed cyclic
order, layer after layer and step after step: load ``t`` brings the link's layer
``layers[t % m]`` into its slot ``t % k``. Load ``t + k`` is issued as soon as the
compute of load ``t`` has been *enqueued* (not finished): the link's copy stream
waits, on the GPU, for the event "slot free", copies, and records "slot ready",
on which the compute stream waits before the layer runs. The host never waits,
the copies of the next step start while this one finishes (prefetch crosses step
boundaries), and the links copy at the same time, each into its own slots.

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
    """The layers one link streams, cycling through that link's own slots.

    Load ``t`` brings layer ``layers[t % m]`` into slot ``t % k``; load ``t + k`` is issued
    when load ``t``'s layer has been computed (enqueued). Each link has its own ring, so a
    slow host copy never holds a slot that a fast peer copy is waiting for.
    """

    def __init__(self, layers: list[int], blocks, slots: torch.Tensor, link: Link, layout: BlockLayout):
        self.layers, self.blocks, self.slots, self.link = layers, blocks, slots, link
        self.slot_views = [layout.views(slot) for slot in slots]
        on_gpu = slots.device.type == "cuda"
        self.ready = [torch.cuda.Event() if on_gpu else None for _ in slots]
        self.free = [torch.cuda.Event() if on_gpu else None for _ in slots]
        self.device = slots.device
        self.issued = self.used = 0  # loads issued, loads whose layer has been computed

    def acquire(self, layer: int) -> LayerWeights:
        if self.issued == 0:
            for _ in range(len(self.slots)):
                self._issue()
        expected = self.layers[self.used % len(self.layers)]
        assert layer == expected, f"layer {layer} asked for while layer {expected} is next in the ring"
        slot = self.used % len(self.slots)
        if self.ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        return self.slot_views[slot]

    def release(self) -> None:
        slot = self.used % len(self.slots)
        if self.free[slot] is not None:
            self.free[slot].record(torch.cuda.current_stream(self.device))
        self.used += 1
        self._issue()

    def _issue(self) -> None:
        t = self.issued
        layer, slot = self.layers[t % len(self.layers)], t % len(self.slots)
        self.link.copy(self.slots[slot], self.blocks[layer], after=self.free[slot], done=self.ready[slot])
        self.issued += 1

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.issued = self.used = 0


class LayerStream:
    """Gives the decoder each layer's weights in order: resident views, or a slot of its link's ring."""

    def __init__(self, layout: BlockLayout, blocks, placement: list[str], slots: dict[str, torch.Tensor],
                 links: dict[str, Link]):
        self.resident = {i: layout.views(b) for i, (b, t) in enumerate(zip(blocks, placement)) if t == RESIDENT}
        self.rings = [Ring([i for i, t in enumerate(placement) if t == tier], blocks, slots[tier], link, layout)
                      for tier, link in links.items()]
        self.ring_of = {layer: ring for ring in self.rings for layer in ring.layers}

    def acquire(self, layer: int) -> LayerWeights:
        weights = self.resident.get(layer)
        return weights if weights is not None else self.ring_of[layer].acquire(layer)

    def release(self, layer: int) -> None:
        if layer in self.ring_of:
            self.ring_of[layer].release()

    def reset(self) -> None:
        """Forget the loads in flight (after a step was abandoned half way); the next step starts afresh."""
        for ring in self.rings:
            ring.reset()
