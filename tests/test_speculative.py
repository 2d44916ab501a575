"""Speculative decoding's rules: greedy acceptance, speculative sampling's distribution, the draft length.

The statistical tests simulate generation from a small Markov "target" (the next token's distribution depends
on the previous token) with a different Markov "draft", through :func:`accept` exactly as the engine calls it,
and compare the distribution of whole generated sequences with the target's by a chi-square test.
"""

import math

import pytest
import torch

from offload.sampling import GREEDY, Sampling, probabilities
from offload.speculative import (ASSUMED_ACCEPTANCE, Acceptance, BestFirstTree, Mends, Proposal, accept, best_draft_length,
                                best_draft_shape, expected_tokens, grow_tree, speculation_forecast, walk_tree)

pytestmark = pytest.mark.usefixtures("one_thread")

V = 4  # tokens
TARGET = torch.tensor([[0.50, 0.25, 0.15, 0.10],
                       [0.10, 0.20, 0.30, 0.40],
                       [0.30, 0.30, 0.20, 0.20],
                       [0.05, 0.15, 0.20, 0.60]])
DRAFT = torch.tensor([[0.25, 0.25, 0.25, 0.25],
                      [0.10, 0.50, 0.30, 0.10],
                      [0.60, 0.10, 0.20, 0.10],
                      [0.20, 0.20, 0.20, 0.40]])


def test_greedy_rows_take_the_targets_argmax_as_far_as_the_drafts_agree():
    # argmax at each position: row 0 -> 3, 1, 2, 0; row 1 -> 2, 2, 2, 2
    target = torch.tensor([[3, 1, 2, 0], [2, 2, 2, 2], [1, 0, 0, 0]])
    logits = torch.nn.functional.one_hot(target, V).float() * 5
    drafts = [[3, 1, 0], [1, 2, 2], []]  # row 0: two agree, then 0 != 2; row 1: the first disagrees; row 2: none
    out = accept(logits, Proposal(drafts), [GREEDY] * 3, [None] * 3)
    assert out[:, -1].tolist() == [3, 1, 1]
    assert out[0, :3].tolist() == [3, 1, 2] and out[1, :1].tolist() == [2] and out[2, :1].tolist() == [1]
    every = accept(logits[:1], Proposal([[3, 1, 2]]), [GREEDY], [None])
    assert every[0].tolist() == [3, 1, 2, 0, 4]  # all three drafts and the target's next token


def _simulate(sampling: Sampling, drafted: str, runs: int, length: int, k: int, seed: int,
              branches: int = 1) -> torch.Tensor:
    """``runs`` sequences of ``length`` tokens after the token 0, made by speculative passes of ``k`` drafts
    (``drafted``: "model" drafts drawn from DRAFT under ``sampling``; "lookup": the point masses prev + 1).
    With ``branches > 1`` each row's chain grows into a tree with DRAFT's next likeliest tokens beside each
    of its tokens. Returns ``[runs, length]``."""
    gen = torch.Generator().manual_seed(seed)
    sequences = [[0] for _ in range(runs)]
    while min(len(s) for s in sequences) <= length:
        last, tokens, q = torch.tensor([s[-1] for s in sequences]), [], []
        for _ in range(k):
            if drafted == "model":
                q.append(probabilities(DRAFT[last].log(), [sampling] * runs))
                last = torch.multinomial(q[-1], 1, generator=gen)[:, 0]
            else:
                last = (last + 1) % V
            tokens.append(last)
        tokens = torch.stack(tokens, dim=1)
        context = torch.cat([torch.tensor([s[-1] for s in sequences])[:, None], tokens], dim=1)
        proposal = Proposal(tokens.tolist(), torch.stack(q, dim=1) if drafted == "model" else None)
        trees = [_tree(row, branches) for row in context.tolist()] if branches > 1 else None
        nodes = torch.tensor([[row[0], *tree[0]] for row, tree in zip(context.tolist(), trees)]) if trees else context
        out = accept(TARGET.log()[nodes], proposal, [sampling] * runs, [gen] * runs, trees)
        for s, values in zip(sequences, out.tolist()):
            s += values[: values[-1]]
    return torch.tensor([s[1 : length + 1] for s in sequences])


