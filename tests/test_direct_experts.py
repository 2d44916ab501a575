"""Direct expert reads (``LoadOptions.direct_experts``, ``offload.models.expert_kernels``): the kernels read each
routed expert where it lives, through a table of addresses, and the routing never goes to the host.

The kernels against a float64 reference (routes sorted by expert, several rows per expert, padding, two
places an expert lives); each family against ``transformers`` (CPU, float32, under Triton's interpreter);
experts streamed == resident bit for bit; decode steps and verify passes as whole graphs, bit for bit the
eager passes; long prefills copying instead; the plan and the errors.
"""

from __future__ import annotations

import pytest
import torch

import offload
from offload.errors import ConfigError, InputError
from offload.memory.experts import ExpertNeeds, place_experts
from offload.models import expert_kernels, kernels
from offload.models.quant import FUSED, QuantizedWeight, QuantScheme, dequantize, quantize
from offload.models.shapes import shape_config

from conftest import compile_for_hopper, graphs_a_bucket, with_graphs
from test_tensor_parallel import assert_tp_equals_one
from test_moe import ATOL, MODELS, NEW, PROMPT, _BASE, _ids, _steps, _streamed, record_copies

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="needs Triton (natively on a GPU, or its interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _aligned(n: int) -> int:
    return -(-n // 256) * 256


def _store(weight: torch.Tensor, fmt, dtype):
    """``weight``'s parts as stored (``fmt``: None, (format, group), or a GGUF file's (format, group, minimums,
    scale dtype)), and the weight they stand for."""
    if fmt is None:
        return {"data": weight.to(dtype)}, weight.to(dtype).double()
    kind, group, minimum, scales = (*fmt, False, dtype)[:4] if len(fmt) == 2 else fmt
    scheme = QuantScheme(kind, group, 1 << 20, FUSED, minimum=minimum and kind == "int8", scale_dtype=scales,
                         rounding="minmax")
    if kind == "int8" and group is not None:  # a GGUF file's grouped int8 (Q8_0, Q6_K; Q5_K with minimums)
        gen = torch.Generator().manual_seed(weight.numel())
        rows, groups = weight.shape[0], weight.shape[1] // group
        parts = {"data": torch.randint(-128, 128, weight.shape, generator=gen, dtype=torch.int8),
                 "scale": (weight.abs().amax() / 127 * torch.rand(rows, groups, generator=gen)).to(scales)}
        if minimum:
            parts["minimum"] = (0.01 * torch.randn(rows, groups, generator=gen)).to(scales)
    else:
        parts = quantize(weight, scheme, dtype)
        parts.update({k: parts[k].to(scales) for k in ("scale", "minimum") if k in parts})
    return parts, dequantize(QuantizedWeight(parts["data"], parts["scale"], parts.get("minimum"), scheme),
                             torch.float64)


def _experts_in_two_arenas(n, d, features, dtype, fmt, seed):
    """``n`` experts' ``[2 f, d]`` and ``[d, f]`` projections stored (``fmt``) in blocks of two byte buffers
    (expert e in buffer e % 2, as resident and host experts are): the weights they stand for, the buffers,
    the blocks' addresses, the two projections' places in a block, and where each expert lives."""
    gen = torch.Generator().manual_seed(seed)
    stored = [[_store(torch.randn(2 * features, d, generator=gen) / d ** 0.5, fmt, dtype),
               _store(torch.randn(d, features, generator=gen) / features ** 0.5, fmt, dtype)] for _ in range(n)]
    places, at = [], 0  # each projection's parts, back to back at 256-byte boundaries
    for parts, _ in stored[0]:
        offsets = {}
        for name, t in parts.items():
            offsets[name] = at
            at = _aligned(at + t.numel() * t.element_size())
        places.append(offsets)
    block = at
    arenas = [torch.zeros(block * (n // 2 + 1), dtype=torch.uint8, device=DEVICE) for _ in range(2)]
    addresses = []
    for e, projections in enumerate(stored):
        arena, start = arenas[e % 2], (e // 2) * block
        for (parts, _), offsets in zip(projections, places):
            for name, t in parts.items():
                raw = t.contiguous().view(torch.uint8).flatten()
                arena[start + offsets[name]: start + offsets[name] + raw.numel()] = raw.to(DEVICE)
        addresses.append(expert_kernels.device_address(arena, torch.device(DEVICE)) + start)
    kind = {None: expert_kernels.DENSE, "int8": expert_kernels.INT8, "int4": expert_kernels.INT4}[fmt and fmt[0]]
    if kind == expert_kernels.INT8 and fmt[1] is not None:
        kind = expert_kernels.INT8_GROUPS
    scales = 0 if fmt is None or len(fmt) == 2 or fmt[3] == dtype else expert_kernels.SCALE_TYPES[fmt[3]]
    gate_up, down = (expert_kernels.Projection(kind, o["data"], o.get("scale", 0), o.get("minimum", 0),
                                               (fmt and fmt[1]) or 1, scales) for o in places)
    on_host = torch.tensor([e % 2 for e in range(n)], dtype=torch.int8, device=DEVICE)
    weights = [(gu, dn) for (_, gu), (_, dn) in stored]
    return weights, arenas, torch.tensor(addresses, device=DEVICE), gate_up, down, on_host


def _reference(x, ids, weights, experts):
    """The grid in float64, from the weights as stored."""
    tokens, k = ids.shape
    grid = torch.zeros(tokens * k, x.shape[1], dtype=torch.float64)
    for t in range(tokens):
        chosen = sorted((e, j) for j, e in enumerate(ids[t].tolist()))
        for rank, (e, j) in enumerate(chosen):
            if e < 0:
                continue
            gate_up, down = experts[e]
            h = x[t].double() @ gate_up.T
            f = h.shape[0] // 2
            y = (torch.nn.functional.silu(h[:f]) * h[f:]) @ down.T
            grid[t * k + rank] = y * weights[t, j].double()
    return grid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, *([torch.bfloat16] if DEVICE == "cuda" else [])])
@pytest.mark.parametrize("tokens, k, n, d, features, fmt", [
    (3, 2, 5, 40, 24, None), (20, 2, 3, 64, 40, None), (5, 3, 8, 136, 33, None),  # odd shapes: masked tiles
    (4, 2, 5, 64, 96, ("int8", None)), (20, 2, 3, 160, 40, ("int8", None)), (20, 3, 3, 64, 40, None),
    (4, 2, 5, 64, 96, ("int4", 32)), (20, 2, 3, 128, 64, ("int4", 64)),
    # as a GGUF file keeps them: int8 in groups of 32 (Q8_0) or 16 (Q6_K), with minimums (Q5_K), int4 (Q4_0, Q4_1,
    # Q4_K); scales in float16 (a 16-bit model's) or float32, whatever the activations' dtype
    (6, 2, 4, 96, 160, ("int8", 32, False, torch.float16)), (6, 2, 4, 96, 160, ("int8", 16, False, torch.float16)),
    (6, 2, 4, 96, 160, ("int8", 32, True, torch.float16)), (6, 2, 4, 96, 160, ("int4", 32, True, torch.float16)),
    (6, 2, 4, 96, 160, ("int8", 32, True, torch.float32)),
    # int4 in groups of 16 (Q3_K, Q2_K): two groups a column step, and an odd count of them (80 columns: 5)
    (6, 2, 4, 96, 160, ("int4", 16, True, torch.float16)), (5, 2, 3, 80, 48, ("int4", 16))])
def test_the_kernels_equal_a_float64_reference(dtype, tokens, k, n, d, features, fmt):
    """Experts in the model's dtype, int8 and int4, and in a GGUF file's formats; experts chosen by many rows (20
    tokens of 3 experts: up to 20 rows in one tile of 32), a padded row and a padded route (-1), experts in two
    buffers; the counts of distinct experts read from each. (Triton's interpreter computes no bfloat16.)"""
    experts, _arenas, addresses, gate_up, down, on_host = _experts_in_two_arenas(n, d, features, dtype, fmt,
                                                                                 seed=n + d)
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(tokens)])
    ids[1, -1] = -1  # a padded route
    ids[-1] = -1  # a padded row (a verify pass's pads route to no expert)
    x = torch.randn(tokens, d, generator=gen).to(dtype)
    weights = torch.rand(tokens, k, generator=gen).to(dtype)
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    got = expert_kernels.routed_experts(x.to(DEVICE), ids.to(DEVICE), weights.to(DEVICE), addresses, gate_up, down,
                                        features, counts, on_host)
    want = _reference(x, ids, weights, experts)
    # a few roundings to float16 (bfloat16: 8 significant bits, as a GGUF file's 16-bit model computes) of the largest
    tolerance = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert got.dtype == dtype and (got.cpu().double() - want).abs().max() <= tolerance * want.abs().max()
    assert torch.equal(got.cpu()[1 * k + 0], torch.zeros(d, dtype=dtype))  # the pad sorts first in its row: rank 0
    used = {e for e in ids.flatten().tolist() if e >= 0}
    assert counts.tolist() == [sum(e % 2 == 0 for e in used), sum(e % 2 == 1 for e in used)]


@pytest.fixture(scope="module", params=[a if a == "qwen3_moe" else pytest.param(a, marks=pytest.mark.slow)
                                        for a in MODELS])  # the other families with --slow
def direct_case(request, checkpoint_factory):
    arch = request.param
    hf, directory = checkpoint_factory(f"moe-{arch}", arch, "5.x", seed=5, **_BASE, **MODELS[arch])
    with offload.load_model(directory, dtype=torch.float32, max_seq_len=64, max_batch=2, progress=False,
                            direct_experts=True) as m:
        yield arch, hf, directory, m


def test_direct_reads_match_transformers(direct_case):
    _, hf, _, model = direct_case
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        greedy = hf.generate(ids[:, :PROMPT], max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert model.experts.table is not None and model.decoder.direct(ids.numel())
    assert (model(ids).cpu() - ref).abs().max().item() <= ATOL  # (on a GPU the model's logits are there)
    assert torch.equal(model.generate(ids[:, :PROMPT], max_new_tokens=NEW, ignore_eos=True).cpu(), greedy)


def test_experts_read_over_a_link_equal_resident_bitwise(direct_case):
    """Where an expert lives changes its address, never the result; the store counts what was read where."""
    _, _, directory, model = direct_case
    ids = _ids()
    want_logits, want_tokens = model(ids), model.generate(ids[:, :PROMPT], max_new_tokens=NEW, ignore_eos=True)
    with _streamed(directory, model.plan.needs, resident_experts=2, direct_experts=True) as streamed:
        assert streamed.plan.experts.placement.count("host") > 0
        assert torch.equal(streamed(ids), want_logits)
        assert torch.equal(streamed.generate(ids[:, :PROMPT], max_new_tokens=NEW, ignore_eos=True), want_tokens)
        assert streamed.experts.copy_misses == 0  # nothing was copied: every pass was short
        assert streamed.experts.misses > 0 and streamed.experts.hits > 0
        assert "read over a link" in streamed.experts.summary()


@pytest.mark.slow
def test_decode_steps_and_verify_passes_are_whole_graphs(direct_case):
    """No host decision inside a layer: each segment is one graph (or the pass is: ``graphs.WHOLE_PASS``),
    replayed with the eager passes' logits."""
    _, _, directory, model = direct_case
    ids = _ids(n=PROMPT + 6, seed=3)
    with _streamed(directory, model.plan.needs, resident_experts=2, direct_experts=True) as streamed:
        want = _steps(streamed, ids)
        capture = with_graphs(streamed)
        got = _steps(streamed, ids)
        for step, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"pass {step}"
        assert capture.captured == 2 * graphs_a_bucket(streamed)  # decode steps, verify passes: no pieces
        assert capture.replayed == 2 * capture.captured


def test_a_long_prefill_copies_its_experts(checkpoint_factory):
    """A pass of more than DIRECT_TOKENS tokens copies its experts through the cache; its logits are those of
    direct reads up to the products' summation order."""
    _, directory = checkpoint_factory("moe-qwen3_moe", "qwen3_moe", "5.x", seed=5, **_BASE, **MODELS["qwen3_moe"])
    ids = _ids(batch=2, n=40)  # 80 tokens
    short = ids[:, :expert_kernels.DIRECT_TOKENS // 2]
    needs = offload.plan_model(directory, dtype=torch.float32, max_seq_len=64, max_batch=2).needs
    with _streamed(directory, needs, resident_experts=1, direct_experts=True) as model:
        long_logits = model(ids)
        copied = model.experts.copy_misses
        assert copied > 0
        short_logits = model(short)
        assert model.experts.copy_misses == copied
    with offload.load_model(directory, dtype=torch.float32, max_seq_len=64, max_batch=2, progress=False) as copying:
        assert (long_logits - copying(ids)).abs().max() <= ATOL
        assert (short_logits - copying(short)).abs().max() <= ATOL


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="ranks on the CPU (gloo) read experts under Triton's "
                    "interpreter, which a process on a GPU machine does not run")
def test_tensor_parallel_direct_reads_on_two_ranks_equal_one(checkpoint_factory):
    """Each rank's kernels read its shard of every expert; the ranks' sums are all-reduced as when copying."""
    _, directory = checkpoint_factory("moe-mixtral", "mixtral", "5.x", seed=5, **_BASE, **MODELS["mixtral"])
    assert_tp_equals_one(directory, _ids(2, PROMPT, 7), ATOL, 64, direct_experts=True)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_compressed_experts_read_directly(checkpoint_factory, fmt):
    """Experts quantized at load (Mixtral's 96 features: int4 in groups of 32 there, 64 in the gate-up
    projection) read by the kernels from their parts: streamed == resident bit for bit, and the copying way's
    logits up to the products' summation order."""
    _, directory = checkpoint_factory("moe-mixtral", "mixtral", "5.x", seed=5, **_BASE, **MODELS["mixtral"])
    ids = _ids()
    kw = dict(dtype=torch.float32, max_seq_len=64, max_batch=2, quantize=fmt)
    with offload.load_model(directory, progress=False, **kw) as copying:
        want = copying(ids)
    with offload.load_model(directory, progress=False, direct_experts=True, **kw) as resident:
        logits = resident(ids)
        tokens = resident.generate(ids[:, :PROMPT], max_new_tokens=NEW, ignore_eos=True)
    assert (logits - want).abs().max() <= ATOL
    needs = offload.plan_model(directory, **kw).needs
    with _streamed(directory, needs, resident_experts=2, direct_experts=True, quantize=fmt) as streamed:
        assert streamed.plan.experts.placement.count("host") > 0
        assert torch.equal(streamed(ids), logits)
        assert torch.equal(streamed.generate(ids[:, :PROMPT], max_new_tokens=NEW, ignore_eos=True), tokens)


@pytest.mark.parametrize("kind, groups", [("int4", [(32, True), (128, True), (16, True), (8, False), (96, False)]),
                                         ("int8", [(16, True), (32, True), (8, False), (48, False)])])
def test_the_kernels_take_groups_of_powers_of_two(kind, groups):
    block = torch.zeros(64 * 96, dtype=torch.uint8)
    for group, ok in groups:
        scheme = QuantScheme(kind, group, 1 << 20, FUSED)
        w = QuantizedWeight(block[:64 * 96].view(64, 96), block[:64 * 2].view(torch.float16).view(64, 1),
                            block[:64 * 2].view(torch.float16).view(64, 1), scheme)
        found = expert_kernels.projection(w, block, torch.float16)
        assert isinstance(found, expert_kernels.Projection) == ok, group


def test_direct_reads_refuse_what_the_kernels_cannot_read(checkpoint_factory):
    _, directory = checkpoint_factory("moe-qwen3_moe", "qwen3_moe", "5.x", seed=5, **_BASE, **MODELS["qwen3_moe"])
    with pytest.raises(ConfigError, match="int4 groups of 8 columns"):
        offload.plan_model(directory, dtype=torch.float32, quantize="int4", group_size=8, direct_experts=True)
    with pytest.raises(InputError, match="choose one"):
        offload.load_model(directory, direct_experts=True, prefetch_experts=True)


def test_the_plan_counts_every_streamed_expert_a_step_reads_and_keeps_them_off_peers():
    """Direct reads fill no cache: the cache shrinks to one token's experts (a prefill's waves) and its room goes
    to resident experts; the expected misses are every routed expert that is not resident; and the kernels
    read host memory, not a peer's."""
    mb = 2 ** 20
    for direct in (False, True):
        needs = ExpertNeeds(mb, (8, 8), 2, direct, host_only=direct)
        plan = place_experts(needs, 8 * mb, {"host": 100 * mb, "cuda:1": 100 * mb}, {"host": 50e9, "cuda:1": 300e9},
                             max_batch=2)
        assert plan.cache_slots == (2 if direct else 4)
        resident = 8 - plan.cache_slots
        assert plan.placement.count("resident") == resident
        streamed = set(plan.placement) - {"resident"}
        assert streamed == ({"host"} if direct else {"host", "cuda:1"})
        per_layer = 8 - resident // 2
        wanted = sum(needs.distinct(layer, 1) * (per_layer / 8) for layer in range(2)) * mb  # not resident
        missed = sum(plan.missed_bytes(1).values())
        if direct:
            assert missed == pytest.approx(wanted)  # every one read over its link
        else:
            assert 0 < missed < wanted  # some still in the cache (how many: test_moe's simulated cache)


def test_an_address_the_kernels_read_wrongly_is_refused(monkeypatch):
    """The table's addresses are checked by reading a buffer's first bytes through them: where the kernels would
    read something else (host memory not mapped for the GPU), direct reads are refused at load."""
    from offload.scheduler import experts

    buffer = torch.arange(256, dtype=torch.int64).view(torch.uint8)[:512].to(DEVICE)
    assert experts._checked_address(buffer, torch.device(DEVICE)) % 16 == 0
    monkeypatch.setattr(experts, "device_address", lambda b, device: expert_kernels.device_address(b, device) + 8)
    with pytest.raises(ConfigError, match="cannot read"):
        experts._checked_address(buffer, torch.device(DEVICE))


_COMPILE_FOR_HOPPER = """
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from offload.models import expert_kernels
fmt, group, rows, scales = (int(a) for a in sys.argv[1:5])
constexprs = dict(BLOCK_M=rows, BLOCK_N=32, BLOCK_K=128, PRECISION=None, FORMAT=fmt, GROUP=group, SCALES=scales,
                  MINIMUMS=fmt == expert_kernels.INT4)
signature = {"x_ptr": "*bf16", "order_ptr": "*i64", "ids_ptr": "*i64", "ends_ptr": "*i64", "addresses_ptr": "*i64",
             "on_host_ptr": "*i8", "counts_ptr": "*i64", "h_ptr": "*bf16", "D": "i32", "I": "i32", "TOP_K": "i32",
             "DATA": "i32", "SCALE": "i32", "MINIMUM": "i32", **{name: "constexpr" for name in constexprs}}
aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 7, 8, 9, 11, 12, 13)}  # as Triton specializes them
source = ASTSource(fn=expert_kernels._gate_up_kernel, signature=signature, constexprs=constexprs, attrs=aligned)
print(triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("rows", [16, 64])
@pytest.mark.parametrize("fmt, group, scales", [(expert_kernels.DENSE, 1, 0), (expert_kernels.INT8, 1, 0),
                                                (expert_kernels.INT4, 128, 0), (expert_kernels.INT4, 32, 1),
                                                (expert_kernels.INT4, 16, 1),
                                                (expert_kernels.INT8_GROUPS, 32, 1),
                                                (expert_kernels.INT8_GROUPS, 16, 0)])
def test_the_kernels_compile_for_hopper_with_pipelined_weight_loads(fmt, group, scales, rows):
    """Compiled for sm_90 here (Triton's CUDA backend needs no GPU to compile; in a process of its own, without
    the interpreter): the weight tiles are copied 16 bytes at a time, asynchronously, never loaded a byte or two
    at a time (which addresses made from a table allow only where the kernels say they are 16-byte aligned)."""
    import re

    ptx = compile_for_hopper(_COMPILE_FOR_HOPPER, fmt, group, rows, scales)
    assert re.search(r"cp\.async\.c[ag]\.shared\.global", ptx)
    assert not re.search(r"ld\.global\S*evict_first\S*\.b(8|16)\b", ptx)  # the weights' loads are evict_first
    assert re.search(r"atom\S*\.add\.u64", ptx)  # the counts
    # scales and minimums are loaded a row's at a time (a vector of rows, a group a step), not once a weight
    assert len(re.findall(r"ld\.global\S*\.b(16|32)\b", ptx)) <= 8


def test_a_pass_of_several_chunks_reads_every_chunk_in_one_call(checkpoint_factory, monkeypatch):
    """A prompt cut into chunks (``max_step_tokens``) routes every chunk, then reads the experts of all of them
    in one call: the copying way's logits."""
    _, directory = checkpoint_factory("moe-qwen3_moe", "qwen3_moe", "5.x", seed=5, **_BASE, **MODELS["qwen3_moe"])
    prompt = [_ids(batch=1, n=20)[0].tolist()]
    kw = dict(dtype=torch.float32, max_seq_len=64, max_batch=1, max_step_tokens=8, progress=False)
    calls, routed_experts = [], expert_kernels.routed_experts

    def noting(x, ids, *args):
        calls.append(ids.shape[0])
        return routed_experts(x, ids, *args)

    monkeypatch.setattr(expert_kernels, "routed_experts", noting)
    with offload.load_model(directory, direct_experts=True, **kw) as direct:
        logits = direct.extend(prompt, [0])
        routed = sum(direct.config.sparse_layers)
    assert calls == [20] * routed  # chunks of 8, 8 and 4 tokens: one call a layer
    with offload.load_model(directory, **kw) as copying:
        assert (logits - copying.extend(prompt, [0])).abs().max() <= ATOL


def test_more_rows_than_direct_reads_serve_keep_the_copying_cache_and_say_so(checkpoint_factory):
    _, directory = checkpoint_factory("moe-qwen3_moe", "qwen3_moe", "5.x", seed=5, **_BASE, **MODELS["qwen3_moe"])
    # no CUDA graphs on a GPU either: a plan that copies streamed experts drops them, and their bytes would make room
    # for every expert
    kw = dict(dtype=torch.float32, max_seq_len=64, cpu_memory="1GiB", cuda_graphs=False)

    def plan(rows):
        needs = offload.plan_model(directory, max_batch=rows, gpu_memory=2**40, **kw).needs
        budget = needs.fixed_bytes + sum(needs.blocks) + 12 * needs.experts.nbytes  # of its 24 experts
        return offload.plan_model(directory, max_batch=rows, gpu_memory=budget, direct_experts=True, **kw)

    with pytest.warns(offload.OffloadWarning, match="passes of up to 64 tokens"):
        many = plan(80)
    assert many.experts.cache_slots == 8 and not many.needs.experts.direct  # a step's experts of a layer
    few = plan(16)
    assert few.experts.cache_slots == 3 and few.needs.experts.direct  # one token's experts
    assert few.experts.placement.count("resident") > many.experts.placement.count("resident")
    assert many.needs.experts.host_only and few.needs.experts.host_only  # either way, no expert on a peer


def test_an_int4_draft_of_random_weights_quantized_at_load_is_refused(checkpoint_factory):
    config = shape_config("tiny")
    with pytest.raises(InputError, match="unrelated"):
        offload.load_model(config, random_weights=0, quantize="int8", draft="int4", progress=False)



def test_direct_reads_are_the_default_where_every_expert_fits_on_one_gpu(checkpoint_factory, monkeypatch):
    """Where every expert stays resident on one GPU whose kernels read them, in CUDA graphs, decode steps read
    them directly by default (one graph a step); where experts stream, they are copied (faster there). The
    logits are the same either way: on a GPU copies run the same kernels."""
    from types import SimpleNamespace

    from offload import loading
    from offload.loading import _direct_would_pay, prepare

    _, directory = checkpoint_factory("moe-qwen3_moe", "qwen3_moe", "5.x", seed=5, **_BASE, **MODELS["qwen3_moe"])
    kw = dict(dtype=torch.float32, max_seq_len=64, max_batch=2)
    setup = prepare(directory, offload.LoadOptions(device="cpu", **kw))
    assert setup.options.direct_experts is False and not setup.plan.needs.experts.direct  # a CPU: copies
    with monkeypatch.context() as m:  # as on a GPU where it pays: planned again to read directly
        m.setattr(loading, "_direct_would_pay", lambda *args: True)
        m.setenv("TRITON_INTERPRET", "1")  # (a plan for the CPU: on a GPU machine too)
        chosen = prepare(directory, offload.LoadOptions(device="cpu", **kw))
        assert chosen.options.direct_experts is True and chosen.plan.needs.experts.direct
        assert "decode steps read them where they live" in str(chosen.plan)
        refused = prepare(directory, offload.LoadOptions(device="cpu", direct_experts=False, **kw))
        assert refused.options.direct_experts is False and not refused.plan.needs.experts.direct
    cuda = torch.device("cuda")

    monkeypatch.setattr(kernels, "works", lambda device: True)  # as on a GPU where Triton works

    def would(setup=setup, device=cuda, tp=setup.tp, **options) -> bool:
        return _direct_would_pay(setup.options.replace(**options), setup.plan, device, tp, setup.blocks, setup.dtype)

    assert would()  # the kernels take these experts (here under Triton's interpreter)
    assert not would(direct_experts=True)  # asked for already
    assert not would(cuda_graphs=False)  # the figure is one graph a step's
    assert not would(device=torch.device("cpu")) and not would(tp=SimpleNamespace(size=2))
    assert not would(max_batch=65)  # a decode step of more than 64 tokens copies its experts
    assert not would(compile=True) and not would(prefetch_experts=True)
    needs = prepare(directory, offload.LoadOptions(direct_experts=False, **kw)).plan.needs  # the default device's
    streams = prepare(directory, offload.LoadOptions(**kw, cpu_memory="1GiB", gpu_memory=needs.fixed_bytes
                                                     + sum(needs.blocks) + 8 * needs.experts.nbytes))
    assert "host" in streams.plan.experts.placement and not would(setup=streams)
    dense = prepare(shape_config("tiny"), offload.LoadOptions(dtype=torch.float32, max_seq_len=64))
    assert not would(setup=dense)


def test_a_draft_model_reads_its_experts_directly_rather_than_grow_trees_too_wide_for_the_kernels(
        checkpoint_factory, monkeypatch):
    """A draft model (a mixture of experts, every expert resident, where direct reads pay) whose trees' passes
    are wider than the expert kernels take (``max_batch`` x ``tree_width`` tokens) is loaded to read its experts
    directly and draft chains (direct reads measured 4.5-5.3x faster a step); where its trees' passes fit,
    it keeps both."""
    from offload import loading

    _, directory = checkpoint_factory("moe-qwen3_moe", "qwen3_moe", "5.x", seed=5, **_BASE, **MODELS["qwen3_moe"])
    with monkeypatch.context() as m:  # as on a GPU where direct reads pay for passes the kernels take
        m.setattr(loading, "_direct_would_pay", lambda options, *args: options.max_batch * options.tree_width <= 64)
        m.setenv("TRITON_INTERPRET", "1")
        for rows, direct, width in ((4, True, 1), (2, True, 17)):
            chosen = loading.prepare(directory, offload.LoadOptions(device="cpu", dtype=torch.float32, max_seq_len=64,
                                                                    max_batch=rows, tree_width=17))
            assert (chosen.options.direct_experts, chosen.options.tree_width) == (direct, width)
    wide = offload.LoadOptions(max_batch=4, max_seq_len=64, tree_width=17)
    assert not loading._short_steps(wide, torch.device("cuda"))  # 4 rows of 32 (17 padded) in graphs
    assert loading._short_steps(wide.replace(tree_width=1), torch.device("cuda"))


def test_expert_flags_on_a_model_without_experts_say_they_do_nothing():
    """A dense model with --direct-experts or --prefetch-experts loads (a draft model inherits its target's
    flags), and its plan says the flag does nothing."""
    for flag in ("direct_experts", "prefetch_experts"):
        plan = offload.plan_model(shape_config("tiny"), dtype=torch.float32, max_seq_len=64, **{flag: True})
        name = "--" + flag.replace("_", "-")
        assert any(f"{name} does nothing here: LlamaForCausalLM has no routed experts" in w for w in plan.warnings)
    assert not any("does nothing" in w for w in offload.plan_model(shape_config("tiny"), max_seq_len=64).warnings)


# ---------------------------------------------------------------- copies computed by the kernels (on a GPU)

@pytest.fixture
def kernel_copies(monkeypatch):
    """Experts copied into the cache computed by the kernels, as on a GPU (here under Triton's interpreter)."""
    from offload.scheduler import experts as store

    monkeypatch.setattr(store, "kernels_compute_copies", lambda device: True)


def test_copies_through_the_kernels_equal_resident_and_direct_reads_bitwise(checkpoint_factory, kernel_copies,
                                                                            monkeypatch):
    """On a GPU the copying way computes its experts by the direct reads' kernels once they are on the device:
    streamed == resident == direct reads, bit for bit, for prompts (in waves where the cache cannot hold a
    pass's experts at once), decode steps and verify passes, eagerly and in graph pieces; transformers' logits."""
    hf, directory = checkpoint_factory("moe-qwen3_moe", "qwen3_moe", "5.x", seed=5, **_BASE, **MODELS["qwen3_moe"])
    ids = _ids(n=PROMPT + 6, seed=3)
    waves, routed_experts = [], expert_kernels.routed_experts

    def noting(x, ids, *args):
        waves.append(args[-1] is not None)  # a grid given: a later wave of a layer's experts
        return routed_experts(x, ids, *args)

    monkeypatch.setattr(expert_kernels, "routed_experts", noting)
    kw = dict(dtype=torch.float32, max_seq_len=64, max_batch=2, progress=False)
    with offload.load_model(directory, direct_experts=False, **kw) as resident:  # (on a GPU: direct by default)
        assert not resident.experts.table.direct and resident.decoder.kernels(ids.numel())
        assert not resident.decoder.direct(ids.numel())
        with torch.no_grad():
            assert (resident(ids).cpu() - hf(ids).logits).abs().max() <= ATOL
        want = _steps(resident, ids)
        needs = resident.plan.needs
    with offload.load_model(directory, direct_experts=True, **kw) as direct:
        assert all(torch.equal(a, b) for a, b in zip(_steps(direct, ids), want))
    with _streamed(directory, needs, resident_experts=1) as streamed:
        waves.clear()
        assert all(torch.equal(a, b) for a, b in zip(_steps(streamed, ids), want))
        assert any(waves) and streamed.experts.copy_misses > 0
        with_graphs(streamed)
        assert all(torch.equal(a, b) for a, b in zip(_steps(streamed, ids), want))
        assert "copied in" in streamed.experts.summary() and "read over a link" not in streamed.experts.summary()


def test_copies_through_the_kernels_copy_each_routed_expert_not_on_the_device_once(checkpoint_factory,
                                                                                   kernel_copies):
    _, directory = checkpoint_factory("moe-qwen3_moe", "qwen3_moe", "5.x", seed=5, **_BASE, **MODELS["qwen3_moe"])
    needs = offload.plan_model(directory, dtype=torch.float32, max_seq_len=64, max_batch=2).needs
    with _streamed(directory, needs, resident_experts=1) as model:
        copied, expected = record_copies(model.experts, "place")
        model.extend([[5, 6, 7, 8]], [0])
        for step in range(3):
            copied.clear(), expected.clear()
            model.extend([[9 + step]], [4 + step])  # one decode step
            assert copied == expected and len(set(copied)) == len(copied) and copied


@pytest.mark.slow
def test_prefetched_experts_through_the_kernels_change_nothing(checkpoint_factory, kernel_copies):
    _, directory = checkpoint_factory("moe-qwen3_moe", "qwen3_moe", "5.x", seed=5, **_BASE, **MODELS["qwen3_moe"])
    from test_moe import _every_layer_resident

    ids, runs = _ids(n=PROMPT), {}
    for prefetch in (False, True):
        with _every_layer_resident(directory, prefetch_experts=prefetch) as model:
            assert model.experts.table is not None
            result = model.generate(ids, max_new_tokens=NEW, ignore_eos=True, return_result=True)
            runs[prefetch] = result.tokens, model(ids), model.experts.prefetch_used
    assert runs[True][0] == runs[False][0] and torch.equal(runs[True][1], runs[False][1]) and runs[True][2] > 0


def test_the_expert_kernels_are_used_only_where_triton_works(checkpoint_factory, monkeypatch):
    """Where Triton is installed but fails (``kernels.works``: PyTorch's kernels decode), copies go an expert at
    a time and direct reads are not the default; a table whose kernels fail at load falls back with a warning."""
    from offload.loading import _direct_would_pay, prepare
    from offload.scheduler import experts as store

    _, directory = checkpoint_factory("moe-qwen3_moe", "qwen3_moe", "5.x", seed=5, **_BASE, **MODELS["qwen3_moe"])
    setup = prepare(directory, offload.LoadOptions(device="cpu", dtype=torch.float32, max_seq_len=64, max_batch=2))
    cuda = torch.device("cuda")
    with monkeypatch.context() as m:
        m.setattr(kernels, "works", lambda device: True)
        assert store.kernels_compute_copies(cuda)
        assert _direct_would_pay(setup.options, setup.plan, cuda, setup.tp, setup.blocks, setup.dtype)
        m.setattr(kernels, "works", lambda device: False)
        assert not store.kernels_compute_copies(cuda)
        assert not _direct_would_pay(setup.options, setup.plan, cuda, setup.tp, setup.blocks, setup.dtype)
    monkeypatch.setattr(store, "kernels_compute_copies", lambda device: True)

    def broken(buffer, device):
        raise RuntimeError("ptxas failed")

    monkeypatch.setattr(store, "device_address", broken)
    # the load's own device (a GPU's fixed needs are larger): room for the cache's slots and two resident experts,
    # whose addresses the table looks up (an expert copied into a slot has none to look up)
    needs = offload.plan_model(directory, dtype=torch.float32, max_seq_len=64, max_batch=2).needs
    gpu = needs.fixed_bytes + sum(needs.blocks) + (2 * needs.experts.top_k + 2) * needs.experts.nbytes
    with pytest.warns(offload.OffloadWarning, match="expert kernels fail here"):
        model = offload.load_model(directory, dtype=torch.float32, max_seq_len=64, max_batch=2, progress=False,
                                   gpu_memory=gpu, cpu_memory="1GiB")
    with model:
        assert model.experts.table is None and model(_ids()).isfinite().all()


def test_the_plan_counts_the_expert_kernels_only_where_steps_run_them(checkpoint_factory, monkeypatch):
    """A decode step of more than DIRECT_TOKENS tokens computes its experts one at a time: the plan counts that
    step's kernels so (3 top_k + 8 a routed layer), and the expert kernels' 14 where steps are short."""
    from offload import loading
    from offload.loading import memory_needs, prepare

    monkeypatch.setattr(loading, "kernels_compute_copies", lambda device: True)
    _, directory = checkpoint_factory("moe-qwen3_moe", "qwen3_moe", "5.x", seed=5, **_BASE, **MODELS["qwen3_moe"])
    for rows, by_kernels in ((128, False), (8, True)):
        kw = dict(dtype=torch.float32, max_seq_len=64, max_batch=rows, cuda_graphs=False)
        setup = prepare(directory, offload.LoadOptions(device="cpu", **kw))
        needs = memory_needs(setup.family, setup.config, setup.tp, setup.dtype, torch.device("cpu"), setup.options,
                             setup.blocks, setup.globals_layout, setup.embedding_layout)
        assert needs.decode_kernels == setup.family.decode_kernels(setup.config, by_kernels)
