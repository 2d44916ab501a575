"""Speculative decoding through the row engine: with every draft, greedy output is plain greedy decoding's, token
for token (float32), on models with structure; rows advance by different counts, stop inside an accepted run,
join mid-run; caches are rolled back; sampled output has the target's distribution."""

import time

import pytest
import torch

import offload
from conftest import greedy_through, with_graphs
from offload.sampling import GREEDY, Sampling
from offload.scheduler.row_engine import Request, RowEngine
from offload.speculative import MeasuredPrice, MeasuredPrices, Proposal
from offload.structured import corpus_of

# A device whose links bind: streaming a layer costs a hundred times reading it resident, products are free.
LINK_BOUND = {"host": 1e9, "hbm": 1e11, "matmul": 1e15}
KW = dict(dtype="float32", max_batch=4, max_seq_len=96, link_bandwidth=LINK_BOUND, progress=False)
DRAFTS = ["ngram", "int4", "int8", "model", "tree"]  # tree: the draft model, four tokens at each depth

pytestmark = pytest.mark.usefixtures("one_thread")


def streaming_budget(path, **kw) -> int:
    """A GPU budget under which the target streams every layer from the host through one slot (beside its draft, if
    any): the structured model's two layers would fit where two slots do."""
    kw = {k: v for k, v in {**KW, **kw}.items() if k != "progress"}
    return offload.plan_model(path, **kw).needs.gpu_budget_streaming(0, slots=1)


def load(path, draft=None, draft_path=None, **kw):
    """The target at ``path`` with ``draft`` ("model": ``draft_path``). Prompt lookup and the draft model are
    paired with a target that streams all its layers (where drafting pays); a compressed copy (int4, int8) is kept
    only beside a resident target (the plan declines to evict layers for it), so its target is resident."""
    kw = {**KW, **kw}
    if draft == "tree":
        draft, kw["draft_branches"] = "model", kw.get("draft_branches", 4)
    if draft == "model":
        draft = str(draft_path)
    if draft is not None and draft not in ("int4", "int8"):
        kw.update(cpu_memory="1GiB", slots=1, gpu_memory=streaming_budget(path, draft=draft, **kw))
    model = offload.load_model(path, draft=draft, **kw)
    assert draft is None or model.draft is not None, model.plan
    return model


@pytest.fixture(scope="module")
def plain(structured):
    model = load(structured)
    yield model
    model.close()


@pytest.fixture(scope="module", params=DRAFTS)
def speculative(request, structured, structured_draft):
    model = load(structured, request.param, structured_draft)
    yield model
    model.close()


def prompts(structured, lengths=(9, 4, 17, 6), seed=5) -> list[list[int]]:
    """Prompts from the structured model's own corpus, of different lengths."""
    corpus = corpus_of(structured)
    return [corpus.sample(1, n, seed=seed + i)[0].tolist() for i, n in enumerate(lengths)]


def test_greedy_output_is_plain_greedy_decoding(structured, plain, speculative):
    batch, limits = prompts(structured), [40, 23, 31, 8]
    want = plain.generate(batch, max_new_tokens=limits, ignore_eos=True, return_result=True)
    got = speculative.generate(batch, max_new_tokens=limits, ignore_eos=True, return_result=True)
    assert got.tokens == want.tokens
    assert got.finish_reasons == ["length"] * 4  # max_new_tokens reached exactly, however long the last run
    assert got.decode_steps < want.decode_steps and got.tokens_per_pass > 1.5
    assert 0 < got.accepted_tokens <= got.drafted_tokens
    assert got.decode_tokens == sum(limits) - 4  # the first token of each row comes from its prompt's pass


