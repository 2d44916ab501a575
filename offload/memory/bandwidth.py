"""Link bandwidths into the compute device, and its matrix rate, measured once per machine and cached.

The planner needs three kinds of link figure, in bytes per second: ``"host"``
(pinned host memory to the GPU), one per peer GPU (its HBM to ours, over NVLink
when the two can address each other), and ``"hbm"`` (a device-to-device copy,
read plus write, which bounds a decode step that reads every weight once); and
``"matmul"``, floating-point operations per second of a large matrix product
(bfloat16 on a GPU, float32 on a CPU), which bounds a pass over many tokens; and on a
GPU with offload's kernels, ``"gemv-bf16"``, ``"gemv-int8"`` and ``"gemv-int4"``: the
bytes per second a one-row product reads from a weight stored so (a decode step's
products over resident layers take their bytes over these rates).
Under tensor parallelism every rank probes the host link at the same moment, so
the figure is each rank's share of a host link that all of them pull from at once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..distributed import TensorParallel
from ..options import cache_dir
from .host import PinnedMemory

PROBE_BYTES = 256 * 2**20


def cache_path() -> Path:
    return cache_dir() / "links.json"


def link_bandwidths(compute_device, peers: list[str], tp: TensorParallel, max_probe_bytes: int) -> dict[str, float]:
    """Bytes/s of each link into ``compute_device`` ("host", "hbm", every peer) and its "matmul" FLOP/s,
    from the cache or measured."""
    device = torch.device(compute_device)
    names = ["host", "hbm", "matmul", *peers] + (list(GEMV_FORMATS) if device.type == "cuda" else [])
    if device.type != "cuda":  # every "link" is a memcpy in RAM: quick to measure, not worth caching
        bandwidth = measure_cpu_copy()
        return {**{name: bandwidth for name in names}, "matmul": measure_matmul(device)}
    gpu = torch.cuda.get_device_name(device).replace(" ", "_")
    key = {name: f"{gpu}/{device}<-{name}/ranks={tp.size}" for name in names}
    cached = _read_cache()
    found = {name: cached[key[name]] for name in names if key[name] in cached}
    if all(tp.gather_objects(len(found) == len(names))):
        return found
    size = max(min(PROBE_BYTES, max_probe_bytes) // 2**20, 1) * 2**20
    tp.barrier()  # every rank pulls from the host at once, as it will when decoding: long enough to overlap
    measured = {"host": measure_host(device, size, repeats=5 if tp.size == 1 else 40)}
    tp.barrier()
    measured["hbm"] = measure_device_copy(device, size)
    measured["matmul"] = measure_matmul(device)
    measured.update(measure_gemv(device))
    for peer in peers:
        measured[peer] = measure_peer(device, torch.device(peer), size)
    _write_cache({**cached, **{key[n]: v for n, v in measured.items()}})
    return measured


def peer_is_direct(compute_device, peer: str) -> bool:
    """Whether the two GPUs can copy to each other directly (NVLink or PCIe peer-to-peer)."""
    a, b = torch.device(compute_device), torch.device(peer)
    if a.type != "cuda" or b.type != "cuda":
        return True
    return torch.cuda.can_device_access_peer(a, b)


def _time_copies(device, dst: torch.Tensor, src: torch.Tensor, repeats: int = 5) -> float:
    """Seconds per ``dst.copy_(src)``, timed with CUDA events after one warm-up copy."""
    dst.copy_(src, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.device(device):
        start.record()
        for _ in range(repeats):
            dst.copy_(src, non_blocking=True)
        end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def measure_host(device, size: int, repeats: int = 5) -> float:
    host = PinnedMemory(size)
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    try:
        return size / _time_copies(device, dst, host.tensor, repeats)
    finally:
        del dst
        host.close()


def measure_device_copy(device, size: int) -> float:
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / _time_copies(device, dst, src)


def measure_peer(device, peer, size: int) -> float:
    src = torch.ones(size, dtype=torch.uint8, device=peer)
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    return size / _time_copies(device, dst, src)


def measure_matmul(device) -> float:
    """FLOP/s of a square matrix product: 4096 wide in bfloat16 on a GPU, 256 wide in float32 on a CPU."""
    device = torch.device(device)
    n, dtype = (4096, torch.bfloat16) if device.type == "cuda" else (256, torch.float32)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            a @ b
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000 / 5
    else:
        t = time.perf_counter()
        a @ b
        seconds = max(time.perf_counter() - t, 1e-6)
    return 2 * n**3 / seconds


GEMV_FORMATS = ("gemv-bf16", "gemv-int8", "gemv-int4")


def measure_gemv(device) -> dict[str, float]:
    """Bytes/s of a one-row product from a 8192 x 8192 weight in bfloat16, int8 and int4 (groups of 128), with
    offload's kernels, weights cycled through copies so none is read from L2; empty without working kernels."""
    from ..models import kernels, quant_kernels
    from ..models.quant import FUSED, QuantizedWeight, QuantScheme, quantize

    if not kernels.works(device):
        return {}
    n = 8192
    dense = torch.randn(n, n, device=device, dtype=torch.bfloat16) / n**0.5
    x = torch.randn(1, n, device=device, dtype=torch.bfloat16)
    rates = {}
    for name, scheme in (("gemv-bf16", None), ("gemv-int8", QuantScheme("int8", None, n, FUSED)),
                         ("gemv-int4", QuantScheme("int4", 128, n, FUSED, rounding="minmax"))):
        if scheme is None:
            weights, product = [dense.clone() for _ in range(4)], kernels.gemv
        else:
            parts = quantize(dense, scheme, torch.bfloat16)
            weights = [QuantizedWeight(parts["data"].clone(), parts["scale"].clone(),
                                       None if "minimum" not in parts else parts["minimum"].clone(), scheme)
                       for _ in range(4)]
            product = quant_kernels.linear
        nbytes = sum(t.numel() * t.element_size() for t in ([weights[0]] if scheme is None else
                                                             [p for p in parts.values()]))
        for w in weights:  # warm-up: compiles the kernels
            product(x, w)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            for w in weights:
                product(x, w)
        end.record()
        end.synchronize()
        rates[name] = nbytes / (start.elapsed_time(end) / 1000 / 20)
    return rates


def measure_cpu_copy(size: int = 64 * 2**20) -> float:
    src, dst = torch.ones(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
    dst.copy_(src)
    t = time.perf_counter()
    dst.copy_(src)
    return size / max(time.perf_counter() - t, 1e-6)


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(entries: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a probe next time
