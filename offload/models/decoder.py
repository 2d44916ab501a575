"""A decoder-only language model with its weights passed in: the loop of every forward pass.

Nothing here owns a layer's weight. :meth:`Decoder.forward` walks the layers in
*segments* (runs of layers that the weight stream hands over together: a streamed
layer alone, consecutive resident layers as one); for each it asks the stream for
the weights, runs the segment, and hands them back:

    hs = [embed(chunk) for chunk in chunks]         # every token's residual stream
    for segment in stream.segments:
        weights = stream.acquire(segment)           # resident views, or slots the compute stream waits for
        hs = run(segment, hs, weights, chunks, cache)   # eagerly: run_segment; or a CUDA graph of it
        stream.release(segment)                     # the slots may be refilled: the next copies are issued
    return head(last tokens of hs)

Eager passes, prefill chunks, decode steps and the CUDA graphs of decode steps
all go through this loop; a graph is a capture of :meth:`run_segment` itself
(``offload/scheduler/graphs.py``), so the loop a reader reads is the one that runs.

A model *family* (``llama.py``, ``qwen3.py``, ``gemma3.py``...) subclasses
:class:`Decoder`: it reads its config fields, writes the table of named shapes of
its layers (``layer_entries``), computes one layer (``layer``) and counts what the
planner needs (bytes of temporaries, FLOPs per token). ``registry.py`` finds the
family of a checkpoint's ``architectures``. The operations a layer calls are
``self.ops``, chosen once per model (``ops.py``): offload's Triton kernels for
16-bit decode steps on a GPU, PyTorch's elsewhere.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..distributed import TensorParallel
from . import kernels
from .blocks import EVERY_PASS, BlockLayout, BlockSpec, Entry, GlobalWeights, build_layout
from .chunks import Chunk, DecodeChunk, Rope
from .config import ModelConfig
from .ops import Ops, apply_rope, attend
from .parallel import local_heads, vocab_parallel_embedding
from .quant import WeightFormat

# cuDNN's attention builds a plan the first time it sees each key length, so a first pass of decode
# steps (a new length every step) stalls the host for milliseconds per step, and with it the copy ring.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class WeightStream(Protocol):
    """Where a pass gets its layers' weights (``offload/scheduler/stream.py``)."""

    segments: list[list[int]]

    def acquire(self, segment: list[int]) -> list: ...
    def release(self, segment: list[int]) -> None: ...


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

    def copy_rows(self, to, source: int, positions: slice) -> None:
        """Row ``source``'s keys and values at ``positions``, in every layer, into the rows ``to`` (a slice, or a
        tensor of row indices), queued on the current stream."""
        for layers in (self.k, self.v):
            layers[:, to, :, positions] = layers[:, source : source + 1, :, positions]