@pytest.mark.parametrize("k", [1, 3, 7])
def test_a_fixed_draft_length(structured, structured_draft, plain, k):
    batch = prompts(structured, (5, 11))
    model = load(structured, "model", structured_draft, draft_tokens=k)
    got = model.generate(batch, max_new_tokens=25, ignore_eos=True, return_result=True)
    assert got.tokens == plain.generate(batch, max_new_tokens=25, ignore_eos=True, return_result=True).tokens
    assert got.drafted_tokens <= k * 2 * got.decode_steps
    model.close()


def test_eos_inside_an_accepted_run_stops_the_row_there(structured, plain, speculative):
    """The eos id is a token that comes a few tokens into row 0's output: a pass accepts it with tokens after it,
    which are dropped; the other rows go on."""
    batch = prompts(structured)
    free = plain.generate(batch, max_new_tokens=30, ignore_eos=True, return_result=True).tokens
    eos = next(t for i, t in enumerate(free[0]) if i >= 6 and t not in free[0][:i])
    want = [tokens[: tokens.index(eos) + 1] if eos in tokens else tokens for tokens in free]
    engine = RowEngine(speculative)
    rows = engine.run([Request(tuple(p), 30, GREEDY, (eos,), key=i) for i, p in enumerate(batch)])
    assert [row.tokens for row in rows] == want
    assert [row.finish_reason for row in rows] == ["eos" if eos in t else "length" for t in free]


def test_each_event_of_a_run_but_a_finished_rows_last_is_unfinished(structured, speculative):
    """A reader that acts on ``row.finish_reason`` (the batch writer, the server) acts once, on the last token,
    though a row gains several tokens in a step (its prompt pass's read, then a verify pass's run)."""
    engine = RowEngine(speculative, rows=2)
    limits = {"a": 2, "b": 3, "c": 20, "d": 1}
    for key, p in zip(limits, prompts(structured)):
        engine.submit(Request(tuple(p), limits[key], key=key))
    seen, finished = {key: [] for key in limits}, {}
    while engine.busy:
        for row, token in engine.step():
            seen[row.request.key].append(token)
            if row.finish_reason is not None:
                assert row.request.key not in finished
                finished[row.request.key] = len(seen[row.request.key])
    assert finished == limits


def test_rows_join_a_running_batch(structured, plain, speculative):
    """Two rows, five requests: freed rows take new prompts while the other row is mid-run (a prompt pass, then
    verify passes again)."""
    batch, limits = prompts(structured, (9, 4, 17, 6, 3)), [5, 27, 9, 14, 20]
    requests = [Request(tuple(p), n, GREEDY, key=i) for i, (p, n) in enumerate(zip(batch, limits))]
    engine = RowEngine(speculative, rows=2)
    finished = {row.request.key: row.tokens for row in engine.run(requests)}
    want = [plain.generate([p], max_new_tokens=n, ignore_eos=True, return_result=True).tokens[0]
            for p, n in zip(batch, limits)]
    assert [finished[i] for i in range(5)] == want


@pytest.fixture(scope="module")
def weak_draft(structured, tmp_path_factory):
    """A draft whose greedy choice is often wrong but whose next choices often right: a tree mends its chains."""
    from conftest import noisy_copy

    return noisy_copy(structured, tmp_path_factory.mktemp("weak-draft"), noise=1.5)


@pytest.mark.parametrize("draft", ["model", "tree"])
def test_the_kv_cache_is_rolled_back_to_the_accepted_tokens(structured, weak_draft, plain, draft):
    """After generating with rejections (and, in a tree, branches kept off the chain and moved into place), the
    cache holds what plain decoding's holds, position for position."""
    batch = prompts(structured, (9, 14))
    model = load(structured, draft, weak_draft)
    got = model.generate(batch, max_new_tokens=30, ignore_eos=True, return_result=True)
    assert got.accepted_tokens < got.drafted_tokens  # some drafts were rejected and rolled back
    plain.generate(batch, max_new_tokens=30, ignore_eos=True)
    for b, p in enumerate(batch):
        n = len(p) + 30 - 1  # the last token was never added
        for cache, want in ((model.cache.k, plain.cache.k), (model.cache.v, plain.cache.v)):
            assert torch.allclose(cache[:, b, :, :n], want[:, b, :, :n], atol=1e-5)
    model.close()


