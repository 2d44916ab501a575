"""Decode steps and verify passes as CUDA graphs: captured once per bucket of shapes, then replayed.

A decode step launches a dozen small kernels per layer; issued one by one from
Python they take longer than the GPU needs to run them. Captured in a CUDA graph,
a run of layers is launched by one call. Speculative decoding's verify pass is a
wide decode step (every row adds ``width`` tokens: a ``VerifyChunk``) and is
captured the same way.

Nothing here loops over layers: a pass with graphs is the decoder's own pass
(``Decoder.forward``), whose ``run`` argument replays the graphs of each segment
instead of computing it, and a segment's graph is a capture of
``Decoder.run_segment`` on that segment (or, where the host decides inside a
layer, of the same functions in pieces: below). The copy rings stay as they are: before a
streamed layer's segment the compute stream waits for its slot (``acquire``), after
it the slot is freed and the next copy issued (``release``), on the host, between
replays. Consecutive resident layers form one segment, so a fully resident model
replays one graph per pass. A streamed layer always sits in the same slot (the
rings' fixed slot per block), so its graph reads its weights from the same address
every pass. The embedding and the LM head run eagerly around the graphs. Where the
host decides inside a layer (a mixture of experts reads its routing to fetch the
experts: ``Decoder.routed``), a segment is captured in pieces, each up to such a
layer's routing, and the host runs the rest of that layer between their replays.
Where the kernels read the experts directly (``direct_experts``), the routing stays
on the device and a segment is one graph again.

With ``WHOLE_PASS``, a pass over streamed layers is one graph, the rings' copies
inside it: the capture runs the segments' loop itself, acquire and release and all,
while the rings issue only the pass's own loads (``WeightStream.one_pass``). A
replay is then the host's wait for the loads issued before the pass, one graph, and
the rings' bookkeeping after it (``WeightStream.passed``: the next pass's first loads
issued behind it), where per-layer graphs had the host acquire, replay and release
layer by layer (60-100 us a streamed layer). Not where the host decides inside a
layer (pieces), nor for a peer's link (its copies run on the other GPU's stream).

A bucket is a shape: rows, tokens a row (1 for a decode step) and key length. Its
first pass runs eagerly on the capture stream (it warms the kernels up, and its
logits are that pass's result); then the bucket's segments are captured, and later
passes replay them. A bucket's graphs hold device memory of their own (besides the
pool), which the plan reserves for ``KEPT_BUCKETS`` buckets at the most graphs a
bucket can have; beyond the buckets that memory holds at the actual placement, the
least recently used bucket's graphs are freed (and captured again if it returns).
Graphs read static buffers per shape of rows and width (the
hidden state; the positions, and a verify pass's cache slots and tree), refilled
before each replay; the first segment's graph rebuilds the pass's rotary tables
and masks from them. Every bucket's graphs share one memory pool. Graphs run the
eager pass's kernels: a graph pass gives the eager pass's logits bit for bit.

With ``compile`` (opt-in), the decoder layer of decode steps is also compiled by
``torch.compile`` before it is captured (verify passes capture it uncompiled: each
width would compile again). A layer is compiled alone, never across layers, so a
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
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn.attention import sdpa_kernel

from .. import switches
from ..errors import OffloadWarning
from ..memory.host import queued_copy
from ..models.chunks import DecodeChunk
from ..models.decoder import ATTENTION_BACKENDS, Decoder, KVCache
from ..models.moe import Routed
from ..models.verify_chunk import VerifyChunk
from .stream import WeightStream


GRAPH_BYTES = 256 * 2**10  # device memory a captured graph holds outside PyTorch's allocator: about 0.2-0.25 MiB
#                           for a layer's or a piece's graph, growing with their number (an H200, 2026-12-05)
KEPT_BUCKETS = 12  # buckets of graphs the plan reserves that memory for, at the most graphs a bucket can have
# A pass over streamed layers captured whole, copies and all (see above). On an H100 (2026-12-06, SmolLM2 streamed,
# 30 layers) the host queued a one-token pass in 0.53 ms against 1.55, and speculative decoding with the int4 draft
# ran 1.57x plain decoding against 1.48x. On by default; OFFLOAD_WHOLE_PASS=0 turns it off (read at import).
WHOLE_PASS = switches.choice("OFFLOAD_WHOLE_PASS", switches.ON_OFF, True)


def graph_objects_bytes(most_graphs: int) -> int:
    """What the plan reserves for the graphs themselves, ``most_graphs`` a bucket (``Decoder.graph_pieces``)."""
    return KEPT_BUCKETS * most_graphs * GRAPH_BYTES


class CudaCapture:
    """Where graphs are captured: a side stream of ``device``, and one memory pool for every graph."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def on_side_stream(self):
        """A context in which work goes to the capture stream, after what the current stream has queued."""
        self.stream.wait_stream(torch.cuda.current_stream())
        return torch.cuda.stream(self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def join(self) -> None:
        """The current stream continues after the capture stream's work."""
        torch.cuda.current_stream().wait_stream(self.stream)

    def drop(self, graphs: list) -> None:
        """Free ``graphs`` (a bucket's) once the GPU has finished every replay of them."""
        torch.cuda.synchronize(self.stream.device)
        graphs.clear()

    def graph(self, work: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """``work`` captured (on the side stream, into the pool): replaying it runs its kernels again."""
        graph = torch.cuda.CUDAGraph()
        # thread-local: other threads (NCCL's watchdog, a server's event loop) may use CUDA meanwhile
        graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        try:
            work()
        finally:  # a failed capture must not leave the stream capturing
            graph.capture_end()
        return graph


@dataclass
class _Bucket:
    """One bucket's graphs and what they read and write.

    A segment's graphs are *pieces*: its layers captured up to each routed layer's routing (a mixture of
    experts), whose rest the host runs after the piece's replay (fetching the experts the routing chose); a
    segment without routed layers is one piece."""

    h: torch.Tensor  # [rows, width, d]: the embedded tokens in, each segment's output out (shared per rows, width)
    inputs: tuple[torch.Tensor, ...]  # what the pass's chunk is built from, on the device (shared likewise)
    routed: Routed | None = None  # a routed layer's state between its piece and the host's part (shared likewise)
    chunk: DecodeChunk | VerifyChunk | None = None  # built from ``inputs`` inside the first piece's capture
    graphs: dict = field(default_factory=dict)  # segment's first layer -> [(graph, then: the host's part or None)]

    def replay(self, segment: list[int], hs: list[torch.Tensor], weights, chunks, cache) -> list[torch.Tensor]:
        """What ``Decoder.run_segment`` computes, by replaying its capture (the weights are where the capture
        read them: a streamed layer's one slot)."""
        if hs[0] is not self.h:  # the first segment: the pass's embedded tokens
            self.h.copy_(hs[0])
        for graph, then in self.graphs[segment[0]]:
            graph.replay()
            if then is not None:
                then()
        return [self.h]


class DecodeGraphs:
    """Runs decode steps and verify passes of ``decoder`` as replayed CUDA graphs, bucket by bucket.

    ``capture`` makes the graphs (:class:`CudaCapture` on ``device``; tests give a stand-in that replays by running
    the captured work again)."""

    def __init__(self, decoder: Decoder, weights: WeightStream, cache: KVCache, device: torch.device,
                 compile: bool = False, capture=None):
        self.decoder, self.weights, self.cache = decoder, weights, cache
        self.compile = compile and decoder.tp.size == 1
        self.capture = capture or CudaCapture(device)
        self.pool = self.capture.pool
        self.buffers: dict[tuple[int, int], tuple] = {}  # per (rows, width): h, inputs, routed
        routed = sum(map(decoder.routed, range(decoder.config.n_layers)))
        self.routes = routed > 0
        self.whole = WHOLE_PASS and not self.routes and weights.captures_copies  # one graph a pass
        self.replayed_rings = _WholePass(weights) if self.whole else None  # the rings as a replay sees them
        self.buckets: OrderedDict[tuple[int, int, int], _Bucket] = OrderedDict()  # (rows, width, keys), LRU first
        self.captures = 0  # buckets captured so far (a benchmark keeps them out of its timing)
        # As many buckets as the plan's reserve for graph objects holds at this placement's graphs a bucket.
        self.max_buckets = max(1, KEPT_BUCKETS * decoder.graph_pieces(decoder.config) // (len(weights.segments)
                                                                                         + routed))

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Logits ``[rows, vocab]`` of a decode step (``tokens`` and ``positions`` on the device)."""
        def chunk(positions, tokens=None):
            return DecodeChunk(positions, kv_len, self.decoder.ropes, self.decoder.windows, tokens)

        return self._pass(kv_len, (positions,), chunk, tokens)

    def verify(self, tokens: torch.Tensor, host_tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               ancestors: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Logits ``[rows, width, vocab]`` of a verify pass whose rows are trees (``VerifyChunk``'s arguments;
        ``tokens`` on the device, the rest anywhere: copied into the bucket's buffers)."""
        def chunk(positions, slots, ancestors, tokens=None, host_tokens=None):
            return VerifyChunk(tokens, host_tokens, positions, kv_len, self.decoder.ropes, self.decoder.windows,
                               slots, ancestors)

        return self._pass(kv_len, (positions, slots, ancestors), chunk, tokens, host_tokens)

    def _pass(self, kv_len: int, inputs: tuple, make_chunk, tokens: torch.Tensor, host_tokens=None) -> torch.Tensor:
        bucket = self._bucket(inputs[0].shape, inputs, kv_len)
        for buffer, value in zip(bucket.inputs, inputs):
            queued_copy(buffer, value)  # (the host lays out a verify pass's: a copy from pageable memory would wait)
        rows, wide = bucket.h.shape[0], tokens.dim() > 1
        if not bucket.graphs:
            return self._first_pass(bucket, make_chunk, tokens, host_tokens)
        stream = self.replayed_rings or self.weights
        return self.decoder.forward([bucket.chunk.with_tokens(tokens, host_tokens)], stream, self.cache, rows,
                                    run=bucket.replay, all_logits=wide)

    def _bucket(self, shape: torch.Size, inputs: tuple, kv_len: int) -> _Bucket:
        rows, width = shape[0], (shape[1] if len(shape) > 1 else 1)
        if (rows, width) not in self.buffers:
            like = self.decoder.weights.final_norm
            h = like.new_empty(rows, width, self.decoder.config.hidden_size)
            self.buffers[rows, width] = (h, tuple(torch.zeros_like(x, device=like.device) for x in inputs),
                                         self.decoder.routing_buffers(h) if self.routes else None)
        key = (rows, width, kv_len)
        if key not in self.buckets:
            if len(self.buckets) == self.max_buckets:  # the least recently used bucket's graphs go
                _, old = self.buckets.popitem(last=False)
                self.capture.drop([graph for pieces in old.graphs.values() for graph, _ in pieces])
            self.buckets[key] = _Bucket(*self.buffers[rows, width])
        self.buckets.move_to_end(key)
        return self.buckets[key]

    def _first_pass(self, bucket: _Bucket, make_chunk, tokens, host_tokens) -> torch.Tensor:
        """The bucket's first pass, eagerly on the capture stream (its warm-up), then the capture of its graphs."""
        try:
            return self._run_and_capture(bucket, make_chunk, tokens, host_tokens, self._segment_runner(tokens))
        except Exception as e:  # torch.compile needs a working Triton; without it, graphs of plain kernels
            if not self.compile or tokens.dim() > 1:  # verify passes are not compiled
                raise
            warnings.warn(f"compiling the decode layer failed ({type(e).__name__}: {e}); "
                          "capturing it uncompiled from now on", OffloadWarning, stacklevel=4)
            self.weights.reset()
            bucket.graphs.clear()
            self.compile = False
            return self._run_and_capture(bucket, make_chunk, tokens, host_tokens, self._segment_runner(tokens))

    def _segment_runner(self, tokens: torch.Tensor):
        """``run_segment``, with the layer compiled (a fresh copy for each bucket) for a decode step when compiling."""
        if not self.compile or tokens.dim() > 1:
            return self.decoder.run_segment
        return functools.partial(self.decoder.run_segment, layer=compiled_copy(self.decoder))

    def _run_and_capture(self, bucket: _Bucket, make_chunk, tokens, host_tokens, run) -> torch.Tensor:
        rows, wide = bucket.h.shape[0], tokens.dim() > 1
        # The layer compiles (and its kernels are tuned) on this first call, never during capture.
        with self.capture.on_side_stream(), _tuning(self.compile and not wide):
            chunk = make_chunk(*bucket.inputs).with_tokens(tokens, host_tokens)
            logits = self.decoder.forward([chunk], self.weights, self.cache, rows, run=run, all_logits=wide)
        self.capture.synchronize()
        graphs = {}
        with self.capture.on_side_stream(), sdpa_kernel(ATTENTION_BACKENDS):
            if self.whole:
                self.weights.wait_issued()  # the rings' first loads issued, as when each replay starts
                graphs[0] = [(self.capture.graph(functools.partial(self._whole_pass, bucket, make_chunk, run)), None)]
            for n, segment in enumerate(self.weights.segments if not self.whole else []):
                graphs[segment[0]] = self._capture_segment(bucket, segment, make_chunk if n == 0 else None, run)
        bucket.graphs = graphs  # only once every segment is captured: a failed capture is retried next pass
        self.captures += 1
        self.capture.join()
        return logits

    def _capture_segment(self, bucket: _Bucket, segment: list[int], make_chunk, run) -> list:
        """The segment's pieces: a graph up to and including each routed layer's routing, with the host's part
        of that layer to run after it; then a graph of the layers after the last routed one."""
        pieces, layers = [], []
        tokens = bucket.h.shape[:-1].numel()
        for i in segment:
            if not self.decoder.routed(i, tokens):
                layers.append(i)
                continue
            work = functools.partial(self._piece, bucket, layers, i, make_chunk, run)
            pieces.append((self.capture.graph(work), functools.partial(self._experts, bucket, i)))
            layers, make_chunk = [], None
        if layers:
            pieces.append((self.capture.graph(functools.partial(self._piece, bucket, layers, None, make_chunk, run)),
                           None))
        return pieces

    def _piece(self, bucket: _Bucket, layers: list[int], stop: int | None, make_chunk, run) -> None:
        """What a piece's graph does: (the pass's first) the rotary tables and masks from the pass's inputs,
        recomputed every replay; ``layers`` over ``bucket.h``; then routed layer ``stop`` up to its routing,
        copied into ``bucket.routed`` (or, without one, the output back into ``bucket.h``)."""
        if make_chunk is not None:
            bucket.chunk = make_chunk(*bucket.inputs)
        h = bucket.h
        if layers:
            h = run(layers, [h], self.weights.fixed_weights(layers), [bucket.chunk], self.cache)[0]
        if stop is None:
            bucket.h.copy_(h)
            return
        w = self.weights.fixed_weights([stop])[0]
        bucket.routed.copy_(self.decoder.attend_and_route(h, w, bucket.chunk, self.cache.layer(stop), stop))

    def _whole_pass(self, bucket: _Bucket, make_chunk, run) -> None:
        """What a whole pass's graph does: the rotary tables and masks from the pass's inputs, then every segment
        over ``bucket.h``, each streamed layer's copy and waits as the rings issue them within the pass."""
        bucket.chunk = make_chunk(*bucket.inputs)
        h = bucket.h
        with self.weights.one_pass():
            for segment in self.weights.segments:
                h = run(segment, [h], self.weights.acquire(segment), [bucket.chunk], self.cache)[0]
                self.weights.release(segment)
        bucket.h.copy_(h)

    def _experts(self, bucket: _Bucket, i: int) -> None:
        """The host's part of routed layer ``i``, between replays: the experts its routing chose (fetched where
        they are not on the device), their sum into ``bucket.h``."""
        w = self.weights.fixed_weights([i])[0]
        bucket.h.copy_(self.decoder.routed_mlp(i, [bucket.routed], w, bucket.routed.ids.shape[0])[0])


class _WholePass:
    """The rings as a replay of a whole pass's graph sees them: one segment of every layer, whose copies are in
    the graph; before it the loads issued already are waited for, after it the rings move on."""

    def __init__(self, weights: WeightStream):
        self.weights, self.segments = weights, [[i for segment in weights.segments for i in segment]]

    def acquire(self, segment: list[int]) -> None:
        self.weights.wait_issued()
        self.weights.check_pass_start()  # the graph copies what its capture found to copy: not more, not less

    def release(self, segment: list[int]) -> None:
        self.weights.passed()


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
