"""Routed experts on demand: resident ones where they are, the others copied into a device cache of slots.

After a layer's router has spoken, ``ExpertStore.fetch(layer, needed)`` gives each
needed expert's weights, in this order: those on the device already (resident, or
still in the cache from an earlier step: *hits*), which compute while the copies of
the others (*misses*) run, then the fetched ones, each with the event its copy
records. A miss takes the least recently used cache slot whose expert this layer
does not need; if the cache cannot hold all of a layer's misses at once, the rest
come in later waves as slots free up (a long prefill routing to every expert). A
slot is refilled only once the compute stream has passed its previous user.

Copies run on a stream of their own per link (beside the ring's, so an expert does
not queue behind the next layer's prefetch) and never block the host; on a CPU they
are plain synchronous copies.

With ``prefetch`` (``LoadOptions.prefetch_experts``), a routed layer also guesses the
next routed layer's experts, by that layer's router applied to its own hidden state
(``ahead``: the routers of the next routed layers that are resident), and
``prefetch`` copies the guesses into cache slots behind the layer's own copies: they
land while the layer computes and the next one attends, and the next layer finds
them cached (its compute waits for such a copy once). A wrong guess costs its
copy's link time and a slot.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator

import torch

from ..errors import ConfigError, OffloadWarning
from ..memory.planner import HOST, RESIDENT
from ..models.blocks import BlockSpec
from ..models.expert_kernels import Projection, device_address, peek, projection
from ..models import kernels
from ..models.kernels import triton
from ..models.quant import QuantizedWeight
from .stream import CopyStream


def check_direct(specs: list[BlockSpec], device: torch.device, dtype: torch.dtype) -> None:
    """Refuse direct reads (before any weight is read) where the kernels cannot run or cannot read the experts."""
    if triton is None or (device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"):
        raise ConfigError("direct expert reads run on a GPU with Triton (pip install -e '.[kernels]'), or "
                          "under Triton's interpreter (TRITON_INTERPRET=1)")
    if device.type != "cuda" and dtype == torch.bfloat16:  # numpy, which it computes with, has no bfloat16
        raise ConfigError("Triton's interpreter computes no bfloat16: direct expert reads on a CPU need "
                          "--dtype float32 or float16")
    for layout in {id(s.layout): s.layout for s in specs}.values():
        _projections(layout, torch.empty(layout.nbytes, dtype=torch.uint8), dtype)


def _projections(layout, block: torch.Tensor, dtype: torch.dtype) -> tuple[Projection, Projection, int]:
    """Where an expert block's gate-up and down projections lie and how they are stored, and its features
    (``block``: the expert's buffer or a cache slot, which may be longer than its layout: a slot is the size of
    the largest layer's expert)."""
    weights = layout.views(block[: layout.nbytes])
    found = [projection(getattr(weights, name), block, dtype) for name in ("w_gate_up", "w_down")]
    why = next((f for f in found if isinstance(f, str)), None)
    if why is not None:
        raise ConfigError(f"direct expert reads cannot read {why}: leave out --direct-experts")
    if any(at % 16 for p in found for at in p.args()):
        raise ConfigError("direct expert reads need an expert's weights at 16-byte boundaries of its block")
    gate_up = weights.w_gate_up
    return found[0], found[1], (gate_up.rows if isinstance(gate_up, QuantizedWeight) else gate_up.shape[0]) // 2


def kernels_compute_copies(device: torch.device) -> bool:
    """Whether experts copied into the cache are computed by the kernels of ``expert_kernels`` (as direct reads
    are): on a GPU where Triton works. Else an expert at a time, by torch's operations (on a CPU Triton's
    interpreter would be slow)."""
    return device.type == "cuda" and kernels.works(device)


class ExpertTable:
    """Every routed expert's block address as the kernels of ``offload/models/expert_kernels.py`` read it, whether
    it lives off the device, and the device's count of the experts read from each (``counts``: device, other).

    Direct reads (``LoadOptions.direct_experts``): every address is fixed, in HBM or in pinned host memory
    over the link. With ``slots`` (the copying cache), only resident experts' addresses are fixed: the host
    copies the others into cache slots and points their entries there before each layer's kernels (``point``),
    so the kernels read every expert on the device."""

    def __init__(self, specs: list[BlockSpec], buffers: list[torch.Tensor], tiers: list[str], device: torch.device,
                 dtype: torch.dtype, slots: torch.Tensor | None = None):
        check_direct(specs, device, dtype)
        self.direct = slots is None
        layers, experts = 1 + max(s.layer for s in specs), 1 + max(s.expert for s in specs)
        addresses, on_host = [[0] * experts for _ in range(layers)], [[0] * experts for _ in range(layers)]
        bases: dict[int, int] = {}  # storage -> its address for the kernels (one lookup per tier's buffer)
        for spec, buffer, tier in zip(specs, buffers, tiers):
            if not self.direct and tier != RESIDENT:
                continue  # copied into a slot when routed
            if tier not in (RESIDENT, HOST):
                raise ConfigError(f"direct expert reads need every expert on the compute device or in host memory; "
                                  f"the plan put {spec.name} on {tier} (leave out --peer-memory or --direct-experts)")
            storage = buffer.untyped_storage().data_ptr()
            if storage not in bases:
                bases[storage] = _checked_address(buffer, device) - (buffer.data_ptr() - storage)
            addresses[spec.layer][spec.expert] = bases[storage] + buffer.data_ptr() - storage
            on_host[spec.layer][spec.expert] = int(tier != RESIDENT)
        # each layer's projections (a GGUF file may store some layers' experts in other formats), this rank's
        self.projections = {spec.layer: _projections(spec.layout, buffer, dtype)[:2]
                            for spec, buffer in zip(specs, buffers) if spec.expert == 0}
        self.features = _projections(specs[0].layout, buffers[0], dtype)[2]
        self.slot_addresses = [] if slots is None else [slots[s].data_ptr() for s in range(len(slots))]
        if any(a % 16 for row in addresses for a in row) or any(a % 16 for a in self.slot_addresses):
            raise ConfigError("direct expert reads need experts' blocks at 16-byte boundaries")
        self.addresses = torch.tensor(addresses, dtype=torch.int64, device=device)
        # the host's copy of the addresses that ``point`` sends (pinned: the copy does not wait for the GPU)
        self._pointed = torch.tensor(addresses, dtype=torch.int64).pin_memory() if device.type == "cuda" and \
            not self.direct else torch.tensor(addresses, dtype=torch.int64)
        self.on_host = torch.tensor(on_host, dtype=torch.int8, device=device)
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)
        self._landed, self._copy, self._copied = (0, 0), None, None  # the counts' latest copy to the host

    def point(self, layer: int, slots: dict[int, int]) -> torch.Tensor:
        """Layer ``layer``'s addresses with each expert of ``slots`` read from its cache slot (``{expert: slot}``),
        sent to the device behind the work queued so far. A pass rewrites a layer's row after reading that
        layer's routing, which waited for the work queued before it: the previous pass's copy has landed. A
        later wave of the same layer may rewrite the row before its first wave's copy lands: it changes only
        its own experts' entries, which that wave's kernels do not read. Every expert resident: the device's row
        is the host's already, and nothing is sent."""
        if not slots:
            return self.addresses[layer]
        row = self._pointed[layer]
        for e, slot in slots.items():
            row[e] = self.slot_addresses[slot]
        return self.addresses[layer].copy_(row, non_blocking=True)

    def read(self, wait: bool = True) -> tuple[int, int]:
        """(experts read on the device, read from elsewhere) so far: the host waits for the GPU; or, without
        ``wait``, as of the latest copy that has landed (a copy of the counts is queued behind the work so far:
        a server reads them every step without waiting for the pass in flight)."""
        if wait or self.counts.device.type != "cuda":
            on_device, elsewhere = self.counts.tolist()
            return on_device, elsewhere
        if self._copy is None:
            self._copy, self._copied = torch.zeros(2, dtype=torch.int64).pin_memory(), torch.cuda.Event()
        elif self._copied.query():
            self._landed = tuple(self._copy.tolist())
        else:
            return self._landed
        self._copy.copy_(self.counts, non_blocking=True)
        self._copied.record()
        return self._landed


