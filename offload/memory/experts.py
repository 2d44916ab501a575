"""Where a mixture-of-experts model's routed experts live: resident, in the device's expert cache, or streamed.

A routed expert is a block needed only when a token is routed to it (``top_k`` of a
layer's ``n`` experts per token). The planner first places the blocks every pass
needs (attention, router, shared expert): per byte of GPU memory they save the most
link time. Then the compute device holds a *cache* of expert slots (at least the
experts one step of ``max_batch`` rows can route to in a layer, so a decode step
fetches each of them once), and with what is left, *resident* experts, spread evenly
over the layers. The other experts are spread over the host and the peers, each
tier's bytes in proportion to its link's bandwidth (as much as its room holds).
A GGUF file's layers may store their experts in different formats: each expert takes
its layer's bytes (``ExpertNeeds.sizes``), a cache slot the largest.

A step's expected link time counts the experts it is expected to miss: with uniform
routing (random weights route near uniformly; a real model's routing is skewed, and
its hit rate differs), ``rows`` tokens use ``n (1 - (1 - k/n)^rows)`` distinct experts
of a layer, the non-resident ones among them are fetched unless still in the cache.
Read directly (``ExpertNeeds.direct``), decode steps use no cache: it shrinks to one
token's experts (a prefill's waves), and its room goes to resident experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

from .budget import format_size

RESIDENT, HOST = "resident", "host"


@dataclass(frozen=True)
class ExpertNeeds:
    """The routed experts of a model on one rank."""

    nbytes: int  # the largest expert's block: a cache slot's size
    per_layer: tuple[int, ...]  # experts of each layer (0: a dense layer)
    top_k: int
    direct: bool = False  # every decode step reads streamed experts over their links (no cache: every step misses)
    host_only: bool = False  # kernels read the streamed experts (direct reads): on the host, never on a peer
    sizes: tuple[int, ...] = ()  # one expert's block in each layer (a GGUF file's formats vary); (): nbytes each

    @property
    def count(self) -> int:
        return sum(self.per_layer)

    def size(self, layer: int) -> int:
        """The bytes of one expert's block in ``layer``."""
        return self.sizes[layer] if self.sizes else self.nbytes

    @cached_property
    def each(self) -> list[int]:
        """Every expert's bytes, layer by layer (as ``ExpertPlan.placement`` lists them)."""
        return [self.size(layer) for layer, n in enumerate(self.per_layer) for _ in range(n)]

    @property
    def total_bytes(self) -> int:
        return sum(n * self.size(layer) for layer, n in enumerate(self.per_layer))

    def cache_slots(self, max_batch: int) -> int:
        """The device's expert slots: the experts a decode step of ``max_batch`` rows can route to in a layer (a
        step fetches each once); read directly, decode steps need none, and one token's experts serve a prefill's
        waves."""
        return min(max(self.per_layer), self.top_k * (1 if self.direct else max_batch))

    def distinct(self, layer: int, rows: int) -> float:
        """Expected distinct experts ``rows`` tokens use in ``layer`` (uniform routing)."""
        n = self.per_layer[layer]
        return n * (1 - (1 - self.top_k / n) ** rows) if n else 0.0

    def used_bytes(self, rows: int) -> float:
        """Expected bytes of the distinct experts a step of ``rows`` tokens uses, every layer."""
        return sum(self.distinct(layer, rows) * self.size(layer) for layer in range(len(self.per_layer)))


@dataclass
class ExpertPlan:
    needs: ExpertNeeds
    placement: list[str]  # one tier per expert, layer by layer, expert by expert
    cache_slots: int  # expert-sized buffers on the compute device
    resident_per_layer: list[int] = field(default_factory=list)
    # missed_bytes by rows: a speculative pass weighs dozens of shapes with it before the pass
    _missed: dict[int, dict[str, float]] = field(default_factory=dict, repr=False, compare=False)
    _held: dict[str, int] | None = field(default=None, repr=False, compare=False)  # bytes_on's, summed once

    def bytes_on(self, tier: str) -> int:
        if self._held is None:  # (a step's price asks for every tier's: the placement never changes)
            self._held = {}
            for where, size in zip(self.placement, self.needs.each):
                self._held[where] = self._held.get(where, 0) + size
        return self._held.get(tier, 0)

    @property
    def cache_bytes(self) -> int:
        return self.cache_slots * self.needs.nbytes

    def missed_bytes(self, rows: int) -> dict[str, float]:
        """Expected bytes fetched per step of ``rows`` tokens, per tier."""
        if rows not in self._missed:
            self._missed[rows] = self._expected_misses(rows)
        return self._missed[rows]

    def _misses(self, rows: int) -> list[float]:
        """Expected experts a step of ``rows`` tokens fetches in each layer."""
        n, resident = self.needs.per_layer, self.resident_per_layer
        # a non-resident expert of a layer is used in a step with the probability distinct / n
        used = {layer: self.needs.distinct(layer, rows) / count for layer, count in enumerate(n) if count}
        kept = 0 if self.needs.direct else self._steps_kept(used)
        return [p * (n[layer] - resident[layer]) * (1 - p) ** kept if (p := used.get(layer)) else 0.0
                for layer in range(len(n))]

    def _expected_misses(self, rows: int) -> dict[str, float]:
        streamed = {t: self.bytes_on(t) for t in set(self.placement) if t != RESIDENT}
        if not streamed:
            return {}
        missed = sum(m * self.needs.size(layer) for layer, m in enumerate(self._misses(rows)))
        total = sum(streamed.values())  # each tier's share of the misses: of the streamed bytes
        return {t: missed * b / total for t, b in streamed.items()}

    def _steps_kept(self, used: dict[int, float]) -> float:
        """How many past steps' experts the cache still holds: the layers take turns with it (least recently used
        out), so an expert used ``s`` steps ago is there while the distinct experts of the last ``s`` steps fit in
        it (Che's approximation of such a cache, in whole steps). A cache smaller than a step's experts keeps none
        from one step to the next."""
        def distinct(steps: int) -> float:
            return sum((self.needs.per_layer[layer] - self.resident_per_layer[layer]) * (1 - (1 - p) ** steps)
                       for layer, p in used.items())

        if distinct(2 ** 20) <= self.cache_slots:
            return math.inf  # every streamed expert fits in the cache
        low, high = 0, 1  # distinct(low) <= slots < distinct(high)
        while distinct(high) <= self.cache_slots:
            low, high = high, 2 * high
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if distinct(middle) <= self.cache_slots else (low, middle)
        return low

    def summary(self, rows: int = 1) -> str:
        n, layers = self.needs, [c for c in self.needs.per_layer if c]
        resident = [r for r, c in zip(self.resident_per_layer, self.needs.per_layer) if c]
        streamed = ", ".join(f"{t} {self.placement.count(t)}" for t in sorted(set(self.placement)) if t != RESIDENT)
        missed = sum(self.missed_bytes(rows).values())
        spread = f"{min(resident)}" if min(resident) == max(resident) else f"{min(resident)}-{max(resident)}"
        sizes = sorted(set(n.each))
        each = format_size(sizes[0]) if len(sizes) == 1 else f"{format_size(sizes[0])}-{format_size(sizes[-1])}"
        return (f"  experts: {max(layers)} per layer in {len(layers)} layers, {each} each, "
                f"{n.top_k} per token; resident {spread} per layer "
                f"({self.placement.count(RESIDENT)} in all), cache {self.cache_slots} slot(s) "
                f"{format_size(self.cache_bytes)}" + (f", streamed: {streamed}" if streamed else "")
                + f"; expected misses per token {sum(self._misses(rows)):.1f} ({format_size(missed)}, uniform "
                "routing)" + ("; decode steps read them where they live" if n.direct else ""))


