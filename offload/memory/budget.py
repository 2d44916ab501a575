"""Memory budgets: how many bytes the user allows on each tier.

Sizes are written ``"20GiB"``, ``"500MB"``, ``"0"`` or as a plain number of bytes.
A whole budget can also be given as accelerate's ``max_memory`` dict:
``{0: "20GiB", "cuda:1": "40GiB", "cpu": "100GiB"}``, where the compute device's
entry is its budget, other GPUs are peers and ``"cpu"`` is pinned host memory.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import Decimal

import psutil
import torch

from ..errors import BudgetError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$", re.ASCII)  # \d: not "４" (Decimal reads it)

MAX_SIZE = 2**64  # 16 EiB: more than any machine has, and beyond what byte counts are kept in

# Left free when a budget is not given: the CUDA context, the allocator's slack, other programs.
GPU_HEADROOM = 2 * 2**30
HOST_HEADROOM_FRACTION = 0.2


def parse_size(value: str | int | float, what: str = "size") -> int:
    """Bytes in ``value``: ``"20GiB"`` (binary), ``"500MB"`` (decimal), ``"0"``, or an integer."""
    if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        raise BudgetError(f"{what}: expected a size such as '20GiB', got {value!r}")
    if isinstance(value, (int, float)):
        number = value
    else:
        match = _SIZE.match(str(value))
        unit = match and match.group(2).lower()
        if not match or unit not in _UNITS:
            raise BudgetError(
                f"{what}: cannot parse {value!r} as a size; write e.g. '20GiB', '500MB', '0' or a number of bytes"
            )
        number = Decimal(match.group(1)) * _UNITS[unit]  # exact, however many digits
    if number < 0:
        raise BudgetError(f"{what}: a size cannot be negative ({value})")
    if number >= MAX_SIZE:
        shown = value if len(str(value)) <= 24 else f"{str(value)[:20]}... ({len(str(value))} characters)"
        raise BudgetError(f"{what}: {shown} is more bytes than any machine has")
    return int(number)


def format_seconds(s: float) -> str:
    """A duration as people read it: "1.3 s", "25 ms", "0.42 ms"."""
    if s >= 1:
        return f"{s:.1f} s"
    return f"{s * 1e3:.0f} ms" if s >= 0.01 else f"{s * 1e3:.2f} ms"


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class Budget:
    """Bytes allowed per tier. ``None`` means "what is free now, less headroom"."""

    gpu_memory: int | None = None  # the compute device (the CPU itself when there is no GPU)
    cpu_memory: int | None = None  # pinned host memory for streamed layers
    peer_memory: dict[str, int] = field(default_factory=dict)  # other GPUs' HBM, by device name

    @classmethod
    def parse(cls, gpu_memory=None, cpu_memory=None, peer_memory=None, compute_device="cpu") -> "Budget":
        """Budget from the user's values; ``gpu_memory`` may be a whole accelerate-style ``max_memory`` dict."""
        if isinstance(gpu_memory, dict):
            if cpu_memory is not None or peer_memory:
                raise BudgetError("give either a max_memory dict or separate gpu/cpu/peer budgets, not both")
            return cls.from_max_memory(gpu_memory, compute_device)
        peers = {}
        for name, size in _peer_items(peer_memory):
            peers[_device_name(name)] = parse_size(size, f"peer memory of {name}")
        return cls(
            gpu_memory=None if gpu_memory is None else parse_size(gpu_memory, "gpu memory"),
            cpu_memory=None if cpu_memory is None else parse_size(cpu_memory, "cpu memory"),
            peer_memory=peers,
        )

    @classmethod
    def from_max_memory(cls, max_memory: dict, compute_device) -> "Budget":
        compute = str(torch.device(compute_device))
        budget = cls()
        for key, size in max_memory.items():
            name = _device_name(key)
            if name == "cpu" and compute != "cpu":
                budget.cpu_memory = parse_size(size, "max_memory['cpu']")
            elif name == compute:
                budget.gpu_memory = parse_size(size, f"max_memory[{key!r}]")
            elif name == "cpu":  # no GPU: "cpu" is the compute device's budget
                budget.gpu_memory = parse_size(size, "max_memory['cpu']")
            else:
                budget.peer_memory[name] = parse_size(size, f"max_memory[{key!r}]")
        return budget

    def resolved(self, compute_device) -> "Budget":
        """A copy with every unset budget filled from the memory free now."""
        device = torch.device(compute_device)
        gpu, cpu = self.gpu_memory, self.cpu_memory
        host_free = int(psutil.virtual_memory().available * (1 - HOST_HEADROOM_FRACTION))
        if gpu is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                gpu = max(free - GPU_HEADROOM, 0)
            else:
                gpu = host_free
        if cpu is None:
            cpu = host_free if device.type == "cuda" else 0
        return Budget(gpu, cpu, dict(self.peer_memory))


