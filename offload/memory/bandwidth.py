"""Link bandwidths into the compute device, and its matrix rate, measured once per machine and cached.

The planner needs three kinds of link figure, in bytes per second: ``"host"``
(pinned host memory to the GPU), one per peer GPU (its HBM to ours, over NVLink
when the two can address each other), and ``"hbm"`` (a device-to-device copy,
read plus write, which bounds a decode step that reads every weight once); and
``"matmul"``, floating-point operations per second of a large matrix product
(bfloat16 on a GPU, float32 on a CPU), which bounds a pass over many tokens; and on a
GPU with offload's kernels, ``"gemv-bf16"``, ``"gemv-int8"`` and ``"gemv-int4"``: the
bytes per second a one-row product reads from a weight stored so (a decode step's
products over resident layers take their bytes over these rates), the same of 16 rows
(``"rows16-<format>"``), ``"kernels"``:
small kernels per second (each of a decode layer's kernels, its products too, takes
at least a small one's time), and ``"attention"``: the bytes per second a decode
step's attention reads from the KV cache, all timed as CUDA graphs replay them.
Under tensor parallelism every rank probes the host link at the same moment, so
the figure is each rank's share of a host link that all of them pull from at once.
"""

from __future__ import annotations

import functools
import json
import os
import time
import warnings
from pathlib import Path

import torch

from ..distributed import TensorParallel
from ..errors import OffloadWarning
from ..options import cache_dir
from .host import PinnedMemory

PROBE_BYTES = 256 * 2**20
CACHE_VERSION = 8  # 2: products timed in CUDA graphs over a 7b layer's shapes, and small kernels per second;
# 3: the products of 16 rows too; 4: int4's products of 16 rows on the tensor cores; 5: kernels launched as
# dependents of the one before them (``kernels.PDL``); 6: int4's GEMV in integers (``quant_kernels.INT_GEMV``);
# 7: int8's GEMV in integers too, the integer GEMV's fewer stretches (``quant_kernels.INT_PROGRAMS``), "attention";
# 8: the products of 16 rows timed as a decode layer runs them (its norms, gate and residual adds)
# The environment's switches of the kernels a product runs (read at import by ``models.quant_kernels`` and
# ``models.kernels``): a product's rate is cached apart for each setting of them, so that timing a kernel against
# another never leaves a plan priced by the wrong one.
KERNEL_SWITCHES = ("OFFLOAD_WORD_GEMV", "OFFLOAD_DOT_GEMV", "OFFLOAD_DOT_PTX", "OFFLOAD_LAST_SUMS",
                   "OFFLOAD_PDL", "OFFLOAD_INT_GEMV")


def cache_path() -> Path:
    return cache_dir() / "links.json"


def cache_keys(gpu: str, device, names: list[str], ranks: int) -> dict[str, str]:
    """Each measured rate's key in the cache: the GPU's name, the device, the rate, the ranks and
    ``CACHE_VERSION``; a product's rate also the ``KERNEL_SWITCHES`` set in the environment."""
    switches = "".join(f"/{k}={os.environ[k]}" for k in KERNEL_SWITCHES if k in os.environ)
    return {name: f"{gpu}/{device}<-{name}/ranks={ranks}/v{CACHE_VERSION}" + (switches if name in PRODUCTS else "")
            for name in names}