def place_experts(needs: ExpertNeeds, gpu_room: int, room: dict[str, int], bandwidth: dict[str, float],
                  max_batch: int) -> ExpertPlan | str:
    """Place every expert given the GPU bytes left after the every-pass blocks (``gpu_room``) and the bytes left on
    each streaming tier (``room``); a string says what does not fit."""
    if needs.total_bytes <= gpu_room:
        return ExpertPlan(needs, [RESIDENT] * needs.count, 0, list(needs.per_layer))
    slots, slot = needs.cache_slots(max_batch), needs.nbytes
    if slots * slot > gpu_room:
        return (f"the expert cache needs {slots} slot(s) of {format_size(slot)} "
                f"(= {format_size(slots * slot)}) and {format_size(max(gpu_room, 0))} is left")
    resident = _most_resident(gpu_room - slots * slot, needs)
    if needs.host_only:  # the kernels read the host's experts (and not the peers')
        room = {tier: b for tier, b in room.items() if tier == HOST}
    streamed = [needs.size(layer) for layer, n in enumerate(needs.per_layer) for _ in range(n - resident[layer])]
    share = _shares(sum(streamed), room, bandwidth)
    held = {tier: 0 for tier in share}
    tiers = []
    for i, size in enumerate(streamed):  # each tier's experts spread evenly along the layers, toward its share
        open_tiers = [t for t in share if share[t] and held[t] + size <= room[t]]
        if not open_tiers:
            left = streamed[i:]
            return f"{len(left)} expert(s) ({format_size(sum(left))}) have nowhere to go"
        best = min(open_tiers, key=lambda t: ((held[t] + size) / share[t], t != HOST))
        held[best] += size
        tiers.append(best)
    placement = []
    for layer, n in enumerate(needs.per_layer):
        placement += [RESIDENT] * resident[layer] + [tiers.pop(0) for _ in range(n - resident[layer])]
    return ExpertPlan(needs, placement, slots, resident)


def _shares(nbytes: int, room: dict[str, int], bandwidth: dict[str, float]) -> dict[str, float]:
    """How many of ``nbytes`` each tier should hold for the links to finish their parts together: a tier at most
    its ``room``, the others sharing the rest by their bandwidths (all of its room each, where the rooms do not
    hold ``nbytes``)."""
    share, left, open_tiers = {}, nbytes, {t: b for t, b in room.items() if b > 0}
    while open_tiers:  # the tiers a common finishing time would overfill take their room; the rest share again
        seconds = left / sum(bandwidth[t] for t in open_tiers)
        full = {t for t, b in open_tiers.items() if b < seconds * bandwidth[t]}
        if not full:
            share.update({t: seconds * bandwidth[t] for t in open_tiers})
            break
        for t in full:
            share[t] = open_tiers.pop(t)
            left -= share[t]
    return share


def _most_resident(nbytes: int, needs: ExpertNeeds) -> list[int]:
    """The most experts, dealt out to the layers in turn (``_spread``), whose blocks fit in ``nbytes``."""
    held = lambda resident: sum(r * needs.size(layer) for layer, r in enumerate(resident))  # noqa: E731
    low, high = 0, needs.count + 1  # low fits, high does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if held(_spread(middle, needs.per_layer)) <= nbytes else (low, middle)
    return _spread(low, needs.per_layer)


def _spread(count: int, per_layer: tuple[int, ...]) -> list[int]:
    """``count`` resident experts dealt out to the layers in turn, each layer at most its own."""
    resident = [0] * len(per_layer)
    while count > 0 and any(r < n for r, n in zip(resident, per_layer)):
        for layer, n in enumerate(per_layer):
            if count and resident[layer] < n:
                resident[layer] += 1
                count -= 1
    return resident
