"""GGUF files of mixtures of experts (qwen2moe, qwen3moe, olmoe, and Mixtral written as llama): their experts
stacked one tensor per projection and layer, read as each expert's tensor.

Each family's tiny checkpoint (written by ``transformers``) is written as llama.cpp's converter writes it
(experts stacked, q/k rows permuted for llama, Qwen2-MoE's shared expert gate as a vector) and loads to the same
logits as the checkpoint, bit for bit in float32; a file whose layers store their experts in different formats
(a Q4_K_M file's way) streams its experts through the device cache, and reads them directly, as it computes them
resident; ``transformers`` reading the same Qwen files agrees (the slow tests).
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import offload  # noqa: E402
from offload.errors import CheckpointError, ConfigError  # noqa: E402
from offload.gguf import (GGUFCheckpoint, TensorToWrite, hf_config, hf_names, permute_like_llama_cpp,  # noqa: E402
                          write_gguf)
from offload.loading import prepare  # noqa: E402
from offload.models import kernels  # noqa: E402
from offload.models.expert_kernels import INT4, INT8_GROUPS  # noqa: E402
from offload.options import LoadOptions  # noqa: E402

from test_gguf import arch_metadata, metadata_only_file  # noqa: E402
from test_moe import _BASE, MODELS, _ids, _streamed  # noqa: E402

KW = dict(dtype=torch.float32, max_seq_len=64, max_batch=2, progress=False)
# GGUF architecture -> (the checkpoint's family in test_moe, what its config changes: a GGUF file keeps no
# mlp_only_layers, and no clip_qkv)
FAMILIES = {
    "llama": ("mixtral", {}),
    "qwen2moe": ("qwen2_moe", {"mlp_only_layers": []}),
    "qwen3moe": ("qwen3_moe", {}),
    "olmoe": ("olmoe", {"clip_qkv": None}),
}


def n_experts(config) -> int:
    return getattr(config, "num_experts", None) or config.num_local_experts


def moe_metadata(arch: str, config, stacked_width: bool = True) -> dict:
    """What llama.cpp's converter writes for a mixture of experts' config (``stacked_width``: the experts' width
    as ``expert_feed_forward_length``, where Mixtral's and OLMoE's converters leave it to feed_forward_length)."""
    meta = {**arch_metadata(arch, config, "tiny moe"), f"{arch}.expert_count": n_experts(config),
            f"{arch}.expert_used_count": config.num_experts_per_tok,
            "tokenizer.ggml.bos_token_id": config.bos_token_id, "tokenizer.ggml.eos_token_id": config.eos_token_id}
    if arch == "qwen3moe":
        meta[f"{arch}.attention.key_length"] = meta[f"{arch}.attention.value_length"] = config.head_dim
    if arch in ("qwen2moe", "qwen3moe") and stacked_width:
        meta[f"{arch}.expert_feed_forward_length"] = config.moe_intermediate_size
    if arch == "qwen2moe":
        meta[f"{arch}.expert_shared_feed_forward_length"] = config.shared_expert_intermediate_size
    if arch in ("llama", "olmoe"):
        meta[f"{arch}.feed_forward_length"] = config.intermediate_size
    return meta


def write_moe_gguf(path, directory, arch: str, config, type_of=None, stacked: bool = True):
    """The checkpoint in ``directory`` as llama.cpp writes it: experts stacked (or, not ``stacked``, each expert's
    tensor apart, as early Mixtral files), q/k permuted (llama), the shared expert gate a vector;
    ``type_of(gguf name, layer)`` gives a tensor's type (F32 where it says None)."""
    state = load_file(directory / "model.safetensors")
    architecture = "MixtralForCausalLM" if arch == "llama" else None
    names = hf_names(arch, config.num_hidden_layers, architecture)
    stacks = {g: [hf.format(e=e) for e in range(n_experts(config))] for g, hf in names.items() if "{e}" in hf}
    to_gguf = {hf: g for g, hf in names.items() if "{e}" not in hf}
    if not stacked:  # each expert's tensor apart: blk.N.ffn_gate.E.weight
        to_gguf.update({m: g.replace("_exps.", f".{e}.") for g, members in stacks.items()
                        for e, m in enumerate(members)})
    in_stacks = {m for members in stacks.values() for m in members}
    weights = []
    if stacked:
        weights += [(g, torch.stack([state[m] for m in members])) for g, members in stacks.items()
                    if members[0] in state]
    for hf, w in state.items():
        if (stacked and hf in in_stacks) or (hf == "lm_head.weight" and config.tie_word_embeddings):
            continue
        g = to_gguf[hf]
        if arch == "llama" and ".attn_q." in g:
            w = permute_like_llama_cpp(w, config.num_attention_heads)
        if arch == "llama" and ".attn_k." in g:
            w = permute_like_llama_cpp(w, config.num_key_value_heads)
        weights.append((g, w.reshape(-1) if g.endswith("ffn_gate_inp_shexp.weight") else w))
    tensors = []
    for g, w in weights:
        layer = int(g.split(".")[1]) if g.startswith("blk.") else None
        kind = (type_of(g, layer) if type_of else None) or T.F32
        values = w.float().numpy()
        data = values if kind == T.F32 else gguf.quants.quantize(values, kind)
        tensors.append(TensorToWrite(g, kind, tuple(w.shape), lambda data=data: data))
    write_gguf(path, arch, moe_metadata(arch, config), tensors)
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_file(request, checkpoint_factory, tmp_path_factory):
    arch = request.param
    family, changes = FAMILIES[arch]
    hf, directory = checkpoint_factory(f"gguf-moe-{family}", family, "5.x", seed=9,
                                       **{**_BASE, **MODELS[family], **changes})
    path = write_moe_gguf(tmp_path_factory.mktemp(arch) / f"{arch}.gguf", directory, arch, hf.config)
    return arch, hf, directory, path


