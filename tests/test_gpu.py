"""GPU-only tests: numerics against transformers, CUDA-graph decode against eager decode, budgets kept,
offloaded == resident bit for bit.

Skipped without CUDA. Run on a GPU machine with ``pytest -m gpu -s`` (``-s`` shows what the tests print).
"""

import gc
import warnings

import pytest
import torch
from torch.nn.attention import sdpa_kernel

import offload
from offload.distributed import TensorParallel
from offload.models.blocks import checkpoint_sources
from offload.models.decoder import ATTENTION_BACKENDS
from offload.models.shapes import shape_config
from offload.speculative import Proposal
from offload.synthetic import RandomSource

from conftest import graph_pool_bytes

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
SEED = 1234
SHORT_7B = shape_config("llama-2-7b") | {"num_hidden_layers": 4}


def caching_host_allocator_bytes() -> int:
    """Pinned bytes held by PyTorch's own pinned allocator (the pool must not use it)."""
    stats = torch.cuda.host_memory_stats()
    return stats.get("allocated_bytes.current", stats.get("reserved_bytes.current", 0))


def free_gpu():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def load(shape, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return offload.load_model(shape, random_weights=SEED, progress=False, **kw)


def hf_model_with_random_weights(shape: str, dtype, device="cuda"):
    """The transformers model of a named shape holding exactly the weights ``random_weights=SEED`` gives."""
    transformers = pytest.importorskip("transformers")
    raw = shape_config(shape)
    config = offload.models.config.config_from_dict(raw)
    hf_config = transformers.AutoConfig.for_model(raw["model_type"], **{
        k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    source, tp = RandomSource(seed=SEED, device=device), TensorParallel()
    specs = checkpoint_sources(config, tp, dtype)
    state = {name: source.full_tensor(spec, name, dtype, device=device) for spec, name in specs}
    hf.load_state_dict(state, strict=True, assign=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config).to(device)  # its buffers were made on meta
    return hf.eval()


def trace(model, prompts: list[list[int]], steps: int = 12) -> list[torch.Tensor]:
    """The logits of a prefill and of decode steps in which a row joins and a row sits one step out.

    Every model is fed the same tokens (not its own choices), so a near tie that one model
    breaks the other way cannot change the inputs of the steps after it.
    """
    feed = torch.randint(3, 1000, (steps, len(prompts) + 1), generator=torch.Generator().manual_seed(9)).tolist()
    out = [model.extend(prompts, [0] * len(prompts)).clone()]
    cached = [len(p) for p in prompts]
    for s in range(steps):
        if s == steps // 2:  # a new row joins the running batch
            cached = cached + [0]
        rows = [[t] for t in feed[s][: len(cached)]]
        if s == steps // 2 + 2:
            rows[0] = []  # a row with nothing to add this step
        out.append(model.extend(rows, cached).clone())
        cached = [c + len(r) for c, r in zip(cached, rows)]
    return out


def prompts_7b(lengths=(40, 17, 29)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 32000, (n,), generator=gen).tolist() for n in lengths]


@cuda
def test_llama_2_7b_matches_transformers():
    """float32: the same greedy tokens as transformers for 16 steps (through the decode graphs);
    bfloat16: logits close to transformers' (fused projections and kernels round differently)."""
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889]], device="cuda")
    gen = transformers.GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    for dtype in (torch.float32, torch.bfloat16):
        hf = hf_model_with_random_weights("llama-2-7b", dtype)
        with torch.no_grad(), sdpa_kernel(ATTENTION_BACKENDS):
            expected_tokens = hf.generate(ids, generation_config=gen)
            expected_logits = hf(ids).logits.float()
        del hf
        free_gpu()
        model = load(shape_config("llama-2-7b"), dtype=dtype, max_seq_len=64)
        logits = model(ids).float()
        scale = expected_logits.abs().max().item()
        print(f"\n{dtype}: max |logit difference| {(logits - expected_logits).abs().max().item():.3g} "
              f"(largest logit {scale:.3g})")
        if dtype == torch.float32:
            assert model.generate(ids, max_new_tokens=16, ignore_eos=True).tolist() == expected_tokens.tolist()
            assert (logits - expected_logits).abs().max().item() <= 1e-3 * scale
        else:
            assert (logits - expected_logits).abs().max().item() <= 0.05 * scale
        model.close()
        del model
        free_gpu()


