"""Drafts for speculative decoding: what proposes the tokens each pass over the target checks.

``LoadOptions.draft`` chooses one:

* ``"ngram"``: prompt lookup (:class:`NgramDraft`). The row's last few tokens are looked up
  in its own prompt and output, and what followed their latest earlier occurrence is
  proposed. No model, no memory; strong where the output repeats its input (code
  edits, summaries, extraction, loops).
* ``"int4"`` or ``"int8"``: a copy of the target's own weights quantized to int4 (or int8),
  kept on the compute device (:class:`ModelDraft`). No second checkpoint; costs HBM that
  the target's resident layers would otherwise have (the plan weighs the two,
  ``offload.loading``). The int8 copy takes twice the memory and agrees with its target
  far more often (SmolLM2 streamed on an H100, 2026-12-07, chains of 6, its copies saved and named as
  draft models: 83% of drafts accepted against 41% for int4 in groups of 64).
* a checkpoint's path: a smaller model with the target's vocabulary, kept on the compute
  device (:class:`ModelDraft`).

A draft model is an :class:`~offload.offloaded_model.OffloadedModel` of its own, all
resident, with a KV cache of the target's rows (a little longer: its drafts run past a
row's last position), loaded with :func:`draft_options`.

The speculator (``offload/scheduler/speculation.py``) calls, once per pass over the rows
of the pass (the row engine's rows; ``None`` for a row not in it):

    share, ready = draft.drafting_ahead(rows)       # whether this pass's chains were drafted ahead, how deep
    proposal = draft.propose(rows, budgets, nodes)  # at most budgets[b] deep for row b (a tree: nodes[b] tokens)
    ...                                             # the target's verify pass is queued
    draft.look_ahead(rows, proposal, deepest)       # meanwhile, the next pass's chains for the verdicts it guesses
    ...                                             # the target's verdict is read
    draft.update(rows, accepted, paths)             # how many of row b's chain the target took, and where
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch

from . import switches
from .memory.host import to_device
from .sampling import draw, probabilities
from .scheduler import greedy_chain
from .scheduler.greedy_chain import GreedyChain
from .speculative import DEFAULT_MAX_DRAFT, MAX_BRANCHES, BestFirstTree, Proposal

NGRAM, INT8, INT4, MODEL = "ngram", "int8", "int4", "model"
COPIES = (INT8, INT4)  # drafts that are the target's own weights, quantized
# With graphs, a row's few new tokens enter the draft's cache as decode steps replayed from graphs: more than a
# probe's (the speculator drafts a token every eighth pass where no length pays), so that it measures steps.
CATCH_UP_STEPS = 16
# Greedy rows' trees grown best first by the draft model (``ModelDraft._grow_trees``): more tokens a pass than the
# chain's alternatives (SmolLM2 on a CPU, eight depths of four: 4.85 against 4.58), but each step is a pass of the
# draft over the tree and a read by the host where a chain's is a decode step. On an H100 (2026-12-05, SmolLM2
# streamed) those passes cost 3.35x a step's price against a chain step's 2.1x: 0.99x plain decoding's tokens/s
# against 1.18x for chains; on an H200 (2026-12-06, a verify pass's rotation in one kernel) 1.12x against 1.19x.
# So on only with OFFLOAD_BEST_FIRST_TREES=1 (read at import).
BEST_FIRST = switches.choice("OFFLOAD_BEST_FIRST_TREES", switches.ON_OFF, False)
# While the target verifies a pass of greedy chains (a pass streamed over a link leaves the GPU mostly idle), a draft
# model drafts the next pass's chains on a side stream for the verdicts it can guess (``ModelDraft.look_ahead``):
# every draft accepted and the target's next token the draft's own argmax, and the ``LOOK_AHEAD`` likeliest breaks
# of the chain by the draft's own probabilities (the first ``j`` drafts accepted and the target's token there one of
# the draft's next likeliest). Each break's guess drafts in a spare row of the draft's KV cache (``LOOK_AHEAD`` a
# row: the plan counts them). Where the verdict is a guessed one, the next pass's chains are ready when it starts.
# On SmolLM2 (its int4 copy in groups of 64 as the draft, float32 on a CPU, 2026-12-06, 8 prompts x 96 tokens)
# chains of 3 had their next pass guessed 40% of the time with no spare row, 55% with one, 71% with three and 80%
# with seven; chains of 5 24%, 39%, 57% and 72%. But a step of more rows costs more: on an H100 (2026-12-06) a step of
# SmolLM2's int4 draft took 0.72 ms at one row, 0.96 at four (its products in the GEMV, ``quant_kernels.gemv_rows``;
# 0.99 in the tiled product) and 1.20 at eight, and with 3 or 7 spare rows drafting ahead was mostly paused (the
# target's pass left too little time): 1.09x and 1.23x plain decoding against 1.33x with one spare row. One by
# default; OFFLOAD_LOOK_AHEAD=N for N, =0 none (read at import).
LOOK_AHEAD = switches.integer("OFFLOAD_LOOK_AHEAD", 1)
AHEAD_PAUSE = 8  # passes without drafting ahead where even two steps outlasted the target's pass (many rows)
AHEAD_FIRST = 4  # the side stream's steps at first: then as many as the target's pass leaves time for
AHEAD_SHARE = 0.9  # of the target's pass, what the side stream's steps may take (the rest: what varies)
RESIDENT_BUDGET = 2**62  # a draft model's own budget: everything resident (the target's plan counts its bytes)
DRAFT_SEED_OFFSET = 0x9E3779B97F4A7C15  # a row's draft samples with its own stream, apart from the target's


def draft_kind(draft) -> str | None:
    """``"ngram"``, ``"int8"``, ``"int4"``, ``"model"`` (a checkpoint's path) or None."""
    if draft is None:
        return None
    if isinstance(draft, str) and draft.strip().lower() in (NGRAM, *COPIES):
        return draft.strip().lower()
    return MODEL


def draft_options(target, max_draft: int, ahead: bool = False):
    """The ``LoadOptions`` of a draft model for a target loaded with ``target`` (its max_seq_len filled in):
    the same device, dtype and tensor parallelism, the target's rows (and ``LOOK_AHEAD`` spare rows for each where
    it may draft ``ahead``: one rank, CUDA graphs not compiled), every layer resident (int4 or int8 for a copy), a
    KV cache ``max_draft`` tokens longer than the target's, only each row's last logits, experts read as the
    default decides for it (a resident draft: directly, on a GPU), and where it grows trees (``BEST_FIRST``, and
    the target's ``draft_branches`` None or above 1) passes of its own ``max_draft + 1`` tokens wide for them."""
    trees = BEST_FIRST and (target.draft_branches or MAX_BRANCHES) > 1
    kind = draft_kind(target.draft)
    return target.replace(
        gpu_memory=RESIDENT_BUDGET, cpu_memory=0, peer_memory=None, max_seq_len=target.max_seq_len + max_draft,
        max_batch=target.max_batch * (1 + (LOOK_AHEAD if ahead else 0)), max_step_tokens=None, all_logits=False,
        slots=None, group_size=None, direct_experts=None, draft=None, draft_tokens=None, draft_branches=None,
        quantize=kind if kind in COPIES else None, tree_width=max_draft + 1 if trees else 1,
    )


def draft_label(draft) -> str:
    if draft_kind(draft) in COPIES:
        return f"{draft_kind(draft)} copy of the target"
    return f"model {os.fspath(draft)}"


# ---------------------------------------------------------------------- prompt lookup


class NgramDraft:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the row's last ``n`` tokens,
    for the longest ``n`` from ``longest`` down to ``shortest`` that occurs. A point mass per token."""

    names_alternatives = False  # its drafts grow no trees

    def __init__(self, longest: int = 3, shortest: int = 1):
        self.longest, self.shortest = longest, shortest

    def propose(self, rows: list, budgets: list[int], nodes: list[int] | None = None) -> Proposal:
        tokens = [lookup(list(row.request.prompt) + row.tokens, k, self.longest, self.shortest)
                  if row is not None and k > 0 else [] for row, k in zip(rows, budgets)]
        return Proposal(tokens)

    def look_ahead(self, rows: list, proposal: Proposal, deepest: int = DEFAULT_MAX_DRAFT) -> None:
        pass  # nothing to draft ahead: a lookup costs nothing

    def drafting_ahead(self, rows: list) -> tuple[float, int]:
        return 0.0, 0

    def update(self, rows: list, accepted: list[int], paths: list[list[int]] | None = None) -> None:
        pass  # nothing to roll back

    def close(self) -> None:
        pass


def lookup(context: list[int], k: int, longest: int = 3, shortest: int = 1) -> list[int]:
    """Up to ``k`` tokens continuing ``context`` as it continued after the latest earlier occurrence of its
    last ``n`` tokens (the longest ``n`` in ``[shortest, longest]`` that has one); [] when none occurs.

    The continuation is copied as LZ77 copies: where it reaches the end of ``context`` it goes on with the
    tokens it has just proposed, so a loop of any period is proposed for all ``k`` tokens.
    """
    if k <= 0 or len(context) < 2:
        return []
    ids = torch.tensor(context, dtype=torch.long)
    end = len(context)
    for n in range(min(longest, end - 1), shortest - 1, -1):
        windows = ids[: end - 1].unfold(0, n, 1)  # every earlier n-gram that has a token after it
        found = (windows == ids[end - n :]).all(dim=1).nonzero()
        if len(found):
            start = int(found[-1]) + n  # the token after the latest match
            out: list[int] = []
            for t in range(k):
                j = start + t
                out.append(context[j] if j < end else out[j - end])
            return out
    return []


# ---------------------------------------------------------------------- a draft model


class ModelDraft:
    """A small model on the compute device (a smaller checkpoint, or the target in int4) that drafts by
    decoding: greedy rows take its argmax, sampled rows sample from its distribution under the row's own
    temperature, top-k and top-p (``q`` of the proposal). Every row also names the draft's next likeliest
    tokens at each depth: the alternatives a tree may verify beside the chosen ones.

    Its KV cache row ``b`` follows the engine's row ``b``: before drafting, a row's tokens that the draft
    has not seen (its prompt at first, then the tokens the last pass gave it) are added in one pass, then
    ``k`` decode steps draft ``k`` tokens. After the target's verdict the row's cache is rolled back to
    the drafts the target accepted (the positions past it are overwritten next time).
    """

    names_alternatives = True  # a tree may verify them beside its drafts

    def __init__(self, model, label: str = "draft", rows: int | None = None):
        self.model, self.label = model, label
        self.rows = rows or model.max_batch  # the target's rows: the draft's cache rows past them are spare
        self.spare = model.max_batch // self.rows - 1  # spare cache rows a row, for chains drafted ahead
        self.valid: dict = {}  # row -> tokens of its context in the draft's cache that are still right
        self.generators: dict = {}  # row -> its draft's generator (sampled rows)
        self.pending: dict = {}  # row -> (context length, draft steps) of the chain being verified
        self.growing: dict = {}  # row -> (context length, joining order, nodes in the cache) of its tree
        self._chains = (None, None)  # the graphs a GreedyChain was made for, and it (or None where none fits)
        self.depth = 0  # the steps of the last greedy chains (0: the last proposal was something else)
        self.likely: dict = {}  # row -> its chain's likeliest tokens and their probabilities at each depth
        self.ahead: dict = {}  # row -> its Guesses: the next pass's chains drafted while the target verifies
        self.ahead_chains = None  # their tokens, likeliest tokens and chances, on the device ([draft rows, steps, ...])
        self.spare_holds: dict = {}  # spare cache row -> (the row, the length of its context copied there)
        self.ahead_done = None  # a CUDA event: the side stream has drafted them
        self.verdict = None  # a CUDA event: the host had read the target's pass that they were drafted beside
        self.served = (None, {})  # a pass's rows, and each row's chain drafted ahead whose guess its verdict was
        self.proposed = None  # a CUDA event: the current stream's work for the last proposal is done
        self.ahead_from, self.ahead_taken = None, 0  # when the side stream began (a CUDA event), and its steps
        self.stream = None  # the side stream that drafts ahead (CUDA)
        self.guessed = [0, 0]  # passes whose chains were drafted ahead, of the passes after drafting ahead
        self.steps = StepCounts()  # where a chain's steps were drafted: beside the pass, or after it
        self.ahead_steps = AHEAD_FIRST  # steps the side stream takes: as many as the target's pass leaves time for

    @property
    def plans(self):
        return self.model.plans

    def propose(self, rows: list, budgets: list[int], nodes: list[int] | None = None) -> Proposal:
        """At most ``budgets[b]`` drafts deep for row ``b``: a chain, or where ``nodes`` gives a row more
        tokens than its depth and every drafting row is greedy, a tree of at most ``nodes[b]`` tokens grown
        best first (:meth:`_grow_trees`), where the draft was loaded with passes that wide (``BEST_FIRST``;
        not a mixture of experts whose experts direct reads serve, ``loading.prepare``)."""
        tried, served = self._settle_ahead(rows)
        self._forget_rows_not_in(rows)
        self.pending, self.growing, self.likely, self.depth = {}, {}, {}, 0  # what a pass that never reached update
        drafting = [b for b, (row, k) in enumerate(zip(rows, budgets)) if row is not None and k > 0]
        if not drafting:
            return Proposal.empty(len(rows))
        steps = max(budgets[b] for b in drafting)
        contexts = {b: list(rows[b].request.prompt) + rows[b].tokens for b in drafting}
        valid = {b: self.valid.get(rows[b], 0) for b in drafting}
        unseen = [contexts[b][valid[b]:] if b in contexts else [] for b in range(len(rows))]
        greedy = all(rows[b].request.sampling.greedy for b in drafting)
        tree = (nodes is not None and self.model.options.tree_width > 1 and greedy
                and any(nodes[b] > budgets[b] for b in drafting))
        chain = self._chain() if greedy and not tree else None
        if tried:  # chains drafted while the target verified the last pass, where it gave a verdict they guessed
            ready = self._drafted_ahead(served, rows, budgets, contexts, drafting) if chain else None
            self.guessed[1] += 1
            if ready is not None:
                self.guessed[0] += 1
                self.depth = steps
                return ready
        if chain is not None and all(len(unseen[b]) == 1 for b in drafting):  # the usual pass: one unseen token
            return self._chained(chain, rows, budgets, contexts, unseen, steps)  # a row, its step the chain's first
        logits, caught_up = self._catch_up(unseen, [valid.get(b, 0) for b in range(len(rows))],
                                           prompt=any(valid[b] == 0 for b in drafting))
        if tree:
            return self._grow_trees(rows, budgets, nodes, contexts, logits, caught_up)
        self.steps.after += steps  # (the catch-up drafts the first)
        if chain is not None:  # the first draft from the catch-up's logits, the rest replayed
            first, top, chance = self.model.decoder.ops.likeliest(logits, MAX_BRANCHES)
            positions = [len(contexts[b]) if b in contexts else None for b in range(len(rows))]
            drafted, likeliest, chances = chain.run(first, positions, steps - 1, MAX_BRANCHES)
            drafted = torch.cat([first[:, None], drafted], dim=1)
            likeliest, chances = torch.cat([top[:, None], likeliest], dim=1), torch.cat([chance[:, None], chances], 1)
            self.depth = steps
            return self._chain_proposal(rows, budgets, contexts, drafted.tolist(), likeliest.tolist(), None,
                                        steps, caught_up, chances.tolist())
        ids, qs, likeliest = [], [], []
        for step in range(steps):
            chosen, q = self._choose(logits, rows, drafting)
            ids.append(chosen)
            qs.append(q)
            # a tree's alternatives, as a greedy chain's step names them (equal logits in the same order)
            likeliest.append(self.model.decoder.ops.likeliest(logits, MAX_BRANCHES)[1])
            if step + 1 == steps:
                break
            positions = [len(contexts[b]) + step if b in contexts else None for b in range(len(rows))]
            logits = self.model.decode(chosen, positions)
        drafted, likeliest = torch.stack(ids, dim=1).tolist(), torch.stack(likeliest, dim=1).tolist()
        return self._chain_proposal(rows, budgets, contexts, drafted, likeliest,
                                    None if qs[0] is None else torch.stack(qs, dim=1), len(ids), caught_up)

    def _chained(self, chain: GreedyChain, rows: list, budgets: list[int], contexts: dict, unseen: list,
                 steps: int) -> Proposal:
        """Greedy chains ``steps`` deep from each drafting row's one unseen token (its last), all in replayed
        graphs: the first step adds that token to the draft's cache (the catch-up) and drafts the first token."""
        first = to_device([t[0] if t else 0 for t in unseen], torch.long, self.model.device)
        positions = [len(contexts[b]) - 1 if b in contexts else None for b in range(len(rows))]
        self.steps.after += steps
        drafted, likeliest, chances = chain.run(first, positions, steps, MAX_BRANCHES)
        self.depth = steps
        return self._chain_proposal(rows, budgets, contexts, drafted.tolist(), likeliest.tolist(), None, steps, 1,
                                    chances.tolist())

    def look_ahead(self, rows: list, proposal: Proposal, deepest: int = DEFAULT_MAX_DRAFT) -> None:
        """For the target's pass over ``proposal``, the next pass's greedy chains for the verdicts the
        draft can guess (``LOOK_AHEAD``), as deep as the target's pass leaves time for (:meth:`_pace_ahead`) and the
        next pass may ask (``deepest`` drafts): for each drafting row, "every draft accepted, then the draft's argmax
        after the last" in the row itself (its chain goes on from its last draft), and each of its likeliest breaks
        (:meth:`_breaks`) in a spare row (the row's context copied there first), queued on a side stream once the
        target's pass is queued. Only after greedy chains."""
        # This pass's match of guesses is spent: were it to fail and be tried again with the same rows, their spare
        # rows would hold this pass's guesses, not the ones that were matched.
        self.served = (None, {})
        if not (self.depth and self.spare and LOOK_AHEAD):
            return
        if self.ahead_steps < 2:  # paused (:meth:`_pace_ahead`)
            self.ahead_steps += 1
            return
        tokens, positions = [0] * self.model.max_batch, [None] * self.model.max_batch
        copies = []
        for b, (row, drafts) in enumerate(zip(rows, proposal.tokens)):
            if row is None or not drafts or row not in self.pending:
                continue
            length, k = self.pending[row][0], len(drafts)
            tokens[b], positions[b] = drafts[-1], length + k - 1
            chains = [(k, None, b)]  # the guess after them: the chain's own next token, its first step's argmax
            for s, (j, token) in enumerate(self._breaks(row, drafts)):
                spare = self.rows + b * self.spare + s
                tokens[spare], positions[spare] = token, length + j
                chains.append((j, token, spare))
            self.ahead[row] = Guesses(length, list(drafts), chains)
            copies.append((b, row, length, [source for _, _, source in chains[1:]], positions[b]))
        if not self.ahead:
            return
        self.ahead_steps = min(self.ahead_steps, deepest + 1)
        steps = min(self.ahead_steps, self.model.max_seq_len - max(p for p in positions if p is not None))
        device = self.model.device
        self.steps.ahead += steps
        with self._side_stream():
            self.ahead_from, self.ahead_taken = _cuda_event(device, timing=True), steps
            for b, row, length, spares, end in copies:
                self._copy_context(b, row, length, spares, end)
            self.ahead_chains = self._chain().run(to_device(tokens, torch.long, device), positions, steps,
                                                  MAX_BRANCHES)
            self.ahead_done = _cuda_event(device, timing=True)

    def _copy_context(self, b: int, row, length: int, spares: list[int], end: int) -> None:
        """Row ``b``'s cache up to ``end`` (its context of ``length`` tokens and its chain's drafts but the last) into
        its ``spares``: only past what each holds of it already (a spare row's copy of the row's context stays right,
        whatever the verdict; the tokens past it are a guess's)."""
        if not spares:
            return
        held = [self.spare_holds.get(spare, (None, 0)) for spare in spares]
        start = min(copied if holder is row else 0 for holder, copied in held)
        self.model.cache.copy_rows(slice(spares[0], spares[-1] + 1), b, slice(start, end))  # (a row's are in a row)
        self.spare_holds.update({spare: (row, length) for spare in spares})

    def _breaks(self, row, drafts: list[int]) -> list[tuple[int, int]]:
        """Where the target is likeliest to break ``row``'s chain ``drafts``, and with which token: the first ``j``
        drafts accepted and the target's token there one of the draft's next likeliest, at most ``LOOK_AHEAD`` of
        them (one for each spare row), likeliest first by the draft's own probabilities (the chance that the
        target takes the first ``j``, times the token's chance at ``j``)."""
        if row not in self.likely:
            return []
        likeliest, chances = self.likely[row]
        scored, reach = [], 1.0
        for j, (draft, top, chance) in enumerate(zip(drafts, likeliest, chances)):
            scored += [(reach * p, -j, token) for token, p in zip(top, chance) if token != draft]
            reach *= next((p for token, p in zip(top, chance) if token == draft), 0.0)
        return [(-j, token) for _, j, token in sorted(scored, reverse=True)[: min(self.spare, LOOK_AHEAD)]]

    def drafting_ahead(self, rows: list) -> tuple[float, int]:
        """Whether this pass's chains were drafted ahead for ``rows`` (1.0, and as many drafts deep as every row's
        is) or not (0.0, 0): what drafting costs the pass (the speculator's price). Not where the draft may draft
        otherwise than in chains (trees it grows): those do not use them."""
        _, served = self._settle_ahead(rows)
        live = [row for row in rows if row is not None]
        if not live or any(row not in served for row in live) or self.model.options.tree_width > 1:
            return 0.0, 0
        return 1.0, min(len(served[row][0]) for row in live)

    def _settle_ahead(self, rows: list) -> tuple[bool, dict]:
        """Once a pass (rows and their lengths tell them apart): whether chains were drafted ahead for it, and each
        row's whose verdict they guessed (:meth:`_match`, which waits for them); then how deep to draft ahead next
        (:meth:`_pace_ahead`). The draft's streams are joined every pass: where the rows it drafted for have left,
        their cache rows are others' now."""
        key = [(row, len(row.tokens)) if row is not None else None for row in rows]
        if _same_pass(self.served[0], key):
            return True, self.served[1]
        ahead, self.ahead = self.ahead, {}
        verdict, done = self.verdict or _cuda_event(self.model.device, timing=True), self.ahead_done
        self.verdict = None
        self._join_ahead()
        self.served = (key if ahead else None, self._match(ahead, rows) if ahead else {})  # (waits for them)
        if ahead and done is not None:
            self._pace_ahead(done, verdict)
        return bool(ahead), self.served[1]

    def _pace_ahead(self, done, verdict) -> None:
        """Drafting ahead no deeper than the target's pass leaves time for (:func:`paced_steps`), from the GPU's
        times since the side stream began: to its last step (``done``) and to the target's verdict (``verdict``)."""
        beside, window = self.ahead_from.elapsed_time(done), self.ahead_from.elapsed_time(verdict)
        self.steps.paced, self.steps.beside_ms, self.steps.window_ms = (
            self.steps.paced + 1, self.steps.beside_ms + beside, self.steps.window_ms + window)
        self.ahead_steps = paced_steps(self.ahead_taken, beside, window)

    def _join_ahead(self) -> None:
        """The draft's cache and graphs' buffers are used after the side stream's work (queued, not waited for)."""
        if self.ahead_done is not None:
            torch.cuda.current_stream().wait_event(self.ahead_done)
            self.ahead_done = None

    def _match(self, ahead: dict, rows: list) -> dict:
        """For each row whose new tokens start one of its guesses (its accepted drafts, the token guessed after them,
        and as many of the guess's chain as a tree's pass accepted): the drafts that follow in the guess's chain,
        their likeliest tokens and chances, and the span of the guess's spare row to copy into the row (None)."""
        waiting = time.perf_counter()
        chosen, likeliest, chances = (t.tolist() for t in self.ahead_chains)
        self.steps.waited += time.perf_counter() - waiting
        served = {}
        for row in rows:
            guesses = ahead.get(row)
            if guesses is None:
                continue
            new = (list(row.request.prompt) + row.tokens)[guesses.length:]
            for accepted, guess, source in guesses.chains:
                before = accepted + (guess is not None)  # the guess's tokens before its chain's steps
                sequence = guesses.drafts[:accepted] + ([guess] if guess is not None else []) + chosen[source]
                if len(new) > accepted and len(sequence) > len(new) and sequence[: len(new)] == new:
                    span = slice(guesses.length + accepted, guesses.length + len(sequence) - 1)
                    served[row] = (sequence[len(new):], likeliest[source][len(new) - before:],
                                   chances[source][len(new) - before:], (source, span) if guess is not None else None)
                    break
        return served

    def _drafted_ahead(self, served: dict, rows: list, budgets: list[int], contexts: dict,
                       drafting: list[int]) -> Proposal | None:
        """This pass's chains as :meth:`look_ahead` drafted them while the target verified the last pass, where
        every drafting row's verdict was one of its guesses (``served``: :meth:`_match`); else None (the draft's
        cache then holds each row's context up to its accepted drafts: :meth:`update`)."""
        if any(rows[b] not in served for b in drafting):
            return None
        drafted, top, chances = [[] for _ in rows], [[] for _ in rows], [[] for _ in rows]
        for b in drafting:
            drafted[b], top[b], chances[b], move = served[rows[b]]
            if move is not None:  # the spare row's steps from the target's token on move into the row
                self.model.cache.copy_rows(slice(b, b + 1), *move)
        more = max(budgets[b] - len(drafted[b]) for b in drafting)
        self.steps.served += min(min(len(drafted[b]), budgets[b]) for b in drafting)
        if more > 0:  # deeper than drafted ahead: the chains go on from their last drafts
            self.steps.after += more
            positions = [len(contexts[b]) + len(drafted[b]) - 1 if b in contexts and len(drafted[b]) < budgets[b]
                         else None for b in range(len(rows))]
            last = to_device([drafted[b][-1] if b in contexts else 0 for b in range(len(rows))], torch.long,
                             self.model.device)
            chosen, likeliest, chance = (t.tolist() for t in self._chain().run(last, positions, more, MAX_BRANCHES))
            for b in drafting:
                if positions[b] is not None:  # a row at its budget already took no part: nothing to add
                    drafted[b], top[b] = drafted[b] + chosen[b], top[b] + likeliest[b]
                    chances[b] = chances[b] + chance[b]
        steps = min(len(drafted[b]) for b in drafting)
        return self._chain_proposal(rows, budgets, contexts, drafted, top, None, steps, 0, chances)

    def _side_stream(self):
        """Where chains drafted ahead run: a side stream on a GPU, after the work of this pass's proposal (a row's
        chain moved into place) and beside the target's verify pass queued since, inline elsewhere."""
        if self.model.device.type != "cuda":
            return contextlib.nullcontext()
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.model.device)
        self.stream.wait_event(self.proposed)
        return torch.cuda.stream(self.stream)

    def _chain_proposal(self, rows: list, budgets: list[int], contexts: dict, drafted: list, likeliest: list,
                        qs, steps: int, caught_up: int, chances: list | None = None) -> Proposal:
        """The proposal of chains ``steps`` deep (``drafted[b]``, and ``likeliest[b]`` at each depth with their
        probabilities ``chances[b]``), each row's cut to its budget; its first ``steps - 1`` tokens are in the
        draft's cache."""
        self.pending = {rows[b]: (len(contexts[b]), steps) for b in contexts}
        if chances is not None:
            self.likely = {rows[b]: (likeliest[b][: budgets[b]], chances[b][: budgets[b]]) for b in contexts}
        self.proposed = _cuda_event(self.model.device)  # what drafting ahead waits for (not the target's pass)
        tokens = [drafted[b][: budgets[b]] if b in contexts else [] for b in range(len(rows))]
        alternatives = [_alternatives(tokens[b], likeliest[b]) if tokens[b] else [] for b in range(len(rows))]
        return Proposal(tokens, qs, alternatives, steps=caught_up + steps - 1 if caught_up else 0)

    def _chain(self) -> GreedyChain | None:
        """Greedy chains in replayed graphs, where the draft model can capture a whole step (made anew when its
        graphs are: a test may give it graphs of its own)."""
        if self._chains[0] is not self.model.graphs:
            self._chains = (self.model.graphs, GreedyChain(self.model) if greedy_chain.fits(self.model) else None)
        return self._chains[1]

    def _grow_trees(self, rows: list, depths: list[int], nodes: list[int], contexts: dict, logits: torch.Tensor,
                    caught_up: int) -> Proposal:
        """Greedy rows' drafts as trees grown best first (:class:`~offload.speculative.BestFirstTree`): at each
        of ``max(depths)`` steps each row's likeliest scored children join its tree (an even share of its
        ``nodes``, the rest at the last step), and but for the last step one pass of the draft over every
        row's tree (its last token, in the cache already, then the tree, under its parents) scores the new
        ones: as many passes as a chain of that depth takes steps. The draft's cache then holds each row's
        tree as its last pass saw it; :meth:`update` keeps the branch the target accepted."""
        trees = {b: BestFirstTree(nodes[b], depths[b]) for b in contexts}
        tokens, logprobs = _likeliest(logits)
        for b, tree in trees.items():
            tree.score(0, tokens[b], logprobs[b])
        steps, passes, in_cache = max(depths[b] for b in trees), 0, {b: 0 for b in trees}
        for step in range(steps):
            last = step + 1 == steps
            joined = {b: tree.grow(tree.most if last else -(-tree.most // steps)) for b, tree in trees.items()}
            if last or not any(joined.values()):
                break
            new_tokens = [[contexts[b][-1], *trees[b].tokens] if b in trees else [] for b in range(len(rows))]
            cached = [len(contexts[b]) - 1 if b in trees else 0 for b in range(len(rows))]
            parents = [trees[b].parents if b in trees else [] for b in range(len(rows))]
            tokens, logprobs = _likeliest(self.model.verify(new_tokens, cached, parents=parents))
            passes += 1
            for b, tree in trees.items():
                in_cache[b] = len(tree.tokens)
                for j in joined[b]:
                    tree.score(j, tokens[b][j], logprobs[b][j])
        proposal = Proposal.empty(len(rows))
        proposal.alternatives, proposal.trees = [[] for _ in rows], [([], []) for _ in rows]
        for b, tree in trees.items():
            tokens, parents, order, siblings = tree.chain_first()
            proposal.tokens[b], proposal.alternatives[b] = tokens[: len(siblings)], siblings
            proposal.trees[b] = (tokens, parents)
            self.growing[rows[b]] = (len(contexts[b]), order, in_cache[b])
        proposal.steps = caught_up + passes if caught_up else 0
        return proposal

    def _catch_up(self, new_tokens: list[list[int]], cached: list[int], prompt: bool) -> tuple[torch.Tensor, int]:
        """Each row's tokens the draft has not seen added to its cache: the logits after each row's last one,
        and the one-token steps that took (0 where they went in one pass of several tokens).

        A pass whose drafts were all accepted leaves a row two new tokens (the last draft and the target's
        next); a pass after a run that drafted nothing, a token for each pass of the run. With CUDA graphs, up
        to ``CATCH_UP_STEPS`` of them go as decode steps replayed from graphs rather than one pass launched
        kernel by kernel, unless a row brings its ``prompt`` (it goes in one pass)."""
        most = max(len(t) for t in new_tokens)
        if most <= 1:
            return self.model.extend(new_tokens, cached), 1  # a decode step
        if self.model.graphs is None or most > CATCH_UP_STEPS or prompt:
            return self.model.extend(new_tokens, cached), 0
        logits = None
        for j in range(most):
            tokens = to_device([t[j] if j < len(t) else 0 for t in new_tokens], torch.long, self.model.device)
            step = self.model.decode(tokens, [c + j if j < len(t) else None for t, c in zip(new_tokens, cached)])
            if logits is None:
                logits = step.clone()  # a replay may reuse its output's memory
                continue
            done = [b for b, t in enumerate(new_tokens) if len(t) == j + 1]
            if done:
                index = to_device(done, torch.long, self.model.device)
                logits = logits.index_copy(0, index, step.index_select(0, index))
        return logits, most

    def update(self, rows: list, accepted: list[int], paths: list[list[int]] | None = None) -> None:
        """The target accepted ``accepted[b]`` of row ``b``'s chain (``paths[b]``: the nodes of its tree, root
        first, that it went through): its draft cache holds the context and the drafts up to the last one it
        wrote (a run of ``steps`` writes ``steps - 1``), as far as they were accepted; a tree's accepted branch
        is moved into place, as far as the draft's last pass over it wrote it."""
        if self.ahead:  # the target's pass was read: its end, against which drafting ahead is paced
            self.verdict = _cuda_event(self.model.device, timing=True)
        kept = []
        for b, (row, n) in enumerate(zip(rows, accepted)):
            if row in self.pending:  # a chain's steps wrote all but its last draft; drafting ahead wrote that one
                length, steps = self.pending.pop(row)
                self.valid[row] = length + (n if row in self.ahead else min(n, steps - 1))
            elif row in self.growing:
                length, order, in_cache = self.growing.pop(row)
                branch = [order[j - 1] for j in paths[b][1:] if order[j - 1] <= in_cache]
                kept.append((b, length - 1, [0, *branch]))
                self.valid[row] = length + len(branch)
        if any(len(path) > 1 for _, _, path in kept):
            cached, moved = [0] * len(rows), [[] for _ in rows]
            for b, start, path in kept:
                cached[b], moved[b] = start, path
            self.model.keep_path(cached, moved)

    def close(self) -> None:
        self._join_ahead()
        self._chains = (None, None)  # its graphs go with the model's
        self.model.close()

    def _choose(self, logits: torch.Tensor, rows: list, drafting: list[int]):
        """Each drafting row's next draft (argmax, or drawn from its ``q``), and ``q [rows, V]`` (None when no
        row samples)."""
        ids = logits.argmax(dim=-1)
        sampled = [b for b in drafting if not rows[b].request.sampling.greedy]
        if not sampled:
            return ids, None
        index = torch.tensor(sampled, device=logits.device)
        probs = probabilities(logits.index_select(0, index), [rows[b].request.sampling for b in sampled])
        ids = ids.index_copy(0, index, draw(probs, [self._generator(rows[b]) for b in sampled]))
        self.model.tp.broadcast_from_first(ids)  # every rank drafts rank 0's draws
        q = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        return ids, q.index_copy(0, index, probs)

    def _generator(self, row) -> torch.Generator:
        if row not in self.generators:
            sampling = row.request.sampling
            self.generators[row] = sampling.with_seed_offset(DRAFT_SEED_OFFSET).generator(self.model.device)
        return self.generators[row]

    def _forget_rows_not_in(self, rows: list) -> None:
        """Rows that finished or were cancelled: a new request in their cache row starts from nothing."""
        live = {row for row in rows if row is not None}
        for table in (self.valid, self.generators, self.pending, self.growing, self.ahead, self.likely):
            for row in [r for r in table if r not in live]:
                del table[row]
        self.spare_holds = {spare: held for spare, held in self.spare_holds.items() if held[0] in live}


def _same_pass(old: list | None, new: list) -> bool:
    """Whether two passes' rows and lengths are one pass's: the rows as objects (a finished row's id could be a new
    row's; its fields a row's that is another request's)."""
    return old is not None and len(old) == len(new) and all(
        a is b is None or (a is not None and b is not None and a[0] is b[0] and a[1] == b[1]) for a, b in zip(old, new))


def paced_steps(steps: int, ahead_ms: float, pass_ms: float) -> int:
    """The side stream's steps for the next pass, where ``steps`` took ``ahead_ms`` and the target's verdict came
    ``pass_ms`` after they began: as many as fit in ``AHEAD_SHARE`` of that time at that pace. Below two (a guess and
    a draft after it: a step of many rows, or a pass nearly over when its side stream began), none for
    ``AHEAD_PAUSE`` passes (``look_ahead`` counts up to two)."""
    fit = int(AHEAD_SHARE * steps * pass_ms / ahead_ms) if ahead_ms > 0 else steps + 1
    return fit if fit >= 2 else 2 - AHEAD_PAUSE


def _cuda_event(device: torch.device, timing: bool = False):
    """A CUDA event recorded on the current stream (None elsewhere)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=timing)
    event.record()
    return event


@dataclass
class StepCounts:
    """Where a model draft's chains' steps ran (not trees'), summed over passes: greedy chains' queued on the side
    stream beside the target's pass (``ahead``), of those the ones a pass used (``served``), and steps drafted after
    the target's verdict (``after``: the host waits for them), with the host's seconds waiting for the side stream's
    chains (``waited``); and of the passes beside which the side stream drafted (``paced``), the GPU's milliseconds
    from its start to its last step (``beside_ms``) and to the target's verdict (``window_ms``: how much of the pass
    the side stream had). Where a pass's drafting goes without a profiler (which slows the host)."""

    ahead: int = 0
    served: int = 0
    after: int = 0
    waited: float = 0.0
    paced: int = 0
    beside_ms: float = 0.0
    window_ms: float = 0.0


@dataclass
class Guesses:
    """A row's next chains drafted ahead (:meth:`ModelDraft.look_ahead`) while the target verifies ``drafts``."""

    length: int  # the row's context when it drafted them
    drafts: list[int]
    # (drafts accepted, the target's token guessed after them, the draft's cache row whose chain goes on from it):
    # the guess None is the draft's argmax after the last draft, its chain's first step
    chains: list[tuple[int, int | None, int]]


def _likeliest(logits: torch.Tensor) -> tuple[list, list]:
    """The ``MAX_BRANCHES`` likeliest tokens at each position of ``logits [..., vocab]``, and their
    log-probabilities, as nested lists (one transfer to the host)."""
    top = logits.float().log_softmax(dim=-1).topk(MAX_BRANCHES)
    return top.indices.tolist(), top.values.tolist()


def _alternatives(chosen: list[int], likeliest: list[list[int]]) -> list[list[int]]:
    """At each drafted depth, the draft's likeliest tokens besides the one it chose."""
    return [[t for t in top if t != token][: MAX_BRANCHES - 1] for token, top in zip(chosen, likeliest)]


def make_draft(kind: str | None, draft_model=None, label: str = "", rows: int | None = None):
    """The draft object of a target of ``rows`` rows: ``NgramDraft``, a ``ModelDraft`` around ``draft_model``, or
    None."""
    if kind == NGRAM:
        return NgramDraft()
    if draft_model is not None:
        return ModelDraft(draft_model, label, rows)
    return None