def test_each_family_from_its_gguf_file_equals_its_checkpoint_bitwise(family_file):
    arch, hf, directory, path = family_file
    ids = _ids()
    with offload.load_model(directory, **KW) as checkpoint, offload.load_model(path, **KW) as from_gguf:
        assert type(from_gguf.decoder) is type(checkpoint.decoder)
        assert from_gguf.config == checkpoint.config
        assert torch.equal(from_gguf(ids), checkpoint(ids))
        want = checkpoint.generate(ids, max_new_tokens=6)
        assert torch.equal(from_gguf.generate(ids, max_new_tokens=6), want)


def test_the_config_of_each_family(family_file):
    arch, hf, _, path = family_file
    c = GGUFCheckpoint(path).config
    assert c["architectures"] == [type(hf).__name__]
    assert c["num_experts_per_tok"] == hf.config.num_experts_per_tok
    # llama.cpp renormalises the chosen experts' probabilities for qwen3moe and Mixtral only
    assert c["norm_topk_prob"] is (arch in ("qwen3moe", "llama"))
    if arch == "qwen2moe":
        assert c["shared_expert_intermediate_size"] == hf.config.shared_expert_intermediate_size


def test_the_experts_width_comes_from_their_tensors_where_the_metadata_has_none(family_file, tmp_path):
    """Mixtral's and OLMoE's converters write an expert's width as feed_forward_length, Qwen's as
    expert_feed_forward_length; where neither is there, the stacked tensors say it."""
    arch, hf, _, _ = family_file
    width = hf.config.intermediate_size if arch in ("llama", "olmoe") else hf.config.moe_intermediate_size
    meta = {k: v for k, v in moe_metadata(arch, hf.config).items() if not k.endswith("expert_feed_forward_length")}
    meta[f"{arch}.feed_forward_length"] = 1000
    stack = TensorToWrite("blk.0.ffn_gate_exps.weight", T.F32, (n_experts(hf.config), width, 64),
                          lambda: np.zeros((n_experts(hf.config), width, 64), np.float32))
    c = hf_config(metadata_only_file(tmp_path / "w.gguf", arch, meta, [stack]))
    assert c["intermediate_size" if arch == "llama" else "moe_intermediate_size"] == width


