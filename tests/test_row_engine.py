"""The row engine: pipelined passes give the tokens a plain loop of synchronous steps gives.

The reference below runs ``model.extend`` one pass at a time and reads every token
before building the next pass, as the engine did before passes were pipelined.
"""

import random
import warnings

import pytest
import torch

import offload
from offload.batch import forecast_job
from offload.sampling import GREEDY, Sampling, sample
from offload.scheduler.row_engine import RowEngine, Request

PROMPTS = [list(range(3, 15)), list(range(40, 47)), list(range(100, 120)), [5, 9, 2]]


@pytest.fixture(scope="module")
def model(tiny):
    # float32: a row's tokens do not depend on the rows batched with it (in 16 bits on a GPU, a one-row pass
    # runs the GEMV kernel and a wider one cuBLAS, and the reference runs each request alone)
    model = offload.load_model(tiny, dtype=torch.float32, max_batch=4, max_seq_len=64, progress=False)
    yield model
    model.close()


def reference(model, requests: list[Request]) -> list[list[int]]:
    """Every request alone, one synchronous pass per token."""
    outputs = []
    for request in requests:
        generator = request.sampling.generator(model.device)
        tokens, new, cached = [], list(request.prompt), 0
        while len(tokens) < request.max_new_tokens:
            logits = model.extend([new], [cached])
            cached += len(new)
            token = sample(logits, [request.sampling], [generator]).item()
            tokens.append(token)
            if token in request.eos_ids:
                break
            new = [token]
        outputs.append(tokens)
    return outputs


def greedy_requests(new: int = 9, eos=()) -> list[Request]:
    return [Request(tuple(p), new, GREEDY, eos, key=i) for i, p in enumerate(PROMPTS)]


def test_a_decode_pass_is_launched_before_the_previous_ones_tokens_are_read(model, monkeypatch):
    order = []
    decode, extend = model.decode, model.extend
    monkeypatch.setattr(model, "decode", lambda *a: order.append("launch decode") or decode(*a))
    monkeypatch.setattr(model, "extend", lambda *a: order.append("launch extend") or extend(*a))
    engine = RowEngine(model, rows=1)
    engine.submit(Request(tuple(PROMPTS[0]), 4))
    reads = []
    while engine.busy:
        before = len(order)
        events = engine.step()
        reads.append((order[before:], [t for _, t in events]))
    # the prefill pass; then each decode pass is queued from the device ids of the pass before it, whose
    # tokens the host reads afterwards; the last token (max_new_tokens) is known in advance: no pass after it
    assert [launched for launched, _ in reads] == [["launch extend"]] + [["launch decode"]] * 3 + [[]]
    assert [len(tokens) for _, tokens in reads] == [0, 1, 1, 1, 1]


def test_pipelined_greedy_tokens_equal_synchronous_steps(model):
    requests = greedy_requests()
    rows = RowEngine(model).run(requests)
    assert [row.tokens for row in rows] == reference(model, requests)
    assert all(row.finish_reason == "length" for row in rows)


def test_a_row_stopped_by_eos_drops_its_extra_pass_and_the_others_go_on(model):
    free = reference(model, greedy_requests())
    eos = free[0][3]  # row 0's fourth token; a row that meets it earlier stops there
    requests = greedy_requests(eos=(eos,))
    expected = [tokens[: tokens.index(eos) + 1] if eos in tokens else tokens for tokens in free]
    assert len(expected[0]) <= 4 < len(max(expected, key=len))
    engine = RowEngine(model)
    rows = engine.run(requests)
    assert [row.tokens for row in rows] == expected
    assert [row.finish_reason for row in rows] == ["eos" if eos in t else "length" for t in expected]
    assert engine.stats.decode_tokens == sum(len(t) - 1 for t in expected)  # the dropped tokens are not counted


