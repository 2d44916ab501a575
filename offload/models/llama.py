"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2), with weights passed in.

Nothing here owns a weight. ``Transformer.forward`` asks a *weight stream* for
layer ``i``'s tensors just before computing it and hands them back just after;
the stream (``offload/scheduler``) decides whether they are resident views or
views into a slot that a copy engine is filling. This file is the hot loop of a
decode step: read ``Transformer.forward`` from top to bottom.

The arithmetic mirrors the reference implementation op for op (the same norms
in float32, the same rotary tables, the same SDPA calls for prompts), so on the
same device and dtype the logits agree to the bit where the kernels are the
same. Decode steps attend as transformers' eager attention does (``attend_one``),
which agrees with SDPA to rounding, not to the bit. In 16 bits on a GPU, norms,
one-row products and decode attention run the Triton kernels of ``kernels.py``,
which agree with these to rounding (float32 sums in other orders), as do the
fused kernels of a decode step's rotary embedding and cache write, of the residual
add with the norm after it, and of the SiLU gate.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..distributed import TensorParallel
from . import kernels
from .config import ModelConfig
from .blocks import GlobalWeights, LayerWeights
from .parallel import (
    column_parallel_linear,
    local_heads,
    row_parallel_linear,
    vocab_parallel_embedding,
    vocab_parallel_logits,
)
from .chunks import Chunk, apply_rope


# cuDNN's attention builds a plan the first time it sees each key length, so a first pass of decode
# steps (a new length every step) stalls the host for milliseconds per step, and with it the copy ring.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class WeightStream(Protocol):
    def acquire(self, layer: int) -> LayerWeights: ...
    def release(self, layer: int) -> None: ...


