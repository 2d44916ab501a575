"""Mixtures of experts (``offload.models.moe`` and its families, ``offload.scheduler.experts``,
``offload.memory.experts``) against ``transformers`` on tiny checkpoints it wrote (CPU, float32).

Each family: logits within 1e-4 and identical greedy tokens, a ragged batch whose rows route to different
experts; experts streamed through the device cache == resident, bit for bit; a decode step copies exactly
the routed experts that were not on the device, each once; the plan's expert placement.
"""

from __future__ import annotations

import random
import re
import warnings
from collections import OrderedDict
from dataclasses import replace

import pytest
import torch
import transformers

import offload
from offload.errors import OffloadWarning, PlanError
from offload.memory.budget import Budget
from offload.memory.experts import RESIDENT, ExpertNeeds, ExpertPlan, place_experts
from offload.memory.planner import MemoryNeeds, make_plan
from offload.models.shapes import shape_config

from conftest import _ARCH, with_graphs
from test_tensor_parallel import assert_tp_equals_one

_ARCH.update({
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
})
ATOL, MAX_SEQ, PROMPT, NEW = 1e-4, 64, 12, 8
_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
MODELS = {
    "mixtral": dict(num_local_experts=6, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=80, norm_topk_prob=False, mlp_only_layers=[1]),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48, norm_topk_prob=True,
                      head_dim=16),
    "olmoe": dict(num_experts=6, num_experts_per_tok=2, clip_qkv=3.0),
}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, checkpoint_factory):
    arch = request.param
    hf, directory = checkpoint_factory(f"moe-{arch}", arch, "5.x", seed=5, **_BASE, **MODELS[arch])
    with offload.load_model(directory, dtype=torch.float32, max_seq_len=MAX_SEQ, max_batch=2, progress=False) as m:
        yield arch, hf, directory, m


def _ids(batch=2, n=14, seed=0):
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def _streamed(directory, needs, resident_experts, **kw):
    """The model with its every-pass blocks on the device, the expert cache and ``resident_experts`` more."""
    cache = min(max(needs.experts.per_layer), needs.experts.top_k * 2)
    gpu = needs.fixed_bytes + sum(needs.blocks) + (cache + resident_experts) * needs.experts.nbytes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        return offload.load_model(directory, dtype=torch.float32, max_seq_len=MAX_SEQ, max_batch=2, progress=False,
                                  gpu_memory=gpu, cpu_memory="1GiB", **kw)


def test_logits_and_greedy_tokens_match_transformers(case):
    arch, hf, _, model = case
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        greedy = hf.generate(ids[:, :PROMPT], max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert (model(ids) - ref).abs().max().item() <= ATOL
    assert torch.equal(model.generate(ids[:, :PROMPT], max_new_tokens=NEW, ignore_eos=True), greedy)


def test_a_ragged_batch_whose_rows_route_differently(case):
    _, hf, _, model = case
    ids, mask = torch.zeros(2, PROMPT, dtype=torch.long), torch.zeros(2, PROMPT, dtype=torch.long)
    ids[0], mask[0] = _ids(1, PROMPT, 3)[0], 1
    ids[1, 5:], mask[1, 5:] = _ids(1, 7, 4)[0], 1
    routed, route = [], model.decoder.route

    def noting(h, router):  # the experts each token of the packed chunk (row 0's 12, then row 1's 7) is routed to
        ids, weights = route(h, router)
        routed.append(ids.tolist())
        return ids, weights

    model.decoder.route = noting
    try:
        ours = model(ids, attention_mask=mask)
    finally:
        del model.decoder.route
    assert any({e for t in layer[:12] for e in t} != {e for t in layer[12:] for e in t} for layer in routed)
    with torch.no_grad():
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = hf(ids, attention_mask=mask, position_ids=position_ids).logits
        greedy = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() <= ATOL
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, ignore_eos=True), greedy)