def _tree(context: list[int], branches: int) -> tuple[list[int], list[int]]:
    """A row's tree: its chain ``context[1:]`` and, beside each token, DRAFT's next likeliest after its parent."""
    chain = context[1:]
    likeliest = [DRAFT[prev].argsort(descending=True, stable=True).tolist() for prev in context[:-1]]
    alternatives = [[t for t in top if t != token][: branches - 1] for token, top in zip(chain, likeliest)]
    return grow_tree(chain, alternatives, branches, len(chain) * branches)


def _sequence_probabilities(sampling: Sampling, length: int) -> torch.Tensor:
    """The target's probability of every sequence of ``length`` tokens after 0, filtered as ``sampling`` says."""
    step = probabilities(TARGET.log(), [sampling] * V)  # [prev, next]
    probs = step[0]
    for _ in range(length - 1):
        probs = (probs.view(-1, V)[:, :, None] * step[None]).flatten()  # [prefix, last, next]
    return probs


def _chi_square_p(sequences: torch.Tensor, expected: torch.Tensor) -> float:
    """The p-value of the chi-square test of ``sequences`` (rows of tokens) against ``expected`` cell probabilities
    (cells of probability zero must stay empty)."""
    cells = (sequences * V ** torch.arange(sequences.shape[1] - 1, -1, -1)).sum(dim=1)
    observed = torch.bincount(cells, minlength=len(expected)).double()
    n, live = observed.sum(), expected > 0
    assert observed[~live].sum() == 0, "a sequence the target never makes"
    stat = ((observed[live] - n * expected[live]) ** 2 / (n * expected[live])).sum()
    dof = int(live.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), stat / 2))


SAMPLINGS = [Sampling(do_sample=True), Sampling(do_sample=True, temperature=0.7, top_k=3),
             Sampling(do_sample=True, temperature=1.3, top_p=0.8)]


SLOW = pytest.mark.slow


@pytest.mark.parametrize("drafted", ["model", pytest.param("lookup", marks=SLOW)])
@pytest.mark.parametrize("sampling", [pytest.param(SAMPLINGS[0], marks=SLOW), SAMPLINGS[1],
                                      pytest.param(SAMPLINGS[2], marks=SLOW)], ids=["plain", "t0.7-top3", "t1.3-top0.8"])
def test_speculative_sampling_gives_the_targets_distribution_of_sequences(sampling, drafted):
    length, runs = 2, 2000
    expected = _sequence_probabilities(sampling, length)
    sequences = _simulate(sampling, drafted, runs, length, k=3, seed=1)
    assert _chi_square_p(sequences, expected) > 1e-3


@pytest.mark.parametrize("drafted", ["model", pytest.param("lookup", marks=SLOW)])
@pytest.mark.parametrize("branches", [2, pytest.param(4, marks=SLOW)])
@pytest.mark.parametrize("sampling", [SAMPLINGS[0], pytest.param(SAMPLINGS[1], marks=SLOW),
                                      pytest.param(SAMPLINGS[2], marks=SLOW)], ids=["plain", "t0.7-top3", "t1.3-top0.8"])
def test_speculative_sampling_down_a_tree_gives_the_targets_distribution(sampling, branches, drafted):
    """Sampled rows whose chains grew into trees: each node's children tried in turn (the chain's token by
    speculative sampling, the alternatives as point masses against what is left of the residual)."""
    length, runs = 2, 2000
    sequences = _simulate(sampling, drafted, runs, length, k=3, seed=4, branches=branches)
    assert _chi_square_p(sequences, _sequence_probabilities(sampling, length)) > 1e-3


