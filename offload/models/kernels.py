"""Triton kernels for the operations of a decode step: one-row products, RMS norm, attention of one query,
and the small work between them.

A decode step reads every weight once and does little else, so its time should be the
time to read the weights from HBM. What kept it from that, and what each kernel does
instead (the measurements are in docs/benchmarks.md):

* **One-row products** (``gemv``): one program per output feature walks its weight row
  in 16-byte loads per thread, accumulating in float32. cuBLAS reads some of a decode
  step's shapes well below the device-copy bandwidth. A gated MLP's last product gates
  ``[gate | up]`` as it reads it and adds the residual to its output (``gate``,
  ``residual``: three kernels in one, where ``GATING_WORK`` says gating pays); a layer's
  first products RMS-normalize their input themselves (``norm``, where ``NORMING_WORK``
  says the programs' reads of the whole row are cheap: a small model's).
* **RMS norm** (``rms_norm``, ``add_rms_norm``): one program per row, the residual add
  before it fused in; PyTorch spends eight kernels on a norm.
* **Attention of one query per row** (``decode_attention``): flash decoding. The keys
  are cut into splits that run in parallel (enough programs to fill the GPU), each keeps
  a running softmax, and the last of a head's programs to finish merges the splits
  (``tile_counters``; a second kernel where ``LAST_SUMS`` is off). A decode step's
  (``decode_self_attention``) first rotates q and k and writes k and v into the cache.
* **The small work between them**: the rotary embedding of q and k with the cache write
  of k and v (``rope_and_store``: thirteen PyTorch kernels; a verify pass's W tokens a
  row), the gate of a gated MLP (``gated``: SiLU or tanh-approximated GELU, times up).
* **A draft's likeliest tokens** (``likeliest``): each row's argmax, its few likeliest tokens and
  their probabilities, in two kernels where PyTorch's argmax, topk and logsumexp take about forty
  (a greedy chain's step, ``scheduler/greedy_chain.py``).

Every blocking is fixed (no timing: two models, in one process or in two, compute the
same bits), and ``torch.compile`` sees each kernel as one opaque call.

Which models use them is decided once per model (``ops.choose``: 16 bits on a CUDA
device where ``works``); each ``*_takes`` predicate here says whether a kernel takes
tensors of a given shape and layout, and where it does not, the PyTorch operation runs.
Triton compiles the kernels when first called, which needs a C compiler; ``works``
tries that once per process, so a broken toolchain costs a warning and PyTorch's
kernels rather than a failed step.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

from .. import switches
from ..errors import OffloadWarning

try:  # Triton ships with CUDA builds of torch; CPU builds have none and never need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
try:  # grid dependency control (Triton 3.4 on): programmatic dependent launch
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the install
    gdc_wait = gdc_launch_dependents = None

DTYPES = (torch.bfloat16, torch.float16)
# GEMV: columns per loop step and warps per program, 8 columns (16 bytes) per thread and step. The best
# blocking, or within 3% of it, for every product of four models' shapes (benchmarks/bench_gemv.py --sweep).
BLOCK_K, WARPS = 1024, 4
# Attention: keys per loop step, and the programs to aim for (about two per SM of an H100 or H200).
BLOCK_KEYS, TARGET_PROGRAMS = 64, 256
ELEMENTWISE_BLOCK = 1024
# A GEMV gates its input itself (a gated MLP's last product) where its programs across the features times the
# input's columns (each such program gates the whole input) are at most this many. On an H200 (2026-12-06), in
# a decode step: SmolLM2-135M's shape (576 x 1536, 0.9M) 6% faster, llama-2-7b's (4096 x 11008, 45M) 14% slower
# in bfloat16; llama-2-7b's in int4 (tiles of 128 features: 0.35M) the same.
GATING_WORK = 1 << 22
# A GEMV normalizes its input itself (RMS norm: the layer's first product and the MLP's first) where its programs
# times the input's columns are at most this many: each program reads the whole row for its norm, 2 bytes a column
# of L2 traffic, and 4 MB of it costs about what the norm's own kernel (1.2-1.5 us) does.
NORMING_WORK = 1 << 21
NORM_COLUMNS = 16384  # the most columns a GEMV normalizes (one block of the row in registers)
ACTIVATIONS = ("silu", "gelu_tanh")  # a gated MLP's: act(gate) * up
# Work split across programs (flash decoding's keys, a compressed product's columns) is put together by the last of
# a tile's programs to finish, counted per tile (``tile_counters``), rather than by a second kernel (a small kernel's
# 1.6 us in a CUDA graph): the same arithmetic, one kernel. On an H100 (2026-12-05, llama-2-7b resident, graphs)
# int4 decoded 3.02 -> 2.86 ms a step at batch 1 and 4.93 -> 4.80 at 16, int8 and bf16 the same within 1%.
# OFFLOAD_LAST_SUMS=0 (read at import) puts the second kernels back.
LAST_SUMS = switches.choice("OFFLOAD_LAST_SUMS", switches.ON_OFF, True)
# Programmatic dependent launch (compute capability 9 on): each kernel of a step is launched while the one before it
# finishes, and waits (``griddepcontrol.wait``: ``wait_for_inputs``) before it reads anything an earlier kernel
# wrote; at level 2 it first asks L2 for its first weights (which no kernel of a step writes). A kernel boundary in
# a CUDA graph (the grid's drain, the next one's launch) then overlaps the work around it. On an H100 (2026-12-06,
# llama-2-7b resident, graphs, batch 1) level 1 made a step 2-3% shorter: int4 2.83 -> 2.74 ms, int8 3.12 -> 3.03,
# bf16 4.87 -> 4.78; SmolLM2-135M's shape in int4 0.70 -> 0.71. Level 2 gave int4 1-2% more, int8, bf16 and the
# small model nothing or less. OFFLOAD_PDL=0 turns it off, =2 adds the L2 requests (read at import).
PDL = switches.choice("OFFLOAD_PDL", {"0": 0, "1": 1, "2": 2}, 1) if gdc_wait is not None else 0
_dependent_devices: dict[int, bool] = {}
COUNTERS = 1 << 16  # tiles a kernel may count (int32 counters, one buffer per device and stream)
_counters: dict[tuple, torch.Tensor] = {}


def dependent_launch(device: torch.device) -> dict:
    """The launch options of a step's kernel on ``device``: with ``PDL`` (on a GPU of compute capability 9 or
    later), a dependent launch of a kernel that waits for its inputs itself (its constant PDL the level); else an
    ordinary one (PDL 0), also while ``torch.compile`` traces the kernels (its launches take no ``launch_pdl``)."""
    if not PDL or device.type != "cuda" or torch.compiler.is_compiling():
        return {"PDL": 0}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _dependent_devices:
        _dependent_devices[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return {"PDL": PDL, "launch_pdl": True} if _dependent_devices[index] else {"PDL": 0}


def _same(*tensors: torch.Tensor) -> bool:
    """One device and one 16-bit dtype: what every kernel here reads and writes."""
    first = tensors[0]
    return first.dtype in DTYPES and all(t.device == first.device and t.dtype == first.dtype for t in tensors)


_works: bool | None = None  # whether Triton builds and runs the kernels in this process; None: not tried yet


def works(device: torch.device) -> bool:
    """Whether Triton builds and runs the kernels: tried once per process, on ``device``, with one small product
    (when the first model loads, before anything is compiled or captured)."""
    global _works
    if triton is None:
        return False
    if _works is None:
        _works = _try_a_product(device)
    return _works


def _try_a_product(device: torch.device) -> bool:
    global PDL
    problem = _problem_of_a_product(device)
    if problem and dependent_launch(device)["PDL"]:  # the launch itself may be what fails (an older driver)
        PDL = 0
        ordinary = _problem_of_a_product(device)
        if not ordinary:
            warnings.warn(f"dependent kernel launches fail here ({problem}); launching every kernel ordinarily",
                          OffloadWarning, stacklevel=3)
            return True
        problem = ordinary
    if problem:
        warnings.warn(f"offload's Triton kernels fail here ({problem}); decoding with PyTorch's kernels",
                      OffloadWarning, stacklevel=3)
    return not problem


def _problem_of_a_product(device: torch.device) -> str:
    """What went wrong in one small product by the kernels, or "" where it was right."""
    x = torch.ones(1, 64, dtype=torch.float16, device=device)
    try:
        return "" if bool((gemv(x, torch.ones(8, 64, dtype=x.dtype, device=device)) == 64).all()) else "wrong sums"
    except Exception as e:  # noqa: BLE001 - whatever the toolchain raises, PyTorch's kernels still work
        return f"{type(e).__name__}: {str(e)[:200]}"


# ----------------------------------------------------------------------------- one-row products


def gemv_takes(x: torch.Tensor, weight: torch.Tensor, gated: bool = False) -> bool:
    """Whether ``x @ weight.T`` is a one-row product ``gemv`` computes (``gated``: of ``x``'s gate, ``x`` a gated
    MLP's ``[gate | up]``)."""
    return (x.numel() == x.shape[-1] and x.stride(-1) == 1 and weight.dim() == 2 and weight.is_contiguous()
            and x.shape[-1] == weight.shape[1] * (2 if gated else 1) and _same(x, weight))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, gate: str | None = None,
         residual: torch.Tensor | None = None, norm: Norm | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias) (+ residual)`` for one row ``x [..., K]`` (every leading dimension 1) and ``weight
    [N, K]``. With ``gate`` (an activation of ``ACTIVATIONS``), ``x [..., 2K]`` is a gated MLP's ``[gate | up]``
    and the product is of ``act(gate) * up``, as ``gated`` rounds it: the MLP's last two kernels in one.
    ``residual`` (the shape of the output, contiguous) is added to the rounded product, as PyTorch's add would.
    With ``norm``, the product is of ``rms_norm(x, *norm)``, rounded as ``rms_norm`` rounds it."""
    if gate is not None and norm is not None:
        raise ValueError("a product gates its input or normalizes it, not both")
    n, k = weight.shape
    out = x.new_empty(*x.shape[:-1], n)
    norm_weight, eps, norm_code = norm_args(norm, out)
    _gemv_kernel[(n,)](x, weight, bias if bias is not None else out, residual if residual is not None else out,
                       norm_weight, out, k, eps, BLOCK_K=BLOCK_K, EVEN_K=k % BLOCK_K == 0, HAS_BIAS=bias is not None,
                       HAS_RESIDUAL=residual is not None, GATE=gate_code(gate), NORM=norm_code,
                       NORM_BLOCK=triton.next_power_of_2(k) if norm else 1, num_warps=WARPS,
                       **dependent_launch(x.device))
    return out


def gemv_gates(weight: torch.Tensor) -> bool:
    """Whether ``gemv`` should compute the gate of a gated MLP itself for ``weight`` (rather than take the gate
    kernel's output): each of its programs (one an output feature) gates the whole input, which is cheap for a
    small weight only (``GATING_WORK``)."""
    return weight.shape[0] * weight.shape[1] <= GATING_WORK


def fused_down_takes(gate_up: torch.Tensor, residual: torch.Tensor | None, n: int, k: int) -> bool:
    """Whether a one-row product of a weight ``[n, k]`` may take ``gate_up [..., 2 k]`` (a gated MLP's) and add
    ``residual`` (``residual_takes``)."""
    return gate_up.shape[-1] == 2 * k and (residual is None or residual_takes(gate_up, residual, n))


def residual_takes(x: torch.Tensor, residual: torch.Tensor, n: int) -> bool:
    """Whether a product of ``x`` with ``n`` output features may add ``residual`` to its output: of the output's
    exact shape, contiguous, of ``x``'s dtype and device."""
    return (residual.shape == (*x.shape[:-1], n) and residual.is_contiguous() and residual.dtype == x.dtype
            and residual.device == x.device)


def gemv_norms(n: int, k: int) -> bool:
    """Whether ``gemv`` should RMS-normalize its input itself for a weight ``[n, k]`` (rather than take the norm
    kernel's output): each of its programs (one an output feature) reads the whole row for the norm
    (``NORMING_WORK``)."""
    return n * k <= NORMING_WORK and k <= NORM_COLUMNS


class Norm(NamedTuple):
    """An RMS norm a product applies to its input first: ``rms_norm(x, weight, eps, offset)``."""

    weight: torch.Tensor
    eps: float
    offset: bool = False


def norm_takes(x: torch.Tensor, norm: Norm) -> bool:
    """Whether a one-row product may normalize ``x`` with ``norm`` (its weight one per column, contiguous)."""
    w = norm.weight
    return w.is_contiguous() and w.shape == (x.shape[-1],) and _same(x, w) and x.shape[-1] <= NORM_COLUMNS


def norm_args(norm: Norm | None, placeholder: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """A product kernel's norm arguments: the norm's weight, eps, NORM (0: none, 1: Llama's, 2: Gemma's)."""
    if norm is None:
        return placeholder, 0.0, 0
    return norm.weight, float(norm.eps), 2 if norm.offset else 1


def gate_code(activation: str | None) -> int:
    """A product's GATE: 0 (its input as it is), or the activation of a gated MLP's ``[gate | up]`` input."""
    return 0 if activation is None else 1 + ACTIVATIONS.index(activation)


# ----------------------------------------------------------------------------- RMS norm


def rms_norm_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_contiguous() and weight.is_contiguous() and weight.shape == x.shape[-1:] and x.shape[-1] <= 32768
            and _same(x, weight))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dimension, the mean in float32, each row
    normalized in float32 and rounded to the model dtype before the weight multiplies it (as Llama does);
    with ``offset``, multiplied by ``1 + weight`` in float32 and rounded once (as Gemma does)."""
    d = x.shape[-1]
    out = torch.empty_like(x)
    block = triton.next_power_of_2(d)
    _rms_norm_kernel[(x.numel() // d,)](x, weight, out, d, eps, BLOCK=block, OFFSET=offset,
                                        num_warps=_norm_warps(block), **dependent_launch(x.device))
    return out


def add_rms_norm_takes(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> bool:
    return rms_norm_takes(x, weight) and delta.is_contiguous() and delta.shape == x.shape and _same(x, delta)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + delta`` (rounded to the model dtype, as PyTorch adds) and ``rms_norm`` of it, in one kernel."""
    d = x.shape[-1]
    total, out = torch.empty_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(d)
    _add_rms_norm_kernel[(x.numel() // d,)](x, delta, total, weight, out, d, eps, BLOCK=block, OFFSET=offset,
                                            num_warps=_norm_warps(block), **dependent_launch(x.device))
    return total, out


def _norm_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


# ----------------------------------------------------------------------------- SiLU gate


def gated_takes(gate_up: torch.Tensor) -> bool:
    return gate_up.is_contiguous() and gate_up.shape[-1] % 2 == 0 and _same(gate_up)


def gated(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` for ``gate_up = [gate | up]`` along the last dimension, ``act`` SiLU or the tanh
    approximation of GELU, each rounded to the model dtype as PyTorch's two kernels round (the activation
    itself in float32 with Triton's exp)."""
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], inter)
    rows = gate_up.numel() // (2 * inter)
    _gated_kernel[(rows, triton.cdiv(inter, ELEMENTWISE_BLOCK))](gate_up, out, inter, GATE=gate_code(activation),
                                                                BLOCK=ELEMENTWISE_BLOCK, num_warps=4,
                                                                **dependent_launch(gate_up.device))
    return out


# ----------------------------------------------------------------------------- the likeliest tokens

LIKELIEST_BLOCK = 4096  # the vocabulary a program of ``likeliest``'s first kernel reads (12 of SmolLM2's 49,152)
LIKELIEST_MOST = 16  # the most tokens ``likeliest`` names a row


def likeliest_takes(logits: torch.Tensor, k: int) -> bool:
    """Whether ``likeliest`` takes ``logits [rows, vocab]`` (each row contiguous, 16 or 32 bits) and ``k``."""
    return (logits.dim() == 2 and logits.stride(-1) == 1 and logits.dtype in (*DTYPES, torch.float32)
            and 1 <= k <= min(LIKELIEST_MOST, logits.shape[-1]) and logits.shape[0] > 0)


def likeliest(logits: torch.Tensor, k: int, out: tuple | None = None) -> tuple:
    """Each row's argmax (the first of equal maxima, as ``torch.argmax``), its ``k`` likeliest tokens (most likely
    first; equal logits lowest index first) and their probabilities under the row's softmax (float32): what
    PyTorch's argmax, topk and logsumexp take about forty kernels for, in two. ``out``: three tensors to write
    (``[rows]`` and ``[rows, k]`` int64, ``[rows, k]`` float32). The first kernel's programs each take
    ``LIKELIEST_BLOCK`` of a row's logits: their maximum, the sum of their exponentials and their ``k`` likeliest;
    the second puts each row's together."""
    rows, vocab = logits.shape
    parts = triton.cdiv(vocab, LIKELIEST_BLOCK)
    out = out if out is not None else (logits.new_empty(rows, dtype=torch.long),
                                       logits.new_empty(rows, k, dtype=torch.long),
                                       logits.new_empty(rows, k, dtype=torch.float32))
    sums = logits.new_empty(rows, parts, 2 + k, dtype=torch.float32)  # a part's maximum, its sum, its likeliest
    found = logits.new_empty(rows, parts, k, dtype=torch.int32)  # and where they are in the row
    launch = dependent_launch(logits.device)
    _likeliest_part_kernel[(rows, parts)](logits, sums, found, logits.stride(0), vocab, K=k, BLOCK=LIKELIEST_BLOCK,
                                          num_warps=8, **launch)
    _likeliest_merge_kernel[(rows,)](sums, found, *out, vocab, PARTS=parts, PARTS_PAD=triton.next_power_of_2(parts),
                                     K=k, num_warps=1, **launch)
    return out


# ----------------------------------------------------------------------------- rotary embedding and cache write


def rope_and_store_takes(qkv: torch.Tensor, cos: torch.Tensor, cache_k: torch.Tensor,
                         q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None) -> bool:
    """Whether a pass's ``qkv [B, W, (H + 2 H_kv) hd]`` (a decode step's, W = 1, or a verify pass's) takes
    ``rope_and_store``: ``cos`` (and ``sin``, made alike) one contiguous row a token."""
    hd = cache_k.shape[-1]
    norms = () if q_norm is None else (q_norm, k_norm)
    return (qkv.is_contiguous() and qkv.dim() == 3 and cos.is_contiguous() and cos.numel() == qkv.shape[0]
            * qkv.shape[1] * hd and cache_k.stride(-1) == 1 and hd >= 2 and hd & (hd - 1) == 0
            and _same(qkv, cos, cache_k, *norms) and all(w.is_contiguous() and w.numel() == hd for w in norms))


def rope_and_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   cache_k: torch.Tensor, cache_v: torch.Tensor, heads: int, q_norm: torch.Tensor | None = None,
                   k_norm: torch.Tensor | None = None, eps: float = 0.0, offset: bool = False) -> torch.Tensor:
    """A pass's rotary embedding and cache write, in one kernel: of ``qkv [B, W, (H + 2 H_kv) hd]`` (W tokens a
    row: 1 for a decode step), rotates q and k by ``cos``/``sin`` ``[B, W, 1, hd]`` and writes k and v into row
    ``b`` of the caches ``[>= B, H_kv, L, hd]`` at ``positions[b, w]`` (``[B]`` for a decode step; a verify
    pass's slots). Returns q ``[B, W, H, hd]``. Rotates in float32 and rounds once (``apply_rope`` with
    PyTorch's kernels rounds each product too: they agree to a rounding). With ``q_norm`` and ``k_norm`` (Qwen3,
    Gemma 3: ``[hd]``), each q and k head is first RMS-normalized as ``rms_norm`` does it (``offset``: Gemma's
    ``1 + w``), rounded, then rotated."""
    b, width, kv_heads, hd = qkv.shape[0], qkv.shape[1], cache_k.shape[1], cache_k.shape[-1]
    q = qkv.new_empty(b, width, heads, hd)
    norm = q_norm is not None
    _rope_and_store_kernel[(b * width, heads + kv_heads)](
        qkv, cos, sin, positions.contiguous(), q, cache_k, cache_v, q_norm if norm else cos, k_norm if norm else cos,
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), cache_v.stride(0), cache_v.stride(1),
        cache_v.stride(2), eps=eps, WIDTH=width, HEADS=heads, KV_HEADS=kv_heads, HD=hd, NORM=norm, OFFSET=offset,
        num_warps=1, **dependent_launch(qkv.device))
    return q


# ----------------------------------------------------------------------------- attention of one query


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """Zeroed int32 counters of ``tiles`` tiles for a kernel whose last program of each tile puts the tile's
    split work together, on ``device``'s current stream; None where a second kernel does: ``LAST_SUMS`` off, more
    tiles than ``COUNTERS``, or a first use while a CUDA graph is captured (a graph's warm-up pass, eager on its
    stream, makes them).

    One buffer per stream: the programs of one kernel count in it and the last of each tile sets its counter back
    to zero, so kernels that follow one another on a stream share it, and kernels of two streams never do."""
    if not LAST_SUMS or tiles > COUNTERS:
        return None
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    if key not in _counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _counters[key] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return _counters[key]


def decode_attention_takes(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           allowed: torch.Tensor) -> bool:
    hd = q.shape[-1]
    return (hd >= 16 and hd & (hd - 1) == 0 and allowed.dtype == torch.bool and _same(q, keys, values)
            and q.stride(-1) == keys.stride(-1) == values.stride(-1) == allowed.stride(-1) == 1)


def _most_splits(batch: int, kv_heads: int, length: int) -> int:
    """Enough splits to fill the GPU with programs, at most one per block of keys; none for two blocks or fewer
    (merging costs more than it saves: SmolLM2-135M's shape, 128 keys, decoded 2-5% faster on an H200)."""
    if length <= 2 * BLOCK_KEYS:
        return 1
    return min(-(-length // BLOCK_KEYS), max(1, -(-TARGET_PROGRAMS // (batch * kv_heads))))


def decode_attention_splits(batch: int, kv_heads: int, length: int) -> tuple[int, int]:
    """(splits, keys per split) of ``length`` keys: whole blocks per split, no split without keys."""
    blocks = -(-length // BLOCK_KEYS)
    keys_per_split = -(-blocks // _most_splits(batch, kv_heads, length)) * BLOCK_KEYS
    return -(-length // keys_per_split), keys_per_split


def decode_attention_bytes(batch: int, heads: int, kv_heads: int, max_len: int, hd: int, dtype: torch.dtype) -> int:
    """The most GPU memory ``decode_attention`` allocates for up to ``max_len`` keys (the splits' float32
    partial results and the output)."""
    splits = _most_splits(batch, kv_heads, max_len)  # no length up to max_len is cut into more
    partial = batch * heads * splits * (hd + 2) * 4 if splits > 1 else 0
    return partial + batch * heads * hd * dtype.itemsize


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Softmax attention of one query per row: ``q [B, H, 1, hd]`` over ``keys``/``values``
    ``[B, H_kv, L, hd]`` (any strides but the last), where ``allowed [B, 1, 1, L]`` (bool) says
    which keys each row sees. Grouped kv heads: query head ``h`` uses kv head ``h // (H / H_kv)``.
    Returns ``[B, H, 1, hd]``, a view of a ``[B, 1, H, hd]`` tensor (the token layout)."""
    b, h, _, hd = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = h // kv_heads
    splits, keys_per_split = decode_attention_splits(b, kv_heads, length)
    out = q.new_empty(b, 1, h, hd)
    # Each split's unnormalized output, running maximum and sum, in float32 (only with more than one split).
    partial = q.new_empty((b * h * splits * (hd + 2)) if splits > 1 else 1, dtype=torch.float32)
    counters = tile_counters(q.device, b * kv_heads) if splits > 1 else None
    grid = (b * kv_heads, splits)
    _decode_attention_kernel[grid](
        q, keys, values, allowed, partial, out, counters if counters is not None else partial, q, q, q, q, q, length,
        kv_heads, keys_per_split, scale * math.log2(math.e), q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
        keys.stride(2), values.stride(0), values.stride(1), values.stride(2), allowed.stride(0), 0, 0, 0.0,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HD=hd, BLOCK=BLOCK_KEYS,
        SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)), LAST=counters is not None, ROPE=False,
        NORM=False, OFFSET=False, num_warps=4, **dependent_launch(q.device))
    if splits > 1 and counters is None:
        _merge_splits_kernel[(b * h,)](partial, out, SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
                                       HD=hd, num_warps=4, **dependent_launch(q.device))
    return out.transpose(1, 2)


def self_attention_takes(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                         cache_v: torch.Tensor, length: int, allowed: torch.Tensor, q_norm: torch.Tensor | None = None,
                         k_norm: torch.Tensor | None = None) -> bool:
    """Whether a decode step's ``qkv [B, 1, F]`` takes ``decode_self_attention``: what ``rope_and_store`` and
    ``decode_attention`` take, ``length`` keys within the caches and the mask."""
    b = qkv.shape[0]
    return (qkv.shape[1] == 1 and rope_and_store_takes(qkv, cos, cache_k, q_norm, k_norm) and sin.is_contiguous()
            and sin.shape == cos.shape and cache_k.shape[-1] >= 16 and cache_v.shape == cache_k.shape
            and cache_k.shape[0] >= b and length <= cache_k.shape[2] and allowed.dtype == torch.bool
            and allowed.shape == (b, 1, 1, length) and allowed.stride(-1) == 1 and cache_v.stride(-1) == 1
            and _same(qkv, cache_v))


def decode_self_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                          cache_k: torch.Tensor, cache_v: torch.Tensor, length: int, allowed: torch.Tensor, heads: int,
                          scale: float, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                          eps: float = 0.0, offset: bool = False) -> torch.Tensor:
    """A decode step's self-attention in one kernel: ``rope_and_store`` (q and k rotated, k and v written into
    the caches at ``positions``), then ``decode_attention`` of q over the caches' first ``length`` keys of each
    row, ``allowed [B, 1, 1, length]``. The same bits as the two (with q and k norms, on a GPU, to a rounding: the
    kernels add a head's squares in orders of their own). Returns ``[B, H, 1, hd]``."""
    b, kv_heads, hd = qkv.shape[0], cache_k.shape[1], cache_k.shape[-1]
    group = heads // kv_heads
    splits, keys_per_split = decode_attention_splits(b, kv_heads, length)
    out = qkv.new_empty(b, 1, heads, hd)
    partial = qkv.new_empty((b * heads * splits * (hd + 2)) if splits > 1 else 1, dtype=torch.float32)
    counters = tile_counters(qkv.device, b * kv_heads) if splits > 1 else None
    norm = q_norm is not None
    _decode_attention_kernel[(b * kv_heads, splits)](
        qkv, cache_k, cache_v, allowed, partial, out, counters if counters is not None else partial, cos, sin,
        positions.contiguous(), q_norm if norm else cos, k_norm if norm else cos, length, kv_heads, keys_per_split,
        scale * math.log2(math.e), qkv.stride(0), hd, cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        cache_v.stride(0), cache_v.stride(1), cache_v.stride(2), allowed.stride(0), cos.stride(0), sin.stride(0),
        float(eps), GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HD=hd, BLOCK=BLOCK_KEYS,
        SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)), LAST=counters is not None, ROPE=True,
        NORM=norm, OFFSET=offset, num_warps=4, **dependent_launch(qkv.device))
    if splits > 1 and counters is None:
        _merge_splits_kernel[(b * heads,)](partial, out, SPLITS=splits,
                                           SPLITS_PAD=max(2, triton.next_power_of_2(splits)), HD=hd, num_warps=4,
                                           **dependent_launch(qkv.device))
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- the kernels

if triton is not None:

    @triton.jit
    def wait_for_inputs(PDL: tl.constexpr):
        """Under a dependent launch (PDL, ``dependent_launch``): wait until the kernel before this one has finished
        and its writes are seen, then let the next kernel launch. Nothing a kernel reads before this may have been
        written by an earlier kernel."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def prefetch(pointers, ok):
        """Ask L2 for the lines at ``pointers`` (where ``ok``): under a dependent launch of level 2, a kernel's
        first weights while the kernel before it finishes. A hint: nothing waits for it, and an address it names
        is never read from it."""
        tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; "
                                  "mov.u32 $0, 0; }", "=r,l,r", [pointers, ok.to(tl.int32)], dtype=tl.int32,
                                  is_pure=False, pack=1)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, r_ptr, nw_ptr, y_ptr, K, eps, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATE: tl.constexpr, NORM: tl.constexpr,
                     NORM_BLOCK: tl.constexpr, PDL: tl.constexpr):
        n = tl.program_id(0)  # the output feature this program computes
        w_row = w_ptr + n.to(tl.int64) * K
        cols = tl.arange(0, BLOCK_K)
        if PDL >= 2:  # the first tile's 128-byte lines (of 16-bit weights)
            lines = tl.arange(0, (BLOCK_K * 2 + 127) // 128) * 64
            prefetch(w_row + lines, lines < K)
        wait_for_inputs(PDL)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        inverse = inverse_rms(x_ptr, K, eps, NORM, NORM_BLOCK)
        for k0 in range(0, K, BLOCK_K):
            inside = k0 + cols < K
            if EVEN_K:
                w = tl.load(w_row + k0 + cols, eviction_policy="evict_first")  # read once: keep x in cache
            else:
                w = tl.load(w_row + k0 + cols, mask=inside, other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * gemv_input(x_ptr, k0 + cols, inside, K, EVEN_K, GATE, nw_ptr, inverse, NORM)
        y = finish_product(tl.sum(acc, axis=0), b_ptr, r_ptr, n, n, True, y_ptr.dtype.element_ty, HAS_BIAS,
                           HAS_RESIDUAL)
        tl.store(y_ptr + n, y)

    @triton.jit
    def finish_product(total, bias_ptr, res_ptr, features, at, ok, dtype: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr):
        """A product's float32 sums ``total`` at ``at`` (output ``features``) plus the bias, rounded to ``dtype``,
        plus the residual, rounded again (as a separate add would round)."""
        if HAS_BIAS:
            total += tl.load(bias_ptr + features, mask=ok, other=0.0).to(tl.float32)
        out = total.to(dtype)
        if HAS_RESIDUAL:
            residual = tl.load(res_ptr + at, mask=ok, other=0.0).to(tl.float32)
            out = (out.to(tl.float32) + residual).to(dtype, fp_downcast_rounding="rtne")  # PyTorch's rounding
        return out


    @triton.jit
    def inverse_rms(x_ptr, K, eps, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr):
        """``1 / sqrt(mean(x^2) + eps)`` of the row ``x`` (``K`` columns, at most ``NORM_BLOCK``) in float32, as
        ``_normalize`` computes it; 1 without NORM."""
        if NORM == 0:
            return 1.0
        cols = tl.arange(0, NORM_BLOCK)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0, eviction_policy="evict_last").to(tl.float32)
        # float32 even where torch.compile passes eps as a float64 scalar (as a launch's float32 argument)
        return tl.rsqrt(tl.sum(x * x, axis=0) / K + tl.cast(eps, tl.float32))

    @triton.jit
    def gemv_input(x_ptr, at, inside, K, EVEN: tl.constexpr, GATE: tl.constexpr, nw_ptr, inverse,
                   NORM: tl.constexpr):
        """A product's input at columns ``at`` (``inside`` of ``K``; EVEN: all are) in float32: ``x`` itself, with
        GATE ``act(gate) * up`` of ``x = [gate | up]`` (``K`` columns each), rounded as ``gated`` rounds, or with
        NORM ``x``'s RMS norm (``inverse_rms``'s ``inverse``, the weight at ``nw_ptr``) as ``_normalize``
        rounds it: 1, Llama's; 2, Gemma's."""
        if EVEN:
            x = tl.load(x_ptr + at, eviction_policy="evict_last")
        else:
            x = tl.load(x_ptr + at, mask=inside, other=0.0, eviction_policy="evict_last")
        if NORM != 0:
            if EVEN:
                w = tl.load(nw_ptr + at, eviction_policy="evict_last").to(tl.float32)
            else:
                w = tl.load(nw_ptr + at, mask=inside, other=0.0, eviction_policy="evict_last").to(tl.float32)
            return normalized(x.to(tl.float32), inverse, w, x.dtype, NORM == 2).to(tl.float32)
        if GATE == 0:
            return x.to(tl.float32)
        if EVEN:
            up = tl.load(x_ptr + K + at, eviction_policy="evict_last")
        else:
            up = tl.load(x_ptr + K + at, mask=inside, other=0.0, eviction_policy="evict_last")
        return gated_value(x, up, GATE).to(tl.float32)

    @triton.jit
    def gated_value(gate, up, GATE: tl.constexpr):
        """``act(gate) * up`` in the inputs' dtype, each step rounded as PyTorch's kernels round (the activation
        itself in float32 with Triton's exp). GATE 1: SiLU; 2: the tanh approximation of GELU."""
        dtype = gate.dtype
        g = gate.to(tl.float32)
        if GATE == 2:  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), tanh(y) = 1 - 2 / (exp(2y) + 1)
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            act = 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))
        else:
            act = g / (1.0 + tl.exp(-g))
        return (act.to(dtype).to(tl.float32) * up.to(tl.float32)).to(dtype)

    @triton.jit
    def _normalize(x, w_ptr, y_ptr, row, cols, inside, D, eps: tl.constexpr, OFFSET: tl.constexpr):
        """Store ``w * rms_norm(x)`` (``x`` one row in float32) at ``y_ptr + row``; ``(1 + w)`` with OFFSET."""
        inverse = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(y_ptr + row + cols, normalized(x, inverse, w, y_ptr.dtype.element_ty, OFFSET), mask=inside)

    @triton.jit
    def normalized(x, inverse, w, dtype: tl.constexpr, OFFSET: tl.constexpr):
        """``w * (x * inverse)`` in ``dtype`` (``x``, ``w`` float32): Llama's rounds the normalized row first, then
        the product; Gemma's (OFFSET) multiplies by ``1 + w`` in float32 and rounds once."""
        if OFFSET:
            return ((x * inverse) * (1.0 + w)).to(dtype)
        return (w * (x * inverse).to(dtype).to(tl.float32)).to(dtype)

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, eps: tl.constexpr, BLOCK: tl.constexpr, OFFSET: tl.constexpr,
                         PDL: tl.constexpr):
        wait_for_inputs(PDL)
        row = tl.program_id(0).to(tl.int64) * D
        cols = tl.arange(0, BLOCK)
        inside = cols < D
        x = tl.load(x_ptr + row + cols, mask=inside, other=0.0).to(tl.float32)
        _normalize(x, w_ptr, y_ptr, row, cols, inside, D, eps, OFFSET)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, delta_ptr, total_ptr, w_ptr, y_ptr, D, eps: tl.constexpr, BLOCK: tl.constexpr,
                             OFFSET: tl.constexpr, PDL: tl.constexpr):
        wait_for_inputs(PDL)
        row = tl.program_id(0).to(tl.int64) * D
        cols = tl.arange(0, BLOCK)
        inside = cols < D
        x = tl.load(x_ptr + row + cols, mask=inside, other=0.0).to(tl.float32)
        x += tl.load(delta_ptr + row + cols, mask=inside, other=0.0).to(tl.float32)
        x = x.to(total_ptr.dtype.element_ty)  # the residual add, rounded as PyTorch's add rounds
        tl.store(total_ptr + row + cols, x, mask=inside)
        _normalize(x.to(tl.float32), w_ptr, y_ptr, row, cols, inside, D, eps, OFFSET)

    @triton.jit
    def _gated_kernel(gate_up_ptr, out_ptr, INTER, GATE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        wait_for_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < INTER
        gate = tl.load(gate_up_ptr + row * 2 * INTER + cols, mask=inside, other=0.0)
        up = tl.load(gate_up_ptr + row * 2 * INTER + INTER + cols, mask=inside, other=0.0)
        tl.store(out_ptr + row * INTER + cols, gated_value(gate, up, GATE), mask=inside)

    @triton.jit
    def _likeliest_part_kernel(x_ptr, sums_ptr, found_ptr, stride, V, K: tl.constexpr, BLOCK: tl.constexpr,
                               PDL: tl.constexpr):
        """``BLOCK`` logits of a row: their maximum, the sum of their exponentials past it, and their ``K`` largest
        with where they are (equal ones lowest index first)."""
        wait_for_inputs(PDL)
        row, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride + part * BLOCK + cols, mask=part * BLOCK + cols < V,
                    other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("inf"), x)  # a NaN is the largest, as torch.argmax takes it
        top = tl.max(x, axis=0)
        at = (row * tl.num_programs(1) + part) * (2 + K)
        tl.store(sums_ptr + at, top)
        tl.store(sums_ptr + at + 1, tl.sum(tl.exp(x - tl.where(top == float("-inf"), 0.0, top)), axis=0))
        for j in tl.static_range(K):
            i = tl.argmax(x, axis=0, tie_break_left=True)
            tl.store(sums_ptr + at + 2 + j, tl.max(x, axis=0))
            tl.store(found_ptr + (row * tl.num_programs(1) + part) * K + j, part * BLOCK + i)
            x = tl.where(cols == i, float("-inf"), x)

    @triton.jit
    def _likeliest_merge_kernel(sums_ptr, found_ptr, first_ptr, top_ptr, chances_ptr, V, PARTS: tl.constexpr,
                                PARTS_PAD: tl.constexpr, K: tl.constexpr, PDL: tl.constexpr):
        """A row's parts put together: the ``K`` largest of their candidates (equal ones lowest index first), each
        with its probability, the sum of the parts' exponentials rescaled to the row's maximum. A token past the
        vocabulary (a part's padding, named only where the row has fewer than ``K`` logits above minus infinity)
        is named as the last."""
        wait_for_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        p = tl.arange(0, PARTS_PAD)
        at = (row * PARTS + p) * (2 + K)
        part_top = tl.load(sums_ptr + at, mask=p < PARTS, other=float("-inf"))
        top = tl.max(part_top, axis=0)
        shift = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(tl.load(sums_ptr + at + 1, mask=p < PARTS, other=0.0) * tl.exp(part_top - shift), axis=0)
        c = tl.arange(0, PARTS_PAD * K)  # candidate c: part c // K's (c % K)-th largest
        inside = c // K < PARTS
        values = tl.load(sums_ptr + (row * PARTS + c // K) * (2 + K) + 2 + c % K, mask=inside, other=float("-inf"))
        where = tl.load(found_ptr + row * PARTS * K + c, mask=inside, other=2**31 - 1)
        for j in tl.static_range(K):
            value = tl.max(values, axis=0)
            index = tl.minimum(tl.min(tl.where(values == value, where, 2**31 - 1), axis=0), V - 1)
            if j == 0:
                tl.store(first_ptr + row, index.to(tl.int64))
            tl.store(top_ptr + row * K + j, index.to(tl.int64))
            tl.store(chances_ptr + row * K + j, tl.exp(value - shift) / total)
            values = tl.where(where == index, float("-inf"), values)

    @triton.jit
    def _rope_and_store_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_cache_ptr, v_cache_ptr, qn_ptr, kn_ptr,
                               sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, eps: tl.constexpr, WIDTH: tl.constexpr,
                               HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HD: tl.constexpr, NORM: tl.constexpr,
                               OFFSET: tl.constexpr, PDL: tl.constexpr):
        """One head of one token (of ``WIDTH`` a row): q heads are (normalized and) rotated into q, k heads
        likewise into the cache, v copied there."""
        wait_for_inputs(PDL)
        token, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
        b = token // WIDTH
        d = tl.arange(0, HD)
        row = qkv_ptr + token * ((HEADS + 2 * KV_HEADS) * HD)
        cos = tl.load(cos_ptr + token * HD + d).to(tl.float32)
        sin = tl.load(sin_ptr + token * HD + d).to(tl.float32)
        one = tl.full([1], 0, tl.int32) + head  # this head, as a block of one
        if head < HEADS:
            out = rotated_heads(row, one, one >= 0, d, cos, sin, qn_ptr, eps, HD, NORM, OFFSET, q_ptr.dtype.element_ty)
            tl.store(q_ptr + (token * HEADS + head) * HD + d[None, :], out)
        else:
            out = rotated_heads(row, one, one >= 0, d, cos, sin, kn_ptr, eps, HD, NORM, OFFSET, q_ptr.dtype.element_ty)
            kv_head = head - HEADS
            position = tl.load(pos_ptr + token)
            tl.store(k_cache_ptr + b * sk_b + kv_head * sk_h + position * sk_l + d[None, :], out)
            v = tl.load(row + (HEADS + KV_HEADS + kv_head) * HD + d)
            tl.store(v_cache_ptr + b * sv_b + kv_head * sv_h + position * sv_l + d, v)

    @triton.jit
    def rotated_heads(row_ptr, heads, ok, d, cos, sin, nw_ptr, eps, HD: tl.constexpr, NORM: tl.constexpr,
                      OFFSET: tl.constexpr, dtype: tl.constexpr):
        """Heads ``heads`` (``[R]``, where ``ok``) of one token's ``qkv`` row at ``row_ptr``, ``[R, HD]`` in
        ``dtype``: each rotated by ``cos``/``sin`` (``[HD]``, float32) in float32 and rounded once; with NORM
        first RMS-normalized as ``_normalize`` does it (the weight at ``nw_ptr``; OFFSET: Gemma's ``1 + w``),
        rounded."""
        partner = (d + HD // 2) % HD  # rotate_half: [-x2, x1]
        sign = tl.where(d < HD // 2, -1.0, 1.0)
        at = row_ptr + heads[:, None] * HD
        x = tl.load(at + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        x_partner = tl.load(at + partner[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        if NORM:  # the head's float32 RMS, then the weight (Llama) or 1 + weight (Gemma)
            inverse = tl.rsqrt(tl.sum(x * x, axis=1) / HD + tl.cast(eps, tl.float32))[:, None]
            w = tl.load(nw_ptr + d).to(tl.float32)[None, :]
            w_partner = tl.load(nw_ptr + partner).to(tl.float32)[None, :]
            x = normalized(x, inverse, w, dtype, OFFSET).to(tl.float32)
            x_partner = normalized(x_partner, inverse, w_partner, dtype, OFFSET).to(tl.float32)
        rotated = x_partner * sign[None, :]
        return (x * cos[None, :] + rotated * sin[None, :]).to(dtype)

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, partial_ptr, out_ptr, count_ptr, cos_ptr, sin_ptr,
                                 pos_ptr, qn_ptr, kn_ptr, L, KV_HEADS, KEYS_PER_SPLIT, scale_log2: tl.constexpr, sq_b,
                                 sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, s_cos, s_sin, eps,
                                 GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HD: tl.constexpr, BLOCK: tl.constexpr,
                                 SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, LAST: tl.constexpr,
                                 ROPE: tl.constexpr, NORM: tl.constexpr, OFFSET: tl.constexpr,
                                 PDL: tl.constexpr):
        """One kv head of one row, over one split of the keys: the ``GROUP`` query heads that share it (LAST: the
        last split's program to finish merges every split of them, as ``_merge_splits_kernel`` does). With ROPE,
        ``q_ptr`` is the step's ``qkv`` (``[B, (H + 2 H_kv) hd]`` rows, ``sq_b`` apart): q's heads are rotated
        here as ``rope_and_store`` rotates them, and the program whose split holds the row's position (the last,
        for a position past every split: the sink) first rotates k and writes it and v into the cache there."""
        wait_for_inputs(PDL)
        row_head, split = tl.program_id(0), tl.program_id(1)
        b, kv_head = (row_head // KV_HEADS).to(tl.int64), row_head % KV_HEADS  # b * a row's stride: past 2^31
        g, d = tl.arange(0, GROUP_PAD), tl.arange(0, HD)
        heads = kv_head * GROUP + g
        k_base, v_base = k_ptr + b * sk_b + kv_head * sk_h, v_ptr + b * sv_b + kv_head * sv_h
        if ROPE:
            row = q_ptr + b * sq_b
            cos = tl.load(cos_ptr + b * s_cos + d).to(tl.float32)
            sin = tl.load(sin_ptr + b * s_sin + d).to(tl.float32)
            dtype = out_ptr.dtype.element_ty
            q = rotated_heads(row, heads, g < GROUP, d, cos, sin, qn_ptr, eps, HD, NORM, OFFSET, dtype)
            position = tl.load(pos_ptr + b)
            if split == tl.minimum(position // KEYS_PER_SPLIT, SPLITS - 1):
                one = tl.full([1], 0, tl.int32) + KV_HEADS * GROUP + kv_head  # k's head, as a block of one
                k = rotated_heads(row, one, one >= 0, d, cos, sin, kn_ptr, eps, HD, NORM, OFFSET, dtype)
                tl.store(k_base + position * sk_l + d[None, :], k)
                v = tl.load(row + (KV_HEADS * GROUP + KV_HEADS + kv_head) * HD + d)
                tl.store(v_base + position * sv_l + d, v)
            tl.debug_barrier()  # the cache's new key and value, written by some of the threads, seen by all
        else:
            q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=g[:, None] < GROUP, other=0.0)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running maximum of the scores (base-2 scaled)
        total = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2(score - m)
        acc = tl.zeros([GROUP_PAD, HD], tl.float32)
        start = split * KEYS_PER_SPLIT
        stop = tl.minimum(start + KEYS_PER_SPLIT, L)
        for first in range(start, stop, BLOCK):
            key = first + tl.arange(0, BLOCK)
            inside = key < stop
            seen = tl.load(mask_ptr + b * sm_b + key, mask=inside, other=0) != 0
            k = tl.load(k_base + key[:, None] * sk_l + d[None, :], mask=inside[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale_log2
            scores = tl.where(seen[None, :], scores, float("-inf"))
            new_m = tl.maximum(m, tl.max(scores, axis=1))
            shift = tl.where(new_m == float("-inf"), 0.0, new_m)  # no key seen yet: keep every weight 0
            p = tl.exp2(scores - shift[:, None])
            rescale = tl.exp2(m - shift)
            v = tl.load(v_base + key[:, None] * sv_l + d[None, :], mask=inside[:, None], other=0.0)
            total = total * rescale + tl.sum(p, axis=1)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            m = new_m
        if SPLITS == 1:
            o = acc / tl.where(total == 0.0, 1.0, total)[:, None]
            out = out_ptr + (b * KV_HEADS * GROUP + heads[:, None]) * HD + d[None, :]
            tl.store(out, o.to(out_ptr.dtype.element_ty), mask=g[:, None] < GROUP)
        else:  # [row, head, split]: HD values, then the maximum and the sum
            at = ((b * KV_HEADS * GROUP + heads) * SPLITS + split) * (HD + 2)
            tl.store(partial_ptr + at[:, None] + d[None, :], acc, mask=g[:, None] < GROUP)
            tl.store(partial_ptr + at + HD, m, mask=g < GROUP)
            tl.store(partial_ptr + at + HD + 1, total, mask=g < GROUP)
            if LAST:  # the barrier and the counter's release order these stores before the arrival
                tl.debug_barrier()
                arrived = tl.atomic_add(count_ptr + row_head, 1, sem="acq_rel", scope="gpu")
                if arrived == SPLITS - 1:
                    for i in tl.static_range(GROUP):
                        _merge(partial_ptr, out_ptr, row_head * GROUP + i, SPLITS, SPLITS_PAD, HD, ".cg")
                    tl.store(count_ptr + row_head, 0)  # for the next kernel on the stream

    @triton.jit
    def _merge_splits_kernel(partial_ptr, out_ptr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HD: tl.constexpr,
                             PDL: tl.constexpr):
        """One query head of one row: the splits' outputs, each weighted by its share of the softmax."""
        wait_for_inputs(PDL)
        _merge(partial_ptr, out_ptr, tl.program_id(0), SPLITS, SPLITS_PAD, HD, "")

    @triton.jit
    def _merge(partial_ptr, out_ptr, row_head, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HD: tl.constexpr,
               CACHE: tl.constexpr):
        """Query head ``row_head`` (of every row's heads): the splits' outputs, each weighted by its share of the
        softmax (``CACHE``: ".cg" reads past the SM's own cache, for partial results other programs wrote)."""
        s, d = tl.arange(0, SPLITS_PAD), tl.arange(0, HD)
        at = (row_head * SPLITS + s) * (HD + 2)
        m = tl.load(partial_ptr + at + HD, mask=s < SPLITS, other=float("-inf"), cache_modifier=CACHE)
        total = tl.load(partial_ptr + at + HD + 1, mask=s < SPLITS, other=0.0, cache_modifier=CACHE)
        acc = tl.load(partial_ptr + at[:, None] + d[None, :], mask=s[:, None] < SPLITS, other=0.0,
                      cache_modifier=CACHE)
        top = tl.max(m, axis=0)
        weight = tl.exp2(m - tl.where(top == float("-inf"), 0.0, top))  # a split that saw no key: weight 0
        total = tl.sum(total * weight, axis=0)
        o = tl.sum(acc * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + row_head * HD + d, o.to(out_ptr.dtype.element_ty))