def test_experts_streamed_through_the_cache_equal_resident_bitwise(case):
    arch, _, directory, model = case
    ids = _ids()
    want_logits, want_tokens = model(ids), model.generate(ids[:, :PROMPT], max_new_tokens=NEW, ignore_eos=True)
    with _streamed(directory, model.plan.needs, resident_experts=2) as streamed:
        placement = streamed.plan.experts.placement
        assert placement.count("resident") == 2 and placement.count("host") > 2 * streamed.plan.experts.cache_slots
        assert torch.equal(streamed(ids), want_logits)
        assert torch.equal(streamed.generate(ids[:, :PROMPT], max_new_tokens=NEW, ignore_eos=True), want_tokens)
        assert streamed.experts.misses > 0 and streamed.experts.hits > 0
        assert "experts: " in str(streamed.plan) and "cache" in str(streamed.plan)


def _steps(model, ids) -> list[torch.Tensor]:
    """The logits of a prompt's pass, then of decode steps and verify passes (chains of 3 tokens a row) in turn."""
    prompts = ids[:, :PROMPT].tolist()
    out, cached = [model.extend(prompts, [0, 0]).clone()], [PROMPT, PROMPT]
    for step, token in enumerate(ids[:, PROMPT:].T.tolist()):
        tokens = [[t, t + 1, t + 2] for t in token] if step % 2 else [[t] for t in token]
        wide = dict(width=4, parents=[[0, 1]] * 2) if step % 2 else {}  # as graphs run it: 4 wide, as a tree
        out.append(model.verify(tokens, cached, **wide)[:, : len(tokens[0])].clone())
        cached = [c + len(t) for c, t in zip(cached, tokens)]
    return out


def test_decode_steps_and_verify_passes_in_graph_pieces_equal_eager_bitwise(case):
    """With CUDA graphs, a routed layer's attention and routing are captured and replayed, and the host runs its
    experts between replays (here with a CPU stand-in for the capture: conftest's ``RerunCapture``): the eager
    passes' logits, bit for bit, experts fetched through the cache as eagerly."""
    _, _, directory, model = case
    ids = _ids(n=PROMPT + 6, seed=3)
    with _streamed(directory, model.plan.needs, resident_experts=2) as streamed:
        want = _steps(streamed, ids)
        misses = streamed.experts.misses
        capture = with_graphs(streamed)
        got = _steps(streamed, ids)
        for step, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"pass {step}"
        assert streamed.experts.misses > misses  # the host fetched experts between replays, as eagerly
        routed = streamed.config.sparse_layers  # a piece up to each routed layer's routing, and one after the last
        pieces = sum(sum(routed[i] for i in s) + (not routed[s[-1]]) for s in streamed.weights.segments)
        assert capture.captured == 2 * pieces  # two buckets: decode steps, and verify passes
        assert capture.replayed == 2 * capture.captured  # the other four passes


@pytest.mark.parametrize("draft", ["ngram", "tree"])
def test_speculative_decoding_with_streamed_experts_is_plain_greedy(case, draft):
    """Verify passes (chains of prompt lookup; trees of a draft model, the checkpoint itself) route every drafted
    token, fetch the union of their experts through the cache, and give plain greedy decoding's tokens."""
    _, _, directory, model = case
    ids = _ids(n=PROMPT)
    ids[1] = ids[1, :4].repeat(3)  # a prompt that repeats itself: prompt lookup finds drafts
    want = model.generate(ids, max_new_tokens=3 * NEW, ignore_eos=True, return_result=True)
    kw = dict(draft="ngram", draft_tokens=8) if draft == "ngram" else \
        dict(draft=str(directory), draft_tokens=8, draft_branches=4)
    needs = offload.plan_model(directory, dtype=torch.float32, max_seq_len=MAX_SEQ, max_batch=2, **kw).needs
    with _streamed(directory, needs, resident_experts=2, **kw) as streamed:  # the draft's bytes counted
        got = streamed.generate(ids, max_new_tokens=3 * NEW, ignore_eos=True, return_result=True)
        assert streamed.draft is not None and got.drafted_tokens > 0
        assert got.tokens == want.tokens and got.decode_steps < want.decode_steps
        assert streamed.experts.misses > 0


