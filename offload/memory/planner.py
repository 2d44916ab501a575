"""The placement planner: which tier holds each block, decided once before loading.

Inputs: the bytes the model needs on this rank (its blocks, in the order a pass
uses them, and the non-layer tensors, KV cache and activations), the budgets per
tier and the bandwidth of each link. Output: a :class:`Plan` whose ``placement``
names the tier of every block, with the bytes per tier and the predicted time of
a decode step,

    t_step = max(weights / HBM bandwidth, bytes streamed over each link / its bandwidth)

The compute device keeps everything that must live there (non-layer tensors, KV
cache, activations, and for each streaming link the ring of slots its blocks are
copied into, each slot as large as the link's largest block) and then as many
blocks as fit; where every block fits without the slots (the embedding moved to
the host, say), none streams: two blocks through two slots would take the room
of the two blocks (a mixture of experts' routed experts may gain more room from
blocks streamed through smaller slots: there the faster plan of the two). The rest are spread over the peers and the host so
that the links finish together, and are interleaved with the resident blocks in
pass order, so every link keeps copying while resident blocks compute. Blocks may
differ in size; where they do, the planner counts every block as large as the
largest (never past a budget, at worst a block short of the best packing).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate

from ..errors import PlanError
from .budget import Budget, format_seconds, format_size
from .experts import ExpertNeeds, ExpertPlan, place_experts

RESIDENT, HOST = "resident", "host"
DEFAULT_SLOTS = 2  # per link, double buffering: one slot computes while the next is filled
LINK_BOUND_RATIO = 10.0  # warn when streaming makes a decode step this many times slower than compute


@dataclass(frozen=True)
class MemoryNeeds:
    """Bytes the model needs on one rank."""

    blocks: tuple[int, ...]  # bytes of each block, in the order a pass uses them (one per decoder layer)
    global_bytes: int  # final norm and LM head (and the embedding, when tied to the LM head)
    kv_bytes: int  # KV cache for max_batch x max_seq_len
    activation_bytes: int  # the largest step's temporaries
    workspace_bytes: int  # math-library workspaces, allocator slack
    max_batch: int = 1
    max_seq_len: int = 0
    step_tokens: int = 0  # the most tokens of a chunk of a pass, whose temporaries ``activation_bytes`` holds
    embedding_bytes: int = 0  # an untied embedding table: on the GPU, or in host RAM when offloading
    rope_bytes: int = 0  # the rotary embedding's cos/sin tables for max_seq_len positions
    graph_bytes: int = 0  # CUDA graphs of decode steps (and verify passes): their memory pool and buffers
    flops_per_token: float = 0.0  # matrix-product work of one token through every layer
    flops_per_key: float = 0.0  # attention work of one token against one cached key, every layer
    experts: ExpertNeeds | None = None  # a mixture-of-experts model's routed experts (blocks of their own)
    products: str = ""  # what the layers' products read: "bf16", "int8" or "int4" (their measured rates,
    # "gemv-<format>" and "rows16-<format>" in the bandwidths, bound a decode step's compute; "": "hbm")
    head_products: str = ""  # what the LM head's product reads where it is stored compressed ("int8", or a file's
    # own format); "": the model dtype's rate ("bf16", or "hbm" for float32)
    dequant_bytes: int = 0  # quantized layers: the rows a linear dequantizes at a time, and their product
    weight_format: str = ""  # quantized layers: the format and bytes per layer, for the plan; "" for the model dtype
    draft_bytes: int = 0  # speculative decoding: a draft model kept on the compute device (weights, KV cache...)
    embedding_stays: bool = False  # the embedding stays on the compute device (the int4 draft reads it there too)
    decode_kernels: int = 0  # a decode step's kernels over every layer (each takes at least a small kernel's time)

    @property
    def fixed_bytes(self) -> int:
        """What must be on the compute device besides the blocks, the slots and the embedding."""
        return (self.global_bytes + self.kv_bytes + self.activation_bytes + self.workspace_bytes + self.rope_bytes
                + self.graph_bytes + self.dequant_bytes + self.draft_bytes)

    @property
    def kv_bytes_per_key(self) -> float:
        """The KV cache's bytes for one cached token, every layer: what attention reads for each key a row sees."""
        return self.kv_bytes / (self.max_batch * self.max_seq_len) if self.max_batch * self.max_seq_len else 0.0

    @property
    def weight_bytes(self) -> int:
        """Every block's bytes, the routed experts' too."""
        return sum(self.blocks) + (self.experts.total_bytes if self.experts else 0)

    def fits_whole(self, gpu_memory: int) -> bool:
        """Whether every weight and what must stay on the device fit in ``gpu_memory``: nothing is offloaded."""
        return self.fixed_bytes + self.embedding_bytes + self.weight_bytes <= gpu_memory

    @property
    def largest_block(self) -> int:
        return max(self.blocks)

    def gpu_budget_streaming(self, resident: int, slots: int = DEFAULT_SLOTS) -> int:
        """The GPU budget under which the plan keeps ``resident`` blocks and streams the others from the host
        through ``slots`` slots (with the embedding, if untied, in host RAM; a mixture of experts' routed experts
        through the expert cache alone). Where ``resident + slots`` blocks would hold every block (of one size),
        none streams: the plan keeps them all."""
        kept = sum(sorted(self.blocks, reverse=True)[:resident])
        cache = self.experts.cache_slots(self.max_batch) * self.experts.nbytes if self.experts else 0
        return self.fixed_bytes + kept + slots * self.largest_block + cache

    def streaming_slots(self, slots: int | None = None) -> int:
        """``slots`` (default ``DEFAULT_SLOTS``), but fewer than the blocks: a ring as large as the model would
        hold every block, and the plan would keep them all."""
        return max(1, min(slots or DEFAULT_SLOTS, len(self.blocks) - 1))

    def streaming_half(self, slots: int | None = None) -> tuple[int, int]:
        """The resident blocks and the slots (:meth:`streaming_slots`) of a budget under which about half the
        blocks stream: half of them resident, fewer where the slots and they would hold every block."""
        slots = self.streaming_slots(slots)
        return max(0, min(len(self.blocks) // 2, len(self.blocks) - slots - 1)), slots


@dataclass
class Plan:
    placement: list[str]  # one tier per every-pass block (one per layer): "resident", "host" or a peer's name
    slots: dict[str, int]  # per streaming link: buffers on the compute device its blocks are copied into (its ring)
    needs: MemoryNeeds
    budget: Budget
    bandwidth: dict[str, float]  # bytes/s per link, and "hbm"
    compute_device: str
    title: str = ""
    embedding_on_host: bool = False  # a step's lookups copy only its tokens' rows to the GPU
    draft: str = ""  # speculative decoding: the draft, what it holds and what it is predicted to gain, for printing
    warnings: list[str] = field(default_factory=list)  # printed with the plan; the caller decides whether to warn
    experts: ExpertPlan | None = None  # where a mixture-of-experts model's routed experts live

    # ---------------------------------------------------------------- derived figures

    def blocks_on(self, tier: str) -> list[int]:
        return [i for i, t in enumerate(self.placement) if t == tier]

    def bytes_on(self, tier: str) -> int:
        """Every block's bytes the tier holds (routed experts included)."""
        experts = self.experts.bytes_on(tier) if self.experts else 0
        return sum(self.needs.blocks[i] for i in self.blocks_on(tier)) + experts

    @property
    def block_tiers(self) -> list[str]:
        """The tier of every block, in the order of the model's blocks (every-pass ones, then experts)."""
        return self.placement + (self.experts.placement if self.experts else [])

    def slot_bytes(self, tier: str) -> int:
        """The size of each slot of ``tier``'s ring: its largest block."""
        return max(self.needs.blocks[i] for i in self.blocks_on(tier))

    @property
    def tiers(self) -> list[str]:
        return [RESIDENT, HOST, *self.budget.peer_memory]

    @property
    def streamed_tiers(self) -> list[str]:
        return [t for t in self.tiers[1:] if self.bytes_on(t)]

    @property
    def gpu_bytes(self) -> int:
        """Everything the plan puts on the compute device."""
        embedding = 0 if self.embedding_on_host else self.needs.embedding_bytes
        cache = self.experts.cache_bytes if self.experts else 0
        return self.needs.fixed_bytes + embedding + self.bytes_on(RESIDENT) + self.slots_bytes + cache

    @property
    def slots_bytes(self) -> int:
        return sum(count * self.slot_bytes(tier) for tier, count in self.slots.items())

    @property
    def slot_count(self) -> int:
        return sum(self.slots.values())

    @property
    def host_bytes(self) -> int:
        """Pinned host memory: the layers streamed from the host."""
        return self.bytes_on(HOST)

    @property
    def host_ram_bytes(self) -> int:
        """All host memory the plan uses: the pinned layers and, when there, the embedding table."""
        return self.host_bytes + (self.needs.embedding_bytes if self.embedding_on_host else 0)

    def link_seconds(self, rows: int = 1) -> dict[str, float]:
        """Seconds per decode step of ``rows`` rows that each link spends copying (the every-pass blocks it
        streams, and the routed experts it is expected to fetch), and the HBM floor under "hbm" (every
        block, the experts a step uses and the LM head, read once, at the measured rates of their formats'
        products: of one row, or of 16 for more rows; a routed expert's at one row's)."""
        missed = self.experts.missed_bytes(rows) if self.experts else {}
        out = {t: (sum(self.needs.blocks[i] for i in self.blocks_on(t)) + missed.get(t, 0)) / self.bandwidth[t]
               for t in self.streamed_tiers}
        experts = 0  # a routed expert sees a row or two of a step's: at the one-row rate
        if self.needs.experts:
            experts = self.needs.experts.used_bytes(rows)
        head = self.needs.head_products or ("bf16" if self.needs.products else "")  # ("": float32)
        out["hbm"] = (self._product_seconds(sum(self.needs.blocks), self.needs.products, rows)
                      + self._product_seconds(experts, self.needs.products, 1)
                      + self._product_seconds(self.needs.global_bytes, head, rows))
        return out

    def _product_seconds(self, nbytes: int, fmt: str, rows: int) -> float:
        """Products of ``rows`` rows reading ``nbytes`` of weights in ``fmt``: one row at the measured one-row rate
        ("gemv-<fmt>"; the HBM copy rate where unmeasured, 0), more at the 16-row rate ("rows16-<fmt>"): from two
        rows the products run the kernels of 16, whose time barely changes with the rows (bf16's 2-row products
        took 115 us where 16 took 116, int4's 110 and 119; more rows may bind on the matrix work instead:
        ``pass_seconds``)."""
        one = nbytes / (self.bandwidth.get(f"gemv-{fmt}") or self.bandwidth["hbm"])
        many = self.bandwidth.get(f"rows16-{fmt}")
        return one if rows <= 1 or not many else max(nbytes / many, one)

    def compute_seconds(self, rows: int = 1, keys: int = 0) -> float:
        """A decode step's time on the compute device: its products read every weight they use at the measured
        rates of their formats (``link_seconds``' "hbm"), its attention reads the ``keys`` cached keys of its rows
        (summed over the rows) at the attention kernel's measured rate (the HBM's where there is none), and each
        of its kernels takes at least the measured time of a small one besides (a step of a small or compressed
        model is largely that)."""
        kernels = self.bandwidth.get("kernels") or math.inf
        cache = keys * self.needs.kv_bytes_per_key / (self.bandwidth.get("attention") or self.bandwidth["hbm"])
        return self.link_seconds(rows)["hbm"] + cache + self.needs.decode_kernels / kernels

    def step_seconds(self, rows: int = 1, keys: int = 0) -> float:
        """A decode step of ``rows`` rows that see ``keys`` cached keys in all: the slowest link, or the compute
        device's time."""
        links = self.link_seconds(rows)
        return max([s for t, s in links.items() if t != "hbm"] + [self.compute_seconds(rows, keys)])

    @property
    def predicted_step_seconds(self) -> float:
        """A decode step of one row (the plan's printed prediction)."""
        return self.step_seconds(1)

    def pass_seconds(self, tokens: int, keys: int = 0) -> float:
        """A pass that runs ``tokens`` tokens through every layer, attending to ``keys`` cached keys in all:
        the slowest link (a mixture of experts fetches the experts all its tokens are routed to), or the
        matrix work at the measured rate, whichever is longer."""
        work = tokens * self.needs.flops_per_token + keys * self.needs.flops_per_key
        compute = work / self.bandwidth.get("matmul", math.inf)
        links = self.link_seconds(max(tokens, 1))
        return max([s for t, s in links.items() if t != "hbm"] + [self.compute_seconds(max(tokens, 1)), compute])

    @property
    def bottleneck(self) -> str:
        seconds = {**self.link_seconds(), "hbm": self.compute_seconds()}
        return max(seconds, key=seconds.get)

    # ---------------------------------------------------------------- printing

    def layer_map(self) -> str:
        letter = {RESIDENT: "R", HOST: "H"}
        return "".join(letter.get(t) or t.rsplit(":", 1)[-1][-1] for t in self.placement)

    def __str__(self) -> str:
        n = self.needs
        gb_s = lambda bw: f"{bw / 1e9:,.1f} GB/s"  # noqa: E731
        lines = [
            f"placement plan{self.title}: {_layers(n)} on {self.compute_device}",
            f"  {'tier':<10}{'layers':>7}{'in use':>13}{'budget':>13}   link",
        ]
        if n.weight_format:
            lines.insert(1, f"  layer weights: {n.weight_format}")
        memory = "HBM" if self.compute_device.startswith("cuda") else "RAM"  # what the compute device reads from
        budgets = {RESIDENT: self.budget.gpu_memory, HOST: self.budget.cpu_memory, **self.budget.peer_memory}
        for tier in self.tiers:
            link = f"{memory} {gb_s(self.bandwidth['hbm'])}" if tier == RESIDENT else gb_s(self.bandwidth[tier])
            used = {RESIDENT: self.gpu_bytes, HOST: self.host_ram_bytes}.get(tier) or self.bytes_on(tier)
            lines.append(
                f"  {tier:<10}{len(self.blocks_on(tier)):>7}{format_size(used):>13} "
                f"{format_size(budgets[tier]):>12}   {link}"
            )
        lines.append(
            f"  on {self.compute_device} besides resident layers: non-layer {format_size(n.global_bytes)}"
            + (f", embedding table {format_size(n.embedding_bytes)}" if n.embedding_bytes and not self.embedding_on_host
               else "") + ", "
            f"KV cache {format_size(n.kv_bytes)} ({n.max_batch} x {n.max_seq_len} tokens), "
            f"{self.slot_count} slot(s) {format_size(self.slots_bytes)}"
            f"{' (' + ', '.join(f'{t} {c}' for t, c in self.slots.items()) + ')' if len(self.slots) > 1 else ''}, "
            f"activations {format_size(n.activation_bytes)}"
            + (f" (chunks of {n.step_tokens} tokens)" if n.step_tokens else "")
            + f", rotary tables {format_size(n.rope_bytes)}, "
            f"workspace {format_size(n.workspace_bytes)}"
            + (f", CUDA graphs {format_size(n.graph_bytes)}" if n.graph_bytes else "")
            + (f", dequantize scratch {format_size(n.dequant_bytes)}" if n.dequant_bytes else "")
            + (f", draft {format_size(n.draft_bytes)}" if n.draft_bytes else "")
        )
        if self.experts:
            lines.append(self.experts.summary())
        if self.draft:
            lines.append(f"  draft: {self.draft}")
        if self.embedding_on_host:
            lines.append(f"  embedding table ({format_size(n.embedding_bytes)}) in host RAM: a step copies only "
                         "its tokens' rows")
        lines.append(f"  layers: {self.layer_map()}  (R resident, H host, digit: peer GPU)")
        seconds = self.link_seconds()
        bound = f"compute (the {memory} floor)" if self.bottleneck == "hbm" else f"the {self.bottleneck} link"
        lines.append(
            f"  predicted decode step: {self.predicted_step_seconds * 1e3:.1f} ms, bound by {bound}; "
            f"{memory} floor {seconds['hbm'] * 1e3:.1f} ms"
        )
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def format_plans(plans: list[Plan]) -> str:
    """Every rank's plan, for rank 0 to print (a single plan as is)."""
    if len(plans) == 1:
        return str(plans[0])
    host = sum(p.host_bytes for p in plans)
    head = (f"tensor parallel over {len(plans)} ranks: {format_size(host)} on the host tier in all, "
            f"predicted decode step {max(p.predicted_step_seconds for p in plans) * 1e3:.1f} ms")
    return "\n".join([head, *map(str, plans)])


def make_plan(
    needs: MemoryNeeds,
    budget: Budget,
    bandwidth: dict[str, float],
    compute_device: str,
    slots: int | None = None,
    offload_requested: bool = False,
    indirect_peers: tuple[str, ...] = (),
    title: str = "",
) -> Plan:
    """Place every block, or raise :class:`PlanError` naming the bytes needed and available."""
    n, block, embedding = len(needs.blocks), needs.largest_block, needs.embedding_bytes
    gpu, where = budget.gpu_memory, f"{compute_device}{title}"
    plan = lambda placement, k, on_host=False: Plan(  # noqa: E731
        placement, k, needs, budget, bandwidth, compute_device, title, embedding_on_host=on_host)
    experts = needs.experts
    if needs.fits_whole(gpu):
        result = plan([RESIDENT] * n, {})
        if experts:
            result.experts = ExpertPlan(experts, [RESIDENT] * experts.count, 0, list(experts.per_layer))
        if offload_requested:
            result.warnings.append(f"the whole model fits in the budget of {compute_device}: nothing is offloaded")
        return result

    # Offloading: the embedding table goes to host RAM if it fits there (a step needs only a few rows).
    on_host = 0 < embedding <= budget.cpu_memory and not needs.embedding_stays
    on_gpu = 0 if on_host else embedding
    gpu -= on_gpu
    host = budget.cpu_memory - (embedding if on_host else 0)
    if needs.fixed_bytes > gpu:
        raise PlanError(
            f"the budget of {where} ({format_size(budget.gpu_memory)}) cannot hold what must stay there: "
            f"{_fixed_parts(needs, on_gpu)} = {format_size(needs.fixed_bytes + on_gpu)}; raise --gpu-memory, "
            "or lower --max-batch / --max-seq-len"
        )
    cache = 0
    if experts:  # the expert cache's smallest size stays free for it; the every-pass blocks come first
        cache = experts.cache_slots(needs.max_batch) * experts.nbytes
        gpu -= cache
    k = min(slots or DEFAULT_SLOTS, n)
    kept_bytes = list(accumulate(sorted(needs.blocks, reverse=True)))  # the j + 1 largest blocks' bytes
    link_budget = Budget(gpu, host, budget.peer_memory)
    reserved = k * max(sum(1 for c in _capacity(block, link_budget).values() if c), 1)

    def place(reserved: int) -> Plan:
        """The blocks placed with ``reserved`` slots' room first kept free (refined to what the links' rings
        need), then the routed experts in the room left."""
        for _ in range(4):  # each link's ring needs min(k, its blocks) slots: refine the reservation
            room = gpu - needs.fixed_bytes - reserved * block
            if room < 0:
                cached = f" + the expert cache {format_size(cache)}" if cache else ""
                raise PlanError(
                    f"the budget of {where} ({format_size(budget.gpu_memory)}) cannot hold "
                    f"{_fixed_parts(needs, on_gpu)}{cached} plus {reserved} slot(s) of {format_size(block)} for "
                    f"streamed blocks (= {format_size(needs.fixed_bytes + on_gpu + cache + reserved * block)}); "
                    "raise --gpu-memory"
                )
            resident = bisect_right(kept_bytes, room)  # < n: the model does not fit
            streamed = _share_links(n - resident, block, link_budget, bandwidth)
            if sum(streamed.values()) < n - resident:
                missing = n - resident - sum(streamed.values())
                held = ", ".join(f"{t} {c}" for t, c in {RESIDENT: resident, **streamed}.items())
                raise PlanError(
                    f"the model does not fit{title}: {_layers(needs)}; the budgets hold {held} layers, leaving "
                    f"{missing} layer(s) ({format_size(missing * block)}) with nowhere to go; raise --cpu-memory or "
                    "add --peer-memory"
                )
            ring_slots = {tier: min(k, count) for tier, count in streamed.items()}
            if sum(ring_slots.values()) == reserved:
                break
            reserved = sum(ring_slots.values())
        result = plan(_interleave({RESIDENT: resident, **streamed}), ring_slots, on_host)
        if experts:
            room = {HOST: host - result.bytes_on(HOST),
                    **{p: b - result.bytes_on(p) for p, b in budget.peer_memory.items()}}
            placed = place_experts(experts, budget.gpu_memory - result.gpu_bytes, room, bandwidth, needs.max_batch)
            if isinstance(placed, str):
                raise PlanError(f"the routed experts do not fit{title}: {placed}; raise --gpu-memory / --cpu-memory "
                                "or add --peer-memory")
            result.experts = placed
        return result

    all_fit = gpu - needs.fixed_bytes >= kept_bytes[-1]  # beside the embedding's or the expert cache's room
    # Where every block fits, none streams. With routed experts, the ring's slots may still pay: blocks of different
    # sizes streamed through smaller slots leave the experts more room; the faster prediction of the two is kept.
    result = _fastest(place, [0, reserved] if all_fit and experts else [0 if all_fit else reserved])
    for peer in indirect_peers:
        if result.blocks_on(peer):
            result.warnings.append(
                f"{peer} cannot reach {compute_device} directly (no peer-to-peer access): its copies pass "
                f"through host memory at the measured {bandwidth[peer] / 1e9:.1f} GB/s"
            )
    compute = result.compute_seconds()
    if result.bottleneck != "hbm" and result.predicted_step_seconds > LINK_BOUND_RATIO * compute:
        result.warnings.append(
            f"decode will be bound by the {result.bottleneck} link: {format_seconds(result.predicted_step_seconds)} "
            f"per step, {result.predicted_step_seconds / compute:.0f}x the {format_seconds(compute)} "
            "that compute needs; a larger GPU budget or a peer GPU would help"
        )
    return result


def _fastest(place, reservations: list[int]) -> Plan:
    """The plan that ``place`` makes with each of ``reservations`` (the ring's room kept free first) predicted to
    decode fastest, the first of equals; where none places, the first one's PlanError."""
    plans, errors = [], []
    for reserved in reservations:
        try:
            plans.append(place(reserved))
        except PlanError as error:
            errors.append(error)
    if not plans:
        raise errors[0]
    return min(plans, key=lambda p: p.predicted_step_seconds)


def _capacity(block: int, budget: Budget) -> dict[str, int]:
    """Blocks (each counted as ``block`` bytes) each streaming tier can hold."""
    return {HOST: budget.cpu_memory // block, **{p: b // block for p, b in budget.peer_memory.items()}}


def _share_links(count: int, block: int, budget: Budget, bandwidth: dict[str, float]) -> dict[str, int]:
    """Spread ``count`` streamed blocks over the host and the peers so the links finish together."""
    capacity = _capacity(block, budget)
    taken = {tier: 0 for tier in capacity}
    for _ in range(count):
        open_tiers = [t for t in capacity if taken[t] < capacity[t]]
        if not open_tiers:
            break
        best = min(open_tiers, key=lambda t: ((taken[t] + 1) * block / bandwidth[t], t != HOST))
        taken[best] += 1
    return {t: c for t, c in taken.items() if c}


def _interleave(counts: dict[str, int]) -> list[str]:
    """A sequence with ``counts[k]`` of each kind ``k``, every kind spread evenly over it."""
    keyed = [((j + 0.5) / c, rank, kind) for rank, (kind, c) in enumerate(counts.items()) for j in range(c)]
    return [kind for _, _, kind in sorted(keyed)]


def _layers(needs: MemoryNeeds) -> str:
    """``40 layers x 605 MiB = 23.6 GiB`` (or ``40 layers, 23.6 GiB in all`` when their sizes differ; with the
    routed experts of a mixture of experts after a ``+``)."""
    n, total = len(needs.blocks), format_size(needs.weight_bytes)
    layers = f"{n} layers x {format_size(needs.largest_block)}" if len(set(needs.blocks)) == 1 else f"{n} layers"
    experts = needs.experts
    if experts and not experts.sizes:
        layers += f" + {experts.count} experts x {format_size(experts.nbytes)}"
    elif experts:
        layers += f" + {experts.count} experts of {format_size(min(experts.each))}-{format_size(experts.nbytes)}"
    return f"{layers} = {total}" if " x " in layers else f"{layers}, {total} in all"


def _fixed_parts(needs: MemoryNeeds, embedding: int = 0) -> str:
    parts = (
        f"non-layer tensors {format_size(needs.global_bytes)} + KV cache {format_size(needs.kv_bytes)} "
        f"+ activations {format_size(needs.activation_bytes)} + rotary tables {format_size(needs.rope_bytes)} "
        f"+ workspace {format_size(needs.workspace_bytes)}"
        + (f" + CUDA graphs {format_size(needs.graph_bytes)}" if needs.graph_bytes else "")
        + (f" + dequantize scratch {format_size(needs.dequant_bytes)}" if needs.dequant_bytes else "")
        + (f" + draft {format_size(needs.draft_bytes)}" if needs.draft_bytes else "")
    )
    return parts + (f" + embedding {format_size(embedding)}" if embedding else "")

