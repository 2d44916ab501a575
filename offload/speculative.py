"""Speculative decoding's rules: which drafted tokens a verify pass accepts, and how many to draft.

A row adds its last token and ``k`` drafted tokens ``d_1..d_k`` to one pass over the
target, which returns the target's logits at each of the ``k + 1`` positions: position
``i`` says what the target would choose after ``d_i`` (after the last token for
``i = 0``). :func:`accept` turns them into the tokens the row gains, ``n + 1`` of them
for ``n`` accepted drafts:

* **greedy rows** accept the longest prefix of drafts equal to the target's argmax,
  then take the target's argmax at the first mismatch (or after the last draft). The
  tokens are the target's argmax at every position, so the output is plain greedy
  decoding's, token for token.
* **sampled rows** use speculative sampling (Leviathan et al. 2023, Chen et al. 2023):
  ``d_i`` is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first
  rejection the row takes a token from the residual ``max(0, p_i - q_i)``,
  normalised, and after ``k`` acceptances one from ``p_k``. ``p`` and ``q`` are the
  distributions plain sampling draws from (:func:`offload.sampling.probabilities`:
  temperature, top-k, top-p applied to the target's and the draft's logits alike), so
  each token the row gains is distributed as plain sampling from the target would
  draw it. A draft without a distribution (prompt lookup) is a point mass: ``q_i`` is 1
  at ``d_i``, so ``d_i`` is accepted with probability ``p_i(d_i)`` and the residual is
  ``p_i`` without ``d_i``.

Everything stays on the device; the host reads one small tensor per pass.

**Trees** (a model draft): at each depth of its chain the draft also names its next
likeliest tokens, and up to ``m - 1`` of them join the pass as leaves beside the chain's
token (:func:`grow_tree`). A pass of 17 tokens costs what one costs where weights stream,
so the spare width goes to the likeliest places where the chain breaks. A greedy row
follows the target's argmax down the tree from the root as long as a child matches it
(:func:`walk_tree`): the output is still plain greedy decoding's, token for token. A
sampled row tries a node's children in turn (:class:`_SampledTree`): the chain's token by
speculative sampling, then each alternative as a point mass against what is left of the
residual (accepted with the residual's probability of it, else removed from it), and
descends into the first accepted. Trying point masses one by one draws from the residual
exactly, whatever tokens they are, so each token is still distributed as plain sampling.
With ``OFFLOAD_BEST_FIRST_TREES=1`` (``drafts.BEST_FIRST``), where every drafting row is greedy, a
draft model grows its trees itself, best first (:class:`BestFirstTree`): the likeliest paths under the
draft, wherever they branch.

How many to draft (:func:`best_draft_shape`): with a per-token acceptance ``a``, a
row gains ``(1 - a^(k+1)) / (1 - a)`` tokens from a pass of ``k`` drafts (the tokens
up to the first rejection, plus one). With ``m`` tokens at each depth, a break in the
chain is mended with probability ``r_m`` (how often the target's token was among the
draft's next ``m - 1``, measured), so each depth is passed with ``b = a + (1 - a) r_m``
and the row gains ``1 + b (1 - a^k) / (1 - a)``. A pass of ``k`` depths is ``k m + 1``
tokens wide and costs what the plan predicts for them plus ``k`` steps of the draft;
the shape that gains the most tokens per second over the pass's rows is taken. On a GPU
the speculator scales both prices by what passes and draft steps took as they ran
(:class:`MeasuredPrice`): a small draft is bound by kernel launches and the host, which the
plan does not price.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .memory.host import to_device
from .sampling import Sampling, draw, probabilities

DEFAULT_MAX_DRAFT = 16  # the longest draft an adaptive row is given (verify passes of up to 17 tokens a row)
MAX_DRAFT_TOKENS = 64  # the most ``draft_tokens`` may ask for
ASSUMED_ACCEPTANCE = 0.7  # what the plan assumes before anything is measured (a draft of the same family)
PRIOR_WEIGHT = 4.0  # a new row's acceptance starts at the engine's mean, as if measured over this many tries
MAX_BRANCHES = 4  # tokens a model draft may propose at each depth of a tree: its likeliest and 3 more


@dataclass
class Proposal:
    """What a draft proposes for a pass: ``tokens[b]`` for row ``b`` (possibly none) and, for a draft that
    samples from a distribution, ``q [rows, k, vocab]`` (float32; row ``b``'s ``i``-th draft was drawn from
    ``q[b, i]``). ``q`` is None for a draft that proposes point masses (prompt lookup)."""

    tokens: list[list[int]]
    q: torch.Tensor | None = None
    # a model draft's rows: alternatives[b][i] are its next likeliest tokens (best first, at most
    # MAX_BRANCHES - 1) where it chose tokens[b][i]; [] for other rows. None: a draft that has none.
    alternatives: list[list[list[int]]] | None = None
    # the one-token steps of a draft model that made it (its catch-up too): what its wall time is divided by to
    # measure a step. 0: none, or a pass of several tokens among them (a prompt, or a catch-up longer than
    # ``drafts.CATCH_UP_STEPS``), which says nothing of a step's time.
    steps: int = 0
    # a draft model's trees grown best first (greedy rows): trees[b] = (tokens, parents) as ``verify`` takes them,
    # its chain (``tokens[b]``) first; ([], []) for other rows. None: the speculator grows trees itself.
    trees: list[tuple[list[int], list[int]]] | None = None

    @staticmethod
    def empty(rows: int) -> "Proposal":
        return Proposal([[] for _ in range(rows)])


# ---------------------------------------------------------------------- trees


def grow_tree(chain: list[int], alternatives: list[list[int]], branches: int, most: int) -> tuple[list[int], list[int]]:
    """A row's drafts as a tree: the chain, then up to ``branches - 1`` alternatives at each depth (shallow
    first; none equal to a sibling), ``most`` tokens in all. Returns the tokens and each one's parent (0: the
    row's last token, ``j``: the ``j``-th token of the list), as ``OffloadedModel.verify`` takes them."""
    tokens, parents = list(chain[:most]), list(range(min(len(chain), most)))
    for depth, others in enumerate(alternatives[: len(tokens)]):
        siblings = {tokens[depth]}
        for token in others:
            if len(siblings) == branches:
                break
            if token in siblings:
                continue
            if len(tokens) == most:
                return tokens, parents
            siblings.add(token)
            tokens.append(token)
            parents.append(depth)
    return tokens, parents


