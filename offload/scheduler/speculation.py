"""The row engine's speculative pass: draft, verify every row's drafts in one pass over the target, accept.

With a draft (``LoadOptions.draft``), the row engine (``row_engine.py``) runs each pass
that adds no prompt through :meth:`Speculator.run`:

1. choose the shape of the pass: the draft depth ``k`` and the tokens ``m`` at each depth
   (``draft_tokens`` and ``draft_branches``, or the shape that gains the rows the most
   tokens per second, from each row's measured acceptance, how often alternatives mended
   a break, and the plans' cost of a pass of ``k m + 1`` tokens a row plus ``k`` draft steps, but
   for those the draft drafted beside the pass before where the verdict was one it guessed:
   ``draft.drafting_ahead``);
2. the draft proposes up to ``k`` tokens per row (fewer where the row has fewer left to
   make, or prompt lookup finds fewer);
   with ``m > 1`` a row's drafts grow into a tree with the draft model's alternatives at
   each depth (:func:`~offload.speculative.grow_tree`);
3. one pass over the target (``OffloadedModel.verify``) adds each row's last token and its
   drafts, every row padded to the same width, and returns the logits at each (queued; the draft
   drafts ahead beside it, ``draft.look_ahead``); where no row
   has a draft (prompt lookup found none), a plain decode step does (a verify pass of
   ``k + 1`` tokens costs more, and its captured width stays the one the plan reserved);
4. :func:`offload.speculative.accept` picks each row's tokens (greedy: the target's
   argmax as far as the drafts agree with it; sampled: speculative sampling, down a
   tree where the row has one), rank 0's choice is broadcast when a row samples, and the
   host reads them; a greedy tree's row walks its tree by the same argmax
   (:func:`~offload.speculative.walk_tree`), and the branch a tree's row kept is moved
   into place in the cache (``OffloadedModel.keep_path``);
5. the draft rolls its caches back to what was accepted, and the acceptance is counted.

On a GPU whose links the load measured, the plans' prices are scaled by what the model's verify passes
and draft steps took (``OffloadedModel.speculation_prices``; the host's wall time: each ends when the host
reads its tokens), since a small draft's steps are bound by launches and Python, which the plans do not
price. On the CPU (the tests, whose links are given) the shape follows the plans alone.

Where no length pays (``k = 0``), every eighth such pass drafts one token all the same: a
pass that drafts nothing measures nothing, and acceptance changes with the text.

A row gains between 1 and ``k + 1`` tokens from a pass; the engine advances its cached
length by as many (rejected drafts' cache entries are overwritten by its next pass).
The next pass's drafts need this pass's tokens, but a draft model can guess them: once the
verify pass is queued, it drafts the next pass's greedy chains on a side stream for the
verdicts it guesses (``ModelDraft.look_ahead``, ``drafts.LOOK_AHEAD``), and where the verdict
is one of them the next pass's drafts are ready when it starts.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from ..memory.host import to_device
from ..sampling import GREEDY
from ..speculative import (ASSUMED_ACCEPTANCE, DEFAULT_MAX_DRAFT, MAX_BRANCHES, PRIOR_WEIGHT, Acceptance,
                           Mends, Proposal, accept, best_draft_shape, grow_tree, path_of, walk_tree)


PROBE_EVERY = 8  # a run of passes that drafted nothing ends with one that drafts a token


@dataclass
class PassOutcome:
    """What a verify pass gave: each row's new tokens (none for a row not in the pass), and the drafts."""

    tokens: list[list[int]]
    drafted: int  # tokens drafted, over the rows (a tree's alternatives too)