def test_a_tree_mends_a_weak_drafts_chains(structured, weak_draft, plain):
    """Sixteen drafted tokens a row as a chain, or as four depths of four: the same tokens as plain greedy
    decoding, and the tree, which the target often leaves by an alternative, takes fewer passes."""
    batch, limits = prompts(structured), [40, 23, 31, 8]
    want = plain.generate(batch, max_new_tokens=limits, ignore_eos=True, return_result=True)
    passes, mended = {}, {}
    for branches in (1, 4):
        model = load(structured, "model", weak_draft, draft_tokens=16, draft_branches=branches)
        engine = RowEngine(model)
        rows = engine.run([Request(tuple(p), n, GREEDY, key=i) for i, (p, n) in enumerate(zip(batch, limits))])
        assert [row.tokens for row in sorted(rows, key=lambda r: r.request.key)] == want.tokens
        passes[branches], mended[branches] = engine.stats.decode_steps, sum(engine.speculator.mends[True].at_rank)
        model.close()
    assert mended[1] > 0 and mended[4] > 0  # the alternatives are ranked either way
    assert passes[4] < passes[1], passes


def test_sampled_and_greedy_rows_grow_trees_in_the_same_passes(structured, weak_draft, plain):
    """A sampled row samples down its tree while the greedy rows of the same passes walk theirs by the argmax:
    the greedy rows are plain greedy decoding's, the sampled one is the same with the same seed."""
    batch = prompts(structured, (9, 4, 17))
    sampling = Sampling(do_sample=True, temperature=0.8, top_k=5, seed=3)
    want = plain.generate(batch, max_new_tokens=20, ignore_eos=True, return_result=True).tokens
    runs = []
    for _ in range(2):
        model = load(structured, "tree", weak_draft, draft_tokens=8)
        engine = RowEngine(model)
        requests = [Request(tuple(p), 20, sampling if i == 1 else GREEDY, key=i) for i, p in enumerate(batch)]
        rows = sorted(engine.run(requests), key=lambda r: r.request.key)
        runs.append([row.tokens for row in rows])
        model.close()
    assert runs[0][0] == want[0] and runs[0][2] == want[2]
    assert runs[0][1] == runs[1][1] and len(runs[0][1]) == 20


def test_a_tree_wider_than_its_tokens(structured, weak_draft, plain):
    """Three tokens with four a depth: one depth of three (not no draft at all)."""
    batch = prompts(structured, (9, 4))
    model = load(structured, "tree", weak_draft, draft_tokens=3, draft_branches=4)
    got = model.generate(batch, max_new_tokens=20, ignore_eos=True, return_result=True)
    assert got.tokens == plain.generate(batch, max_new_tokens=20, ignore_eos=True, return_result=True).tokens
    assert 2 * got.decode_row_passes < got.drafted_tokens <= 3 * got.decode_row_passes  # a chain of one, two more
    model.close()


def test_a_tree_mends_a_weak_drafts_sampled_chains(structured, weak_draft):
    """Sampled rows (temperature 0.7) with sixteen drafted tokens a row as a chain or as four depths of four:
    where the chain's token is rejected, the row often takes an alternative, so the trees take fewer passes."""
    batch = prompts(structured)
    passes = {}
    for branches in (1, 4):
        model = load(structured, "model", weak_draft, draft_tokens=16, draft_branches=branches)
        got = model.generate(batch, max_new_tokens=40, ignore_eos=True, do_sample=True, temperature=0.7, seed=0,
                             return_result=True)
        assert [len(t) for t in got.tokens] == [40] * 4
        passes[branches] = got.decode_steps
        model.close()
    assert passes[4] < passes[1], passes