def record_copies(store, asks: str) -> tuple[list, list]:
    """The experts ``store`` copies in, and those it was asked for (through its method ``asks``) that were not on
    the device when asked: two lists that fill as the model runs."""
    copied, expected = [], []
    for copies in store.copies.values():
        def recording(dst, src, after, done, copy=copies.copy):
            copied.append(next(key for key, (buffer, _, _) in store.source.items()
                               if buffer.data_ptr() == src.data_ptr()))
            copy(dst, src, after, done)
        copies.copy = recording
    ask = getattr(store, asks)

    def noting(layer, needed):
        on_device = set(store.resident) | set(store.cached)
        expected.extend((layer, e) for e in needed if (layer, e) not in on_device)
        return ask(layer, needed)

    setattr(store, asks, noting)
    return copied, expected


def test_a_decode_step_copies_each_routed_expert_not_on_the_device_once(checkpoint_factory):
    _, directory = checkpoint_factory("moe-qwen3_moe", "qwen3_moe", "5.x", seed=5, **_BASE, **MODELS["qwen3_moe"])
    needs = offload.plan_model(directory, dtype=torch.float32, max_seq_len=MAX_SEQ, max_batch=2).needs
    with _streamed(directory, needs, resident_experts=1) as model:
        copied, expected = record_copies(model.experts, "fetch")
        model.extend([[5, 6, 7, 8]], [0])  # a prefill: each needed expert once for the whole pass
        for step in range(3):
            copied.clear(), expected.clear()
            model.extend([[9 + step]], [4 + step])  # one decode step
            assert copied == expected and len(set(copied)) == len(copied)


def test_padding_routes_to_no_expert(case):
    """A verify pass padded wider, or with a row that adds nothing, fetches the experts of its real tokens alone."""
    _, _, directory, model = case
    with _streamed(directory, model.plan.needs, resident_experts=0) as streamed:
        fetch = streamed.experts.fetch

        def needed(tokens, width):
            """The experts each layer of a verify pass asks for."""
            asked = []
            streamed.experts.fetch = lambda layer, experts: asked.append(list(experts)) or fetch(layer, experts)
            streamed.verify(tokens, [PROMPT] * len(tokens), width=width)
            return asked

        streamed.extend(_ids(n=PROMPT).tolist(), [0, 0])
        assert needed([[5, 6, 7], [8]], 3) == needed([[5, 6, 7], [8]], 8)
        assert needed([[5, 6, 7], []], 3) == needed([[5, 6, 7]], 3)
        assert needed([[5], []], 1) == needed([[5]], 1)  # a decode step's row that adds nothing


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_compressed_experts_streamed_equal_resident(case, fmt):
    arch, _, directory, _ = case
    if arch != "mixtral":
        pytest.skip("one family is enough for the formats")
    ids = _ids()
    with offload.load_model(directory, dtype=torch.float32, max_seq_len=MAX_SEQ, max_batch=2, progress=False,
                            quantize=fmt, group_size=32 if fmt == "int4" else None) as resident:
        want = resident(ids)
        needs = resident.plan.needs
        assert "int" in needs.weight_format
    with _streamed(directory, needs, 1, quantize=fmt, group_size=32 if fmt == "int4" else None) as streamed:
        assert streamed.plan.needs.experts.nbytes == needs.experts.nbytes < 72 * 1024  # compressed experts
        assert torch.equal(streamed(ids), want)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_saved_quantized_checkpoint_loads_as_quantizing_while_loading_does(case, fmt, tmp_path):
    """scripts/quantize.py writes every expert's parts; the saved checkpoint loads, streamed too, bit for bit as
    quantizing while loading."""
    from offload.quantized import write_quantized

    arch, _, directory, _ = case
    if arch not in ("mixtral", "qwen2_moe"):  # experts in every layer; a dense layer and a shared expert
        pytest.skip("two families are enough")
    out = write_quantized(directory, tmp_path / "q", fmt, dtype=torch.float32, progress=False)
    ids = _ids()
    kw = dict(dtype=torch.float32, max_seq_len=MAX_SEQ, max_batch=2, progress=False)
    with offload.load_model(directory, quantize=fmt, **kw) as quantizing, offload.load_model(out, **kw) as saved:
        assert saved.plan.needs.experts.nbytes == quantizing.plan.needs.experts.nbytes
        want = quantizing(ids)
        assert torch.equal(saved(ids), want)
        needs = saved.plan.needs
    with _streamed(out, needs, 1) as streamed:
        assert torch.equal(streamed(ids), want)


