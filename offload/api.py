"""The public verbs: ``plan_model`` and ``load_model``, and the model they return.

    model = offload.load_model("path/to/llama", gpu_memory="8GiB", cpu_memory="64GiB")
    print(model.plan)
    out = model.generate(input_ids, max_new_tokens=32)

Loading goes config -> budget -> plan -> pool -> weights -> stream:
the plan decides each layer's tier before a byte is read, the pool allocates
each tier once, the weights are read straight into their final place, and the
layer stream moves the streamed ones into slots while the model runs.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import BudgetError, InputError, PlanError
from .generation import GenerationResult, Sampling, check_token_ids, generate
from .memory.budget import Budget
from .memory.links import link_bandwidths, peer_is_direct
from .memory.planner import HOST, RESIDENT, MemoryNeeds, Plan, make_plan
from .memory.pool import WeightPool
from .models.checkpoint import CheckpointSource, RandomSource
from .models.config import ModelConfig, config_from_dict, load_config
from .models.layout import BlockLayout, GlobalWeights, checkpoint_sources, embedding_layout, global_layout, layer_layout
from .models.llama import KVCache, Transformer, step_activation_bytes
from .models.parallel import TensorParallel, check_divisible, init_tensor_parallel, local_heads, vocab_rows
from .models.step import Rope, Step
from .scheduler.stream import LayerStream, Link

DEFAULT_MAX_SEQ_LEN = 2048
WORKSPACE_BYTES = 64 * 2**20  # cuBLAS / SDPA workspaces and allocator rounding (peaks measured on an H200)


@dataclass
class _Setup:
    """Everything decided before a byte of weights is read."""

    config: ModelConfig
    tp: TensorParallel
    device: torch.device
    dtype: torch.dtype
    layout: BlockLayout
    globals_layout: BlockLayout
    embedding_layout: BlockLayout | None
    plan: Plan
    plans: list[Plan]
    max_batch: int
    max_seq_len: int
    max_step_tokens: int


def plan_model(model, *, device=None, dtype=None, gpu_memory=None, cpu_memory=None, peer_memory=None,
               max_batch: int = 1, max_seq_len: int | None = None, max_step_tokens: int | None = None,
               tp: int = 1, slots: int | None = None, link_bandwidth: dict | None = None) -> Plan:
    """The placement plan :func:`load_model` would follow, computed without reading any weights.

    Takes the same arguments as :func:`load_model`. Under tensor parallelism each
    rank gets its own plan; ``plan.title`` says whose.
    """
    return _setup(model, device, dtype, gpu_memory, cpu_memory, peer_memory, max_batch, max_seq_len,
                  max_step_tokens, tp, slots, link_bandwidth).plan


def load_model(model, *, device=None, dtype=None, gpu_memory=None, cpu_memory=None, peer_memory=None,
               max_batch: int = 1, max_seq_len: int | None = None, max_step_tokens: int | None = None,
               tp: int = 1, slots: int | None = None, link_bandwidth: dict | None = None,
               random_weights: int | None = None, progress: bool = True) -> "OffloadedModel":
    """Load a model with its layers spread over GPU memory, pinned host memory and peer GPUs.

    Args:
        model: a checkpoint directory (HF ``config.json`` plus safetensors, single file or
            sharded), or a ``ModelConfig`` / config dict together with ``random_weights``.
        device: the compute device; default ``cuda:LOCAL_RANK`` when CUDA is present, else ``cpu``.
        dtype: ``torch.bfloat16``, ``torch.float16`` or ``torch.float32`` (or their names);
            default bfloat16 on a GPU, float32 on a CPU.
        gpu_memory: budget of the compute device, e.g. ``"20GiB"``; or a whole
            accelerate-style ``max_memory`` dict ``{0: "20GiB", "cuda:1": "40GiB", "cpu": "100GiB"}``.
            Default: its free memory less 2 GiB.
        cpu_memory: pinned host memory for streamed layers. Default: 80% of available RAM.
        peer_memory: other GPUs' memory, ``{"cuda:1": "40GiB"}`` or ``["cuda:1=40GiB"]``. Under
            tensor parallelism the peers are dealt out to the ranks in turn.
        max_batch, max_seq_len: the KV cache is reserved for this many rows of this many tokens.
        max_step_tokens: the most (padded) tokens one forward pass handles; longer prompts are
            prefilled in several steps. Default: ``max_seq_len``.
        tp: tensor-parallel ranks; needs one process per rank (``torchrun --nproc-per-node tp``).
        slots: block-sized buffers per streaming link that its layers are copied into (default 2).
        link_bandwidth: bytes/s per link (``{"host": 55e9, "hbm": 4e12, "cuda:1": 390e9}``) instead
            of measuring them.
        random_weights: a seed: fill the weights with seeded random numbers instead of reading files.
        progress: show a progress bar while loading (rank 0 only).

    Raises:
        OffloadError: a missing or corrupt checkpoint, an unknown architecture, a budget that
            cannot be parsed, or a model that fits none of the budgets.
    """
    s = _setup(model, device, dtype, gpu_memory, cpu_memory, peer_memory, max_batch, max_seq_len,
               max_step_tokens, tp, slots, link_bandwidth)
    if random_weights is not None:
        source = RandomSource(seed=random_weights, device=s.device)
    elif isinstance(model, (dict, ModelConfig)):
        raise InputError("a config has no weights: give a checkpoint directory, or random_weights=SEED")
    else:
        source = CheckpointSource(model)
    source.validate(checkpoint_sources(s.config, s.tp, s.dtype))
    embedding_numel = s.embedding_layout.numel if s.embedding_layout else 0
    pool = WeightPool(s.plan, s.layout.numel, s.globals_layout.numel, embedding_numel, s.dtype, s.device)
    try:
        _fill(pool, source, s, progress and s.tp.rank == 0)
    except BaseException:
        pool.close()
        raise
    finally:
        source.close()
    return OffloadedModel(s, pool)


class OffloadedModel:
    """A decoder-only language model whose layers live where its plan put them.

    ``model(input_ids)`` returns logits; ``model.generate(input_ids)`` returns token ids.
    ``model.plan`` is this rank's placement plan and ``model.plans`` every rank's.
    """

    def __init__(self, s: _Setup, pool: WeightPool):
        self.config, self.tp, self.device, self.dtype = s.config, s.tp, s.device, s.dtype
        self.plan, self.plans = s.plan, s.plans
        self.max_batch, self.max_seq_len, self.max_step_tokens = s.max_batch, s.max_seq_len, s.max_step_tokens
        self.pool = pool
        links = {tier: Link(s.device, "cpu" if tier == HOST or s.device.type == "cpu" else tier)
                 for tier in s.plan.streamed_tiers}
        self.layers = LayerStream(s.layout, pool.blocks, s.plan.placement, pool.slots, links)
        self.rope = Rope(s.config.rope_inv_freq(), s.max_seq_len, s.dtype, s.device)
        self.transformer = Transformer(s.config, _global_weights(s, pool), s.tp, vocab_start=vocab_rows(s.config, s.tp)[0])
        _, kv_heads = local_heads(s.config, s.tp)
        self.cache = KVCache(s.config.n_layers, s.max_batch, kv_heads, s.max_seq_len, s.config.head_dim,
                             s.dtype, s.device)

    # ------------------------------------------------------------------ forward passes

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` of every position, with no KV cache.

        ``attention_mask`` (1 for tokens, 0 for padding, either side) marks padding; its
        positions get zero logits.
        """
        ids = _as_batch(input_ids)
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else _as_batch(attention_mask).bool()
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}")
        rows = [row[keep].tolist() for row, keep in zip(ids, mask)]
        for b, row in enumerate(rows):
            check_token_ids(row, self.config.vocab_size, f"row {b}")
        if ids.numel() > self.max_step_tokens or ids.shape[1] > self.max_seq_len:
            raise InputError(
                f"a forward pass over {ids.shape[0]} x {ids.shape[1]} tokens exceeds max_step_tokens="
                f"{self.max_step_tokens} / max_seq_len={self.max_seq_len}; load the model with larger ones"
            )
        step = Step.build(rows, [0] * len(rows), self.rope, self.device)
        logits = self._run(step, cache=None, all_logits=True)
        if attention_mask is None:
            return logits
        out = logits.new_zeros(*ids.shape, logits.shape[-1])
        valid = torch.arange(logits.shape[1])[None, :] < mask.sum(1, keepdim=True)
        out[mask.to(out.device)] = logits[valid.to(out.device)]
        return out

    @torch.inference_mode()
    def step(self, new_tokens: list[list[int]], cached: list[int]) -> torch.Tensor:
        """Append ``new_tokens[b]`` to KV cache row ``b``, which holds ``cached[b]`` tokens already.

        Returns the logits of each row's last new token, ``[B, vocab]``. Rows with no new
        tokens are allowed (their logits are meaningless). This is the primitive that
        generation and batch jobs are built on.
        """
        if len(new_tokens) > self.max_batch:
            raise InputError(f"{len(new_tokens)} rows but the KV cache has max_batch={self.max_batch}")
        if any(c + len(t) > self.max_seq_len for c, t in zip(cached, new_tokens)):
            raise InputError(f"a row would grow past max_seq_len={self.max_seq_len}")
        return self._run(Step.build(new_tokens, cached, self.rope, self.device), self.cache, all_logits=False)

    def _run(self, step: Step, cache, all_logits: bool) -> torch.Tensor:
        try:
            return self.transformer.forward(step, self.layers, cache, all_logits)
        except BaseException:
            self.layers.reset()  # the ring expects the next layer of an unfinished step
            raise

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids, max_new_tokens: int = 32, attention_mask=None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | list[int] | None = None, ignore_eos: bool = False,
                 return_result: bool = False):
        """Generate up to ``max_new_tokens`` per row.

        ``input_ids`` is ``[batch, seq]`` (a list of lists of ids also works, rows of any
        length); with ``attention_mask``, padding (on either side) is dropped. Stops a row at
        ``eos_token_id`` (default: the config's) unless ``ignore_eos``.

        Returns ``[batch, seq + new]`` token ids like ``transformers``' ``generate``: the
        input followed by the new tokens, rows that stopped early padded with their eos id
        (for ragged list input: a list of prompt + new ids per row).
        With ``return_result=True``, a :class:`GenerationResult` instead (new tokens per row,
        finish reasons, prefill and decode tokens/s).
        """
        prompts = _prompts(input_ids, attention_mask)
        if eos_token_id is None:
            eos = self.config.eos_token_ids
        else:
            eos = tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (eos_token_id,)
        sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        result = generate(self, prompts, max_new_tokens, sampling, () if ignore_eos else eos)
        if return_result:
            return result
        return _as_sequences(input_ids, prompts, result, pad=eos[0] if eos else 0)

    # ------------------------------------------------------------------ housekeeping

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Release the pinned host memory now rather than when the model is garbage-collected."""
        self.synchronize()
        self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------- setup


def _setup(model, device, dtype, gpu_memory, cpu_memory, peer_memory, max_batch, max_seq_len,
           max_step_tokens, tp_size, slots, link_bandwidth) -> _Setup:
    config = _config(model)
    check_divisible(config, tp_size)
    tp = init_tensor_parallel(tp_size)
    device = _device(device, tp)
    dtype = _dtype(dtype, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    max_seq_len = max_seq_len or min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    max_step_tokens = max_step_tokens or max_seq_len
    if max_batch < 1 or max_seq_len < 1 or max_step_tokens < 1:
        raise InputError("max_batch, max_seq_len and max_step_tokens must be positive")

    budget = Budget.parse(gpu_memory, cpu_memory, peer_memory, compute_device=device)
    offload_requested = budget.cpu_memory is not None or bool(budget.peer_memory)
    budget = _own_peers(budget, tp, device).resolved(device)
    layout, globals_ = layer_layout(config, tp, dtype), global_layout(config, tp, dtype)
    embedding = embedding_layout(config, tp, dtype)
    _, kv_heads = local_heads(config, tp)
    needs = MemoryNeeds(
        n_layers=config.n_layers,
        block_bytes=layout.nbytes,
        global_bytes=globals_.nbytes,
        embedding_bytes=embedding.nbytes if embedding else 0,
        kv_bytes=KVCache.nbytes(config.n_layers, max_batch, kv_heads, max_seq_len, config.head_dim, dtype),
        activation_bytes=step_activation_bytes(config, tp, dtype, max_batch, max_seq_len, max_step_tokens),
        workspace_bytes=WORKSPACE_BYTES if device.type == "cuda" else 0,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
    )
    peers = list(budget.peer_memory)
    bandwidth = dict(link_bandwidth or {})
    missing = [n for n in ["host", "hbm", *peers] if n not in bandwidth]
    if missing:
        bandwidth = {**link_bandwidths(device, peers, tp, budget.gpu_memory // 8), **bandwidth}
    title = f" (rank {tp.rank} of {tp.size})" if tp.size > 1 else ""
    indirect = tuple(p for p in peers if not peer_is_direct(device, p))
    try:
        plan = make_plan(needs, budget, bandwidth, str(device), slots, offload_requested, indirect, title)
    except PlanError as e:
        plan = e
    plans = tp.gather_objects(plan)  # every rank learns of a rank whose budget does not fit, none waits
    failed = [str(p) for p in plans if isinstance(p, PlanError)]
    if failed:
        raise PlanError("; ".join(failed))
    return _Setup(config, tp, device, dtype, layout, globals_, embedding, plan, plans, max_batch, max_seq_len,
                  max_step_tokens)


def _config(model) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, dict):
        return config_from_dict(model)
    return load_config(Path(model))


def _device(device, tp: TensorParallel) -> torch.device:
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {device} was asked for, but CUDA is not available")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if tp.size > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", tp.rank)) % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise InputError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16")


def _own_peers(budget: Budget, tp: TensorParallel, device: torch.device) -> Budget:
    """Check the peer GPUs and keep this rank's share: the peers are dealt out to the ranks in turn."""
    computing = set(str(d) for d in tp.gather_objects(str(device)))
    for name in budget.peer_memory:
        peer = torch.device(name)
        if name in computing:
            raise BudgetError(f"{name} computes for this job; a peer must be a GPU outside the tensor-parallel group")
        if peer.type == "cuda" and (not torch.cuda.is_available() or peer.index >= torch.cuda.device_count()):
            raise BudgetError(f"peer {name} does not exist ({torch.cuda.device_count()} CUDA devices visible)")
        if peer.type == "cuda" and device.type != "cuda":
            raise BudgetError(f"peer {name} is a GPU but the compute device is {device}")
    mine = {n: b for i, (n, b) in enumerate(budget.peer_memory.items()) if i % tp.size == tp.rank}
    return Budget(budget.gpu_memory, budget.cpu_memory, mine)