@cuda
def test_graph_decode_equals_eager_decode_bitwise():
    """Without compile, a replayed graph runs the eager step's kernels: the same bits, rows joining and leaving."""
    prompts = prompts_7b((40, 17))  # 2 rows, then 3: two buckets of rows
    kw = dict(dtype=torch.bfloat16, max_batch=4, max_seq_len=256)
    eager = load(SHORT_7B, **kw, cuda_graphs=False)
    want = trace(eager, prompts)
    eager.close()
    del eager
    free_gpu()
    graphs = load(SHORT_7B, **kw)
    got = trace(graphs, prompts)
    assert len({rows for rows, _, _ in graphs.graphs.buckets}) >= 2  # more than one bucket of rows was captured
    for step, (a, b) in enumerate(zip(want, got)):
        assert torch.equal(a, b), f"step {step}"
    graphs.close()


def verify_trace(model, prompts: list[list[int]], tree: bool, width=None, steps: int = 6) -> list[torch.Tensor]:
    """The logits of a prefill and of verify passes adding a chain (or one of two trees, in turn) of 5, 2 and 6
    tokens to the rows, one pass after another: each row's real tokens only."""
    gen = torch.Generator().manual_seed(9)
    trees = [[[0, 0, 1, 2], [0], [0, 1, 1, 3, 3]], [[0, 1, 1, 0], [0], [0, 0, 0, 2, 1]]]  # in turn
    out = [model.extend(prompts, [0] * len(prompts)).clone()]
    cached = [len(p) for p in prompts]
    for step in range(steps):
        parents = trees[step % 2] if tree else [[0, 1, 2, 3], [0], [0, 1, 2, 3, 4]]
        tokens = [torch.randint(3, 1000, (len(p) + 1,), generator=gen).tolist() for p in parents]
        logits = model.verify(tokens, cached, width=width, parents=parents if tree or width else None)
        out += [logits[b, : len(t)].clone() for b, t in enumerate(tokens)]
        cached = [c + len(t) for c, t in zip(cached, tokens)]
    return out


@cuda
@pytest.mark.parametrize("tree", [False, True])
def test_graph_verify_passes_equal_eager_passes_bitwise(tree):
    """A verify pass replayed from CUDA graphs (padded to a width of 8, laid out as a tree) runs the eager pass's
    kernels: the same bits, with three of the four layers streamed from the host."""
    prompts = prompts_7b((40, 17, 110))  # the third row's keys pass 128 in its fourth pass
    kw = dict(dtype=torch.bfloat16, max_batch=4, max_seq_len=256, cpu_memory="8GiB")
    kw["gpu_memory"] = offload.plan_model(SHORT_7B, **kw).needs.gpu_budget_streaming(1)
    eager = load(SHORT_7B, **kw, cuda_graphs=False)
    assert eager.plan.host_bytes > 0
    want = verify_trace(eager, prompts, tree, width=8)
    eager.close()
    del eager
    free_gpu()
    graphs = load(SHORT_7B, **kw)
    got = verify_trace(graphs, prompts, tree)
    assert sorted(graphs.graphs.buckets) == [(4, 8, 128), (4, 8, 256)]  # 6 tokens a row at most, padded
    for step, (a, b) in enumerate(zip(want, got)):
        assert torch.equal(a, b), f"pass {step}"
    graphs.close()