def test_an_early_mixtral_file_with_each_experts_tensor_apart_equals_a_stacked_one(checkpoint_factory, tmp_path):
    hf, directory = checkpoint_factory("gguf-moe-mixtral", "mixtral", "5.x", seed=9, **_BASE, **MODELS["mixtral"])
    stacked = write_moe_gguf(tmp_path / "stacked.gguf", directory, "llama", hf.config)
    apart = write_moe_gguf(tmp_path / "apart.gguf", directory, "llama", hf.config, stacked=False)
    assert "blk.0.ffn_down.5.weight" in GGUFCheckpoint(apart).files.tensors
    ids = _ids()
    with offload.load_model(stacked, **KW) as a, offload.load_model(apart, **KW) as b:
        assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("key, value, fragment", [
    ("expert_gating_func", 2, "chosen by a softmax"),
    ("expert_weights_scale", 2.5, "does not scale its experts"),
])
def test_other_routing_is_refused_in_one_line(tmp_path, key, value, fragment):
    meta = {**moe_metadata("qwen3moe", _qwen3_moe_config()), f"qwen3moe.{key}": value}
    with pytest.raises(ConfigError, match=fragment):
        hf_config(metadata_only_file(tmp_path / "r.gguf", "qwen3moe", meta))


def test_a_stack_of_another_count_of_experts_is_refused(checkpoint_factory, tmp_path):
    hf, directory = checkpoint_factory("gguf-moe-qwen3_moe", "qwen3_moe", "5.x", seed=9, **_BASE,
                                       **MODELS["qwen3_moe"])
    path = write_moe_gguf(tmp_path / "q.gguf", directory, "qwen3moe", hf.config)
    ck = GGUFCheckpoint(path)
    files = ck.files
    meta = {**moe_metadata("qwen3moe", hf.config), "qwen3moe.expert_count": n_experts(hf.config) + 1}
    tensors = [TensorToWrite(n, t.ggml_type, t.shape, lambda t=t: np.asarray(t.data)) for n, t in files.tensors.items()]
    write_gguf(tmp_path / "bad.gguf", "qwen3moe", meta, tensors)
    with pytest.raises(CheckpointError, match=r"ffn_\w+_exps.weight has shape \[8, .*a stack of the file's 9 experts"):
        GGUFCheckpoint(tmp_path / "bad.gguf")


def _qwen3_moe_config():
    import transformers

    return transformers.Qwen3MoeConfig(**{**_BASE, **MODELS["qwen3_moe"]})


# ----------------------------------------------------------------------------- formats that differ by layer


def q4_k_m_like(name: str, layer: int | None):
    """Types the gguf package can quantize, mixed as llama.cpp's Q4_K_M mixes its own: 4 bits for most experts,
    8 for the down projections of the first layer (Q4_K_M's "more bits" layers), 8 for attention."""
    if ".ffn_down_exps." in name:
        return T.Q8_0 if layer == 0 else T.Q4_0
    if "_exps." in name:
        return T.Q4_1
    if ".attn_" in name and "norm" not in name:
        return T.Q8_0
    return None


@pytest.fixture(scope="module")
def mixed_file(checkpoint_factory, tmp_path_factory):
    config = {**_BASE, **MODELS["qwen3_moe"], "moe_intermediate_size": 64}  # blocks of 32 columns
    hf, directory = checkpoint_factory("gguf-moe-qwen3_moe-64", "qwen3_moe", "5.x", seed=9, **config)
    path = write_moe_gguf(tmp_path_factory.mktemp("mixed") / "mixed.gguf", directory, "qwen3moe", hf.config,
                          type_of=q4_k_m_like)
    with offload.load_model(path, quantize="stored", **KW) as resident:  # (a CPU would expand the file)
        yield hf, directory, path, resident, resident(_ids())