def test_a_sampled_row_leaves_its_chain_by_an_alternative_and_never_draws_one_it_rejected():
    """Root: p = TARGET[1]; the chain's token 1 drawn from a q that puts everything on it, so it is accepted
    with p(1) = 0.2 and the residual is p without 1. The alternatives 3 then 2 are tried against it: 3 with
    0.4 / 0.8, then 2 with 0.3 / 0.4 of what is left; a row that rejects both draws 0 and never 2 or 3."""
    logits = TARGET.log()[[1, 1, 3, 2]][None]  # the root, the chain's token 1, the alternatives 3 and 2
    q = torch.zeros(1, 1, V)
    q[0, 0, 1] = 1.0
    tree = ([1, 3, 2], [0, 0, 0])
    gen = torch.Generator().manual_seed(0)
    firsts = []
    for _ in range(2000):
        out = accept(logits, Proposal([[1]], q), [Sampling(do_sample=True)], [gen], [tree])[0].tolist()
        assert out[-1] == 2 or out[0] == 0  # an accepted token gains one more; a draw after rejecting all is 0
        firsts.append(out[0])
    shares = torch.bincount(torch.tensor(firsts), minlength=V).double() / len(firsts)
    assert torch.allclose(shares, TARGET[1].double(), atol=0.03), shares


def test_the_chi_square_test_tells_the_draft_from_the_target():
    """The test above can fail: sequences drawn from the draft itself are rejected."""
    sampling, length = Sampling(do_sample=True), 2
    gen = torch.Generator().manual_seed(2)
    first = torch.multinomial(DRAFT[0], 3000, replacement=True, generator=gen)
    second = torch.stack([torch.multinomial(DRAFT[t], 1, generator=gen)[0] for t in first])
    assert _chi_square_p(torch.stack([first, second], 1), _sequence_probabilities(sampling, length)) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("drafted, branches", [("model", 1), ("lookup", 1), ("model", 3)])
def test_speculative_sampling_over_three_tokens_with_long_drafts(drafted, branches):
    sampling = Sampling(do_sample=True, temperature=0.9, top_k=3, top_p=0.95)
    sequences = _simulate(sampling, drafted, 6000, 3, k=5, seed=3, branches=branches)
    assert _chi_square_p(sequences, _sequence_probabilities(sampling, 3)) > 1e-3


def test_a_rejected_point_mass_is_never_the_resampled_token():
    """Prompt lookup's draft is a point mass: after rejecting d the row draws from p without d."""
    logits = TARGET[1].log().expand(1, 2, V).clone()
    gen = torch.Generator().manual_seed(0)
    firsts = []
    for _ in range(400):
        out = accept(logits, Proposal([[3]]), [Sampling(do_sample=True)], [gen])[0].tolist()
        if out[-1] == 1:  # rejected
            firsts.append(out[0])
    assert firsts and 3 not in firsts
    assert abs(len(firsts) / 400 - (1 - TARGET[1, 3].item())) < 0.08  # accepted with probability p(3) = 0.4


def test_expected_tokens_and_the_best_draft_length():
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0
    assert math.isclose(expected_tokens(0.5, 2), 1 + 0.5 + 0.25)
    flat = lambda width: 1.0  # noqa: E731  a link-bound pass: any width costs the same
    assert best_draft_length([0.9], flat, 0.0, 16) == 16  # drafting is free: as long as allowed
    assert best_draft_length([0.9], flat, 0.2, 16) < 16  # each draft step costs a fifth of a pass
    compute_bound = lambda width: 1.0 + 0.5 * width  # noqa: E731  a fixed part, and each token costs half of it
    assert best_draft_length([0.3], compute_bound, 0.0, 16) == 0
    assert best_draft_length([0.95, 0.95], compute_bound, 0.0, 16) > 0


def test_acceptance_counts_the_tries_a_geometric_model_needs():
    a = Acceptance()
    a.add(drafted=4, accepted=2)  # two accepted, the third tried and rejected
    a.add(drafted=3, accepted=3)  # all accepted: three tries
    assert (a.tried, a.accepted) == (6, 5)
    assert math.isclose(a.rate(prior=0.5, weight=2), 6 / 8)
    assert Acceptance().rate(prior=0.3, weight=4) == pytest.approx(0.3)


# ---------------------------------------------------------------------- trees