@cuda
@pytest.mark.parametrize("resident, slots", [(0, 2), (1, 2), (0, 3)])
def test_a_whole_pass_in_one_graph_equals_eager_passes_bitwise(monkeypatch, resident, slots):
    """``graphs.WHOLE_PASS``: layers streamed through a ring of slots, a pass captured as one graph with the copies
    it issues (blocks past the slots': 4 streamed through 2 or 3, or 3 through 2 beside a resident one): decode steps
    (a row joining, a row sitting one out) and verify passes give the eager passes' bits."""
    from offload.scheduler import graphs as graph_module

    prompts = prompts_7b((40, 17, 29))
    kw = dict(dtype=torch.bfloat16, max_batch=4, max_seq_len=256, cpu_memory="8GiB", slots=slots)
    kw["gpu_memory"] = offload.plan_model(SHORT_7B, **kw).needs.gpu_budget_streaming(resident, slots=slots)
    eager = load(SHORT_7B, **kw, cuda_graphs=False)
    want = trace(eager, prompts) + verify_trace(eager, prompts, tree=False, width=8)
    eager.close()
    del eager
    free_gpu()
    monkeypatch.setattr(graph_module, "WHOLE_PASS", True)
    whole = load(SHORT_7B, **kw)
    assert whole.graphs.whole and [(len(r.blocks), len(r.slots)) for r in whole.weights.rings] == [(4 - resident,
                                                                                                     slots)]
    got = trace(whole, prompts) + verify_trace(whole, prompts, tree=False)
    assert all(len(bucket.graphs[0]) == len(bucket.graphs) == 1 for bucket in whole.graphs.buckets.values())
    assert whole.graphs.captures >= 2  # decode steps' and verify passes' buckets, each replayed after its first
    for step, (a, b) in enumerate(zip(want, got, strict=True)):
        assert torch.equal(a, b), f"pass {step}"
    whole.close()


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_greedy_chain_in_graphs_drafts_what_eager_steps_draft(structured, structured_draft, dtype):
    """A draft model's greedy chain replayed as one graph a step (``scheduler.greedy_chain``: the embedding, the
    layers, the LM head, the argmax and the likeliest tokens captured together) runs the kernels of its eager
    decode steps: the same tokens and alternatives, pass after pass, for ragged budgets, a row that drafts nothing
    and a run accepted whole, with the caches rolled back to what a target accepted."""
    from offload.scheduler.row_engine import Request, Row

    def load(graphs: bool):
        return offload.load_model(structured, dtype=dtype, max_batch=2, max_seq_len=64, draft=str(structured_draft),
                                  cuda_graphs=graphs, progress=False)

    graphs, eager = load(True), load(False)
    assert graphs.draft._chain() is not None and eager.draft._chain() is None
    rows = [Row(Request((3, 17, 40, 2, 9), 64), 0, None, tokens=[11]), Row(Request((8, 8, 1), 64), 1, None)]
    outcomes = [(2, 5), (0, 8), (4, 1), (8, 2), (1, 4)]  # the fourth accepts every draft: two unseen tokens
    for (accepted, correction), budgets in zip(outcomes, [[5, 3], [4, 0], [6, 6], [8, 2], [3, 3]]):
        got, want = graphs.draft.propose(rows, budgets), eager.draft.propose(rows, budgets)
        assert got.tokens == want.tokens and got.alternatives == want.alternatives
        taken = [min(accepted, b) for b in budgets]
        for model in (graphs, eager):
            model.draft.update(rows, taken)
        for r, n in zip(rows, taken):
            r.tokens += got.tokens[r.index][:n] + [correction]
    assert graphs.draft._chain().graphs  # the chains ran as replayed graphs
    graphs.close()
    eager.close()


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drafting_ahead_on_a_side_stream_gives_the_passes_of_drafting_after_each_verdict(structured,
                                                                                         structured_draft, dtype,
                                                                                         monkeypatch):
    """On a GPU, the next pass's chains drafted on a side stream while the target's verify pass runs
    (``drafts.LOOK_AHEAD``) serve the passes whose verdicts they guessed: in float32, greedy output is plain greedy
    decoding's and the same drafts were tried and accepted as with drafting after each verdict (bfloat16 rows may
    round a near tie the other way: printed)."""
    from offload import drafts

    # never paused: how deep the side stream drafts follows the passes' times (a tiny model's verify pass in float32,
    # queued faster than its draft's steps run, left room for none), which is not what this test holds
    monkeypatch.setattr(drafts, "paced_steps", lambda steps, ahead_ms, pass_ms: drafts.AHEAD_FIRST)
    prompts, limits = [[3, 17, 40, 2, 9], [8, 8, 1], [5, 6]], [40, 23, 31]
    kw = dict(dtype=dtype, max_batch=3, max_seq_len=80, progress=False)
    plain = offload.load_model(structured, **kw)
    want = plain.generate(prompts, max_new_tokens=limits, ignore_eos=True)
    plain.close()
    results = {}
    for spare in (3, 1, 0):
        monkeypatch.setattr(drafts, "LOOK_AHEAD", spare)
        model = offload.load_model(structured, **kw, draft=str(structured_draft), draft_tokens=4, draft_branches=1)
        got = model.generate(prompts, max_new_tokens=limits, ignore_eos=True, return_result=True)
        results[spare] = got, list(model.draft.guessed)
        model.close()
    after, unguessed = results[0]
    assert unguessed == [0, 0]
    assert [p + t for p, t in zip(prompts, after.tokens)] == want or dtype != torch.float32
    for spare in (3, 1):
        ahead, guessed = results[spare]
        print(f"{dtype}, {spare} spare rows: drafted ahead for {guessed[0]} of {guessed[1]} passes; tried "
              f"{ahead.drafted_tokens} drafts (without: {after.drafted_tokens}), accepted {ahead.accepted_tokens} "
              f"({after.accepted_tokens})")
        assert guessed[0] > 0
        if dtype == torch.float32:  # a chain moved into place before drafting ahead from it (streams ordered)
            assert [p + t for p, t in zip(prompts, ahead.tokens)] == want
            assert (ahead.drafted_tokens, ahead.accepted_tokens) == (after.drafted_tokens, after.accepted_tokens)


