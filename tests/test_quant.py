"""Quantized blocks: the int8/int4 formats, their layout, loading, planning, and what they do to a model.

Unit tests of the packing first (error bounds per channel and per group, odd shapes, tensor-parallel
shards, byte sizes), then whole models: offloaded == resident bit for bit in each format, the plan,
bad input, and on a model trained to have structure, greedy tokens (int8) and perplexity (int4).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import offload
from offload.cli import main
from offload.distributed import TensorParallel
from offload.errors import OffloadWarning
from offload.loading import _chunk_size, load_weights, memory_needs, prepare
from offload.models.config import config_from_dict
from offload.models.blocks import embedding_layout, global_layout
from offload.models.llama import Llama
from offload.models.quant import (DEFAULT_GROUP_SIZE, QuantizedWeight, QuantScheme, WeightFormat, dequantize,
                                  group_size_for, head_format, quantize, quantized_linear, scratch_bytes)
from offload.models.parallel import Shard
from offload.models.shapes import shape_config

from conftest import graph_pool_bytes
from offload.structured import corpus_of
from offload.synthetic import RandomSource

MAX_SEQ = 64
ROOT = Path(__file__).resolve().parents[1]


def weight(rows, cols, seed=0, dtype=torch.float32):
    """Weights like a trained matrix's: mostly small, a few outliers, rows of different scales."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    w *= torch.rand(rows, 1, generator=gen) * 3 + 0.1
    w[torch.rand(rows, cols, generator=gen) < 0.01] *= 8
    return w.to(dtype)


def int8_scheme(chunk_rows=1 << 20):
    return QuantScheme("int8", None, chunk_rows)


def int4_scheme(group, chunk_rows=1 << 20, rounding="minmax"):
    return QuantScheme("int4", group, chunk_rows, rounding=rounding)


def stored(w, scheme, dtype):
    parts = quantize(w, scheme, dtype)
    return QuantizedWeight(parts["data"], parts["scale"], parts.get("minimum"), scheme), parts