def test_qwen3_moe_with_a_sliding_window_attends_in_it_in_every_layer(checkpoint_factory):
    """transformers 5's Qwen3-MoE applies use_sliding_window's window to every layer (it reads no layer_types and
    no max_window_layers, which released configs carry)."""
    hf, directory = checkpoint_factory("moe-qwen3-window", "qwen3_moe", "5.x", seed=5, **_BASE,
                                       **{**MODELS["qwen3_moe"], "use_sliding_window": True, "sliding_window": 4,
                                          "max_window_layers": _BASE["num_hidden_layers"]})
    assert "max_window_layers" in (directory / "config.json").read_text()
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
    with offload.load_model(directory, dtype=torch.float32, max_seq_len=MAX_SEQ, max_batch=2, progress=False) as m:
        assert m.decoder.config.sliding_windows == (4,) * _BASE["num_hidden_layers"]
        assert (m(ids) - ref).abs().max().item() <= ATOL


def test_the_plan_places_experts_after_the_every_pass_blocks():
    needs = ExpertNeeds(nbytes=100, per_layer=(8, 0, 8), top_k=2)
    plan = place_experts(needs, gpu_room=100 * 7, room={"host": 10_000, "cuda:1": 10_000},
                         bandwidth={"host": 50e9, "cuda:1": 400e9}, max_batch=1)
    assert plan.cache_slots == 2 and plan.resident_per_layer == [3, 0, 2]  # 5 resident, dealt out in turn
    assert len(plan.placement) == 16 and plan.placement.count("resident") == 5
    assert plan.placement.count("cuda:1") > plan.placement.count("host") > 0  # by bandwidth
    assert place_experts(needs, 100 * 16, {"host": 0}, {"host": 50e9}, 1).cache_slots == 0  # all resident
    assert "cache" in place_experts(needs, 150, {"host": 10_000}, {"host": 50e9}, 1)  # not even the cache
    assert "nowhere" in place_experts(needs, 300, {"host": 500}, {"host": 50e9}, 1)


def test_experts_of_layers_stored_in_different_formats_take_their_own_bytes():
    """A GGUF file's layers keep their experts in different formats (a Q4_K_M file's 6-bit down projections in
    some layers): each expert's buffer is its layer's size, and only the cache's slots are the largest's."""
    needs = ExpertNeeds(nbytes=160, per_layer=(8, 0, 8, 8), top_k=2, sizes=(160, 0, 100, 100))
    assert needs.total_bytes == 8 * 360 and needs.each == [160] * 8 + [100] * 16
    room = 2 * 160 + 900  # the cache (2 slots of 160), then as many resident as fit, dealt out in turn
    plan = place_experts(needs, room, {"host": 10_000, "cuda:1": 10_000}, {"host": 50e9, "cuda:1": 100e9}, 1)
    assert plan.cache_slots == 2 and plan.resident_per_layer == [3, 0, 2, 2]  # 880 bytes; a 3rd in layer 2: 980
    assert plan.bytes_on("resident") == 3 * 160 + 4 * 100
    streamed = {t: plan.bytes_on(t) for t in ("host", "cuda:1")}
    assert sum(streamed.values()) == needs.total_bytes - plan.bytes_on("resident")
    assert abs(streamed["cuda:1"] / 100e9 - streamed["host"] / 50e9) <= 160 / 50e9  # the links finish together
    for layer in (0, 2, 3):  # each tier's experts spread along the layers
        tiers = plan.placement[8 * (layer - (layer > 0)):][:8]
        assert {"host", "cuda:1"} <= set(tiers), (layer, tiers)
    # the plan counts the misses in each layer's bytes
    misses = plan._misses(1)
    assert sum(plan.missed_bytes(1).values()) == pytest.approx(misses[0] * 160 + (misses[2] + misses[3]) * 100)