class BestFirstTree:
    """A greedy row's drafts grown best first (SpecExec, Svirschevski et al. 2024): the draft scores a node's
    likeliest children (:meth:`score`), and each step the children whose path from the root is likeliest under
    the draft join the tree (:meth:`grow`), wherever they are: where the draft is sure, the tree runs deep;
    where it hesitates, it branches. Nodes are numbered from 1 in the order they join (0: the root, the row's
    last token), so a pass of the draft over ``[root, *tokens]`` under ``parents`` scores the new ones."""

    def __init__(self, most: int, depth: int):
        self.most, self.depth = most, depth  # at most ``most`` nodes, none deeper than ``depth``
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.logp: list[float] = []  # of each node's path from the root, under the draft
        self.depths: list[int] = []
        self.candidates: list[tuple[float, int, int, int]] = []  # (-logp, order, parent, token): a heap
        self.scored: dict[int, list[int]] = {}  # node -> the tokens the draft scored after it, likeliest first

    def score(self, node: int, tokens: list[int], logprobs: list[float]) -> None:
        """The draft's likeliest ``tokens`` after ``node`` (0: the root), with their log-probabilities."""
        base, depth = (0.0, 0) if node == 0 else (self.logp[node - 1], self.depths[node - 1])
        self.scored[node] = list(tokens)
        if depth >= self.depth:
            return
        for token, logp in zip(tokens, logprobs):
            heapq.heappush(self.candidates, (-(base + logp), len(self.candidates), node, token))

    def grow(self, n: int) -> list[int]:
        """Up to ``n`` scored children join the tree, likeliest first: their numbers."""
        joined = []
        while self.candidates and len(joined) < n and len(self.tokens) < self.most:
            neg_logp, _, parent, token = heapq.heappop(self.candidates)
            self.tokens.append(token)
            self.parents.append(parent)
            self.logp.append(-neg_logp)
            self.depths.append(1 if parent == 0 else self.depths[parent - 1] + 1)
            joined.append(len(self.tokens))
        return joined

    def chain_first(self) -> tuple[list[int], list[int], list[int], list[list[int]]]:
        """The tree renumbered with its chain first (from the root, each node's likeliest child: what a chain
        draft would have proposed), as the speculator counts acceptance: ``(tokens, parents, order, siblings)``
        where ``order[i]`` is the joining number of new node ``i + 1``, and ``siblings[d]`` the chain's
        alternatives at depth ``d``: the draft's next likeliest after its parent, in the tree or not (as a
        chain's are counted)."""
        children: dict[int, list[int]] = {}
        for j, parent in enumerate(self.parents, start=1):
            children.setdefault(parent, []).append(j)
        for kids in children.values():
            kids.sort(key=lambda j: -self.logp[j - 1])
        chain, node = [], 0
        while children.get(node):
            node = children[node][0]
            chain.append(node)
        order = chain + [j for j in range(1, len(self.tokens) + 1) if j not in set(chain)]
        new = {old: i for i, old in enumerate(order, start=1)} | {0: 0}
        tokens = [self.tokens[j - 1] for j in order]
        parents = [new[self.parents[j - 1]] for j in order]
        siblings = [[t for t in self.scored[self.parents[j - 1]] if t != self.tokens[j - 1]][: MAX_BRANCHES - 1]
                    for j in chain]
        return tokens, parents, order, siblings


