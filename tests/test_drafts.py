"""Drafts: prompt lookup, a draft model's cache rolled back to what the target accepted, and what the plan counts
and chooses for each draft."""

import warnings

import pytest
import torch

import offload
from offload.drafts import INT4, INT8, MODEL, NGRAM, ModelDraft, NgramDraft, draft_kind, lookup
from offload.loading import prepare
from offload.sampling import GREEDY
from offload.scheduler.row_engine import Request, Row
from offload.speculative import MAX_BRANCHES, Proposal

# A device whose links bind: streaming a layer costs a hundred times reading it resident, products are free.
LINK_BOUND = {"host": 1e9, "hbm": 1e11, "matmul": 1e15}
KW = dict(dtype="float32", max_batch=2, max_seq_len=64, link_bandwidth=LINK_BOUND)

pytestmark = pytest.mark.usefixtures("one_thread")


def row(prompt, tokens=(), index=0, sampling=GREEDY) -> Row:
    """A row of the row engine, as a draft reads it."""
    return Row(Request(tuple(prompt), 64, sampling), index, None, tokens=list(tokens))


def test_lookup_continues_the_latest_occurrence_of_the_longest_suffix():
    assert lookup([1, 2, 3, 9, 9, 1, 2, 3, 7, 7, 2, 3], 3) == [7, 7, 2]  # "2 3" last occurred before "7 7 2"
    assert lookup([5, 1, 2, 8, 1, 2, 6, 2], 2) == [6, 2]  # no "1 2" suffix: "2" alone, its latest occurrence
    assert lookup([4, 5, 6, 7], 3) == []  # nothing recurs
    assert lookup([1, 2], 0) == [] and lookup([3], 4) == []


def test_lookup_goes_round_a_loop_as_far_as_asked():
    """A loop's continuation runs into the end of the context; it goes on with the tokens it proposes."""
    assert lookup([9, 1, 2, 3, 1, 2, 3, 1], 7) == [2, 3, 1, 2, 3, 1, 2]
    assert lookup([4, 4, 4], 5) == [4] * 5


def test_ngram_draft_respects_each_rows_budget():
    draft = NgramDraft()
    rows = [row([1, 2, 3, 1, 2], [3, 1]), None, row([5, 6, 5], [6])]
    proposal = draft.propose(rows, [4, 4, 0])
    assert proposal.tokens == [[2, 3, 1, 2], [], []] and proposal.q is None


def test_draft_kinds_and_bad_options():
    assert [draft_kind(d) for d in (None, "ngram", "INT4", " int8", "some/dir")] == [None, NGRAM, INT4, INT8, MODEL]
    with pytest.raises(offload.InputError, match="draft_tokens goes with a draft"):
        offload.LoadOptions(draft_tokens=4)
    with pytest.raises(offload.InputError, match="at most 64"):
        offload.LoadOptions(draft="ngram", draft_tokens=65)
    with pytest.raises(offload.InputError, match="positive integer"):
        offload.LoadOptions(draft="ngram", draft_tokens=0)
    with pytest.raises(offload.InputError, match="'ngram', 'int4', 'int8' or the path"):
        offload.LoadOptions(draft=3)
    for draft, why in ((None, "no draft was given"), ("ngram", "prompt lookup proposes no alternatives")):
        with pytest.raises(offload.InputError, match=f"draft_branches goes with a draft model .*: {why}"):
            offload.LoadOptions(draft=draft, draft_branches=2)
    with pytest.raises(offload.InputError, match="at most 4"):
        offload.LoadOptions(draft="int4", draft_branches=5)
    with pytest.raises(offload.InputError, match="positive integer"):
        offload.LoadOptions(draft="int4", draft_branches=0)
    with pytest.raises(offload.InputError, match=r"layers are not quantized \(a draft's compressed copy takes the default"):
        offload.LoadOptions(draft="int4", group_size=16)


def test_a_cpu_plans_no_spare_rows_for_drafting_ahead(structured, structured_draft):
    """Drafting ahead runs a draft's chains in graphs, which a CPU has not: its rows would be memory for nothing."""
    with offload.load_model(structured, **KW, draft=str(structured_draft), device="cpu", progress=False) as model:
        assert model.draft.spare == 0 and model.draft.model.max_batch == KW["max_batch"]


