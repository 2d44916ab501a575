"""The row engine's speculative pass: draft, verify every row's drafts in one pass over the target, accept.

With a draft (``LoadOptions.draft``), the row engine (``row_engine.py``) runs each pass
that adds no prompt through :meth:`Speculator.run`:

1. choose the draft length ``k`` of the pass (``draft_tokens``, or the length that gains
   the rows the most tokens per second, from each row's measured acceptance and the
   plans' cost of a pass of ``k + 1`` tokens a row plus ``k`` draft steps);
2. the draft proposes up to ``k`` tokens per row (fewer where the row has fewer left to
   make, or prompt lookup finds fewer);
3. one pass over the target (``OffloadedModel.verify``) adds each row's last token and its
   drafts, every row padded to the same width, and returns the logits at each;
4. :func:`offload.speculative.accept` picks each row's tokens on the device (greedy:
   the target's argmax as far as the drafts agree with it; sampled: speculative
   sampling), rank 0's choice is broadcast when a row samples, and the host reads them;
5. the draft rolls its caches back to what was accepted, and the acceptance is counted.

A row gains between 1 and ``k + 1`` tokens from a pass; the engine advances its cached
length by as many (rejected drafts' cache entries are overwritten by its next pass).
Passes are not pipelined: the next pass's drafts need this pass's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import GREEDY
from ..speculative import DEFAULT_MAX_DRAFT, PRIOR_WEIGHT, Acceptance, Proposal, accept, best_draft_length


@dataclass
class PassOutcome:
    """What a verify pass gave: each row's new tokens (none for a row not in the pass), and the drafts."""

    tokens: list[list[int]]
    drafted: int  # tokens drafted, over the rows
    accepted: int  # drafted tokens the target accepted


class Speculator:
    """Verify passes over ``model`` (an ``OffloadedModel`` with a ``draft``)."""

    def __init__(self, model):
        self.model, self.draft = model, model.draft
        self.fixed = model.options.draft_tokens
        self.rows: dict = {}  # row -> its Acceptance
        self.overall = Acceptance()

    @torch.inference_mode()
    def run(self, rows: list) -> PassOutcome:
        """One verify pass over ``rows`` (the engine's rows by cache row, None where a row takes no part); every
        row's last token is on the host (``row.tokens[-1]``, not yet in its cache)."""
        self.rows = {row: self.rows.get(row, Acceptance()) for row in rows if row is not None}
        room = [row.request.max_new_tokens - len(row.tokens) - 1 if row is not None else 0 for row in rows]
        k = self.draft_length(rows, room) if max(room) > 0 else 0
        budgets = [min(k, r) for r in room]
        proposal = self.draft.propose(rows, budgets) if max(budgets) > 0 else Proposal.empty(len(rows))
        new_tokens = [[row.tokens[-1], *drafted] if row is not None else []
                      for row, drafted in zip(rows, proposal.tokens)]
        logits = self.model.verify(new_tokens, [row.cached if row is not None else 0 for row in rows], width=k + 1)
        samplings = [row.request.sampling if row is not None else GREEDY for row in rows]
        chosen = accept(logits, proposal, samplings, [row.generator if row is not None else None for row in rows])
        if not all(s.greedy for s in samplings):
            self.model.tp.broadcast_from_first(chosen)  # every rank continues with rank 0's draws
        gained = [values[: values[-1]] if row is not None else [] for row, values in zip(rows, chosen.tolist())]
        accepted = [len(tokens) - 1 if tokens else 0 for tokens in gained]
        self.draft.update(rows, accepted)
        for row, drafted, n in zip(rows, proposal.tokens, accepted):
            if row is not None and drafted:
                self.rows[row].add(len(drafted), n)
                self.overall.add(len(drafted), n)
        return PassOutcome(gained, sum(map(len, proposal.tokens)), sum(accepted))

    def draft_length(self, rows: list, room: list[int]) -> int:
        """``draft_tokens``, or the length that gains the rows the most tokens per second by the plans."""
        most = min(self.fixed or DEFAULT_MAX_DRAFT, max(room))
        if self.fixed:
            return most
        prior = self.overall.rate()
        live = [row for row in rows if row is not None]
        acceptances = [self.rows[row].rate(prior, PRIOR_WEIGHT) for row in live]
        keys = sum(row.cached for row in live)

        def verify_seconds(width: int) -> float:
            return max(plan.pass_seconds(len(rows) * width, keys * width) for plan in self.model.plans)

        plans = getattr(self.draft, "plans", None)  # a draft model's; prompt lookup costs nothing
        step = max(plan.pass_seconds(len(rows), keys) for plan in plans) if plans else 0.0
        return best_draft_length(acceptances, verify_seconds, step, most)
