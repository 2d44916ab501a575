"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

Attention as in the Llama family; the MLP is a router that picks ``top_k`` of
``n_experts`` SiLU-gated MLPs (*experts*) per token and sums their outputs weighted by
the router's probabilities (Qwen2-MoE adds a shared expert behind a sigmoid gate).

Each routed expert is a block of its own (``ON_DEMAND``): a token needs ``top_k`` of
them, so a layer's every-pass block holds only the attention, the norms, the router
and the shared expert, and the experts a pass routes to are fetched when the router
has spoken (``offload/scheduler/experts.py``): resident ones are used where they
are, the others are copied into a device cache of expert slots while the ones already
there compute. A pass's chunks are all routed before any expert is fetched, so a
layer-major prefill brings each expert in once. A token's experts' contributions are
summed in expert order (placed in a grid, summed at once, in float32) whatever order
they arrived in, so where the experts live never changes the result. A sparse layer
is two steps: ``attend_and_route``, all on the device (a CUDA graph captures it:
``offload/scheduler/graphs.py``), and ``routed_mlp``, where the host reads the
routing; padding routes to no expert. With ``prefetch_experts``, ``attend_and_route``
also guesses the next routed layer's experts, which ``routed_mlp`` has copied ahead.
On a GPU a short pass (a decode step, a verify pass) computes the experts with the
kernels of ``expert_kernels.py``: copied ones once they are on the device
(``placed_mlp``), or, with ``direct_experts``, each where it lives (``direct_mlp``: the
routing never leaves the device, and no graph is cut). The two give the same bits.

Under tensor parallelism every expert is split as the dense MLP is (gate and up by
rows, down by columns) and the layer's experts are summed over the ranks with one
all-reduce; every rank computes the same routing from the same hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import TensorParallel
from ..errors import ConfigError
from ..memory.host import to_device
from . import expert_kernels
from .blocks import EVERY_PASS, ON_DEMAND, BlockLayout, BlockSpec, Entry, build_layout
from .config import ModelConfig, common_fields, is_int
from .expert_kernels import DIRECT_TOKENS
from .kernels import Norm
from .llama import Llama, mlp_entries
from .parallel import REPLICATED
from .quant import QuantizedWeight, WeightFormat


@dataclass(frozen=True)
class MoEConfig(ModelConfig):
    n_experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0  # each routed expert's hidden features
    shared_intermediate: int = 0  # Qwen2-MoE's shared expert (0: none)
    norm_topk_prob: bool = True  # the top_k probabilities renormalised to sum to one
    sparse_layers: tuple[bool, ...] = ()  # which layers route to experts (the others have a dense MLP)
    clip_qkv: float | None = None  # OLMoE: q, k and v clamped to +-clip_qkv


@dataclass(slots=True)
class MoELayerWeights:
    input_norm: torch.Tensor
    wqkv: torch.Tensor | QuantizedWeight
    wo: torch.Tensor | QuantizedWeight
    post_norm: torch.Tensor
    router: torch.Tensor | None = None  # [experts, hidden]; None in a dense layer
    bqkv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    w_gate_up: torch.Tensor | QuantizedWeight | None = None  # a dense layer's MLP
    w_down: torch.Tensor | QuantizedWeight | None = None
    w_shared_gate_up: torch.Tensor | QuantizedWeight | None = None  # Qwen2-MoE's shared expert
    w_shared_down: torch.Tensor | QuantizedWeight | None = None
    shared_gate: torch.Tensor | None = None  # [1, hidden]


@dataclass(slots=True)
class Routed:
    """A routed layer's work up to the point where the host must read the routing: the residual stream after
    attention, its norm (the MLP's input, one row per token ``[T, d]``), each token's ``top_k`` experts
    ``[T, k]`` and their weights, and (prefetching) the next routed layer's experts its router would pick for
    this norm (``ahead``, ``[T, k]``)."""

    x: torch.Tensor
    normed: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    ahead: torch.Tensor | None = None

    def copy_(self, other: "Routed") -> "Routed":
        for name in self.__slots__:
            if getattr(other, name) is not None:
                getattr(self, name).copy_(getattr(other, name))
        return self


@dataclass(slots=True)
class ExpertWeights:
    w_gate_up: torch.Tensor | QuantizedWeight  # [2 x expert features, hidden]
    w_down: torch.Tensor | QuantizedWeight


EXPERT_GROUPS = {"w_gate_up": ("w_gate", "w_up")}