def test_a_tier_short_of_room_takes_what_it_holds_and_no_more():
    needs = ExpertNeeds(nbytes=160, per_layer=(8, 8), top_k=2, sizes=(160, 100))
    plan = place_experts(needs, 2 * 160, {"host": 10_000, "cuda:1": 500}, {"host": 50e9, "cuda:1": 300e9}, 1)
    assert plan.placement.count("resident") == 0 and 400 <= plan.bytes_on("cuda:1") <= 500
    assert plan.bytes_on("host") + plan.bytes_on("cuda:1") == needs.total_bytes
    exact = needs.total_bytes  # rooms that hold every byte, and one byte less
    assert place_experts(needs, 2 * 160, {"host": exact}, {"host": 50e9}, 1).bytes_on("host") == exact
    assert "nowhere" in place_experts(needs, 2 * 160, {"host": exact - 1}, {"host": 50e9}, 1)



@pytest.mark.parametrize("experts, top_k, layers, resident, slots, rows", [
    (4, 4, 3, 2, 4, 1),  # a step misses more than the cache holds: nothing survives to the next step
    (8, 2, 32, 2, 2, 1),  # mixtral-8x7b at 24 GiB
    (16, 2, 2, 4, 12, 1),  # the cache holds several steps' experts
    (16, 2, 2, 4, 12, 3),
    (64, 4, 4, 8, 16, 1),
])
def test_the_expected_misses_are_those_of_a_least_recently_used_cache(experts, top_k, layers, resident, slots, rows):
    """The plan's expected misses against a simulated cache (least recently used out) that the layers take turns
    with, under uniform routing."""
    needs = ExpertNeeds(1, (experts,) * layers, top_k)
    placement = ([RESIDENT] * resident + ["host"] * (experts - resident)) * layers
    plan = ExpertPlan(needs, placement, slots, [resident] * layers)
    rng, cache, misses, steps = random.Random(0), OrderedDict(), 0, 3000
    for step in range(steps):
        for layer in range(layers):
            used = set().union(*(rng.sample(range(experts), top_k) for _ in range(rows)))
            for e in sorted(used - set(range(resident))):
                key = (layer, e)
                if key in cache:
                    cache.move_to_end(key)
                else:
                    misses += step >= 100  # after a warm-up
                    cache[key] = None
                    if len(cache) > slots:
                        cache.popitem(last=False)
    assert sum(plan.missed_bytes(rows).values()) == pytest.approx(misses / (steps - 100), rel=0.1, abs=0.05)


def test_mixtral_8x7b_at_24_gib_keeps_every_layer_and_streams_experts():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        plan = offload.plan_model(shape_config("mixtral-8x7b"), dtype="bf16", device="cpu", gpu_memory="24GiB",
                                  cpu_memory="100GiB", max_seq_len=1024,
                                  link_bandwidth={"host": 55e9, "hbm": 4.2e12, "matmul": 7e14})
    assert plan.placement.count("resident") == 32  # attention and routers first
    assert 0 < plan.experts.placement.count("resident") < 256 and plan.experts.cache_slots == 2
    missed = plan.experts.missed_bytes(rows=1)["host"]
    assert plan.link_seconds()["host"] == pytest.approx(missed / 55e9)
    # a pass of 17 tokens (a verify pass, a batch) fetches the union of their experts: most of them
    assert plan.pass_seconds(17) == pytest.approx(plan.experts.missed_bytes(rows=17)["host"] / 55e9)
    assert plan.pass_seconds(17) > 3 * plan.pass_seconds(1)
    with pytest.raises(PlanError, match="routed experts do not fit"):
        offload.plan_model(shape_config("mixtral-8x7b"), dtype="bf16", device="cpu", gpu_memory="24GiB",
                           cpu_memory="10GiB", max_seq_len=1024, link_bandwidth={"host": 55e9, "hbm": 4.2e12})



