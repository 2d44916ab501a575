"""Layer-major prefill: a pass brings each streamed layer in once, whatever the number of chunks."""

import pytest
import torch

import offload
from offload.models.chunks import plan_chunks

PROMPTS = [list(range(3, 23)), list(range(40, 53)), list(range(100, 107))]  # 20, 13 and 7 tokens


@pytest.fixture
def streamed(tiny):
    """The tiny model with 3 layers resident and 5 streamed from the host, chunks of at most 8 tokens."""
    kw = dict(max_batch=3, max_seq_len=64, max_step_tokens=8)
    needs = offload.plan_model(tiny, **kw).needs
    model = offload.load_model(tiny, **kw, cpu_memory="1GiB", progress=False,
                               gpu_memory=needs.fixed_bytes + 5 * needs.largest_block)
    assert model.plan.placement.count("host") == 5
    yield model
    model.close()


def count_copies(model) -> dict:
    counter = {"copies": 0}
    for ring in model.weights.rings:
        copy = ring.copies.copy

        def counted(*args, copy=copy, **kwargs):
            counter["copies"] += 1
            copy(*args, **kwargs)

        ring.copies.copy = counted
    return counter


def test_chunks_are_bounded_and_keep_each_rows_order():
    chunks = plan_chunks([20, 13, 7], 8)
    for first, stop, spans in chunks:
        assert (stop - first) * max(hi - lo for lo, hi in spans) <= 8
    taken = {b: [] for b in range(3)}
    for first, _, spans in chunks:
        for b, (lo, hi) in enumerate(spans, start=first):
            taken[b] += list(range(lo, hi))
    assert taken == {0: list(range(20)), 1: list(range(13)), 2: list(range(7))}
    assert plan_chunks([5, 0, 3], 100) == [(0, 3, [(0, 5), (0, 0), (0, 3)])]


def test_a_layer_major_pass_equals_its_chunks_run_as_passes(streamed):
    model = streamed
    chunks = plan_chunks([len(p) for p in PROMPTS], model.max_step_tokens)
    assert len(chunks) > 3
    one_pass = model.extend(PROMPTS, [0, 0, 0])
    cache = model.cache.k.clone(), model.cache.v.clone()

    model.cache.k.zero_(), model.cache.v.zero_()
    last = {}
    for first, stop, spans in chunks:  # each chunk as a pass of its own, through every layer
        tokens = [[] for _ in range(first)] + [PROMPTS[b][lo:hi] for b, (lo, hi) in enumerate(spans, first)]
        cached = [0] * first + [lo for lo, _ in spans]
        logits = model.extend(tokens, cached)
        last.update({b: logits[b] for b, (lo, hi) in enumerate(spans, first) if hi > lo})
    # every layer computed the same keys and values, to the bit
    assert torch.equal(model.cache.k, cache[0]) and torch.equal(model.cache.v, cache[1])
    # the LM head multiplies 3 rows at once in one case and 1 to 3 in the other: rounding only
    separate = torch.stack([last[b] for b in range(3)])
    torch.testing.assert_close(separate, one_pass, rtol=1e-5, atol=1e-5)
    assert torch.equal(separate.argmax(-1), one_pass.argmax(-1))


def test_each_streamed_layer_crosses_the_link_once_per_pass(streamed):
    model = streamed
    model.extend(PROMPTS, [0, 0, 0])  # the first pass also fills the rings ahead of the next one
    counter = count_copies(model)
    model.extend(PROMPTS, [0, 0, 0])
    chunks = len(plan_chunks([len(p) for p in PROMPTS], model.max_step_tokens))
    assert counter["copies"] == 5  # not 5 per chunk (that would be 5 x chunks)
    assert chunks >= 4


def test_generation_with_small_chunks_equals_one_chunk(tiny):
    """Greedy tokens do not depend on the chunk size (float32)."""
    outs = []
    for step_tokens in (5, 64):
        with offload.load_model(tiny, max_batch=3, max_seq_len=64, max_step_tokens=step_tokens,
                                progress=False) as model:
            outs.append(model.generate(PROMPTS, max_new_tokens=8, ignore_eos=True))
    assert outs[0] == outs[1]