def test_experts_stored_in_different_formats_by_layer_get_layouts_of_their_own(mixed_file):
    _, _, path, resident, _ = mixed_file
    setup = prepare(path, LoadOptions(quantize="stored", **{k: v for k, v in KW.items() if k != "progress"}))
    by_layer = {b.layer: b.layout for b in setup.blocks if b.expert is not None}
    assert by_layer[0].nbytes > by_layer[1].nbytes == by_layer[2].nbytes  # 8-bit down projections in layer 0
    assert by_layer[1] is by_layer[2]  # layers stored alike share a layout
    experts = setup.plan.needs.experts
    assert experts.nbytes == by_layer[0].nbytes  # a cache slot: the largest
    assert experts.sizes[:3] == (by_layer[0].nbytes, by_layer[1].nbytes, by_layer[2].nbytes)  # each buffer: its own
    assert experts.total_bytes == sum(by_layer[b.layer].nbytes for b in setup.blocks if b.expert is not None)
    assert sum(setup.plan.experts.bytes_on(t) for t in set(setup.plan.experts.placement)) == experts.total_bytes
    line = setup.plan.needs.weight_format  # a layer's experts counted once
    assert "routed experts: as stored: int4 in groups of 32 x 5, int8 in groups of 32 x 1 (float32 scales), " \
        "9.00 KiB to 10.50 KiB each" in line, line



def test_they_compute_the_values_the_file_stores(mixed_file, tmp_path):
    """The file's logits equal, within float32 rounding, those of a checkpoint holding its values dequantized
    by the gguf package."""
    hf, directory, path, _, want = mixed_file
    ck = GGUFCheckpoint(path)
    state = {name: ck.dense(name) for name in ck.tensors}
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    out = tmp_path / "dequantized"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
    (out / "config.json").write_text((directory / "config.json").read_text())
    with offload.load_model(out, **KW) as dequantized:
        torch.testing.assert_close(dequantized(_ids()), want, atol=1e-4, rtol=0)


def test_they_stream_through_the_expert_cache_as_they_compute_resident(mixed_file):
    _, _, path, resident, want = mixed_file
    with _streamed(path, resident.plan.needs, resident_experts=1, quantize="stored") as streamed:
        assert streamed.experts.source  # some experts are copied in
        assert torch.equal(streamed(_ids()), want)


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton (natively on a GPU, or its interpreter)")
def test_the_expert_kernels_read_each_layers_experts_in_its_format(checkpoint_factory, tmp_path):
    """Direct reads: the kernels read layer 0's experts as float32 and the others' as int4, as the layers compute
    them resident."""
    config = {**_BASE, **MODELS["qwen3_moe"], "moe_intermediate_size": 64}
    hf, directory = checkpoint_factory("gguf-moe-qwen3_moe-64", "qwen3_moe", "5.x", seed=9, **config)
    four_bits = lambda name, layer: (T.Q4_1 if layer else None) if "_exps." in name else None  # noqa: E731
    path = write_moe_gguf(tmp_path / "m.gguf", directory, "qwen3moe", hf.config, type_of=four_bits)
    ids = _ids()
    with offload.load_model(path, quantize="stored", **KW) as resident:
        want, needs = resident(ids), resident.plan.needs
    # the plan names the experts' formats where only they are compressed, and only some layers' are
    assert needs.weight_format.startswith("dense: ")
    assert "routed experts: as stored: int4 in groups of 32 x 4 (float32 scales)" in needs.weight_format
    with _streamed(path, needs, resident_experts=2, direct_experts=True, quantize="stored") as direct:
        table = direct.experts.table
        assert table.projections[0][1].format != table.projections[1][1].format
        torch.testing.assert_close(direct(ids), want, atol=1e-4, rtol=0)


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton (natively on a GPU, or its interpreter)")
def test_the_expert_kernels_read_8_bit_groups_beside_4_bit_ones(mixed_file):
    _, _, path, resident, want = mixed_file
    with _streamed(path, resident.plan.needs, resident_experts=2, direct_experts=True, quantize="stored") as direct:
        table = direct.experts.table
        assert [table.projections[i][1].format for i in range(3)] == [INT8_GROUPS, INT4, INT4]
        torch.testing.assert_close(direct(_ids()), want, atol=1e-4, rtol=0)