def test_a_run_of_passes_that_draft_nothing_ends_with_one_that_drafts_a_token(structured, plain):
    """Where every drafted token costs what a pass costs (products bind), no draft length pays at the assumed
    acceptance: the speculator drafts nothing, but every eighth pass drafts one token, so a changed acceptance
    would be seen. Output: plain greedy decoding's."""
    batch = prompts(structured, (9,))
    compute_bound = {"host": 1e15, "hbm": 1e15, "matmul": 1e6}
    with offload.load_model(structured, **{**KW, "link_bandwidth": compute_bound}, draft="ngram") as model:
        got = model.generate(batch, max_new_tokens=40, ignore_eos=True, return_result=True)
    assert got.tokens == plain.generate(batch, max_new_tokens=40, ignore_eos=True, return_result=True).tokens
    assert 0 < got.drafted_tokens <= got.decode_steps // 8 + 1, (got.drafted_tokens, got.decode_steps)


def test_a_pass_with_nothing_to_verify_is_a_decode_step(structured, plain, monkeypatch):
    """Where prompt lookup finds nothing in any row, the pass is a plain decode step (a verify pass ``k + 1``
    tokens wide costs more); where it finds a draft, a verify pass. Output: plain greedy decoding's."""
    batch = prompts(structured, (9,))
    with load(structured, "ngram") as model:
        calls = []
        for verb in ("decode", "verify"):
            method = getattr(model, verb)
            monkeypatch.setattr(model, verb, lambda *a, _m=method, _v=verb, **k: calls.append(_v) or _m(*a, **k))
        lookup, passes = model.draft.propose, []

        def finding(rows, budgets, nodes=None):  # nothing every other pass, else the lookup's
            passes.append(len(passes))
            return lookup(rows, budgets) if len(passes) % 2 else Proposal.empty(len(rows))

        model.draft.propose = finding
        got = model.generate(batch, max_new_tokens=24, ignore_eos=True, return_result=True)
    assert got.tokens == plain.generate(batch, max_new_tokens=24, ignore_eos=True, return_result=True).tokens
    assert calls.count("decode") >= len(passes) // 2 and "verify" in calls and got.drafted_tokens > 0


def _drafted_per_pass(model, batch, step_scale: float, verify_scales: dict | None = None) -> tuple[list[list[int]],
                                                                                                  float]:
    """Greedy tokens and drafted tokens per pass through a row engine whose speculator has seen draft steps take
    ``step_scale`` times their price (and verify passes of each width in ``verify_scales`` that many times theirs;
    the measuring itself, on a GPU only, is switched off: CPU times are not the prices of these fictional links)."""
    model.speculation_prices = MeasuredPrices()
    engine = RowEngine(model, rows=len(batch))
    engine.speculator.timed = False
    engine.speculator.prices.draft_step.ratios.extend([step_scale] * 3)
    for width, scale in (verify_scales or {}).items():
        for _ in range(3):
            engine.speculator.prices.add_verify(width, scale, 1.0)
    tokens = greedy_through(engine, batch, 24)
    return tokens, engine.stats.drafted_tokens / engine.stats.decode_steps


def test_draft_steps_measured_dearer_than_their_price_draft_shallower(structured, structured_draft, plain):
    """The speculator scales the plans' price of a draft step by what steps took as they ran (a small draft on a
    GPU is bound by launches, which the plans do not price): the dearer a step, the fewer tokens drafted a pass,
    and the output is plain greedy decoding's either way."""
    batch = prompts(structured, (9, 4))
    want = plain.generate(batch, max_new_tokens=24, ignore_eos=True)
    with load(structured, "model", structured_draft) as model:
        verify = max(plan.pass_seconds(2) for plan in model.plans)
        step = max(plan.pass_seconds(2) for plan in model.draft.plans)
        per_pass = {}
        for scale in (1.0, 2 * verify / step):  # steps as priced; a step dearer than a verify pass
            tokens, per_pass[scale] = _drafted_per_pass(model, batch, scale)
            assert tokens == [w[len(p):] for w, p in zip(want, batch)]
    cheap, dear = per_pass.values()
    assert dear < cheap / 4, per_pass  # barely anything: the probes that measure acceptance