class ExpertStore:
    """The routed experts of every layer (``specs``, their ``buffers`` and tiers) and a cache of ``slots``."""

    def __init__(self, specs: list[BlockSpec], buffers: list[torch.Tensor], tiers: list[str], slots: torch.Tensor,
                 copies: dict[str, CopyStream], dtype: torch.dtype, direct: bool = False):
        self.slots, self.copies = slots, copies
        # the kernels' table of addresses: direct reads, or where copies go through the kernels (where they read
        # the experts' format; else an expert at a time)
        self.table = None
        if direct:
            self.table = ExpertTable(specs, buffers, tiers, slots.device, dtype)
        elif kernels_compute_copies(slots.device):
            try:
                self.table = ExpertTable(specs, buffers, tiers, slots.device, dtype, slots)
            except ConfigError:
                pass  # a format the kernels do not read: an expert at a time
            except Exception as e:  # noqa: BLE001 - whatever the toolchain raises, an expert at a time still works
                warnings.warn(f"the expert kernels fail here ({type(e).__name__}: {str(e)[:200]}); computing "
                              "copied experts one at a time", OffloadWarning, stacklevel=2)
        self.resident = {}
        self.source: dict[tuple[int, int], tuple[torch.Tensor, str, object]] = {}
        for spec, buffer, tier in zip(specs, buffers, tiers):
            key = (spec.layer, spec.expert)
            if tier == RESIDENT:
                self.resident[key] = spec.layout.views(buffer[: spec.layout.nbytes])
            else:
                self.source[key] = (buffer, tier, spec.layout)
        on_gpu = slots.device.type == "cuda"
        self.ready = [torch.cuda.Event() if on_gpu else None for _ in range(len(slots))]
        self.free = [torch.cuda.Event() if on_gpu else None for _ in range(len(slots))]
        self.cached: OrderedDict[tuple[int, int], int] = OrderedDict()  # expert -> slot, least recently used first
        self.unused = list(range(len(slots)))[::-1]  # slots no expert has been copied into yet
        self.views: dict[tuple[int, int], object] = {}  # (slot, id(layout)) -> the weights there (made once)
        self.ahead: dict[int, tuple[int, torch.Tensor]] = {}  # routed layer -> (next routed layer, its router)
        self.landing: set[int] = set()  # slots a prefetch copies into that no compute has waited for yet
        self.copy_hits = self.copy_misses = self.prefetched = self.prefetch_used = 0
        self._placed: list[int] = []  # the slots the kernels of the latest ``place`` read

    def fetch(self, layer: int, needed: list[int]) -> Iterator[tuple[int, object]]:
        """Yield ``(expert, weights)`` for every expert of ``needed``: those on the device first, then those
        fetched (the compute stream waits for each one's copy before it is yielded)."""
        pending = list(needed)
        while pending:
            here, fetched, pending = self._issue(layer, pending)
            for e, weights in here:
                yield e, weights
            for e, slot in fetched:
                if self.ready[slot] is not None:
                    torch.cuda.current_stream(self.slots.device).wait_event(self.ready[slot])
                yield e, self._weights(slot, self.source[layer, e][2])
            for _, slot in fetched + [(e, self.cached[layer, e]) for e, _ in here if (layer, e) in self.cached]:
                if self.free[slot] is not None:  # the slot may be refilled once this wave's compute has run
                    self.free[slot].record(torch.cuda.current_stream(self.slots.device))

    def _issue(self, layer: int, pending: list[int]):
        """Split ``pending`` into the experts here, those whose copies are issued now, and those left for a
        later wave (no evictable slot)."""
        here, fetched, left = [], [], []
        wave = {(layer, e) for e in pending}
        for e in pending:
            key = (layer, e)
            if key in self.resident:
                here.append((e, self.resident[key]))
            elif key in self.cached:
                self.cached.move_to_end(key)
                slot = self.cached[key]
                if slot in self.landing:  # prefetched: its first user waits for the copy
                    self.landing.discard(slot)
                    self.prefetch_used += 1
                    if self.ready[slot] is not None:
                        torch.cuda.current_stream(self.slots.device).wait_event(self.ready[slot])
                here.append((e, self._weights(slot, self.source[key][2])))
            else:
                slot = self._take_slot(wave)
                if slot is None:
                    left.append(e)
                    continue
                self._copy_in(key, slot)
                fetched.append((e, slot))
                self.copy_misses += 1
                continue
            self.copy_hits += 1
        return here, fetched, left

    def place(self, layer: int, needed: list[int]) -> tuple[torch.Tensor, list[int], list[int]]:
        """The experts of ``needed`` on the device at once, for the kernels: those missing copied into cache slots
        (the compute stream waits for their copies), as many as the cache holds. The layer's addresses
        (``ExpertTable.point``), the experts placed, and those left for a later wave. ``release`` after the
        kernels."""
        here, fetched, left = self._issue(layer, needed)
        if left and not here and not fetched:
            raise RuntimeError(f"layer {layer}'s experts found no cache slot")  # the plan keeps a slot a route
        for _, slot in fetched:
            if self.ready[slot] is not None:
                torch.cuda.current_stream(self.slots.device).wait_event(self.ready[slot])
        placed = [e for e, _ in here] + [e for e, _ in fetched]
        slots = {e: self.cached[layer, e] for e in placed if (layer, e) in self.cached}
        self._placed = list(slots.values())
        return self.table.point(layer, slots), placed, left

    def release(self) -> None:
        """The slots of the latest ``place`` may be refilled once the work queued so far (its kernels) has run."""
        for slot in self._placed:
            if self.free[slot] is not None:
                self.free[slot].record(torch.cuda.current_stream(self.slots.device))
        self._placed = []

    def prefetch(self, layer: int, guessed: list[int]) -> None:
        """Start copying the experts of ``layer`` in ``guessed`` that are not on the device into cache slots,
        behind the copies issued so far (never into a slot another guess of this call needs)."""
        wave = {(layer, e) for e in guessed}
        for e in guessed:
            key = (layer, e)
            if key in self.resident or key in self.cached:
                continue
            slot = self._take_slot(wave)
            if slot is None:
                return
            self._copy_in(key, slot)
            self.landing.add(slot)
            self.prefetched += 1

    def _copy_in(self, key: tuple[int, int], slot: int) -> None:
        """Copy expert ``key`` into cache slot ``slot`` once the slot's last user has computed (never blocking)."""
        buffer, tier, layout = self.source[key]  # (a slot is the largest layer's expert's size: fill this one's)
        self.copies[tier].copy(self.slots[slot][: layout.nbytes], buffer[: layout.nbytes], after=self.free[slot],
                               done=self.ready[slot])
        self.cached[key] = slot

    def _weights(self, slot: int, layout):
        """An expert's weights in cache slot ``slot`` (views made once per slot and layout: a step asks often)."""
        key = (slot, id(layout))
        if key not in self.views:
            self.views[key] = layout.views(self.slots[slot][: layout.nbytes])
        return self.views[key]

    def _take_slot(self, wave: set) -> int | None:
        """A slot never used, or the least recently used one whose expert this wave does not need."""
        if self.unused:
            return self.unused.pop()
        for key, slot in self.cached.items():
            if key not in wave:
                del self.cached[key]
                if slot in self.landing:  # a guess never used: its copy (on another link's stream, maybe) may
                    self.landing.discard(slot)  # still run, so the refill waits for it through ``free``
                    if self.ready[slot] is not None:
                        stream = torch.cuda.current_stream(self.slots.device)
                        stream.wait_event(self.ready[slot])
                        self.free[slot].record(stream)
                return slot
        return None

    def counts(self, wait: bool = True) -> tuple[int, int]:
        """(hits, misses): experts needed that were on the device (copied or read directly), and those that were
        not (copied in, or read over their link); without ``wait``, direct reads' counts as of a step or so ago
        (``ExpertTable.read``)."""
        direct = self.table.read(wait) if self.table is not None and self.table.direct else (0, 0)
        return self.copy_hits + direct[0], self.copy_misses + direct[1]

    @property
    def hits(self) -> int:
        return self.counts()[0]

    @property
    def misses(self) -> int:
        return self.counts()[1]

    @property
    def hit_rate(self) -> float:
        return _share(*self.counts())

    def summary(self) -> str:
        """What the CLI prints: ``experts: 81.3% on the device when needed (1,204 hits, 277 copied in)``."""
        guessed = (f"; {self.prefetched:,} prefetched, {self.prefetch_used:,} of them used"
                   if self.prefetched else "")
        hits, misses = self.counts()
        moved = "copied in or read over a link" if self.table is not None and self.table.direct else "copied in"
        return (f"experts: {_share(hits, misses):.1%} on the device when needed ({hits:,} hits, {misses:,} "
                f"{moved}{guessed})")

    def reset(self) -> None:
        """Forget what the cache holds (after a pass was abandoned half way, its copies may not have landed)."""
        if self.slots.device.type == "cuda":
            torch.cuda.synchronize(self.slots.device)
        self.cached.clear()
        self.landing.clear()
        self.unused = list(range(len(self.slots)))[::-1]


def _checked_address(buffer: torch.Tensor, device: torch.device) -> int:
    """``buffer``'s address for kernels on ``device``, checked by reading its first bytes there: the GPU must
    read pinned host memory in place (mapped, under unified addressing), or direct reads would read garbage."""
    address = device_address(buffer, device)
    seen = peek(address, min(64, buffer.numel()), device).cpu()
    if not torch.equal(seen, buffer[: seen.numel()].cpu()):
        raise ConfigError(f"kernels on {device} cannot read {buffer.device} memory in place on this system "
                          "(direct expert reads need it): leave out --direct-experts")
    return address


def _share(hits: int, misses: int) -> float:
    return hits / (hits + misses) if hits + misses else 0.0