def test_rows_join_and_leave_a_running_batch(model):
    """Two rows, four requests of different lengths: each freed row takes the next request at once."""
    requests = [Request(tuple(p), n, GREEDY, key=i) for i, (p, n) in enumerate(zip(PROMPTS, (3, 11, 6, 5)))]
    engine = RowEngine(model, rows=2)
    for r in requests:
        engine.submit(r)
    finished = {}
    while engine.busy:
        for row, _ in engine.step():
            if row.finish_reason:
                finished[row.request.key] = row.tokens
    assert [finished[i] for i in range(4)] == reference(model, requests)


def test_a_row_that_ends_at_its_token_limit_is_refilled_in_the_very_next_pass(model, monkeypatch):
    """A row whose last token (by max_new_tokens) is in flight gets no more passes; a waiting request takes its row in
    the next pass (that token read first), as a batch job's forecast counts, not a pass later (the row idle meanwhile).
    The requests come longest first, as a batch job takes them."""
    requests = [Request(tuple(PROMPTS[i]), n, GREEDY, key=i) for i, n in ((2, 2), (0, 9), (1, 3), (3, 5))]
    want = reference(model, requests)
    passes = []
    decode, extend = model.decode, model.extend
    monkeypatch.setattr(model, "decode", lambda *a: passes.append("decode") or decode(*a))
    monkeypatch.setattr(model, "extend", lambda *a: passes.append("extend") or extend(*a))
    engine = RowEngine(model, rows=2)
    assert [row.tokens for row in engine.run(requests)] == want
    forecast = forecast_job([(len(r.prompt), r.max_new_tokens) for r in requests], 2, lambda tokens, keys: 1.0)
    assert len(passes) == engine.stats.steps == forecast.passes == 10


def test_a_cancelled_row_gives_no_more_tokens_and_its_row_is_reused(model):
    requests = greedy_requests(new=12)
    engine = RowEngine(model, rows=2)
    for r in requests[:3]:
        engine.submit(r)
    seen = {0: [], 1: [], 2: []}
    while engine.busy:
        for row, token in engine.step():
            seen[row.request.key].append(token)
        if len(seen[0]) == 2 and engine.rows[0] is not None:
            engine.cancel(0)  # a pass with row 0's third token is already in flight: its token is dropped
    expected = reference(model, requests[:3])
    assert seen[0] == expected[0][:2]
    assert seen[1] == expected[1] and seen[2] == expected[2]


