"""Decode steps as CUDA graphs: captured once per bucket of rows and key length, then replayed.

A decode step launches a dozen small kernels per layer; issued one by one from
Python they take longer than the GPU needs to run them. Captured in a CUDA graph,
a run of layers is launched by one call.

Nothing here loops over layers: a decode step with graphs is the decoder's own
pass (``Decoder.forward``), whose ``run`` argument replays the graph of each
segment instead of computing it, and a segment's graph is a capture of
``Decoder.run_segment`` on that segment. The copy rings stay as they are: before a
streamed layer's segment the compute stream waits for its slot (``acquire``), after
it the slot is freed and the next copy issued (``release``), on the host, between
replays. Consecutive resident layers form one segment, so a fully resident model
replays one graph per step. A streamed layer always sits in the same slot (the
rings' fixed slot per block), so its graph reads its weights from the same address
every step. The embedding and the LM head run eagerly around the graphs.

The first step of each bucket runs eagerly on the capture stream (it warms the
kernels up, and its logits are that step's result); then the bucket's segments
are captured, and later steps replay them. Graphs read and write static buffers
per row bucket (hidden state, positions) and share one memory pool. Graphs run the
eager step's kernels: a graph step gives the eager step's logits bit for bit.

With ``compile`` (opt-in), the decoder layer is also compiled by ``torch.compile``
before it is captured. A layer is compiled alone, never across layers, so a
streamed layer runs exactly the kernels of a resident one. Each bucket compiles its
own copy of the layer, with static shapes: dynamo keeps compiled versions per code
object, shared by every model in the process and capped in number. Inductor picks
some kernels by timing candidates, so two compilations can pick differently: that
is why compiling is off by default. Tensor-parallel ranks capture plain graphs: a
rank whose compile failed would fall out of step with the others.
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings
from dataclasses import dataclass, field

import torch
from torch.nn.attention import sdpa_kernel

from ..errors import OffloadWarning
from ..models.chunks import DecodeChunk
from ..models.decoder import ATTENTION_BACKENDS, Decoder, KVCache
from .stream import WeightStream


@dataclass
class _Bucket:
    """One bucket's graphs (one per segment, by its first layer) and what they read and write."""

    h: torch.Tensor  # [rows, 1, d]: the embedded tokens in, each segment's output out (shared by a row bucket)
    positions: torch.Tensor  # [rows] (shared by a row bucket)
    chunk: DecodeChunk | None = None  # built from ``positions`` inside the first segment's capture
    graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)

    def replay(self, segment: list[int], hs: list[torch.Tensor], weights, chunks, cache) -> list[torch.Tensor]:
        """What ``Decoder.run_segment`` computes, by replaying its capture (the weights are where the capture
        read them: a streamed layer's one slot)."""
        if hs[0] is not self.h:  # the first segment: the step's embedded tokens
            self.h.copy_(hs[0])
        self.graphs[segment[0]].replay()
        return [self.h]


class DecodeGraphs:
    """Runs decode steps of ``decoder`` as replayed CUDA graphs, bucket by bucket."""

    def __init__(self, decoder: Decoder, weights: WeightStream, cache: KVCache, device: torch.device,
                 compile: bool = False):
        self.decoder, self.weights, self.cache = decoder, weights, cache
        self.compile = compile and decoder.tp.size == 1
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per row bucket: (h, positions)
        self.buckets: dict[tuple[int, int], _Bucket] = {}

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Logits ``[rows, vocab]`` of a decode step (``tokens`` and ``positions`` on the device)."""
        rows = positions.shape[0]
        bucket = self._bucket(rows, kv_len)
        bucket.positions.copy_(positions)
        if not bucket.graphs:
            return self._first_step(bucket, tokens, kv_len)
        return self.decoder.forward([bucket.chunk.with_tokens(tokens)], self.weights, self.cache, rows,
                                    run=bucket.replay)

    def _bucket(self, rows: int, kv_len: int) -> _Bucket:
        if rows not in self.buffers:
            like = self.decoder.weights.final_norm
            self.buffers[rows] = (like.new_empty(rows, 1, self.decoder.config.hidden_size),
                                  torch.zeros(rows, dtype=torch.long, device=like.device))
        if (rows, kv_len) not in self.buckets:
            self.buckets[rows, kv_len] = _Bucket(*self.buffers[rows])
        return self.buckets[rows, kv_len]

    def _first_step(self, bucket: _Bucket, tokens: torch.Tensor, kv_len: int) -> torch.Tensor:
        """The bucket's first step, eagerly on the capture stream (its warm-up), then the capture of its graphs."""
        try:
            return self._run_and_capture(bucket, tokens, kv_len, self._segment_runner())
        except Exception as e:  # torch.compile needs a working Triton; without it, graphs of plain kernels
            if not self.compile:
                raise
            warnings.warn(f"compiling the decode layer failed ({type(e).__name__}: {e}); "
                          "capturing it uncompiled from now on", OffloadWarning, stacklevel=3)
            self.weights.reset()
            bucket.graphs.clear()
            self.compile = False
            return self._run_and_capture(bucket, tokens, kv_len, self._segment_runner())

    def _segment_runner(self):
        """``run_segment``, with the layer compiled (a fresh copy for each bucket) when compiling."""
        if not self.compile:
            return self.decoder.run_segment
        return functools.partial(self.decoder.run_segment, layer=compiled_copy(self.decoder))

    def _run_and_capture(self, bucket: _Bucket, tokens, kv_len: int, run) -> torch.Tensor:
        rows = bucket.positions.shape[0]
        self.stream.wait_stream(torch.cuda.current_stream())
        # The layer compiles (and its kernels are tuned) on this first call, never during capture.
        with torch.cuda.stream(self.stream), _tuning(self.compile):
            chunk = DecodeChunk(bucket.positions, kv_len, self.decoder.ropes, self.decoder.windows, tokens)
            logits = self.decoder.forward([chunk], self.weights, self.cache, rows, run=run)
        self.stream.synchronize()
        with torch.cuda.stream(self.stream), sdpa_kernel(ATTENTION_BACKENDS):
            for n, segment in enumerate(self.weights.segments):
                graph = torch.cuda.CUDAGraph()
                # thread-local: other threads (NCCL's watchdog, a server's event loop) may use CUDA meanwhile
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                if n == 0:  # the step's rotary tables and masks, from the positions, recomputed every replay
                    bucket.chunk = DecodeChunk(bucket.positions, kv_len, self.decoder.ropes, self.decoder.windows)
                weights = self.weights.fixed_weights(segment)
                h = run(segment, [bucket.h], weights, [bucket.chunk], self.cache)[0]
                bucket.h.copy_(h)
                graph.capture_end()
                bucket.graphs[segment[0]] = graph
        torch.cuda.current_stream().wait_stream(self.stream)
        return logits


def _tuning(compiling: bool):
    """Inductor's coordinate-descent tuning while a compiled layer first runs (imported only then: importing
    inductor takes seconds, and compiling is opt-in)."""
    if not compiling:
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(coordinate_descent_tuning=True)


def compiled_copy(decoder: Decoder):
    """``decoder.layer`` compiled from a fresh copy of its code (see the module's notes on compile)."""
    fn = type(decoder).layer
    fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return torch.compile(types.MethodType(fresh, decoder), dynamic=False)