def walk_tree(target: list[int], drafts: list[int], parents: list[int]) -> tuple[list[int], list[int]]:
    """Greedy acceptance over a tree: from the root (index 0), go on to the child whose token is the target's
    argmax there (``target[i]`` at index ``i``) while there is one. Returns the tokens gained (the accepted
    drafts, then the target's argmax where the walk stopped) and the path's indices, root first."""
    children = {}
    for j, (token, parent) in enumerate(zip(drafts, parents), start=1):
        children.setdefault((parent, token), j)
    path = [0]
    while (child := children.get((path[-1], target[path[-1]]))) is not None:
        path.append(child)
    return [drafts[j - 1] for j in path[1:]] + [target[path[-1]]], path


def path_of(gained: list[int], drafts: list[int], parents: list[int]) -> list[int]:
    """The indices (root first) of the tree's nodes that the accepted tokens ``gained[:-1]`` went through."""
    children = {(parent, token): j for j, (token, parent) in enumerate(zip(drafts, parents), start=1)}
    path = [0]
    for token in gained[:-1]:
        path.append(children[(path[-1], token)])
    return path


def accept(logits: torch.Tensor, proposal: Proposal, samplings: list[Sampling], generators: list,
           trees: list[tuple[list[int], list[int]]] | None = None) -> torch.Tensor:
    """The tokens each row gains from a verify pass whose ``logits [rows, W, vocab]`` are the target's at its
    last token and its drafts ``proposal.tokens[b]`` (``W`` at least one more than the longest draft), or
    where ``trees[b]`` (tokens, parents) grew beyond the chain, at those.

    Returns ``[rows, W + 1]`` on the logits' device: row ``b``'s tokens in ``[:count]`` and ``count`` (the
    accepted drafts plus one) in the last column. A greedy row's columns are the target's argmax at every
    position instead: its tree is walked by :func:`walk_tree`.
    """
    rows, width, _ = logits.shape
    drafts = _padded(proposal.tokens, width, logits.device)  # [rows, W]: -1 past a row's drafts and at the end
    target = logits.argmax(dim=-1)
    matches = (drafts[:, :-1] == target[:, :-1]).long().cumprod(dim=1).sum(dim=1)
    out = torch.cat([target, (matches + 1)[:, None]], dim=1)
    sampled_trees = {}
    for b, sampling in enumerate(samplings):
        if sampling.greedy:
            continue
        q, chain = None if proposal.q is None else proposal.q[b], proposal.tokens[b]
        if trees is not None and len(trees[b][0]) > len(chain):
            sampled_trees[b] = _SampledTree(logits[b], *trees[b], len(chain), q, sampling, generators[b])
        else:
            out[b] = _speculative_sample(logits[b], drafts[b], len(chain), q, sampling, generators[b])
    if sampled_trees:  # every tree's numbers in one transfer, then each walk on the host
        numbers = torch.cat([tree.numbers for tree in sampled_trees.values()], dim=1).tolist()
        start = 0
        for b, tree in sampled_trees.items():
            n = tree.numbers.shape[1]
            out[b] = tree.finish([row[start : start + n] for row in numbers])
            start += n
    return out