def test_seeded_sampling_is_unchanged_by_pipelining(model):
    sampling = Sampling(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    requests = [Request(tuple(p), 8, sampling.with_seed_offset(i), key=i) for i, p in enumerate(PROMPTS)]
    assert [row.tokens for row in RowEngine(model).run(requests)] == reference(model, requests)


def test_an_engine_between_its_steps_keeps_its_rows_from_another(model, monkeypatch):
    """An engine's rows live in the KV cache across its steps: ``generate`` (a second engine) called between them
    is refused rather than overwrite them (the first engine then gave wrong tokens, no error), and runs once the
    first has finished; a generate stopped by an error keeps nobody out."""
    requests = greedy_requests(new=12)[:2]
    want = reference(model, requests)
    engine = RowEngine(model, rows=2)
    for request in requests:
        engine.submit(request)
    finished = {}
    for _ in range(3):
        finished.update({row.request.key: row.tokens for row, _ in engine.step() if row.finish_reason})
    with pytest.raises(offload.InputError, match="another RowEngine's rows are in this model's KV cache"):
        model.generate([[100, 101, 102]], max_new_tokens=4)
    while engine.busy:
        finished.update({row.request.key: row.tokens for row, _ in engine.step() if row.finish_reason})
    assert [finished[0], finished[1]] == want
    alone = model.generate([[100, 101, 102]], max_new_tokens=4)
    with monkeypatch.context() as patch:
        patch.setattr(model, "decode", lambda *a: (_ for _ in ()).throw(RuntimeError("a failed pass")))
        with pytest.raises(RuntimeError, match="a failed pass") as failed:  # (its traceback keeps its engine)
            model.generate([[100, 101, 102]], max_new_tokens=4)
    assert failed.traceback and model.generate([[100, 101, 102]], max_new_tokens=4) == alone


@pytest.mark.parametrize("request_, words", [
    (Request((1, 2), True), "max_new_tokens must be a positive integer"),
    (Request((1, 2), 3, sampling=None), "sampling must be a Sampling"),
    (Request((1, 2), 3, eos_ids=2), "eos_ids must be a tuple of token ids"),
    (Request((1, 2), 3, eos_ids=None), "eos_ids must be a tuple of token ids"),
    (Request((1, 2), 3, eos_ids=("2",)), "eos_ids must be a tuple of token ids"),
    (Request(None, 3), "token ids must be a list of integers"),
    (Request({1: "a", 2: "b"}, 3), "token ids must be a list of integers"),  # (its keys are ids: it ran, and failed)
    (Request(iter([1, 2]), 3), "token ids must be a list of integers"),
], ids=["limit-bool", "sampling-none", "eos-int", "eos-none", "eos-strings", "prompt-none", "prompt-dict",
        "prompt-iterator"])
def test_a_request_the_engine_cannot_run_is_refused_when_submitted(model, request_, words):
    engine = RowEngine(model, rows=1)
    with pytest.raises(offload.InputError, match=words):
        engine.submit(request_)
    assert not engine.busy


@pytest.fixture(scope="module")
def chunked(tiny):
    """``tiny`` with chunks of at most 3 tokens (a prompt joins in several while other rows decode) and half its
    layers streamed from the host."""
    kw = dict(dtype=torch.float32, max_batch=3, max_seq_len=40, max_step_tokens=3)
    needs = offload.plan_model(tiny, **kw).needs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", offload.OffloadWarning)
        model = offload.load_model(tiny, **kw, cpu_memory="1GiB", gpu_memory=needs.gpu_budget_streaming(4),
                                   progress=False)
    assert model.plan.placement.count("host") == 4
    yield model
    model.close()


@pytest.mark.parametrize("seed", range(3))
def test_any_schedule_gives_every_request_the_tokens_it_gets_alone(chunked, seed, one_thread):
    """Random schedules: more requests than rows (a freed row takes the next with its old keys still in the cache),
    requests submitted while others decode, prompts of one token and of several chunks, limits of one token and of
    the whole context, stop ids met at once or later, seeded sampling, cancellations. Each request's tokens are those
    of running it alone (a cancelled one's, up to where it was cancelled)."""
    rng = random.Random(seed)
    requests = []
    for key in range(7):
        prompt = tuple(rng.randrange(3, 1024) for _ in range(rng.choice([1, 2, rng.randint(3, 30)])))
        limit = rng.choice([1, 2, rng.randint(1, 40 - len(prompt)), 40 - len(prompt)])
        sampling = GREEDY if key % 2 else Sampling(do_sample=True, temperature=0.8, top_k=50, seed=key)
        requests.append(Request(prompt, limit, sampling, tuple(rng.sample(range(1024), rng.choice([0, 50]))), key))
    want = reference(chunked, requests)
    engine, waiting, got, cancelled = RowEngine(chunked, rows=rng.randint(1, 3)), list(requests), {}, set()
    while waiting or engine.busy:
        while waiting and (not engine.busy or rng.random() < 0.3):
            engine.submit(waiting.pop(0))
        for row, token in engine.step():
            got.setdefault(row.request.key, []).append(token)
        live = [row.request.key for row in engine.rows if row is not None]
        if live and rng.random() < 0.02:
            cancelled.add(key := rng.choice(live))
            engine.cancel(key)
    for request, tokens in zip(requests, want):
        seen = got.get(request.key, [])
        assert seen == (tokens[: len(seen)] if request.key in cancelled else tokens), request


def test_an_engine_of_no_rows_is_refused(model):
    for rows in (0, -1, 1.5, True):
        with pytest.raises(offload.InputError, match="rows must be a positive integer"):
            RowEngine(model, rows=rows)