def test_the_type_counts_count_every_experts_tensor_under_one_kind(mixed_file):
    hf, _, path, _, _ = mixed_file
    counts = GGUFCheckpoint(path).type_counts()
    experts, layers = n_experts(hf.config), hf.config.num_hidden_layers
    assert counts["mlp.experts.gate_proj"] == Counter({"Q4_1": experts * layers})
    assert counts["mlp.experts.down_proj"] == Counter({"Q8_0": experts, "Q4_0": experts * (layers - 1)})


# ----------------------------------------------------------------------------- transformers reading the same files


@pytest.mark.slow
@pytest.mark.parametrize("arch, family, widths", [
    # transformers' GGUF loader reads no expert widths: its configs' defaults are the checkpoint's
    ("qwen3moe", "qwen3_moe", dict(moe_intermediate_size=768)),
    ("qwen2moe", "qwen2_moe", dict(moe_intermediate_size=1408, shared_expert_intermediate_size=5632)),
])
def test_transformers_reading_the_same_file_agrees(checkpoint_factory, tmp_path, arch, family, widths):
    import transformers

    config = {**_BASE, **MODELS[family], **FAMILIES[arch][1], **widths}
    hf, directory = checkpoint_factory(f"gguf-moe-{family}-wide", family, "5.x", seed=4, **config)
    path = write_moe_gguf(tmp_path / f"{arch}.gguf", directory, arch, hf.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                                   dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        want = theirs(ids).logits
    with offload.load_model(path, **KW) as ours:
        torch.testing.assert_close(ours(ids).cpu(), want, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- a Q4_K_M-like file (benchmarks')


def test_a_q4_k_m_like_qwen3_moe_file_streams_its_experts_bitwise(tmp_path):
    """``write_q4_k_m_like`` of a Qwen3-MoE shape (random K-quant blocks: Q4_K experts, Q6_K down projections in
    llama.cpp's "more bits" layers): resident, and with layers and experts streamed from host memory, the same
    logits."""
    from offload.gguf import write_q4_k_m_like

    config = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=256, hidden_size=256, intermediate_size=512,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=256)
    path = write_q4_k_m_like(tmp_path / "moe.gguf", config)[0]
    downs = GGUFCheckpoint(path).type_counts()["mlp.experts.down_proj"]
    assert downs == Counter({"Q6_K": 4, "Q4_K": 8})  # layer 2 of 3 gets more bits
    ids = _ids(2, 10)
    kw = dict(KW, quantize="stored", max_seq_len=32)
    with offload.load_model(path, **kw) as resident:
        want, needs = resident(ids), resident.plan.needs
        assert torch.isfinite(want).all()
    gpu = needs.fixed_bytes + sum(needs.blocks) // 2 + 5 * needs.experts.nbytes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with offload.load_model(path, gpu_memory=gpu, cpu_memory="1GiB", **kw) as streamed:
            assert "H" in str(streamed.plan) and streamed.experts.source
            assert torch.equal(streamed(ids), want)


@pytest.mark.slow
def test_tensor_parallel_on_two_ranks_equals_one(family_file):
    """Each rank reads its shard of every expert's slice of the stacks (rows of gate and up, columns of down)."""
    from test_tensor_parallel import assert_tp_equals_one

    arch, _, _, path = family_file
    if arch == "olmoe":
        pytest.skip("OLMoE normalises q and k across all heads: tensor parallelism is refused")
    assert_tp_equals_one(path, _ids(2, 12, 7), 1e-4, 64)


def test_an_experts_tensor_both_in_a_stack_and_apart_is_refused(checkpoint_factory, tmp_path):
    hf, directory = checkpoint_factory("gguf-moe-mixtral", "mixtral", "5.x", seed=9, **_BASE, **MODELS["mixtral"])
    path = write_moe_gguf(tmp_path / "m.gguf", directory, "llama", hf.config)
    files = GGUFCheckpoint(path).files
    tensors = [TensorToWrite(n, t.ggml_type, t.shape, lambda t=t: np.asarray(t.data)) for n, t in files.tensors.items()]
    extra = files.tensors["blk.1.ffn_up_exps.weight"]
    tensors.append(TensorToWrite("blk.1.ffn_up.3.weight", T.F32, extra.shape[1:], lambda: np.asarray(extra.data[3])))
    write_gguf(tmp_path / "both.gguf", "llama", moe_metadata("llama", hf.config), tensors)
    with pytest.raises(CheckpointError, match=r"blk.1.ffn_up.3.weight and blk.1.ffn_up_exps.weight\[3\] both hold "
                                              r"model.layers.1.block_sparse_moe.experts.3.w3.weight|"
                                              r"blk.1.ffn_up_exps.weight\[3\] and blk.1.ffn_up.3.weight both hold"):
        GGUFCheckpoint(tmp_path / "both.gguf")


def _retyped(path, out, arch: str, meta: dict, kind_of) -> None:
    """``path`` written again with each tensor ``kind_of(name)`` names (a type) made of random blocks of it."""
    from offload.gguf import random_blocks

    tensors = []
    for i, (name, t) in enumerate(GGUFCheckpoint(path).files.tensors.items()):
        kind = kind_of(name)
        if kind is None:
            tensors.append(TensorToWrite(name, t.ggml_type, t.shape, lambda t=t: np.asarray(t.data)))
            continue
        rows, cols = int(np.prod(t.shape[:-1])), t.shape[-1]
        data = random_blocks(kind, rows, cols, np.random.default_rng(i), scale=2e-3)
        tensors.append(TensorToWrite(name, kind, t.shape, lambda data=data: data))
    write_gguf(out, arch, meta, tensors)


@pytest.mark.slow  # a minute on Triton's interpreter
@pytest.mark.skipif(kernels.triton is None, reason="needs Triton (natively on a GPU, or its interpreter)")
def test_experts_in_three_and_two_bits_are_read_directly_in_int4_groups_of_16(checkpoint_factory, tmp_path):
    """A Q3_K_M-like file's experts (Q3_K gates and ups, Q2_K downs: int4 in groups of 16) are kept compressed and
    read directly by the expert kernels, two groups a step, as the layers compute them resident."""
    config = {**_BASE, **MODELS["qwen3_moe"], "hidden_size": 256, "moe_intermediate_size": 256}  # K-quant blocks
    hf, directory = checkpoint_factory("gguf-moe-qwen3_moe-256", "qwen3_moe", "5.x", seed=4, **config)
    plain = write_moe_gguf(tmp_path / "plain.gguf", directory, "qwen3moe", hf.config)
    kind_of = lambda name: (T.Q2_K if "down" in name else T.Q3_K) if "_exps." in name else None  # noqa: E731
    _retyped(plain, tmp_path / "q3.gguf", "qwen3moe", moe_metadata("qwen3moe", hf.config), kind_of)
    with offload.load_model(tmp_path / "q3.gguf", quantize="stored", **KW) as resident:
        want, needs = resident(_ids()), resident.plan.needs
    assert "routed experts: as stored: int4 in groups of 16" in needs.weight_format
    with _streamed(tmp_path / "q3.gguf", needs, resident_experts=2, direct_experts=True, quantize="stored") as direct:
        table = direct.experts.table
        assert all(table.projections[i][j].format == INT4 and table.projections[i][j].group == 16
                   for i in range(hf.config.num_hidden_layers) for j in (0, 1))
        torch.testing.assert_close(direct(_ids()), want, atol=1e-4, rtol=0)


def test_experts_kept_apart_in_8_bits_with_and_without_minimums_are_refused(checkpoint_factory, tmp_path):
    """An early Mixtral file whose layer keeps expert 0's gate in Q8_0 and the others' in Q5_K (int8 in groups of
    32, with minimums): every expert of a layer has expert 0's layout, so the others were read without their
    minimums (wrong logits). A part's minimums must now match too (llama.cpp refuses such a file)."""
    config = {**_BASE, **MODELS["mixtral"], "hidden_size": 256, "intermediate_size": 256}  # K-quant blocks of 256
    hf, directory = checkpoint_factory("gguf-moe-mixtral-256", "mixtral", "5.x", seed=3, **config)
    apart = write_moe_gguf(tmp_path / "apart.gguf", directory, "llama", hf.config, stacked=False)
    kind_of = lambda name: (T.Q8_0 if ".0.weight" in name else T.Q5_K) if ".ffn_gate." in name else None  # noqa: E731
    _retyped(apart, tmp_path / "mixed.gguf", "llama", moe_metadata("llama", hf.config), kind_of)
    with pytest.raises(CheckpointError, match=r"ffn_gate.1.weight is Q5_K \(int8 in groups of 32 with minimums\); "
                                              r"the layout asks for int8 in groups of 32$"):
        offload.load_model(tmp_path / "mixed.gguf", quantize="stored", **KW)


def test_a_type_dequantized_warns_once_a_kind_of_tensor(family_file, tmp_path):
    """Experts in a type offload keeps no compressed form of (MXFP4 here): one warning per projection, not one per
    expert and layer (a 48-layer file of 128 experts gave 18k lines)."""
    arch, hf, directory, _ = family_file
    if arch != "qwen3moe":
        pytest.skip("one family is enough")
    # (gate and up only: the down projections' 48 columns are no whole blocks of 32)
    path = write_moe_gguf(tmp_path / "mxfp4.gguf", directory, arch, hf.config,
                          type_of=lambda name, layer: T.MXFP4 if "_exps." in name and "down" not in name else None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        offload.load_model(path, quantize="stored", **KW).close()
    dequantized = sorted(str(w.message).split(":")[0] for w in seen if "has no compressed form" in str(w.message))
    assert dequantized == [f"model.layers.*.mlp.experts.*.{p}_proj.weight" for p in ("gate", "up")]


def test_a_llama_file_of_no_experts_is_dense(tmp_path):
    """llama.cpp reads ``expert_count`` 0 as a dense model (it was refused: 'must be a positive integer')."""
    from test_gguf import llama_meta

    c = hf_config(metadata_only_file(tmp_path / "d.gguf", "llama", {**llama_meta(), "llama.expert_count": 0}))
    assert c["architectures"] == ["LlamaForCausalLM"] and "num_local_experts" not in c
    meta = {**llama_meta(), "llama.expert_count": 0, "llama.expert_used_count": 2}
    with pytest.raises(ConfigError, match="expert_used_count is 2 in a model of no experts"):
        hf_config(metadata_only_file(tmp_path / "e.gguf", "llama", meta))


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton (natively on a GPU, or its interpreter)")
def test_direct_reads_in_bfloat16_on_a_cpu_are_refused(family_file):
    """Triton's interpreter computes no bfloat16: direct reads there gave logits off by 2 with no error."""
    _, _, _, path = family_file
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernels compute bfloat16")
    with pytest.raises(ConfigError, match="interpreter computes no bfloat16"):
        offload.load_model(path, **{**KW, "dtype": torch.bfloat16}, direct_experts=True)
