"""Choosing next tokens from logits: greedy, or sampled with temperature, top-k and top-p.

Each row samples with its own seeded generator, so a row's tokens depend on its
own seed and logits only, not on the rows it shares a step with. (With speculative
decoding, its draws also depend on how its passes were cut: how many tokens each
drafted, which the length chosen per pass weighs over every row of the pass, and
which passes were plain steps because another row's prompt came in. So a seeded row
may draw other tokens beside other rows; its tokens keep the target's distribution.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .errors import InputError
from .inputs import is_real
from .memory.host import to_device


def _as_float32(value: float) -> float:
    return float(torch.tensor(float(value), dtype=torch.float32))


@dataclass(frozen=True)
class Sampling:
    """Greedy unless ``do_sample``; then temperature, top-k and top-p (nucleus) filtering, seeded.

    A temperature of 0 is greedy decoding, as in other runtimes' APIs.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1.0: no nucleus filtering
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.do_sample, bool):
            raise InputError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not is_real(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.temperature and not 0 < _as_float32(self.temperature) < math.inf:  # logits are divided in float32
            raise InputError(f"temperature {self.temperature!r} is beyond float32's range; use 0 for greedy decoding")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**64):
            raise InputError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def with_seed_offset(self, offset: int) -> "Sampling":
        """The same settings with the seed shifted by ``offset`` (rows of one request draw differently)."""
        if self.seed is None or self.greedy:
            return self
        return dataclasses.replace(self, seed=(self.seed + offset) % 2**64)

    def generator(self, device) -> torch.Generator | None:
        """A generator seeded with ``seed`` (a fresh random seed without one); None when greedy."""
        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()  # this generator's own fresh seed: torch.seed() would reseed the caller's global generators
        else:
            gen.manual_seed(self.seed)
        return gen


GREEDY = Sampling()


def sample(logits: torch.Tensor, samplings: list[Sampling], generators: list) -> torch.Tensor:
    """One token id per row of ``logits [B, V]``, row ``b`` chosen as ``samplings[b]`` says.

    The ids stay on the logits' device and nothing waits for it: the row engine feeds them
    to the next pass before the host reads them.
    """
    ids = logits.argmax(dim=-1)
    rows = [b for b, s in enumerate(samplings) if not s.greedy]
    if not rows:
        return ids
    index = to_device(rows, torch.long, logits.device)
    probs = probabilities(logits.index_select(0, index), [samplings[b] for b in rows])
    return ids.index_copy(0, index, draw(probs, [generators[b] for b in rows]))


def probabilities(logits: torch.Tensor, samplings: list[Sampling]) -> torch.Tensor:
    """What row ``b`` of ``logits [N, V]`` samples from under ``samplings[b]`` (not greedy): the float32
    distribution after temperature, top-k and top-p. Speculative sampling applies it to the target's and
    the draft's logits alike, so that both sides of its ratio are the distributions plain sampling draws from."""
    x = logits.float()
    as_column = lambda values, dtype: to_device(values, dtype, x.device)[:, None]  # noqa: E731
    # Shift before dividing: a tiny temperature sends every other logit to -inf, never to NaN.
    x = (x - x.max(dim=-1, keepdim=True).values) / as_column([s.temperature for s in samplings], x.dtype)
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    vocab = x.shape[-1]
    kth = sorted_x.gather(-1, as_column([min(s.top_k or vocab, vocab) - 1 for s in samplings], torch.long))
    drop = sorted_x < kth
    probs = sorted_x.masked_fill(drop, float("-inf")).softmax(-1)
    # Keep the token that crosses p. A top_p of 1 keeps every token: float32's running sum of a large vocabulary's
    # probabilities passes 1 before its last tokens, and would drop them.
    top_p = as_column([s.top_p if s.top_p < 1 else math.inf for s in samplings], x.dtype)
    drop |= probs.cumsum(-1) - probs > top_p
    x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return x.softmax(-1)


def draw(probs: torch.Tensor, generators: list) -> torch.Tensor:
    """One id per row of ``probs [N, V]``, drawn with that row's generator."""
    # Exponential race (the Gumbel-max trick): argmax p / E with E ~ Exp(1) draws from p.
    race = torch.stack([torch.empty_like(p).exponential_(1, generator=g) for g, p in zip(generators, probs)])
    return (probs / race).argmax(dim=-1)