def test_the_plan_names_the_routed_experts_format_beside_the_layers():
    """An expert's width may not take the layers' group size: the plan says what each got."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        plan = offload.plan_model(shape_config("qwen3-30b-a3b") | {"moe_intermediate_size": 40, "num_hidden_layers": 2},
                                  dtype="bf16", device="cpu", gpu_memory="1GiB", cpu_memory="10GiB", quantize="int4",
                                  link_bandwidth={"host": 55e9, "hbm": 4.2e12, "matmul": 7e14})
    line = next(line for line in str(plan).splitlines() if "layer weights:" in line)
    assert line.startswith("  layer weights: int4, group size 128: ")
    assert line.endswith("; routed experts: int4, group size 128 for w_gate_up; 8 for w_down (128 does not divide "
                         "40), 165.00 KiB each; LM head int8, one scale per output channel")

@pytest.mark.slow
def test_tensor_parallel_on_two_ranks_equals_one(checkpoint_factory):
    _, directory = checkpoint_factory("moe-mixtral", "mixtral", "5.x", seed=5, **_BASE, **MODELS["mixtral"])
    assert_tp_equals_one(directory, _ids(2, PROMPT, 7), ATOL, MAX_SEQ)


def test_the_cli_prints_the_expert_hit_rate(checkpoint_factory, capsys):
    from offload.cli import main

    _, directory = checkpoint_factory("moe-qwen3_moe", "qwen3_moe", "5.x", seed=5, **_BASE, **MODELS["qwen3_moe"])
    needs = offload.plan_model(directory, dtype=torch.float32, max_seq_len=MAX_SEQ, max_batch=1).needs
    gpu = needs.fixed_bytes + sum(needs.blocks) + (needs.experts.top_k + 2) * needs.experts.nbytes  # 2 resident
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        assert main(["--model", str(directory), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6", "--dtype",
                     "fp32", "--gpu-memory", str(gpu), "--cpu-memory", "1GiB", "--max-seq-len", str(MAX_SEQ),
                     "--max-batch", "1"]) == 0
    found = re.search(r"experts: ([\d.]+)% on the device when needed \(([\d,]+) hits, ([\d,]+) copied in\)",
                      capsys.readouterr().out)
    assert found, "no hit rate printed"
    hits, misses = int(found[2].replace(",", "")), int(found[3].replace(",", ""))
    assert misses > 0 and float(found[1]) == pytest.approx(100 * hits / (hits + misses), abs=0.05)


def test_the_servers_engine_counts_expert_hits_for_metrics(checkpoint_factory):
    import threading

    from offload.scheduler.row_engine import Request
    from offload.serve import EngineLoop

    _, directory = checkpoint_factory("moe-qwen3_moe", "qwen3_moe", "5.x", seed=5, **_BASE, **MODELS["qwen3_moe"])
    needs = offload.plan_model(directory, dtype=torch.float32, max_seq_len=MAX_SEQ, max_batch=2).needs
    with _streamed(directory, needs, resident_experts=1) as model:
        loop, done = EngineLoop(model, rows=2), threading.Event()
        loop.start()
        try:
            loop.submit(Request((5, 6, 7, 8), 6, key="a"), lambda token, reason: reason and done.set())
            assert done.wait(60)
        finally:
            loop.stop()
        assert loop.metrics.expert_misses == model.experts.misses > 0
        assert loop.metrics.expert_hits == model.experts.hits
        assert 'offload_expert_lookups_total{result="miss"}' in loop.metrics.render()


def _every_layer_resident(directory, **kw):
    """Every layer's block (so every router) on the device, the experts streamed through the cache."""
    needs = offload.plan_model(directory, dtype=torch.float32, max_seq_len=MAX_SEQ, max_batch=2).needs
    cache = min(max(needs.experts.per_layer), needs.experts.top_k * 2)
    gpu = needs.fixed_bytes + sum(needs.blocks) + 2 * needs.largest_block + cache * needs.experts.nbytes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        return offload.load_model(directory, dtype=torch.float32, max_seq_len=MAX_SEQ, max_batch=2, progress=False,
                                  gpu_memory=gpu, cpu_memory="1GiB", **kw)


