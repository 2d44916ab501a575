"""The operations a decoder layer computes with, chosen once per model: PyTorch's, or offload's Triton kernels.

Whether the kernels of ``kernels.py`` apply is a property of the model (a CUDA device, a
16-bit dtype, a Triton that builds here), so :func:`choose` decides it when the model loads
and the decoder calls ``ops.rms_norm(...)`` without asking again. What a call still checks
is whether a kernel takes tensors of that shape (a one-row product, a contiguous row...):
``kernels``' predicates; otherwise the PyTorch operation runs.

The PyTorch operations mirror the reference implementation op for op (norms in float32,
rounded where it rounds), so on the same device and dtype they give its bits. The kernels
agree with them to a rounding (float32 sums in other orders, see ``kernels.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernels, quant_kernels
from .kernels import Norm
from .quant import QuantizedWeight, StackedWeight, quantized_linear


@dataclass(frozen=True)
class Ops:
    """One model's operations. Every field is a function; ``kernels`` says which set this is."""

    linear: Callable  # (x, weight, bias=None, residual=None): x @ weight.T (+ bias) (+ residual), dense or quantized
    normed_linear: Callable  # (x, norm: Norm, weight, bias=None): rms_norm(x, *norm) @ weight.T (+ bias)
    rms_norm: Callable  # (x, weight, eps, offset=False); offset: Gemma's (1 + weight), multiplied in float32
    add_rms_norm: Callable  # (x, delta, weight, eps, offset=False) -> (x + delta, its norm)
    gated: Callable  # (gate_up, activation) -> act(gate) * up, for gate_up = [gate | up] on the last dim
    gated_linear: Callable  # (gate_up, activation, weight, residual=None) -> gated(...) @ weight.T (+ residual)
    cached_attention: Callable  # a decode step's or a verify pass's (qkv [B, W, F], cos, sin, slots, cache_k, cache_v,
    #     length, allowed [B, 1, W, length], heads, scale, q_norm=None, k_norm=None, eps=0, offset=False):
    #     rope_and_store, then attention over the caches' first ``length`` keys -> [B, H, W, hd]
    likeliest: Callable  # (logits [rows, V], k, out=None) -> each row's argmax, its k likeliest, their probabilities
    kernels: bool  # offload's Triton kernels (True) or PyTorch's operations


def choose(device: torch.device, dtype: torch.dtype) -> Ops:
    """The kernels for 16-bit models on a CUDA device where Triton works (tried once per process), else PyTorch."""
    if device.type == "cuda" and dtype in kernels.DTYPES and kernels.works(device):
        return TRITON
    return TORCH


# ----------------------------------------------------------------------------- PyTorch


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(weight, QuantizedWeight):
        out = quantized_linear(x, weight, bias)
    elif isinstance(weight, StackedWeight):
        out = stacked(linear, x, weight, bias)
    else:
        out = F.linear(x, weight, bias)
    return out if residual is None else residual + out


def normed_linear(x: torch.Tensor, norm: Norm, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's first product of its normalized input (``norm``: the weight, eps and offset of ``rms_norm``)."""
    return linear(rms_norm(x, *norm), weight, bias)


def stacked(product, x: torch.Tensor, weight: StackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """A projection whose members are stored in different formats: each member's product, side by side."""
    out = torch.cat([product(x, member) for member in weight.members], dim=-1)
    return out if bias is None else out + bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor:
    """Llama's: the row normalized in float32, rounded, times ``weight``. Gemma's (``offset``): normalized and
    multiplied by ``1 + weight`` in float32, rounded once."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (x * (1.0 + weight.float())).to(dtype)
    return weight * x.to(dtype)


def add_rms_norm(x, delta, weight, eps: float, offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + delta
    return x, rms_norm(x, weight, eps, offset)


def gated(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh") * up


def gated_linear(gate_up: torch.Tensor, activation: str, weight, residual: torch.Tensor | None = None) -> torch.Tensor:
    """A gated MLP's last product: ``gated(gate_up, activation) @ weight.T``, plus ``residual`` (a layer's stream)."""
    out = linear(gated(gate_up, activation), weight)
    return out if residual is None else residual + out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def rope_and_store(qkv, cos, sin, slots, cache_k, cache_v, heads: int, q_norm=None, k_norm=None, eps: float = 0.0,
                   offset: bool = False) -> torch.Tensor:
    """Of a pass's ``qkv [B, W, (H + 2 H_kv) hd]``: q and k (RMS-normalized per head with ``q_norm`` and
    ``k_norm``) rotated, k and v written into row ``b`` of the caches at ``slots[b, w]`` (``[B]``: a decode
    step's positions). Returns q ``[B, W, H, hd]``."""
    kv_heads, hd = cache_k.shape[1], cache_k.shape[-1]
    q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    q, k = q.unflatten(-1, (heads, hd)), k.unflatten(-1, (kv_heads, hd))
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps, offset), rms_norm(k, k_norm, eps, offset)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rows = torch.arange(qkv.shape[0], device=qkv.device)[:, None]
    slots = slots.view(qkv.shape[0], qkv.shape[1])
    cache_k[rows, :, slots] = k
    cache_v[rows, :, slots] = v.unflatten(-1, (kv_heads, hd))
    return q


