"""The peer-memory pool: one buffer of bytes per tier, holding the blocks the plan put there.

Each tier is one allocation (a ``torch.empty`` on the compute device or a peer
GPU, one :class:`PinnedMemory` on the host), cut into the blocks the plan put
there, back to back, so the bytes held per tier are exactly what the plan says.
The slots that streamed blocks are copied into are one more buffer per link on the
compute device. Buffers are raw bytes: a block's layout says which tensors (of
which dtypes) it holds.
"""

from __future__ import annotations

import torch

from .host import PinnedMemory
from .planner import HOST, RESIDENT, Plan


class WeightPool:
    def __init__(self, plan: Plan, global_bytes: int, embedding_bytes: int, compute_device):
        compute = torch.device(compute_device)
        on_gpu = compute.type == "cuda"
        bytes_on = lambda n, device: torch.empty(n, dtype=torch.uint8, device=device)  # noqa: E731
        self.globals = bytes_on(global_bytes, compute)
        # Lookups read a few rows: pageable host memory serves them as well as pinned would.
        self.embedding = bytes_on(embedding_bytes, "cpu" if plan.embedding_on_host else compute)
        self.host: PinnedMemory | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        for tier in plan.tiers:
            nbytes = plan.bytes_on(tier)
            if nbytes == 0:
                continue
            if tier == HOST:
                self.host = PinnedMemory(nbytes, pin=on_gpu)
                self.buffers[tier] = self.host.tensor
            else:
                device = compute if tier == RESIDENT or not on_gpu else torch.device(tier)
                self.buffers[tier] = bytes_on(nbytes, device)
        # Each streaming link fills its own ring of slots on the compute device, each slot as large as its largest block.
        self.slots = {tier: bytes_on(count * plan.slot_bytes(tier), compute).view(count, plan.slot_bytes(tier))
                      for tier, count in plan.slots.items()}
        # The device's cache of routed experts (mixture-of-experts models): slots of the largest expert's size.
        experts = plan.needs.experts
        self.expert_slots = bytes_on(plan.experts.cache_bytes if plan.experts else 0, compute).view(
            plan.experts.cache_slots if plan.experts else 0, experts.nbytes if experts else 0)
        # Block i is the next unused piece of its tier's buffer (every layer's block, then every routed expert's).
        sizes = list(plan.needs.blocks) + (experts.each if experts else [])
        used = {tier: 0 for tier in self.buffers}
        self.blocks: list[torch.Tensor] = []
        for tier, nbytes in zip(plan.block_tiers, sizes):
            self.blocks.append(self.buffers[tier][used[tier] : used[tier] + nbytes])
            used[tier] += nbytes

    @property
    def pinned_bytes(self) -> int:
        return self.host.pinned_bytes if self.host is not None else 0

    def close(self) -> None:
        if self.host is not None:
            self.host.close()
        self.buffers.clear()
        self.blocks.clear()