def test_a_tree_is_the_chain_then_alternatives_shallow_first():
    chain, alternatives = [5, 6, 7], [[8, 9, 10], [11], [12, 13]]
    assert grow_tree(chain, alternatives, 1, 16) == (chain, [0, 1, 2])
    assert grow_tree(chain, alternatives, 3, 16) == ([5, 6, 7, 8, 9, 11, 12, 13], [0, 1, 2, 0, 0, 1, 2, 2])
    assert grow_tree(chain, alternatives, 4, 5) == ([5, 6, 7, 8, 9], [0, 1, 2, 0, 0])  # room for two more
    assert grow_tree(chain, alternatives, 4, 2) == ([5, 6], [0, 1])
    # siblings are distinct tokens (sampling down a tree is exact only then): repeats are skipped, not counted
    assert grow_tree([5, 6], [[5, 8, 8, 9], [6]], 3, 16) == ([5, 6, 8, 9], [0, 1, 0, 0])


def test_the_walk_follows_the_targets_argmax_down_the_tree():
    drafts, parents = [5, 6, 7, 8, 9, 11, 12, 13], [0, 1, 2, 0, 0, 1, 2, 2]  # a chain 5 6 7; 8, 9 beside 5; ...
    argmax = lambda **at: [at.get(f"n{i}", 0) for i in range(len(drafts) + 1)]  # noqa: E731  the target at node i
    assert walk_tree(argmax(n0=5, n1=6, n2=7, n3=4), drafts, parents) == ([5, 6, 7, 4], [0, 1, 2, 3])
    assert walk_tree(argmax(n0=9, n5=3), drafts, parents) == ([9, 3], [0, 5])  # the chain broke; 9 mended it
    assert walk_tree(argmax(n0=5, n1=11, n6=2), drafts, parents) == ([5, 11, 2], [0, 1, 6])
    assert walk_tree(argmax(n0=1), drafts, parents) == ([1], [0])  # nothing matched: the target's token alone
    assert walk_tree([4], [], []) == ([4], [0])


def test_a_tree_pays_where_the_chain_breaks_early():
    assert math.isclose(expected_tokens(0.5, 2, mended=0.5), 1 + 0.75 * 1.5)
    assert expected_tokens(0.5, 3, mended=0.0) == expected_tokens(0.5, 3)
    flat = lambda width: 1.0  # noqa: E731
    weak, strong = {1: 0.0, 2: 0.4, 4: 0.6}, {1: 0.0, 2: 0.05, 4: 0.1}
    assert best_draft_shape([0.3], weak, flat, 0.0, 16, 16) == (4, 4)  # a weak draft: width beats depth
    assert best_draft_shape([0.9], strong, flat, 0.0, 16, 16) == (16, 1)  # a strong one: depth
    assert best_draft_shape([0.3], weak, flat, 0.0, 16, 16, fill=True) == (4, 4)
    assert best_draft_shape([0.3], {2: 0.4}, flat, 0.0, 16, 16) == (8, 2)  # branches fixed
    assert best_draft_shape([0.3], weak, flat, 0.0, 3, 16) == (3, 4)  # three tokens left to make
    assert best_draft_shape([0.3], [{m: 0.0 for m in weak}], flat, 0.0, 16, 16) == (16, 1)  # nothing mends: a chain
    assert best_draft_shape([0.3, 0.3], [weak, {m: 0.0 for m in weak}], flat, 0.0, 16, 16) == (4, 4)  # one row's


def test_drafts_drafted_ahead_cost_no_steps_in_the_passes_they_serve():
    """A draft step costing half a pass: without drafting ahead a few drafts pay; with every pass's first 6 drafts
    drafted beside the pass before, those cost nothing and the depth goes to them; a share of the passes pays
    for the rest."""
    flat, chain = (lambda width: 1.0), {1: 0.0}  # noqa: E731
    alone = best_draft_shape([0.8], chain, flat, 0.5, 16, 16)
    assert alone[0] < 6
    assert best_draft_shape([0.8], chain, flat, 0.5, 16, 16, ahead=(1.0, 6)) == (6, 1)
    assert alone[0] <= best_draft_shape([0.8], chain, flat, 0.5, 16, 16, ahead=(0.5, 6))[0] <= 6