def cached_attention(qkv, cos, sin, slots, cache_k, cache_v, length: int, allowed, heads: int, scale: float,
                     q_norm=None, k_norm=None, eps: float = 0.0, offset: bool = False) -> torch.Tensor:
    """A pass whose every token goes into the cache and attends to it alone (a decode step, a verify pass):
    ``rope_and_store``, then attention over the caches' first ``length`` keys of each row."""
    q = rope_and_store(qkv, cos, sin, slots, cache_k, cache_v, heads, q_norm, k_norm, eps, offset)
    return attend_cache(decode_attention, q, cache_k, cache_v, length, allowed, scale)


def attend_cache(one_query, q, cache_k, cache_v, length: int, allowed, scale: float) -> torch.Tensor:
    """``q [B, W, H, hd]`` over the caches' first ``length`` keys: ``one_query`` (an op of ``decode_attention``'s
    arguments) for one token a row, SDPA for more."""
    rows = q.shape[0]
    keys, values = cache_k[:rows, :, :length], cache_v[:rows, :, :length]
    if q.shape[1] == 1:
        return one_query(q.transpose(1, 2), keys, values, allowed, scale)
    return attend(q.transpose(1, 2), keys, values, allowed, False, scale)


def attend(q, keys, values, mask, causal: bool, scale: float) -> torch.Tensor:
    """SDPA of ``q [B, H, T, hd]`` over ``keys``/``values`` ``[B, H_kv, L, hd]``."""
    group = q.shape[1] // keys.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=causal, scale=scale, enable_gqa=group > 1)
    # SDPA's kernels that take a mask do not take grouped heads: the `group` query heads of
    # each kv head become `group` times as many queries of that head, the mask repeated.
    b, h, t, hd = q.shape
    if group > 1:
        q = q.reshape(b, keys.shape[1], group * t, hd)
        mask = mask[:, :, None].expand(b, 1, group, t, mask.shape[-1]).reshape(b, 1, group * t, -1)
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return o.reshape(b, h, t, hd)  # a GPU kernel may return it strided