def test_prefetched_experts_change_nothing_and_are_used(case):
    """prefetch_experts: each routed layer guesses the next one's experts and copies them ahead. The tokens and
    logits are those without it, bit for bit; guesses that were right are used, so fewer experts are copied
    in on demand."""
    _, _, directory, model = case
    if sum(1 for n in model.plan.needs.experts.per_layer if n) < 2:
        pytest.skip("one routed layer: no next one to guess for")
    ids = _ids(n=PROMPT)
    runs = {}
    for prefetch in (False, True):
        with _every_layer_resident(directory, prefetch_experts=prefetch) as streamed:
            assert set(streamed.plan.layer_map()) == {"R"} and bool(streamed.experts.ahead) == prefetch
            result = streamed.generate(ids, max_new_tokens=NEW, ignore_eos=True, return_result=True)
            runs[prefetch] = result, streamed(ids), streamed.experts.misses, streamed.experts.prefetch_used
            summary = streamed.experts.summary()
    (plain, plain_logits, plain_misses, _), (guessed, logits, misses, used) = runs[False], runs[True]
    assert guessed.tokens == plain.tokens and torch.equal(logits, plain_logits)
    assert used > 0 and misses < plain_misses
    assert "prefetched" in summary


def test_prefetching_in_graph_pieces_equals_eager_bitwise(case):
    """The guess is part of a piece's capture (the routing's buffers hold it); the passes' logits are the eager
    ones, bit for bit, and the guesses are used between replays too."""
    _, _, directory, model = case
    if sum(1 for n in model.plan.needs.experts.per_layer if n) < 2:
        pytest.skip("one routed layer: no next one to guess for")
    ids = _ids(n=PROMPT + 6, seed=3)
    with _every_layer_resident(directory, prefetch_experts=True) as streamed:
        want = _steps(streamed, ids)
        used = streamed.experts.prefetch_used
        with_graphs(streamed)
        got = _steps(streamed, ids)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert streamed.experts.prefetch_used > used


@pytest.mark.parametrize("field", ["moe_intermediate_size", "shared_expert_intermediate_size"])
def test_expert_widths_that_tp_cannot_split_are_refused(field):
    """The experts are split as the dense MLP is: a width tp does not divide is refused (it used to run with the
    wrong shards and different tokens)."""
    from offload.models.config import config_from_dict
    from offload.models.parallel import check_divisible

    raw = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", **_BASE, **MODELS["qwen2_moe"],
           field: 47}
    check_divisible(config_from_dict({**raw, field: 48}), 2)
    with pytest.raises(offload.ConfigError, match=f"{field}=47 is not divisible by tp=2"):
        check_divisible(config_from_dict(raw), 2)


def test_a_streaming_budget_holds_the_expert_cache():
    """``gpu_budget_streaming(0)`` of a mixture of experts: every layer and every expert streams, through the
    ring's slots and the expert cache (three layers: two would fit where their two slots do)."""
    shape = shape_config("qwen3-30b-a3b") | {"num_hidden_layers": 3}
    kw = dict(dtype=torch.float32, max_seq_len=64, max_batch=2, cpu_memory="64GiB")
    needs = offload.plan_model(shape, **kw).needs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        plan = offload.plan_model(shape, gpu_memory=needs.gpu_budget_streaming(0), **kw)
    assert set(plan.layer_map()) == {"H"} and set(plan.experts.placement) == {"host"}
    assert plan.experts.cache_slots == needs.experts.cache_slots(2)