def test_mends_count_where_the_targets_token_ranked_among_the_alternatives():
    mends = Mends()
    assert mends.rates() == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}  # a chain until there is evidence
    for rank in (1, 1, 3, None):
        mends.add(rank)
    assert mends.rates() == {1: 0.0, 2: 2 / 8, 3: 2 / 8, 4: 3 / 8}


def test_the_load_time_forecast_prices_verify_passes_padded_as_they_run():
    """In CUDA graphs a verify pass of k + 1 tokens runs padded to a power of two; the forecast that keeps or
    declines an int4 draft prices it so, as the runtime does."""
    from types import SimpleNamespace

    target = SimpleNamespace(pass_seconds=lambda tokens, keys=0: 1.0 + 0.1 * tokens)  # compute grows with width
    draft = SimpleNamespace(pass_seconds=lambda tokens, keys=0: 0.01)
    padded = lambda width: 1 << (width - 1).bit_length()  # noqa: E731
    k, plain, _ = speculation_forecast([target], [target], [draft], 4)
    k_padded, priced, _ = speculation_forecast([target], [target], [draft], 4, padded)
    assert k == k_padded == 4
    assert priced == pytest.approx(plain + 0.3 / expected_tokens(ASSUMED_ACCEPTANCE, 4))  # 8 tokens run, not 5


def test_a_tree_grown_best_first_takes_the_likeliest_paths_wherever_they_are():
    """The draft is sure of 'a' then 'b' (a deep chain), unsure between 'x' and 'y' at the root: the likeliest
    paths join first, whatever their depth, never deeper than allowed, never more than ``most``."""
    a, b, c, x, y = 1, 2, 3, 4, 5
    tree = BestFirstTree(most=5, depth=3)
    tree.score(0, [a, x, y], [math.log(0.6), math.log(0.25), math.log(0.15)])
    assert tree.grow(1) == [1] and tree.tokens == [a]
    tree.score(1, [b, c], [math.log(0.9), math.log(0.1)])  # after a: b (0.54 from the root), c (0.06)
    assert tree.grow(2) == [2, 3] and tree.tokens == [a, b, x]
    tree.score(2, [c], [math.log(0.9)])  # after a b: c (0.486), at depth 3
    tree.score(3, [a], [math.log(0.5)])  # after x: a (0.125)
    assert tree.grow(10) == [4, 5] and tree.tokens == [a, b, x, c, y]  # at most five
    assert tree.parents == [0, 1, 0, 2, 0] and tree.depths == [1, 2, 1, 3, 1]
    tree.score(4, [a], [0.0])  # below the deepest allowed: not a candidate
    assert all(parent != 4 for _, _, parent, _ in tree.candidates)


def test_a_best_first_tree_puts_its_chain_first_for_the_target():
    """Renumbered chain first (the likeliest child at each node from the root), every parent before its
    children; the chain's alternatives at each depth are the draft's next likeliest after its parent, likeliest
    first, whether they joined the tree or not (as a chain's are counted)."""
    tree = BestFirstTree(most=6, depth=4)
    tree.score(0, [8, 7, 9], [math.log(0.5), math.log(0.3), math.log(0.2)])  # likeliest first, as scored
    tree.grow(3)  # 8, 7, 9
    tree.score(1, [10, 11], [math.log(0.9), math.log(0.1)])  # after 8
    tree.score(2, [12], [math.log(0.8)])  # after 7
    tree.grow(3)  # 10 (0.45), 12 (0.24), 11 (0.05)
    tree.score(4, [13, 14], [math.log(0.7), math.log(0.3)])  # after 8 10: 13 does not join
    tokens, parents, order, siblings = tree.chain_first()
    assert tokens[:2] == [8, 10] and siblings == [[7, 9], [11]]
    assert sorted(order) == list(range(1, 7)) and all(p < i for i, p in enumerate(parents, start=1))
    assert [tree.tokens[j - 1] for j in order] == tokens
    by_token = dict(zip(tokens, parents))
    assert tokens[by_token[12] - 1] == 7 and tokens[by_token[11] - 1] == 8 and by_token[9] == 0