@cuda
def test_speculative_decoding_with_graphs_stays_in_budget():
    """Verify passes of 17 tokens a row (padded to 32) in CUDA graphs, in several buckets of rows and key lengths:
    their pool is planned. Also printed: the GPU memory the process took in all (graphs' own memory included,
    which no allocator counts). Every row drafts 16 tokens a pass: random weights continue no prompt, so prompt
    lookup itself would find next to nothing, and a pass with nothing drafted is a decode step."""
    free_gpu()
    base, free_before = torch.cuda.memory_allocated(), torch.cuda.mem_get_info()[0]
    torch.cuda.reset_peak_memory_stats()
    budget = 5 * 2**30
    model = load(shape_config("llama-2-7b"), dtype=torch.bfloat16, gpu_memory=budget, cpu_memory=12 * 2**30,
                 max_batch=4, max_seq_len=1024, draft="ngram", draft_tokens=16)
    loop = list(range(100, 140)) * 20
    model.draft.propose = lambda rows, budgets, nodes=None: Proposal(
        [loop[: min(k, 16)] if row is not None else [] for row, k in zip(rows, budgets)])
    result = model.generate([loop[:200], loop[5:180], loop[:600], loop[7:150]], max_new_tokens=48, ignore_eos=True,
                            return_result=True)
    model.generate([loop[:300]], max_new_tokens=24, ignore_eos=True)  # one row: a bucket of rows of its own
    torch.cuda.synchronize()
    peak, pool = torch.cuda.max_memory_allocated() - base, graph_pool_bytes(model)
    taken = free_before - torch.cuda.mem_get_info()[0]
    buckets = sorted(model.graphs.buckets)
    print(f"\nngram draft, {len(buckets)} buckets {buckets}: peak allocated {peak / 2**30:.3f} GiB + graph pool "
          f"{pool / 2**20:.0f} MiB (planned {model.plan.needs.graph_bytes / 2**20:.0f} MiB); the process took "
          f"{taken / 2**30:.3f} GiB of the GPU in all; {result.tokens_per_pass:.2f} tokens a pass")
    assert 32 in {width for _, width, _ in buckets}  # 17 tokens a row (fewer near a row's end)
    assert peak + pool <= budget
    assert pool <= model.plan.needs.graph_bytes
    model.close()


@cuda
def test_graphs_captured_by_step_serve_the_engine_and_back():
    """A bucket captured by ``model.step`` (inside inference mode) is replayed by the row engine's pipelined
    passes (launched from the engine), and the other way round, with the same tokens."""
    prompt = list(range(3, 40))
    model = load(shape_config("tiny"), dtype=torch.float32, max_batch=2, max_seq_len=128)
    logits = model.extend([prompt], [0])
    tokens = [int(logits.argmax())]
    for i in range(6):  # captures the decode buckets
        tokens.append(int(model.extend([[tokens[-1]]], [len(prompt) + i]).argmax()))
    for _ in range(2):
        assert model.generate([prompt], max_new_tokens=7, ignore_eos=True)[0][len(prompt):] == tokens
    model.close()


