"""The CUDA-graph machinery of ``offload/scheduler/graphs.py`` on the CPU, with a stand-in capture that replays a
graph by running its captured work again: buckets, static buffers refilled before each replay, the first segment
rebuilding the pass's tables and masks, verify passes padded to a bucket of widths and laid out as trees. (What
only a real capture shows, that nothing the host computed is frozen into a graph, is tested on a GPU in
test_gpu.py.)"""

import pytest
import torch

import offload
from conftest import graphs_a_bucket, with_graphs
from offload import drafts
from test_speculation import KW, load, plain, prompts  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=[True, False], ids=["whole passes", "a graph a segment"])
def streamed(structured, request, monkeypatch):
    """The structured model streaming every layer from the host, with prompt lookup (so verify passes are wide),
    its cache long enough for two buckets of key lengths; its passes captured whole, or a graph a segment."""
    from offload.scheduler import graphs

    monkeypatch.setattr(graphs, "WHOLE_PASS", request.param)
    model = load(structured, "ngram", max_seq_len=256)
    yield model
    model.close()


def passes(model, batch, tokens, trees=None, width=None, steps=5) -> list[torch.Tensor]:
    """The logits of ``steps`` verify passes adding ``tokens`` to each row of ``batch``, one after the other
    (so positions advance), each row's real tokens only. Pass ``s`` lays its rows out as ``trees[s % 2]``."""
    model.extend(batch, [0] * len(batch))
    cached, out = [len(p) for p in batch], []
    for step in range(steps):
        parents = None if trees is None else trees[step % len(trees)]
        logits = model.verify(tokens, cached, width=width, parents=parents)
        out += [logits[b, : len(t)] for b, t in enumerate(tokens)]
        cached = [c + len(t) for c, t in zip(cached, tokens)]
    return out