class KVCache:
    """Preallocated keys and values: ``[layers, max_batch, kv_heads, max_seq_len + 1, head_dim]`` each.

    The last position of every row is a *sink* that decode steps write to for rows with
    nothing to add; attention never reads it. Zero-filled, so positions no row has
    written yet hold finite numbers (masked attention multiplies them by zero, and zero
    times NaN would be NaN).
    """

    def __init__(self, n_layers, max_batch, kv_heads, max_seq_len, head_dim, dtype, device):
        shape = (n_layers, max_batch, kv_heads, max_seq_len + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def nbytes(n_layers, max_batch, kv_heads, max_seq_len, head_dim, dtype) -> int:
        return 2 * n_layers * max_batch * kv_heads * (max_seq_len + 1) * head_dim * dtype.itemsize

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if kernels.rms_norm_applies(x, weight):  # 16 bits on a GPU: one kernel instead of eight
        return kernels.rms_norm(x, weight, eps)
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream ``x + delta``, and its norm."""
    if kernels.add_rms_norm_applies(x, delta, weight):  # 16 bits on a GPU: one kernel instead of two
        return kernels.add_rms_norm(x, delta, weight, eps)
    x = x + delta
    return x, rms_norm(x, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if kernels.silu_and_mul_applies(gate_up):  # 16 bits on a GPU: one kernel instead of two
        return kernels.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Transformer:
    """Embedding, decoder layers, final norm, LM head: the non-layer weights are held, layers are passed in."""

    def __init__(self, config: ModelConfig, weights: GlobalWeights, tp: TensorParallel, vocab_start: int = 0):
        self.config, self.weights, self.tp = config, weights, tp
        self.vocab_start = vocab_start
        self.heads, self.kv_heads = local_heads(config, tp)

    def forward(self, chunks: list[Chunk], layers: WeightStream, cache: KVCache | None, rows: int,
                all_logits: bool = False) -> torch.Tensor:
        """One pass over ``rows`` cache rows: logits of each row's last new token ``[rows, V]``
        (or, for a single chunk, of every position, ``[B, T, V]``).

        Each layer is brought in once and every chunk goes through it, so a streamed layer
        crosses its link once per pass however many tokens the pass holds.
        """
        hs = [self.embed(chunk.tokens, chunk.host_tokens) for chunk in chunks]  # every token's residual stream
        with sdpa_kernel(ATTENTION_BACKENDS):
            for i in range(self.config.n_layers):
                w = layers.acquire(i)  # on a GPU: the compute stream waits for the block's copy, the host does not
                kv = cache.layer(i) if cache is not None else (None, None)
                for c, chunk in enumerate(chunks):
                    hs[c] = self.decoder_layer(hs[c], w, chunk, kv, self.config.sliding_windows[i])
                layers.release(i)  # the block's slot may now be refilled with a later layer
        if all_logits:
            return self.head(chunks[0].all_tokens(hs[0]))
        return self.head(last_hidden(chunks, hs, rows))

    def embed(self, tokens: torch.Tensor, host_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens' embeddings on the compute device (``tokens`` there; the same ids on the host, if at hand)."""
        table = self.weights.embed  # in host memory when the plan offloads: look up there
        if table.device == tokens.device:
            ids = tokens
        else:  # without host ids, the host waits for the device's (sampled by the pass before)
            ids = host_tokens if host_tokens is not None else tokens.cpu()
        return vocab_parallel_embedding(ids, table, self.vocab_start, self.tp, tokens.device)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = rms_norm(h, self.weights.final_norm, self.config.rms_norm_eps)
        return vocab_parallel_logits(h, self.weights.lm_head, self.config.vocab_size, self.tp)

    def decoder_layer(self, x, w: LayerWeights, step: Chunk, kv, window: int | None) -> torch.Tensor:
        eps = self.config.rms_norm_eps
        h = self.attention(rms_norm(x, w.input_norm, eps), w, step, kv, window)
        x, h = add_rms_norm(x, h, w.post_norm, eps)  # x + h, and its norm
        return x + self.mlp(h, w)

    def attention(self, x, w: LayerWeights, step: Chunk, kv, window: int | None) -> torch.Tensor:
        hd = self.config.head_dim
        qkv = column_parallel_linear(x, w.wqkv, w.bqkv)
        cache_k, cache_v = kv
        if step.one_query and kernels.rope_and_store_applies(qkv, step.cos, cache_k, hd):
            # a decode step on a GPU: q and k rotated, k and v written to the cache, by one kernel
            q = kernels.rope_and_store(qkv, step.cos, step.sin, step.positions, cache_k, cache_v, self.heads)
            k = v = None  # a decode step attends to the cache
        else:
            q, k, v = qkv.split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
            q = q.unflatten(-1, (self.heads, hd))
            k, v = k.unflatten(-1, (self.kv_heads, hd)), v.unflatten(-1, (self.kv_heads, hd))
            q, k = apply_rope(q, step.cos, step.sin), apply_rope(k, step.cos, step.sin)
            if cache_k is not None:
                step.store(cache_k, cache_v, k, v)
        keys, values = step.keys(cache_k, cache_v, k, v)
        attend = self.attend_one if step.one_query else self.attend
        o = attend(step.heads(q), keys, values, step.mask(window), step.causal)
        return row_parallel_linear(step.from_heads(o), w.wo, self.tp, w.bo)

    def attend(self, q, keys, values, mask, causal: bool) -> torch.Tensor:
        """SDPA of ``q [B, H, T, hd]`` over ``keys``/``values`` ``[B, H_kv, L, hd]``."""
        scale, group = self.config.head_dim**-0.5, self.heads // self.kv_heads
        if mask is None:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=causal, scale=scale,
                                                  enable_gqa=group > 1)
        # SDPA's kernels that take a mask do not take grouped heads: the `group` query heads of
        # each kv head become `group` times as many queries of that head, the mask repeated.
        b, h, t, hd = q.shape
        if group > 1:
            q = q.reshape(b, self.kv_heads, group * t, hd)
            mask = mask[:, :, None].expand(b, 1, group, t, mask.shape[-1]).reshape(b, 1, group * t, -1)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
        return o.reshape(b, h, t, hd)  # a GPU kernel may return it strided

    def attend_one(self, q, keys, values, mask, causal: bool = False) -> torch.Tensor:
        """Attention of a decode step, one query per row: ``q [B, H, 1, hd]`` over a bucket of cached
        keys ``[B, H_kv, L, hd]``, masked per row.

        In 16 bits on a GPU, flash decoding (``kernels.decode_attention``: the keys cut into splits
        that run in parallel); elsewhere two matrix products around a softmax in float32 (as
        transformers' eager attention computes it). SDPA's kernels that take a mask give each
        head one block that walks the keys alone; both of these spread over every head and key.
        """
        scale = self.config.head_dim**-0.5
        if kernels.decode_attention_applies(q, keys, values, mask):
            return kernels.decode_attention(q, keys, values, mask, scale)
        b, h, _, hd = q.shape
        q = q.reshape(b, self.kv_heads, h // self.kv_heads, hd)  # the query heads that share a kv head
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(values.dtype)
        return torch.matmul(probs, values).reshape(b, h, 1, hd)

    def mlp(self, x, w: LayerWeights) -> torch.Tensor:
        return row_parallel_linear(silu_and_mul(column_parallel_linear(x, w.w_gate_up)), w.w_down, self.tp)


def last_hidden(chunks: list[Chunk], hs: list[torch.Tensor], rows: int) -> torch.Tensor:
    """Each row's last new token ``[rows, d]``, from the last chunk that holds tokens of that row."""
    if len(chunks) == 1 and chunks[0].first_row == 0 and chunks[0].batch == rows:
        return chunks[0].last_tokens(hs[0])
    out = hs[0].new_zeros(rows, hs[0].shape[-1])
    for chunk, h in zip(chunks, hs):
        present = torch.tensor([b for b, n in enumerate(chunk.counts) if n], device=h.device)
        out[chunk.first_row + present] = chunk.last_tokens(h)[present]
    return out


def step_activation_bytes(config: ModelConfig, tp: TensorParallel, dtype: torch.dtype,
                          max_batch: int, max_seq_len: int, max_step_tokens: int) -> int:
    """Peak bytes of the temporaries of a pass whose chunks hold at most ``max_step_tokens`` (padded) tokens.

    Counts what ``Transformer.forward`` allocates: the residual stream of every token a
    pass can hold (``max_batch`` rows of ``max_seq_len``), one more chunk's residual, and
    the largest of one chunk's attention or MLP temporaries, the logits of every position
    (what ``model(input_ids)`` returns) and the float32 work of sampling.
    """
    e, t, d = dtype.itemsize, max_step_tokens, config.hidden_size
    hq, hkv = local_heads(config, tp)
    hd, inter, vocab = config.head_dim, config.intermediate_size // tp.size, config.vocab_size
    qkv = (hq + 2 * hkv) * hd
    residual = (max_batch * max_seq_len + t) * d * e
    norm = t * d * (2 * 4 + e)  # float32 copies inside rms_norm
    mask = t * (hq // hkv) * max_seq_len * (1 + e)  # boolean, repeated per grouped head, and SDPA's bias of it
    attention = t * (3 * qkv + 4 * hq * hd) * e + mask
    decode_attention = (max_batch * hq * max_seq_len * (3 * e + 4)  # attend_one's scores, masked, float32 softmax
                        + kernels.decode_attention_bytes(max_batch, hq, hkv, max_seq_len, hd, dtype))  # or the kernel's
    mlp = t * 3 * inter * e
    all_logits = t * vocab * e * (2 if tp.size > 1 else 1) + norm
    sampling = max_batch * vocab * (e + 3 * 4)
    return residual + max(norm, attention, decode_attention, mlp, all_logits, sampling)


def decode_graph_bytes(config: ModelConfig, tp: TensorParallel, dtype: torch.dtype, max_batch: int,
                       max_seq_len: int) -> int:
    """GPU memory of the decode graphs: their shared pool (one decode step's temporaries at the largest
    row bucket), the static buffers of every row bucket, and a margin for the graphs themselves."""
    e, d = dtype.itemsize, config.hidden_size
    hq, hkv = local_heads(config, tp)
    hd, inter, vocab = config.head_dim, config.intermediate_size // tp.size, config.vocab_size
    b = max_batch
    temporaries = 2 * b * d * e + max(
        b * d * (2 * 4 + e),  # rms_norm's float32 copies
        b * (3 * (hq + 2 * hkv) * hd + 4 * hq * hd) * e + b * hq * max_seq_len * (3 * e + 4)  # attend_one
        + kernels.decode_attention_bytes(b, hq, hkv, max_seq_len, hd, dtype),
        b * 3 * inter * e,
        b * vocab * e * (2 if tp.size > 1 else 1),
    )
    buckets = max_batch.bit_length() + 1  # row buckets 1, 2, 4, ... up to max_batch
    static = 2 * b * (d + vocab) * e + buckets * b * (2 * hd * e + len(set(config.sliding_windows)) * max_seq_len)
    return temporaries + static + 32 * 2**20