@cuda
def test_grouped_query_attention_in_graphs_equals_eager():
    """Grouped kv heads fold into the query length under a mask; the GPU kernel's output layout differs."""
    shape = shape_config("tiny")  # 4 query heads share 2 kv heads
    prompts = [list(range(3, 40)), list(range(50, 61))]
    traces = {}
    for graphs in (False, True):
        model = load(shape, dtype=torch.bfloat16, max_batch=4, max_seq_len=128, cuda_graphs=graphs, compile=False)
        traces[graphs] = trace(model, prompts)
        model.close()
    for step, (a, b) in enumerate(zip(traces[False], traces[True])):
        assert torch.equal(a, b), f"step {step}"


@cuda
def test_compiled_graph_decode_matches_eager():
    """Compiled layers fuse their elementwise kernels and round differently: bfloat16 logits within 5% of the
    largest logit of the eager step's (about 2% measured on an H200), float32 within 1e-5 and the same greedy tokens."""
    prompts = prompts_7b()
    for dtype in (torch.bfloat16, torch.float32):
        traces = {}
        for graphs in (False, True):
            model = load(SHORT_7B, dtype=dtype, max_batch=4, max_seq_len=256, cuda_graphs=graphs, compile=graphs)
            traces[graphs] = trace(model, prompts)
            model.close()
            del model
            free_gpu()
        worst = max(((a.float() - b.float()).abs().max() / a.float().abs().max()).item()
                    for a, b in zip(traces[False], traces[True]))
        print(f"\n{dtype}: compiled graphs vs eager: largest difference {worst:.2g} of the largest logit")
        assert worst <= (0.05 if dtype == torch.bfloat16 else 1e-5)
        if dtype == torch.float32:
            for a, b in zip(traces[False], traces[True]):
                assert torch.equal(a.argmax(-1), b.argmax(-1))


def _logits_and_tokens(model, ids):
    logits = model(ids)
    tokens = model.generate(ids, max_new_tokens=8, ignore_eos=True)
    return logits, tokens, trace(model, ids.tolist())


@cuda
def test_offloaded_equals_resident_bitwise_on_gpu():
    """With decode graphs on (the default), streamed layers compute what resident ones do."""
    ids = torch.randint(0, 32000, (2, 30), generator=torch.Generator().manual_seed(0))
    shape = shape_config("llama-2-7b") | {"num_hidden_layers": 6}
    kw = dict(dtype=torch.bfloat16, max_batch=3, max_seq_len=64)
    resident = load(shape, **kw)
    assert set(resident.plan.placement) == {"resident"}
    want = _logits_and_tokens(resident, ids)
    needs = resident.plan.needs
    resident.close()
    del resident
    free_gpu()
    for n_resident in (3, 1, 0):
        budget = needs.fixed_bytes + (n_resident + 2) * needs.largest_block
        model = load(shape, gpu_memory=budget, cpu_memory="8GiB", **kw)
        assert model.plan.placement.count("resident") == n_resident
        logits, tokens, steps = _logits_and_tokens(model, ids)
        assert torch.equal(logits, want[0])
        assert torch.equal(tokens, want[1])
        assert all(torch.equal(a, b) for a, b in zip(steps, want[2]))
        model.close()
        del model
        free_gpu()


@cuda
@pytest.mark.parametrize("quantize, streamed", [(None, False), ("int4", False), ("int8", False), (None, True),
                                                ("int4", True)])
def test_dependent_launches_equal_ordinary_ones_bitwise(monkeypatch, quantize, streamed):
    """Kernels launched as dependents of the one before them (``kernels.PDL``: each waits for its inputs itself; at
    level 2 after asking L2 for its first weights) compute what ordinarily launched ones do, in CUDA graphs and
    eagerly (one row, then two), resident and with layers streamed from the host."""
    from offload.models import kernels
    if torch.cuda.get_device_capability()[0] < 9 or kernels.gdc_wait is None:
        pytest.skip("dependent launches need compute capability 9 and Triton's grid dependency control")
    prompts = prompts_7b((40,))
    kw = dict(dtype=torch.bfloat16, max_batch=2, max_seq_len=128, quantize=quantize)
    if streamed:  # one layer resident, three streamed
        probe = load(SHORT_7B, **kw)
        needs = probe.plan.needs
        probe.close()
        del probe
        free_gpu()
        kw |= dict(gpu_memory=needs.fixed_bytes + 3 * needs.largest_block, cpu_memory="8GiB")
    runs = {}
    for pdl, graphs in ((0, True), (1, True), (2, True), (2, False)):
        monkeypatch.setattr(kernels, "PDL", pdl)
        model = load(SHORT_7B, **kw, cuda_graphs=graphs)
        assert ("host" in model.plan.placement) == streamed
        assert kernels.dependent_launch(torch.device("cuda"))["PDL"] == pdl
        runs[pdl, graphs] = trace(model, prompts)
        model.close()
        del model
        free_gpu()
    want = runs[0, True]
    for key, got in runs.items():
        for step, (a, b) in enumerate(zip(want, got)):
            assert torch.equal(a, b), f"{key}, step {step}"