def link_bandwidths(compute_device, peers: list[str], tp: TensorParallel, max_probe_bytes: int,
                    max_pinned_bytes: int | None = None) -> dict[str, float]:
    """Bytes/s of each link into ``compute_device`` ("host", "hbm", every peer) and its "matmul" FLOP/s,
    from the cache or measured. The probes take at most ``max_probe_bytes`` of the device's memory, and at most
    ``max_pinned_bytes`` of pinned host memory (the host budget: under a full probe's, the host link is timed
    from pageable memory, a figure not cached, or an earlier full probe's figure is taken)."""
    device = torch.device(compute_device)
    names = ["host", "hbm", "matmul", *peers] + (list(PRODUCTS) if device.type == "cuda" else [])
    if device.type != "cuda":  # every "link" is a memcpy in RAM: quick to measure, not worth a file
        bandwidth, matmul = _cpu_rates()
        return {**{name: bandwidth for name in names}, "matmul": matmul}
    gpu = torch.cuda.get_device_name(device).replace(" ", "_")
    key = cache_keys(gpu, device, names, tp.size)
    cached = _read_cache()
    found = {name: cached[key[name]] for name in names if key[name] in cached}
    if all(tp.gather_objects(len(found) == len(names))):
        return found
    size = max(min(PROBE_BYTES, max_probe_bytes) // 2**20, 1) * 2**20
    short = max_pinned_bytes is not None and max_pinned_bytes < size  # the host budget is under the probe's
    tp.barrier()  # every rank pulls from the host at once, as it will when decoding: long enough to overlap
    if short and "host" in found:
        measured = {"host": found["host"]}
    else:
        measured = {"host": measure_host(device, size, repeats=5 if tp.size == 1 else 40, pinned=not short)}
    tp.barrier()
    measured["hbm"] = measure_device_copy(device, size)
    measured["matmul"] = measure_matmul(device)
    # The decode-cost probes: 0 where they could not run (no working kernels, or a failure), kept so, and never
    # probed again, so a load does not measure every link again each time.
    measured.update({name: 0.0 for name in GEMV_FORMATS + ROWS16_FORMATS} | _optional(measure_gemv, device, {}))
    measured["kernels"] = _optional(measure_small_kernels, device, 0.0)
    measured["attention"] = _optional(measure_attention, device, 0.0)
    for peer in peers:
        measured[peer] = measure_peer(device, torch.device(peer), size)
    _write_cache({**cached, **{key[n]: v for n, v in measured.items() if not (short and n == "host")}})
    return measured


@functools.cache
def _cpu_rates() -> tuple[float, float]:
    """The CPU's copy and matrix rates, measured once per process: every plan of a process (a printed plan and
    the load that follows it, the batch sizes ``--batch-size auto`` weighs) sees the same figures, though they
    vary by half from one measurement to the next."""
    return measure_cpu_copy(), measure_matmul(torch.device("cpu"))


def _optional(probe, device, default):
    """A probe that only the plan's predictions need: its failure costs a prediction, never a load."""
    try:
        return probe(device)
    except Exception as e:  # noqa: BLE001 (a kernel that does not compile or capture on this GPU)
        warnings.warn(f"{probe.__name__} failed ({type(e).__name__}: {e}); the plan predicts decode without it",
                      OffloadWarning, stacklevel=3)
        return default


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


def measure_host(device, size: int, repeats: int = 5, pinned: bool = True) -> float:
    host = PinnedMemory(size, pin=pinned)
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
    else:  # the best of a few: one product's time on a busy machine swung the plans' forecasts 10x
        seconds = max(min(_seconds(lambda: a @ b) for _ in range(5)), 1e-6)
    return 2 * n**3 / seconds


def _seconds(run) -> float:
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


GEMV_FORMATS = ("gemv-bf16", "gemv-int8", "gemv-int4")
ROWS16_FORMATS = ("rows16-bf16", "rows16-int8", "rows16-int4")  # the same products of 16 rows
PRODUCTS = (*GEMV_FORMATS, *ROWS16_FORMATS, "kernels", "attention")  # rates of offload's kernels on a GPU
RATES = ("host", "hbm", "matmul", *PRODUCTS)  # every rate by name but the peers' (named by their devices)
GEMV_SHAPES = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))  # a llama-2-7b layer's four products
SMALL_KERNELS = 256  # replayed per timing of "kernels"


def measure_gemv(device) -> dict[str, float]:
    """Bytes/s of the products of a llama-2-7b-shaped layer in bfloat16, int8 and int4 (groups of 128), of one
    row ("gemv-<format>") and of 16 ("rows16-<format>": other kernels, slower per byte), with offload's kernels
    replayed from a CUDA graph as a decode step runs them (timed eagerly, the host's launches would be measured
    instead); empty without working kernels. Both are timed as a decode layer runs its products (``_run_layer``):
    with the norms of qkv's and gate_up's inputs, the gate and the residual adds, fused into the products where a
    decode step fuses them (one row's), in kernels of their own where it does not (16 rows' gate, on an H100 in
    2026-12: products timed alone priced llama-2-7b's int4 step at 16 rows 12% short)."""
    from ..models import kernels, ops
    from ..models.quant import FUSED, QuantizedWeight, QuantScheme, quantize

    if not kernels.works(device):
        return {}
    chosen = ops.choose(device, torch.bfloat16)  # what a decode step's products run
    norm = kernels.Norm(torch.ones(GEMV_SHAPES[0][1], device=device, dtype=torch.bfloat16), 1e-5)
    rates = {}
    for fmt, group, copies in ((None, None, 1), ("int8", None, 2), ("int4", 128, 2)):  # copies: beyond the L2
        layers, nbytes = [], 0
        for _ in range(copies):
            layer = []
            for rows, cols in GEMV_SHAPES:
                w = torch.randn(rows, cols, device=device, dtype=torch.bfloat16) / cols**0.5
                if fmt is not None:
                    scheme = QuantScheme(fmt, group, rows, FUSED, rounding="minmax")
                    parts = quantize(w, scheme, torch.bfloat16)
                    w = QuantizedWeight(parts["data"], parts["scale"], parts.get("minimum"), scheme)
                nbytes += sum(t.numel() * t.element_size() for t in ([w] if fmt is None else parts.values()))
                layer.append(w)
            layers.append(layer)
        for name, rows in ((f"gemv-{fmt or 'bf16'}", 1), (f"rows16-{fmt or 'bf16'}", 16)):
            x, attended = (torch.randn(rows, GEMV_SHAPES[1][1], device=device, dtype=torch.bfloat16) / 8
                           for _ in range(2))
            work = functools.partial(_run_layer, chosen, norm, layers, x, attended)
            rates[name] = _optional(_rate_probe(name, nbytes, work), device, 0.0)  # a failure loses this rate alone
    return rates