def test_the_plan_reserves_the_logits_of_every_drafted_position(structured):
    """A verify pass holds max_batch x (K + 1) tokens and their logits; the reserve grows with both (once the
    pass is larger than a prefill chunk, which the reserve already holds)."""
    def activations(**kw):
        return offload.plan_model(structured, **{**KW, **kw}).needs.activation_bytes

    plain, vocab, e = activations(), 64, 4
    assert activations(draft="ngram", draft_tokens=4) >= plain
    wide, wider = activations(draft="ngram", draft_tokens=32, max_batch=8), activations(draft="ngram", draft_tokens=64,
                                                                                         max_batch=8)
    assert wide > activations(max_batch=8)
    assert wider - wide >= 8 * 32 * vocab * e  # 8 rows x 32 more positions of float32 logits, at least


def test_a_draft_models_bytes_come_out_of_the_targets_budget(tiny):
    """The tiny shape drafting for itself (a path draft shares the vocabulary): beside the draft, the target keeps
    as many layers resident as its budget less the draft's bytes holds, and a budget that holds only the
    target is refused, naming the draft."""
    kw = dict(KW, cpu_memory="1GiB")
    beside = prepare(tiny, offload.LoadOptions(**kw, draft=str(tiny))).plan.needs  # verify passes reserved too
    draft_bytes = beside.draft_bytes
    budget = beside.gpu_budget_streaming(6) - 5 * beside.largest_block // 2  # 2.5 layers short
    setup = prepare(tiny, offload.LoadOptions(**kw, gpu_memory=budget, draft=str(tiny)))
    draft = setup.draft.plan
    assert draft.placement == ["resident"] * 8 and setup.draft.options.max_seq_len == 64 + 16
    needs = setup.plan.needs
    assert needs.draft_bytes == draft.gpu_bytes - draft.needs.workspace_bytes == draft_bytes > 0
    resident = len(setup.plan.blocks_on("resident"))
    assert resident == 3  # 6 less the 2.5 layers' worth the draft takes beyond the budget's increase
    assert needs.gpu_budget_streaming(resident) <= budget < needs.gpu_budget_streaming(resident + 1)
    assert f"model {tiny}, resident" in str(setup.plan) and f"keeps {resident} of 8 layers resident" in str(setup.plan)
    with pytest.raises(offload.PlanError, match="draft"):
        offload.plan_model(tiny, **kw, draft=str(tiny), gpu_memory=needs.gpu_budget_streaming(0) - draft_bytes)


@pytest.mark.parametrize("copy", ["int4", "int8"])
def test_a_compressed_copy_is_kept_where_it_pays_and_declined_where_it_costs_resident_layers(structured, copy):
    kept = offload.load_model(structured, **KW, draft=copy, progress=False)
    assert isinstance(kept.draft, ModelDraft) and kept.plan.draft.endswith("kept")
    assert kept.plan.draft.startswith(f"{copy} copy of the target")
    assert kept.draft.model.plan.needs.weight_format.startswith(copy)
    # a budget that holds the whole target but not the draft beside it: it would stream every layer
    whole = offload.plan_model(structured, **KW).gpu_bytes
    declined = offload.load_model(structured, **KW, draft=copy, gpu_memory=whole, cpu_memory="1GiB",
                                  progress=False)
    assert declined.draft is None and "declined" in declined.plan.draft and "declined" in str(declined.plan)
    assert declined.plan.placement == ["resident"] * 2
    # the copy of a target in the same format is the target itself: it costs what a pass costs and gains nothing
    same = offload.load_model(structured, **KW, quantize=copy, draft=copy, progress=False)
    assert same.draft is None and "no draft length is predicted to pay" in same.plan.draft
    for m in (kept, declined, same):
        m.close()