@cuda
@pytest.mark.parametrize("graphs", [True, False])  # graph pieces (the default), and eager steps
def test_experts_streamed_on_cuda_equal_resident_bitwise_within_budget(graphs):
    """A mixture of experts on the GPU: experts copied from pinned host memory into the device's expert cache on
    the copy stream compute what resident experts do, bit for bit, and the peak (with the graphs' pool, where
    the layers are captured as pieces) stays inside the budget."""
    shape = shape_config("qwen3-30b-a3b") | {"num_hidden_layers": 3}
    ids = torch.randint(0, 151936, (2, 30), generator=torch.Generator().manual_seed(3))
    kw = dict(dtype=torch.bfloat16, max_batch=3, max_seq_len=64)
    with load(shape, **kw) as resident:
        assert set(resident.plan.block_tiers) == {"resident"}
        want = _logits_and_tokens(resident, ids)
        needs = resident.plan.needs
    free_gpu()
    experts = needs.experts
    budget = needs.fixed_bytes + sum(needs.blocks) + (2 * experts.top_k + 24) * experts.nbytes
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with load(shape, gpu_memory=budget, cpu_memory="8GiB", cuda_graphs=graphs, **kw) as model:
        placement = model.plan.experts.placement
        assert placement.count("host") > placement.count("resident") > 0
        assert (model.graphs is not None) == graphs
        logits, tokens, steps = _logits_and_tokens(model, ids)
        torch.cuda.synchronize()
        peak, pool = torch.cuda.max_memory_allocated() - base, graph_pool_bytes(model)
        print(f"\nexperts {placement.count('resident')} resident, {placement.count('host')} host; hits "
              f"{model.experts.hits}, misses {model.experts.misses}; peak {peak / 2**30:.3f} GiB + graph pool "
              f"{pool / 2**20:.0f} MiB (planned {model.plan.needs.graph_bytes / 2**20:.0f}) of {budget / 2**30:.3f}")
        assert torch.equal(logits, want[0]) and torch.equal(tokens, want[1])
        assert all(torch.equal(a, b) for a, b in zip(steps, want[2]))
        assert model.experts.misses > 0 and model.experts.hits > 0
        assert peak + pool <= budget and pool <= model.plan.needs.graph_bytes


@cuda
@pytest.mark.parametrize("name, quantize", [("qwen3-30b-a3b", None), ("mixtral-8x7b", None),  # Mixtral: float32
                                            ("qwen3-30b-a3b", "int4"), ("qwen3-30b-a3b", "int8")])  # routing
def test_experts_read_directly_from_pinned_memory_equal_resident_bitwise_within_budget(name, quantize):
    """Direct reads on the GPU: the kernels read streamed experts from pinned host memory over the link, in
    whole decode graphs; the same bits as resident experts (read from HBM) and as the copying way's (its copies
    run the same kernels), and the peak inside the budget."""
    shape = shape_config(name) | {"num_hidden_layers": 2}
    ids = torch.randint(0, 32000, (2, 30), generator=torch.Generator().manual_seed(3))
    kw = dict(dtype=torch.bfloat16, max_batch=3, max_seq_len=64, quantize=quantize)
    with load(shape, direct_experts=False, **kw) as copying:
        copied = copying(ids)
        needs = copying.plan.needs
    free_gpu()
    with load(shape, direct_experts=True, **kw) as resident:
        assert set(resident.plan.block_tiers) == {"resident"} and resident.graphs is not None
        want = _logits_and_tokens(resident, ids)
    free_gpu()
    assert torch.equal(want[0], copied)
    experts = needs.experts
    cache = min(max(experts.per_layer), experts.top_k)  # read directly: one token's experts; then 4 resident
    budget = needs.fixed_bytes + sum(needs.blocks) + (cache + 4) * experts.nbytes
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with load(shape, gpu_memory=budget, cpu_memory="16GiB", direct_experts=True, **kw) as model:
        placement = model.plan.experts.placement
        assert placement.count("host") > placement.count("resident") > 0 and model.graphs is not None
        logits, tokens, steps = _logits_and_tokens(model, ids)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        print(f"\n{name} {quantize or 'bf16'}: experts {placement.count('resident')} resident, "
              f"{placement.count('host')} host; "
              f"{model.experts.summary()}; peak {peak / 2**30:.3f} GiB of {budget / 2**30:.3f}")
        assert torch.equal(logits, want[0]) and torch.equal(tokens, want[1])
        assert all(torch.equal(a, b) for a, b in zip(steps, want[2]))
        assert model.experts.copy_misses == 0 and model.experts.misses > 0
        assert peak <= budget