def test_the_speculator_times_its_draft_steps_and_verify_passes(structured, structured_draft, monkeypatch):
    """Where it measures (on a GPU; forced here), each pass adds what its draft steps and its verify pass took
    against their prices: a draft made slower by 50 ms a proposal shows in the draft's time, not the verify's."""
    from offload.scheduler.speculation import Speculator

    seen = []
    measure = Speculator._measure
    monkeypatch.setattr(Speculator, "_measure", lambda self, rows, steps, drafting, width, verifying: (
        seen.append((steps, drafting, verifying)), measure(self, rows, steps, drafting, width, verifying)))
    with load(structured, "model", structured_draft) as model:
        propose = model.draft.propose
        monkeypatch.setattr(model.draft, "propose", lambda *a, **k: (time.sleep(0.05), propose(*a, **k))[1])
        engine = RowEngine(model, rows=1)
        assert not engine.speculator.timed  # links given (LINK_BOUND): the plans price links that are not there
        engine.speculator.timed = True
        greedy_through(engine, prompts(structured, (9,)), 12)
        prices = model.speculation_prices  # kept with the model: the next engine starts from them
        drafted = [(drafting, verifying) for steps, drafting, verifying in seen if steps > 0]
        assert drafted and all(drafting >= 0.05 > verifying for drafting, verifying in drafted)
        # a step is measured where the draft's catch-up went as one-token steps (not the prompt's)
        assert len(prices.draft_step.ratios) == len(drafted) < len(prices.verify.ratios) == len(seen)
        assert min(prices.draft_step.ratios) > 0 and min(prices.verify.ratios) > 0
        assert RowEngine(model, rows=1).speculator.prices is prices


def test_a_draft_priced_out_is_measured_again_at_its_probes(structured, structured_draft, monkeypatch):
    """A draft step measured dearer than a verify pass stops drafting, but every eighth pass still drafts a token,
    and with graphs its catch-up goes as replayed steps, so the probe measures a step again: no price is frozen
    by a few bad passes (on the CPU the times are not these links' prices, so only the counting is checked). Not
    drafting ahead: drafts made beside the pass before cost nothing, and a pass they serve drafts them."""
    from offload import drafts

    monkeypatch.setattr(drafts, "LOOK_AHEAD", 0)
    with load(structured, "model", structured_draft) as model:
        with_graphs(model.draft.model)
        verify = max(plan.pass_seconds(1) for plan in model.plans)
        step = max(plan.pass_seconds(1) for plan in model.draft.plans)
        model.speculation_prices.draft_step.ratios.extend([1000 * verify / step] * 16)  # a full, bad window
        engine = RowEngine(model, rows=1)
        engine.speculator.timed = True
        greedy_through(engine, prompts(structured, (9,)), 40)
        ratios = list(model.speculation_prices.draft_step.ratios)
    assert engine.stats.drafted_tokens <= engine.stats.decode_steps // 8 + 1  # only the probes drafted
    assert ratios[:-3] == [1000 * verify / step] * 13 and max(ratios[-3:]) < 1000 * verify / step  # 3 probes measured


def test_verify_passes_measured_dearer_where_wider_draft_shallower(structured, structured_draft, plain):
    """Each width of verify pass (padded, as it runs) is priced by what passes of that width took: where wide
    passes were measured dearer than narrow ones, fewer tokens are drafted a pass than where every width took its
    price; the output is plain greedy decoding's either way."""
    batch = prompts(structured, (9, 4))
    want = plain.generate(batch, max_new_tokens=24, ignore_eos=True)
    with load(structured, "model", structured_draft) as model:
        per_pass = {}
        for name, scales in (("as priced", None), ("wide dear", {2: 1.0, 4: 3.0, 8: 6.0, 16: 12.0, 32: 24.0})):
            tokens, per_pass[name] = _drafted_per_pass(model, batch, 1.0, scales)
            assert tokens == [w[len(p):] for w, p in zip(want, batch)]
    assert per_pass["wide dear"] < per_pass["as priced"] / 2, per_pass


