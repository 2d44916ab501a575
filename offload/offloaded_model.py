"""The loaded model: forward passes, and generation through the row engine.

``model(input_ids)`` returns logits, ``model.extend(new_tokens, cached)`` appends
tokens to KV cache rows (the primitive every generator is built on), and
``model.generate(input_ids)`` runs a batch of prompts through the row engine.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import InputError
from .inputs import (as_batch, as_sequences, check_flags, check_keywords, check_token_ids, is_list, new_token_limits,
                     prompts_from, step_rows, stop_ids)
from .loading import Setup, uses_cuda_graphs, verify_width as planned_verify_width
from .memory.host import on_device, to_device
from .memory.planner import HOST
from .memory.pool import WeightPool
from .models import ops
from .models.blocks import GlobalWeights
from .models.chunks import KV_BUCKET, Chunk, DecodeChunk, bucket, plan_chunks, verify_bucket
from .models.decoder import KVCache
from .models.parallel import local_heads, vocab_rows
from .models.verify_chunk import VerifyChunk
from .sampling import Sampling
from .scheduler.graphs import DecodeGraphs
from .scheduler.experts import ExpertStore
from .scheduler.row_engine import Request, RowEngine
from .scheduler.stream import CopyStream, WeightStream
from .speculative import MeasuredPrices


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # the new tokens of each row (a final eos included)
    finish_reasons: list[str]  # "eos" or "length" per row
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # tokens made by decode steps (the first token of a row comes from prefill)
    decode_steps: int = 0  # passes over the target after the prompts (a verify pass is one)
    decode_seconds: float = 0.0
    decode_row_passes: int = 0  # rows given a decode step, summed over decode steps
    drafted_tokens: int = 0  # speculative decoding: tokens drafted, and those the target accepted
    accepted_tokens: int = 0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens a row gained from each pass over the target after its prompt (1 without a draft)."""
        return self.decode_tokens / self.decode_row_passes if self.decode_row_passes else 0.0

    @property
    def acceptance(self) -> float:
        """The share of drafted tokens the target accepted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def ms_per_step(self) -> float:
        """Milliseconds per pass over the target after the prompts."""
        return 1e3 * self.decode_seconds / self.decode_steps if self.decode_steps else 0.0

    @property
    def ms_per_token(self) -> float:
        """Milliseconds per token made after the prompts (a pass may make several: speculative decoding)."""
        return 1e3 * self.decode_seconds / self.decode_tokens if self.decode_tokens else 0.0


def result_of(rows, stats) -> GenerationResult:
    """The result of finished engine ``rows`` and the engine's ``stats`` (``offload.scheduler.row_engine``)."""
    return GenerationResult([r.tokens for r in rows], [r.finish_reason for r in rows], stats.prompt_tokens,
                            stats.prefill_seconds, stats.decode_tokens, stats.decode_steps, stats.decode_seconds,
                            stats.decode_row_passes, stats.drafted_tokens, stats.accepted_tokens)


GENERATE_KEYWORDS = ("input_ids", "max_new_tokens", "attention_mask", "do_sample", "temperature", "top_k", "top_p",
                     "seed", "eos_token_id", "ignore_eos", "return_result")