class Decoder:
    """Embedding, decoder layers, final norm, LM head: the non-layer weights are held, layers are passed in.

    Class attributes and class methods describe a family's checkpoints (no weights needed:
    the planner uses them); an instance computes.
    """

    weights_class: ClassVar[type]  # the dataclass of one layer's tensors (views into its block)
    groups: ClassVar[dict[str, tuple[str, ...]]] = {}  # fused views: {"wqkv": ("wq", "wk", "wv")}
    linear: ClassVar[tuple[str, ...]] = ()  # the weights ``quantize`` compresses (not norms, not biases)
    qk_norm: ClassVar[bool] = False  # q and k are normalized per head before the rotary embedding
    # A decode layer's kernels: norm, four products (the second with the residual add in it; the last with the
    # gate and the residual add: one rank; a large weight's gate apart: ``kernels.GATING_WORK``), attention (the
    # rotation and the cache write in it), norm of the residual sum; a small weight's product normalizes its input
    # itself (``kernels.NORMING_WORK``: ``fused_norms``). Each takes at least a small kernel's time however few
    # bytes it reads (the plan counts that; fitted on an H200, it brought four predictions within 10%:
    # docs/benchmarks.md).
    decode_kernels_per_layer: ClassVar[int] = 7

    # ------------------------------------------------------------------ the family's checkpoints

    @classmethod
    def read_config(cls, raw: dict, fields, architecture: str) -> ModelConfig:
        """The :class:`ModelConfig` of a ``config.json`` (``fields``: its typed reader)."""
        raise NotImplementedError

    @classmethod
    def layer_entries(cls, config: ModelConfig, tp: TensorParallel) -> list[Entry]:
        """The named shapes of one layer's block on this rank, in block order (``{i}`` in a source: the layer)."""
        raise NotImplementedError

    @classmethod
    def layer_layout(cls, config: ModelConfig, tp: TensorParallel, dtype: torch.dtype,
                     fmt: WeightFormat | None = None, layer: int | None = None) -> BlockLayout:
        """One layer's block: its ``linear`` weights in ``fmt`` (quantized), or None (the model dtype); ``layer``
        for formats that differ from layer to layer (a GGUF file's)."""
        return build_layout(cls.layer_entries(config, tp), dtype, cls.weights_class, cls.groups, cls.linear, fmt,
                            tp.size, layer)

    @classmethod
    def blocks(cls, config: ModelConfig, tp: TensorParallel, dtype: torch.dtype,
               fmt: WeightFormat | None = None) -> list[BlockSpec]:
        """Every block of the model, in pass order: here one per layer, each needed by every pass."""
        if fmt is None or fmt.per_tensor is None:
            layout = cls.layer_layout(config, tp, dtype, fmt)
            return [BlockSpec(f"layer {i}", layout, i, EVERY_PASS) for i in range(config.n_layers)]
        layouts: dict[tuple, BlockLayout] = {}  # layers stored alike share a layout
        blocks = []
        for i in range(config.n_layers):
            layout = cls.layer_layout(config, tp, dtype, fmt, layer=i)
            layout = layouts.setdefault(layout.signature(), layout)
            blocks.append(BlockSpec(f"layer {i}", layout, i, EVERY_PASS))
        return blocks

    @classmethod
    def rope_inv_freqs(cls, config: ModelConfig) -> list[torch.Tensor]:
        """The inverse frequencies of each rotary embedding the layers use (float32)."""
        return [config.rope_inv_freq()]

    @classmethod
    def layer_rope(cls, config: ModelConfig, i: int) -> int:
        """Which of ``rope_inv_freqs`` layer ``i`` rotates with."""
        return 0

    @classmethod
    def decode_kernels(cls, config: ModelConfig, expert_kernels: bool = False) -> int:
        """The kernels of a decode step's layers (what it launches besides the embedding and the head; with
        ``expert_kernels``, where a mixture of experts' routed experts run the kernels of ``expert_kernels``)."""
        return config.n_layers * (cls.decode_kernels_per_layer - cls.fused_norms(config))

    @classmethod
    def fused_norms(cls, config: ModelConfig) -> int:
        """The norms of a decode layer that its products apply (for the 16-bit GEMV's rule on one rank's whole
        weights: a compressed weight's and a shard's differ a little): the input's, in the qkv product, and the
        MLP's, in the gate and up."""
        return cls.input_norm_fused(config) + kernels.gemv_norms(2 * config.intermediate_size, config.hidden_size)

    @classmethod
    def input_norm_fused(cls, config: ModelConfig) -> bool:
        """Whether a decode layer's qkv product applies its input norm (``fused_norms``' rule)."""
        return kernels.gemv_norms(config.q_dim + 2 * config.kv_dim, config.hidden_size)

    @classmethod
    def flops_per_token(cls, config: ModelConfig, tp: TensorParallel) -> int:
        """Matrix-product work of one token through every layer on this rank (a multiply-add is two)."""
        q_heads, kv_heads = local_heads(config, tp)
        d, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size // tp.size
        return 2 * config.n_layers * (d * (2 * q_heads + 2 * kv_heads) * hd + 3 * d * inter)

    @classmethod
    def flops_per_key(cls, config: ModelConfig, tp: TensorParallel) -> int:
        """Attention work of one token against one cached key, every layer."""
        return 4 * config.n_layers * local_heads(config, tp)[0] * config.head_dim

    @classmethod
    def activation_bytes(cls, config: ModelConfig, tp: TensorParallel, dtype: torch.dtype, max_batch: int,
                         max_seq_len: int, max_step_tokens: int, logit_positions: int) -> int:
        """Peak bytes of the temporaries of a pass whose chunks hold at most ``max_step_tokens`` (padded) tokens.

        Counts what ``forward`` allocates: the residual stream of every token a pass can hold
        (``max_batch`` rows of ``max_seq_len``), one more chunk's residual, and the largest of one
        chunk's attention or MLP temporaries, the logits of ``logit_positions`` positions (every
        position of a chunk for ``model(input_ids)``, each row's last for generation) and the float32
        work of sampling.
        """
        e, t, d = dtype.itemsize, max_step_tokens, config.hidden_size
        hq, hkv = local_heads(config, tp)
        hd, inter, vocab = config.head_dim, config.intermediate_size // tp.size, config.vocab_size
        qkv = (hq + 2 * hkv) * hd
        residual = (max_batch * max_seq_len + t) * d * e
        norm = t * d * (2 * 4 + e)  # float32 copies inside rms_norm
        qk_norm = t * (hq + hkv) * hd * (2 * 4 + e) if cls.qk_norm else 0
        mask = t * (hq // hkv) * max_seq_len * (1 + e)  # boolean, repeated per grouped head, and SDPA's bias of it
        attention = t * (3 * qkv + 4 * hq * hd) * e + mask + qk_norm
        decode_attention = (max_batch * hq * max_seq_len * (3 * e + 4)  # scores, masked, float32 softmax
                            + kernels.decode_attention_bytes(max_batch, hq, hkv, max_seq_len, hd, dtype))
        mlp = t * 3 * inter * e
        p = logit_positions
        logits = p * vocab * e * (2 if tp.size > 1 else 1) + p * d * (2 * 4 + e)  # and the final norm's copies
        sampling = max_batch * vocab * (e + 3 * 4)
        return residual + max(norm, attention, decode_attention, mlp, logits, sampling)

    @classmethod
    def graph_pieces(cls, config: ModelConfig) -> int:
        """The most CUDA graphs one bucket of shapes captures: one per layer where every layer streams."""
        return config.n_layers

    @classmethod
    def decode_graph_bytes(cls, config: ModelConfig, tp: TensorParallel, dtype: torch.dtype, max_batch: int,
                           max_seq_len: int, verify_width: int = 1) -> int:
        """GPU memory of the CUDA graphs of decode steps and (``verify_width > 1``: speculative decoding) of
        verify passes up to ``verify_width`` tokens a row (a power of two): their shared pool (the temporaries
        of the largest pass), the static buffers and tables of every bucket, and a margin for the graphs."""
        e, d = dtype.itemsize, config.hidden_size
        hq, hkv = local_heads(config, tp)
        hd, inter = config.head_dim, config.intermediate_size // tp.size
        b, seq = max_batch, max_seq_len
        qk_norm = b * (hq + hkv) * hd * (2 * 4 + e) if cls.qk_norm else 0
        temporaries = 2 * b * d * e + max(
            b * d * (2 * 4 + e),  # rms_norm's float32 copies
            b * (3 * (hq + 2 * hkv) * hd + 4 * hq * hd) * e + b * hq * seq * (3 * e + 4)  # attention
            + kernels.decode_attention_bytes(b, hq, hkv, seq, hd, dtype) + qk_norm,
            b * 3 * inter * e,
        )
        buckets = max_batch.bit_length() + 1  # row buckets 1, 2, 4, ... up to max_batch
        ropes, windows = len(cls.rope_inv_freqs(config)), len(set(config.sliding_windows))
        static = 2 * b * d * e + buckets * b * (2 * ropes * hd * e + windows * seq)
        if verify_width > 1:
            t = b * verify_width  # the widest pass's tokens
            wide = 2 * t * d * e + 4 * t * seq + max(  # a tree's masks being built, then the widest layer's work
                t * d * (2 * 4 + e),
                t * (3 * (hq + 2 * hkv) * hd + 4 * hq * hd) * e + t * (hq // hkv) * seq * (1 + e)
                + qk_norm * verify_width,
                t * 3 * inter * e,
            )
            temporaries = max(temporaries, wide)
            # Over the buckets of rows (summing to < 2b) and of widths 2, 4, ... (summing to < 2 verify_width):
            # the hidden states, positions, slots and trees of each, and per bucket of key length (at most
            # one per bit of max_seq_len; their lengths sum to < 2 max_seq_len) the rotary tables and masks.
            static += 4 * t * (d * e + 2 * 8 + verify_width) + 4 * t * (
                seq.bit_length() * 2 * ropes * hd * e + windows * 2 * seq)
        return temporaries + static + 32 * 2**20

    # ------------------------------------------------------------------ computing

    def __init__(self, config: ModelConfig, weights: GlobalWeights, tp: TensorParallel, ops: Ops,
                 device: torch.device, dtype: torch.dtype, max_positions: int, vocab_start: int = 0, experts=None):
        self.config, self.weights, self.tp, self.ops = config, weights, tp, ops
        self.experts = experts  # a mixture of experts' routed experts (scheduler/experts.py's ExpertStore)
        self.vocab_start = vocab_start
        self.heads, self.kv_heads = local_heads(config, tp)
        self.ropes = [Rope(inv, max_positions, dtype, device) for inv in self.rope_inv_freqs(config)]
        self.layer_ropes = [self.ropes[self.layer_rope(config, i)] for i in range(config.n_layers)]
        self.windows = sorted(set(config.sliding_windows), key=lambda w: w or 0)

    def forward(self, chunks: list[Chunk] | list[DecodeChunk], stream: WeightStream, cache: KVCache | None,
                rows: int, run=None, all_logits: bool = False) -> torch.Tensor:
        """One pass over ``rows`` cache rows: logits of each row's last new token ``[rows, V]``
        (or, for a single chunk, of every position, ``[B, T, V]``).

        Each layer is brought in once and every chunk goes through it, so a streamed layer
        crosses its link once per pass however many tokens the pass holds. ``run`` computes a
        segment: :meth:`run_segment` (the default) or the replay of a CUDA graph of it.
        """
        run = run or self.run_segment
        hs = [self.embed(chunk.tokens, chunk.host_tokens) for chunk in chunks]
        with sdpa_kernel(ATTENTION_BACKENDS):
            for segment in stream.segments:
                weights = stream.acquire(segment)  # on a GPU the compute stream waits for the copies, the host not
                hs = run(segment, hs, weights, chunks, cache)
                stream.release(segment)  # the segment's slots may now be refilled with later layers
        if all_logits:
            return self.head(chunks[0].all_tokens(hs[0]))
        return self.head(last_hidden(chunks, hs, rows))

    def run_segment(self, segment: list[int], hs: list[torch.Tensor], weights: list, chunks, cache,
                    layer=None) -> list:
        """Layers ``segment`` (with their ``weights``) over every chunk's hidden states (``layer``: ``self.layer``
        or a compiled copy of it)."""
        layer = layer or self.layer
        for i, w in zip(segment, weights):
            kv = cache.layer(i) if cache is not None else (None, None)
            hs = [layer(h, w, chunk, kv, i) for h, chunk in zip(hs, chunks)]
        return hs

    def layer(self, x: torch.Tensor, w, chunk, kv, i: int) -> torch.Tensor:
        """Decoder layer ``i`` over one chunk's hidden states ``x``, its weights ``w``, its cache ``kv``."""
        raise NotImplementedError

    def routed(self, i: int, tokens: int | None = None) -> bool:
        """Whether the host decides inside layer ``i`` in a pass of ``tokens`` tokens (None: in some pass; a
        mixture of experts reads its routing to fetch the experts, unless the kernels read them directly):
        such a layer runs as :meth:`attend_and_route`, all on the device (a CUDA graph captures it), then
        :meth:`routed_mlp` on the host's say."""
        return False

    def attend_and_route(self, x: torch.Tensor, w, chunk, kv, i: int):
        """A routed layer up to where the host must decide (``offload.models.moe.Routed``)."""
        raise NotImplementedError

    def routed_mlp(self, i: int, routed: list, w, tokens: int) -> list[torch.Tensor]:
        """The rest of routed layer ``i`` for each chunk's ``routed`` state (``tokens`` in all): its hidden states
        after the layer."""
        raise NotImplementedError

    def routing_buffers(self, h: torch.Tensor):
        """Empty buffers for a routed layer's state of the hidden states ``h`` (a graph's, kept between replays)."""
        raise NotImplementedError

    def embed(self, tokens: torch.Tensor, host_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens' embeddings on the compute device (``tokens`` there; the same ids on the host, if at hand)."""
        table = self.weights.embed  # in host memory when the plan offloads: look up there
        if table.device == tokens.device:
            ids = tokens
        else:  # without host ids, the host waits for the device's (sampled by the pass before)
            ids = host_tokens if host_tokens is not None else tokens.cpu()
        return vocab_parallel_embedding(ids, table, self.vocab_start, self.tp, tokens.device)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.ops.rms_norm(h, self.weights.final_norm, self.config.rms_norm_eps)
        return self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary from this rank's rows of the LM head."""
        return self.tp.all_gather_last_dim(self.ops.linear(h, self.weights.lm_head))[..., : self.config.vocab_size]

    def row_parallel(self, x: torch.Tensor, weight, bias: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T (+ bias) (+ residual)`` where ``weight`` holds this rank's input columns: the partial sums
        added over the ranks (the Megatron split's second half)."""
        if self.tp.size == 1:
            return self.ops.linear(x, weight, bias, residual)
        out = self.tp.all_reduce(self.ops.linear(x, weight))
        out = out if bias is None else out + bias  # added once, after the sum
        return out if residual is None else residual + out

    def gated_down(self, gate_up: torch.Tensor, activation: str, weight, residual: torch.Tensor | None = None):
        """A gated MLP's last product, ``act(gate) * up @ weight.T (+ residual)``, ``weight`` split by input columns
        over the ranks as ``row_parallel``'s. On one rank ``ops.gated_linear`` may do it all in one kernel."""
        if self.tp.size == 1:
            return self.ops.gated_linear(gate_up, activation, weight, residual)
        out = self.row_parallel(self.ops.gated(gate_up, activation), weight)
        return out if residual is None else residual + out

    # ------------------------------------------------------------------ attention

    def attention(self, qkv: torch.Tensor, chunk, kv, i: int, q_norm=None, k_norm=None,
                  offset: bool = False) -> torch.Tensor:
        """Self-attention of one chunk from its projected ``qkv`` (token layout, q | k | v on the last
        dimension): rotary embedding, cache write, attention; returns ``[..., H * hd]``. ``q_norm`` and
        ``k_norm`` (per-head RMS norm weights) normalize q and k before the rotation."""
        hd, (cache_k, cache_v), eps = self.config.head_dim, kv, self.config.rms_norm_eps
        cos, sin = chunk.rotary(self.layer_ropes[i])
        mask, scale = chunk.mask(self.config.sliding_windows[i]), self.config.attention_scale
        if chunk.attends_cache:  # a decode step, a verify pass: q and k rotated, k and v cached, attention
            o = self.ops.cached_attention(qkv, cos, sin, chunk.slots, cache_k, cache_v, chunk.kv_len, mask, self.heads,
                                          scale, q_norm, k_norm, eps, offset)
            return chunk.from_heads(o)
        q, k, v = qkv.split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        q = q.unflatten(-1, (self.heads, hd))
        k, v = k.unflatten(-1, (self.kv_heads, hd)), v.unflatten(-1, (self.kv_heads, hd))
        if q_norm is not None:
            q, k = self.ops.rms_norm(q, q_norm, eps, offset), self.ops.rms_norm(k, k_norm, eps, offset)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_k is not None:
            chunk.store(cache_k, cache_v, k, v)
        keys, values = chunk.keys(cache_k, cache_v, k, v)
        return chunk.from_heads(attend(chunk.heads(q), keys, values, mask, chunk.causal, scale))


def last_hidden(chunks: list[Chunk], hs: list[torch.Tensor], rows: int) -> torch.Tensor:
    """Each row's last new token ``[rows, d]``, from the last chunk that holds tokens of that row."""
    if len(chunks) == 1 and chunks[0].first_row == 0 and chunks[0].batch == rows:
        return chunks[0].last_tokens(hs[0])
    out = hs[0].new_zeros(rows, hs[0].shape[-1])
    for chunk, h in zip(chunks, hs):
        present = torch.tensor([b for b, n in enumerate(chunk.counts) if n], device=h.device)
        out[chunk.first_row + present] = chunk.last_tokens(h)[present]
    return out
