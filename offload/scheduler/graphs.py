"""Decode steps as CUDA graphs: captured once per bucket of rows and key length, then replayed.

A decode step launches some thirty small kernels per layer; issued one by one from
Python they take longer than the GPU needs to run them. Captured in a CUDA graph,
a run of layers is launched by one call.

The copy rings stay as they are. A step is cut into *segments* at every streamed
layer, because before a streamed layer runs the compute stream must wait for its
slot (``acquire``) and after it the slot is freed and the next copy issued
(``release``): those stay on the host, between replays. Consecutive resident
layers form one segment, so a fully resident model replays one graph per step. A
streamed layer always sits in the same slot (the rings' fixed slot per layer), so
its graph reads its weights from the same address every step.

The first step of each bucket runs eagerly on the capture stream (it warms the
kernels up, and its logits are that step's result); then the bucket's segments
are captured, and later steps replay them. Graphs read and write static buffers
per row bucket (hidden state, positions, logits) and share one memory pool.

A 16-bit layer runs the Triton kernels of ``models/kernels.py`` for its products,
norms, attention and the small work between them, graphs or not (eleven kernels a
layer). With ``compile`` (opt-in), the decoder layer is also compiled by
``torch.compile`` before it is captured, which now fuses little more (measured on
an H200: llama-2-7b decode 3.8 ms per token in plain graphs and compiled, against
3.05 ms of HBM time). A layer is compiled alone, never across layers, so a
streamed layer runs exactly the kernels of a resident one, and whether to compile
never depends on the placement. Each bucket compiles its own copy of the layer, with
static shapes: dynamo keeps compiled versions per code object, shared by every model
in the process and capped in number. Inductor picks some kernels by timing
candidates, so two compilations can pick differently: that is why compiling is off by
default (the plain graphs give an offloaded model the resident model's bits).
Tensor-parallel ranks capture plain graphs: a rank whose compile failed would fall out
of step with the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import contextlib
import types
import warnings

import torch
from torch.nn.attention import sdpa_kernel

from ..errors import OffloadWarning
from ..memory.planner import RESIDENT
from ..models.llama import ATTENTION_BACKENDS, KVCache, Transformer
from ..models.chunks import DecodeChunk, Rope
from .stream import WeightStream


@dataclass
class _Buffers:
    """The static inputs and output of every graph of one row bucket."""

    h: torch.Tensor  # [rows, 1, d]: the embedded tokens in, each segment's output out
    positions: torch.Tensor  # [rows]
    logits: torch.Tensor  # [rows, vocab]


class DecodeGraphs:
    """Runs decode steps of ``transformer`` as replayed CUDA graphs, bucket by bucket."""

    def __init__(self, transformer: Transformer, layers: WeightStream, cache: KVCache, rope: Rope,
                 placement: list[str], device: torch.device, compile: bool = False):
        self.transformer, self.layers, self.cache, self.rope = transformer, layers, cache, rope
        self.compile = compile and transformer.tp.size == 1
        self.windows = transformer.config.sliding_windows
        self.segments = segments(placement)
        self.streamed = {i for i, tier in enumerate(placement) if tier != RESIDENT}
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.buffers: dict[int, _Buffers] = {}
        self.graphs: dict[tuple[int, int], list[torch.cuda.CUDAGraph]] = {}
        self.steps: dict[tuple[int, int], DecodeChunk] = {}  # keeps each bucket's masks and tables alive

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Logits ``[rows, vocab]`` of a decode step (``tokens`` and ``positions`` on the device).

        The logits live in a static buffer: read them before the next step.
        """
        rows = positions.shape[0]
        buffers = self._buffers(rows)
        buffers.h.copy_(self.transformer.embed(tokens[:, None]))
        buffers.positions.copy_(positions)
        key = (rows, kv_len)
        if key not in self.graphs:
            layer = compiled_copy(self.transformer) if self.compile else self.transformer.decoder_layer
            try:
                self._first_step(key, buffers, layer)
            except Exception as e:  # torch.compile needs a working Triton; without it, graphs of plain kernels
                if not self.compile:
                    raise
                warnings.warn(f"compiling the decode layer failed ({type(e).__name__}: {e}); "
                              "capturing it uncompiled from now on", OffloadWarning, stacklevel=2)
                self.layers.reset()
                self.compile = False
                self._first_step(key, buffers, self.transformer.decoder_layer)
            return buffers.logits
        for segment, graph in zip(self.segments, self.graphs[key]):
            streamed = segment[0] in self.streamed  # a streamed layer is a segment of its own
            if streamed:
                self.layers.acquire(segment[0])  # the compute stream waits for the slot's copy
            graph.replay()
            if streamed:
                self.layers.release(segment[0])  # the slot may be refilled: the next copy is issued
        return buffers.logits

    def _buffers(self, rows: int) -> _Buffers:
        if rows not in self.buffers:
            d, vocab = self.transformer.config.hidden_size, self.transformer.config.vocab_size
            like = self.transformer.weights.final_norm
            self.buffers[rows] = _Buffers(like.new_empty(rows, 1, d), torch.zeros(rows, dtype=torch.long,
                                          device=like.device), like.new_empty(rows, vocab))
        return self.buffers[rows]

    def _first_step(self, key: tuple[int, int], buffers: _Buffers, layer) -> None:
        """Run the step eagerly on the capture stream (its warm-up), then capture the bucket's graphs,
        ``layer`` (the decoder layer, or its compiled copy) computing each layer."""
        _, kv_len = key
        self.stream.wait_stream(torch.cuda.current_stream())
        # The layer compiles (and its kernels are tuned) on this first call, never during capture.
        with torch.cuda.stream(self.stream), _tuning(self.compile):
            step = DecodeChunk(buffers.positions, kv_len, self.rope, set(self.windows))
            with sdpa_kernel(ATTENTION_BACKENDS):
                h = buffers.h
                for i in range(len(self.windows)):
                    weights = self.layers.acquire(i)
                    h = layer(h, weights, step, self.cache.layer(i), self.windows[i])
                    self.layers.release(i)
                buffers.logits.copy_(self.transformer.head(h[:, -1]))
        self.stream.synchronize()
        self.graphs[key] = self._capture(key, buffers, layer)
        torch.cuda.current_stream().wait_stream(self.stream)

    def _capture(self, key: tuple[int, int], buffers: _Buffers, layer) -> list[torch.cuda.CUDAGraph]:
        _, kv_len = key
        graphs = []
        with torch.cuda.stream(self.stream), sdpa_kernel(ATTENTION_BACKENDS):
            for n, segment in enumerate(self.segments):
                graph = torch.cuda.CUDAGraph()
                # thread-local: other threads (NCCL's watchdog, a server's event loop) may use CUDA meanwhile
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                if n == 0:  # the step's rotary tables and masks, from the positions, recomputed every replay
                    self.steps[key] = DecodeChunk(buffers.positions, kv_len, self.rope, set(self.windows))
                step, h = self.steps[key], buffers.h
                for i in segment:
                    h = layer(h, self.layers.fixed_weights(i), step, self.cache.layer(i), self.windows[i])
                if n == len(self.segments) - 1:
                    buffers.logits.copy_(self.transformer.head(h[:, -1]))
                else:
                    buffers.h.copy_(h)
                graph.capture_end()
                graphs.append(graph)
        return graphs


def _tuning(compiling: bool):
    """Inductor's coordinate-descent tuning while a compiled layer first runs (imported only then: importing
    inductor takes seconds, and compiling is opt-in)."""
    if not compiling:
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(coordinate_descent_tuning=True)


def compiled_copy(transformer: Transformer):
    """``transformer.decoder_layer`` compiled from a fresh copy of its code (see the module's notes on compile)."""
    fn = transformer.decoder_layer.__func__
    fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return torch.compile(types.MethodType(fresh, transformer), dynamic=False)


def segments(placement: list[str]) -> list[list[int]]:
    """Layers cut into graphs: each streamed layer alone, each run of resident layers together."""
    out, run = [], []
    for i, tier in enumerate(placement):
        if tier == RESIDENT:
            run.append(i)
            continue
        if run:
            out.append(run)
            run = []
        out.append([i])
    return out + ([run] if run else [])