def _global_weights(s: _Setup, pool: WeightPool) -> GlobalWeights:
    views = s.globals_layout.views(pool.globals)
    if s.embedding_layout is not None:
        views.update(s.embedding_layout.views(pool.embedding))
    return GlobalWeights(views["embed"], views["final_norm"], views.get("lm_head", views["embed"]))


def _fill(pool: WeightPool, source, s: _Setup, progress: bool) -> None:
    """Read every tensor straight into its place in the pool (one tensor's piece at a time)."""
    jobs = [(pool.globals, s.globals_layout, None)] + [(b, s.layout, i) for i, b in enumerate(pool.blocks)]
    if s.embedding_layout is not None:
        jobs.append((pool.embedding, s.embedding_layout, None))
    total = sum(layout.nbytes for _, layout, _ in jobs)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress,
              file=sys.stderr) as bar:
        for buffer, layout, layer in jobs:
            for spec, name in layout.sources(layer):
                source.read(spec, name, buffer[spec.offset : spec.offset + spec.numel].view(spec.shape))
            bar.update(layout.nbytes)


# ---------------------------------------------------------------------- input handling


def _as_batch(x) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise InputError(f"expected token ids of shape [batch, seq], got {list(t.shape)}")
    return t.long().cpu()


def _prompts(input_ids, attention_mask) -> list[list[int]]:
    if _is_ragged(input_ids):
        return [list(map(int, row)) for row in input_ids]
    ids = _as_batch(input_ids)
    if attention_mask is None:
        return ids.tolist()
    mask = _as_batch(attention_mask).bool()
    return [row[keep].tolist() for row, keep in zip(ids, mask)]


def _as_sequences(input_ids, prompts: list[list[int]], result: GenerationResult, pad: int):
    """HF-style output: a tensor ``[batch, seq + new]``, or lists of prompt + new ids for ragged list input."""
    if _is_ragged(input_ids):
        return [p + t for p, t in zip(prompts, result.tokens)]
    ids = _as_batch(input_ids)
    width = max(map(len, result.tokens))
    new = torch.tensor([t + [pad] * (width - len(t)) for t in result.tokens], dtype=ids.dtype)
    device = input_ids.device if isinstance(input_ids, torch.Tensor) else "cpu"
    return torch.cat([ids, new], dim=1).to(device)


def _is_ragged(input_ids) -> bool:
    return isinstance(input_ids, (list, tuple)) and bool(input_ids) and isinstance(input_ids[0], (list, tuple))


__all__ = ["load_model", "plan_model", "OffloadedModel", "GenerationResult", "RESIDENT", "HOST"]