def test_every_layer_stays_where_they_fit_beside_the_expert_cache():
    """A mixture of experts whose first layer is dense (``mlp_only_layers``, the largest block): a budget that holds
    every layer and the expert cache, not every expert, keeps every layer resident and streams experts only. The
    ring's two slots of the largest layer were reserved first: a PlanError, though nothing had to stream."""
    shape = shape_config("qwen3-30b-a3b") | {"num_hidden_layers": 2, "mlp_only_layers": [0],
                                             "tie_word_embeddings": True}  # no embedding to leave the device
    kw = dict(dtype=torch.float32, max_seq_len=64, max_batch=2, cpu_memory="64GiB")
    needs = offload.plan_model(shape, **kw).needs
    assert sum(needs.blocks) < 2 * needs.largest_block
    cache = needs.experts.cache_slots(2) * needs.experts.nbytes
    budget = needs.fixed_bytes + sum(needs.blocks) + needs.embedding_bytes + cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        plan = offload.plan_model(shape, gpu_memory=budget, **kw)
    assert set(plan.layer_map()) == {"R"} and plan.slots == {}
    assert "host" in set(plan.experts.placement) and plan.gpu_bytes <= budget


def test_experts_that_do_not_fit_beside_every_layer_take_the_room_a_ring_of_smaller_layers_leaves():
    """Every layer (a dense 300 B one, five of 100 B) fits beside the expert cache, but the experts, read where
    they live (host only), do not fit beside them: every layer resident leaves them 320 B of the GPU, and the host
    takes 50 B of the other 80 B. Three 100 B layers streamed from the peer through two slots of 100 B leave them
    420 B, every expert resident: the plan streams those layers (within the budget), where it raised a PlanError.
    With 100 B less neither fits, and the experts' error is the one raised."""
    experts = ExpertNeeds(nbytes=10, per_layer=(0, 8, 8, 8, 8, 8), top_k=2, direct=True, host_only=True)
    needs = MemoryNeeds(blocks=(300,) + (100,) * 5, global_bytes=40, kv_bytes=30, activation_bytes=20,
                        workspace_bytes=10, experts=experts)
    bandwidth = {"host": 50e9, "hbm": 4000e9, "cuda:1": 400e9}
    budget = Budget(needs.fixed_bytes + sum(needs.blocks) + 20 + 300, 50, {"cuda:1": 10_000})  # 20: the cache
    plan = make_plan(needs, budget, bandwidth, "cuda:0")
    assert plan.placement.count("cuda:1") == 3 and plan.slots == {"cuda:1": 2} and plan.slot_bytes("cuda:1") == 100
    assert plan.experts.placement.count(RESIDENT) == 40 and plan.gpu_bytes <= budget.gpu_memory
    with pytest.raises(PlanError, match="routed experts do not fit"):
        make_plan(needs, replace(budget, gpu_memory=budget.gpu_memory - 100), bandwidth, "cuda:0")


def test_where_experts_fit_either_way_the_faster_plan_is_kept():
    """Every layer (a dense 300 B one, five of 100 B) resident leaves the experts (read where they live: the GPU
    or the host) 320 B of the GPU: 30 of 40 resident (six a layer), 10 read from a slow host. Three 100 B layers
    from a fast peer through two slots leave them 420 B: every expert resident, predicted faster, so kept. With a
    slow peer, every layer stays resident."""
    experts = ExpertNeeds(nbytes=10, per_layer=(0, 8, 8, 8, 8, 8), top_k=2, direct=True, host_only=True)
    needs = MemoryNeeds(blocks=(300,) + (100,) * 5, global_bytes=40, kv_bytes=30, activation_bytes=20,
                        workspace_bytes=10, experts=experts)
    budget = Budget(needs.fixed_bytes + sum(needs.blocks) + 20 + 300, 250, {"cuda:1": 10_000})  # 20: the cache
    fast_peer = make_plan(needs, budget, {"host": 1e6, "hbm": 4000e9, "cuda:1": 400e9}, "cuda:0")
    assert fast_peer.placement.count("cuda:1") == 3 and fast_peer.experts.placement.count(RESIDENT) == 40
    assert fast_peer.gpu_bytes <= budget.gpu_memory
    slow_peer = make_plan(needs, budget, {"host": 1e6, "hbm": 4000e9, "cuda:1": 1e3}, "cuda:0")
    assert set(slow_peer.layer_map()) == {"R"} and slow_peer.experts.placement.count(RESIDENT) == 30
    assert fast_peer.predicted_step_seconds < slow_peer.predicted_step_seconds