def test_decode_steps_through_graphs_equal_eager_steps_bitwise(structured, streamed):
    batch, tokens = prompts(structured, (9, 4, 17)), [[3], [4], [8]]
    eager = passes(streamed, batch, tokens)
    capture = with_graphs(streamed)
    for got, want in zip(passes(streamed, batch, tokens), eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert list(streamed.graphs.buckets) == [(4, 1, 128)]  # rows padded to a power of two, keys to 128
    assert capture.captured == graphs_a_bucket(streamed) and capture.replayed == 4 * capture.captured


@pytest.mark.parametrize("tree", [False, True])
def test_verify_passes_through_graphs_equal_eager_passes_bitwise(structured, streamed, tree):
    """Chains or trees (two shapes, in turn), padded to a bucket of widths: the same logits as eager passes of the
    padded width, through two buckets of key lengths."""
    batch = prompts(structured, (9, 4, 110))  # the third row's keys pass 128 in the fourth pass
    tokens = [[3, 5, 7, 9, 11], [4, 6], [8, 1, 2, 3, 4, 5]]
    chains = [[list(range(len(t) - 1)) for t in tokens]]
    trees = [[[0, 0, 1, 2], [0], [0, 1, 1, 3, 3]], [[0, 1, 1, 0], [0], [0, 0, 0, 2, 1]]] if tree else chains
    eager = passes(streamed, batch, tokens, trees, width=8)
    capture = with_graphs(streamed)
    got = passes(streamed, batch, tokens, trees if tree else None, width=6)
    for got, want in zip(got, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert sorted(streamed.graphs.buckets) == [(4, 8, 128), (4, 8, 256)]  # rows, width padded to powers of two
    assert capture.captured == 2 * graphs_a_bucket(streamed) and capture.replayed == 3 * capture.captured // 2


@pytest.fixture
def one_slot(structured):
    """The structured model streaming both its layers through a ring of one slot: the second layer's copy is
    issued within each pass."""
    kw = {**KW, "max_seq_len": 256, "slots": 1, "cpu_memory": "1GiB"}
    budget = offload.plan_model(structured, **{k: v for k, v in kw.items() if k != "progress"}).needs
    model = offload.load_model(structured, **kw, gpu_memory=budget.gpu_budget_streaming(0, slots=1))
    assert [(len(ring.blocks), len(ring.slots)) for ring in model.weights.rings] == [(2, 1)]
    yield model
    model.close()


def test_a_whole_pass_in_one_graph_copies_and_all_equals_eager_passes_bitwise(structured, one_slot, monkeypatch):
    """``graphs.WHOLE_PASS``: a pass over streamed layers is one graph whose capture issued the rings' copies of
    the pass; the host waits for the loads issued before it and moves the rings on after it. Decode steps and
    verify passes of two buckets, with eager passes (a prompt joining, a pass no graph serves) between them: the
    eager passes' logits, bit for bit, and one graph a bucket."""
    from offload.scheduler import graphs

    monkeypatch.setattr(graphs, "WHOLE_PASS", True)
    streamed = one_slot
    batch = prompts(structured, (9, 4, 17))
    wide, narrow = [[3, 5, 7], [4], [8, 1]], [[3], [4], [8]]

    def run(model):
        out = passes(model, batch, narrow, steps=3) + passes(model, batch, wide, width=4, steps=3)
        model.extend([[6, 2, 9]] * 3, [40, 30, 50])  # eager: a prompt's pass between graphs
        return out + passes(model, batch, narrow, steps=3) + passes(model, batch, wide, width=4, steps=2)

    eager = run(streamed)
    capture = with_graphs(streamed)
    assert streamed.graphs.whole and len(streamed.weights.segments) > 1
    for got, want in zip(run(streamed), eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert sorted(streamed.graphs.buckets) == [(4, 1, 128), (4, 4, 128)]
    assert capture.captured == 2 and capture.replayed == 2 + 2 + 3 + 2  # each bucket's first pass ran eagerly


def test_the_least_recently_used_bucket_is_dropped_beyond_the_planned_graphs(structured, streamed):
    """Past ``max_buckets``, the least recently used bucket's graphs go (their memory is what the plan reserved)
    and it is captured again when needed: the same logits."""
    batch, tokens = prompts(structured, (9, 4, 17)), [[3, 5, 7], [4], [8, 1]]
    eager = [passes(streamed, batch, tokens, width=width, steps=2) for width in (4, 8, 16, 4)]
    capture = with_graphs(streamed)
    streamed.graphs.max_buckets = 2
    got = [passes(streamed, batch, tokens, width=width, steps=2) for width in (4, 8, 16, 4)]
    for want, have in zip(eager, got):
        for a, b in zip(want, have):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [w for _, w, _ in streamed.graphs.buckets] == [16, 4]  # width 4 came back; 8 was the older
    graphs = graphs_a_bucket(streamed)
    assert capture.captured == 4 * graphs and capture.dropped == 2 * graphs
    assert streamed.graphs.captures == 4  # buckets captured: what a benchmark keeps out of its timing


def test_speculative_generation_through_graphs_is_plain_greedy(structured, streamed, plain):  # noqa: F811
    batch, limits = prompts(structured), [40, 23, 31, 8]
    want = plain.generate(batch, max_new_tokens=limits, ignore_eos=True)
    capture = with_graphs(streamed)
    got = streamed.generate(batch, max_new_tokens=limits, ignore_eos=True, return_result=True)
    assert [p + t for p, t in zip(batch, got.tokens)] == want
    assert got.tokens_per_pass > 1.5
    widths = {width for _, width, _ in streamed.graphs.buckets}
    assert 1 < max(widths) and all(w & (w - 1) == 0 for w in widths)  # verify passes, at powers of two
    assert capture.replayed > 0



def test_a_draft_model_with_graphs_catches_up_by_replayed_decode_steps(structured, plain, monkeypatch):  # noqa: F811
    """With graphs, a draft model takes the two tokens a fully accepted pass leaves a row (its last draft and the
    target's next) as two replayed decode steps, not one eager pass; the output is still plain greedy decoding.
    The draft is the target itself: every draft is accepted. (Drafting ahead, which would guess every verdict, is
    off: the next test has it.)"""
    monkeypatch.setattr(drafts, "LOOK_AHEAD", 0)
    model = load(structured, "model", structured)
    draft = model.draft.model
    eager_extends = []
    extend = draft.extend
    draft.extend = lambda tokens, cached: eager_extends.append(max(map(len, tokens))) or extend(tokens, cached)
    with_graphs(model), with_graphs(draft)
    batch, limits = prompts(structured), [40, 23, 31, 8]
    want = plain.generate(batch, max_new_tokens=limits, ignore_eos=True)
    got = model.generate(batch, max_new_tokens=limits, ignore_eos=True, return_result=True)
    assert [p + t for p, t in zip(batch, got.tokens)] == want
    assert got.accepted_tokens == got.drafted_tokens > 0 and draft.graphs.buckets  # through graphs
    assert all(n == 1 or n > 4 for n in eager_extends)  # one token is a decode step; only prompts went eagerly
    model.close()


@pytest.mark.usefixtures("drafts_ahead_on_cpu")
def test_a_draft_that_is_its_target_drafting_ahead_guesses_every_verdict(structured, plain):  # noqa: F811
    """Drafting ahead with a draft that is the target itself: every draft is accepted and the target's next token is
    the draft's argmax, so every pass after a row's first is served by chains drafted ahead; plain greedy output."""
    model = load(structured, "model", structured)
    with_graphs(model), with_graphs(model.draft.model)
    batch = prompts(structured)[:2]
    got = model.generate(batch, max_new_tokens=[30, 21], ignore_eos=True, return_result=True)
    assert [p + t for p, t in zip(batch, got.tokens)] == plain.generate(batch, max_new_tokens=[30, 21], ignore_eos=True)
    hits, tries = model.draft.guessed
    assert got.accepted_tokens == got.drafted_tokens and hits == tries > 0
    steps = model.draft.steps  # where the chains' steps ran: each pass but a row's first used steps queued ahead
    assert 0 < steps.served <= steps.ahead and steps.after > 0 and steps.waited >= 0
    model.close()