def decode_attention(q, keys, values, allowed, scale: float) -> torch.Tensor:
    """One query per row, as transformers' eager attention computes it: two matrix products around a float32
    softmax, the query heads that share a kv head as rows of one product. SDPA's kernels that take a mask give
    each head one block that walks the keys alone; these products spread over every head and key."""
    b, h, _, hd = q.shape
    q = q.reshape(b, keys.shape[1], h // keys.shape[1], hd)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(probs, values).reshape(b, h, 1, hd)


def likeliest(logits: torch.Tensor, k: int, out: tuple | None = None) -> tuple:
    """Each row of ``logits [rows, V]``'s argmax, its ``k`` likeliest tokens and their probabilities (float32):
    a draft's greedy choice and where its chain is likeliest to break (``kernels.likeliest``). ``out``: three
    tensors to write (``[rows]``, ``[rows, k]``, ``[rows, k]``)."""
    found = logits.topk(k, dim=-1)
    chances = (found.values.float() - logits.float().logsumexp(-1, keepdim=True)).exp()
    return _written(out, (logits.argmax(dim=-1), found.indices, chances))


def _written(out: tuple | None, values: tuple) -> tuple:
    if out is None:
        return values
    for o, value in zip(out, values):
        o.copy_(value)
    return out


TORCH = Ops(linear, normed_linear, rms_norm, add_rms_norm, gated, gated_linear, cached_attention, likeliest,
            kernels=False)


# ----------------------------------------------------------------------------- Triton, where the shapes allow


def _linear(x, weight, bias=None, residual=None):
    # A decode step's products add the residual themselves (two kernels in one).
    if isinstance(weight, StackedWeight):
        out = stacked(_linear, x, weight, bias)
    elif isinstance(weight, QuantizedWeight):  # straight from the packed parts, or dequantized where not taken
        if not quant_kernels.takes(x, weight):
            out = quantized_linear(x, weight, bias)
        elif residual is not None and quant_kernels.fuses(x, weight) and kernels.residual_takes(x, residual,
                                                                                                weight.rows):
            return quant_kernels.linear(x, weight, bias, residual=residual)
        else:
            out = quant_kernels.linear(x, weight, bias)
    elif kernels.gemv_takes(x, weight):  # a decode step's one row: read the weight at HBM speed
        if residual is not None and kernels.residual_takes(x, residual, weight.shape[0]):
            return kernels.gemv(x, weight, bias, residual=residual)
        out = kernels.gemv(x, weight, bias)
    else:
        out = F.linear(x, weight, bias)
    return out if residual is None else residual + out


def _normed_linear(x, norm, weight, bias=None):
    # A decode step's product normalizes its input itself where that is cheap (two kernels in one).
    if kernels.norm_takes(x, norm):
        if isinstance(weight, QuantizedWeight):
            if quant_kernels.fuses(x, weight) and quant_kernels.gemv_norms(weight):
                return quant_kernels.linear(x, weight, bias, norm=norm)
        elif isinstance(weight, torch.Tensor) and kernels.gemv_takes(x, weight) and kernels.gemv_norms(*weight.shape):
            return kernels.gemv(x, weight, bias, norm=norm)
    return _linear(_rms_norm(x, *norm), weight, bias)


def _rms_norm(x, weight, eps, offset=False):
    if kernels.rms_norm_takes(x, weight):  # one kernel instead of eight
        return kernels.rms_norm(x, weight, eps, offset)
    return rms_norm(x, weight, eps, offset)


def _add_rms_norm(x, delta, weight, eps, offset=False):
    if kernels.add_rms_norm_takes(x, delta, weight):
        return kernels.add_rms_norm(x, delta, weight, eps, offset)
    return add_rms_norm(x, delta, weight, eps, offset)


def _gated(gate_up, activation):
    if kernels.gated_takes(gate_up):
        return kernels.gated(gate_up, activation)
    return gated(gate_up, activation)


def _gated_linear(gate_up, activation, weight, residual=None):
    # A decode step's: the gate and the residual add in the product's kernel (three kernels in one).
    if isinstance(weight, QuantizedWeight):
        if quant_kernels.fuses(gate_up, weight) and kernels.fused_down_takes(gate_up, residual, weight.rows, weight.cols):
            if quant_kernels.gemv_gates(weight):
                return quant_kernels.linear(gate_up, weight, gate=activation, residual=residual)
            return quant_kernels.linear(_gated(gate_up, activation), weight, residual=residual)
    elif (isinstance(weight, torch.Tensor) and kernels.gemv_takes(gate_up, weight, gated=True)
          and kernels.fused_down_takes(gate_up, residual, *weight.shape)):
        if kernels.gemv_gates(weight):
            return kernels.gemv(gate_up, weight, gate=activation, residual=residual)
        return kernels.gemv(_gated(gate_up, activation), weight, residual=residual)
    out = _linear(_gated(gate_up, activation), weight)
    return out if residual is None else residual + out


def _rope_and_store(qkv, cos, sin, positions, cache_k, cache_v, heads, q_norm=None, k_norm=None, eps=0.0,
                    offset=False):
    if kernels.rope_and_store_takes(qkv, cos, cache_k, q_norm, k_norm):  # thirteen kernels in one (q/k norms: 15)
        return kernels.rope_and_store(qkv, cos, sin, positions, cache_k, cache_v, heads, q_norm, k_norm, eps, offset)
    return rope_and_store(qkv, cos, sin, positions, cache_k, cache_v, heads, q_norm, k_norm, eps, offset)


def _decode_attention(q, keys, values, allowed, scale):
    if kernels.decode_attention_takes(q, keys, values, allowed):  # flash decoding
        return kernels.decode_attention(q, keys, values, allowed, scale)
    return decode_attention(q, keys, values, allowed, scale)


def _cached_attention(qkv, cos, sin, slots, cache_k, cache_v, length, allowed, heads, scale, q_norm=None, k_norm=None,
                      eps=0.0, offset=False):
    if kernels.self_attention_takes(qkv, cos, sin, cache_k, cache_v, length, allowed, q_norm, k_norm):
        return kernels.decode_self_attention(qkv, cos, sin, slots, cache_k, cache_v, length, allowed, heads, scale,
                                             q_norm, k_norm, eps, offset)  # a decode step's: one kernel
    q = _rope_and_store(qkv, cos, sin, slots, cache_k, cache_v, heads, q_norm, k_norm, eps, offset)
    return attend_cache(_decode_attention, q, cache_k, cache_v, length, allowed, scale)


def _likeliest(logits, k, out=None):
    if kernels.likeliest_takes(logits, k) and (out is None or all(o.is_contiguous() for o in out)):
        return kernels.likeliest(logits, k, out)  # two kernels where PyTorch's take about forty
    return likeliest(logits, k, out)


TRITON = Ops(_linear, _normed_linear, _rms_norm, _add_rms_norm, _gated, _gated_linear, _cached_attention,
             _likeliest, kernels=True)