def test_a_verify_pass_is_priced_by_what_passes_of_its_width_took():
    """A measured width's own scale; between two measured, grown from the narrower's toward the wider's a doubling
    at a time; past them, the nearest's; 1 before any. Every width's ratios also make the overall scale."""
    prices = MeasuredPrices()
    assert prices.verify_scale(8) == 1.0
    for width, scale in ((2, 1.2), (16, 2.1)):
        for _ in range(3):
            prices.add_verify(width, scale, 1.0)
    assert prices.verify_scale(2) == 1.2 and prices.verify_scale(16) == 2.1
    assert prices.verify_scale(1) == 1.2 and prices.verify_scale(64) == 2.1
    assert prices.verify_scale(4) == pytest.approx(1.5) and prices.verify_scale(8) == pytest.approx(1.8)
    assert prices.verify.scale == pytest.approx((1.2 + 2.1) / 2)  # the median of six ratios, three of each


def test_a_measured_price_is_the_median_of_recent_ratios():
    price = MeasuredPrice(window=3, least=2)
    assert price.scale == 1.0  # nothing measured: the plan's price
    price.add(5.0, 1.0)  # a first pass that captured its graph
    assert price.scale == 1.0  # one ratio says too little
    price.add(2.0, 1.0)
    price.add(2.2, 1.0)
    assert price.scale == 2.2
    price.add(1.0, 0.0)  # nothing priced: nothing learnt
    price.add(2.0, 1.0)
    price.add(2.0, 1.0)
    assert price.scale == 2.0 and list(price.ratios) == [2.2, 2.0, 2.0]


def test_a_cancelled_row_leaves_and_the_others_are_unchanged(structured, plain, speculative):
    batch = prompts(structured, (9, 4, 17))
    engine = RowEngine(speculative, rows=2)
    for i, p in enumerate(batch):
        engine.submit(Request(tuple(p), 24, GREEDY, key=i))
    seen = {0: [], 1: [], 2: []}
    while engine.busy:
        for row, token in engine.step():
            seen[row.request.key].append(token)
        if len(seen[0]) >= 3 and engine.rows[0] is not None and engine.rows[0].request.key == 0:
            engine.cancel(0)
    want = plain.generate(batch, max_new_tokens=24, ignore_eos=True, return_result=True).tokens
    assert seen[0] == want[0][: len(seen[0])] and len(seen[0]) < 24
    assert seen[1] == want[1] and seen[2] == want[2]


@pytest.mark.parametrize("quantize, draft", [("int8", "ngram"), ("int4", "ngram"), ("int4", "model")])
def test_a_compressed_target(structured, structured_draft, quantize, draft):
    batch = prompts(structured, (9, 13))
    reference = offload.load_model(structured, quantize=quantize, **KW)
    model = load(structured, draft, structured_draft, quantize=quantize)
    want = reference.generate(batch, max_new_tokens=30, ignore_eos=True)
    assert model.generate(batch, max_new_tokens=30, ignore_eos=True) == want
    reference.close()
    model.close()


def test_an_int4_draft_of_an_int8_target_is_declined_where_it_cannot_pay(structured):
    """The int4 copy reads half the int8 target's layer bytes but the same LM head (the target's, in int8), a large
    part of this small model: a draft step costs most of a target step, so no draft length pays at 70% acceptance."""
    with offload.load_model(structured, quantize="int8", draft="int4", **KW) as model:
        assert model.draft is None and "no draft length is predicted to pay" in model.plan.draft
        assert "declined" in model.plan.draft