def beyond_machine(budget: Budget, compute_device) -> list[str]:
    """Warnings for budgets larger than this machine's memory: a plan for another machine may say so, but a load
    fails once it takes more than there is."""
    device, ram = torch.device(compute_device), psutil.virtual_memory().total
    found = [("the host budget (--cpu-memory)", budget.cpu_memory, ram, "RAM")]
    if device.type == "cuda":
        found.append(("the GPU budget (--gpu-memory)", budget.gpu_memory,
                      torch.cuda.get_device_properties(device).total_memory, f"{device}'s memory"))
    else:
        found.append(("the budget of the CPU (--gpu-memory)", budget.gpu_memory, ram, "RAM"))
    return [f"{what} of {format_size(size)} is more than this machine's {format_size(total)} of {memory}: a load "
            "fails once it takes more than there is" for what, size, total, memory in found if size and size > total]


def parse_peer_flag(text: str) -> tuple[str, int]:
    """``"cuda:1=40GiB"`` (the form of ``--peer-memory``) to ``("cuda:1", bytes)``."""
    name, sep, size = text.partition("=")
    if not sep or not name.strip():
        raise BudgetError(f"--peer-memory expects DEVICE=SIZE such as cuda:1=40GiB, got {text!r}")
    return _device_name(name.strip()), parse_size(size, f"peer memory of {name.strip()}")


def _peer_items(peer_memory) -> list:
    """(device, size) pairs from a dict, one "DEVICE=SIZE" string, or a list of such strings or pairs."""
    if not peer_memory:
        return []
    if isinstance(peer_memory, dict):
        return list(peer_memory.items())
    if isinstance(peer_memory, str):
        return [parse_peer_flag(peer_memory)]
    if isinstance(peer_memory, (list, tuple)):
        return [_peer_item(p) for p in peer_memory]
    raise BudgetError(f"peer memory: expected {{'cuda:1': '40GiB'}} or ['cuda:1=40GiB'], got {peer_memory!r}")


def _peer_item(item) -> tuple:
    if isinstance(item, str):
        return parse_peer_flag(item)
    if isinstance(item, (list, tuple)) and len(item) == 2:
        return tuple(item)
    raise BudgetError(f"peer memory: expected 'cuda:1=40GiB' or ('cuda:1', size), got {item!r}")


def _device_name(key) -> str:
    """``0`` / ``"0"`` / ``"cuda:0"`` / ``"cpu"`` to a canonical device name."""
    if isinstance(key, bool) or (isinstance(key, int) and key < 0):
        raise BudgetError(f"unknown device {key!r} in a memory budget; use e.g. 0, 'cuda:1' or 'cpu'")
    if isinstance(key, int) or (isinstance(key, str) and key.isascii() and key.isdigit()):
        return f"cuda:{int(key)}"
    try:
        device = torch.device(key)
    except (RuntimeError, TypeError):
        raise BudgetError(f"unknown device {key!r} in a memory budget; use e.g. 0, 'cuda:1' or 'cpu'") from None
    if device.type == "cuda" and device.index is None:
        return "cuda:0"
    return str(device)
