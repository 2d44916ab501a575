"""GGUF files (offload.gguf): types as offload's parts, config and tensor names, tokenizer, corrupt files.

Each supported block type is checked against the ``gguf`` package's own ``dequantize`` (bit for
bit in float32) on random blocks; small files of each architecture are written the way
llama.cpp's converter writes them (q/k rows permuted for llama, Gemma's norms as 1 + w) with
the ``gguf`` writer and read back; the real SmolLM2-135M-Instruct Q4_1 file is read against
``transformers`` reading the same file (the slow tests).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

import offload  # noqa: E402
from offload.distributed import TensorParallel  # noqa: E402
from offload.errors import CheckpointError, ConfigError, OffloadWarning  # noqa: E402
from offload.gguf import (GGUFCheckpoint, GGUFFiles, GGUFSource, TensorToWrite, dense_tensor,  # noqa: E402
                          dequantize_parts, gguf_tensor_to_parts, hf_config, hf_names, parts_format,
                          permute_like_llama_cpp, random_blocks, write_gguf, write_q4_k_m_like)
from offload.gguf.writer import llama_metadata, q4_k_m_like_tensors, uses_more_bits  # noqa: E402
from offload.models.blocks import checkpoint_sources  # noqa: E402
from offload.models.config import config_from_dict  # noqa: E402
from offload.models.shapes import shape_config  # noqa: E402

from conftest import CHATML, _ARCH, randomize_  # noqa: E402

KEPT = [T.Q4_0, T.Q4_1, T.Q4_K, T.Q3_K, T.Q2_K, T.Q8_0, T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]
QUANTIZABLE = [T.Q4_0, T.Q4_1, T.Q8_0, T.Q5_0, T.Q5_1]  # the gguf package quantizes these; K-quants only dequantize


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def reference(raw: np.ndarray, kind) -> np.ndarray:
    return gguf.quants.dequantize(raw, kind)


# ----------------------------------------------------------------------------- types -> parts


@pytest.mark.parametrize("kind", KEPT, ids=lambda k: k.name)
def test_parts_dequantize_to_the_gguf_values_bit_for_bit(kind):
    """Random blocks (random bytes, finite scales of either sign): the parts with float32 scales hold exactly
    the weight the gguf package dequantizes. Q4_0 stores d * (q - 8) as q * d + (-8 d) (Q3_K: d sc (q - 4) as
    q d sc + (-4 d sc)): the same numbers, but where q = 8 (4) and d < 0 gguf gets -0.0 and the parts +0.0, so
    their zeros are compared as numbers."""
    rng = np.random.default_rng(int(kind))
    rows, cols = 12, 1024
    raw = random_blocks(kind, rows, cols, rng, scale=0.05, signed=True)
    parts = gguf_tensor_to_parts(raw, kind, (rows, cols), torch.float32)
    ours, ref = dequantize_parts(parts, parts_format(kind)).numpy(), reference(raw, kind)
    assert ours.shape == ref.shape == (rows, cols)
    if kind in (T.Q4_0, T.Q3_K):
        assert (ours == ref).all()
        nonzero = ref != 0
        np.testing.assert_array_equal(bits(ours[nonzero]), bits(ref[nonzero]))
    else:
        np.testing.assert_array_equal(bits(ours), bits(ref))


@pytest.mark.parametrize("kind", QUANTIZABLE, ids=lambda k: k.name)
def test_parts_of_weights_quantized_by_the_gguf_package(kind):
    """Blocks the gguf package's quantizer made from a weight (rather than random bytes): same equality,
    and with float16 scales (the default) too, since these types' scales are float16 values."""
    w = (torch.randn(16, 256, generator=torch.Generator().manual_seed(1)) * 0.02).numpy()
    raw = gguf.quants.quantize(w, kind)
    ref = reference(raw, kind)
    for dtype in (torch.float32, torch.float16):
        parts = gguf_tensor_to_parts(raw, kind, w.shape, dtype)
        assert parts["scale"].dtype == dtype
        assert (dequantize_parts(parts, parts_format(kind)).numpy() == ref).all()
    assert np.abs(ref - w).max() < 0.02  # the blocks do hold w