@cuda
def test_direct_reads_are_the_default_where_all_experts_fit():
    shape = shape_config("qwen3-30b-a3b") | {"num_hidden_layers": 2}
    kw = dict(dtype=torch.bfloat16, max_batch=3, max_seq_len=64)
    whole = offload.plan_model(shape, **kw)
    assert whole.needs.experts.direct and "decode steps read them where they live" in str(whole)
    assert not offload.plan_model(shape, direct_experts=False, **kw).needs.experts.direct
    needs = whole.needs
    streams = offload.plan_model(shape, gpu_memory=needs.fixed_bytes + sum(needs.blocks) + 64 * needs.experts.nbytes,
                                 cpu_memory="16GiB", **kw)
    assert "host" in streams.experts.placement and not streams.needs.experts.direct


@cuda
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b"])  # Mixtral: float32 routing weights
def test_experts_in_graph_pieces_equal_eager_bitwise(name):
    """A mixture of experts in CUDA graphs (each layer captured up to its routing, the experts run by the host
    between replays): the eager passes' logits, bit for bit, decode steps and verify passes (trees, padded).
    Every expert resident and copying asked for (direct reads are the default here); the streamed test above
    replays pieces too."""
    shape = shape_config(name) | {"num_hidden_layers": 2}
    prompts = torch.randint(0, 32000, (3, 40), generator=torch.Generator().manual_seed(3)).tolist()
    kw = dict(dtype=torch.bfloat16, max_batch=4, max_seq_len=256, direct_experts=False)
    traces, pieces = {}, 0
    for graphs in (False, True):
        with load(shape, cuda_graphs=graphs, **kw) as model:
            assert (model.graphs is not None) == graphs
            traces[graphs] = trace(model, prompts) + verify_trace(model, prompts, tree=True, width=8)
            if graphs:
                pieces = sum(len(p) for bucket in model.graphs.buckets.values() for p in bucket.graphs.values())
        free_gpu()
    print(f"\n{pieces} graph pieces captured")
    assert pieces > 0
    for step, (a, b) in enumerate(zip(traces[False], traces[True])):
        assert torch.equal(a, b), f"pass {step}"


@cuda
@pytest.mark.parametrize("gpu_gib", [3.5, 5, 8])
def test_peak_gpu_memory_and_pinned_bytes_stay_in_budget(gpu_gib):
    free_gpu()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    host_before = caching_host_allocator_bytes()
    gpu_budget, cpu_budget = int(gpu_gib * 2**30), 12 * 2**30
    model = load(shape_config("llama-2-7b"), dtype=torch.bfloat16, gpu_memory=gpu_budget, cpu_memory=cpu_budget,
                 max_batch=4, max_seq_len=512, max_step_tokens=1024)
    assert model.plan.host_bytes > 0
    ids = torch.randint(0, 32000, (4, 200), generator=torch.Generator().manual_seed(1))
    model(ids[:, :256])  # a full-logits forward over max_step_tokens
    model.generate(ids, max_new_tokens=16, ignore_eos=True)  # decode graphs for 4 rows
    model.generate([[1, 2, 3], list(range(5, 300))], max_new_tokens=8)  # ragged prompts, 2 rows
    model.generate([list(range(7, 500))], max_new_tokens=8)  # a long prompt in chunks, 1 row
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    pool = graph_pool_bytes(model)
    pinned = model.pool.pinned_bytes
    host_growth = caching_host_allocator_bytes() - host_before
    print(f"\nbudget {gpu_gib} GiB: peak allocated {peak / 2**30:.3f} GiB + graph pool {pool / 2**20:.0f} MiB "
          f"(planned {model.plan.needs.graph_bytes / 2**20:.0f} MiB); plan says {model.plan.gpu_bytes / 2**30:.3f} GiB; "
          f"pinned {pinned / 2**30:.3f} GiB (plan {model.plan.host_bytes / 2**30:.3f}); "
          f"caching host allocator grew {host_growth} B; layers {model.plan.layer_map()}")
    assert peak + pool <= gpu_budget
    assert pool <= model.plan.needs.graph_bytes
    assert pinned == model.plan.host_bytes <= cpu_budget
    # PyTorch's pinned allocator holds the pool's layers nowhere: what it may still count are a few staging blocks
    # of short lists (to_device), freed once it notices their copies ran (16-169 B on an H200, 2026-12-06)
    assert host_growth < 2**16
    model.close()