def test_the_int4_draft_reads_its_targets_final_norm_lm_head_and_embedding(tiny):
    """The int4 copy's non-layer tensors are its target's to the bit: one buffer, counted once, read once (an
    untied embedding, as ``tiny``'s, too). A draft checkpoint's are its own."""
    kw = dict(KW, link_bandwidth={"host": 1e9, "hbm": 1e11, "matmul": 1e15}, progress=False)
    with offload.load_model(tiny, **kw, draft="int4") as model, \
            offload.load_model(tiny, **kw, draft=str(tiny)) as other:
        draft = model.draft.model
        assert draft.pool.globals.data_ptr() == model.pool.globals.data_ptr()
        assert draft.pool.embedding.data_ptr() == model.pool.embedding.data_ptr() and draft.pool.embedding.numel()
        assert other.draft.model.pool.globals.data_ptr() != other.pool.globals.data_ptr()
        assert other.draft.model.pool.embedding.data_ptr() != other.pool.embedding.data_ptr()
        own = draft.plan.gpu_bytes - draft.plan.needs.workspace_bytes
        shared = draft.plan.needs.global_bytes + draft.plan.needs.embedding_bytes
        assert model.plan.needs.draft_bytes == own - shared > 0 and draft.plan.needs.embedding_bytes > 0
        assert model.plan.needs.embedding_stays and not other.plan.needs.embedding_stays  # an offloading plan
        # keeps the target's embedding on the device beside the int4 draft (tests/test_planner.py)
        ids = [[5, 9, 3, 7]]
        assert torch.equal(draft.decoder.weights.lm_head, model.decoder.weights.lm_head)
        assert model.generate(ids, max_new_tokens=12, ignore_eos=True) == other.generate(ids, max_new_tokens=12,
                                                                                           ignore_eos=True)


def test_a_draft_must_share_the_vocabulary(structured, tiny):
    with pytest.raises(offload.ConfigError, match="vocabulary of 1024 tokens, the target 64"):
        offload.plan_model(structured, **KW, draft=str(tiny))