class MoEDecoder(Llama):
    weights_class = MoELayerWeights
    groups = {**Llama.groups, "w_shared_gate_up": ("w_shared_gate", "w_shared_up")}
    linear = (*Llama.linear, "w_shared_gate", "w_shared_up", "w_shared_down")
    expert_linear = ("w_gate", "w_up", "w_down")
    router_source = "mlp.gate.weight"  # under model.layers.{i}.
    expert_prefix = "mlp.experts.{e}."
    expert_sources = ("gate_proj", "up_proj", "down_proj")
    float32_routing = False  # Mixtral multiplies expert outputs by float32 probabilities

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def read_moe(cls, raw: dict, f, architecture: str, counts: tuple[int, int],
                 experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts"), theta: float = 10000.0,
                 eps: float = 1e-6, expert_width: int | None = None, **fields) -> MoEConfig:
        """The config of an MoE family whose fields are Qwen's (the others pass what differs: ``theta``, ``eps``,
        ``expert_width`` and ``counts``, the experts and the experts a token takes, transformers' defaults where
        the config leaves them out; without an ``expert_width``, a family's experts are ``intermediate_size``
        wide; ``experts_keys``, the names its transformers config reads the experts' count by, the one it saves
        first). Each family passes its layers' ``sliding_windows``: every family reads its own fields for them."""
        if f.text("hidden_act", "silu") != "silu":
            raise ConfigError(f"{f.source}: unsupported hidden_act {raw['hidden_act']!r} (only 'silu')")
        common = common_fields(raw, f, architecture, theta=theta, eps=eps)
        n = common["n_layers"]
        key = next((k for k in experts_keys if raw.get(k) is not None), experts_keys[0])
        experts, top_k = f.count(key, default=counts[0]), f.count("num_experts_per_tok", default=counts[1])
        if top_k > experts:
            raise ConfigError(f"{f.source}: num_experts_per_tok {top_k} exceeds the {experts} experts")
        step = f.count("decoder_sparse_step", default=1)
        dense = raw.get("mlp_only_layers") or []
        if not isinstance(dense, list) or not all(is_int(i) and 0 <= i < n for i in dense):
            raise f.bad("mlp_only_layers", dense, f"a list of layer indices below {n}")
        values = dict(
            n_experts=experts, top_k=top_k,
            expert_intermediate=(f.count("moe_intermediate_size", default=expert_width) if expert_width
                                 else common["intermediate_size"]),
            norm_topk_prob=f.flag("norm_topk_prob", False),
            sparse_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(n)),
        )
        return MoEConfig(**common, **{**values, **fields})

    @classmethod
    def layer_entries(cls, config: MoEConfig, tp: TensorParallel, sparse: bool = True) -> list[Entry]:
        p, d = "model.layers.{i}.", config.hidden_size
        entries = cls.attention_entries(config, tp) + [
            Entry("post_norm", (d,), p + "post_attention_layernorm.weight", REPLICATED)]
        if not sparse:
            return entries + mlp_entries(config, tp, config.intermediate_size, p + "mlp.")
        entries.append(Entry("router", (config.n_experts, d), p + cls.router_source, REPLICATED))
        if config.shared_intermediate:
            entries += mlp_entries(config, tp, config.shared_intermediate, p + "mlp.shared_expert.",
                                   names=("w_shared_gate", "w_shared_up", "w_shared_down"))
            entries.append(Entry("shared_gate", (1, d), p + "mlp.shared_expert_gate.weight", REPLICATED))
        return entries

    @classmethod
    def expert_layout(cls, config: MoEConfig, tp: TensorParallel, dtype: torch.dtype,
                      fmt: WeightFormat | None, layer: int | None = None) -> BlockLayout:
        """One routed expert's block (``{e}`` in a source: the expert; ``layer``: whose tensors a format per tensor
        is looked up for, expert 0's standing for every expert's)."""
        entries = mlp_entries(config, tp, config.expert_intermediate, "model.layers.{i}." + cls.expert_prefix,
                              sources=cls.expert_sources)
        return build_layout(entries, dtype, ExpertWeights, EXPERT_GROUPS, cls.expert_linear, fmt, tp.size, layer)

    @classmethod
    def layer_layout(cls, config, tp, dtype, fmt=None, layer=None, sparse: bool = True) -> BlockLayout:
        return build_layout(cls.layer_entries(config, tp, sparse), dtype, cls.weights_class, cls.groups, cls.linear,
                            fmt, tp.size, layer)

    @classmethod
    def blocks(cls, config: MoEConfig, tp: TensorParallel, dtype: torch.dtype,
               fmt: WeightFormat | None = None) -> list[BlockSpec]:
        """Every layer's block (attention, router, shared expert; or a dense MLP), then every routed expert.
        A checkpoint stored quantized may store each layer otherwise (a GGUF file's Q4_K_M mix: some layers'
        experts' down projections in 6 bits, the others' in 4): its formats are looked up layer by layer, and
        layers stored alike share a layout."""
        stored = fmt is not None and fmt.per_tensor is not None
        layouts: dict[tuple, BlockLayout] = {}
        shared = lambda layout: layouts.setdefault(layout.signature(), layout)  # noqa: E731
        layers, experts = [], []
        for i, sparse in enumerate(config.sparse_layers):
            layer = i if stored else None
            layout = shared(cls.layer_layout(config, tp, dtype, fmt, layer=layer, sparse=sparse))
            layers.append(BlockSpec(f"layer {i}", layout, i, EVERY_PASS))
            if sparse:
                expert = shared(cls.expert_layout(config, tp, dtype, fmt, layer=layer))
                experts += [BlockSpec(f"layer {i} expert {e}", expert, i, ON_DEMAND, e)
                            for e in range(config.n_experts)]
        return layers + experts

    @classmethod
    def flops_per_token(cls, config: MoEConfig, tp: TensorParallel) -> int:
        """Attention, and the top_k experts (and the shared expert, or a dense MLP) each token runs through."""
        d = config.hidden_size
        attention = Llama.flops_per_token(config, tp) - 2 * config.n_layers * 3 * d * config.intermediate_size // tp.size
        sparse = sum(config.sparse_layers)
        mlp = sparse * (config.top_k * config.expert_intermediate + config.shared_intermediate)
        mlp += (config.n_layers - sparse) * config.intermediate_size
        return attention + 2 * 3 * d * mlp // tp.size

    @classmethod
    def decode_kernels(cls, config: MoEConfig, expert_kernels: bool = False) -> int:
        """A routed layer launches its attention's 5 kernels, the router's 5, each of its ``top_k`` experts' 3 and
        the grid's 8; by the expert kernels (read directly, or copies on a GPU), 14 whatever ``top_k`` (the sort,
        the ranks and places, the grid, the two expert kernels, its sum and the residual); a dense one as
        Llama's."""
        routed = sum(config.sparse_layers)
        experts = 14 if expert_kernels else 3 * config.top_k + 8
        attention = 5 - cls.input_norm_fused(config)
        dense = cls.decode_kernels_per_layer - cls.fused_norms(config)
        return routed * (attention + 5 + experts) + (config.n_layers - routed) * dense

    @classmethod
    def graph_pieces(cls, config: MoEConfig) -> int:
        """One more graph a bucket per routed layer: its layers are cut after each routing."""
        return config.n_layers + sum(config.sparse_layers)

    @classmethod
    def decode_graph_bytes(cls, config: MoEConfig, tp, dtype, max_batch, max_seq_len, verify_width=1) -> int:
        """The dense count, with the router's float32 probabilities in the pool, the routed state that each
        shape of rows and width keeps between a graph and the host's part (shapes' tokens sum to < 4 b w),
        and direct reads' work (each route's expert features and weighted output, its sorted indices)."""
        t, e, d = max_batch * verify_width, dtype.itemsize, config.hidden_size
        routed = 4 * t * (2 * d * e + config.top_k * (8 + 4))
        routed += t * config.top_k * ((config.expert_intermediate // tp.size + d) * e + 6 * 8 + config.top_k)
        return (super().decode_graph_bytes(config, tp, dtype, max_batch, max_seq_len, verify_width)
                + t * config.n_experts * 4 * 2 + routed)

    @classmethod
    def activation_bytes(cls, config: MoEConfig, tp, dtype, max_batch, max_seq_len, max_step_tokens,
                         logit_positions) -> int:
        """The dense layers' temporaries, or a chunk's routed rows (``top_k`` per token): gathered, each expert's
        output (and its float32 projection) kept until all are weighted (in float32 for float32 routing), placed
        in the grid and summed; by the expert kernels (passes of up to ``DIRECT_TOKENS``), each route's
        features."""
        dense = super().activation_bytes(config, tp, dtype, max_batch, max_seq_len, max_step_tokens, logit_positions)
        t, d, e, features = max_step_tokens, config.hidden_size, dtype.itemsize, config.expert_intermediate // tp.size
        routed = t * config.top_k * d * (4 * e + 2 * 4) + t * 3 * features * e
        routed += min(t, DIRECT_TOKENS) * config.top_k * features * e
        return dense + routed + t * config.n_experts * 4 * 3  # the router's float32 probabilities, a prefetch's guess

    # ------------------------------------------------------------------ computing

    def kernels(self, tokens: int) -> bool:
        """Whether a pass of ``tokens`` tokens computes its routed experts by the kernels of ``expert_kernels``
        (direct reads, or on a GPU experts copied into the cache): else an expert at a time."""
        return self.experts is not None and self.experts.table is not None and tokens <= DIRECT_TOKENS

    def direct(self, tokens: int) -> bool:
        """Whether a pass of ``tokens`` tokens reads its routed experts where they live (no host decision)."""
        return self.kernels(tokens) and self.experts.table.direct

    def routed(self, i: int, tokens: int | None = None) -> bool:
        return self.config.sparse_layers[i] and (tokens is None or not self.direct(tokens))

    def run_segment(self, segment, hs, weights, chunks, cache, layer=None) -> list:
        """Layers ``segment``: a dense layer as Llama's; a sparse one attends and routes every chunk, then runs
        the union of their experts, each fetched once (or, read directly, every chunk's on the device)."""
        layer = layer or self.layer
        tokens = sum(h.shape[:-1].numel() for h in hs)
        for i, w in zip(segment, weights):
            kv = cache.layer(i) if cache is not None else (None, None)
            if not self.config.sparse_layers[i]:
                hs = [layer(h, w, chunk, kv, i) for h, chunk in zip(hs, chunks)]
                continue
            routed = [self.attend_and_route(h, w, chunk, kv, i) for h, chunk in zip(hs, chunks)]
            hs = self.direct_mlp(i, routed, w) if self.direct(tokens) else self.routed_mlp(i, routed, w, tokens)
        return hs

    def attend(self, x: torch.Tensor, w: MoELayerWeights, chunk, kv, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream after attention, and its norm (the MLP's input)."""
        eps, ops = self.config.rms_norm_eps, self.ops
        qkv = ops.normed_linear(x, Norm(w.input_norm, eps), w.wqkv, w.bqkv)
        h = self.row_parallel(self.attention(qkv, chunk, kv, i, w.q_norm, w.k_norm), w.wo, w.bo)
        return ops.add_rms_norm(x, h, w.post_norm, eps)

    def attend_and_route(self, x: torch.Tensor, w: MoELayerWeights, chunk, kv, i: int) -> Routed:
        """Sparse layer ``i`` up to its routing, all on the device (what a CUDA graph captures)."""
        x, normed = self.attend(x, w, chunk, kv, i)
        normed = normed.reshape(-1, normed.shape[-1])
        ids, weights = self.route(normed, w.router)
        ahead = self.experts.ahead.get(i) if self.experts is not None else None
        guess = None if ahead is None else torch.topk(self.ops.linear(normed, ahead[1]), self.config.top_k).indices
        pads = chunk.pads()
        if pads is not None:  # a pad routes to no expert (-1): none is fetched for it
            ids = ids.masked_fill(pads.reshape(-1, 1), -1)
            guess = None if guess is None else guess.masked_fill(pads.reshape(-1, 1), -1)
        return Routed(x, normed, ids, weights, guess)

    def routing_buffers(self, h: torch.Tensor) -> Routed:
        """Empty buffers for a :class:`Routed` of the hidden states ``h`` (a graph's, kept between replays)."""
        tokens, k = h.shape[:-1].numel(), self.config.top_k
        weights = torch.float32 if self.float32_routing else h.dtype
        ahead = self.experts is not None and bool(self.experts.ahead)
        return Routed(torch.empty_like(h), h.new_empty(tokens, h.shape[-1]),
                      torch.empty(tokens, k, dtype=torch.long, device=h.device),
                      torch.empty(tokens, k, dtype=weights, device=h.device),
                      torch.empty(tokens, k, dtype=torch.long, device=h.device) if ahead else None)

    def layer(self, x: torch.Tensor, w: MoELayerWeights, chunk, kv, i: int) -> torch.Tensor:
        """A dense layer (``mlp_only_layers``)."""
        x, h = self.attend(x, w, chunk, kv, i)
        return self.gated_down(self.ops.linear(h, w.w_gate_up), "silu", w.w_down, residual=x)

    def route(self, h: torch.Tensor, router: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's ``top_k`` experts ``[T, k]`` and their weights (float32 for Mixtral, else the model
        dtype), from ``h [T, d]``."""
        probs = self.ops.linear(h, router).softmax(-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.config.top_k, dim=-1)
        if self.config.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return ids, weights if self.float32_routing else weights.to(h.dtype)

    def routed_mlp(self, i: int, routed: list[Routed], w: MoELayerWeights, tokens: int) -> list[torch.Tensor]:
        """Each chunk's residual stream after sparse layer ``i`` (of ``tokens`` tokens in all): its routed experts'
        outputs summed in expert order (the experts of every chunk fetched once; the host reads the routing
        here), plus the shared expert's. On a GPU, in passes of up to ``DIRECT_TOKENS`` tokens, the kernels of
        ``expert_kernels`` compute them once they are on the device (``placed_mlp``); else an expert at a time.

        Few operations a layer, whatever its experts (each launch costs the host time a decode step of a
        streamed mixture of experts waits for): a chunk's routed rows are gathered once, sorted by expert,
        each expert runs on its slice, and the weighted outputs are placed in a ``[tokens, top_k]`` grid,
        each token's experts in ascending order, and summed over it (accumulated in float32, rounded once)."""
        if self.kernels(tokens):
            return self.placed_mlp(i, routed, w)
        routes = self._routes([r.ids for r in routed])  # the host reads the routing here
        # ... and the guesses with it: read after this layer's experts are queued, it would wait for their copies
        guessed = ({e for r in routed for e in r.ahead.flatten().tolist() if e >= 0} if i in self.experts.ahead
                   else set())
        gathered = [r.normed.index_select(0, route.tokens) for r, route in zip(routed, routes)]
        outputs = [[None] * len(route.experts) for route in routes]  # per chunk, per expert in its order
        for e, weights in self.experts.fetch(i, sorted({e for route in routes for e in route.experts})):
            for c, route in enumerate(routes):
                if e in route.experts:
                    n, (lo, hi) = route.experts[e], route.spans[e]
                    h = self.ops.gated(self.ops.linear(gathered[c][lo:hi], weights.w_gate_up), "silu")
                    outputs[c][n] = self.ops.linear(h, weights.w_down)
        if guessed:  # the next routed layer's likely experts, copied behind this layer's
            self.experts.prefetch(self.experts.ahead[i][0], sorted(guessed))
        outs = []
        for r, route, ys in zip(routed, routes, outputs):
            grid = r.normed.new_zeros(r.ids.numel(), r.normed.shape[1])
            if ys:
                scaled = torch.cat(ys) * r.weights.reshape(-1).index_select(0, route.slots)[:, None]
                grid.index_copy_(0, route.places, scaled.to(r.normed.dtype))
            outs.append(self.combine(r, grid, w))
        return outs

    def direct_mlp(self, i: int, routed: list[Routed], w: MoELayerWeights) -> list[torch.Tensor]:
        """Each chunk's residual stream after sparse layer ``i``, the routed experts of every chunk read where they
        live, each once, by the kernels of ``expert_kernels`` (no host decision: a CUDA graph captures it)."""
        table, ids, x, weights = self.experts.table, *_joined(routed)
        grid = expert_kernels.routed_experts(x, ids, weights, table.addresses[i], *table.projections[i],
                                             table.features, table.counts, table.on_host[i])
        return self._combined(routed, grid, w)

    def placed_mlp(self, i: int, routed: list[Routed], w: MoELayerWeights) -> list[torch.Tensor]:
        """``routed_mlp`` by the kernels: the host reads which experts the chunks route to, the store copies the
        missing ones into cache slots and points the layer's addresses there, and the kernels compute every
        chunk's experts in one call, as direct reads do (a few launches whatever the experts, and the same bits
        wherever an expert lives). Where the cache cannot hold them at once, in waves of what it holds."""
        table, ids, x, weights = self.experts.table, *_joined(routed)
        pending = sorted(set(ids.flatten().tolist()) - {-1})  # the host reads the routing here
        guessed = ({e for r in routed for e in r.ahead.flatten().tolist() if e >= 0} if i in self.experts.ahead
                   else set())
        grid, places = None, None
        while pending:
            addresses, placed, pending = self.experts.place(i, pending)
            wave = ids
            if pending or grid is not None:  # a wave: its experts' routes alone, into the whole routing's grid
                places = expert_kernels.grid_places(ids) if places is None else places
                wave = ids.where(torch.isin(ids, to_device(placed, torch.long, ids.device)), -1)
            grid = expert_kernels.routed_experts(x, wave, weights, addresses, *table.projections[i],
                                                 table.features, table.counts, table.on_host[i], places, grid)
            self.experts.release()
        if guessed:  # the next routed layer's likely experts, copied behind this layer's
            self.experts.prefetch(self.experts.ahead[i][0], sorted(guessed))
        return self._combined(routed, x.new_zeros(ids.numel(), x.shape[1]) if grid is None else grid, w)

    def _combined(self, routed: list[Routed], grid: torch.Tensor, w: MoELayerWeights) -> list[torch.Tensor]:
        """Each chunk's residual stream from its rows of the joined chunks' grid."""
        outs, at = [], 0
        for r in routed:
            outs.append(self.combine(r, grid[at: at + r.ids.numel()], w))
            at += r.ids.numel()
        return outs

    def combine(self, r: Routed, grid: torch.Tensor, w: MoELayerWeights) -> torch.Tensor:
        """The residual stream plus the routed experts' weighted outputs (``grid [tokens * top_k, d]``, each
        token's in expert order) summed over the ranks, plus the shared expert's."""
        tokens, d = r.normed.shape
        out = self.tp.all_reduce(grid.view(tokens, -1, d).sum(1))
        if w.w_shared_gate_up is not None:
            shared = self.gated_down(self.ops.linear(r.normed, w.w_shared_gate_up), "silu", w.w_shared_down)
            out = out + torch.sigmoid(self.ops.linear(r.normed, w.shared_gate)) * shared
        return r.x + out.view(r.x.shape)

    def _routes(self, ids: list[torch.Tensor]) -> list[Routes]:
        """Per chunk, its routed (token, slot) pairs sorted by expert, as index tensors on the compute device: the
        routing read back once per layer, the indices of every chunk sent in one transfer that does not wait for
        the GPU."""
        k, found, flat = self.config.top_k, [], []
        for chunk_ids in ids:
            pairs = []  # (expert, token, top-k slot, place: the token's row of the grid, its experts in order)
            for token, experts in enumerate(chunk_ids.tolist()):
                chosen = sorted((e, slot) for slot, e in enumerate(experts) if e >= 0)  # a pad routes to -1
                pairs += [(e, token, slot, token * k + rank) for rank, (e, slot) in enumerate(chosen)]
            pairs.sort()
            order, spans = {}, {}
            for at, (e, *_) in enumerate(pairs):
                if e not in order:
                    order[e], spans[e] = len(order), [at, at]
                spans[e][1] = at + 1
            found.append((order, {e: tuple(span) for e, span in spans.items()}, len(pairs)))
            flat += [p[1] for p in pairs] + [p[1] * k + p[2] for p in pairs] + [p[3] for p in pairs]
        index = to_device(flat, torch.long, ids[0].device)
        routes, at = [], 0
        for order, spans, n in found:
            routes.append(Routes(order, spans, index[at: at + n], index[at + n: at + 2 * n],
                                 index[at + 2 * n: at + 3 * n]))
            at += 3 * n
        return routes


def _joined(routed: list[Routed]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunks' routing, normed states and routing weights, one after another (for one kernel call)."""
    if len(routed) == 1:
        return routed[0].ids, routed[0].normed, routed[0].weights
    return (torch.cat([r.ids for r in routed]), torch.cat([r.normed for r in routed]),
            torch.cat([r.weights for r in routed]))


@dataclass(slots=True)
class Routes:
    """One chunk's routing as the host arranged it: its (token, slot) pairs sorted by expert."""

    experts: dict[int, int]  # expert -> its place in the order of the chunk's experts (ascending)
    spans: dict[int, tuple[int, int]]  # expert -> its pairs [lo, hi)
    tokens: torch.Tensor  # [pairs]: each pair's token (the row of the chunk's normed states it reads)
    slots: torch.Tensor  # [pairs]: token * top_k + top-k slot (its weight in the router's [tokens, top_k])
    places: torch.Tensor  # [pairs]: token * top_k + the expert's rank among the token's (its row of the grid)