def _padded(tokens: list[list[int]], width: int, device) -> torch.Tensor:
    """The drafts on ``device``, queued behind the verify pass (a copy from pageable memory waited for it: the
    host then queued the verdict's kernels only once the pass was over)."""
    return to_device([t + [-1] * (width - len(t)) for t in tokens], torch.long, device)


def _speculative_sample(logits: torch.Tensor, drafts: torch.Tensor, k: int, q: torch.Tensor | None,
                        sampling: Sampling, generator) -> torch.Tensor:
    """One sampled row: ``logits [W, vocab]``, its ``k`` drafts in ``drafts [W]`` (-1 after them), drawn from
    ``q [>= k, vocab]`` (None: point masses). Returns ``[W + 1]``: the tokens, then their count."""
    width = logits.shape[0]
    p = probabilities(logits[: k + 1], [sampling] * (k + 1))  # [k + 1, V]
    d, at = drafts[:k], torch.arange(k, device=logits.device)
    p_draft = p[at, d]
    q_draft = torch.ones_like(p_draft) if q is None else q[at, d]
    u = torch.rand(k, generator=generator, device=logits.device, dtype=torch.float32)
    accepted = (u * q_draft < p_draft).long().cumprod(dim=0).sum()  # u < p/q, without dividing by a zero q
    residual = p.clone()
    if q is None:
        residual[at, d] = 0.0
    else:
        residual[:k] -= q[:k]
    residual = residual.clamp_(min=0.0).index_select(0, accepted[None])  # [1, V]: where the row stops
    total = residual.sum(dim=-1, keepdim=True)
    # p == q to the last bit leaves no residual, but then the draft is never rejected: fall back to p
    residual = torch.where(total > 0, residual / total.clamp(min=1e-30), p.index_select(0, accepted[None]))
    last = draw(residual, [generator])
    positions = torch.arange(width, device=logits.device)
    tokens = torch.where(positions < accepted, drafts, last)
    return torch.cat([tokens, (accepted + 1)[None]])


class _SampledTree:
    """One sampled row's tree: ``drafts`` under ``parents`` (:func:`grow_tree`), its first ``chain`` the chain
    drawn from ``q [>= chain, vocab]`` (None: point masses), the rest point masses; ``logits [W, vocab]`` at the
    root and each draft. Made on the device, with ``numbers [4, drafts]`` the walk needs (each draft's p, what
    is left of p - q, and q at its parent, and a uniform draw); ``accept`` reads every tree's numbers in one
    transfer, and :meth:`finish` walks the tree on the host (:class:`_SampledWalk`) and draws the last token on
    the device from what is left at the node where the walk stopped."""

    def __init__(self, logits: torch.Tensor, drafts: list[int], parents: list[int], chain: int,
                 q: torch.Tensor | None, sampling: Sampling, generator):
        n, device = len(drafts), logits.device
        self.drafts, self.parents, self.generator, self.width = drafts, parents, generator, logits.shape[0]
        self.sampled = chain if q is not None else 0  # drafts drawn from q
        self.p = probabilities(logits[: n + 1], [sampling] * (n + 1))  # [n + 1, V]: at the root and each draft
        self.leftover = self.p.clone()  # at a node whose chain child was rejected: the normalised max(0, p - q)
        if q is not None:
            self.leftover[:chain] = (self.p[:chain] - q[:chain]).clamp_(min=0.0)
            self.leftover[:chain] /= self.leftover[:chain].sum(dim=-1, keepdim=True).clamp_(min=1e-30)
        at, ids = torch.tensor(parents, device=device), torch.tensor(drafts, device=device)
        q_at = q[at.clamp(max=chain - 1), ids] if q is not None and chain else torch.ones(n, device=device)
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
        self.numbers = torch.stack([self.p[at, ids], self.leftover[at, ids], q_at, u])

    def finish(self, numbers: list[list[float]]) -> torch.Tensor:
        """``[W + 1]``: the row's tokens, then their count, from its ``numbers`` read on the host."""
        walk = _SampledWalk(self.drafts, self.parents, self.sampled, *numbers)
        p = self.p[walk.node]
        residual = (self.leftover[walk.node] if walk.left else p).clone()
        residual[walk.rejected] = 0.0
        total = residual.sum()
        residual = torch.where(total > 0, residual / total.clamp(min=1e-30), p)  # rounding left nothing: p
        taken = walk.taken
        out = torch.tensor(taken + [0] * (self.width - len(taken)) + [len(taken) + 1], device=p.device)
        out[len(taken) : self.width] = draw(residual[None], [self.generator])  # the last token, then its copies
        return out