def test_a_draft_must_mean_the_same_tokens_by_its_ids(structured, tmp_path):
    """A vocabulary of the same size whose ids name other tokens is refused; the same tokenizer is not."""
    import json
    import shutil

    from offload.synthetic import train_demo_tokenizer

    target, same, other = (tmp_path / name for name in ("target", "same", "other"))
    for directory in (target, same, other):
        shutil.copytree(structured, directory)
    train_demo_tokenizer(64).save(str(target / "tokenizer.json"))
    shutil.copy(target / "tokenizer.json", same / "tokenizer.json")
    spec = json.loads((target / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    spec["model"]["vocab"] = {token: len(vocab) - 1 - i for token, i in vocab.items()}  # the ids reversed
    (other / "tokenizer.json").write_text(json.dumps(spec))
    offload.plan_model(target, **KW, draft=str(same))
    with pytest.raises(offload.ConfigError, match="a draft must share the target's tokenizer"):
        offload.plan_model(target, **KW, draft=str(other))


def test_a_draft_made_for_fewer_positions_than_the_rows_reach_is_a_warning(structured, structured_draft, tmp_path):
    import json
    import shutil

    short = tmp_path / "short"
    shutil.copytree(structured_draft, short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 16
    (short / "config.json").write_text(json.dumps(config))
    with pytest.warns(offload.OffloadWarning, match="made for 16 positions"):
        plan = offload.plan_model(structured, **{**KW, "max_seq_len": 64}, draft=str(short))
    assert any("made for 16 positions" in w for w in plan.warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", offload.OffloadWarning)
        offload.plan_model(structured, **{**KW, "max_seq_len": 16}, draft=str(short))


def test_a_broken_draft_checkpoint_is_named(structured, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in structured.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    with pytest.raises(offload.CheckpointError, match=f"draft {broken}: .*truncated or corrupt"):
        offload.load_model(structured, **KW, draft=str(broken), progress=False)
    with pytest.raises(offload.ConfigError, match="neither ngram, int8, int4 nor a checkpoint that exists"):
        offload.plan_model(structured, **KW, draft=str(tmp_path / "none"))


def test_a_draft_models_cache_follows_what_the_target_accepted(structured, structured_draft):
    """Propose, accept a few, propose again: each proposal is what the draft model alone decodes greedily from
    the row's context, though its cache was filled by earlier proposals and rolled back. A proposal counts the
    one-token steps behind it, its catch-up's included: the prompt goes in one pass, which measures no step, and
    so do the two tokens after a fully accepted run where the draft has no CUDA graphs."""
    model = offload.load_model(structured, **KW, draft=str(structured_draft), progress=False)
    alone = offload.load_model(structured_draft, **KW, progress=False)
    draft = model.draft

    def greedy(context, k):
        return alone.generate([context], max_new_tokens=k, ignore_eos=True, return_result=True).tokens[0]

    r = row([3, 17, 40, 2, 9], [11])
    two = 0 if draft.model.graphs is None else 2 + 4  # two new tokens: one pass, or (with graphs) replayed steps
    for (accepted, correction), steps in zip([(2, 5), (0, 8), (5, 1), (1, 7)], [0, 5, 5, two]):
        proposal = draft.propose([None, r], [0, 5])
        context = list(r.request.prompt) + r.tokens
        assert proposal.tokens[1] == greedy(context, 5)
        assert proposal.steps == steps
        draft.update([None, r], [0, accepted])
        r.tokens += proposal.tokens[1][:accepted] + [correction]  # what the target gave instead of the rest
    model.close()
    alone.close()


def test_with_graphs_a_draft_catches_up_in_replayed_steps_and_counts_them(structured, structured_draft):
    """With graphs (a stand-in capture on the CPU), a row's new tokens enter the draft's cache as replayed decode
    steps, counted in ``Proposal.steps`` with the drafting steps: two after a fully accepted run, eight where the
    target's token was followed by seven passes that drafted nothing (as before a probe); a prompt still goes in
    one pass, which counts none. The drafts are
    the draft model's greedy decoding either way."""
    from conftest import with_graphs

    model = offload.load_model(structured, **KW, draft=str(structured_draft), progress=False)
    alone = offload.load_model(structured_draft, **KW, progress=False)
    draft = model.draft
    with_graphs(draft.model)

    def greedy(context, k):
        return alone.generate([context], max_new_tokens=k, ignore_eos=True, return_result=True).tokens[0]

    r = row([3, 17, 40, 2, 9], [11])
    skipped = [21, 4, 9, 30, 2, 8, 15]  # the target's tokens of seven passes that drafted nothing
    for (accepted, extra), steps in zip([(2, [5]), (5, [1]), (0, [8] + skipped), (1, [7])], [0, 1 + 4, 2 + 4, 8 + 4]):
        proposal = draft.propose([None, r], [0, 5])
        assert proposal.tokens[1] == greedy(list(r.request.prompt) + r.tokens, 5)
        assert proposal.steps == steps
        draft.update([None, r], [0, accepted])
        r.tokens += proposal.tokens[1][:accepted] + extra
    model.close()
    alone.close()



def test_with_graphs_a_greedy_chain_is_one_replayed_graph_a_step(structured, structured_draft):
    """With graphs (a stand-in capture on the CPU), a greedy chain runs each step as one graph (embedding, layers,
    LM head, argmax and the likeliest tokens), its first step the catch-up where a row has one token the draft has
    not seen (else the catch-up goes first): ragged budgets, a row that drafts nothing and a run accepted whole give
    the tokens and the alternatives that decode steps one at a time give, a graph for each bucket of rows and key
    length, and the draft's cache follows what the target accepts."""
    from conftest import with_graphs

    def load():
        return offload.load_model(structured, **KW, draft=str(structured_draft), progress=False)

    model, plain = load(), load()
    capture = with_graphs(model.draft.model)
    draft, reference = model.draft, plain.draft
    rows = [row([3, 17, 40, 2, 9], [11], index=0), row([8, 8, 1], index=1)]
    outcomes = [(2, 5), (0, 8), (4, 1), (6, 3), (1, 2)]  # the fourth accepts every draft: two unseen tokens
    for (accepted, correction), budgets in zip(outcomes, [[5, 3], [4, 0], [6, 6], [6, 6], [3, 5]]):
        proposal, expected = draft.propose(rows, budgets), reference.propose(rows, budgets)
        assert proposal.tokens == expected.tokens and proposal.alternatives == expected.alternatives
        assert [len(t) for t in proposal.tokens] == budgets
        for d in (draft, reference):
            d.update(rows, [accepted, min(accepted, budgets[1])])
        rows[0].tokens += proposal.tokens[0][:accepted] + [correction]
        rows[1].tokens += proposal.tokens[1][: min(accepted, budgets[1])] + [correction]
    chain = draft._chain()
    assert chain is not None and sorted(chain.graphs) == [(2, MAX_BRANCHES, draft.model.max_seq_len)]  # one bucket
    assert capture.replayed > 0
    model.close()
    plain.close()


@pytest.mark.usefixtures("drafts_ahead_on_cpu")
@pytest.mark.parametrize("retried", [False, True], ids=["once", "retried"])
def test_chains_drafted_ahead_are_the_chains_drafted_after_the_verdict(structured, structured_draft, monkeypatch,
                                                                       retried):
    """While the target verifies, a draft with graphs drafts the next pass's chains for the verdicts it guesses
    (every draft accepted and its own argmax next, or one of its ``LOOK_AHEAD`` likeliest breaks, each in a spare row
    of its cache). Where the verdict was guessed the next proposal comes from
    them; either way it is the proposal of a draft that drafts after the verdict: ragged budgets, a row that drafts
    nothing, guessed and unguessed verdicts, a break past the depths guessed. And where a pass failed after its
    chains were drafted ahead (``retried``: each pass's first try is dropped there) and is tried again with the
    same rows: its spare rows hold the failed pass's guesses now, not the ones its proposal was served from."""
    from conftest import with_graphs

    from offload import drafts

    monkeypatch.setattr(drafts, "LOOK_AHEAD", 3)
    monkeypatch.setattr(drafts.ModelDraft, "_pace_ahead", lambda self, done, verdict: None)  # no target's pass here

    def load():
        return offload.load_model(structured, **KW, draft=str(structured_draft), progress=False)

    model, plain = load(), load()
    with_graphs(model.draft.model)
    draft, reference = model.draft, plain.draft
    assert draft.spare == 3 and draft.model.max_batch == 8  # 2 rows and 3 spare rows each
    without = offload.load_model(structured, **KW, draft=str(structured_draft), cuda_graphs=False, progress=False)
    assert without.draft.spare == 0 and without.draft.model.max_batch == 2  # no graphs, no chains: no spare rows
    without.close()
    rows = [row([3, 17, 40, 2, 9], [11], index=0), row([8, 8, 1], index=1)]
    # (accepted, the target's token: "alt" the draft's next likeliest there, "own" its argmax after a whole chain)
    verdicts = [(1, "alt"), (4, "own"), (0, "alt"), (2, 5), (5, "own"), (2, "alt"), (4, "alt"), (3, "own"), (1, 7)]
    budgets = [[4, 2], [4, 0], [5, 5], [5, 5], [5, 3], [6, 6], [6, 6], [3, 3], [4, 4]]
    for (accepted, token), budget in zip(verdicts, budgets):
        expected = reference.propose(rows, budget)
        for _ in range(2 if retried else 1):  # a retried pass's first try ends after its chains were drafted ahead
            hits = draft.guessed[0]
            share, ready = draft.drafting_ahead(rows)  # known before the pass's shape is chosen
            proposal = draft.propose(rows, budget)
            assert proposal.tokens == expected.tokens and proposal.alternatives == expected.alternatives
            served = draft.guessed[0] > hits
            assert (share, ready) == (0.0, 0) or (share == 1.0 and ready >= 1 and served)
            assert share == 1.0 or not served or min(budget) == 0  # a row that drafts nothing may have no guesses
            draft.look_ahead(rows, proposal)
        for b, r in enumerate(rows):
            chain = proposal.tokens[b]
            n = min(accepted, len(chain))
            if token == "alt" and n < len(chain):
                gained = chain[:n] + [proposal.alternatives[b][n][0]]
            elif token == "own" and n == len(chain) and chain:
                gained = chain + [draft.ahead_chains[0][b, 0].item()]  # the step after its last draft
            else:
                gained = chain[:n] + [5 if chain[n:n + 1] != [5] else 6]
            r.tokens += gained
        accepted_each = [min(accepted, len(t)) for t in proposal.tokens]
        draft.update(rows, accepted_each)
        reference.update(rows, accepted_each)
    hits, tries = draft.guessed
    assert tries == (2 if retried else 1) * len(verdicts) - 1 and 3 <= hits < tries  # guessed verdicts were served
    model.close()
    plain.close()


def test_drafting_ahead_goes_no_deeper_than_the_targets_pass_leaves_time_for(structured, structured_draft):
    """As many steps as fit in ``AHEAD_SHARE`` of the target's pass at the pace of the last ones (the GPU's times of
    both, from the proposal); never fewer than two (a guess and a draft): where two do not fit, none for
    ``AHEAD_PAUSE`` passes, then two again."""
    from offload.drafts import AHEAD_PAUSE, AHEAD_SHARE, paced_steps

    assert paced_steps(4, 2.0, 5.0) == int(AHEAD_SHARE * 10) == 9  # 0.5 ms a step, a 5 ms pass
    assert paced_steps(6, 6.0, 5.0) == 4  # late: 1 ms a step
    assert paced_steps(2, 6.0, 5.0) == 2 - AHEAD_PAUSE  # 3 ms a step: not even two
    model = offload.load_model(structured, **KW, draft=str(structured_draft), progress=False)
    draft = model.draft
    draft.ahead_steps, draft.depth, draft.spare = 2 - AHEAD_PAUSE, 3, 1
    rows = [row([3, 17, 40, 2, 9], [11], index=0)]
    for _ in range(AHEAD_PAUSE):  # paused: nothing drafted ahead
        draft.look_ahead(rows, Proposal([[5, 6, 7], []], alternatives=[[[8], [9], [10]], []]))
        assert not draft.ahead
    assert draft.ahead_steps == 2
    model.close()


def test_the_breaks_guessed_are_the_likeliest_by_the_drafts_own_probabilities(structured, structured_draft,
                                                                               monkeypatch):
    """A chain's breaks drafted ahead in spare rows are the likeliest verdicts that break it: the chance that the
    target takes the drafts before the break (the product of the draft's probabilities of its chosen tokens), times
    the chance of the token there; as many as there are spare rows."""
    from offload import drafts

    monkeypatch.setattr(drafts, "LOOK_AHEAD", 3)
    model = offload.load_model(structured, **KW, draft=str(structured_draft), progress=False)
    draft, r = model.draft, row([3, 17, 40, 2, 9])
    chain = [5, 6, 7]
    likeliest = [[5, 8, 9], [6, 10, 11], [12, 7, 13]]  # at the last depth the draft chose its second likeliest
    chances = [[0.9, 0.05, 0.02], [0.5, 0.4, 0.06], [0.6, 0.3, 0.1]]
    draft.spare, draft.likely = 3, {r: (likeliest, chances)}
    # 0.9 x 0.4 = 0.36 for 10 after one draft; 0.9 x 0.5 x 0.6 = 0.27 for 12 after two; 0.9 x 0.06 = 0.054 for 11
    # after one; 0.05 for 8 first; 0.9 x 0.5 x 0.1 = 0.045 for 13 after two
    assert draft._breaks(r, chain) == [(1, 10), (2, 12), (1, 11)]
    monkeypatch.setattr(drafts, "LOOK_AHEAD", 1)
    assert draft._breaks(r, chain) == [(1, 10)]
    assert draft._breaks(row([1]), chain) == []  # no chances known: no break guessed
    model.close()


@pytest.mark.usefixtures("drafts_ahead_on_cpu")
def test_greedy_speculation_drafting_ahead_gives_plain_greedy_tokens(structured, structured_draft, monkeypatch):
    """Through the row engine, with graphs: drafting ahead (its chains queued after the verify pass) gives the
    tokens plain greedy decoding gives, and the passes of a draft that drafts only after each verdict."""
    from conftest import greedy_through, with_graphs

    from offload import drafts
    from offload.scheduler.row_engine import RowEngine

    prompts, new = [[3, 17, 40, 2, 9], [8, 8, 1], [5, 6]], 24
    plain = offload.load_model(structured, **KW, progress=False)
    expected = greedy_through(RowEngine(plain), prompts, new)
    passes = {}
    for ahead in (1, 0):
        monkeypatch.setattr(drafts, "LOOK_AHEAD", ahead)
        model = offload.load_model(structured, **KW, draft=str(structured_draft), draft_tokens=4, draft_branches=1,
                                   progress=False)
        with_graphs(model.draft.model)
        order = []  # what was queued in each pass: the verify pass, the chains drafted ahead
        for owner, name in ((model, "verify"), (model.draft, "look_ahead")):
            monkeypatch.setattr(owner, name, spy(getattr(owner, name), order, name))
        engine = RowEngine(model)
        assert greedy_through(engine, prompts, new) == expected
        passes[ahead] = (engine.speculator.overall.tried, engine.speculator.overall.accepted, model.draft.guessed)
        assert order and order == ["verify", "look_ahead"] * (len(order) // 2), order[:6]  # the chains after the pass
        model.close()
    assert passes[1][:2] == passes[0][:2]
    assert passes[1][2][0] > 0 and passes[0][2] == [0, 0]
    plain.close()


def spy(method, calls: list, name: str):
    """``method``, noting ``name`` in ``calls`` each time it is called."""
    def noted(*args, **kwargs):
        calls.append(name)
        return method(*args, **kwargs)
    return noted