def _joint_distribution(model, prompt, sampling, tokens=3) -> dict:
    """The target's probability of each sequence of ``tokens`` tokens after ``prompt`` under ``sampling``, from
    its logits (top-k keeps the tree small)."""
    from offload.sampling import probabilities

    out = {(): 1.0}
    for _ in range(tokens):
        grown = {}
        for seq, p in out.items():
            probs = probabilities(model([prompt + list(seq)])[0, -1:], [sampling])[0]
            for t in probs.nonzero()[:, 0].tolist():
                grown[seq + (t,)] = p * probs[t].item()
        out = grown
    return out


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["ngram", "model", "tree"])
def test_sampled_output_has_the_targets_distribution(structured, structured_draft, plain, draft):
    """Three tokens sampled (temperature 0.8, top-k 3) after one prompt from many seeds: the sequences' counts
    against the target's probabilities, by a chi-square test. The second and third come from verify passes."""
    sampling = Sampling(do_sample=True, temperature=0.8, top_k=3)
    prompt = prompts(structured, (7,))[0]
    expected = _joint_distribution(plain, prompt, sampling)
    model = load(structured, draft, structured_draft, max_batch=16)
    counts = dict.fromkeys(expected, 0)
    for seed in range(0, 1600, 16):
        batch = [prompt] * 16
        s = Sampling(True, 0.8, 3, 1.0, seed)
        out = model.generate(batch, max_new_tokens=3, ignore_eos=True, do_sample=True, temperature=s.temperature,
                             top_k=s.top_k, seed=seed, return_result=True)
        for tokens in out.tokens:
            counts[tuple(tokens)] += 1  # a sequence the target cannot make raises KeyError
    n = sum(counts.values())
    stat = sum((counts[k] - n * p) ** 2 / (n * p) for k, p in expected.items())
    p_value = torch.special.gammaincc(torch.tensor((len(expected) - 1) / 2, dtype=torch.double),
                                      torch.tensor(stat / 2, dtype=torch.double))
    assert p_value > 1e-3, (stat, len(expected))
    model.close()


@pytest.mark.slow
@pytest.mark.parametrize("draft", DRAFTS)
def test_smollm2_greedy_output_is_plain_greedy_decoding(smollm2, draft):
    """The real SmolLM2-135M-Instruct, chat prompts, with each draft (the int4 draft at the default group size:
    64 for its 576-wide inputs, 128 for the 1536-wide; the model draft is the model itself)."""
    from offload.text import Tokenizer

    tokenizer = Tokenizer.from_dir(smollm2)
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "Repeat exactly: 'The quick brown fox jumps over the lazy dog, and the dog sleeps on.'"]
    batch = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    kw = dict(max_batch=3, max_seq_len=128)
    reference = offload.load_model(smollm2, **KW | kw)
    want = reference.generate(batch, max_new_tokens=32, return_result=True)
    reference.close()
    model = load(smollm2, draft, smollm2, **kw)
    got = model.generate(batch, max_new_tokens=32, return_result=True)
    assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons
    assert got.tokens_per_pass > 1.3, got  # prompt lookup gains on the sentence to repeat, the models everywhere
    model.close()


@pytest.mark.slow
def test_smollm2_int8_copy_is_accepted_more_often_than_the_int4_copy(smollm2):
    """What the int8 copy's twice the memory buys on a real model: more of its drafts agree with the target."""
    from offload.text import Tokenizer

    tokenizer = Tokenizer.from_dir(smollm2)
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Name three prime numbers."]
    batch = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    acceptance = {}
    for copy in ("int4", "int8"):
        with load(smollm2, copy, max_batch=3, max_seq_len=128, draft_tokens=4) as model:
            acceptance[copy] = model.generate(batch, max_new_tokens=32, ignore_eos=True,
                                              return_result=True).acceptance
    assert acceptance["int8"] > acceptance["int4"] + 0.1, acceptance