def _plain(value):
    """``value`` with tensors and arrays as lists (their reprs elide long ones): what a rank compares."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        return [str(value.dtype), value.tolist()]
    return value


def _one_call_at_a_time(method):
    """A public verb of the model: it holds the model's one KV cache and its rings, so calls from several threads
    run one after another (a call's own inner calls pass); and none runs once the model is closed."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            if self.closed:
                raise InputError("this model is closed; load it again to use it")
            return method(self, *args, **kwargs)

    return locked


class OffloadedModel:
    """A decoder-only language model whose layers live where its plan put them.

    ``model(input_ids)`` returns logits; ``model.generate(input_ids)`` returns token ids.
    ``model.plan`` is this rank's placement plan and ``model.plans`` every rank's.
    Calls from several threads run one at a time.
    """

    def __init__(self, setup: Setup, pool: WeightPool, draft=None):
        s = setup
        self._lock, self.closed = threading.RLock(), False
        self._cache_owner = None  # a weak reference to the RowEngine whose rows are in the KV cache
        self.draft = draft  # speculative decoding's draft (``offload.drafts``), or None
        self.speculation_prices = MeasuredPrices()  # what its passes took against the plans' prices (on a GPU)
        self.config, self.options, self.tp, self.device, self.dtype = s.config, s.options, s.tp, s.device, s.dtype
        self.plan, self.plans = s.plan, s.plans
        self.pool = pool
        link = lambda tier: CopyStream(s.device, "cpu" if tier == HOST or s.device.type == "cpu" else tier)  # noqa: E731
        layers = len(s.plan.placement)  # the every-pass blocks, one per layer; then the routed experts
        self.weights = WeightStream(s.blocks[:layers], pool.blocks[:layers], s.plan.placement, pool.slots,
                                    {tier: link(tier) for tier in s.plan.streamed_tiers if tier in s.plan.slots})
        self.experts = None
        if s.plan.experts is not None:  # copies of their own per link: an expert never waits for the ring's
            self.experts = ExpertStore(s.blocks[layers:], pool.blocks[layers:], s.plan.experts.placement,
                                       pool.expert_slots, {tier: link(tier) for tier in s.plan.streamed_tiers},
                                       s.dtype, s.options.direct_experts)
            if s.options.prefetch_experts:
                self.experts.ahead = routers_ahead(s.plan.experts.needs.per_layer, self.weights.resident)
        views = s.globals_layout.views(pool.globals)
        if s.embedding_layout is not None:
            views.update(s.embedding_layout.views(pool.embedding))
        weights = GlobalWeights(views["embed"], views["final_norm"], views.get("lm_head", views["embed"]))
        self.decoder = s.family(s.config, weights, s.tp, ops.choose(s.device, s.dtype), s.device, s.dtype,
                                self.max_seq_len + 1, vocab_start=vocab_rows(s.config, s.tp)[0],  # + the sink
                                experts=self.experts)
        _, kv_heads = local_heads(s.config, s.tp)
        self.cache = KVCache(s.config.n_layers, self.max_batch, kv_heads, self.max_seq_len, s.config.head_dim,
                             s.dtype, s.device)
        self.graphs = (DecodeGraphs(self.decoder, self.weights, self.cache, s.device, compile=s.options.compile)
                       if uses_cuda_graphs(s.options, s.device) else None)

    @property
    def max_batch(self) -> int:
        return self.options.max_batch

    @property
    def max_seq_len(self) -> int:
        return self.options.max_seq_len

    @property
    def max_step_tokens(self) -> int:
        return self.options.max_step_tokens

    def claim_cache(self, engine) -> None:
        """Let ``engine`` (a ``RowEngine``) write rows of the KV cache: refused while another engine's rows are in
        it. An engine's rows live across its steps, so a second engine (``generate`` between a batch's or a
        server's steps) would overwrite them: wrong tokens, no error."""
        with self._lock:
            owner = self._cache_owner() if self._cache_owner is not None else None
            if owner is not None and owner is not engine and owner.holds_rows:
                raise InputError("another RowEngine's rows are in this model's KV cache (its requests still "
                                 "running between its steps): finish or cancel them first, or load another model")
            self._cache_owner = weakref.ref(engine)

    def _same_on_every_rank(self, verb: str, *arguments) -> None:
        """Under tensor parallelism every rank runs the same passes: a rank called with other arguments (or one
        whose arguments are refused while the others' are not) would break the collectives with a hang or a
        crash. Each rank compares its arguments with the others' before anything is checked."""
        if self.tp.size == 1:
            return
        mine = hashlib.sha256(repr(_plain(arguments)).encode("utf-8")).hexdigest()
        if len(set(self.tp.gather_objects(mine))) > 1:
            raise InputError(f"the ranks called {verb} with different arguments; under tensor parallelism every "
                             "rank must call it with the same ones")

    # ------------------------------------------------------------------ forward passes

    @_one_call_at_a_time
    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask=None, **unknown) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` of every position, with no KV cache.

        ``attention_mask`` (1 for tokens, 0 for padding, either side) marks padding; its
        positions get zero logits.
        """
        check_keywords(unknown, ("input_ids", "attention_mask"), "argument of the model's call")
        self._same_on_every_rank("the model", input_ids, attention_mask)
        if not self.options.all_logits:
            raise InputError("this model was loaded with all_logits=False (its plan reserves no room for the logits "
                             "of every position); load it with all_logits=True to call it on input_ids")
        ids = as_batch(input_ids)
        rows = prompts_from(ids, attention_mask)
        for b, row in enumerate(rows):
            check_token_ids(row, self.config.vocab_size, f"row {b}")
        if ids.numel() > self.max_step_tokens or ids.shape[1] > self.max_seq_len:
            raise InputError(
                f"a forward pass over {ids.shape[0]} x {ids.shape[1]} tokens exceeds max_step_tokens="
                f"{self.max_step_tokens} / max_seq_len={self.max_seq_len}; load the model with larger ones"
            )
        chunk = Chunk.build(rows, [0] * len(rows), self.device)
        logits = self._forward([chunk], cache=None, rows=len(rows), all_logits=True)
        if attention_mask is None:
            return logits
        mask = as_batch(attention_mask, "attention_mask").bool().to(logits.device)
        if logits.shape[1] < ids.shape[1]:  # every row padded: a tensor of the whole shape (its rows packed in)
            out = logits.new_zeros(*ids.shape, logits.shape[-1])
            out[mask] = logits[torch.arange(logits.shape[1], device=mask.device)[None, :] < mask.sum(1, keepdim=True)]
            return out
        for b in range(len(rows)):  # in place: the plan reserves one tensor of logits, and a row's copy is small
            keep = mask[b].nonzero().squeeze(1)
            if not torch.equal(keep, torch.arange(len(keep), device=keep.device)):
                logits[b, keep] = logits[b, : len(keep)].clone()
            logits[b, ~mask[b]] = 0
        return logits

    @_one_call_at_a_time
    @torch.inference_mode()
    def extend(self, new_tokens: list[list[int]], cached: list[int]) -> torch.Tensor:
        """Append ``new_tokens[b]`` to KV cache row ``b``, which holds ``cached[b]`` tokens already.

        Returns the logits of each row's last new token, ``[B, vocab]``. Rows with no new
        tokens are allowed (their logits are meaningless). Any number of tokens goes in one
        pass: each layer is brought in once, and the tokens go through it in chunks of at
        most ``max_step_tokens``. Generation and batch jobs are built on this, through the
        row engine.
        """
        new_tokens, cached = self._check_rows(new_tokens, cached)
        if all(len(tokens) <= 1 for tokens in new_tokens):
            tokens = to_device([t[0] if t else 0 for t in new_tokens], torch.long, self.device)
            return self.decode(tokens, [c if t else None for t, c in zip(new_tokens, cached)])
        chunks = [
            Chunk.build([new_tokens[b][lo:hi] for b, (lo, hi) in zip(range(first, stop), spans)],
                        [cached[b] + lo for b, (lo, _) in zip(range(first, stop), spans)],
                        self.device, first_row=first)
            for first, stop, spans in plan_chunks([len(t) for t in new_tokens], self.max_step_tokens)
        ]
        return self._forward(chunks, self.cache, rows=len(new_tokens))

    @_one_call_at_a_time
    @torch.inference_mode()
    def verify(self, new_tokens: list[list[int]], cached: list[int], width: int | None = None,
               parents: list[list[int]] | None = None) -> torch.Tensor:
        """Append ``new_tokens[b]`` to KV cache row ``b`` (which holds ``cached[b]`` tokens) and return the logits
        of every new token, ``[B, W, vocab]`` for ``W`` = ``width`` (default: the most tokens a row adds; a
        shorter row's logits past its tokens are meaningless).

        Speculative decoding's pass: a row adds its last token and its drafted ones, and the logits at
        each say what the target would have chosen there. Every row is padded to the same width (a
        ``VerifyChunk``: shapes fixed by the rows, the width and the key length; the speculator gives
        ``K + 1`` for a draft length ``K``, however many tokens a draft found) and goes through each layer
        at once: a streamed layer crosses its link once per pass. With CUDA graphs the pass is captured
        and replayed like a decode step, at a width padded to a power of two (:meth:`verify_width`), every
        row laid out as a tree (a chain is one).
        A row whose drafts are rejected simply has its cached length set back by the caller: the
        positions it wrote past it are overwritten by its next pass before anything reads them.

        With ``parents``, row ``b``'s tokens form a tree: token ``i > 0`` continues token
        ``parents[b][i - 1]`` (``parents[b]`` has one entry per token after the first), and sees only
        the cached tokens and its ancestors. Token ``i`` goes to cache position ``cached[b] + i``
        whatever its depth; :meth:`keep_path` moves the accepted branch into place.
        """
        new_tokens, cached = self._check_rows(new_tokens, cached)
        if parents is not None:
            parents = _check_parents(parents, new_tokens)
        n, longest = len(new_tokens), max(len(t) for t in new_tokens)
        if width is None:
            width = longest
        if not isinstance(width, int) or isinstance(width, bool) or width < longest:
            raise InputError(f"width must be an integer of at least the {longest} tokens of the longest row, "
                             f"got {width!r}")
        if n * self.verify_width(width) > self.verify_tokens:
            raise InputError(f"a verify pass of {n} rows x {self.verify_width(width)} tokens is more than the "
                             f"{self.verify_tokens} tokens the plan reserves memory for (max_step_tokens, or "
                             "max_batch rows of a draft's passes)")
        if width == 1:  # a decode step (captured in graphs on a GPU)
            tokens = to_device([t[0] if t else 0 for t in new_tokens], torch.long, self.device)
            return self.decode(tokens, [c if t else None for t, c in zip(new_tokens, cached)])[:, None]
        asked = width
        if self.graphs is not None:  # one capture serves chains and trees of a bucket of widths
            width = self.verify_width(width)
            parents = parents if parents is not None else [list(range(len(t) - 1)) for t in new_tokens]
        rows, sink = bucket(n, 1, self.max_batch), self.max_seq_len
        padded = new_tokens + [[]] * (rows - n)
        starts = cached + [0] * (rows - n)
        slot_rows = [[s + i if i < len(t) else sink for i in range(width)] for t, s in zip(padded, starts)]
        slots = torch.tensor(slot_rows, dtype=torch.long)
        host_tokens = torch.tensor([t + [0] * (width - len(t)) for t in padded], dtype=torch.long)
        kv_len = bucket(max(s + len(t) for t, s in zip(padded, starts)), KV_BUCKET, self.max_seq_len)
        positions, ancestors = slots, None
        if parents is not None:
            positions, ancestors = _tree_layout(parents + [[]] * (rows - n), slot_rows, sink)
        if self.graphs is not None:
            try:
                return self.graphs.verify(on_device(host_tokens, self.device), host_tokens, positions, slots,
                                          ancestors, kv_len)[:n, :asked]
            except BaseException:
                self._reset()
                raise
        chunk = VerifyChunk(on_device(host_tokens, self.device), host_tokens, on_device(positions, self.device), kv_len,
                            self.decoder.ropes, self.decoder.windows, on_device(slots, self.device),
                            None if ancestors is None else on_device(ancestors, self.device))
        return self._forward([chunk], self.cache, rows, all_logits=True)[:n]

    @property
    def verify_tokens(self) -> int:
        """The most tokens (rows x padded width) of a verify pass that the plan reserves memory for."""
        return max(self.max_step_tokens, self.max_batch * planned_verify_width(self.options, self.graphs is not None))

    def verify_width(self, width: int) -> int:
        """The tokens a row takes in a verify pass asked for ``width``: with CUDA graphs, a power of two (each
        width is a bucket of captures); as asked without."""
        return width if self.graphs is None else verify_bucket(width, self.max_seq_len)

    @_one_call_at_a_time
    @torch.inference_mode()
    def keep_path(self, cached: list[int], paths: list[list[int]]) -> None:
        """After a tree's verify pass: row ``b`` keeps tokens ``paths[b]`` (indices into its tokens of that pass,
        root first, each the parent of the next), moved to cache positions ``cached[b]``, ``cached[b] + 1``, ...
        (the row's cached length then grows by ``len(paths[b])``). A chain's path is in place already."""
        if not (is_list(cached) and is_list(paths) and len(cached) == len(paths) <= self.max_batch):
            raise InputError(f"keep_path takes one cached length and one path per row (at most {self.max_batch})")
        for b, (c, path) in enumerate(zip(cached, paths)):
            ints = is_list(path) and all(isinstance(v, int) and not isinstance(v, bool) for v in [c, *path])
            if not (ints and c >= 0 and all(0 <= i <= j for i, j in enumerate(path))
                    and c + max(path, default=0) < self.max_seq_len):
                raise InputError(f"row {b}: a path is indices of the pass's tokens, each at or past its place in "
                                 f"the path, within max_seq_len={self.max_seq_len}; got cached {c!r}, path {path!r}")
        moves = [(b, c + i, c + j) for b, (c, path) in enumerate(zip(cached, paths))
                 for i, j in enumerate(path) if i != j]
        if moves:
            rows, to, source = (torch.tensor(x, device=self.device) for x in zip(*moves))
            for layers in (self.cache.k, self.cache.v):
                layers[:, rows, :, to] = layers[:, rows, :, source]

    def _check_rows(self, new_tokens, cached) -> tuple[list[list[int]], list[int]]:
        """``extend``'s and ``verify``'s arguments, checked, as lists."""
        new_tokens, cached = step_rows(new_tokens, cached)
        if len(new_tokens) != len(cached):
            raise InputError(f"{len(new_tokens)} rows of new tokens but {len(cached)} cached lengths")
        if len(new_tokens) > self.max_batch:
            raise InputError(f"{len(new_tokens)} rows but the KV cache has max_batch={self.max_batch}")
        for b, (tokens, start) in enumerate(zip(new_tokens, cached)):
            if tokens:
                check_token_ids(tokens, self.config.vocab_size, f"row {b}")
            if not isinstance(start, int) or isinstance(start, bool) or start < 0:
                raise InputError(f"row {b}: cached must be a count of tokens >= 0, got {start!r}")
            if start + len(tokens) > self.max_seq_len:
                raise InputError(f"row {b} would grow past max_seq_len={self.max_seq_len}")
        if not any(new_tokens):
            raise InputError("a step needs at least one new token")
        return new_tokens, cached

    @_one_call_at_a_time
    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: list[int | None]) -> torch.Tensor:
        """Logits ``[rows, vocab]`` of a pass in which row ``b`` adds ``tokens[b]`` at ``positions[b]``.

        ``tokens`` is a LongTensor on the compute device; a row whose position is None adds
        nothing. Unchecked (``step`` checks): the row engine calls this with the tokens its
        previous pass sampled, still on the device. Nothing here waits for the GPU (unless
        the embedding table is in host memory: the ids are read back first), so the host
        queues this pass while the previous one runs. Shapes are fixed by buckets of rows and
        key length, so that a bucket's layers can be captured in CUDA graphs and replayed.
        """
        n = len(positions)
        rows, sink = bucket(n, 1, self.max_batch), self.max_seq_len
        kv_len = bucket(max(p + 1 for p in positions if p is not None), KV_BUCKET, self.max_seq_len)
        padded = to_device([sink if p is None else p for p in positions] + [sink] * (rows - n), torch.long,
                           self.device)
        tokens = F.pad(tokens[:n], (0, rows - n))
        try:
            if self.graphs is not None:
                return self.graphs.decode(tokens, padded, kv_len)[:n]
            chunk = DecodeChunk(padded, kv_len, self.decoder.ropes, self.decoder.windows, tokens=tokens)
            return self.decoder.forward([chunk], self.weights, self.cache, rows)[:n]
        except BaseException:
            self._reset()
            raise

    def _reset(self) -> None:
        """After a pass failed half way: the rings expect the next block of an unfinished pass, and the expert
        cache's copies may not have landed."""
        self.weights.reset()
        if self.experts is not None:
            self.experts.reset()

    def _forward(self, chunks: list, cache, rows: int, all_logits: bool = False) -> torch.Tensor:
        try:
            return self.decoder.forward(chunks, self.weights, cache, rows, all_logits=all_logits)
        except BaseException:
            self._reset()
            raise

    # ------------------------------------------------------------------ generation

    @_one_call_at_a_time
    def generate(self, input_ids, max_new_tokens: int | list[int] = 32, attention_mask=None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, eos_token_id: int | list[int] | None = None, ignore_eos: bool = False,
                 return_result: bool = False, **unknown):
        """Generate up to ``max_new_tokens`` per row (one limit, or one per row).

        ``input_ids`` is ``[batch, seq]`` (a list of lists of ids also works, rows of any
        length); with ``attention_mask``, padding (on either side) is dropped. Stops a row at
        ``eos_token_id`` (default: the config's) unless ``ignore_eos``. With ``do_sample``,
        row ``b`` samples with its own generator seeded ``seed + b``.

        Returns ``[batch, seq + new]`` token ids like ``transformers``' ``generate``: the
        input followed by the new tokens, rows shorter than the longest (stopped early, or by a lower
        ``max_new_tokens`` of their own) padded with the first stop id, whichever stopped them, as
        ``transformers`` pads without a ``pad_token_id`` (0 where there is none: ``ignore_eos``, say);
        for ragged list input, a list of prompt + new ids per row, unpadded.
        With ``return_result=True``, a :class:`GenerationResult` instead (new tokens per row,
        finish reasons, prefill and decode tokens/s).
        """
        check_keywords(unknown, GENERATE_KEYWORDS, "argument of generate")
        self._same_on_every_rank("generate", input_ids, attention_mask, max_new_tokens, do_sample, temperature,
                                 top_k, top_p, seed, eos_token_id, ignore_eos, return_result)
        prompts = prompts_from(input_ids, attention_mask)
        if not prompts:
            raise InputError("no prompts given")
        if len(prompts) > self.max_batch:
            raise InputError(f"{len(prompts)} prompts but the KV cache holds max_batch={self.max_batch} rows; "
                             f"load the model with max_batch={len(prompts)} or more")
        check_flags(ignore_eos=ignore_eos, return_result=return_result)
        limits = new_token_limits(max_new_tokens, len(prompts))
        eos = stop_ids(eos_token_id, self.config.eos_token_ids, self.config.vocab_size)
        sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        requests = [Request(tuple(p), n, sampling.with_seed_offset(b), () if ignore_eos else eos, key=b)
                    for b, (p, n) in enumerate(zip(prompts, limits))]
        engine = RowEngine(self, rows=len(requests))
        try:
            rows = engine.run(requests)
        finally:
            engine.release()  # a run stopped by an error leaves no rows that would keep others out
        result = result_of(rows, engine.stats)
        if return_result:
            return result
        return as_sequences(input_ids, prompts, result.tokens, pad=eos[0] if eos else 0)

    # ------------------------------------------------------------------ housekeeping

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Release the model's memory now (pinned host memory, its weights, KV cache and graphs on the device)
        rather than when it is garbage-collected; using it afterwards is an error."""
        with self._lock:
            if self.closed:
                return
            self.synchronize()
            self.pool.close()
            if self.draft is not None:
                self.draft.close()
            self.closed = True
            self.pool = self.weights = self.experts = self.decoder = self.cache = self.graphs = self.draft = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def routers_ahead(experts_per_layer: tuple[int, ...], resident: dict) -> dict[int, tuple[int, torch.Tensor]]:
    """Each routed layer's next routed layer and its router, where that layer's block is resident (a streamed
    block's router is not on the device yet when the guess is made)."""
    routed = [i for i, n in enumerate(experts_per_layer) if n]
    return {i: (j, resident[j].router) for i, j in zip(routed, routed[1:]) if j in resident}


def _check_parents(parents, new_tokens: list[list[int]]) -> list[list[int]]:
    """``verify``'s trees: one parent per token after a row's first, each an earlier token of the row."""
    if not (is_list(parents) and all(is_list(row) for row in parents)):
        raise InputError(f"parents must be a list of lists of token indices, got {parents!r}")
    if len(parents) != len(new_tokens):
        raise InputError(f"{len(parents)} rows of parents but {len(new_tokens)} rows of new tokens")
    for b, (row, tokens) in enumerate(zip(parents, new_tokens)):
        row = list(row)
        earlier = all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= i for i, p in enumerate(row))
        if len(row) != max(len(tokens) - 1, 0) or not earlier:
            raise InputError(f"row {b}: parents must give each token after the first an earlier token of the "
                             f"row, got {row!r} for {len(tokens)} tokens")
    return [list(row) for row in parents]


def _tree_layout(parents: list[list[int]], slots: list[list[int]], sink: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's rotary position (its row's first slot plus its depth; pads keep their slot, the sink) and
    who it attends to, ``[B, W, W]`` (its ancestors and itself). Laid out in bytes and lists, then made tensors:
    the host does it before it queues each verify pass (tensor ops a token took 0.1 ms for a chain of 8)."""
    positions, ancestors = [], bytearray()
    for row, row_slots in zip(parents, slots):
        width = len(row_slots)
        seen = [bytes(i) + b"\x01" + bytes(width - i - 1) for i in range(width)]  # a token's ancestors and itself
        depth = [0] * width
        for i, p in enumerate(row, start=1):
            seen[i] = seen[p][:i] + seen[i][i:]  # a parent comes before its child
            depth[i] = depth[p] + 1
        positions.append([s if s == sink else row_slots[0] + d for s, d in zip(row_slots, depth)])
        ancestors += b"".join(seen)
    width = len(slots[0])
    return (torch.tensor(positions, dtype=torch.long),
            torch.frombuffer(ancestors, dtype=torch.bool).view(len(slots), width, width))
