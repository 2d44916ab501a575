"""When bytes move: per link, a copy engine and a ring of slots, with events between them.

Each link (the host, each peer GPU) streams its layers ``layers[0..m)`` in a
fixed cyclic order, layer after layer and step after step. The ring's j-th layer
always lands in slot ``j % k``, so a streamed layer is read from the same address
every step (which a captured CUDA graph needs). A load is issued as soon as the
previous user of its slot has been *enqueued* for compute (not finished): the
link's copy stream waits, on the GPU, for the event "slot free", copies, and
records "slot ready", on which the compute stream waits before the layer runs.
The host never waits, the copies of the next step start while this one finishes
(prefetch crosses step boundaries), and the links copy at the same time, each
into its own slots.

On a CPU there are no streams: a copy happens when it is issued, into a slot
whose previous user has already finished, so the same order and the same slots
are exercised with plain synchronous copies.
"""

from __future__ import annotations

import torch

from ..memory.planner import RESIDENT
from ..models.blocks import BlockLayout, LayerWeights


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
    """The layers one link streams, each always into the same one of that link's slots.

    Load ``t`` brings layer ``layers[t % m]`` into slot ``(t % m) % k``, and is issued once
    the slot's previous load has been released (its layer's compute enqueued). Each link
    has its own ring, so a slow host copy never holds a slot that a fast peer copy needs.
    """

    def __init__(self, layers: list[int], blocks, slots: torch.Tensor, engine: CopyStream, layout: BlockLayout):
        self.layers, self.blocks, self.slots, self.engine = layers, blocks, slots, engine
        self.slot_views = [layout.views(slot) for slot in slots]
        on_gpu = slots.device.type == "cuda"
        self.ready = [torch.cuda.Event() if on_gpu else None for _ in slots]
        self.free = [torch.cuda.Event() if on_gpu else None for _ in slots]
        self.device = slots.device
        self.reset_counters()

    def reset_counters(self) -> None:
        self.issued = self.used = 0  # loads issued, loads whose layer has been computed (enqueued)
        self.last_load = [-1] * len(self.slots)  # per slot: the latest load issued into it

    def slot_of(self, load: int) -> int:
        return (load % len(self.layers)) % len(self.slots)

    def acquire(self, layer: int) -> LayerWeights:
        self._issue_ready()
        expected = self.layers[self.used % len(self.layers)]
        assert layer == expected, f"layer {layer} asked for while layer {expected} is next in the ring"
        slot = self.slot_of(self.used)
        if self.ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        return self.slot_views[slot]

    def release(self) -> None:
        slot = self.slot_of(self.used)
        if self.free[slot] is not None:
            self.free[slot].record(torch.cuda.current_stream(self.device))
        self.used += 1
        self._issue_ready()

    def _issue_ready(self) -> None:
        """Issue, in ring order, every load whose slot's previous load has been released."""
        while self.last_load[self.slot_of(self.issued)] < self.used:
            t, slot = self.issued, self.slot_of(self.issued)
            layer = self.layers[t % len(self.layers)]
            self.engine.copy(self.slots[slot], self.blocks[layer], after=self.free[slot], done=self.ready[slot])
            self.last_load[slot] = t
            self.issued += 1

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.reset_counters()


class WeightStream:
    """Gives the decoder each layer's weights in order: resident views, or a slot of its link's ring."""

    def __init__(self, layout: BlockLayout, blocks, placement: list[str], slots: dict[str, torch.Tensor],
                 engines: dict[str, CopyStream]):
        self.resident = {i: layout.views(b) for i, (b, t) in enumerate(zip(blocks, placement)) if t == RESIDENT}
        self.rings = [Ring([i for i, t in enumerate(placement) if t == tier], blocks, slots[tier], engine, layout)
                      for tier, engine in engines.items()]
        self.ring_of = {layer: ring for ring in self.rings for layer in ring.layers}

    def acquire(self, layer: int) -> LayerWeights:
        weights = self.resident.get(layer)
        return weights if weights is not None else self.ring_of[layer].acquire(layer)

    def release(self, layer: int) -> None:
        if layer in self.ring_of:
            self.ring_of[layer].release()

    def fixed_weights(self, layer: int) -> LayerWeights:
        """Where ``layer``'s weights are whenever it runs: its resident views, or those of the one slot its
        ring always puts it in (no waiting, no copies: for capturing a graph)."""
        if layer in self.resident:
            return self.resident[layer]
        ring = self.ring_of[layer]
        return ring.slot_views[ring.layers.index(layer) % len(ring.slots)]

    def reset(self) -> None:
        """Forget the loads in flight (after a step was abandoned half way); the next step starts afresh."""
        for ring in self.rings:
            ring.reset()