class _SampledWalk:
    """Speculative sampling down a tree, on the host. At each node its children are tried in order: the
    chain's child (drawn from ``q``: accepted where ``u q < p``; rejected, what is left becomes the normalised
    ``max(0, p - q)``), then each other child as a point mass against what is left (accepted with what is left
    of its probability; rejected, taken out: ``lost``). The walk goes down into the first child accepted and
    stops where none is: ``taken`` (the accepted tokens), ``node``, and there ``left`` (whether what is left
    is ``max(0, p - q)``'s rather than ``p``'s) and ``rejected`` (point masses taken out). Trying point masses
    one by one draws from what is left exactly, so the tokens are distributed as plain sampling's; exact only
    where a node's children are distinct tokens (:func:`grow_tree` sees to it)."""

    def __init__(self, drafts: list[int], parents: list[int], sampled: int, p_at: list[float],
                 left_at: list[float], q_at: list[float], u: list[float]):
        """``sampled``: how many of the first drafts (the chain) were drawn from q; ``p_at[i]``, ``left_at[i]``,
        ``q_at[i]``: draft ``i``'s probability under p, max(0, p - q) normalised, and q at its parent."""
        children: dict[int, list[int]] = {}
        for j, parent in enumerate(parents, start=1):
            children.setdefault(parent, []).append(j)
        self.taken, self.node = [], 0
        while True:
            self.left, self.rejected, lost = False, [], 0.0
            for j in children.get(self.node, []):
                i = j - 1
                if i < sampled and not self.left:  # the chain's child, drawn from q here
                    accepted = u[i] * q_at[i] < p_at[i]
                    self.left = not accepted
                else:
                    mass = left_at[i] if self.left else p_at[i]
                    accepted = u[i] * (1.0 - lost) < mass
                    if not accepted:
                        lost += mass
                        self.rejected.append(drafts[i])
                if accepted:
                    self.taken.append(drafts[i])
                    self.node = j
                    break
            else:
                return


# ---------------------------------------------------------------------- how many to draft


def expected_tokens(acceptance: float, k: int, mended: float = 0.0) -> float:
    """Tokens a row gains from a pass with ``k`` drafts, each accepted with probability ``acceptance``; where
    one is not, an alternative beside it is with probability ``mended`` (a tree), ending the pass."""
    passed = acceptance + (1.0 - acceptance) * mended  # the chance of getting past a depth
    if acceptance >= 1.0:
        return k + 1.0
    return 1.0 + passed * (1.0 - acceptance**k) / (1.0 - acceptance)


def best_draft_length(acceptances: list[float], pass_seconds: Callable[[int], float], draft_step_seconds: float,
                      most: int) -> int:
    """The draft length ``k <= most`` that gains the rows the most tokens per second: a pass ``k + 1`` tokens
    wide costs ``pass_seconds(k + 1)`` (for all its rows) plus ``k`` steps of the draft."""
    return best_draft_shape(acceptances, {1: 0.0}, pass_seconds, draft_step_seconds, most, most)[0]


