"""Loading, step by step: config -> budget -> plan -> pool -> weights.

``prepare`` decides everything before a byte of weights is read (the plan is
made here, so ``plan_model`` stops after it); ``load_weights`` allocates each tier
once and reads every tensor straight into its final place (a weight to be
quantized is read, quantized and written into its place one tensor at a time).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .distributed import TensorParallel, init_tensor_parallel, local_gpu
from .drafts import COPIES, MODEL, NGRAM, draft_kind, draft_label, draft_options
from .errors import BudgetError, ConfigError, InputError, PlanError
from .memory.bandwidth import link_bandwidths, peer_is_direct
from .memory.budget import Budget, beyond_machine, format_size
from .memory.experts import ExpertNeeds
from .memory.planner import RESIDENT, MemoryNeeds, Plan, make_plan
from .memory.pool import WeightPool
from .models.checkpoint import CheckpointSource, is_gguf
from .models.chunks import verify_bucket
from .models.config import ModelConfig, config_from_dict, load_config
from .models.blocks import (EVERY_PASS, ON_DEMAND, BlockLayout, BlockSpec, TensorSpec, embedding_layout,
                            global_layout, local_shape)
from .models import ops
from .models.decoder import Decoder, KVCache
from .models.expert_kernels import DIRECT_TOKENS
from .models.parallel import check_divisible, local_heads
from .models.registry import family_of
from .models.quant import (FORMATS, STORED, WeightFormat, choose_kernel, describe, head_format, quantize_into,
                           scratch_bytes)
from .options import LoadOptions, parse_device, parse_dtype
from .quantized import stored_quantization
from .scheduler.experts import check_direct, kernels_compute_copies
from .scheduler.graphs import graph_objects_bytes
from .speculative import ASSUMED_ACCEPTANCE, DEFAULT_MAX_DRAFT, speculation_forecast
from .synthetic import RandomSource

DEFAULT_MAX_SEQ_LEN = 2048
# Default chunks of a pass: prefill runs faster in large ones, and an H200 saturates at about 2048 tokens.
DEFAULT_STEP_TOKENS, MIN_STEP_TOKENS = 2048, 128
WORKSPACE_BYTES = 64 * 2**20  # cuBLAS / SDPA workspaces and allocator rounding (peaks measured on an H200)


@dataclass(frozen=True)
class Setup:
    """Everything decided before a byte of weights is read."""

    config: ModelConfig
    options: LoadOptions  # with max_seq_len and max_step_tokens filled in
    tp: TensorParallel
    device: torch.device
    dtype: torch.dtype
    family: type[Decoder]  # the model's family: its layers' layout and computation
    blocks: list[BlockSpec]  # every block, in pass order
    globals_layout: BlockLayout  # final norm and LM head (and a tied embedding)
    embedding_layout: BlockLayout | None  # an untied embedding table
    plan: Plan  # this rank's
    plans: list[Plan]  # every rank's
    draft: "Setup | None" = None  # speculative decoding's draft model (resident), when the plan keeps one
    requantize: bool = False  # a GGUF file's tensors are read dense, to be quantized as the options say


def prepare(model, options: LoadOptions, requantize: bool = False, globals_layout: BlockLayout | None = None,
            links: dict[str, float] | None = None) -> Setup:
    """Read the config, resolve the budgets, measure (or recall) the links and make every rank's plan.
    ``requantize``: a GGUF file's weights are dequantized and quantized again as ``options.quantize`` says
    (a compressed copy of a GGUF target as its draft), where they are otherwise kept as stored. ``globals_layout``:
    the final norm's and LM head's layout to use (a copy's: its target's, whose memory it shares). ``links``: this
    rank's links as its target measured them (a draft's: each rank's own, so not an option, which every rank
    must give alike)."""
    config = _config(model)
    check_divisible(config, options.tp)
    tp = init_tensor_parallel(options.tp, None if options.device is None else parse_device(options.device))
    _same_on_every_rank(options, tp, config)
    device = _device(options.device, tp)
    dtype = parse_dtype(options.dtype, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    options = options.replace(max_seq_len=options.max_seq_len or min(config.max_position_embeddings,
                                                                      DEFAULT_MAX_SEQ_LEN))
    choose_direct = options.direct_experts is None  # the default: decided once the plan shows where experts live
    if choose_direct:
        options = options.replace(direct_experts=False)

    budget = Budget.parse(options.gpu_memory, options.cpu_memory, options.peer_memory, compute_device=device)
    offload_requested = budget.cpu_memory is not None or bool(budget.peer_memory)
    budget = _own_peers(budget, tp, device).resolved(device)
    family = family_of(config.architecture)
    requantize = requantize or _quantizes_gguf(model, options)
    fmt = _weight_format(model, options, ops.choose(device, dtype), dtype, requantize)
    blocks = _blocks(family, config, tp, dtype, fmt, device, budget, options.quantize)
    if options.direct_experts and any(block.fetch == ON_DEMAND for block in blocks):
        check_direct([block for block in blocks if block.fetch == ON_DEMAND], device, dtype)
    expanded = fmt is not None and not any(spec.quant for block in blocks for spec in block.layout.specs)
    globals_ = globals_layout or global_layout(config, tp, dtype, None if expanded else head_format(fmt))
    embedding = embedding_layout(config, tp, dtype)
    peers = list(budget.peer_memory)
    bandwidth = {**(links or {}), **(options.link_bandwidth or {})}
    if any(n not in bandwidth for n in ["host", "hbm", "matmul", *peers]):
        bandwidth = {**link_bandwidths(device, peers, tp, budget.gpu_memory // 8, budget.cpu_memory), **bandwidth}
    title = f" (rank {tp.rank} of {tp.size})" if tp.size > 1 else ""
    indirect = tuple(p for p in peers if not peer_is_direct(device, p))

    options = options.replace(max_step_tokens=options.max_step_tokens or _chunk_size(family, config, tp, dtype,
                                                                                    options, blocks))
    needs = memory_needs(family, config, tp, dtype, device, options, blocks, globals_, embedding)

    def place(needs: MemoryNeeds) -> list:
        """Every rank's plan (or the PlanError of a rank whose budget does not fit: every rank learns of it,
        none waits)."""
        try:
            plan = make_plan(needs, budget, bandwidth, str(device), options.slots, offload_requested, indirect, title)
        except PlanError as e:
            plan = e
        return tp.gather_objects(plan)

    kind, draft = draft_kind(options.draft), None
    if kind in (*COPIES, MODEL):  # first the plans without the draft model: no verify passes to reserve for
        plain = options.replace(draft=None, draft_tokens=None, draft_branches=None)
        plans = place(memory_needs(family, config, tp, dtype, device, plain, blocks, globals_, embedding))
    else:
        plans = place(needs)
    if kind == NGRAM and not _failed(plans):
        _describe(plans, f"prompt lookup (ngram): no model, no memory besides verify passes of up to "
                         f"{_max_draft(options) + 1} tokens a row")
    if kind in (*COPIES, MODEL) and not _failed(plans):
        try:
            copy = kind in COPIES
            ahead = _may_draft_ahead(options, tp, device)
            draft = prepare(model if copy else options.draft, draft_options(options, _max_draft(options), ahead=ahead),
                            copy, globals_ if copy else None, links=bandwidth)  # a copy's norm and head: the target's
        except ConfigError as e:
            if not copy and not Path(options.draft).exists():
                raise ConfigError(f"draft {options.draft!r}: neither ngram, int8, int4 nor a checkpoint that "
                                  "exists") from None
            raise ConfigError(f"draft {options.draft}: {e}") from None
        if not copy:
            _check_same_tokens(model, options.draft)
        plans, draft = _weigh_draft(options, config, needs, plans, draft, place, uses_cuda_graphs(options, device))
        if draft is not None and not _failed(plans) and draft.config.max_position_embeddings < options.max_seq_len:
            for plan in plans:
                plan.warnings.append(f"the draft {options.draft} was made for {draft.config.max_position_embeddings} "
                                     f"positions, rows reach {options.max_seq_len}: past them its drafts may be poor "
                                     "(the output stays the target's)")
    if _failed(plans):
        raise PlanError("; ".join(_failed(plans)))
    if choose_direct and _direct_would_pay(options, plans[tp.rank], device, tp, blocks, dtype):
        # every expert on one GPU
        return prepare(model, options.replace(direct_experts=True), requantize, globals_layout, links)
    if (choose_direct and options.tree_width > 1
            and _direct_would_pay(options.replace(tree_width=1), plans[tp.rank], device, tp, blocks, dtype)):
        # a draft model whose trees' passes are too wide for the expert kernels: direct reads pay more than trees
        return prepare(model, options.replace(direct_experts=True, tree_width=1), requantize, globals_layout, links)
    plans[tp.rank].warnings.extend(beyond_machine(budget, device))
    if (options.direct_experts or options.prefetch_experts) and needs.experts is None:
        flag = "--direct-experts" if options.direct_experts else "--prefetch-experts"
        for plan in plans:
            plan.warnings.append(f"{flag} does nothing here: {config.architecture} has no routed experts")
    if options.direct_experts and needs.experts is not None and not needs.experts.direct:
        for plan in plans:
            plan.warnings.append(f"direct expert reads serve passes of up to {DIRECT_TOKENS} tokens: with "
                                 f"{options.max_batch} rows, some decode steps or verify passes copy their experts")
    return Setup(config, options, tp, device, dtype, family, blocks, globals_, embedding, plans[tp.rank], plans,
                 draft, requantize)


def _same_on_every_rank(options: LoadOptions, tp: TensorParallel, config: ModelConfig) -> None:
    """Every rank loads the same model (its config: another checkpoint, or another model's, on one rank) with the
    same options (torchrun gives each the same flags); one that differs would break the collectives later, with a
    hang or a crash instead of an error. Each rank's device is its own."""
    if tp.size == 1:
        return
    mine = {f.name: repr(getattr(options, f.name)) for f in dataclasses.fields(options) if f.name != "device"}
    mine["the model's config"] = repr(config)
    differ = sorted({name for other in tp.gather_objects(mine) for name in mine if other.get(name) != mine[name]})
    if differ:
        raise ConfigError(f"the ranks were given different options ({', '.join(differ)}); every rank must load the "
                          "model with the same ones")


def _failed(plans: list) -> list[str]:
    return [str(p) for p in plans if isinstance(p, PlanError)]


def _check_same_tokens(model, draft) -> None:
    """A draft checkpoint must mean by each token id what the target means (a vocabulary of the same size is not
    enough: its ids could name other tokens). Where both have a tokenizer, the ids they share must name the
    same tokens, but for a few (1%: special tokens spelled otherwise, as a GGUF file and a tokenizer.json may)."""
    from .text import Tokenizer

    if not isinstance(model, (str, Path)):
        return
    mine, theirs = Tokenizer.from_checkpoint(model), Tokenizer.from_checkpoint(draft)
    if mine is None or theirs is None:
        return
    names = {i: token for token, i in theirs.inner.get_vocab(with_added_tokens=True).items()}
    shared = [(i, token) for token, i in mine.inner.get_vocab(with_added_tokens=True).items() if i in names]
    differ = sorted((i, token) for i, token in shared if names[i] != token)
    if len(differ) > len(shared) // 100:
        i, token = differ[0]
        raise ConfigError(f"the draft {draft}'s tokenizer names {len(differ)} of {len(shared)} token ids otherwise "
                          f"than the target's (id {i}: {names[i]!r} against {token!r}); a draft must share the "
                          "target's tokenizer")


def _may_draft_ahead(options: LoadOptions, tp: TensorParallel, device: torch.device) -> bool:
    """Whether a draft model's greedy chains may run in graphs (``greedy_chain.fits``), so that it drafts ahead in
    spare rows of its cache (``drafts.LOOK_AHEAD``): one rank, on a GPU, CUDA graphs on, not compiled."""
    return tp.size == 1 and uses_cuda_graphs(options, device) and not options.compile


def _max_draft(options: LoadOptions) -> int:
    return options.draft_tokens or DEFAULT_MAX_DRAFT


def _weigh_draft(options: LoadOptions, config: ModelConfig, needs: MemoryNeeds, alone: list, draft: "Setup",
                 place, captured: bool) -> tuple[list, "Setup | None"]:
    """The target's plans beside the draft model ``draft``, whose bytes on the compute device (its weights,
    KV cache, activations; the workspace is shared) come out of the target's budget, and the draft, or
    (a copy of the target only) the plans ``alone`` and no draft.

    A compressed copy of the target (int4, int8) is the rule's to decline: it is kept where the plans predict
    fewer seconds per token with it (verify passes over the target with fewer resident layers, plus the draft's
    steps, over the tokens a pass gains at ``ASSUMED_ACCEPTANCE``) than without it, and where it fits at all. A draft
    checkpoint the user named is kept, or its plan's error raised. Either way the plan says what it chose.
    """
    if draft.config.vocab_size != config.vocab_size:
        raise ConfigError(f"the draft {options.draft} has a vocabulary of {draft.config.vocab_size} tokens, the "
                          f"target {config.vocab_size}; a draft must share the target's vocabulary")
    label, copy = draft_label(options.draft), draft_kind(options.draft) in COPIES
    # The workspace is shared, and a copy reads its target's final norm, LM head and embedding: the target's
    # untied embedding then stays on the device, where a draft step would otherwise keep a copy of it.
    shared = draft.plan.needs.global_bytes + draft.plan.needs.embedding_bytes if copy else 0
    draft_bytes = draft.plan.gpu_bytes - draft.plan.needs.workspace_bytes - shared
    beside = place(replace(needs, draft_bytes=draft_bytes, embedding_stays=copy))
    if _failed(beside):
        if not copy:
            return beside, draft
        _describe(alone, f"{label} declined: it does not fit beside the target ({format_size(draft_bytes)}: "
                         f"{_failed(beside)[0]})")
        return alone, None

    def padded(width: int) -> int:  # as the runtime pads it (``OffloadedModel.verify_width``)
        return verify_bucket(width, options.max_seq_len) if captured else width

    k, with_s, without_s = speculation_forecast(beside, alone, draft.plans, options.draft_tokens, padded)
    resident = lambda plans: len(plans[0].blocks_on(RESIDENT))  # noqa: E731
    moved = alone[0].embedding_on_host and not beside[0].embedding_on_host  # the target's table, for the draft
    line = (f"{label}, resident: {format_size(draft_bytes)} (weights, KV cache, activations"
            + (f"; and the target's embedding table, {format_size(needs.embedding_bytes)}, stays on the device "
               "for it" if moved else "") + "); the target keeps "
            f"{resident(beside)} of {len(needs.blocks)} layers resident ({resident(alone)} without it); "
            + (f"predicted {_ms(with_s)} per token drafting {k} tokens a pass" if k else
               "no draft length is predicted to pay")
            + f" at an assumed {ASSUMED_ACCEPTANCE:.0%} acceptance, against {_ms(without_s)} without a draft")
    if copy and with_s >= without_s:
        _describe(alone, f"{line}: declined, the target keeps the memory")
        return alone, None
    _describe(beside, line + (": kept" if copy else ""))
    return beside, draft


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _describe(plans: list, line: str) -> None:
    for plan in plans:
        plan.draft = line


def _chunk_size(family: type[Decoder], config: ModelConfig, tp: TensorParallel, dtype: torch.dtype,
                options: LoadOptions, blocks: list[BlockSpec]) -> int:
    """The default ``max_step_tokens``: the largest chunk, of ``DEFAULT_STEP_TOKENS`` halved down to
    ``MIN_STEP_TOKENS`` (and at most a whole batch of prompts), whose temporaries take no more memory than
    the largest layer (its block and its routed experts), so that a chunk never costs more than one resident
    layer. Prefill runs faster in
    larger chunks (each streamed layer is brought in once per pass whatever its size, and the products
    get wider); decode runs on the resident layers."""
    most = options.max_batch * options.max_seq_len
    sizes = [min(most, DEFAULT_STEP_TOKENS >> k) for k in range(DEFAULT_STEP_TOKENS.bit_length())
             if DEFAULT_STEP_TOKENS >> k >= MIN_STEP_TOKENS]
    per_layer: dict[int, int] = {}
    for b in blocks:  # a layer's block and its routed experts
        per_layer[b.layer] = per_layer.get(b.layer, 0) + b.nbytes
    block = max(per_layer.values())
    for size in sizes:
        logits = size if options.all_logits else options.max_batch
        temporaries = family.activation_bytes(config, tp, dtype, options.max_batch, options.max_seq_len, size,
                                              logit_positions=logits)
        if temporaries <= block:
            return size
    return sizes[-1]


def memory_needs(family: type[Decoder], config: ModelConfig, tp: TensorParallel, dtype: torch.dtype,
                 device: torch.device, options: LoadOptions, blocks: list[BlockSpec], globals_: BlockLayout,
                 embedding: BlockLayout | None) -> MemoryNeeds:
    """The bytes this rank needs for ``options``' KV cache and steps."""
    _, kv_heads = local_heads(config, tp)
    batch, seq, step_tokens = options.max_batch, options.max_seq_len, options.max_step_tokens
    quantized = {**quantized_shapes(blocks), **{("head", n): shape for n, shape in globals_.quantized.items()}}
    every_pass = [block for block in blocks if block.fetch == EVERY_PASS]
    routed = [block for block in blocks if block.fetch == ON_DEMAND]
    graphs, captured = 0, uses_cuda_graphs(options, device)
    if captured:  # a graph's allocations live in its pool: a dequantize scratch too
        width = verify_width(options, captured)
        graphs = (family.decode_graph_bytes(config, tp, dtype, batch, seq, verify_width=width)
                  + scratch_bytes(quantized, dtype, batch * width) + graph_objects_bytes(family.graph_pieces(config)))
    return MemoryNeeds(
        blocks=tuple(block.nbytes for block in every_pass),
        experts=_expert_needs(config, routed, direct_steps(options, device), options.direct_experts),
        products=_products(every_pass, dtype),
        global_bytes=globals_.nbytes,
        embedding_bytes=embedding.nbytes if embedding else 0,
        kv_bytes=KVCache.nbytes(config.n_layers, batch, kv_heads, seq, config.head_dim, dtype),
        activation_bytes=max(family.activation_bytes(config, tp, dtype, batch, seq, step_tokens,
                                                     logit_positions=step_tokens if options.all_logits else batch),
                             _verify_bytes(family, config, tp, dtype, options, captured)),
        workspace_bytes=WORKSPACE_BYTES if device.type == "cuda" else 0,
        rope_bytes=len(family.rope_inv_freqs(config)) * 2 * (seq + 1) * config.head_dim * dtype.itemsize,
        max_batch=batch,
        max_seq_len=seq,
        step_tokens=step_tokens,
        graph_bytes=graphs,
        flops_per_token=family.flops_per_token(config, tp),
        decode_kernels=family.decode_kernels(config, _short_steps(options, device) and (
            bool(options.direct_experts) or kernels_compute_copies(device))),
        flops_per_key=family.flops_per_key(config, tp),
        dequant_bytes=scratch_bytes(quantized, dtype, step_tokens),
        head_products=next((shape.scheme.format for shape in globals_.quantized.values()), ""),
        weight_format=_format_line(family, config, tp, dtype, options, blocks, globals_),
    )


def _products(blocks: list[BlockSpec], dtype: torch.dtype) -> str:
    """What most of the layers' projections are stored as: "int4", "int8", or "bf16" for 16 bits ("": float32)."""
    kinds = [shape.scheme.format for b in blocks for shape in b.layout.quantized.values()]
    if kinds:
        return max(set(kinds), key=kinds.count)
    return "bf16" if dtype in (torch.bfloat16, torch.float16) else ""


def _expert_needs(config: ModelConfig, routed: list[BlockSpec], direct: bool, host_only: bool) -> ExpertNeeds | None:
    """The routed experts of a mixture-of-experts model (None for a dense one; ``direct``: every step reads them
    directly; ``host_only``: some do, so none may live on a peer)."""
    if not routed:
        return None
    per_layer, sizes = [0] * config.n_layers, [0] * config.n_layers
    for block in routed:
        per_layer[block.layer] += 1
        sizes[block.layer] = max(sizes[block.layer], block.nbytes)
    return ExpertNeeds(max(sizes), tuple(per_layer), config.top_k, direct, host_only,
                       sizes=tuple(sizes) if len({s for s in sizes if s}) > 1 else ())


def verify_width(options: LoadOptions, captured: bool) -> int:
    """The most tokens a row adds in a verify pass: ``K + 1`` with a draft, a draft model's ``tree_width``
    (1 without either), padded to a power of two where the passes are captured in CUDA graphs."""
    width = options.tree_width if options.draft is None else _max_draft(options) + 1
    if width == 1:
        return 1
    return verify_bucket(width, options.max_seq_len) if captured else width


def _verify_bytes(family: type[Decoder], config: ModelConfig, tp: TensorParallel, dtype: torch.dtype,
                  options: LoadOptions, captured: bool) -> int:
    """Speculative decoding's verify pass (0 without a draft or a tree to grow for one): ``max_batch`` rows of
    ``K + 1`` tokens, or of a draft model's ``tree_width`` (padded, when ``captured`` in graphs: a bucket's
    first pass runs eagerly) in one chunk with the logits of every one,
    the draft's float32 distributions over them, and speculative sampling's float32 work on one row (its
    filtered target distributions, sorted, and residuals)."""
    draft_model = options.draft is None  # a model with passes this wide but no draft of its own grows trees
    width = options.tree_width if draft_model else _max_draft(options) + 1
    if width == 1:
        return 0
    padded, tokens, vocab = verify_width(options, captured), options.max_batch * width, config.vocab_size
    run = options.max_batch * padded
    verify = family.activation_bytes(config, tp, dtype, options.max_batch, options.max_seq_len, run,
                                     logit_positions=run)
    # a draft model's float32 logits and log-probabilities over its tree (``drafts._likeliest``)
    return verify + tokens * vocab * 4 * (2 if draft_model else 1) + width * vocab * 32


def direct_steps(options: LoadOptions, device: torch.device) -> bool:
    """Whether every decode step and verify pass reads its routed experts directly (``direct_experts``, and at
    most ``DIRECT_TOKENS`` tokens: ``max_batch`` rows of the widest verify pass)."""
    return bool(options.direct_experts) and _short_steps(options, device)


def _short_steps(options: LoadOptions, device: torch.device) -> bool:
    """Whether every decode step and verify pass has at most ``DIRECT_TOKENS`` tokens (the expert kernels')."""
    return options.max_batch * verify_width(options, uses_cuda_graphs(options, device)) <= DIRECT_TOKENS


def uses_cuda_graphs(options: LoadOptions, device: torch.device) -> bool:
    """Decode steps (and verify passes) are captured in CUDA graphs on a GPU unless turned off."""
    return options.cuda_graphs and device.type == "cuda"


def _direct_would_pay(options: LoadOptions, plan: Plan, device: torch.device, tp: TensorParallel,
                      blocks: list[BlockSpec], dtype: torch.dtype) -> bool:
    """Whether a mixture of experts planned to copy its experts (``plan``) keeps every block and expert resident
    on one GPU, in CUDA graphs, where the kernels can read the experts directly in one graph a step: then
    direct reads are the default. Measured 4.5-5.3x faster (qwen3-30b-a3b, every expert resident: 5.9
    against 26.7 ms a step on an H100, 5.4 against 28.7 on an H200), with the same logits: copies run the
    same kernels. Where experts stream, copying measured faster than reading over the link (74.3 against
    83.2 ms at 8 GiB on an H100), so it stays there."""
    if (options.direct_experts or options.prefetch_experts or options.compile or plan.experts is None
            or tp.size > 1 or not uses_cuda_graphs(options, device) or not kernels_compute_copies(device)
            or set(plan.block_tiers) != {RESIDENT} or set(plan.experts.placement) != {RESIDENT}
            or not _short_steps(options, device)):
        return False
    try:
        check_direct([block for block in blocks if block.fetch == ON_DEMAND], device, dtype)
    except ConfigError:
        return False
    return True


def quantized_shapes(blocks: list[BlockSpec]) -> dict:
    """The quantized projections of every distinct layout among ``blocks``."""
    shapes = {}
    for layout in {id(b.layout): b.layout for b in blocks}.values():
        shapes.update({(id(layout), name): shape for name, shape in layout.quantized.items()})
    return shapes


def _blocks(family: type[Decoder], config: ModelConfig, tp: TensorParallel, dtype: torch.dtype,
            fmt: WeightFormat | None, device: torch.device, budget: Budget, quantize: str | None) -> list[BlockSpec]:
    """The model's blocks in ``fmt``; but a GGUF file computed on the CPU is expanded to ``dtype`` once at load
    (unless ``quantize="stored"``) when its dense layers take at most half the budget: on the CPU, a product
    from compressed weights dequantizes the whole matrix at every use (the kernels that avoid it are CUDA's).
    SmolLM2-135M's Q4_1 file, resident, decodes in 57 ms a token expanded and 62 ms as stored on two CPU cores
    (2026-12-05; 70 and 190 ms on 2026-12-04)."""
    blocks = family.blocks(config, tp, dtype, fmt)
    if fmt is None or fmt.format != "gguf" or quantize == STORED or device.type != "cpu":
        return blocks
    dense = family.blocks(config, tp, dtype, None)
    return dense if 2 * sum(b.layout.nbytes for b in dense) <= budget.gpu_memory else blocks


def _weight_format(model, options: LoadOptions, chosen: ops.Ops, dtype: torch.dtype,
                   requantize: bool = False) -> WeightFormat | None:
    """The quantization the options ask for, or a GGUF file's own per tensor (``requantize``: the options'
    all the same), computed by the kernels the model's ops use."""
    kernel = choose_kernel(chosen.kernels)
    if isinstance(model, (str, os.PathLike)) and is_gguf(model) and not (requantize and options.quantize):
        if options.quantize not in (None, STORED):
            raise InputError(f"{Path(model).name} is stored quantized already (GGUF); --quantize does not apply")
        return gguf_format(model, kernel, dtype)
    stored = isinstance(model, (str, os.PathLike)) and stored_quantization(model)
    if stored:  # saved by scripts/quantize.py: read as it is
        if requantize:
            raise InputError(f"the {options.quantize} draft quantizes the target's weights, but {Path(model).name} "
                             f"is stored {stored['format']} by scripts/quantize.py and has no others: give "
                             "draft='ngram' or a draft model's path")
        if options.quantize not in (None, STORED):
            raise InputError(f"{Path(model).name} is stored {stored['format']} already; --quantize does not apply")
        return WeightFormat(stored["format"], kernel=kernel, per_tensor=CheckpointSource(model).stored,
                            scale_dtype=parse_dtype(stored["dtype"]))
    if options.quantize is None:
        return None
    if options.quantize == STORED:
        raise InputError("quantize='stored' keeps a checkpoint's own compressed formats, but this checkpoint is not "
                         "stored quantized (a GGUF file, or scripts/quantize.py's output)")
    return WeightFormat(options.quantize, options.group_size, kernel, rounding=options.rounding)


def _quantizes_gguf(model, options: LoadOptions) -> bool:
    """Whether ``model`` is a GGUF file of 16- or 32-bit layers that the options quantize (as a directory's): its
    tensors are then read dense. (One of compressed layers is stored quantized already: ``_weight_format``.)"""
    if options.quantize not in FORMATS or not isinstance(model, (str, os.PathLike)) or not is_gguf(model):
        return False
    from .gguf import GGUFCheckpoint, is_float_type

    return all(is_float_type(t.ggml_type) for name, t in GGUFCheckpoint(model).tensors.items()
               if name.startswith("model.layers."))


def gguf_format(path, kernel: str, dtype: torch.dtype) -> WeightFormat:
    """A GGUF file's formats, tensor by tensor: its 4-bit types as int4 in groups of 32, its 8-, 6- and 5-bit ones
    as grouped int8, the rest dense. Scales in float32 for a float32 model (every one exact), else float16 (the
    K-quants' products rounded to 11 significant bits: ``offload.gguf.convert``)."""
    from .gguf import GGUFCheckpoint, parts_format

    tensors = GGUFCheckpoint(path).tensors

    def stored(name: str):
        fmt = parts_format(tensors[name].ggml_type) if name in tensors else None
        return None if fmt is None else (fmt.format, fmt.group_size, fmt.minimum)

    scale_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    return WeightFormat("gguf", kernel=kernel, per_tensor=stored, scale_dtype=scale_dtype)


def _format_line(family: type[Decoder], config: ModelConfig, tp: TensorParallel, dtype: torch.dtype,
                 options: LoadOptions, blocks: list[BlockSpec], globals_: BlockLayout) -> str:
    """How the plan names the layers' format: "" for the model dtype, else the quantization and its bytes (and
    a mixture of experts' routed experts', whose group sizes may differ, and an LM head stored compressed)."""
    layers = [b.layout for b in blocks if b.fetch == EVERY_PASS]
    experts = [b.layout for b in blocks if b.fetch == ON_DEMAND and b.expert == 0]  # a layer's: its experts' format
    if not any(layout.quantized for layout in layers + experts):
        return ""
    dense = family.layer_layout(config, tp, dtype).nbytes
    mean = sum(layout.nbytes for layout in layers) / len(layers)

    def how(layouts: list[BlockLayout]) -> str:
        if options.quantize in FORMATS:
            return describe(layouts[0].quantized, WeightFormat(options.quantize, options.group_size))
        return _stored_formats(layouts) if any(layout.quantized for layout in layouts) else "dense"

    line = (f"{how(layers)}: {format_size(mean)} per layer, {mean / dense:.2f}x the {format_size(dense)} "
            f"of {str(dtype).removeprefix('torch.')}")
    if experts and any(layout.quantized for layout in experts):
        sizes = sorted({layout.nbytes for layout in experts})
        each = " to ".join(format_size(n) for n in sizes[:: max(1, len(sizes) - 1)])
        line += f"; routed experts: {how(experts)}, {each} each"
    if globals_.quantized:
        head = next(iter(globals_.quantized.values())).scheme
        grouping = "one scale per output channel" if head.group_size is None else f"in groups of {head.group_size}"
        line += f"; LM head {head.format}, {grouping}"
    return line


def _stored_formats(layouts: list[BlockLayout]) -> str:
    """A file's own formats (GGUF), counted over the layers' projections: ``as stored: int4 in groups of 32 x 200,
    int8 in groups of 16 x 40 (float16 scales)``."""
    counts: dict[str, int] = {}
    for layout in layouts:
        for shape in layout.quantized.values():
            s = shape.scheme
            grouping = "per output channel" if s.group_size is None else f"in groups of {s.group_size}"
            key = f"{s.format} {grouping}" + (" with minimums" if s.minimum else "")
            counts[key] = counts.get(key, 0) + 1
    first = next(shape for layout in layouts for shape in layout.quantized.values())
    scales = str(first.scheme.scale_dtype).removeprefix("torch.")
    return "as stored: " + ", ".join(f"{k} x {n}" for k, n in counts.items()) + f" ({scales} scales)"


def weight_source(model, random_weights: int | None, device: torch.device, requantize: bool = False,
                  packed: bool = False):
    """Where the weights come from: the checkpoint directory, or seeded random numbers (``packed``: quantized
    weights made in their parts; ``requantize``: a GGUF file's tensors are read dense, to be quantized (again):
    ``prepare``)."""
    if random_weights is not None:
        return RandomSource(seed=random_weights, device=device, packed=packed)
    if isinstance(model, (dict, ModelConfig)):
        raise InputError("a config has no weights: give a checkpoint directory, or random_weights=SEED")
    if is_gguf(model):
        from .gguf import GGUFSource

        # converted where it computes
        return GGUFSource(model, device=device if device.type == "cuda" else None, requantize=requantize)
    return CheckpointSource(model)


def load_weights(setup: Setup, source, progress: bool, shared_globals: WeightPool | None = None) -> WeightPool:
    """Allocate every tier once and read each tensor straight into its place (one tensor's piece at a time).
    ``shared_globals``: a pool whose final norm, LM head and embedding are this model's too (a compressed copy's are
    its target's, to the bit, the embedding on the compute device): they are neither allocated nor read again."""
    layouts = [setup.globals_layout] + ([setup.embedding_layout] if setup.embedding_layout else [])
    source.validate([x for layout in layouts for x in layout.sources()]
                    + [x for block in setup.blocks for x in block.sources()])
    shared = shared_globals is not None
    own_embedding = setup.embedding_layout is not None and not shared
    # what is read, in order: the globals, the blocks, the embedding
    layouts = ([] if shared else [setup.globals_layout]) + [block.layout for block in setup.blocks] \
        + ([setup.embedding_layout] if own_embedding else [])
    sources = ([] if shared else [setup.globals_layout.sources()]) + [block.sources() for block in setup.blocks] \
        + ([setup.embedding_layout.sources()] if own_embedding else [])
    pool = None
    try:
        # first, so that the disk reads while pinned host memory is allocated (seconds for tens of GB)
        source.read_in_order([(spec, name) for tensors in sources for name, specs in _by_tensor(tensors)
                              for spec in specs], pinned=_pinned_room(setup))
        pool = WeightPool(setup.plan, 0 if shared else setup.globals_layout.nbytes,
                          setup.embedding_layout.nbytes if own_embedding else 0, setup.device)
        if shared:
            pool.globals, pool.embedding = shared_globals.globals, shared_globals.embedding
        buffers = ([] if shared else [pool.globals]) + pool.blocks + ([pool.embedding] if own_embedding else [])
        with tqdm(total=sum(layout.nbytes for layout in layouts), unit="B", unit_scale=True, desc="loading weights",
                  disable=not progress, file=sys.stderr) as bar:
            for buffer, layout, tensors in zip(buffers, layouts, sources):
                for name, specs in _by_tensor(tensors):
                    if specs[0].quant is None or source.stores_parts(name):  # as it is stored
                        for spec in specs:
                            source.read(spec, name, _view(buffer, spec))
                    else:
                        views = {spec.part: _view(buffer, spec) for spec in specs}
                        _read_quantized(source, specs[0], name, views, setup.device)
                bar.update(layout.nbytes)
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    finally:
        source.close()
    return pool


def _pinned_room(setup: Setup) -> int:
    """Host memory a load onto a GPU may pin besides the plan's: what the host budget leaves."""
    if setup.device.type != "cuda":
        return 0
    return max(0, setup.plan.budget.cpu_memory - setup.plan.host_ram_bytes)


# ---------------------------------------------------------------------- the pieces


def _by_tensor(sources: list[tuple[TensorSpec, str]]) -> list[tuple[str, list[TensorSpec]]]:
    """The specs of each checkpoint tensor, in block order (a quantized weight has several parts)."""
    specs = defaultdict(list)
    for spec, name in sources:
        specs[name].append(spec)
    return list(specs.items())


def _view(buffer: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    return buffer[spec.offset : spec.offset + spec.nbytes].view(spec.dtype).view(spec.shape)


def _read_quantized(source, spec: TensorSpec, name: str, parts: dict[str, torch.Tensor], device) -> None:
    """Read this rank's piece of checkpoint tensor ``name`` in the model dtype into host memory (one
    tensor at a time, never the whole model), and quantize it into its parts on ``device``."""
    dense = replace(spec, shape=local_shape(spec.full_shape, spec.shard), dtype=parts["scale"].dtype, part="",
                    quant=None)
    piece = torch.empty(dense.shape, dtype=dense.dtype)
    source.read(dense, name, piece)
    quantize_into(piece, parts, spec.quant, device)


def _config(model) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, dict):
        return config_from_dict(model)
    if not isinstance(model, (str, os.PathLike)):
        raise InputError(f"model must be a checkpoint directory, a GGUF file, a config dict or a ModelConfig, "
                         f"got {model!r}")
    return load_config(Path(model))


def _device(device, tp: TensorParallel) -> torch.device:
    """The compute device asked for; for None (a GPU where there is one) or "cuda", this rank's GPU."""
    if device is None and not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda") if device is None else parse_device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_gpu() if tp.size > 1 else torch.cuda.current_device())
    return device


def _own_peers(budget: Budget, tp: TensorParallel, device: torch.device) -> Budget:
    """Check the peer GPUs and keep this rank's share: the peers are dealt out to the ranks in turn."""
    computing = set(str(d) for d in tp.gather_objects(str(device)))
    for name in budget.peer_memory:
        peer = torch.device(name)
        if peer.type not in ("cuda", "cpu"):  # cpu:N stands in for a GPU where there is none (tests, planning)
            raise BudgetError(f"peer {name} is not a GPU; a peer is another GPU, such as cuda:1")
        if name in computing:
            raise BudgetError(f"{name} computes for this job; a peer must be a GPU outside the tensor-parallel group")
        if peer.type == "cuda" and (not torch.cuda.is_available() or peer.index >= torch.cuda.device_count()):
            raise BudgetError(f"peer {name} does not exist ({torch.cuda.device_count()} CUDA devices visible)")
        if peer.type == "cuda" and device.type != "cuda":
            raise BudgetError(f"peer {name} is a GPU but the compute device is {device}")
    mine = {n: b for i, (n, b) in enumerate(budget.peer_memory.items()) if i % tp.size == tp.rank}
    return Budget(budget.gpu_memory, budget.cpu_memory, mine)