@pytest.mark.parametrize("kind", KEPT, ids=lambda k: k.name)
def test_parts_layout(kind):
    """Shapes and dtypes of each format, integers in their range, groups of the format's size."""
    rows, cols = 4, 512
    fmt = parts_format(kind)
    parts = gguf_tensor_to_parts(random_blocks(kind, rows, cols, np.random.default_rng(0)), kind, (rows, cols))
    groups = cols // fmt.group_size
    assert parts["scale"].shape == (rows, groups) and parts["scale"].dtype == torch.float16
    assert ("minimum" in parts) == fmt.minimum
    if fmt.minimum:
        assert parts["minimum"].shape == (rows, groups)
    data = parts["data"]
    if fmt.format == "int4":
        assert fmt.group_size == (16 if kind in (T.Q3_K, T.Q2_K) else 32)
        assert data.dtype == torch.uint8 and data.shape == (rows, cols // 2)
        if kind == T.Q2_K:  # two bits a value
            assert int((data & 0xCC).max()) == 0
        if kind == T.Q3_K:  # three
            assert int((data & 0x88).max()) == 0
    else:
        low, high = {T.Q8_0: (-128, 127), T.Q5_0: (-16, 15), T.Q5_1: (0, 31), T.Q5_K: (0, 31), T.Q6_K: (-32, 31),
                     T.IQ4_NL: (-127, 113), T.IQ4_XS: (-127, 113)}[kind]
        assert data.dtype == torch.int8 and data.shape == (rows, cols)
        assert low <= int(data.min()) and int(data.max()) <= high


def test_int4_nibbles_keep_ggufs_order_which_is_offloads():
    """GGUF's Q4_1 block holds value j in the low nibble of byte j and value j + 16 in its high nibble;
    offload's int4 holds a group's column j and j + g/2 in byte j (low, high): the bytes as they are."""
    q = np.arange(32) % 16  # the value of each column
    block = np.zeros(20, dtype=np.uint8)
    block[0:2] = np.array([1.0], dtype=np.float16).view(np.uint8)  # d = 1
    block[2:4] = np.array([0.0], dtype=np.float16).view(np.uint8)  # m = 0
    block[4:] = q[:16] | (q[16:] << 4)
    parts = gguf_tensor_to_parts(block[None], T.Q4_1, (1, 32))
    data = parts["data"][0]
    assert data.tolist() == [int(q[j] | (q[j + 16] << 4)) for j in range(16)]
    assert reference(block[None], T.Q4_1)[0].tolist() == q.tolist()


def test_q4_0_minimum_is_minus_eight_d():
    raw = random_blocks(T.Q4_0, 2, 64, np.random.default_rng(3), signed=True)
    parts = gguf_tensor_to_parts(raw, T.Q4_0, (2, 64), torch.float16)
    assert torch.equal(parts["minimum"], -8 * parts["scale"])


@pytest.mark.parametrize("kind", [T.Q4_K, T.Q3_K, T.Q2_K, T.Q5_K, T.Q6_K, T.IQ4_XS], ids=lambda k: k.name)
def test_k_quant_scales_are_rounded_once_to_the_scale_dtype(kind):
    """d * sc is exact in float32; float16 rounds it once (relative error at most 2^-11), which is
    what the weight's error comes from."""
    raw = random_blocks(kind, 8, 512, np.random.default_rng(5))
    exact = gguf_tensor_to_parts(raw, kind, (8, 512), torch.float32)
    half = gguf_tensor_to_parts(raw, kind, (8, 512), torch.float16)
    assert parts_format(kind).exact_scale_dtype == torch.float32
    for part in half:
        if part == "data":
            assert torch.equal(half[part], exact[part])
            continue
        assert torch.equal(half[part], exact[part].to(torch.float16))
        rel = (half[part].float() - exact[part]).abs() / exact[part].abs().clamp_min(1e-30)
        assert float(rel.max()) <= 2**-11
    assert not torch.equal(half["scale"].float(), exact["scale"])  # not exact: the docstring says so


def test_rows_of_a_tensor_are_the_rows_of_its_parts():
    raw = random_blocks(T.Q4_K, 10, 512, np.random.default_rng(6))
    full = gguf_tensor_to_parts(raw, T.Q4_K, (10, 512))
    piece = gguf_tensor_to_parts(raw[3:7], T.Q4_K, (4, 512))
    assert all(torch.equal(piece[k], full[k][3:7]) for k in full)


def test_parts_from_a_torch_tensor_of_bytes():
    """The bytes may already be a tensor (on the device that converts them)."""
    raw = random_blocks(T.Q6_K, 3, 256, np.random.default_rng(7))
    a = gguf_tensor_to_parts(raw, T.Q6_K, (3, 256))
    b = gguf_tensor_to_parts(torch.from_numpy(raw), T.Q6_K, (3, 256))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_scale_that_overflows_the_scale_dtype_is_refused():
    raw = random_blocks(T.Q4_0, 1, 32, np.random.default_rng(8))
    raw[0, 0:2] = np.array([10000.0], dtype=np.float16).view(np.uint8)  # -8 d overflows float16
    with pytest.raises(CheckpointError, match="not finite in float16") as info:
        gguf_tensor_to_parts(raw, T.Q4_0, (1, 32), torch.float16, name="blk.0.attn_q.weight")
    assert "blk.0.attn_q.weight" in str(info.value) and "\n" not in str(info.value)
    assert torch.isfinite(gguf_tensor_to_parts(raw, T.Q4_0, (1, 32), torch.float32)["minimum"]).all()


@pytest.mark.parametrize("kind", [T.F32, T.F16, T.BF16], ids=lambda k: k.name)
def test_float_types_are_exact(kind):
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(2)).numpy()
    raw = gguf.quants.quantize(w, kind) if kind == T.BF16 else w.astype(np.float16 if kind == T.F16 else np.float32)
    ours = dense_tensor(raw, kind, (6, 40))
    np.testing.assert_array_equal(bits(ours.numpy()), bits(reference(raw, kind)))
    assert dense_tensor(raw, kind, (6, 40), torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", KEPT, ids=lambda k: k.name)
def test_dense_reads_of_kept_types_equal_gguf(kind):
    raw = random_blocks(kind, 4, 256, np.random.default_rng(9), signed=True)
    assert (dense_tensor(raw, kind, (4, 256)).numpy() == reference(raw, kind)).all()


@pytest.mark.parametrize("kind", [T.IQ2_XXS, T.TQ1_0], ids=lambda k: k.name)
def test_other_types_are_dequantized_with_a_warning(kind):
    """A type with no compressed form: dequantized by the gguf package, stored in the model dtype, and a
    one-line warning names the tensor, its type and the precision kept."""
    raw = random_blocks(kind, 4, 256, np.random.default_rng(10))
    with pytest.warns(OffloadWarning) as record:
        values = dense_tensor(raw, kind, (4, 256), torch.bfloat16, name="blk.3.ffn_down.weight")
    message = str(record[0].message)
    assert "blk.3.ffn_down.weight" in message and kind.name in message and "bfloat16" in message
    assert "8 significant bits" in message and "\n" not in message
    assert torch.equal(values, torch.from_numpy(reference(raw, kind)).to(torch.bfloat16))
    with pytest.raises(CheckpointError, match="no compressed form"):
        gguf_tensor_to_parts(raw, kind, (4, 256))


def test_a_type_nothing_can_read_is_refused_in_one_line():
    kind = T.Q8_1  # the gguf package has no dequantizer for it
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = np.zeros((1, size), dtype=np.uint8)
    with pytest.raises(CheckpointError, match="Q8_1 cannot be read") as info:
        dense_tensor(raw, kind, (1, block), name="output.weight")
    assert "output.weight" in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- files written like llama.cpp's


TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
ARCH_CONFIGS = {  # transformers model kind -> (GGUF architecture, config)
    "llama": ("llama", dict(TINY, rope_theta=50000.0, rms_norm_eps=1e-5, attention_bias=True)),
    "mistral": ("llama", dict(TINY, sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(TINY, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(TINY, head_dim=32, tie_word_embeddings=False)),
    "gemma3": ("gemma3", dict(TINY, num_hidden_layers=7, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
                              rms_norm_eps=1e-6)),
}


def hf_model(kind: str, seed: int = 0, **overrides):
    config_cls, model_cls = _ARCH[kind]
    config = config_cls(**{**ARCH_CONFIGS[kind][1], **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    randomize_(model, seed)
    return model


def arch_metadata(arch: str, config, name: str) -> dict:
    """What llama.cpp's converter writes for a Hugging Face config (the fields offload reads)."""
    c = config
    meta = {
        "general.name": name,
        f"{arch}.block_count": c.num_hidden_layers,
        f"{arch}.context_length": c.max_position_embeddings,
        f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.feed_forward_length": c.intermediate_size,
        f"{arch}.attention.head_count": c.num_attention_heads,
        f"{arch}.attention.head_count_kv": c.num_key_value_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
    }
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    meta[f"{arch}.rope.freq_base"] = float(rope["rope_theta"])
    meta[f"{arch}.vocab_size"] = c.vocab_size  # (offload takes the embedding's rows; transformers needs this)
    if arch == "llama":
        meta[f"{arch}.rope.dimension_count"] = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if arch in ("qwen3", "gemma3"):
        meta[f"{arch}.attention.key_length"] = c.head_dim
        meta[f"{arch}.attention.value_length"] = c.head_dim
    if arch == "gemma3":
        meta[f"{arch}.attention.sliding_window"] = c.sliding_window
        meta[f"{arch}.rope.freq_base_swa"] = float(c.rope_parameters["sliding_attention"]["rope_theta"])
    return meta


def gguf_tensors_of(model, arch: str, kind_of=None) -> list[TensorToWrite]:
    """The model's tensors as llama.cpp's converter writes them: GGUF names, q/k rows permuted (llama),
    norms as 1 + w (gemma3), in ``kind_of(gguf name)``'s type (F32 unless it says otherwise)."""
    c = model.config
    to_gguf = {hf: g for g, hf in hf_names(arch, c.num_hidden_layers).items()}
    out = []
    for hf_name, w in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        name, w = to_gguf[hf_name], w.detach().float().clone()
        if arch == "llama" and ".attn_q." in name:
            w = permute_like_llama_cpp(w, c.num_attention_heads)
        if arch == "llama" and ".attn_k." in name:
            w = permute_like_llama_cpp(w, c.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1
        kind = (kind_of(name) if kind_of else None) or T.F32
        values = w.numpy()
        data = values if kind == T.F32 else gguf.quants.quantize(values, kind)
        out.append(TensorToWrite(name, kind, tuple(w.shape), lambda data=data: data))
    return out


def write_model_gguf(path, model, arch: str, name: str = "tiny", kind_of=None, extra: dict | None = None,
                     split_max_tensors: int = 0):
    meta = {**arch_metadata(arch, model.config, name), **(extra or {})}
    return write_gguf(path, arch, meta, gguf_tensors_of(model, arch, kind_of), split_max_tensors)


@pytest.fixture(scope="module", params=list(ARCH_CONFIGS))
def arch_file(request, tmp_path_factory):
    kind = request.param
    arch = ARCH_CONFIGS[kind][0]
    model = hf_model(kind, seed=list(ARCH_CONFIGS).index(kind))
    path = tmp_path_factory.mktemp(kind) / f"{kind}.gguf"
    write_model_gguf(path, model, arch, name="Mistral 7B Tiny" if kind == "mistral" else f"tiny {kind}")
    return kind, model, GGUFCheckpoint(path)


def test_config_round_trip(arch_file):
    """The config dict of the file gives the same offload ModelConfig as the model's own config.json."""
    kind, model, ck = arch_file
    ours = config_from_dict(ck.config)
    theirs = config_from_dict(model.config.to_dict())
    ignore = {"eos_token_ids", "architecture"}
    assert {k: v for k, v in vars(ours).items() if k not in ignore} == \
        {k: v for k, v in vars(theirs).items() if k not in ignore}
    assert ours.architecture == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                 "gemma3": "Gemma3ForCausalLM"}[kind]


def test_tensor_names_shapes_and_values_round_trip(arch_file):
    """Every tensor of the model comes back under its name, in its shape, with its values: llama's q and
    k rows (and biases) un-permuted, gemma3's norms back to w. F32 files: exact (gemma3's norms to one
    float32 rounding of 1 + w)."""
    kind, model, ck = arch_file
    state = {k: v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    assert set(ck.tensors) == set(state)
    for name, w in state.items():
        mapped = ck.tensors[name]
        assert mapped.shape == tuple(w.shape), name
        values = ck.dense(name)
        if mapped.norm_offset:
            torch.testing.assert_close(values, w, rtol=0, atol=2**-23 * 4)
        else:
            assert torch.equal(values, w), name
    permuted = [n for n, m in ck.tensors.items() if m.unpermute_heads]
    assert bool(permuted) == (ck.architecture == "llama")
    if kind == "llama":
        assert "model.layers.0.self_attn.q_proj.bias" in permuted and "model.layers.0.self_attn.k_proj.bias" in permuted


def test_the_permutation_is_really_in_the_file(arch_file):
    """The stored q rows of a llama file are not the model's rows (so the round trip above proves the undo);
    qwen2, qwen3 and gemma3 files hold them unpermuted, as llama.cpp writes them."""
    kind, model, ck = arch_file
    stored = torch.from_numpy(np.array(ck.tensors["model.layers.0.self_attn.q_proj.weight"].stored.data))
    same = torch.equal(stored, model.model.layers[0].self_attn.q_proj.weight)
    assert same == (ck.architecture != "llama")


def test_head_aligned_rows_of_a_permuted_tensor(arch_file):
    """A tensor-parallel rank's heads of q and k: the same rows as the whole tensor's; rows that split a
    head are refused (llama.cpp's permutation moves rows within a head)."""
    kind, model, ck = arch_file
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    for name, heads in (("model.layers.1.self_attn.q_proj.weight", c.num_attention_heads),
                        ("model.layers.1.self_attn.k_proj.weight", c.num_key_value_heads)):
        full = ck.dense(name)
        for lo in range(0, heads * hd, hd):
            assert torch.equal(ck.dense(name, rows=(lo, lo + hd)), full[lo : lo + hd])
        assert torch.equal(ck.dense(name, rows=(hd, heads * hd)), full[hd:])
    if ck.architecture == "llama":
        with pytest.raises(CheckpointError, match="not whole heads"):
            ck.dense("model.layers.1.self_attn.q_proj.weight", rows=(0, hd // 2))


@pytest.mark.slow
def test_tensors_match_transformers_reading_the_same_file(arch_file):
    """transformers' own GGUF loader (which undoes llama.cpp's permutation for llama files only, and subtracts
    Gemma's 1 from its norms) reads the same values from each architecture's file."""
    import transformers

    kind, model, ck = arch_file
    if kind == "qwen3":  # transformers ignores qwen3.attention.key_length: head_dim is its default, 128
        model = hf_model(kind, seed=12, head_dim=128)
        path = ck.path.with_name("qwen3-128.gguf")
        write_model_gguf(path, model, "qwen3")
        ck = GGUFCheckpoint(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(ck.path.parent, gguf_file=ck.path.name,
                                                                   dtype=torch.float32)
    state = theirs.state_dict()
    # transformers builds a llama config without attention_bias (its GGUF mapping has no such key), so it
    # drops a llama file's q/k/v/o biases; offload reads them (and the config says attention_bias)
    dropped = {n for n in ck.tensors if n not in state}
    assert dropped == ({n for n in ck.tensors if n.endswith("_proj.bias")} if kind == "llama" else set())
    for name in set(ck.tensors) - dropped:
        assert torch.equal(ck.dense(name), state[name]), name


def mixed_types(name: str):
    """A mix of the types the gguf package can quantize: Q8_0 for attention, Q4_0/Q4_1 for the MLP."""
    if ".attn_" in name and name.endswith(".weight") and "norm" not in name:
        return T.Q8_0
    if ".ffn_up." in name or ".ffn_gate." in name:
        return T.Q4_1
    if ".ffn_down." in name:
        return T.Q4_0
    return None


@pytest.fixture(scope="module")
def quantized_llama(tmp_path_factory):
    model = hf_model("llama", seed=11, attention_bias=False, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("qllama") / "qllama.gguf"
    write_model_gguf(path, model, "llama", kind_of=mixed_types)
    return model, path, GGUFCheckpoint(path)


def test_quantized_tensors_come_back_as_parts_in_model_order(quantized_llama):
    """q and k stored permuted in Q8_0: their parts, rows put back, dequantize to what the gguf package
    dequantizes from the file, un-permuted; and that is the model's weight to within its quantization."""
    model, _, ck = quantized_llama
    c = model.config
    for name, heads in (("model.layers.2.self_attn.q_proj.weight", c.num_attention_heads),
                        ("model.layers.2.self_attn.k_proj.weight", c.num_key_value_heads)):
        mapped = ck.tensors[name]
        assert mapped.ggml_type == T.Q8_0 and mapped.unpermute_heads == heads
        ours = dequantize_parts(ck.parts(name, scale_dtype=torch.float32), "int8")
        stored = torch.from_numpy(reference(np.array(mapped.stored.data), T.Q8_0))
        undo = stored.view(heads, -1, 2, stored.shape[1]).transpose(1, 2).reshape(stored.shape)
        assert torch.equal(ours, undo)
        assert torch.equal(ck.dense(name), ours)
        w = model.state_dict()[name]
        assert (ours - w).abs().max() <= w.abs().max() / 127
    for name, fmt in (("model.layers.0.mlp.up_proj.weight", "int4"), ("model.layers.0.mlp.down_proj.weight", "int4")):
        parts = ck.parts(name)
        assert parts_format(ck.tensors[name].ggml_type).format == fmt and parts["scale"].dtype == torch.float16
        w = model.state_dict()[name]
        assert (dequantize_parts(parts, fmt) - w).abs().max() <= w.abs().max() / 7


def assert_ranks_read_their_pieces(ck: GGUFCheckpoint, ranks: int) -> None:
    """Every spec of each rank (offload's own layouts: q/k/v rows and biases by heads, o/down columns,
    vocabulary rows) read dense through GGUFSource equals that piece of the whole tensor."""
    config = config_from_dict(ck.config)
    source = GGUFSource(ck)
    for rank in range(ranks):
        specs = checkpoint_sources(config, TensorParallel(rank, ranks), torch.float32)
        source.validate(specs)
        for spec, name in specs:
            out = torch.empty(spec.shape)
            source.read(spec, name, out)
            full, shard = ck.dense(name), spec.shard
            if shard.dim is None:
                expected = full
            elif shard.dim == 0:
                expected = full[shard.start : shard.stop]
            else:
                expected = full[:, shard.start : shard.stop]
            assert torch.equal(out[: expected.shape[0]], expected), (name, spec.name)


def test_source_reads_every_tensor_of_a_tensor_parallel_rank(quantized_llama):
    assert_ranks_read_their_pieces(quantized_llama[2], 2)


def test_source_reads_tensor_parallel_pieces_of_each_architecture(arch_file):
    """Biases too (llama's permuted, qwen2's), q/k norms, Gemma's norms."""
    assert_ranks_read_their_pieces(arch_file[2], 2)


def test_source_reads_parts_into_a_layout(quantized_llama):
    """A spec that names a part gets that part of the tensor's compressed form, its scale rounded to the
    spec's dtype; a spec asking for another format than the file's is refused before reading."""
    from offload.models.blocks import TensorSpec
    from offload.models.parallel import REPLICATED
    from offload.models.quant import QuantScheme

    _, _, ck = quantized_llama
    name = "model.layers.1.mlp.up_proj.weight"
    rows, cols = ck.tensors[name].shape
    scheme = QuantScheme("int4", 32, 1 << 20)
    specs = [(TensorSpec("w_up.data", (rows, cols // 2), (rows, cols), name, REPLICATED, torch.uint8, 0, "data",
                         scheme), name),
             (TensorSpec("w_up.scale", (rows, cols // 32), (rows, cols), name, REPLICATED, torch.bfloat16, 0,
                         "scale", scheme), name),
             (TensorSpec("w_up.minimum", (rows, cols // 32), (rows, cols), name, REPLICATED, torch.bfloat16, 0,
                         "minimum", scheme), name)]
    source = GGUFSource(ck)
    source.validate(specs[:1] + [(s, n) for s, n in checkpoint_sources(config_from_dict(ck.config), TensorParallel(),
                                                                       torch.float32)])
    exact = ck.parts(name, scale_dtype=torch.float32)
    for spec, _ in specs:
        out = torch.empty(spec.shape, dtype=spec.dtype)
        source.read(spec, name, out)
        assert torch.equal(out, exact[spec.part].to(spec.dtype))
    wrong = specs[0][0].__class__(**{**vars(specs[0][0]), "quant": QuantScheme("int4", 128, 1 << 20)})
    with pytest.raises(CheckpointError, match="Q4_1 \\(int4 in groups of 32\\); the layout asks for int4 in groups of 128"):
        source.validate([(wrong, name)])


def test_source_fills_offload_int4_blocks(tmp_path):
    """The wiring to come, on today's int4 format (Q4_1 is int4 in groups of 32 with float16 scales, exactly):
    offload's own int4 layer layout (q, k, v fused part by part) filled from a Q4_1 file through GGUFSource,
    each tensor converted once, computes the file's weights."""
    from offload.models.blocks import embedding_layout, global_layout
    from offload.models.llama import Llama
    from offload.models.quant import WeightFormat, dequantize

    model = hf_model("llama", seed=13, attention_bias=False)
    path = tmp_path / "q41.gguf"
    write_model_gguf(path, model, "llama", kind_of=lambda n: T.Q4_1 if n.startswith("blk.") and "norm" not in n
                     else None)
    ck = GGUFCheckpoint(path)
    config = config_from_dict(ck.config)
    source = GGUFSource(ck)
    calls = []
    real_parts = ck.parts
    ck.parts = lambda *a, **k: calls.append(a[0]) or real_parts(*a, **k)
    blocks = Llama.blocks(config, TensorParallel(), torch.float16, WeightFormat("int4", 32))
    others = [global_layout(config, TensorParallel(), torch.float16, None),
              embedding_layout(config, TensorParallel(), torch.float16)]
    source.validate([x for layout in others if layout for x in layout.sources()]
                    + [x for block in blocks for x in block.sources()])
    for block in blocks:
        buffer = torch.zeros(block.layout.nbytes, dtype=torch.uint8)
        for spec, name in block.sources():
            out = buffer[spec.offset : spec.offset + spec.nbytes].view(spec.dtype).view(spec.shape)
            source.read(spec, name, out)
        w = block.layout.views(buffer)
        p = f"model.layers.{block.layer}."
        qkv = torch.cat([ck.dense(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        for ours, expected in ((w.wqkv, qkv), (w.w_down, ck.dense(p + "mlp.down_proj.weight"))):
            got = dequantize(ours, torch.float32)
            assert (got - expected).abs().max() <= expected.abs().max() * 2**-9
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 7 * config.n_layers  # each tensor converted once


def test_conversion_on_a_device(quantized_llama):
    """Bytes copied to a device and converted there give the same parts and values (the CPU stands in for a
    GPU here)."""
    _, _, ck = quantized_llama
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        here, there = ck.parts(name), ck.parts(name, device="cpu")
        assert all(torch.equal(here[k], there[k]) for k in here)
        assert torch.equal(ck.dense(name), ck.dense(name, device="cpu"))
    assert torch.equal(ck.dense("model.layers.1.input_layernorm.weight"),
                       ck.dense("model.layers.1.input_layernorm.weight", device=torch.device("cpu")))


def test_rows_read_from_the_file_are_the_memory_maps_bytes(quantized_llama):
    """A piece of whole rows is read with read() from the tensor's place in the file: the bytes the memory map
    holds there, for every tensor (blocks, floats, vectors) and pieces of rows."""
    _, _, ck = quantized_llama
    for name, mapped in ck.tensors.items():
        rows = len(mapped.stored.data)
        for piece in (None, (0, 1), (rows // 3, rows)):
            expected = np.array(ck.raw(name, piece), copy=True, order="C").reshape(-1).view(np.uint8)
            assert np.array_equal(ck._bytes_on(name, piece, None, None).numpy(), expected), (name, piece)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rows_sent_to_a_gpu_through_the_reused_buffer_convert_as_on_the_cpu(quantized_llama):
    """On their way to a GPU, pieces pass through one reused host buffer: each arrives whole, not overwritten by
    the next read."""
    _, _, ck = quantized_llama
    names = list(ck.tensors)
    there = [ck._bytes_on(name, None, None, "cuda") for name in names]  # read one after the other, kept
    for name, bytes_there in zip(names, there):
        assert torch.equal(bytes_there.cpu(), ck._bytes_on(name, None, None, None)), name
    name = "model.layers.1.mlp.down_proj.weight"
    here, gpu = ck.parts(name), ck.parts(name, device="cuda")
    assert all(torch.equal(here[k], gpu[k].cpu()) for k in here)


def test_columns_of_blocks(quantized_llama):
    """A shard of the input dimension is cut on block boundaries (o and down under tensor parallelism)."""
    _, _, ck = quantized_llama
    name = "model.layers.0.mlp.down_proj.weight"
    full = ck.parts(name)
    piece = ck.parts(name, cols=(64, 128))
    assert torch.equal(piece["data"], full["data"][:, 32:64]) and torch.equal(piece["scale"], full["scale"][:, 2:4])
    with pytest.raises(CheckpointError, match="multiple of 32"):
        ck.parts(name, cols=(16, 128))


def test_type_counts(quantized_llama):
    _, _, ck = quantized_llama
    counts = ck.type_counts()
    assert counts["self_attn.q_proj"] == {"Q8_0": 3} and counts["mlp.down_proj"] == {"Q4_0": 3}
    assert counts["embed_tokens"] == {"F32": 1} and counts["input_layernorm"] == {"F32": 3}


# ----------------------------------------------------------------------------- split and corrupt files


def test_split_files_open_from_any_part(tmp_path):
    model = hf_model("qwen2", seed=4)
    files = write_model_gguf(tmp_path / "model.gguf", model, "qwen2", split_max_tensors=10)
    assert len(files) > 2 and files[0].name == f"model-00001-of-{len(files):05d}.gguf"
    whole = tmp_path / "whole" / "model.gguf"
    whole.parent.mkdir()
    write_model_gguf(whole, model, "qwen2")
    reference_ck = GGUFCheckpoint(whole)
    for part in (files[0], files[-1]):
        ck = GGUFCheckpoint(part)
        assert ck.config == reference_ck.config and set(ck.tensors) == set(reference_ck.tensors)
        assert len({m.stored.file for m in ck.tensors.values()}) == len(files)
        for name in ck.tensors:
            assert torch.equal(ck.dense(name), reference_ck.dense(name))


def test_a_missing_split_part_is_named(tmp_path):
    files = write_model_gguf(tmp_path / "model.gguf", hf_model("qwen2"), "qwen2", split_max_tensors=10)
    files[1].unlink()
    with pytest.raises(CheckpointError) as info:
        GGUFCheckpoint(files[0])
    message = str(info.value)
    assert files[1].name in message and "missing" in message and "\n" not in message


def test_a_renamed_split_part_is_refused(tmp_path):
    files = write_model_gguf(tmp_path / "model.gguf", hf_model("qwen2"), "qwen2", split_max_tensors=10)
    a, b = files[1], files[2]
    tmp = a.with_suffix(".tmp")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    with pytest.raises(CheckpointError, match="its metadata says it is part 3 of"):
        GGUFCheckpoint(files[0])


def _write_with_the_package(path, model, **writer_options) -> Path:
    """``model`` written by the gguf package's own writer (``writer_options``: its alignment, byte order)."""
    from offload.gguf.writer import _add

    writer = gguf.GGUFWriter(str(path), "llama", **writer_options.get("init", {}))
    if "alignment" in writer_options:
        writer.add_custom_alignment(writer_options["alignment"])
    for key, value in arch_metadata("llama", model.config, "tiny").items():
        _add(writer, key, value)
    for t in gguf_tensors_of(model, "llama"):
        writer.add_tensor(t.name, np.ascontiguousarray(t.make()), raw_dtype=t.ggml_type)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return path


@pytest.mark.parametrize("alignment", [32, 64])
def test_a_file_that_names_its_alignment_loads(tmp_path, alignment):
    """general.alignment (a uint32 in the file) is honoured, as llama.cpp honours it; 32 is also the default."""
    model = hf_model("llama", seed=3)
    path = _write_with_the_package(tmp_path / "aligned.gguf", model, alignment=alignment)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    with offload.load_model(path, dtype=torch.float32, max_seq_len=32, progress=False) as ours:
        torch.testing.assert_close(ours(ids), want, atol=1e-4, rtol=0)


def test_a_big_endian_file_is_refused_by_name(tmp_path):
    path = _write_with_the_package(tmp_path / "big.gguf", hf_model("llama", seed=3),
                                   init=dict(endianess=gguf.GGUFEndian.BIG))
    _one_line_checkpoint_error(path, "big-endian GGUF file")


def test_tensors_the_model_would_not_use_are_refused(tmp_path):
    """An LM head bias, norm biases, an output projection's bias without the q/k/v biases: names a Hugging Face
    model has, but the model the metadata describes does not use them. Dropped, the logits would be another
    model's."""
    model = hf_model("mistral", seed=9)
    extra = [TensorToWrite("output.bias", T.F32, (model.config.vocab_size,),
                           lambda: np.full(model.config.vocab_size, 5.0, np.float32)),
             TensorToWrite("blk.0.attn_output.bias", T.F32, (model.config.hidden_size,),
                           lambda: np.ones(model.config.hidden_size, np.float32))]
    path = tmp_path / "extra.gguf"
    write_gguf(path, "llama", arch_metadata("llama", model.config, "tiny"), gguf_tensors_of(model, "llama") + extra)
    with pytest.raises(CheckpointError) as info:
        offload.load_model(path, dtype=torch.float32, max_seq_len=32, progress=False)
    message = str(info.value)
    assert "2 tensor(s) the model would not use (output.bias, blk.0.attn_output.bias)" in message, message


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_file_of_16_bit_layers_is_quantized_at_load_as_a_checkpoint_is(tmp_path, fmt):
    """quantize= on a GGUF file whose layers are F16: its tensors are read dense and quantized as a checkpoint
    directory's are (the same float32 weights give the same logits, bitwise). A file of compressed layers is
    stored quantized already, and says so."""
    model = hf_model("llama", seed=21)
    for name, w in model.state_dict().items():  # the weights as F16 holds them
        w.copy_(w.half().float())
    path = write_model_gguf(tmp_path / "f16.gguf", model, "llama",
                            kind_of=lambda n: T.F16 if n.startswith("blk.") and "norm" not in n else None)[0]
    model.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    kw = dict(dtype=torch.float32, max_seq_len=32, quantize=fmt, group_size=32 if fmt == "int4" else None,
              progress=False)
    with offload.load_model(path, **kw) as ours, offload.load_model(tmp_path / "hf", **kw) as theirs:
        assert ours.plan.needs.weight_format.startswith(fmt), ours.plan.needs.weight_format
        assert torch.equal(ours(ids), theirs(ids))
    q41 = write_model_gguf(tmp_path / "q41.gguf", model, "llama",
                           kind_of=lambda n: T.Q4_1 if n.startswith("blk.") and "norm" not in n else None)[0]
    with pytest.raises(offload.InputError, match="q41.gguf is stored quantized already"):
        offload.load_model(q41, **kw)


@pytest.mark.parametrize("kind", [T.Q8_0, T.Q4_0])
def test_a_vector_in_a_block_type_reads_whole(tmp_path, kind):
    """A norm stored in blocks (llama.cpp keeps vectors in F32, but a file may not): its bytes are blocks, so
    reading its 64 values reads 68 bytes of Q8_0 (they were cut at 64), and its second block's values the bytes
    of that block (of Q4_0 too, whose whole vector fitted in the first 64 bytes)."""
    model = hf_model("llama", seed=3)
    path = write_model_gguf(tmp_path / "norm.gguf", model, "llama",
                            kind_of=lambda n: kind if n == "output_norm.weight" else None)[0]
    ck = GGUFCheckpoint(path)
    want = gguf.quants.dequantize(gguf.GGUFReader(path).get_tensor(
        [t.name for t in gguf.GGUFReader(path).tensors].index("output_norm.weight")).data, kind)
    assert torch.equal(ck.dense("model.norm.weight"), torch.from_numpy(want.reshape(-1)))
    assert torch.equal(ck.dense("model.norm.weight", rows=(32, 64)), torch.from_numpy(want.reshape(-1)[32:64]))


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.gguf"
    write_model_gguf(path, hf_model("llama", seed=5), "llama", kind_of=mixed_types)
    return path


def _one_line_checkpoint_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        GGUFCheckpoint(path)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("keep", [0.999, 0.6, 0.002])
def test_truncated_files(good_file, tmp_path, keep):
    """Cut in the last tensor, in the middle of the tensors, in the metadata: one line naming the file."""
    data = good_file.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    message = _one_line_checkpoint_error(path, "cut.gguf")
    assert "past the end of the file" in message and "truncated" in message


def test_bad_magic(good_file, tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + good_file.read_bytes()[4:])
    _one_line_checkpoint_error(path, "bad.gguf", "not a GGUF file")


def test_empty_file_and_missing_file(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    _one_line_checkpoint_error(tmp_path / "empty.gguf", "not a GGUF file")
    _one_line_checkpoint_error(tmp_path / "nothing.gguf", "does not exist")


@pytest.mark.parametrize("moved_by", [-1, 4, 32, "past the end"])
def test_a_tensor_not_where_the_one_before_it_ends(good_file, tmp_path, moved_by):
    """A tensor whose offset is not where the tensor before it ends, aligned (misaligned, overlapping its
    neighbour, skipping bytes, past the file) is refused, as llama.cpp refuses it: the bytes it names are not
    its own, and loading them would give wrong weights without a word."""
    reader = gguf.GGUFReader(good_file)
    victim = reader.tensors[3]
    offset_field = victim.field.parts[5]  # the tensor's data offset, relative to the data section
    at = int(victim.field.offset) + sum(p.nbytes for p in victim.field.parts[:5])
    data = bytearray(good_file.read_bytes())
    assert int(np.frombuffer(data[at : at + 8], np.uint64)[0]) == int(offset_field[0])
    offset = len(data) if moved_by == "past the end" else int(offset_field[0]) + moved_by
    data[at : at + 8] = np.array([offset], dtype=np.uint64).tobytes()
    path = tmp_path / "lying.gguf"
    path.write_bytes(bytes(data))
    _one_line_checkpoint_error(path, "lying.gguf", repr(victim.name), f"has offset {offset}, expected "
                               f"{int(offset_field[0])}")


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "phi.gguf"
    write_gguf(path, "phi3", {"phi3.block_count": 1}, [TensorToWrite("token_embd.weight", T.F32, (4, 8),
                                                                     lambda: np.zeros((4, 8), np.float32))])
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'phi3'; supported: llama, qwen2, qwen3, gemma3"):
        GGUFCheckpoint(path)


def test_a_tensor_with_no_place_is_refused(tmp_path):
    model = hf_model("qwen2")
    extra = TensorToWrite("blk.0.ffn_gate_exps.weight", T.F32, (2, 64, 64), lambda: np.zeros((2, 64, 64), np.float32))
    meta = arch_metadata("qwen2", model.config, "moe")
    path = tmp_path / "moe.gguf"
    write_gguf(path, "qwen2", meta, gguf_tensors_of(model, "qwen2") + [extra])
    _one_line_checkpoint_error(path, "'blk.0.ffn_gate_exps.weight' has no place in a qwen2 model")


def test_missing_gguf_package_names_the_extra(monkeypatch):
    import builtins

    from offload.gguf import reader

    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("no gguf")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(CheckpointError, match=r"needs the gguf package: pip install -e '\.\[gguf\]'"):
        reader.gguf_package()


# ----------------------------------------------------------------------------- config details


def metadata_only_file(path, arch: str, meta: dict, extra_tensors=()):
    """A file with metadata, an embedding and ``extra_tensors``: enough for hf_config."""
    tensors = [TensorToWrite("token_embd.weight", T.F32, (32, 64), lambda: np.zeros((32, 64), np.float32)),
               *extra_tensors]
    write_gguf(path, arch, meta, tensors)
    return GGUFFiles(path)


def llama_meta(**overrides):
    config = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, rope_theta=500000.0, head_dim=16)
    config.update(overrides)
    return llama_metadata(config)


def llama3_rope_freqs(factor, low, high, old, theta=500000.0, head_dim=16):
    """rope_freqs as llama.cpp's converter computes it (LlamaModel.generate_extra_tensors)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_scaling_comes_back_from_rope_freqs(tmp_path, factor):
    """Llama 3.1-3.3 files carry their rotary scaling only as the rope_freqs tensor; the parameters found
    are Llama 3's and give offload the same inverse frequencies as the original config."""
    original = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
    freqs = llama3_rope_freqs(factor, 1.0, 4.0, 8192, head_dim=128)
    rope = TensorToWrite("rope_freqs.weight", T.F32, (64,), lambda: freqs)
    config = hf_config(metadata_only_file(tmp_path / "l3.gguf", "llama", llama_meta(head_dim=128), [rope]))
    assert config["rope_scaling"] == original
    assert torch.equal(config_from_dict(config).rope_inv_freq(),
                       config_from_dict(dict(config, rope_scaling=original)).rope_inv_freq())


def test_rope_freqs_of_another_kind_are_refused(tmp_path):
    freqs = np.linspace(1, 3, 8, dtype=np.float32)  # head_dim 16: 8 frequencies
    rope = TensorToWrite("rope_freqs.weight", T.F32, (8,), lambda: freqs)
    with pytest.raises(ConfigError, match="does not follow Llama 3's rotary scaling"):
        hf_config(metadata_only_file(tmp_path / "odd.gguf", "llama", llama_meta(), [rope]))


def test_linear_and_unsupported_rope_scaling(tmp_path):
    meta = {**llama_meta(), "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    config = hf_config(metadata_only_file(tmp_path / "lin.gguf", "llama", meta))
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    meta = {**llama_meta(), "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 32768}
    config = hf_config(metadata_only_file(tmp_path / "yarn.gguf", "llama", meta))
    with pytest.raises(ConfigError, match="unsupported rope type 'yarn'"):
        config_from_dict(config)


def test_config_fields_llama_cpp_implies(tmp_path):
    """Tied embeddings when there is no output tensor, the vocabulary from the embedding, float32 metadata
    as the decimal it came from, stop ids from eos, eot and eom, and those of the tokens llama.cpp ends
    generation at by their text (Gemma 3's <end_of_turn>, where a file names only <eos>)."""
    meta = {**llama_meta(), "llama.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.eot_token_id": 7, "tokenizer.ggml.eom_token_id": 2}
    config = hf_config(metadata_only_file(tmp_path / "x.gguf", "llama", meta))
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 32
    assert config["rms_norm_eps"] == 1e-5 and config["eos_token_id"] == [2, 7] and config["bos_token_id"] == 1
    assert config["head_dim"] == 16 and config["architectures"] == ["LlamaForCausalLM"]
    out = TensorToWrite("output.weight", T.F32, (32, 64), lambda: np.zeros((32, 64), np.float32))
    assert hf_config(metadata_only_file(tmp_path / "y.gguf", "llama", meta, [out]))["tie_word_embeddings"] is False
    tokens = ["<pad>", "<eos>", "<bos>", "<end_of_turn>", "hi"] + [f"t{i}" for i in range(27)]
    gemma = {**meta, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.eos_token_id": 1}
    del gemma["tokenizer.ggml.eot_token_id"], gemma["tokenizer.ggml.eom_token_id"]
    assert hf_config(metadata_only_file(tmp_path / "z.gguf", "llama", gemma))["eos_token_id"] == [1, 3]


def test_mistral_style_files(tmp_path):
    """llama.cpp writes Mistral as llama: the name tells, and a stored window applies (none: full attention)."""
    meta = {**llama_meta(), "general.name": "Mistral 7B Instruct v0.3"}
    config = config_from_dict(hf_config(metadata_only_file(tmp_path / "m.gguf", "llama", meta)))
    assert config.architecture == "MistralForCausalLM" and set(config.sliding_windows) == {None}
    meta = {**llama_meta(), "llama.attention.sliding_window": 4096}
    config = config_from_dict(hf_config(metadata_only_file(tmp_path / "w.gguf", "llama", meta)))
    assert config.architecture == "MistralForCausalLM" and set(config.sliding_windows) == {4096}


def gemma3_meta(n_layers, **extra):
    return {"gemma3.block_count": n_layers, "gemma3.context_length": 8192, "gemma3.embedding_length": 64,
            "gemma3.feed_forward_length": 128, "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 2,
            "gemma3.attention.key_length": 32, "gemma3.attention.value_length": 32,
            "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.rope.freq_base": 1e6,
            "gemma3.attention.sliding_window": 1024, **extra}


def test_gemma3_fields_llama_cpp_assumes(tmp_path):
    """Sliding layers five of six, local base 10000, attention scaled by head_dim; 62 layers (the 27B) by
    hidden / heads as llama.cpp does; attention.scale when the file has it; linear scaling of global layers."""
    meta = gemma3_meta(12, **{"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0})
    config = config_from_dict(hf_config(metadata_only_file(tmp_path / "g.gguf", "gemma3", meta)))
    assert config.sliding_windows == tuple(None if (i + 1) % 6 == 0 else 1024 for i in range(12))
    assert config.local_rope_theta == 10000.0 and config.rope_theta == 1e6 and config.query_pre_attn_scalar == 32
    assert config.rope_scaling == {"rope_type": "linear", "factor": 8.0} and config.local_rope_scaling is None
    assert config.tie_word_embeddings
    big = config_from_dict(hf_config(metadata_only_file(tmp_path / "g27.gguf", "gemma3", gemma3_meta(62))))
    assert big.query_pre_attn_scalar == 64 / 4
    scaled = gemma3_meta(6, **{"gemma3.attention.scale": 0.125})
    assert config_from_dict(hf_config(metadata_only_file(tmp_path / "gs.gguf", "gemma3", scaled))).query_pre_attn_scalar == 64



def test_a_block_count_of_billions_is_refused_before_anything_is_built_per_layer(tmp_path):
    """Gemma 3's layer_types were built one entry per layer before the count was checked: a corrupt block_count of
    2**31 - 1 took 16 GiB (a MemoryError after 40 s here) instead of a ConfigError (found by the families'
    hostile test)."""
    files = metadata_only_file(tmp_path / "g.gguf", "gemma3", gemma3_meta(2**31 - 1))
    with pytest.raises(ConfigError, match="gemma3.block_count must be at most 65536, got 2147483647"):
        hf_config(files)

# ----------------------------------------------------------------------------- the Q4_K_M-like writer


def test_q4_k_m_like_file(tmp_path):
    """A small llama in the Q4_K_M-like mix: Q6_K embedding and output, attn_v / ffn_down in Q6_K on the
    layers llama.cpp gives more bits, Q4_K elsewhere, F32 norms; every tensor maps and reads as parts."""
    config = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path / "q4km.gguf"
    write_q4_k_m_like(path, config, seed=3)
    ck = GGUFCheckpoint(path)
    assert ck.config["tie_word_embeddings"] is False and config_from_dict(ck.config).n_layers == 8
    types = {m.name: gguf.GGMLQuantizationType(m.ggml_type).name for m in ck.tensors.values()}
    assert types["token_embd.weight"] == types["output.weight"] == "Q6_K"
    for i in range(8):
        more = "Q6_K" if uses_more_bits(i, 8) else "Q4_K"
        assert types[f"blk.{i}.attn_v.weight"] == types[f"blk.{i}.ffn_down.weight"] == more
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_up.weight"] == "Q4_K"
        assert types[f"blk.{i}.attn_norm.weight"] == "F32"
    assert [i for i in range(8) if uses_more_bits(i, 8)] == [0, 3, 6, 7]  # llama.cpp's rule for 8 layers
    for name, mapped in ck.tensors.items():
        if mapped.ggml_type != T.F32:
            parts = ck.parts(name, scale_dtype=torch.float32)
            assert torch.isfinite(dequantize_parts(parts, parts_format(mapped.ggml_type))).all()
    again = tmp_path / "again.gguf"
    write_q4_k_m_like(again, config, seed=3)
    assert again.read_bytes() == path.read_bytes()  # seeded per tensor: the same file


def test_q4_k_m_like_tensors_are_made_one_at_a_time(tmp_path):
    """The writer asks for each tensor's bytes only when it writes it (a 13B file never sits in memory)."""
    made = []
    tensors = [TensorToWrite(f"t{i}", T.Q4_K, (4, 256), lambda i=i: made.append(i) or random_blocks(
        T.Q4_K, 4, 256, np.random.default_rng(i))) for i in range(3)]
    import gguf as g

    real = g.GGUFWriter.write_tensor_data
    seen = []

    def spy(self, tensor, *args, **kwargs):
        seen.append(list(made))
        return real(self, tensor, *args, **kwargs)

    g.GGUFWriter.write_tensor_data = spy
    try:
        write_gguf(tmp_path / "t.gguf", "llama", {}, tensors)
    finally:
        g.GGUFWriter.write_tensor_data = real
    assert seen == [[0], [0, 1], [0, 1, 2]]


def test_llama_2_13b_shaped_q4_k_m_like_file_is_7_9_gb():
    """What write_q4_k_m_like(shape_config("llama-2-13b")) writes, counted without writing it."""
    config = shape_config("llama-2-13b")
    tensors = q4_k_m_like_tensors(config)
    nbytes = sum(math.prod(t.shape) // gguf.GGML_QUANT_SIZES[t.ggml_type][0] * gguf.GGML_QUANT_SIZES[t.ggml_type][1]
                 for t in tensors)
    assert len(tensors) == 2 + 40 * 9 + 1
    assert 7.7e9 < nbytes < 8.0e9, nbytes


# ----------------------------------------------------------------------------- tokenizers


TEXTS = ["Hello world", "The capital of France is", "  two  spaces and\nnew lines\n\n", "Café déjà vu ☕ 2024!",
         "offload's streamed layers: 1234567 tokens/s", "<|im_start|>user\nhi there<|im_end|>\n", "<think>why</think>",
         " leading space", "tabs\tand\r\nwindows"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def corpus() -> list[str]:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return [line for f in (root / "README.md", root / "docs" / "architecture.md")
            for line in f.read_text().splitlines() if line.strip()]


def byte_level_vocab():
    """A byte-level BPE trained on this repository's docs: its tokens in id order and its merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    import json

    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    return tokens, merges


def sentencepiece_vocab(specials: list[tuple[str, int]]):
    """A SentencePiece-style vocabulary: ``specials`` (token, type), the 256 byte tokens, then pieces learned
    with ▁ for spaces (and ▁▁); scores falling with the order pieces were learned in."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=900, show_progress=False))
    vocab = tok.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    head = [t for t, _ in specials] + [f"<0x{b:02X}>" for b in range(256)]
    tokens = head + [p for p in pieces if p not in head] + ["▁▁"] * ("▁▁" not in pieces)
    types = [k for _, k in specials] + [6] * 256 + [1] * (len(tokens) - len(head))
    scores = [0.0] * len(head) + [-float(i) for i in range(len(tokens) - len(head))]
    return tokens, types, scores


def write_tokenizer_gguf(path, arch: str, meta: dict):
    n = len(meta["tokenizer.ggml.tokens"])
    embedding = TensorToWrite("token_embd.weight", T.F32, (n, 8), lambda: np.zeros((n, 8), np.float32))
    write_gguf(path, arch, {"general.name": "tokenizer test", **meta}, [embedding])
    return path


def with_chat_tokens(tokens, types, extra):
    """``extra``: (token, type) pairs appended."""
    return tokens + [t for t, _ in extra], types + [k for _, k in extra]


@pytest.fixture(scope="module")
def byte_level_files(tmp_path_factory):
    tokens, merges = byte_level_vocab()
    tokens, types = with_chat_tokens(tokens, [1] * len(tokens), [("<|endoftext|>", 3), ("<|im_start|>", 3),
                                                                 ("<|im_end|>", 3), ("<think>", 4), ("</think>", 4)])
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
            "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"), "tokenizer.chat_template": CHATML}
    out = {}
    for pre, arch, add_bos in (("qwen2", "qwen2", False), ("llama-bpe", "llama", True), ("smollm", "llama", False),
                               ("gpt-2", "llama", False)):
        d = tmp_path_factory.mktemp(f"tok-{pre}")
        meta = {**base, "tokenizer.ggml.pre": pre, "tokenizer.ggml.add_bos_token": add_bos}
        out[pre] = write_tokenizer_gguf(d / "tok.gguf", arch, meta)
    return out


SPM_SPECIALS = {  # each family's special tokens, as its files list them first
    "llama": [("<unk>", 2), ("<s>", 3), ("</s>", 3)],
    "gemma3": [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<mask>", 3)],
}


@pytest.fixture(scope="module")
def sentencepiece_files(tmp_path_factory):
    out = {}
    for arch, specials in SPM_SPECIALS.items():
        tokens, types, scores = sentencepiece_vocab(specials)
        tokens, types = with_chat_tokens(tokens, types, [("<|im_start|>", 3), ("<|im_end|>", 3)])
        if arch == "gemma3":  # Gemma stores a token of spaces as spaces
            tokens[tokens.index("▁▁")] = "  "
        ids = {name: tokens.index(t) for name, t in (("bos", "<s>" if arch == "llama" else "<bos>"),
                                                     ("eos", "</s>" if arch == "llama" else "<eos>"),
                                                     ("unknown", "<unk>"))}
        meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                "tokenizer.ggml.scores": scores + [0.0, 0.0], "tokenizer.chat_template": CHATML,
                "tokenizer.ggml.add_space_prefix": arch != "gemma3",
                **{f"tokenizer.ggml.{k}_token_id": v for k, v in ids.items()}}
        out[arch] = write_tokenizer_gguf(tmp_path_factory.mktemp(f"spm-{arch}") / "spm.gguf", arch, meta)
    return out


def transformers_tokenizer(path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _tokenizer_of(path):
    from offload.gguf import gguf_tokenizer

    return gguf_tokenizer(GGUFFiles(path))


def assert_same_tokenizer(path, texts=TEXTS):
    mine, theirs = _tokenizer_of(path), transformers_tokenizer(path)
    assert mine.size == len(theirs)
    for text in texts:
        assert mine.encode(text) == theirs.encode(text), text  # a plain prompt: a BOS where the file says
        assert mine.encode(text, special=False) == theirs.encode(text, add_special_tokens=False), text
        ids = mine.encode(text, special=False)
        assert mine.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text  # offload drops special ones
    rendered = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert mine.chat_template.render(MESSAGES) == rendered
    assert mine.apply_chat_template(MESSAGES) == theirs.encode(rendered, add_special_tokens=False)
    return mine


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt-2"])
def test_byte_level_tokenizer_matches_transformers(byte_level_files, pre):
    mine = assert_same_tokenizer(byte_level_files[pre])
    assert mine.encode("<|im_start|>", special=False) == [mine.inner.token_to_id("<|im_start|>")]  # special: one token
    assert len(mine.encode("<think>", special=False)) == 1  # user-defined: whole too


def test_smollm_pre_tokenizer_splits_digits(byte_level_files):
    """llama.cpp's 'smollm' splits every digit off before the GPT-2 split; 'gpt-2' keeps runs of digits."""
    smollm, gpt2 = _tokenizer_of(byte_level_files["smollm"]), _tokenizer_of(byte_level_files["gpt-2"])
    digits = [smollm.decode([i]) for i in smollm.encode(" 2024")]
    assert digits == [" ", "2", "0", "2", "4"]
    assert all(not t.strip().isdigit() or len(t.strip()) == 1 for t in digits)
    assert gpt2.inner.pre_tokenizer.pre_tokenize_str(" 2024")[0][0].endswith("2024")


def test_add_bos_follows_the_file(byte_level_files):
    with_bos, without = _tokenizer_of(byte_level_files["llama-bpe"]), _tokenizer_of(byte_level_files["qwen2"])
    bos = with_bos.inner.token_to_id("<|endoftext|>")
    assert with_bos.encode("hi")[0] == bos and with_bos.encode("hi", special=False)[0] != bos  # a plain prompt's
    assert without.encode("hi") == without.encode("hi", special=False)
    rendered = with_bos.chat_template.render(MESSAGES)  # a chat template writes its own: nothing is added
    assert with_bos.apply_chat_template(MESSAGES) == with_bos.encode(rendered, special=False)


def test_a_vocabulary_that_repeats_a_token_decodes_every_id(byte_level_files, tmp_path):
    """A repeated token's id is a hole in the tokenizer's vocabulary: tokenizers dropped it from decoded text
    without a word, and counting the vocabulary took its last id (here </think>) for one it does not know."""
    files = GGUFFiles(byte_level_files["qwen2"])
    meta = {k: files.value(k) for k in files.fields if k.startswith("tokenizer.")}
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    meta["tokenizer.ggml.tokens"] = [*tokens[:-5], tokens[300], *tokens[-5:]]  # before the five chat tokens
    meta["tokenizer.ggml.token_type"] = [*types[:-5], 1, *types[-5:]]
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        meta[key] += 1  # (chat tokens, moved up one)
    with pytest.warns(OffloadWarning, match="1 tokens repeat an earlier token's text"):
        tokenizer = _tokenizer_of(write_tokenizer_gguf(tmp_path / "repeats.gguf", "qwen2", meta))
    repeated, last = len(tokens) - 5, len(tokens)
    assert tokenizer.size == len(tokens) + 1
    text = tokenizer.decode([300])
    assert tokenizer.decode([300, repeated, 300]) == f"{text}<{repeated}>{text}"  # shown as an id, not dropped
    assert tokenizer.decode([last]) == "</think>"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sentencepiece_tokenizer_matches_transformers(sentencepiece_files, arch):
    """Merges rebuilt from the scores (llama) or from the vocabulary's order (Gemma), byte fallback for
    characters not in the vocabulary, the ▁ prefix as the file says."""
    mine = assert_same_tokenizer(sentencepiece_files[arch])
    coffee = mine.encode("☕")
    assert [mine.inner.id_to_token(i) for i in coffee][-3:] == ["<0xE2>", "<0x98>", "<0x95>"]
    assert mine.decode(coffee).endswith("☕")


def test_no_vocabulary_no_tokenizer(tmp_path):
    path = tmp_path / "bare.gguf"
    write_gguf(path, "llama", llama_meta(), [TensorToWrite("token_embd.weight", T.F32, (32, 64),
                                                           lambda: np.zeros((32, 64), np.float32))])
    assert _tokenizer_of(path) is None


def test_unknown_pre_tokenizer_is_refused(byte_level_files, tmp_path):
    files = GGUFFiles(byte_level_files["qwen2"])
    meta = {k: files.value(k) for k in files.fields if k.startswith("tokenizer.")}
    meta["tokenizer.ggml.pre"] = "martian"
    with pytest.raises(ConfigError, match="tokenizer.ggml.pre 'martian' is not one offload knows"):
        _tokenizer_of(write_tokenizer_gguf(tmp_path / "m.gguf", "qwen2", meta))


@pytest.mark.parametrize("change, words", [
    ({"tokenizer.ggml.merges": ["nospace"]}, "its tokenizer (tokenizer.ggml.*) cannot be built"),  # not two tokens
    ({"tokenizer.ggml.merges": ["Ġ zz"]}, "its tokenizer (tokenizer.ggml.*) cannot be built"),  # zz: no such token
    ({"tokenizer.ggml.tokens": list(range(300))}, "tokenizer.ggml.tokens must be an array of strings"),
])
def test_a_tokenizer_that_cannot_be_built_is_a_config_error(byte_level_files, tmp_path, change, words):
    """Metadata the tokenizers library refuses (it raises plain ``Exception``) or that is not a vocabulary at all."""
    files = GGUFFiles(byte_level_files["qwen2"])
    meta = {k: files.value(k) for k in files.fields if k.startswith("tokenizer.")} | change
    with pytest.raises(ConfigError, match=re.escape(words)):
        _tokenizer_of(write_tokenizer_gguf(tmp_path / "bad.gguf", "qwen2", meta))


# ----------------------------------------------------------------------------- the real SmolLM2-135M-Instruct file


@pytest.fixture(scope="module")
def smollm2_ck(smollm2_gguf):
    return GGUFCheckpoint(smollm2_gguf)


def test_smollm2_config(smollm2_ck):
    config = config_from_dict(smollm2_ck.config)
    assert (config.architecture, config.vocab_size, config.hidden_size, config.intermediate_size, config.n_layers,
            config.n_heads, config.n_kv_heads, config.head_dim) == ("LlamaForCausalLM", 49152, 576, 1536, 30, 9, 3, 64)
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5 and config.rope_scaling is None
    assert config.tie_word_embeddings and config.max_position_embeddings == 8192 and config.eos_token_ids == (2, 0)


def test_smollm2_tensor_names_shapes_and_types(smollm2_ck):
    layer = {"input_layernorm": (576,), "self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
             "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576), "post_attention_layernorm": (576,),
             "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536)}
    expected = {f"model.layers.{i}.{k}.weight": v for i in range(30) for k, v in layer.items()}
    expected.update({"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)})
    assert {name: m.shape for name, m in smollm2_ck.tensors.items()} == expected
    assert smollm2_ck.type_counts()["embed_tokens"] == {"Q8_0": 1}
    assert smollm2_ck.type_counts()["mlp.down_proj"] == {"Q4_1": 30}


def test_smollm2_q4_1_parts_are_the_gguf_values(smollm2_ck):
    """The file's Q4_1 tensors as int4 parts with float16 scales (exact for Q4_1) dequantize to the gguf
    package's values, q and k rows put back in Hugging Face order."""
    ck = smollm2_ck
    for name in ("model.layers.7.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.7.mlp.down_proj.weight"):
        mapped = ck.tensors[name]
        parts = ck.parts(name)
        assert parts["data"].shape == (mapped.shape[0], mapped.shape[1] // 2) and parts["scale"].dtype == torch.float16
        values = torch.from_numpy(reference(np.array(mapped.stored.data), T.Q4_1))
        if mapped.unpermute_heads:
            heads = mapped.unpermute_heads
            values = values.view(heads, -1, 2, values.shape[1]).transpose(1, 2).reshape(values.shape)
        assert torch.equal(dequantize_parts(parts, "int4"), values)


@pytest.mark.slow
def test_smollm2_against_transformers(smollm2_ck, smollm2):
    """The same file read by transformers (dequantized to float32): the same config, every tensor's name
    and shape, and every value equal, Q4_1 through offload's parts, Q8_0 embedding and F32 norms dense."""
    import json

    from safetensors.torch import load_file

    ck = smollm2_ck
    theirs_config = vars(config_from_dict(json.loads((smollm2 / "config.json").read_text())))
    ours_config = vars(config_from_dict(ck.config))
    # transformers takes float32 metadata as its float32 value (9.999999747378752e-06); offload as the decimal
    # that value was stored from (1e-05): the same float32
    assert np.float32(ours_config.pop("rms_norm_eps")) == np.float32(theirs_config.pop("rms_norm_eps"))
    # and stops where llama.cpp stops too: at <|endoftext|> (0) besides the file's eos
    assert ours_config.pop("eos_token_ids") == (*theirs_config.pop("eos_token_ids"), 0)
    assert ours_config == theirs_config
    state = load_file(str(smollm2 / "model.safetensors"))
    assert {n: tuple(t.shape) for n, t in state.items()} == {n: m.shape for n, m in ck.tensors.items()}
    for name, w in state.items():
        fmt = parts_format(ck.tensors[name].ggml_type)
        if fmt is not None and w.dim() == 2 and fmt.format == "int4":
            ours = dequantize_parts(ck.parts(name), fmt)
        else:
            ours = ck.dense(name)
        assert torch.equal(ours, w), name


@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_template_match_transformers(smollm2_gguf):
    mine = assert_same_tokenizer(smollm2_gguf, TEXTS + ["<|endoftext|>", "<repo_name>offload"])
    assert mine.encode("<|im_start|>user") == [1, 4093]
    assert mine.chat_template.special_tokens["eos_token"] == "<|im_end|>"


# ---------------------------------------------------------------------- GGUF files as models


def test_a_q4_k_m_file_loads_kept_compressed_and_streams_bitwise(tmp_path):
    """A Q4_K_M-like file (Q4_K and Q6_K projections, F32 norms): each projection in its own format (q and k
    int4, v int8 in groups of 16 where Q6_K, so q/k/v are stacked), half the layers streamed == resident."""
    from offload.models.shapes import shape_config
    from offload.gguf import write_q4_k_m_like

    config = {**shape_config("tiny"), "num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512}  # K-quants: 256s
    [path] = write_q4_k_m_like(tmp_path / "tiny.gguf", config, seed=3)
    kw = dict(dtype=torch.float32, max_seq_len=64, progress=False, quantize="stored")  # a CPU would expand them
    ids = torch.randint(3, config["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(0))
    with offload.load_model(path, **kw) as resident:
        plan = str(resident.plan)
        assert "as stored: int4 in groups of 32" in plan and "int8 in groups of 16" in plan
        stacked = [type(w.wqkv).__name__ for w in resident.weights.resident.values()]
        assert "StackedWeight" in stacked and "QuantizedWeight" in stacked  # v's format differs in some layers
        logits, tokens = resident(ids), resident.generate(ids, max_new_tokens=6, ignore_eos=True)
        needs = resident.plan.needs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        streamed = offload.load_model(path, gpu_memory=needs.gpu_budget_streaming(1), cpu_memory="1GiB", **kw)
    with streamed:
        assert streamed.plan.placement.count("host") == 3
        assert torch.equal(streamed(ids), logits)
        assert torch.equal(streamed.generate(ids, max_new_tokens=6, ignore_eos=True), tokens)


def test_a_file_of_two_three_and_five_bit_types_loads_kept_compressed(tmp_path):
    """Q3_K and Q2_K projections (int4 in groups of 16), Q5_0 and Q5_1 ones (int8 in groups of 32) are kept
    compressed, not expanded to the model's dtype: their logits are those of the file read dense (in float32 here,
    whose layers take over three times the bytes), and half the layers streamed give the resident logits bit for
    bit."""
    from offload.gguf import write_gguf
    from offload.gguf.writer import model_metadata

    config = {**shape_config("tiny"), "num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512}
    kinds = {"attn_q": T.Q3_K, "attn_output": T.Q3_K, "ffn_up": T.Q2_K, "ffn_gate": T.Q2_K, "attn_k": T.Q5_0,
             "attn_v": T.Q5_1, "ffn_down": T.Q5_0}
    tensors = []
    for t in q4_k_m_like_tensors(config, seed=5):
        kind = kinds.get(t.name.split(".")[2]) if t.name.startswith("blk.") else None
        if kind is not None:
            rows, cols = t.shape
            t = TensorToWrite(t.name, kind, t.shape, lambda k=kind, r=rows, c=cols, n=t.name: random_blocks(
                k, r, c, np.random.default_rng(len(n)), scale=2e-3))
        tensors.append(t)
    [path] = write_gguf(tmp_path / "q3.gguf", "llama", model_metadata("llama", config, "mix"), tensors)
    kw = dict(dtype=torch.float32, max_seq_len=64, progress=False)
    ids = torch.randint(3, config["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", OffloadWarning)  # no type is dequantized with a warning
        kept = offload.load_model(path, quantize="stored", **kw)
    with kept, offload.load_model(path, device="cpu", **kw) as dense:  # a CPU reads the file dense by default
        plan = str(kept.plan)
        assert "int4 in groups of 16" in plan and "int8 in groups of 32" in plan
        assert sum(kept.plan.needs.blocks) < sum(dense.plan.needs.blocks) / 3
        logits = kept(ids)  # on the GPU where there is one: its kernels against the CPU's dense products
        torch.testing.assert_close(logits.cpu(), dense(ids), rtol=2e-3, atol=2e-3)  # K-quant scales in float16
        needs = kept.plan.needs
        with offload.load_model(path, quantize="stored", gpu_memory=needs.gpu_budget_streaming(1), cpu_memory="1GiB",
                                **kw) as streamed:
            assert streamed.plan.placement.count("host") == 3
            assert torch.equal(streamed(ids), logits)


def test_quantize_does_not_apply_to_a_gguf_file(good_file):
    with pytest.raises(offload.InputError, match="quantized already"):
        offload.plan_model(good_file, quantize="int4")


def test_the_int4_draft_of_a_gguf_file_quantizes_its_weights_again(tmp_path):
    """``draft="int4"`` of a GGUF target: the file's tensors read dense and quantized to offload's int4 (the
    target keeps the file's own formats: Q8_0 and F32 here); greedy output is plain greedy decoding's. Links
    that bind (products are free) make the plan keep the draft, which reads a fraction of a target step's
    bytes, beside the resident target."""
    path = tmp_path / "q8.gguf"
    write_model_gguf(path, hf_model("llama", seed=5), "llama", kind_of=lambda name: T.Q8_0 if ".attn_" in name
                     and name.endswith(".weight") and "norm" not in name else None)
    kw = dict(dtype=torch.float32, max_seq_len=64, max_batch=2, quantize="stored", progress=False,
              link_bandwidth={"host": 1e9, "hbm": 1e11, "matmul": 1e15})
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    with offload.load_model(path, **kw) as plain, offload.load_model(path, draft="int4", **kw) as speculative:
        assert speculative.draft is not None, speculative.plan.draft
        assert "as stored: int8 in groups of 32" in str(speculative.plan), speculative.plan
        assert "layer weights: int4, group size" in str(speculative.draft.model.plan)
        want = plain.generate(ids, max_new_tokens=10, ignore_eos=True, return_result=True)
        got = speculative.generate(ids, max_new_tokens=10, ignore_eos=True, return_result=True)
        assert got.tokens == want.tokens and got.accepted_tokens > 0


def test_the_int4_draft_of_a_checkpoint_stored_by_quantize_py_is_refused_in_one_line(tiny, tmp_path):
    from offload.quantized import write_quantized

    out = tmp_path / "int8"
    write_quantized(tiny, out, "int8", dtype=torch.float32, progress=False)
    with pytest.raises(offload.InputError, match="give draft='ngram' or a draft model's path") as info:
        offload.plan_model(out, draft="int4")
    assert "\n" not in str(info.value)


def test_on_a_cpu_a_gguf_file_is_expanded_once_where_it_fits_in_half_the_budget(tmp_path):
    """The CPU has no kernels that multiply from compressed parts (each use would dequantize the matrix): the
    layers are expanded at load, computing what the stored parts do to float32 rounding; where the dense layers
    would take more than half the budget, or with quantize="stored", they stay as stored."""
    from offload.models.shapes import shape_config
    from offload.gguf import write_q4_k_m_like

    config = {**shape_config("tiny"), "num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512}
    [path] = write_q4_k_m_like(tmp_path / "tiny.gguf", config, seed=4)
    kw = dict(dtype=torch.float32, max_seq_len=64, progress=False)
    ids = torch.randint(3, config["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(1))
    with offload.load_model(path, **kw) as expanded, offload.load_model(path, quantize="stored", **kw) as stored:
        assert "as stored" not in str(expanded.plan) and "as stored" in str(stored.plan)
        assert sum(expanded.plan.needs.blocks) > 3 * sum(stored.plan.needs.blocks)
        torch.testing.assert_close(expanded(ids), stored(ids), rtol=1e-4, atol=1e-4)
        tight = 2 * sum(expanded.plan.needs.blocks) - 1
    with offload.load_model(path, gpu_memory=tight, **kw) as kept:
        assert "as stored" in str(kept.plan)


def test_quantize_stored_is_for_a_checkpoint_stored_quantized(tiny):
    with pytest.raises(offload.InputError, match="not stored quantized"):
        offload.plan_model(tiny, quantize="stored")


@pytest.mark.slow
def test_smollm2_from_its_gguf_file_matches_transformers_reading_it(smollm2_gguf):
    """The real SmolLM2-135M-Instruct (Q4_1): logits within 1e-4 and the same greedy tokens as transformers
    reading the same file (float32): expanded at load (a CPU's default), kept as stored, and as stored with half
    of its layers streamed; it answers a chat."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                           dtype=torch.float32).eval()
    tokenizer = GGUFCheckpoint(smollm2_gguf).tokenizer()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    prompt = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(prompt).logits
        greedy = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    kw = dict(dtype=torch.float32, max_seq_len=128, progress=False)
    with offload.load_model(smollm2_gguf, **kw) as expanded, \
            offload.load_model(smollm2_gguf, quantize="stored", **kw) as resident:
        assert "as stored" not in str(expanded.plan) and "as stored" in str(resident.plan)
        needs = resident.plan.needs
        models = [expanded, resident]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OffloadWarning)
            models.append(offload.load_model(smollm2_gguf, gpu_memory=needs.gpu_budget_streaming(15),
                                             cpu_memory="1GiB", quantize="stored", **kw))
        for model in models:
            assert (model(prompt) - ref).abs().max().item() <= 1e-4
            assert torch.equal(model.generate(prompt, max_new_tokens=12, ignore_eos=True), greedy)
        assert models[2].plan.placement.count("host") == 15
        assert "Paris" in tokenizer.decode(greedy[0, len(ids):].tolist())
        models[2].close()


def test_gguf_to_hf_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys):
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("gguf_to_hf", root / "benchmarks" / "gguf_to_hf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    for args, words in [([str(tmp_path / "none.gguf"), str(tmp_path / "a")], "no such file"),
                        ([str(not_gguf), str(tmp_path / "b")], "transformers cannot read it"), ([], "required")]:
        assert script.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("gguf_to_hf: ") and words in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_command_line_shows_a_dequantized_type_in_one_line(tmp_path, capsys):
    """A warning that is not the plan's (here: a tensor type with no compressed form) is printed, as one line."""
    from offload import cli

    path = tmp_path / "mxfp4.gguf"
    write_model_gguf(path, hf_model("llama", seed=3), "llama", kind_of=lambda name: T.MXFP4 if name ==
                     "blk.1.ffn_down.weight" else None)
    argv = ["--model", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--dtype", "fp32", "--quiet"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("run_offloaded: warning: model.layers.*.mlp.down_proj.weight: MXFP4")


def test_control_tokens_spelled_outside_the_byte_alphabet_are_matched_whole(tmp_path):
    """DeepSeek-R1's distilled models (pre 'deepseek-r1-qwen'): llama.cpp's converter keeps <｜User｜> and its like
    in plain text, typed CONTROL. A chat prompt holds each as one token (as llama.cpp tokenizes it), and decoding
    skips them as special tokens, or shows them whole."""
    tokens, merges = byte_level_vocab()
    specials = [("<｜begin▁of▁sentence｜>", 3), ("<｜end▁of▁sentence｜>", 3), ("<｜User｜>", 3),
                ("<｜Assistant｜>", 3), ("<think>", 4)]
    tokens, types = with_chat_tokens(tokens, [1] * len(tokens), specials)
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.pre": "deepseek-r1-qwen",
            "tokenizer.ggml.bos_token_id": tokens.index("<｜begin▁of▁sentence｜>"),
            "tokenizer.ggml.eos_token_id": tokens.index("<｜end▁of▁sentence｜>"), "tokenizer.chat_template": template}
    mine = _tokenizer_of(write_tokenizer_gguf(tmp_path / "tok.gguf", "qwen2", meta))
    ids = mine.apply_chat_template([{"role": "user", "content": "Hi"}])
    first, user, assistant, think = (tokens.index(t) for t, _ in specials[:1] + specials[2:])
    assert ids[:2] == [first, user] and ids[-3:-1] == [assistant, think]  # each whole
    assert mine.decode(ids[2:-3]) == "Hi" and mine.decode(ids[-1:]) == "\n"
    assert mine.decode(ids) == "Hi<think>\n"  # special tokens skipped; a user-defined one shown
    assert mine.decode(ids, special=True) == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>\n"
    assert mine.decode(mine.encode("a ½ b", special=False)) == "a ½ b"  # text outside the alphabet: as bytes
