"""Tensor parallelism: the Megatron split, as weight shards plus two collectives.

A column-parallel linear (q, k, v, gate, up) holds a slice of the output rows of
the full weight; its output is this rank's slice of the features and needs no
communication. A row-parallel linear (o, down) holds the matching slice of the
input columns; each rank's product is a partial sum, added up by an all-reduce
(``Decoder.row_parallel``). Here: which piece of each checkpoint tensor a rank
holds, and the vocabulary-parallel embedding.

The embedding and the LM head are split by vocabulary rows rather than
replicated: on a memory-starved GPU they are the largest non-layer tensors
(2 x 1 GiB for a 128k vocabulary at 4096 wide), and the price of splitting is one
all-reduce of the embeddings and one all-gather of the logits per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..distributed import TensorParallel
from ..errors import ConfigError
from .config import ModelConfig


@dataclass(frozen=True)
class Shard:
    """The piece of a full checkpoint tensor that one rank holds: ``[start:stop]`` along ``dim``."""

    dim: int | None = None  # None: the whole tensor (replicated)
    start: int = 0
    stop: int = 0


REPLICATED = Shard()


def vocab_parallel_embedding(ids: torch.Tensor, table: torch.Tensor, vocab_start: int, tp: TensorParallel,
                             device: torch.device) -> torch.Tensor:
    """Rows ``ids`` of the embedding, on ``device``, from this rank's rows ``[vocab_start, +len(table))``.

    ``ids`` and ``table`` are on the same device, which may be the host: then only the
    looked-up rows cross to the compute device.
    """
    if tp.size == 1:
        return F.embedding(ids, table).to(device)
    local = ids - vocab_start
    outside = (local < 0) | (local >= table.shape[0])
    out = F.embedding(local.masked_fill(outside, 0), table)
    out.masked_fill_(outside.unsqueeze(-1), 0)
    return tp.all_reduce(out.to(device))


# ----------------------------------------------------------------------------- sharding


def _even(n: int, tp: TensorParallel) -> Shard:
    per = n // tp.size
    return Shard(0, tp.rank * per, (tp.rank + 1) * per)


def check_divisible(config: ModelConfig, tp_size: int) -> None:
    """Refuse a model that cannot be split ``tp_size`` ways, saying which dimension fails."""
    if tp_size == 1:
        return
    if config.n_heads % tp_size:
        raise ConfigError(f"num_attention_heads={config.n_heads} is not divisible by tp={tp_size}")
    if config.n_kv_heads % tp_size and tp_size % config.n_kv_heads:
        raise ConfigError(
            f"num_key_value_heads={config.n_kv_heads} and tp={tp_size}: neither divides the other, "
            "so the key/value heads can be neither split nor replicated evenly"
        )
    if config.intermediate_size % tp_size:
        raise ConfigError(f"intermediate_size={config.intermediate_size} is not divisible by tp={tp_size}")
    for name, size in (("moe_intermediate_size", getattr(config, "expert_intermediate", 0)),
                       ("shared_expert_intermediate_size", getattr(config, "shared_intermediate", 0))):
        if size % tp_size:  # a mixture of experts' experts are split as the dense MLP is
            raise ConfigError(f"{name}={size} is not divisible by tp={tp_size}")


def local_heads(config: ModelConfig, tp: TensorParallel) -> tuple[int, int]:
    """(query heads, key/value heads) on this rank. With fewer kv heads than ranks, kv heads are replicated."""
    return config.n_heads // tp.size, max(config.n_kv_heads // tp.size, 1)


def q_shard(config: ModelConfig, tp: TensorParallel, dim: int = 0) -> Shard:
    rows = _even(config.q_dim, tp)
    return Shard(dim, rows.start, rows.stop) if tp.size > 1 else REPLICATED


def kv_shard(config: ModelConfig, tp: TensorParallel) -> Shard:
    if tp.size == 1:
        return REPLICATED
    if config.n_kv_heads >= tp.size:
        return _even(config.kv_dim, tp)
    head = tp.rank // (tp.size // config.n_kv_heads)  # the kv head that this rank's query heads use
    return Shard(0, head * config.head_dim, (head + 1) * config.head_dim)


def vocab_rows(config: ModelConfig, tp: TensorParallel) -> tuple[int, int]:
    """(first row, rows) of the vocabulary on this rank; the last rank may hold fewer than the others."""
    per = -(-config.vocab_size // tp.size)
    start = min(tp.rank * per, config.vocab_size)
    return start, per