def test_drafts_accepted_past_an_eos_are_not_counted(structured, plain):
    """A pass that accepts a run of drafts with the row's eos inside it keeps the tokens up to the eos: the
    accepted drafts counted are those the row kept, so they never exceed the tokens the verify passes made."""
    prompt = prompts(structured, (20,))[0]
    prompt += plain.generate([prompt], max_new_tokens=30, ignore_eos=True, return_result=True).tokens[0]
    free = plain.generate([prompt], max_new_tokens=20, ignore_eos=True, return_result=True).tokens[0]
    eos = free[1]
    assert eos not in free[:1]
    with offload.load_model(structured, **KW, draft="ngram", draft_tokens=8) as model:
        got = model.generate([prompt], max_new_tokens=20, eos_token_id=eos, return_result=True)
    assert got.tokens == [free[:2]] and got.finish_reasons == ["eos"]
    assert got.drafted_tokens > 0
    assert got.accepted_tokens == got.decode_tokens == 1  # the eos, an accepted draft (8 were accepted)



@pytest.fixture
def best_first(monkeypatch):
    """Greedy rows' trees grown best first by the draft (``OFFLOAD_BEST_FIRST_TREES=1``) for the models loaded."""
    from offload import drafts

    monkeypatch.setattr(drafts, "BEST_FIRST", True)


@pytest.mark.usefixtures("best_first")
def test_a_draft_growing_trees_keeps_the_accepted_branch_in_its_own_cache(structured, weak_draft, plain):
    """Greedy rows' trees grown best first: the draft's passes over them write the draft's cache past each
    row's context, and after each pass it keeps the branch the target accepted, moved into place, so its cache
    holds what a fresh draft's pass over the row's tokens gives, for every token it counts as seen."""
    batch = prompts(structured, (9, 14))
    model = load(structured, "tree", weak_draft, draft_tokens=8)
    got = model.generate(batch, max_new_tokens=30, ignore_eos=True, return_result=True)
    assert got.tokens == plain.generate(batch, max_new_tokens=30, ignore_eos=True, return_result=True).tokens
    draft = model.draft
    assert got.accepted_tokens < got.drafted_tokens and draft.valid
    with offload.load_model(weak_draft, **{**KW, "max_seq_len": draft.model.max_seq_len}) as fresh:
        for row, seen in draft.valid.items():
            context = list(row.request.prompt) + row.tokens
            assert len(row.request.prompt) < seen <= len(context)
            fresh.extend([context[:seen]], [0])
            for mine, want in ((draft.model.cache.k, fresh.cache.k), (draft.model.cache.v, fresh.cache.v)):
                assert torch.allclose(mine[:, row.index, :, :seen], want[:, 0, :, :seen], atol=1e-5)
    model.close()


def test_trees_grown_best_first_take_fewer_passes_than_trees_of_alternatives(structured, weak_draft, plain,
                                                                             monkeypatch):
    """The same depth and tokens a pass (four depths of four): the draft's best-first trees (greedy rows) follow
    its likeliest paths wherever they branch, where trees of alternatives branch once a depth off one chain."""
    from offload import drafts

    batch, limits = prompts(structured), [40, 23, 31, 8]
    want = plain.generate(batch, max_new_tokens=limits, ignore_eos=True, return_result=True).tokens
    passes = {}
    for best_first in (False, True):
        monkeypatch.setattr(drafts, "BEST_FIRST", best_first)
        model = load(structured, "tree", weak_draft, draft_tokens=16)
        assert model.draft.model.options.tree_width == (17 if best_first else 1)
        got = model.generate(batch, max_new_tokens=limits, ignore_eos=True, return_result=True)
        assert got.tokens == want
        passes[best_first] = got.decode_steps
        model.close()
    assert passes[True] < passes[False], passes