@cuda
@two_gpus
def test_peer_tier_equals_resident_bitwise():
    ids = torch.randint(0, 32000, (1, 30), generator=torch.Generator().manual_seed(2))
    shape = shape_config("llama-2-7b") | {"num_hidden_layers": 6}
    kw = dict(dtype=torch.bfloat16, max_seq_len=64, max_batch=2)
    resident = load(shape, **kw)
    want = _logits_and_tokens(resident, ids)
    needs = resident.plan.needs
    resident.close()
    del resident
    free_gpu()
    budget = needs.fixed_bytes + 5 * needs.largest_block  # 1 resident layer and a ring of 2 slots per link
    model = load(shape, gpu_memory=budget, cpu_memory=2 * needs.largest_block + needs.embedding_bytes,
                 peer_memory={"cuda:1": 3 * needs.largest_block}, **kw)
    assert model.plan.placement.count("cuda:1") == 3 and model.plan.placement.count("host") == 2
    logits, tokens, steps = _logits_and_tokens(model, ids)
    assert torch.equal(logits, want[0])
    assert torch.equal(tokens, want[1])
    assert all(torch.equal(a, b) for a, b in zip(steps, want[2]))
    model.close()


def _tp_rank(rank, world, port, compile, out):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        traces = {}
        for graphs in (False, True):
            model = load(SHORT_7B, tp=world, dtype=torch.bfloat16, max_batch=4, max_seq_len=256, cuda_graphs=graphs,
                         compile=compile)
            traces[graphs] = [t.cpu() for t in trace(model, prompts_7b())]
            model.close()
            del model
            free_gpu()
        out[rank] = traces
    finally:
        torch.distributed.destroy_process_group()


@cuda
@two_gpus
def test_tensor_parallel_graph_decode_equals_eager_bitwise():
    """TP=2 over NCCL: the all-reduces and the all-gather are captured inside the decode graphs."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_tp_rank, args=(2, port, False, out), nprocs=2)
        traces = [out[r] for r in range(2)]
    for rank in range(2):
        for step, (a, b) in enumerate(zip(traces[rank][False], traces[rank][True])):
            assert torch.equal(a, b), f"rank {rank}, step {step}"
    assert all(torch.equal(a, b) for a, b in zip(traces[0][True], traces[1][True]))  # ranks agree


@cuda
def test_the_decode_cost_probes_measure_products_and_small_kernels_in_graphs():
    """The plan's rates for resident decode: products of each format at a plausible share of the HBM copy
    rate (replayed from a graph, not launch-bound), and small kernels at a few microseconds each."""
    from offload.memory import bandwidth

    device = torch.device("cuda")
    hbm = bandwidth.measure_device_copy(device, 256 * 2**20)
    rates = bandwidth.measure_gemv(device)
    print({k: f"{v / hbm:.2f} of the HBM copy rate" for k, v in rates.items()})
    assert set(rates) == set(bandwidth.GEMV_FORMATS + bandwidth.ROWS16_FORMATS)
    assert 0.5 * hbm < rates["gemv-bf16"] < 1.5 * hbm
    assert all(0.05 * hbm < rates[name] < 1.5 * hbm for name in rates)
    assert all(rates[f"rows16-{fmt}"] < 1.2 * rates[f"gemv-{fmt}"] for fmt in ("bf16", "int8", "int4"))
    kernels = bandwidth.measure_small_kernels(device)
    print(f"small kernels: {1e6 / kernels:.2f} us each")
    assert 1e4 < kernels < 1e7