def unpack_int4(data: torch.Tensor, group: int) -> torch.Tensor:
    """The integers ``[rows, cols]``: byte j of a group holds its column j (low nibble) and j + group/2 (high)."""
    halves = data.view(data.shape[0], -1, group // 2)
    return torch.cat([halves & 15, halves >> 4], dim=-1).view(data.shape[0], -1)


# ---------------------------------------------------------------------- the formats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [576, 352, 64])
def test_int8_error_is_at_most_half_a_step_per_output_channel(dtype, cols):
    w = weight(96, cols, seed=cols).to(dtype)
    q, parts = stored(w, int8_scheme(), dtype)
    assert parts["data"].dtype == torch.int8 and parts["data"].shape == (96, cols)
    assert parts["scale"].dtype == dtype and parts["scale"].shape == (96,)
    assert parts["data"].abs().max() <= 127
    scale = parts["scale"].double()
    exact = parts["data"].double() * scale[:, None]  # what the stored parts mean
    error = (w.double() - exact).abs().amax(dim=1)
    assert (error <= scale / 2 * (1 + 1e-6)).all()
    assert (scale <= w.double().abs().amax(dim=1) / 127 * (1 + 2 ** -7)).all()  # the step fits the row
    # dequantized in the model dtype: one rounding of the exact product
    assert torch.equal(dequantize(q, q.scale.dtype), exact.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols, group", [(576, 64), (352, 32), (256, 128), (128, 16)])
def test_int4_error_is_at_most_half_a_step_per_group(dtype, cols, group):
    w = weight(48, cols, seed=cols + group).to(dtype)
    q, parts = stored(w, int4_scheme(group), dtype)
    groups = cols // group
    assert parts["data"].dtype == torch.uint8 and parts["data"].shape == (48, cols // 2)
    assert parts["scale"].shape == parts["minimum"].shape == (48, groups)
    assert parts["scale"].dtype == parts["minimum"].dtype == dtype
    values = unpack_int4(parts["data"], group).double().view(48, groups, group)
    scale, minimum = parts["scale"].double(), parts["minimum"].double()
    exact = values * scale[..., None] + minimum[..., None]
    grouped = w.double().view(48, groups, group)
    error = (grouped - exact).abs().amax(dim=-1)
    # half a step, plus what rounding the minimum to the model dtype moves it by
    slack = (grouped.amin(dim=-1) - minimum).abs()
    assert (error <= scale / 2 * (1 + 1e-5) + slack + 1e-7).all()
    assert (scale <= (grouped.amax(-1) - grouped.amin(-1)) / 15 * (1 + 2 ** -7) + 1e-12).all()
    # dequantized in the model dtype: two roundings (q * scale, then + minimum) of numbers up to 15 steps wide
    ulp = {torch.float32: 2 ** -24, torch.bfloat16: 2 ** -8}[dtype]
    got = dequantize(q, q.scale.dtype).double().view(48, groups, group)
    assert ((got - exact).abs() <= 2 * ulp * (15 * scale + 2 * minimum.abs())[..., None]).all()


def test_int4_packs_two_values_per_byte_a_groups_halves_in_the_two_nibbles():
    w = torch.tensor([[0.0, 15.0, 1.0, 2.0]])  # one group of 4: minimum 0, scale 1
    _, parts = stored(w, int4_scheme(4), torch.float32)
    assert parts["data"].tolist() == [[0x10, 0x2F]]  # byte 0: columns 0 and 2; byte 1: columns 1 and 3
    assert parts["scale"].tolist() == [[1.0]] and parts["minimum"].tolist() == [[0.0]]


def test_constant_rows_and_groups_are_exact():
    w = torch.zeros(4, 64)
    w[1] = 0.5
    for scheme in (int8_scheme(), int4_scheme(32)):
        q, _ = stored(w, scheme, torch.float32)
        assert torch.equal(dequantize(q, q.scale.dtype), w)


@pytest.mark.parametrize("scheme", [int8_scheme(7), int4_scheme(32, 7)], ids=["int8", "int4"])
def test_linear_in_chunks_of_rows_equals_the_whole_dequantized_weight(scheme):
    w, x = weight(50, 96), torch.randn(3, 5, 96)
    bias = torch.randn(50)
    q, _ = stored(w, scheme, torch.float32)
    whole = QuantizedWeight(q.data, q.scale, q.minimum, QuantScheme(scheme.format, scheme.group_size, 1 << 20))
    assert torch.equal(quantized_linear(x, whole, bias), F.linear(x, dequantize(q, q.scale.dtype), bias))
    chunked = quantized_linear(x, q, bias)  # 8 chunks of 7 rows (the last one of 1)
    assert chunked.shape == (3, 5, 50)
    torch.testing.assert_close(chunked, F.linear(x, dequantize(q, q.scale.dtype), bias), rtol=1e-6, atol=1e-6)


def test_dequantize_scratch_counts_a_chunk_and_its_product():
    e = torch.bfloat16.itemsize
    per_weight = 4 + e + 1  # the float32 values, the rounded chunk, half a chunk of uint8 (counted whole)
    whole = {"wqkv": (int8_scheme(1000), 384, 128)}
    shapes = {name: (scheme, rows, cols) for name, (scheme, rows, cols) in whole.items()}
    assert scratch_bytes(shapes, torch.bfloat16, 64) == 384 * 128 * per_weight  # one chunk: the product is the output
    chunked = {"w_down": (int4_scheme(32, 100), 300, 352)}
    assert scratch_bytes(chunked, torch.bfloat16, 64) == 100 * 352 * per_weight + 64 * 100 * e  # and its product
    fused = {"w_down": (QuantScheme("int4", 32, 100, kernel="fused"), 300, 352)}
    assert scratch_bytes(fused, torch.bfloat16, 64) == 0  # the kernels keep their tiles in registers


# ---------------------------------------------------------------------- group sizes


def test_group_size_is_the_default_or_the_largest_smaller_power_of_two_that_divides():
    assert DEFAULT_GROUP_SIZE == 128
    assert group_size_for(4096, 4096, 1, None, "w") == 128
    assert group_size_for(576, 576, 1, None, "w") == 64
    assert group_size_for(352, 352, 1, None, "w") == 32
    assert group_size_for(64, 64, 1, None, "w") == 64
    assert group_size_for(576, 576, 1, 32, "w") == 32
    with pytest.raises(offload.InputError, match="even input dimension"):
        group_size_for(575, 575, 1, None, "w")


def test_a_given_group_size_that_does_not_divide_is_refused():
    with pytest.raises(offload.InputError, match="group size 128 does not divide the input dimension 576 of wqkv"):
        group_size_for(576, 576, 1, 128, "wqkv")


def test_groups_never_straddle_a_tensor_parallel_shard():
    config = config_from_dict(shape_config("tiny"))  # intermediate 352: w_down holds 176 columns per rank at tp=2
    fmt = WeightFormat("int4", group_size=32)
    assert Llama.layer_layout(config, TensorParallel(), torch.float32, fmt).quantized["w_down"].scheme.group_size == 32
    with pytest.raises(offload.InputError, match=r"does not divide the input dimension 176 of w_down \(352 split "
                                                 r"over 2 tensor-parallel ranks\)"):
        Llama.layer_layout(config, TensorParallel(rank=1, size=2), torch.float32, fmt)
    # the default rule looks at the shard: 176 = 16 x 11
    shard = Llama.layer_layout(config, TensorParallel(rank=1, size=2), torch.float32, WeightFormat("int4"))
    assert shard.quantized["w_down"].scheme.group_size == 16 and shard.quantized["w_down"].cols == 176
    assert shard.quantized["wo"].cols == 64 and shard.quantized["wqkv"].cols == 128


@pytest.mark.parametrize("kwargs, words", [
    (dict(quantize="int3"), "unsupported quantize 'int3'"),
    (dict(quantize="int8", group_size=64), "int8 has one scale per output channel"),
    (dict(group_size=64), "nothing is quantized"),
    (dict(quantize="int4", group_size=7), "even positive integer"),
    (dict(quantize="int4", group_size=0), "even positive integer"),
])
def test_bad_quantize_options(kwargs, words):
    with pytest.raises(offload.InputError, match=words):
        offload.LoadOptions(**kwargs)


# ---------------------------------------------------------------------- layouts


@pytest.mark.parametrize("tp_size", [1, 2])
def test_block_bytes_are_the_parts_and_views_are_quantized_weights(tp_size):
    config = config_from_dict(shape_config("tiny"))
    tp = TensorParallel(rank=tp_size - 1, size=tp_size)
    dense = Llama.layer_layout(config, tp, torch.bfloat16)
    for fmt, ratio in [("int8", 0.5), ("int4", 0.25)]:
        layout = Llama.layer_layout(config, tp, torch.bfloat16, WeightFormat(fmt))
        assert set(layout.quantized) == {"wqkv", "wo", "w_gate_up", "w_down"}
        parts = sum(s.nbytes for s in layout.specs)
        assert parts <= layout.nbytes < parts + 256 * len(layout.specs)  # at most alignment between them
        assert ratio < layout.nbytes / dense.nbytes < ratio + 0.12  # + scales, norms and alignment
        block = torch.zeros(layout.nbytes, dtype=torch.uint8)
        views, dense_views = layout.views(block), dense.views(torch.zeros(dense.nbytes, dtype=torch.uint8))
        for name in layout.quantized:
            q, d = getattr(views, name), getattr(dense_views, name)
            assert isinstance(q, QuantizedWeight) and (q.rows, q.cols) == tuple(d.shape)
            assert q.data.untyped_storage().data_ptr() == block.untyped_storage().data_ptr()  # a view, not a copy
        assert views.input_norm.dtype == torch.bfloat16 and views.input_norm.shape == (config.hidden_size,)


def test_an_untied_lm_head_is_int8_where_the_layers_are_quantized():
    """``quant.head_format``: int8 per channel (one scale a vocabulary row) for an int8 or int4 model, its parts
    views of the globals' block; dense for a dense model, a tied head (the embedding itself) and a vocabulary the
    tensor-parallel ranks pad."""
    config, tp = config_from_dict(shape_config("tiny")), TensorParallel()
    dense = global_layout(config, tp, torch.bfloat16)
    assert not dense.quantized and global_layout(config, tp, torch.bfloat16, head_format(None)).nbytes == dense.nbytes
    for fmt in ("int8", "int4"):
        layout = global_layout(config, tp, torch.bfloat16, head_format(WeightFormat(fmt)))
        head = layout.views(torch.zeros(layout.nbytes, dtype=torch.uint8))["lm_head"]
        assert isinstance(head, QuantizedWeight) and (head.rows, head.cols) == (config.vocab_size, config.hidden_size)
        assert head.scheme.format == "int8" and head.scheme.group_size is None
        assert layout.nbytes < dense.nbytes * 0.55
    tied = replace(config, tie_word_embeddings=True)
    assert not global_layout(tied, tp, torch.bfloat16, head_format(WeightFormat("int4"))).quantized
    padded = replace(config, vocab_size=config.vocab_size - 1)  # two ranks pad one row
    two = TensorParallel(rank=0, size=2)
    assert not global_layout(padded, two, torch.bfloat16, head_format(WeightFormat("int8"))).quantized
    assert global_layout(config, two, torch.bfloat16, head_format(WeightFormat("int8"))).quantized


def test_the_int4_draft_is_planned_with_its_targets_lm_head():
    """The int4 draft reads its target's final norm and LM head (the same memory): its layout and its plan's price
    of a step are the target's dense head, not the int8 head its own format would give it."""
    options = offload.LoadOptions(device="cpu", dtype="bfloat16", gpu_memory="4GiB", max_batch=1, max_seq_len=256,
                                  draft="int4", link_bandwidth={"host": 20e9, "hbm": 2e12, "matmul": 1e14})
    setup = prepare(shape_config("tiny"), options)
    assert setup.draft is not None and not setup.globals_layout.quantized
    assert setup.draft.globals_layout is setup.globals_layout
    assert setup.draft.plan.needs.global_bytes == setup.plan.needs.global_bytes and not setup.draft.plan.needs.head_products


def test_no_quantize_keeps_the_dense_layout():
    config = config_from_dict(shape_config("llama-2-13b"))
    layout = Llama.layer_layout(config, TensorParallel(), torch.bfloat16)
    assert not layout.quantized and {s.part for s in layout.specs} == {""}
    assert layout.nbytes == 2 * (5120 * (4 * 5120) + 3 * 5120 * 13824 + 2 * 5120)


# ---------------------------------------------------------------------- loading


class RecordingSource(RandomSource):
    """Seeded random weights that note every read: (name, shape, dtype)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.reads = []

    def read(self, spec, name, out):
        self.reads.append((name, tuple(out.shape), out.dtype))
        super().read(spec, name, out)


def test_loading_reads_each_tensor_once_in_the_model_dtype_and_quantizes_it(tiny):
    setup = prepare(tiny, offload.LoadOptions(dtype="bf16", quantize="int4", max_seq_len=MAX_SEQ))
    source = RecordingSource(seed=3)
    pool = load_weights(setup, source, progress=False)
    names = [name for name, _, _ in source.reads]
    assert len(names) == len(set(names))  # one read per checkpoint tensor
    config = setup.config
    assert ("model.layers.0.mlp.down_proj.weight", (config.hidden_size, config.intermediate_size),
            torch.bfloat16) in source.reads
    # the block holds what quantizing the dense tensor gives
    views = setup.blocks[0].layout.views(pool.blocks[0])
    dense = torch.empty(config.hidden_size, config.intermediate_size, dtype=torch.bfloat16)
    data = next(s for s, _ in setup.blocks[0].sources() if s.name == "w_down.data")
    RandomSource(seed=3).read(replace(data, part="", quant=None), "model.layers.0.mlp.down_proj.weight", dense)
    parts = quantize(dense, views.w_down.scheme, torch.bfloat16)
    assert torch.equal(views.w_down.data, parts["data"]) and torch.equal(views.w_down.scale, parts["scale"])
    pool.close()


# ---------------------------------------------------------------------- whole models: offloading


def _quantized(path, fmt, **kw):
    return offload.load_model(path, progress=False, dtype=torch.float32, max_batch=2, max_seq_len=MAX_SEQ,
                              quantize=fmt, **kw)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_offloaded_equals_resident_bitwise(tiny, fmt):
    ids = torch.randint(0, 1024, (2, 20), generator=torch.Generator().manual_seed(4))
    with _quantized(tiny, fmt) as resident:
        assert set(resident.plan.placement) == {"resident"}
        logits, tokens = resident(ids), resident.generate(ids[:, :12], max_new_tokens=8, ignore_eos=True)
        needs = resident.plan.needs
    with offload.load_model(tiny, progress=False, dtype=torch.float32, max_batch=2, max_seq_len=MAX_SEQ) as dense:
        assert (logits - dense(ids)).abs().max() > 0  # the weights really are quantized
    budgets = [dict(gpu_memory=needs.fixed_bytes + 3 * needs.largest_block, cpu_memory="1GiB"),  # 1 resident + 2 slots
               dict(gpu_memory=needs.fixed_bytes + 5 * needs.largest_block, cpu_memory="1GiB",  # host and a peer
                    peer_memory={"cpu:1": "1GiB"}, link_bandwidth={"host": 10e9, "cpu:1": 10e9, "hbm": 100e9})]
    for budget in budgets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OffloadWarning)
            model = _quantized(tiny, fmt, **budget)
        with model:
            assert model.plan.placement.count("resident") == 1
            assert torch.equal(model(ids), logits)
            assert torch.equal(model.generate(ids[:, :12], max_new_tokens=8, ignore_eos=True), tokens)


# ---------------------------------------------------------------------- the plan


def _plan(path, **kw):
    options = dict(dtype="bf16", gpu_memory="8GiB", cpu_memory="64GiB", max_seq_len=2048, max_step_tokens=2048,
                   link_bandwidth={"host": 55e9, "hbm": 4e12}) | kw  # one chunk size: the formats' own reserves compare
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        return offload.plan_model(path, **options)


def test_quantized_layers_are_smaller_so_more_are_resident_and_fewer_bytes_stream(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(shape_config("llama-2-13b")))
    plans = {fmt: _plan(tmp_path, quantize=fmt) for fmt in (None, "int8", "int4")}
    block = {fmt: p.needs.largest_block for fmt, p in plans.items()}
    resident = {fmt: p.placement.count("resident") for fmt, p in plans.items()}
    assert 0.50 < block["int8"] / block[None] < 0.51 and 0.26 < block["int4"] / block[None] < 0.27
    assert resident[None] < resident["int8"] < resident["int4"] < 40
    for fmt in ("int8", "int4"):
        p = plans[fmt]
        assert p.gpu_bytes <= 8 * 2**30
        assert p.host_bytes / len(p.blocks_on("host")) == block[fmt]  # each streamed layer costs its compressed bytes
        assert p.needs.dequant_bytes > 0 and p.needs.fixed_bytes > plans[None].needs.fixed_bytes
        assert p.predicted_step_seconds < plans[None].predicted_step_seconds
    text = str(plans["int4"])
    assert "layer weights: int4, group size 128: 160.72 MiB per layer, 0.27x the 605.02 MiB of bfloat16" in text
    assert "dequantize scratch" in text and "layer weights" not in str(plans[None])


def test_plan_says_which_weights_take_a_smaller_group_and_why(tmp_path):
    config = dict(shape_config("llama-2-7b"), hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                  num_key_value_heads=3, num_hidden_layers=4)
    (tmp_path / "config.json").write_text(json.dumps(config))
    text = str(_plan(tmp_path, quantize="int4"))
    assert "int4, group size 128 for w_down; 64 for wqkv, wo, w_gate_up (128 does not divide 576)" in text
    assert "int4, group size 64:" in str(_plan(tmp_path, quantize="int4", group_size=64))


def test_dequantize_scratch_is_inside_the_budget(tiny):
    plain = _plan(tiny, max_batch=1)
    plan = _plan(tiny, quantize="int8", max_batch=1)
    n = plan.needs
    assert n.fixed_bytes == n.global_bytes + n.kv_bytes + n.activation_bytes + n.workspace_bytes + n.rope_bytes \
        + n.dequant_bytes
    assert n.dequant_bytes > 0 and plain.needs.dequant_bytes == 0
    with pytest.raises(offload.PlanError, match="dequantize scratch"):
        _plan(tiny, quantize="int8", max_batch=1, gpu_memory=n.fixed_bytes - 1)


# ---------------------------------------------------------------------- bad input


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("run_offloaded: error:"), err
    return err


@pytest.mark.parametrize("argv, words", [
    (["--quantize", "int3"], "invalid choice: 'int3'"),
    (["--quantize", "int4", "--group-size", "96"], "group size 96 does not divide the input dimension 128 of wqkv"),
    (["--quantize", "int8", "--group-size", "64"], "int8 has one scale per output channel"),
])
def test_bad_quantize_flags_are_one_line(tiny, capsys, argv, words):
    assert words in one_line_error(capsys, ["--model", str(tiny), "--plan", *argv])


def test_plan_flag_prints_the_format(tiny, capsys):
    assert main(["--model", str(tiny), "--plan", "--quantize", "int4"]) == 0
    out = capsys.readouterr().out
    assert "layer weights: int4, group size 128 for wqkv, wo, w_gate_up; 32 for w_down (128 does not divide 352)" \
        in out


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
def test_an_already_quantized_checkpoint_is_refused_naming_its_method(tmp_path, capsys, method):
    config = dict(shape_config("tiny"), quantization_config={"quant_method": method, "bits": 4})
    (tmp_path / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, ["--model", str(tmp_path), "--plan", "--quantize", "int4"])
    assert f"already quantized ({method})" in err
    with pytest.raises(offload.ConfigError, match=method):
        offload.plan_model(tmp_path)


# ---------------------------------------------------------------------- a model with structure


def _perplexity(model, ids: torch.Tensor) -> float:
    log_p = torch.log_softmax(model(ids)[:, :-1].float(), dim=-1)
    return math.exp(-log_p.gather(2, ids[:, 1:, None]).mean().item())


@pytest.fixture(scope="module")
def structured_models(structured):
    kw = dict(dtype=torch.float32, max_batch=8, max_seq_len=128, max_step_tokens=8 * 64, progress=False)
    models = {fmt: offload.load_model(structured, quantize=fmt, **kw) for fmt in (None, "int8", "int4")}
    yield models
    for model in models.values():
        model.close()


@pytest.mark.slow
def test_the_structured_model_has_learned_its_corpus(structured, structured_models):
    corpus = corpus_of(structured)
    ids = corpus.sample(8, 64, seed=777)
    ppl = _perplexity(structured_models[None], ids)
    assert ppl < 1.25 * math.exp(corpus.entropy)  # near the chain's own perplexity (~2.96); uniform would be 64
    top = torch.softmax(structured_models[None](ids)[:, 1:-1], dim=-1).amax(-1)
    assert top.median() > 0.5  # clear favourites: quantization is tested against real choices


@pytest.mark.slow
def test_int8_keeps_greedy_tokens_for_32_steps(structured, structured_models):
    prompts = corpus_of(structured).sample(8, 8, seed=778)
    want = structured_models[None].generate(prompts, max_new_tokens=32, ignore_eos=True)
    got = structured_models["int8"].generate(prompts, max_new_tokens=32, ignore_eos=True)
    assert torch.equal(got, want)


@pytest.mark.slow
def test_int4_keeps_perplexity_within_a_few_percent(structured, structured_models):
    ids = corpus_of(structured).sample(8, 64, seed=779)
    base = _perplexity(structured_models[None], ids)
    for fmt, limit in [("int8", 1.005), ("int4", 1.03)]:
        assert _perplexity(structured_models[fmt], ids) <= limit * base, fmt
    assert not torch.equal(structured_models["int4"](ids), structured_models[None](ids))


def _rank_needs(path, ranks, **options):
    """What one of ``ranks`` tensor-parallel ranks needs (every rank needs the same here), without torchrun."""
    config, tp = offload.load_config(path), TensorParallel(rank=0, size=ranks)
    options = offload.LoadOptions(**options)
    fmt = WeightFormat(options.quantize, options.group_size)
    dtype = options.dtype
    blocks = Llama.blocks(config, tp, dtype, fmt)
    # the chunk size the loader picks (loading.prepare), not max_seq_len: it sizes the activations reserved
    options = options.replace(max_step_tokens=options.max_step_tokens or _chunk_size(Llama, config, tp, dtype, options,
                                                                                    blocks))
    return memory_needs(Llama, config, tp, dtype, torch.device("cpu"), options, blocks,
                        global_layout(config, tp, dtype, head_format(fmt)), embedding_layout(config, tp, dtype))


@pytest.mark.slow
def test_quantized_tensor_parallel_shards(structured):
    """Each rank quantizes its own shard. With a group size that divides every shard, int4 groups are those of
    the single-rank model, so the ranks compute its logits (up to the all-reduce's summation order)."""
    from test_tensor_parallel import run_tp

    ids = corpus_of(structured).sample(2, 20, seed=780)
    kw = dict(dtype=torch.float32, device="cpu", max_batch=2, max_seq_len=48, max_step_tokens=48)  # _rank_needs sizes chunks so
    for fmt, group in [("int4", 8), ("int8", None)]:
        with offload.load_model(structured, quantize=fmt, group_size=group, progress=False, **kw) as single:
            want_logits, want_tokens = single(ids), single.generate(ids, max_new_tokens=8, ignore_eos=True)
        needs = _rank_needs(structured, 2, quantize=fmt, group_size=group, **kw)
        budget = needs.fixed_bytes + needs.largest_block + needs.largest_block // 2  # one slot: both layers stream
        results = run_tp(2, structured, ids, quantize=fmt, group_size=group, gpu_memory=budget, cpu_memory="1GiB",
                         slots=1, **kw)
        for result in results:
            assert not isinstance(result, str), result
            logits, tokens, placement, _ = result
            assert placement == ["host", "host"]
            assert torch.equal(tokens, want_tokens), fmt
            # int8's o and down scales are per shard (each rank's own maximum), so only int4's logits are the same
            assert (logits - want_logits).abs().max().item() <= (1e-4 if fmt == "int4" else 5e-2), fmt


# ---------------------------------------------------------------------- on a GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_free():
    import gc

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gpu_offloaded_equals_resident_bitwise(fmt):
    ids = torch.randint(0, 32000, (2, 30), generator=torch.Generator().manual_seed(0))
    shape = shape_config("llama-2-7b") | {"num_hidden_layers": 6}
    kw = dict(random_weights=1234, dtype=torch.bfloat16, max_batch=2, max_seq_len=64, progress=False, quantize=fmt)
    with offload.load_model(shape, **kw) as resident:
        want = resident(ids), resident.generate(ids, max_new_tokens=8, ignore_eos=True)
        needs = resident.plan.needs
    _gpu_free()
    for n_resident in (3, 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = offload.load_model(shape, gpu_memory=needs.fixed_bytes + (n_resident + 2) * needs.largest_block,
                                       cpu_memory="8GiB", **kw)
        with model:
            assert model.plan.placement.count("resident") == n_resident
            assert torch.equal(model(ids), want[0])
            assert torch.equal(model.generate(ids, max_new_tokens=8, ignore_eos=True), want[1])
        _gpu_free()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gpu_peak_memory_with_dequantize_scratch_stays_in_budget(fmt):
    _gpu_free()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    budget = int(3.5 * 2**30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = offload.load_model(shape_config("llama-2-7b"), random_weights=1234, dtype=torch.bfloat16,
                                   gpu_memory=budget, cpu_memory="12GiB", max_batch=4, max_seq_len=512,
                                   max_step_tokens=1024, progress=False, quantize=fmt)
    with model:
        assert model.plan.host_bytes > 0
        ids = torch.randint(0, 32000, (4, 200), generator=torch.Generator().manual_seed(1))
        model(ids[:, :256])  # a full-logits forward over max_step_tokens
        model.generate(ids, max_new_tokens=16, ignore_eos=True)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        pool = graph_pool_bytes(model)
        print(f"\n{fmt}: peak {peak / 2**30:.3f} GiB + graph pool {pool / 2**20:.0f} MiB of a "
              f"{budget / 2**30:.2f} GiB budget; plan {model.plan.gpu_bytes / 2**30:.3f} GiB (dequantize scratch "
              f"{model.plan.needs.dequant_bytes / 2**20:.1f} MiB); layers {model.plan.layer_map()}")
        assert peak + pool <= budget
        assert pool <= model.plan.needs.graph_bytes


# ---------------------------------------------------------------------- every architecture


_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("key, arch, extra", [
    ("quant-qwen2-bias", "qwen2", {}),
    ("quant-llama-attention-bias", "llama", {"attention_bias": True}),
    ("quant-llama-tied", "llama", {"tie_word_embeddings": True}),
    ("quant-mistral-window", "mistral", {"sliding_window": 8}),
])
def test_quantized_models_stay_close_to_transformers(checkpoint_factory, key, arch, extra):
    """Biases (q, k, v and o), tied embeddings and windows are untouched by quantization: the logits stay
    within quantization error of the reference (random weights are int4's worst case: every group is a
    Gaussian), and int8 is closer than int4."""
    hf, directory = checkpoint_factory(key, arch, "5.x", seed=31, **_SMALL, **extra)
    config = offload.load_config(directory)
    layout = Llama.layer_layout(config, TensorParallel(), torch.float32, WeightFormat("int4"))
    views = layout.views(torch.zeros(layout.nbytes, dtype=torch.uint8))
    assert (views.bqkv is not None) == config.qkv_bias and (views.bo is not None) == config.o_bias
    ids = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(ids).logits
    errors, agreement = {}, {}
    for fmt in ("int8", "int4"):
        with _quantized(directory, fmt) as model:
            logits = model(ids)
        errors[fmt] = (logits - ref).abs().max().item()
        agreement[fmt] = F.cosine_similarity((logits - logits.mean(-1, keepdim=True)).flatten(),
                                             (ref - ref.mean(-1, keepdim=True)).flatten(), dim=0).item()
    assert 0 < errors["int8"] < 0.1 * ref.std().item() and errors["int8"] < errors["int4"]
    assert agreement["int8"] > 0.999 and agreement["int4"] > 0.9


# ---------------------------------------------------------------------- quantized checkpoints saved once


@pytest.mark.parametrize("fmt, group", [("int4", None), ("int4", 32), ("int8", None)])
def test_a_saved_quantized_checkpoint_loads_as_quantizing_while_loading_does(tiny, tmp_path, fmt, group):
    from offload.quantized import write_quantized

    out = write_quantized(tiny, tmp_path / "q", fmt, group, dtype=torch.float32, progress=False)
    ids = torch.randint(3, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    kw = dict(dtype=torch.float32, progress=False, max_seq_len=MAX_SEQ)
    with offload.load_model(tiny, quantize=fmt, group_size=group, **kw) as quantizing, \
            offload.load_model(out, **kw) as saved:
        assert saved.plan.needs.blocks == quantizing.plan.needs.blocks
        assert isinstance(saved.decoder.weights.lm_head, QuantizedWeight)  # read as it is stored, in int8
        assert torch.equal(saved(ids), quantizing(ids))
        assert "as stored" in str(saved.plan)
    with pytest.raises(offload.InputError, match="stored int"):
        offload.plan_model(out, quantize="int8")


def test_a_saved_int8_head_is_read_dense_where_tensor_parallel_ranks_pad_the_vocabulary(tmp_path):
    """``write_quantized`` runs on one rank and stores the untied head in int8; ranks that pad the vocabulary keep
    a dense head, which the checkpoint gives them dequantized from its parts (the padding row zero), the parts not
    read ahead (the reads that go ahead of a load know only tensors read as they are stored)."""
    from offload.models.checkpoint import CheckpointSource
    from offload.quantized import write_quantized

    config = shape_config("tiny") | {"vocab_size": 1023}
    out = write_quantized(config, tmp_path / "q", "int8", dtype=torch.float32, progress=False, random_weights=5)
    source = CheckpointSource(out)
    assert source.stores_parts("lm_head.weight")
    parts = {p: source._open(source._file_of[f"lm_head.weight.{p}"]).get_tensor(f"lm_head.weight.{p}")
             for p in ("data", "scale")}
    whole = dequantize(QuantizedWeight(parts["data"], parts["scale"], None,
                                       QuantScheme("int8", None, 1 << 20, "dequantize")), torch.float32)
    stored = WeightFormat("int8", per_tensor=source.stored)
    for rank in (0, 1):
        tp = TensorParallel(rank=rank, size=2)
        layout = global_layout(config_from_dict(config), tp, torch.float32, head_format(stored))
        assert not layout.quantized
        blocks = Llama.blocks(config_from_dict(config), tp, torch.float32, stored)
        embedding = embedding_layout(config_from_dict(config), tp, torch.float32)
        every = layout.sources() + embedding.sources() + [x for block in blocks for x in block.sources()]
        source.validate(every)
        source.read_in_order(every)  # read ahead
        spec, name = next((spec, name) for spec, name in layout.sources() if spec.name == "lm_head")
        got = torch.empty(spec.shape)
        source.read(spec, name, got)
        assert torch.equal(got[: spec.shard.stop - spec.shard.start], whole[spec.shard.start : spec.shard.stop])
        assert rank == 0 or not got[-1].any()  # rank 1's last row pads the vocabulary
    source.close()


def test_a_quantized_checkpoint_of_random_weights_is_what_loading_them_quantized_gives(tmp_path):
    """A large model's saved int4 checkpoint is written without its 16-bit one: seeded random weights, made
    and quantized a tensor at a time, load bitwise as ``load_model(config, random_weights=seed, quantize=...)``."""
    from offload.models.shapes import shape_config
    from offload.quantized import write_quantized

    config = shape_config("tiny")
    out = write_quantized(config, tmp_path / "q", "int4", 32, dtype=torch.float32, progress=False, random_weights=3)
    ids = torch.randint(3, 1000, (1, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(dtype=torch.float32, progress=False, max_seq_len=MAX_SEQ)
    with offload.load_model(config, random_weights=3, quantize="int4", group_size=32, **kw) as quantizing, \
            offload.load_model(out, **kw) as saved:
        assert torch.equal(saved(ids), quantizing(ids))


def test_the_quantize_script_writes_a_checkpoint_that_streams(tiny, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("quantize_script", ROOT / "scripts" / "quantize.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "int4"
    assert script.main(["--model", str(tiny), "--quantize", "int4", "--out", str(out), "--dtype", "fp32"]) == 0
    assert (out / "tokenizer.json").is_file() and json.loads((out / "config.json").read_text())[
        "offload_quantization"]["format"] == "int4"
    needs = offload.plan_model(out, max_seq_len=MAX_SEQ).needs
    with offload.load_model(out, max_seq_len=MAX_SEQ, progress=False, cpu_memory="1GiB",
                            gpu_memory=needs.gpu_budget_streaming(4)) as model:
        assert model.plan.placement.count("host") == 4
        assert len(model.generate([[5, 6, 7]], max_new_tokens=4, ignore_eos=True)[0]) == 7
    capsys.readouterr()  # the progress bar
    assert script.main(["--model", str(tmp_path / "nowhere"), "--quantize", "int4", "--out", str(out)]) == 2
    assert script.main(["--model", str(tiny), "--quantize", "int3", "--out", str(out)]) == 2
    assert script.main(["--model", str(tiny), "--quantize", "int8", "--rounding", "minmax", "--out", str(out)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("quantize: error:") for line in errors)
    assert "--rounding is for int4" in errors[2]


def _quantize_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quantize_script", ROOT / "scripts" / "quantize.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _contents(directory: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir())}


def test_the_quantize_script_never_writes_over_a_checkpoint_or_into_one(tiny, tmp_path, capsys):
    """Refused before anything is written: the model's own directory, one inside it, an empty name, a directory
    with files in it, a file; and a GGUF file as the model. The source checkpoint is left byte for byte."""
    script, before = _quantize_script(), _contents(tiny)
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    cases = [(tiny, str(tiny)), (tiny, str(tiny / "int4")), (tiny, ""), (tiny, str(full)),
             (tiny, str(full / "notes.txt")), (gguf, str(tmp_path / "out"))]
    for model, out in cases:
        assert script.main(["--model", str(model), "--quantize", "int4", "--out", out]) == 2, out
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == len(cases) and all(line.startswith("quantize: error:") for line in errors)
    assert _contents(tiny) == before and _contents(full) == {"notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "model.gguf"]  # nothing else made


@pytest.mark.parametrize("size", ["0", "0GiB"])
def test_the_quantize_script_refuses_a_shard_size_of_nothing(tiny, tmp_path, capsys, size):
    """0 bytes a shard would write a shard for every tensor: refused before anything is written."""
    out = tmp_path / "int4"
    assert _quantize_script().main(["--model", str(tiny), "--quantize", "int4", "--out", str(out),
                                    "--shard-size", size]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("quantize: error: --shard-size must be positive"), err
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_quantize_leaves_no_checkpoint(tiny, tmp_path, monkeypatch):
    """The checkpoint is written beside ``out`` and renamed to it once whole: a run stopped after its first shard
    leaves neither ``out`` nor the partial directory (a run killed outright leaves only the hidden partial one)."""
    from offload import quantized

    def failing_flush(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantized._ShardWriter, "_flush", failing_flush)
    with pytest.raises(KeyboardInterrupt):
        quantized.write_quantized(tiny, tmp_path / "int8", "int8", progress=False, shard_bytes=1 << 16)
    assert list(tmp_path.iterdir()) == []


def test_a_quantize_removes_what_killed_runs_left_and_nothing_else(tiny, tmp_path):
    """A run killed outright leaves its hidden partial directory (shards of gigabytes); the next run into the same
    ``out`` removes those whose process is gone, and keeps a live run's and anything else."""
    import os
    import socket
    import subprocess
    import sys

    from offload import quantized

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, live = socket.gethostname(), os.getppid()
    left = [tmp_path / f".int8.{host}-{gone.stdout.strip()}.partial", tmp_path / f".int8.{host}-{live}.partial",
            tmp_path / f".other.{host}-{gone.stdout.strip()}.partial", tmp_path / ".int8.elsewhere-1.partial"]
    for folder in left:
        folder.mkdir()
        (folder / "model-00001.safetensors").write_bytes(b"half a shard")
    quantized.write_quantized(tiny, tmp_path / "int8", "int8", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["int8", *(p.name for p in left[1:])])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_random_weights_to_quantize_are_made_packed_with_the_dense_spread_whatever_the_split(fmt):
    """``load_model(config, random_weights=SEED, quantize=...)`` makes quantized weights in their parts: integers
    over the whole range, the dense numbers' spread once dequantized; rank 1's shard of a column-parallel and of
    a row-parallel weight (each over several generated chunks) is the whole's rows or columns."""
    config = shape_config("llama-2-7b") | {"num_hidden_layers": 1}
    setup = prepare(config, offload.LoadOptions(dtype="bfloat16", quantize=fmt, max_seq_len=64, device="cpu"))
    source = RandomSource(seed=3, packed=True)
    for name, dim in [("model.layers.0.mlp.up_proj.weight", 0), ("model.layers.0.mlp.down_proj.weight", 1)]:
        specs = {s.part: s for s, n in setup.blocks[0].sources() if n == name}
        parts = {part: torch.empty(spec.shape, dtype=spec.dtype) for part, spec in specs.items()}
        for part, spec in specs.items():
            source.read(spec, name, parts[part])
        if dim == 1:
            weight = QuantizedWeight(parts["data"], parts["scale"], parts.get("minimum"), specs["data"].quant)
            values = dequantize(weight, torch.float64)
            assert abs(values.std().item() - source.std) < 0.02 * source.std
            assert abs(values.mean().item()) < 0.02 * source.std
            assert parts["data"].min().item() == (0 if fmt == "int4" else -127)
            assert parts["data"].max().item() == (255 if fmt == "int4" else 127)
        data = specs["data"]
        assert data.numel > 2 * RandomSource.CHUNK_ELEMENTS
        whole = data.full_shape[dim]
        rank1 = Shard(dim, whole // 2, whole)
        piece = torch.empty([n // 2 if d == dim else n for d, n in enumerate(data.shape)], dtype=data.dtype)
        source.read(replace(data, shard=rank1, shape=tuple(piece.shape)), name, piece)
        assert torch.equal(piece, parts["data"].narrow(dim, data.shape[dim] // 2, data.shape[dim] // 2))