def best_draft_shape(acceptances: list[float], mended: dict[int, float] | list[dict[int, float]],
                     pass_seconds: Callable[[int], float], draft_step_seconds: float, most_depth: int,
                     most_tokens: int, fill: bool = False, ahead: tuple[float, int] = (0.0, 0)) -> tuple[int, int]:
    """The depth ``k <= most_depth`` and branches ``m`` (a key of ``mended``: the chance that ``m - 1``
    alternatives mend a break; one dict for every row, or each row's, all with the same keys) with
    ``k m <= most_tokens`` that gain the rows the most tokens per second: a pass ``k m + 1`` tokens wide costs
    ``pass_seconds(k m + 1)`` plus ``k`` draft steps, less, in the share ``ahead[0]`` of passes (1 where this pass's
    chains were drafted beside the pass before, ``drafts.LOOK_AHEAD``), the first ``ahead[1]`` steps. With
    ``fill``, each ``m`` drafts as deep as it may (``draft_tokens`` fixes the tokens, not the shape)."""
    rows = [mended] * len(acceptances) if isinstance(mended, dict) else mended
    share, hidden = ahead

    def rate(shape: tuple[int, int]) -> float:
        k, m = shape
        gained = sum(expected_tokens(a, k, mends[m]) for a, mends in zip(acceptances, rows))
        return gained / (pass_seconds(k * m + 1) + (k - share * min(k, hidden)) * draft_step_seconds)

    def depths(m: int) -> range:
        deepest = min(most_depth, most_tokens // m)
        return range(deepest, deepest + 1) if fill else range(deepest + 1)

    return max(((k, m) for m in sorted(rows[0]) for k in depths(m)), key=rate)  # the narrowest, shallowest of equals


@dataclass
class Acceptance:
    """Drafted tokens tried and accepted, counted the way a geometric model of acceptance is fitted: a pass
    that accepts ``n`` of ``k`` drafts tried ``n + 1`` of them (``n`` if all were accepted)."""

    tried: float = 0.0
    accepted: float = 0.0

    def add(self, drafted: int, accepted: int) -> None:
        self.accepted += accepted
        self.tried += accepted + (1 if accepted < drafted else 0)

    def rate(self, prior: float = 0.5, weight: float = 2.0) -> float:
        """The measured rate, pulled toward ``prior`` as if ``weight`` tries had shown it."""
        return (self.accepted + prior * weight) / (self.tried + weight)


@dataclass
class MeasuredPrice:
    """How a price compares with what it paid for as it ran: the median of the last ``window`` ratios of
    measured to priced seconds, once there are ``least`` of them. A median of several, because a pass that
    captures a CUDA graph (the first of a new width or a longer cache) takes many times its price."""

    window: int = 16
    least: int = 3
    ratios: deque = field(default_factory=deque)

    def add(self, measured: float, priced: float) -> None:
        if priced > 0.0 and measured > 0.0:
            self.ratios.append(measured / priced)
            if len(self.ratios) > self.window:
                self.ratios.popleft()

    @property
    def scale(self) -> float:
        """What to multiply the price by: 1 until ``least`` ratios were measured."""
        return statistics.median(self.ratios) if len(self.ratios) >= self.least else 1.0


@dataclass
class MeasuredPrices:
    """What a target's verify passes and its draft's steps took against the plans' prices. Kept with the model,
    so that each generate call's engine starts from what the last one measured.

    A verify pass is priced at each width as it runs (padded) on its own: a streamed pass's compute of many
    tokens does not all hide behind the link, which the plans count on (on an H100, 2026-12-06, SmolLM2 streamed:
    1.14x the plan's price for one token a row, 1.38x over passes of 4, 1.7x over the wider passes the speculator
    chose), so one scale for every width made wide passes look cheap: chains of 3 gained more than the depths the
    speculator chose (1.42x plain decoding against 1.14x)."""

    verify: MeasuredPrice = field(default_factory=MeasuredPrice)  # every width's: what the benchmark reports
    draft_step: MeasuredPrice = field(default_factory=MeasuredPrice)
    verify_widths: dict = field(default_factory=dict)  # padded width -> its MeasuredPrice
    # Where the measured passes' time went, in all (the host's wall time): drafting, then verifying.
    passes: int = 0
    drafting_seconds: float = 0.0
    verifying_seconds: float = 0.0

    def add_verify(self, width: int, measured: float, priced: float) -> None:
        """A verify pass ``width`` tokens a row wide (padded, as it ran) took ``measured`` seconds, priced at
        ``priced``."""
        self.verify.add(measured, priced)
        self.verify_widths.setdefault(width, MeasuredPrice()).add(measured, priced)

    def verify_scale(self, width: int) -> float:
        """What to multiply the plans' price of a verify pass ``width`` wide (padded) by: its own width's scale
        once measured; between two widths measured, the narrower one's scale grown toward the wider's in
        proportion to the doublings of the width between them; past those measured, the nearest one's; 1 before
        any."""
        measured = sorted((w, p.scale) for w, p in self.verify_widths.items() if len(p.ratios) >= p.least)
        if not measured:
            return 1.0
        below = [(w, s) for w, s in measured if w <= width]
        above = [(w, s) for w, s in measured if w >= width]
        if not below or not above:
            return (below or above)[-1 if below else 0][1]
        (w0, s0), (w1, s1) = below[-1], above[0]
        if w0 == w1:
            return s0
        share = (math.log2(width) - math.log2(w0)) / (math.log2(w1) - math.log2(w0))
        return s0 + share * (s1 - s0)


@dataclass
class Mends:
    """Where a chain broke, the rank of the row's next token among the draft's alternatives there (counted
    whether or not the pass carried them, so the first tree is chosen from evidence)."""

    breaks: int = 0
    at_rank: list[int] | None = None  # at_rank[r]: breaks mended by the (r + 2)-th likeliest draft token

    def add(self, rank: int | None) -> None:
        """A break; ``rank``: the target's token was the draft's ``rank``-th alternative (1: its second choice)."""
        self.at_rank = self.at_rank or [0] * (MAX_BRANCHES - 1)
        self.breaks += 1
        if rank is not None and rank <= len(self.at_rank):
            self.at_rank[rank - 1] += 1

    def rates(self, most: int = MAX_BRANCHES) -> dict[int, float]:
        """``{m: chance that m - 1 alternatives mend a break}`` for m = 1..most, pulled toward none (as if
        ``PRIOR_WEIGHT`` breaks had shown no mend): a chain until the evidence says otherwise."""
        counts = self.at_rank or [0] * (MAX_BRANCHES - 1)
        return {m: sum(counts[: m - 1]) / (self.breaks + PRIOR_WEIGHT) for m in range(1, most + 1)}


def speculation_forecast(with_plans: list, without_plans: list, draft_plans: list, draft_tokens: int | None,
                         padded: Callable[[int], int] = lambda width: width) -> tuple[int, float, float]:
    """What the plans predict for one row: the draft length (``draft_tokens``, or the best at
    ``ASSUMED_ACCEPTANCE``), the seconds per token with a draft model whose plans are ``draft_plans`` and the
    target's plans ``with_plans``, and the seconds per token of plain decoding with ``without_plans``.
    A verify pass of ``w`` tokens runs ``padded(w)`` (a power of two, in CUDA graphs), as the runtime prices
    it. Under tensor parallelism a pass takes as long as the slowest rank's."""
    def verify(width: int) -> float:
        return max(p.pass_seconds(padded(width)) for p in with_plans)

    step = max(p.pass_seconds(1) for p in draft_plans)
    k = draft_tokens or best_draft_length([ASSUMED_ACCEPTANCE], verify, step, DEFAULT_MAX_DRAFT)
    with_draft = (verify(k + 1) + k * step) / expected_tokens(ASSUMED_ACCEPTANCE, k)
    return k, with_draft, max(p.pass_seconds(1) for p in without_plans)