class Speculator:
    """Verify passes over ``model`` (an ``OffloadedModel`` with a ``draft``)."""

    def __init__(self, model):
        self.model, self.draft = model, model.draft
        self.fixed, self.fixed_branches = model.options.draft_tokens, model.options.draft_branches
        self.rows: dict = {}  # row -> its Acceptance
        self.overall = Acceptance()
        self.mends = {True: Mends(), False: Mends()}  # greedy rows' and sampled rows', which mend less often
        self.undrafted = 0  # passes in a row that drafted nothing
        # prices measured where the plans' links were (on a GPU, none given in ``link_bandwidth``)
        self.timed = model.device.type == "cuda" and not model.options.link_bandwidth
        self.prices = model.speculation_prices

    @torch.inference_mode()
    def run(self, rows: list) -> PassOutcome:
        """One verify pass over ``rows`` (the engine's rows by cache row, None where a row takes no part); every
        row's last token is on the host (``row.tokens[-1]``, not yet in its cache)."""
        self.rows = {row: self.rows.get(row, Acceptance()) for row in rows if row is not None}
        room = [row.request.max_new_tokens - len(row.tokens) - 1 if row is not None else 0 for row in rows]
        k, m = self.draft_shape(rows, room) if max(room) > 0 else (0, 1)
        self.undrafted = self.undrafted + 1 if k == 0 else 0
        if self.undrafted == PROBE_EVERY:  # drafting nothing measures nothing: try one token, in case it changed
            k, m, self.undrafted = 1, 1, 0
        budgets = [min(k, r) for r in room]
        started = time.perf_counter()
        nodes = [min(k * m, self._fits(row)) if row is not None else 0 for row in rows] if m > 1 else None
        proposal = (self.draft.propose(rows, budgets, nodes) if max(budgets) > 0
                    else Proposal.empty(len(rows)))
        drafted_at = time.perf_counter()
        trees = self._trees(rows, proposal, m, k * m)
        new_tokens = [[row.tokens[-1], *tree[0]] if row is not None else [] for row, tree in zip(rows, trees)]
        cached = [row.cached if row is not None else 0 for row in rows]
        branched = any(len(tokens) > len(chain) for (tokens, _), chain in zip(trees, proposal.tokens))
        drafted = any(tree[0] for tree in trees)
        if drafted:
            logits = self.model.verify(new_tokens, cached, width=k * m + 1,
                                       parents=[tree[1] for tree in trees] if branched else None)
            # The next pass's drafts for the verdicts the draft guesses, queued beside the pass. Queued before it,
            # the side stream's kernels delayed the pass's own, even with the pass at the highest priority (on an
            # H100, 2026-12-06, SmolLM2 streamed: a verify pass of 6.9 ms against 5.1), and with two slots a layer's
            # late compute holds back the link; so did its inputs alone, sent before the pass (2026-12-07: 2.26x
            # plain decoding against 3.00x, the pass 5.53 ms against 4.52), though a small copy from the host on a
            # side stream does not wait behind a stream's large ones (a probe on that H100).
            self.draft.look_ahead(rows, proposal, self.fixed or DEFAULT_MAX_DRAFT)
        else:  # nothing to verify: a decode step, [rows, 1, vocab]
            tokens = to_device([t[0] if t else 0 for t in new_tokens], torch.long, self.model.device)
            logits = self.model.decode(tokens, [c if row is not None else None for row, c in zip(rows, cached)])
            logits = logits.unsqueeze(1)
        samplings = [row.request.sampling if row is not None else GREEDY for row in rows]
        chosen = accept(logits, proposal, samplings, [row.generator if row is not None else None for row in rows],
                        trees)
        if not all(s.greedy for s in samplings):
            self.model.tp.broadcast_from_first(chosen)  # every rank continues with rank 0's draws
        chosen, gained, paths = chosen.tolist(), [], []
        if self.timed and drafted:
            self._measure(rows, proposal.steps, drafted_at - started, k * m + 1, time.perf_counter() - drafted_at)
        for row, values, (tokens, parents) in zip(rows, chosen, trees):
            if row is not None and len(tokens) > 0 and branched and row.request.sampling.greedy:
                got, path = walk_tree(values[:-1], tokens, parents)
            else:
                got = values[: values[-1]] if row is not None else []
                path = path_of(got, tokens, parents) if got else []
            gained.append(got)
            paths.append(path)
        if branched:
            self.model.keep_path(cached, paths)
        on_chain = [sum(1 for j in path[1:] if j <= len(drafted)) for path, drafted in zip(paths, proposal.tokens)]
        self.draft.update(rows, on_chain, paths)
        self._count(rows, proposal, chosen, on_chain)
        return PassOutcome(gained, sum(len(tree[0]) for tree in trees))

    def _trees(self, rows: list, proposal: Proposal, branches: int, most: int) -> list[tuple[list[int], list[int]]]:
        """Each row's drafts and their parents: the tree the draft grew, a chain, or (a row of a draft with
        alternatives, and ``branches > 1``) a tree of at most ``most`` tokens that fits in the row's KV cache."""
        trees = []
        for b, (row, chain) in enumerate(zip(rows, proposal.tokens)):
            if proposal.trees is not None and proposal.trees[b][0]:
                trees.append(proposal.trees[b])
                continue
            alternatives = proposal.alternatives[b] if proposal.alternatives and branches > 1 else []
            if row is None or not chain or not alternatives:
                trees.append((list(chain), list(range(len(chain)))))
                continue
            trees.append(grow_tree(chain, alternatives, branches, min(most, self._fits(row))))
        return trees

    def _fits(self, row) -> int:
        """The tokens a row's KV cache holds after its last one."""
        return self.model.max_seq_len - row.cached - 1

    def _count(self, rows: list, proposal: Proposal, chosen: list[list[int]], on_chain: list[int]) -> None:
        """Each row's acceptance of its chain, and where a chain broke, whether the token the row took there was
        among the draft's alternatives (and which): a greedy row's is the target's argmax, a sampled row's is
        drawn from the residual, which a tree's alternatives would have caught with the same chance."""
        for b, (row, drafted, n) in enumerate(zip(rows, proposal.tokens, on_chain)):
            if row is None or not drafted:
                continue
            self.rows[row].add(len(drafted), n)
            self.overall.add(len(drafted), n)
            if n < len(drafted) and proposal.alternatives and proposal.alternatives[b]:
                wanted = chosen[b][n]  # the row's token where the chain broke (argmax, or drawn)
                others = proposal.alternatives[b][n]
                self.mends[row.request.sampling.greedy].add(others.index(wanted) + 1 if wanted in others else None)

    def _measure(self, rows: list, steps: int, drafting: float, width: int, verifying: float) -> None:
        """What this pass's draft steps (``steps`` of them, the draft's catch-up included; 0: not a measure) and
        verify pass took against the plans' prices of them. Under tensor parallelism rank 0's times count on every
        rank: each chooses the next pass's shape from them, and the ranks' passes must be the same."""
        if self.model.tp.size > 1:
            times = torch.tensor([drafting, verifying, steps], dtype=torch.float64, device=self.model.device)
            drafting, verifying, steps = self.model.tp.broadcast_from_first(times).tolist()
        verify_seconds, step_seconds = self._priced(rows)
        self.prices.passes += 1
        self.prices.drafting_seconds += drafting
        self.prices.verifying_seconds += verifying
        self.prices.add_verify(self.model.verify_width(width), verifying, verify_seconds(width))
        if steps > 0:
            self.prices.draft_step.add(drafting / steps, step_seconds)

    def _priced(self, rows: list):
        """The plans' prices: of a verify pass ``width`` tokens a row wide (a function of the width), and of a
        draft step (0 for prompt lookup), for these rows."""
        keys = sum(row.cached for row in rows if row is not None)

        def verify_seconds(width: int) -> float:
            width = self.model.verify_width(width)  # as the pass will run: padded, with graphs
            return max(plan.pass_seconds(len(rows) * width, keys * width) for plan in self.model.plans)

        plans = getattr(self.draft, "plans", None)  # a draft model's; prompt lookup costs nothing
        return verify_seconds, max(plan.pass_seconds(len(rows), keys) for plan in plans) if plans else 0.0

    def draft_shape(self, rows: list, room: list[int]) -> tuple[int, int]:
        """The depth and branches of the pass: ``draft_tokens`` and ``draft_branches`` where given, otherwise
        what gains the rows the most tokens per second by the plans' prices, scaled as measured. Only a draft model grows trees: prompt
        lookup drafts chains."""
        live = [row for row in rows if row is not None]
        tokens = self.fixed or DEFAULT_MAX_DRAFT
        most_depth = min(tokens, max(room))
        if not self.draft.names_alternatives:
            branches = [1]
        elif self.fixed_branches:
            branches = [min(self.fixed_branches, tokens)]
        else:
            branches = list(range(1, min(MAX_BRANCHES, tokens) + 1))
        rates = {greedy: mends.rates(max(branches)) for greedy, mends in self.mends.items()}
        mended = [{m: rates[row.request.sampling.greedy][m] for m in branches} for row in live]
        if self.fixed and len(branches) == 1:
            return min(most_depth, tokens // branches[0]), branches[0]
        prior = self.overall.rate(ASSUMED_ACCEPTANCE)  # what the plan kept the draft for, until measured
        acceptances = [self.rows[row].rate(prior, PRIOR_WEIGHT) for row in live]
        verify_seconds, step = self._priced(rows)

        @functools.cache  # the shapes share widths (k m + 1): the plans price each once a pass
        def measured_verify_seconds(width: int) -> float:
            return self.prices.verify_scale(self.model.verify_width(width)) * verify_seconds(width)

        step *= self.prices.draft_step.scale
        return best_draft_shape(acceptances, mended, measured_verify_seconds, step, most_depth, tokens,
                                fill=bool(self.fixed), ahead=self.draft.drafting_ahead(rows))
