"""This process's place in a tensor-parallel group, and the few collectives the runtime uses.

Below both ``memory`` (which probes links with every rank at once) and ``models``
(whose row-parallel layers all-reduce): neither needs the other to know its rank.
A single process is rank 0 of 1, and every collective is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import OffloadError
from .inputs import ascii_int


@dataclass
class TensorParallel:
    """This rank's place in the tensor-parallel group (rank 0 of 1 when not parallel)."""

    rank: int = 0
    size: int = 1
    group: object = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank (in place)."""
        if self.size > 1:
            dist.broadcast(x, src=dist.get_global_rank(self.group, 0), group=self.group)
        return x

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (what the others pass is ignored)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj``, in rank order (``[obj]`` when not parallel)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)


def init_tensor_parallel(tp: int, device: torch.device | None = None) -> TensorParallel:
    """Join (or start) the process group of a ``torchrun`` launch and return this rank's place in it.

    NCCL on GPUs, gloo where the ranks compute on the CPU (``device="cpu"``, or no CUDA). ``tp`` must equal the
    world size.
    """
    if tp == 1 and not dist.is_initialized():
        return TensorParallel()
    if not dist.is_initialized():
        _check_launch_environment(tp)
        on_gpus = torch.cuda.is_available() and (device is None or device.type == "cuda")
        if on_gpus and (device is None or device.index is None):  # "cuda": this rank's own
            torch.cuda.set_device(local_gpu())
        dist.init_process_group("nccl" if on_gpus else "gloo")
    world = dist.get_world_size()
    if world != tp:
        raise OffloadError(f"tp={tp} but the process group has {world} processes; they must be equal")
    return TensorParallel(rank=dist.get_rank(), size=world, group=dist.group.WORLD)


def local_gpu() -> int:
    """This rank's GPU: its ``LOCAL_RANK`` (``RANK`` where that is not set: one host). NCCL refuses two ranks on one
    GPU, so a host needs a GPU per rank."""
    local, count = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0))), torch.cuda.device_count()
    if local >= count:
        raise OffloadError(f"rank {local} of this host has no GPU of its own (the host has {count}): launch at most "
                           f"{count} ranks a host, or give device='cpu' (--device cpu) to compute on the CPU")
    return local


def _check_launch_environment(tp: int) -> None:
    """The variables torchrun sets, present and sensible: a half-set environment fails here, not in a hang."""
    env = os.environ
    missing = [v for v in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT") if v not in env]
    if missing:
        raise OffloadError(f"tp={tp} needs one process per rank: launch with "
                           f"'torchrun --nproc-per-node {tp} ...' ({', '.join(missing)} not set)")
    numbers = {}
    for name in ("WORLD_SIZE", "RANK", "MASTER_PORT", "LOCAL_RANK"):
        if name in env:
            try:
                numbers[name] = ascii_int(env[name])
            except ValueError:
                raise OffloadError(f"{name}={env[name]!r} is not an integer; launch with torchrun") from None
    if not 0 <= numbers["RANK"] < numbers["WORLD_SIZE"]:
        raise OffloadError(f"RANK={numbers['RANK']} is outside WORLD_SIZE={numbers['WORLD_SIZE']}; "
                           "launch with torchrun")
    if numbers["WORLD_SIZE"] != tp:
        raise OffloadError(f"tp={tp} but WORLD_SIZE={numbers['WORLD_SIZE']}; they must be equal")
    if not 0 < numbers["MASTER_PORT"] < 65536:
        raise OffloadError(f"MASTER_PORT={numbers['MASTER_PORT']} is not a port number")
    if numbers.get("LOCAL_RANK", 0) < 0:
        raise OffloadError(f"LOCAL_RANK={numbers['LOCAL_RANK']} is negative")