def _run_layer(ops, norm, layers: list, x: torch.Tensor, attended: torch.Tensor) -> list:
    """Each copy of a llama layer's four products as a decode step of one row runs them (``models.llama``): qkv
    and gate_up normalize their inputs, o and down add the residual, down gates its input (``attended`` stands
    for the attention's output)."""
    out = []
    for wqkv, wo, w_gate_up, w_down in layers:
        out.append(ops.normed_linear(x, norm, wqkv))
        h = ops.linear(attended, wo, None, x)
        out.append(ops.gated_linear(ops.normed_linear(h, norm, w_gate_up), "silu", w_down, h))
    return out


def _rate_probe(name: str, nbytes: int, work):
    """A probe of ``name``'s rate: ``nbytes`` read by ``work`` replayed from a CUDA graph."""
    def probe(device) -> float:
        return nbytes / graph_seconds(device, work)

    probe.__name__ = f"measure_gemv ({name})"
    return probe


def measure_small_kernels(device) -> float:
    """Small kernels per second replayed from a CUDA graph (one row's RMS norm, 4096 wide): the least time each of
    a decode layer's kernels takes, however few bytes it touches."""
    from ..models import kernels

    if not kernels.works(device):
        return 0.0
    x = torch.randn(1, 4096, device=device, dtype=torch.bfloat16)
    weight = torch.ones(4096, device=device, dtype=torch.bfloat16)
    return SMALL_KERNELS / graph_seconds(device, lambda: [kernels.rms_norm(x, weight, 1e-5)
                                                          for _ in range(SMALL_KERNELS)])


ATTENTION_SHAPE = (16, 32, 256, 128)  # rows, kv heads, keys a row, head size: llama-2-7b's at batch 16


def measure_attention(device) -> float:
    """Bytes/s of keys and values that a decode step's attention reads (``ATTENTION_SHAPE``, one query a kv head,
    bfloat16) replayed from a CUDA graph. At a few hundred keys a row it reads well below the HBM's rate: on an
    H100 (2026-12-06), llama-2-7b's attention at batch 16 over 161 keys a row took 26 us a layer for 21 MB."""
    from ..models import kernels

    if not kernels.works(device):
        return 0.0
    rows, kv_heads, length, hd = ATTENTION_SHAPE
    q = torch.randn(rows, kv_heads, 1, hd, device=device, dtype=torch.bfloat16)
    keys, values = (torch.randn(rows, kv_heads, length, hd, device=device, dtype=torch.bfloat16) for _ in range(2))
    allowed = torch.ones(rows, 1, 1, length, device=device, dtype=torch.bool)
    seconds = graph_seconds(device, lambda: kernels.decode_attention(q, keys, values, allowed, hd**-0.5))
    return 2 * keys.numel() * keys.element_size() / seconds


def graph_seconds(device, work, repeats: int = 5) -> float:
    """Seconds per run of ``work`` (GPU kernels) captured in a CUDA graph, replayed ``repeats`` times."""
    work()  # compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device), torch.cuda.graph(graph):
        work()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.device(device):
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def measure_cpu_copy(size: int = 64 * 2**20) -> float:
    src, dst = torch.ones(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
    dst.copy_(src)
    return size / max(min(_seconds(lambda: dst.copy_(src)) for _ in range(3)), 1e-6)


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
