"""Token generation: prefill the prompts, then one decode step per new token.

Each row of the batch has its own KV cache row, so prompts of different lengths
need no padding in the cache: a row's tokens sit at positions 0, 1, 2, ... The
prompts are prefilled in steps of at most ``max_step_tokens`` (padded) tokens,
then every decode step appends one token to every row. Rows that have finished
keep being fed (their tokens are dropped) so that the batch stays uniform.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import InputError


@dataclass(frozen=True)
class Sampling:
    """Greedy unless ``do_sample``; then temperature, top-k and top-p (nucleus) filtering, seeded."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1.0: no nucleus filtering
    seed: int | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")

    def generator(self, device) -> torch.Generator | None:
        if not self.do_sample:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of ``logits [B, V]``."""
    logits = logits.float()
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > sampling.top_p  # keep the token that crosses p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # the new tokens of each row (a final eos included)
    finish_reasons: list[str]  # "eos" or "length" per row
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # tokens made by decode steps (the first token of a row comes from prefill)
    decode_steps: int = 0
    decode_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_seconds / self.decode_steps if self.decode_steps else 0.0


def check_token_ids(ids: list[int], vocab_size: int, where: str) -> None:
    """A prompt must be non-empty and made of ids the vocabulary has."""
    if not ids:
        raise InputError(f"{where}: the prompt is empty")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InputError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")


def check_prompts(prompts: list[list[int]], max_new_tokens: list[int], vocab_size: int, max_seq_len: int,
                  max_batch: int) -> None:
    if not prompts:
        raise InputError("no prompts given")
    if len(prompts) > max_batch:
        raise InputError(
            f"{len(prompts)} prompts but the KV cache holds max_batch={max_batch} rows; "
            f"load the model with max_batch={len(prompts)} or more"
        )
    for b, (prompt, new) in enumerate(zip(prompts, max_new_tokens)):
        if new < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {new}")
        check_token_ids(prompt, vocab_size, f"prompt {b}")
        if len(prompt) + new > max_seq_len:
            raise InputError(
                f"prompt {b}: {len(prompt)} tokens + {new} new tokens exceed the context of "
                f"{max_seq_len} tokens (max_seq_len)"
            )


def generate(model, prompts: list[list[int]], max_new_tokens: int | list[int], sampling: Sampling = Sampling(),
             eos_ids: tuple[int, ...] = ()) -> GenerationResult:
    """Generate up to ``max_new_tokens`` (one limit, or one per prompt) with ``model`` (an ``OffloadedModel``)."""
    if isinstance(max_new_tokens, int):
        max_new_tokens = [max_new_tokens] * len(prompts)
    check_prompts(prompts, max_new_tokens, model.config.vocab_size, model.max_seq_len, model.max_batch)
    batch, generator = len(prompts), sampling.generator(model.device)
    result = GenerationResult([[] for _ in prompts], ["length"] * batch, sum(map(len, prompts)))

    start = time.perf_counter()
    logits = prefill(model, prompts)
    model.synchronize()
    result.prefill_seconds = time.perf_counter() - start

    lengths, running = [len(p) for p in prompts], [True] * batch
    start = time.perf_counter()
    while True:
        next_ids = sample(logits, sampling, generator)
        if sampling.do_sample and model.tp.size > 1:  # every rank must continue with the same tokens
            dist.broadcast(next_ids, src=dist.get_global_rank(model.tp.group, 0), group=model.tp.group)
        ids = next_ids.tolist()  # the one host synchronisation of a decode step
        for b in range(batch):
            if running[b]:
                result.tokens[b].append(ids[b])
                if ids[b] in eos_ids:
                    running[b], result.finish_reasons[b] = False, "eos"
                elif len(result.tokens[b]) == max_new_tokens[b]:
                    running[b] = False
        if not any(running):
            break
        result.decode_tokens += sum(running)
        result.decode_steps += 1
        logits = model.step([[t] for t in ids], lengths)
        lengths = [n + 1 for n in lengths]
    result.decode_seconds = time.perf_counter() - start
    return result


def prefill(model, prompts: list[list[int]]) -> torch.Tensor:
    """Run the prompts through the model in steps of at most ``max_step_tokens``; last-token logits ``[B, V]``."""
    batch = len(prompts)
    width = max(model.max_step_tokens // batch, 1)
    logits = None
    for offset in range(0, max(map(len, prompts)), width):
        chunk = [p[offset : offset + width] for p in prompts]
        out = model.step(chunk, [min(offset, len(p)) for p in prompts])
        ends_here = torch.tensor([offset < len(p) <= offset + width for p in prompts], device=out.device)
        logits = out if logits is None else torch.where(ends_here[:, None], out, logits)
    return logits
