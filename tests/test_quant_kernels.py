"""The Triton kernels that multiply from compressed weights (``offload.models.quant_kernels``) against
dequantize-then-multiply in float64.

On a GPU they run natively; on a CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py
when there is no GPU) when Triton is installed, in float16 (the interpreter rounds bfloat16 its own way).
Skipped without Triton.
"""

from dataclasses import replace

import pytest
import torch

from offload.models import kernels, ops, quant_kernels
from offload.models.quant import FUSED, QuantizedWeight, QuantScheme, dequantize, fused_takes, quantize

from conftest import compile_for_hopper

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="needs Triton (natively on a GPU, or its interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]
slow_on_the_interpreter = pytest.mark.slow if DEVICE == "cpu" else pytest.mark.gpu
FORMATS = [("int4", 128, False), ("int4", 32, False), ("int4", 64, False), ("int4", 16, False), ("int8", None, False),
           ("int8", 32, False), ("int8", 16, True)]  # int4 in groups of 16: GGUF's Q3_K and Q2_K


def packed(fmt, group, rows, cols, dtype, seed, minimum=False, scale_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.05
    scheme = QuantScheme(fmt, group, 1 << 20, FUSED, rounding="minmax", scale_dtype=scale_dtype)
    parts = {name: t.to(DEVICE) for name, t in quantize(w, scheme, dtype).items()}
    if minimum:  # grouped int8 with a minimum (GGUF's Q5_K)
        scheme = replace(scheme, minimum=True)
        parts["minimum"] = (torch.randn(parts["scale"].shape, generator=gen) * 0.01).to(parts["scale"].dtype).to(DEVICE)
    return QuantizedWeight(parts["data"], parts["scale"], parts.get("minimum"), scheme)


def empty_weight(fmt, group, rows, cols):
    """A compressed weight's parts, zeros, on the CPU: for the choices that read only its shape and scheme."""
    data = torch.zeros(rows, cols // 2 if fmt == "int4" else cols, dtype=torch.uint8 if fmt == "int4" else torch.int8)
    groups = cols // (group or cols)
    minimum = torch.zeros(rows, groups) if fmt == "int4" else None
    return QuantizedWeight(data, torch.zeros(rows, groups), minimum, QuantScheme(fmt, group, 1 << 20, FUSED))


def assert_close_to_exact(got, x, w, bias):
    exact = x.double() @ dequantize(w, torch.float64).double().T
    exact = exact if bias is None else exact + bias.double()
    scale = exact.abs().max()
    assert got.shape == exact.shape and got.dtype == x.dtype
    # float32 sums of weights rounded to 16 bits: a few roundings of the largest output at most
    tolerance = 2 ** -6 if x.dtype == torch.bfloat16 else 2 ** -9
    assert ((got.double() - exact).abs().max() <= tolerance * scale), (got.double() - exact).abs().max() / scale


@slow_on_the_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt, group, minimum", FORMATS)
@pytest.mark.parametrize("rows, cols", [(67, 384), (200, 576), (33, 1024)])
@pytest.mark.parametrize("m", [1, 2, 5, 40])
def test_the_product_equals_dequantize_then_multiply(dtype, fmt, group, minimum, rows, cols, m):
    if group is not None and cols % group:
        pytest.skip("the group does not divide the columns")
    w = packed(fmt, group, rows, cols, dtype, seed=rows + cols + m, minimum=minimum)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, cols, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(rows, generator=gen).to(dtype).to(DEVICE)
    for b in (None, bias):
        assert_close_to_exact(quant_kernels.linear(x, w, b), x, w, b)


@pytest.mark.parametrize("fmt, group, minimum", FORMATS)
@pytest.mark.parametrize("m, cols", [(1, 256), (4, 256), (5, 256), (1, 3072)])  # 3072 columns: three stretches
def test_each_format_for_one_row_and_for_several(fmt, group, minimum, m, cols):
    test_the_product_equals_dequantize_then_multiply(DTYPES[0], fmt, group, minimum, 40, cols, m)


@pytest.mark.parametrize("m", [1, 40])
def test_int4_in_groups_of_16_takes_two_groups_a_column_step(m):
    """A product's 16-bit inputs take at least 16 columns, and half of int4's group of 16 is 8: the tiled
    product steps through two groups at a time, each byte scaled by its own group's scale and minimum (odd
    counts of groups too: 17 here, the last step's second group outside the row)."""
    w = empty_weight("int4", 16, 40, 272)
    assert quant_kernels.matmul_blocking(w, m)[2] == 32
    test_the_product_equals_dequantize_then_multiply(DTYPES[0], "int4", 16, False, 40, 272, m)


def test_int4_in_groups_of_16_reads_no_scale_past_a_row():
    """An odd count of groups of 16 (48 columns: 3): the last step's second group lies past each row's scales and
    minimums; what lies there (the next row's, or past the last row, memory: inf here) must not reach the sums
    (its weights are masked to 0, but 0 times a scale plus a minimum of inf is NaN)."""
    w = packed("int4", 16, 24, 48, DTYPES[0], seed=3, minimum=False)

    def before_inf(t):  # t's values, followed in memory by inf
        buf = torch.full((t.numel() + 64,), float("inf"), dtype=t.dtype, device=t.device)
        buf[: t.numel()] = t.reshape(-1)
        return buf[: t.numel()].view(t.shape)

    fenced = QuantizedWeight(w.data, before_inf(w.scale), before_inf(w.minimum), w.scheme)
    x = torch.randn(40, 48, generator=torch.Generator().manual_seed(0)).to(DTYPES[0]).to(DEVICE)
    assert quant_kernels.matmul_blocking(fenced, 40)[2] == 32
    assert_close_to_exact(quant_kernels.linear(x, fenced), x, w, None)


@pytest.mark.parametrize("shape", [(1, 1, 256), (3, 2, 256)])
def test_leading_dimensions_and_float16_scales_of_a_bfloat16_model(shape):
    dtype = DTYPES[-1]
    w = packed("int4", 32, 48, 256, dtype, seed=1, scale_dtype=torch.float16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    got = quant_kernels.linear(x, w)
    assert got.shape == (*shape[:-1], 48)
    assert_close_to_exact(got.reshape(-1, 48), x.reshape(-1, 256), w, None)


def test_a_tensor_parallel_shard_of_the_columns():
    """A row-parallel shard holds whole groups of its columns: its product is the full product's share."""
    dtype = DTYPES[0]
    whole = packed("int4", 32, 40, 512, dtype, seed=3)
    half = QuantizedWeight(whole.data[:, 128:].contiguous(), whole.scale[:, 8:].contiguous(),
                           whole.minimum[:, 8:].contiguous(), whole.scheme)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(4)).to(dtype).to(DEVICE)
    assert_close_to_exact(quant_kernels.linear(x, half), x, half, None)


def test_a_small_weights_word_gemv_takes_smaller_tiles():
    """A weight of few 128 x 256 tiles (SmolLM2-135M's) takes tiles of 32 x 128 (whole groups): more programs, each
    done sooner; llama-2-7b's keep theirs."""
    def blocking(rows, cols, group):
        w = QuantizedWeight(torch.zeros(rows, cols // 2, dtype=torch.uint8), torch.zeros(rows, cols // group),
                            torch.zeros(rows, cols // group), QuantScheme("int4", group, 1 << 20, FUSED))
        return quant_kernels.gemv_blocking(w)

    assert blocking(960, 576, 64)[:2] == (32, 128) and blocking(3072, 576, 64)[:2] == (32, 128)
    assert blocking(576, 1536, 256)[:2] == (32, 256)
    assert blocking(12288, 4096, 64)[:2] == (128, 256) and blocking(4096, 4096, 64)[:2] == (128, 256)
    # integer products (int4 in groups of 128): whole 1024-column tiles, 32 features, two warps, programs toward
    # INT_PROGRAMS (384 already: one stretch; 128: four); 11008 columns keep 128 x 256, in 16 stretches
    assert blocking(12288, 4096, 128) == (32, 1024, 1, 2, True) and blocking(4096, 4096, 128) == (32, 1024, 4, 2, True)
    assert blocking(4096, 11008, 128) == (128, 256, 16, 4, True)


def test_a_small_weights_gemv_takes_a_few_more_rows():
    """A small weight's product (SmolLM2-135M's) goes to the GEMV up to ``SMALL_GEMV_ROWS`` rows, each row the same
    bits as alone (a draft model's spare rows draft what its rows would); llama-2-7b's keep ``GEMV_ROWS``."""
    small, large = empty_weight("int4", 64, 3072, 576), empty_weight("int4", 128, 4096, 4096)
    assert quant_kernels.gemv_rows(small) == max(quant_kernels.GEMV_ROWS, quant_kernels.SMALL_GEMV_ROWS)
    assert quant_kernels.gemv_rows(large) == quant_kernels.GEMV_ROWS
    w = packed("int4", 64, 200, 576, DTYPES[0], seed=5)
    m = quant_kernels.gemv_rows(w)
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(6)).to(DTYPES[0]).to(DEVICE)
    together = quant_kernels.linear(x, w)
    assert_close_to_exact(together, x, w, None)
    for row in range(m):
        assert torch.equal(quant_kernels.linear(x[row : row + 1], w), together[row : row + 1])
    with pytest.raises(ValueError, match="GEMV's products"):  # a tiled product's blocking adds no residual
        quant_kernels.linear(x, w, residual=together, blocking=(16, 64, 64, 1, 4, 1, False))


def test_which_schemes_the_kernels_take():
    assert fused_takes(QuantScheme("int8", None, 1), 100)
    assert fused_takes(QuantScheme("int4", 64, 1), 576)
    assert not fused_takes(QuantScheme("int4", 96, 1), 576)  # not a power of two: dequantized instead
    assert not fused_takes(QuantScheme("int4", 8, 1), 64)  # smaller than a tile's groups


WORD_FORMATS = [("int4", 128, False), ("int4", 32, False), ("int4", 64, False), ("int8", None, False),
                ("int8", 32, False), ("int8", 16, True)]


@pytest.mark.parametrize("fmt, group, minimum", WORD_FORMATS)
@pytest.mark.parametrize("rows, cols, m, blocking", [
    (67, 384, 1, None),  # odd rows, columns past the last tile: masked
    (128, 512, 2, None),  # whole tiles: no masks
    (40, 1024, 1, (16, 128, 3, 4, True)),  # three stretches of columns (of 3, 3 and 2 tiles) summed
])
def test_the_word_gemv_equals_dequantize_then_multiply(fmt, group, minimum, rows, cols, m, blocking):
    """``_gemv_words_kernel`` (fields read in place from 32-bit words: the candidate ``bench_quant_kernels
    --sweep`` times against ``_gemv_kernel``), with a bias, and float16 scales."""
    dtype = DTYPES[0]
    for scale_dtype in (None, torch.float16):
        w = packed(fmt, group, rows, cols, dtype, seed=rows + (group or 0), minimum=minimum, scale_dtype=scale_dtype)
        gen = torch.Generator().manual_seed(m)
        x = torch.randn(m, cols, generator=gen).to(dtype).to(DEVICE)
        bias = torch.randn(rows, generator=gen).to(dtype).to(DEVICE)
        for b in (None, bias):
            got = quant_kernels.linear(x, w, b, blocking=blocking or quant_kernels.gemv_blocking(w, words=True))
            assert_close_to_exact(got, x, w, b)


@pytest.mark.parametrize("fmt, group, minimum", WORD_FORMATS)
@pytest.mark.parametrize("rows, cols, m, blocking", [
    (67, 384, 1, None),  # odd rows, columns past the last tile: masked
    (128, 512, 2, None),  # whole tiles: no masks
    (40, 1024, 1, (16, 128, 3, 4, True)),  # three stretches of columns summed
])
def test_the_integer_gemv_equals_dequantize_then_multiply(fmt, group, minimum, rows, cols, m, blocking, monkeypatch):
    """The word GEMV's products in integers (``INT_GEMV``: inputs in 16-bit fixed point per group, four products
    a ``dp4a``): against float64, with a bias and float16 scales; inputs whose magnitudes span 2^12 within a group
    (so the smallest are rounded) stay within the tolerance; a group of zeros gives zero, an infinite or NaN input
    NaN."""
    monkeypatch.setattr(quant_kernels, "INT_GEMV", True)
    dtype = DTYPES[0]
    for scale_dtype in (None, torch.float16):
        w = packed(fmt, group, rows, cols, dtype, seed=rows + (group or 0), minimum=minimum, scale_dtype=scale_dtype)
        gen = torch.Generator().manual_seed(m)
        x = torch.randn(m, cols, generator=gen) * torch.exp2(torch.randint(-6, 7, (m, cols), generator=gen))
        x = x.to(dtype).to(DEVICE)
        bias = torch.randn(rows, generator=gen).to(dtype).to(DEVICE)
        for b in (None, bias):
            got = quant_kernels.linear(x, w, b, blocking=blocking or quant_kernels.gemv_blocking(w))
            assert_close_to_exact(got, x, w, b)
    blocking = blocking or quant_kernels.gemv_blocking(w)
    assert not quant_kernels.linear(torch.zeros_like(x), w, blocking=blocking).any()
    for bad in (float("inf"), float("nan")):  # its group's sums NaN, with or without a minimum
        x[0, 5] = bad
        assert quant_kernels.linear(x, w, blocking=blocking)[0].isnan().any()


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="inline PTX runs on a GPU")
@pytest.mark.parametrize("fmt, group", [("int4", 128), ("int8", None), ("int4", 32)])
def test_integer_products_by_ptx_equal_those_by_triton_operations(fmt, group, monkeypatch):
    """``dp4a`` by inline PTX against Triton's integer operations (what the interpreter checks): the same integers,
    so the same bits."""
    monkeypatch.setattr(quant_kernels, "INT_GEMV", True)
    w = packed(fmt, group, 300, 2048, torch.bfloat16, seed=33)
    x = (torch.randn(2, 2048, generator=torch.Generator().manual_seed(34)) * 3).to(torch.bfloat16).to(DEVICE)
    by_ptx = quant_kernels.linear(x, w)
    monkeypatch.setattr(quant_kernels, "INT_PTX", False)
    assert quant_kernels.linear(x, w).equal(by_ptx)
    assert_close_to_exact(by_ptx, x, w, None)


def test_integer_products_are_chosen_where_switched_on_or_timed_faster(monkeypatch):
    """``INT_GEMV`` on: the GEMV of int8 reads words too (with its products in integers); off, or unset where its
    rows are not whole 2048-column tiles: int8 keeps the byte kernel. By default int4 in groups of 128 or more has
    them, smaller groups not; off, none."""
    big, small = empty_weight("int4", 128, 64, 512), empty_weight("int4", 64, 64, 512)
    monkeypatch.setattr(quant_kernels, "INT_GEMV", None)
    assert quant_kernels.ints_chosen(big) and not quant_kernels.ints_chosen(small)
    assert not quant_kernels.ints_chosen(empty_weight("int8", None, 64, 512))
    wide8 = empty_weight("int8", None, 4096, 4096)  # int8 in whole 2048-column tiles: 16 features, one stretch
    assert quant_kernels.ints_chosen(wide8) and quant_kernels.gemv_blocking(wide8) == (16, 2048, 1, 4, True)
    monkeypatch.setattr(quant_kernels, "INT_GEMV", False)
    assert not quant_kernels.ints_chosen(big)
    w = packed("int8", None, 64, 512, DTYPES[0], seed=31)
    x = (torch.randn(1, 512, generator=torch.Generator().manual_seed(32)) * 3).to(DTYPES[0]).to(DEVICE)
    for switch in (None, False):
        monkeypatch.setattr(quant_kernels, "INT_GEMV", switch)
        assert not quant_kernels.gemv_blocking(w)[-1]
    monkeypatch.setattr(quant_kernels, "INT_GEMV", True)
    assert quant_kernels.gemv_blocking(w)[-1]
    assert_close_to_exact(quant_kernels.linear(x, w), x, w, None)


@pytest.mark.parametrize("group, rows, cols, m, splits", [(128, 67, 384, 5, 1), (256, 130, 512, 16, 2),
                                                         (128, 40, 1024, 3, 4)])
def test_the_word_product_of_a_few_rows_equals_dequantize_then_multiply(group, rows, cols, m, splits):
    """``_matmul_kernel`` with WORDS (int4 read as words, eight products a group), for 3 to 16 rows: odd rows and
    features, stretches of columns summed, a bias, float16 scales."""
    dtype = DTYPES[0]
    for scale_dtype in (None, torch.float16):
        w = packed("int4", group, rows, cols, dtype, seed=rows + group, scale_dtype=scale_dtype)
        gen = torch.Generator().manual_seed(m)
        x = torch.randn(m, cols, generator=gen).to(dtype).to(DEVICE)
        bias = torch.randn(rows, generator=gen).to(dtype).to(DEVICE)
        for b in (None, bias):
            got = quant_kernels.linear(x, w, b, blocking=(16, 64, group, splits, 4, 3, True))
            assert_close_to_exact(got, x, w, b)


FUSED_FORMATS = [("int4", 64, False), ("int8", None, False), ("int8", 16, True)]
# rows, the GEMV (the default, words or bytes), how a split product's stretches are summed
FUSED_KERNELS = [(1, "default", "last"), (2, "default", "second kernel"), (1, "words", "last"), (2, "bytes", "last"),
                 (1, "bytes", "one"), (2, "ints", "last"), (4, "default", "last")]  # 4: a small weight's GEMV


def fused_case(fmt, group, minimum, m, kernel, sums, cols, monkeypatch):
    """A weight of 40 features by ``cols`` columns for a fused product's test, and the GEMV blocking to use (None:
    the default), its stretches summed by the last program, a second kernel (``sums``) or not split."""
    w = packed(fmt, group, 40, cols, DTYPES[0], seed=cols + m, minimum=minimum)
    blocking = {"default": None, "words": (16, 128, 3, 4, True), "bytes": (8, 128, 3, 4, False),
                "ints": (16, 128, 3, 4, True)}[kernel]
    if kernel == "ints":
        monkeypatch.setattr(quant_kernels, "INT_GEMV", True)
    if blocking is not None and sums == "one":
        blocking = (*blocking[:2], 1, *blocking[3:])
    if blocking is not None and blocking[-1] and not quant_kernels.words_take(w):
        pytest.skip("the word GEMV does not take this weight")
    if sums == "second kernel":
        monkeypatch.setattr(quant_kernels, "tile_counters", lambda device, tiles: None)
    return w, blocking


@pytest.mark.parametrize("fmt, group, minimum", FUSED_FORMATS)
@pytest.mark.parametrize("m, kernel, sums", FUSED_KERNELS)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_a_gated_mlps_last_product_takes_the_gate_and_the_residual(fmt, group, minimum, m, kernel, sums, activation,
                                                                   monkeypatch):
    """The MLP's last product of a decode step in one kernel (``gate`` and ``residual``): the bits of the gate's
    kernel, the product, then the residual added (PyTorch's add), in each GEMV, its stretches summed by the last
    program, by the second kernel or not split."""
    dtype, cols = DTYPES[0], 384
    w, blocking = fused_case(fmt, group, minimum, m, kernel, sums, cols, monkeypatch)
    gen = torch.Generator().manual_seed(m)
    gate_up = (torch.randn(m, 1, 2 * cols, generator=gen) * 2).to(dtype).to(DEVICE)
    residual = torch.randn(m, 1, 40, generator=gen).to(dtype).to(DEVICE)
    product = quant_kernels.linear(kernels.gated(gate_up, activation), w, blocking=blocking)
    assert torch.equal(quant_kernels.linear(gate_up, w, blocking=blocking, gate=activation), product)
    got = quant_kernels.linear(gate_up, w, blocking=blocking, gate=activation, residual=residual)
    assert got.shape == (m, 1, 40) and torch.equal(got, residual + product)
    most = quant_kernels.gemv_rows(w)
    with pytest.raises(ValueError, match=f"at most {most} rows"):
        quant_kernels.linear(gate_up[:1].expand(most + 1, 1, 2 * cols), w, gate=activation)
    if kernel == "default":  # the decoder's op: the gate in the product where its tiles are few, else apart
        for cheap in (True, False):
            monkeypatch.setattr(kernels, "GATING_WORK", 1 << 22 if cheap else 0)
            assert quant_kernels.gemv_gates(w) == cheap
            assert torch.equal(ops.TRITON.gated_linear(gate_up, activation, w, residual), residual + product)


@pytest.mark.parametrize("fmt, group, minimum", FUSED_FORMATS)
@pytest.mark.parametrize("m, kernel, sums", FUSED_KERNELS)
@pytest.mark.parametrize("offset", [False, True])
def test_a_layers_first_product_normalizes_its_input(fmt, group, minimum, m, kernel, sums, offset, monkeypatch):
    """A layer's first products of a decode step normalize their input themselves (``norm``): the product of what
    the norm's kernel writes, in each GEMV, its stretches summed by the last program, by the second kernel or not
    split; and a product adds a residual. Under the interpreter bit for bit; on a GPU to a rounding of the norm
    (its sum of squares may be added in another order than the norm's kernel adds it)."""
    dtype, cols = DTYPES[0], 384
    w, blocking = fused_case(fmt, group, minimum, m, kernel, sums, cols, monkeypatch)
    gen = torch.Generator().manual_seed(m)
    x = (torch.randn(m, 1, cols, generator=gen) * 3).to(dtype).to(DEVICE)
    norm = kernels.Norm((torch.rand(cols, generator=gen) + 0.5).to(dtype).to(DEVICE), 1e-6, offset)
    bias = torch.randn(40, generator=gen).to(dtype).to(DEVICE)
    residual = torch.randn(m, 1, 40, generator=gen).to(dtype).to(DEVICE)
    apart = quant_kernels.linear(kernels.rms_norm(x, *norm), w, bias, blocking=blocking)
    got = quant_kernels.linear(x, w, bias, blocking=blocking, norm=norm)
    assert got.shape == (m, 1, 40)
    if DEVICE == "cpu":
        assert torch.equal(got, apart)
    else:
        assert_close_to_exact(got, kernels.rms_norm(x, *norm), w, bias)
    most = quant_kernels.gemv_rows(w)
    with pytest.raises(ValueError, match=f"at most {most} rows"):
        quant_kernels.linear(x[:1].expand(most + 1, 1, cols), w, norm=norm)
    with pytest.raises(ValueError, match="not both"):
        quant_kernels.linear(torch.cat([x, x], -1), w, gate="silu", norm=norm)
    if kernel == "default":  # the decoder's ops: the norm in the product where its programs are few, else apart
        for cheap in (True, False):
            monkeypatch.setattr(kernels, "NORMING_WORK", 1 << 21 if cheap else 0)
            assert quant_kernels.gemv_norms(w) == cheap
            assert torch.equal(ops.TRITON.normed_linear(x, norm, w, bias), got if cheap else apart)
        product = quant_kernels.linear(x, w, bias)
        assert torch.equal(ops.TRITON.linear(x, w, bias, residual), residual + product)


def test_the_word_gemv_on_a_shard_of_the_columns():
    """The integers of a row-parallel shard as a strided view of whole words: read in place."""
    dtype = DTYPES[0]
    whole = packed("int4", 32, 40, 512, dtype, seed=3)
    half = QuantizedWeight(whole.data[:, 128:], whole.scale[:, 8:].contiguous(), whole.minimum[:, 8:].contiguous(),
                           whole.scheme)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(4)).to(dtype).to(DEVICE)
    assert quant_kernels.words_take(half)
    assert_close_to_exact(quant_kernels.linear(x, half, blocking=(16, 128, 1, 4, True)), x, half, None)


def test_the_word_gemv_refuses_what_it_cannot_read_as_words():
    x = torch.randn(1, 256).to(DTYPES[0]).to(DEVICE)
    small = packed("int4", 16, 40, 256, DTYPES[0], seed=5)  # a group of two words: less than a thread's four
    w8 = packed("int8", None, 40, 258, DTYPES[0], seed=6)
    odd = QuantizedWeight(w8.data[:, 2:], w8.scale, None, w8.scheme)  # rows that start mid-word
    for w in (small, odd):
        assert not quant_kernels.words_take(w)
        with pytest.raises(ValueError, match="word GEMV"):
            quant_kernels.linear(x, w, blocking=(16, 256, 1, 4, True))
    wide = packed("int4", 512, 40, 1024, DTYPES[0], seed=10)  # a group wider than the GEMV's tile
    assert not quant_kernels.words_take(wide)
    g32 = packed("int4", 32, 40, 256, DTYPES[0], seed=7)  # eight products of four columns: too narrow
    with pytest.raises(ValueError, match="word product"):
        quant_kernels.linear(x.expand(4, -1), g32, blocking=(16, 64, 32, 1, 4, 3, True))


def test_the_words_are_used_only_where_switched_on(monkeypatch):
    w = packed("int4", 128, 256, 1024, DTYPES[0], seed=8)
    w8 = packed("int8", None, 256, 1024, DTYPES[0], seed=8)
    monkeypatch.setattr(quant_kernels, "INT_GEMV", None)
    monkeypatch.setattr(quant_kernels, "WORD_GEMV", None)  # the default (OFFLOAD_WORD_GEMV unset): int4's GEMV
    assert quant_kernels.gemv_blocking(w)[-1] and not quant_kernels.gemv_blocking(w8)[-1]
    assert not quant_kernels.matmul_blocking(w, 16)[-1]
    monkeypatch.setattr(quant_kernels, "WORD_GEMV", False)  # OFFLOAD_WORD_GEMV=0
    assert not quant_kernels.gemv_blocking(w)[-1] and not quant_kernels.matmul_blocking(w, 16)[-1]
    monkeypatch.setattr(quant_kernels, "WORD_GEMV", True)
    assert quant_kernels.gemv_blocking(w)[-1] and quant_kernels.gemv_blocking(w) == quant_kernels.gemv_blocking(w, True)
    assert quant_kernels.matmul_blocking(w, 16)[-1] and not quant_kernels.matmul_blocking(w, 17)[-1]
    assert quant_kernels.gemv_blocking(w8)[-1]
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(9)).to(DTYPES[0]).to(DEVICE)
    assert_close_to_exact(quant_kernels.linear(x, w), x, w, None)
    assert_close_to_exact(quant_kernels.linear(x[:1], w), x[:1], w, None)


_COMPILE_FOR_HOPPER = """
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from offload.models import quant_kernels
fmt, last, pdl, ints = sys.argv[1], sys.argv[2] == "last", int(sys.argv[3]), sys.argv[2] == "ints"
constexprs = dict(GROUP=128 if fmt == "int4" else 256, INT4=fmt == "int4", PER_CHANNEL=fmt == "int8",
                  HAS_MIN=fmt == "int4", HAS_BIAS=last, HAS_RESIDUAL=False, GATE=0, NORM=0, NORM_BLOCK=1, FINAL=False,
                  LAST=last, EVEN=True, BLOCK_N=128, BLOCK_K=256, PDL=pdl, INTS=ints, ASM=ints)
types = {"x_ptr": "*bf16", "data_ptr": "*u8" if fmt == "int4" else "*i8", "scale_ptr": "*bf16", "min_ptr": "*bf16",
         "bias_ptr": "*bf16", "res_ptr": "*bf16", "nw_ptr": "*bf16", "eps": "fp32", "out_ptr": "*fp32", "final_ptr": "*bf16", "count_ptr": "*i32"}
fn = quant_kernels._gemv_words_kernel
names = list(inspect.signature(fn.fn).parameters)
signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in constexprs and n not in ("N", "eps")}
source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
print(triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt, sums", [("int4", "kernel"), ("int8", "kernel"), ("int4", "last"), ("int4", "ints"),
                                       ("int8", "ints")])
def test_the_word_gemv_compiles_for_hopper_to_wide_loads_and_no_conversions(fmt, sums):
    """Compiled for sm_90 here (Triton's CUDA backend needs no GPU to compile; in a process of its own, without
    the interpreter): the weights are loaded 16 bytes a thread at a time, and no integer is converted to a float
    by a conversion instruction (a quarter of the multiply-add rate: the reason for the words). With the last
    program's sums (``kernels.LAST_SUMS``): a barrier, then one acquire-release atomic a tile, and the partial
    sums read past the SM's own cache. With integer products (``ints``): two ``dp4a`` for every four weights (the
    inputs' high and low bytes), and one conversion to float for a thread's four words."""
    import re

    ptx = compile_for_hopper(_COMPILE_FOR_HOPPER, fmt, sums, "0")
    assert re.search(r"ld\.global\S*evict_first\S*\.v4\.b32", ptx)
    conversions = len(re.findall(r"cvt\.rn\.f32\.[su](8|16|32)", ptx))
    if sums == "ints":  # 128 x 256 weights a step, 128 threads: 256 weights a thread
        assert len(re.findall(r"dp4a\.", ptx)) == 256 // 4 * 2  # two for every four weights, in either format
        assert conversions == 256 // (32 if fmt == "int4" else 16)  # one a thread's four words
    else:
        assert conversions == 0
    atomics = re.findall(r"atom\.global\.gpu\.acq_rel\.add", ptx)
    assert len(atomics) == (1 if sums == "last" else 0)
    if sums == "last":
        assert re.search(r"bar\.sync[^\n]*\n(?:[^\n]*\n){0,12}[^\n]*atom\.global\.gpu\.acq_rel", ptx)
        assert re.search(r"ld\.global\.cg\.b32", ptx)


@pytest.mark.slow
def test_a_dependent_gemv_compiled_for_hopper_reads_nothing_before_it_waits():
    """Launched as a dependent of the kernel before it (``kernels.PDL``), compiled for sm_90 here: the word GEMV
    waits for its inputs (``griddepcontrol.wait``, then lets the next kernel launch) before its first load; at
    level 2 it first asks L2 for its first tile's weights; at level 0 neither."""
    for pdl in (0, 1, 2):
        out = compile_for_hopper(_COMPILE_FOR_HOPPER, "int4", "last", pdl)
        lines = out.splitlines()

        def first(text):
            return next((i for i, line in enumerate(lines) if text in line), None)

        waits, prefetches = out.count("griddepcontrol.wait"), out.count("prefetch.global.L2")
        assert (waits, prefetches) == ((0, 0), (1, 0), (1, 1))[pdl]
        if pdl:
            assert first("griddepcontrol.wait") < first("griddepcontrol.launch_dependents") < first("ld.global")
        if pdl == 2:
            assert first("prefetch.global.L2") < first("griddepcontrol.wait")


def test_int8_rows_of_whole_words_that_are_not_whole_int4_words():
    """int8 per channel needs rows of 4 bytes, not of 8: 260 columns are read as words, to the last one."""
    dtype = DTYPES[0]
    w = packed("int8", None, 40, 260, dtype, seed=11)
    assert quant_kernels.words_take(w)
    x = torch.randn(2, 260, generator=torch.Generator().manual_seed(12)).to(dtype).to(DEVICE)
    assert_close_to_exact(quant_kernels.linear(x, w, blocking=quant_kernels.gemv_blocking(w, words=True)), x, w, None)


def test_choosing_the_word_kernels_does_not_break_a_compiled_graph():
    """``torch.compile`` cannot read a tensor's pointer: the choice must not make it fall back to eager."""
    w = packed("int4", 128, 64, 256, DTYPES[0], seed=13)

    @torch.compile(backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    def blockings(x):
        return x * 2, quant_kernels.gemv_blocking(w, words=True), quant_kernels.matmul_blocking(w, 16, words=True)

    _, gemv, matmul = blockings(torch.ones(3))
    assert gemv[-1] and matmul[-1]


@pytest.mark.parametrize("fmt, group, m, blocking", [
    ("int4", 32, 1, (8, 1024, 3, 4, False)),  # _gemv_kernel, three stretches
    ("int8", None, 2, (8, 1024, 3, 4, False)),
    ("int4", 128, 2, (16, 256, 4, 4, True)),  # _gemv_words_kernel, four stretches of one tile
    ("int8", 16, 1, (16, 256, 2, 4, True)),
    ("int4", 64, 5, (16, 64, 64, 3, 4, 3, False)),  # _matmul_kernel, three stretches, odd rows and features
    ("int4", 128, 16, (16, 64, 128, 2, 4, 3, True)),  # _matmul_kernel with WORDS
])
def test_the_last_program_of_a_tile_sums_the_stretches_as_the_summing_kernel_does(monkeypatch, fmt, group, m, blocking):
    """With ``LAST_SUMS`` the tile's last program to finish adds the stretches' partial sums (one kernel instead of
    two): the same bits as ``_sum_splits_kernel``'s, with and without a bias, and every tile's counter is zero
    again afterwards (the next product on the stream starts from zero)."""
    dtype = DTYPES[0]
    w = packed(fmt, group, 67, 768, dtype, seed=11)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(m, 768, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(67, generator=gen).to(dtype).to(DEVICE)
    for b in (None, bias, bias):  # the third: counters reused
        monkeypatch.setattr(kernels, "LAST_SUMS", False)
        summed = quant_kernels.linear(x, w, b, blocking=blocking)
        monkeypatch.setattr(kernels, "LAST_SUMS", True)
        counters = kernels.tile_counters(x.device, 1)
        got = quant_kernels.linear(x, w, b, blocking=blocking)
        assert torch.equal(got, summed)
        assert_close_to_exact(got, x, w, b)
        assert not counters.any()


def test_last_sums_leave_products_of_too_many_tiles_to_the_summing_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "LAST_SUMS", True)
    assert kernels.tile_counters(torch.device(DEVICE), kernels.COUNTERS) is not None
    assert kernels.tile_counters(torch.device(DEVICE), kernels.COUNTERS + 1) is None
    monkeypatch.setattr(kernels, "LAST_SUMS", False)
    assert kernels.tile_counters(torch.device(DEVICE), 1) is None


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the race it looks for needs a GPU's programs running at once")
@pytest.mark.parametrize("m", [1, 2, 16])
def test_last_sums_race_no_partial_sum_on_a_gpu(monkeypatch, m):
    """Hundreds of programs of a llama-2-7b-wide product finish at once, many times over, in CUDA graphs too: the
    last program of every tile must see every other's partial sums (a late one would change the bits)."""
    w = packed("int4", 128, 4096, 11008, torch.bfloat16, seed=13)
    x = torch.randn(m, 11008, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16).to(DEVICE)
    monkeypatch.setattr(kernels, "LAST_SUMS", False)
    summed = quant_kernels.linear(x, w)
    monkeypatch.setattr(kernels, "LAST_SUMS", True)
    assert quant_kernels.linear(x, w).equal(summed)  # eager, and the counters made outside the capture
    outs = [quant_kernels.linear(x, w) for _ in range(200)]
    assert all(out.equal(summed) for out in outs)
    side, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        quant_kernels.linear(x, w)  # a warm-up on the capture stream makes its counters
    side.synchronize()
    with torch.cuda.graph(graph, stream=side):
        out = quant_kernels.linear(x, w)
        assert kernels.tile_counters(x.device, 1) is not None  # captured with the last programs' sums
    for _ in range(200):
        graph.replay()
        assert out.equal(summed)


# ----------------------------------------------------------------------------- the tensor-core product of a few rows

DOT_FORMATS = [("int4", 128, False), ("int4", 32, False), ("int4", 64, False), ("int8", None, False),
               ("int8", 32, False), ("int8", 16, True)]


@pytest.mark.parametrize("fmt, group, minimum", DOT_FORMATS)
@pytest.mark.parametrize("rows, cols, m, block_n, splits", [
    (67, 256, 1, 64, 1),  # features past the last tile (masked), one stretch: the output itself
    (128, 512, 5, 64, 2),  # whole tiles, two stretches: the last program of each tile sums them
    (130, 1024, 16, 128, 3),  # sixteen rows, three stretches
])
def test_the_tensor_core_product_equals_dequantize_then_multiply(fmt, group, minimum, rows, cols, m, block_n,
                                                                 splits):
    """``_dot_gemv_kernel``: each byte's two fields as ``OFFSET + v`` in 16 bits, products on the tensor cores, the
    offset taken out with a product of ones: against float64, with a bias; the residual is added to the rounded
    product (the bits of adding it after)."""
    dtype = DTYPES[0]
    w = packed(fmt, group, rows, cols, dtype, seed=rows + cols + m, minimum=minimum)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, cols, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(rows, generator=gen).to(dtype).to(DEVICE)
    residual = torch.randn(m, rows, generator=gen).to(dtype).to(DEVICE)
    blocking = quant_kernels.dot_blocking(w, m)._replace(block_n=block_n, splits=splits)
    for b in (None, bias):
        got = quant_kernels.linear(x, w, b, blocking=blocking)
        assert_close_to_exact(got, x, w, b)
        assert quant_kernels.linear(x, w, b, blocking=blocking, residual=residual).equal(got + residual)


@pytest.mark.parametrize("fmt, group", [("int4", 64), ("int8", None)])
def test_the_tensor_core_product_sums_stretches_as_the_summing_kernel_does(monkeypatch, fmt, group):
    dtype = DTYPES[0]
    w = packed(fmt, group, 67, 768, dtype, seed=21)
    x = torch.randn(3, 768, generator=torch.Generator().manual_seed(22)).to(dtype).to(DEVICE)
    blocking = quant_kernels.dot_blocking(w, 3)._replace(block_n=64, splits=3)
    monkeypatch.setattr(kernels, "LAST_SUMS", False)
    summed = quant_kernels.linear(x, w, blocking=blocking)
    monkeypatch.setattr(kernels, "LAST_SUMS", True)
    counters = kernels.tile_counters(x.device, 1)
    assert quant_kernels.linear(x, w, blocking=blocking).equal(summed)
    assert not counters.any()


def test_the_tensor_core_product_is_chosen_only_where_switched_on(monkeypatch):
    """``DOT_GEMV`` on: products of up to ``DOT_ROWS`` rows go to it (the same bits as asking for its blocking),
    but not those that gate or normalize their input, nor more rows; off (the default until it is timed): none."""
    dtype = DTYPES[0]
    w = packed("int4", 64, 96, 256, dtype, seed=23)
    gen = torch.Generator().manual_seed(24)
    for m in (1, 16, 17):
        x = torch.randn(m, 256, generator=gen).to(dtype).to(DEVICE)
        by_dot = quant_kernels.linear(x, w, blocking=quant_kernels.dot_blocking(w, m)) if m <= 16 else None
        monkeypatch.setattr(quant_kernels, "DOT_GEMV", True)
        chosen = quant_kernels.linear(x, w)
        assert quant_kernels.dot_chooses(w, m, dtype) == (m <= quant_kernels.DOT_ROWS)
        if m <= 16:
            assert chosen.equal(by_dot)
        monkeypatch.setattr(quant_kernels, "DOT_GEMV", False)
        assert not quant_kernels.dot_chooses(w, m, dtype)
        assert_close_to_exact(quant_kernels.linear(x, w), x, w, None)
    monkeypatch.setattr(quant_kernels, "DOT_GEMV", True)
    gate_up = torch.randn(1, 512, generator=gen).to(dtype).to(DEVICE)
    gated = quant_kernels.linear(gate_up, w, gate="silu")  # the GEMV gates its input: not the tensor cores
    monkeypatch.setattr(quant_kernels, "DOT_GEMV", False)
    assert gated.equal(quant_kernels.linear(gate_up, w, gate="silu"))


def test_by_default_the_tensor_core_product_takes_a_few_rows_of_large_int4_weights(monkeypatch):
    """What was timed faster (``dot_chooses``): int4 in groups of 128 or more, 3 to 16 rows of bfloat16, weights of at
    least ``DOT_WEIGHTS``; one or two rows stay with the GEMVs, int8 and small weights with the other kernels."""
    monkeypatch.setattr(quant_kernels, "DOT_GEMV", None)
    weight = empty_weight
    big, bf16 = weight("int4", 128, 4096, 4096), torch.bfloat16
    assert [quant_kernels.dot_chooses(big, m, bf16) for m in (1, 2, 3, 16, 17)] == [False, False, True, True, False]
    assert not quant_kernels.dot_chooses(big, 16, torch.float16)
    assert not quant_kernels.dot_chooses(weight("int4", 64, 4096, 4096), 16, bf16)
    assert not quant_kernels.dot_chooses(weight("int8", None, 4096, 4096), 16, bf16)
    assert not quant_kernels.dot_chooses(weight("int4", 128, 1536, 576 * 2), 16, bf16)  # a 135M model's


def test_which_weights_the_tensor_core_product_takes():
    def takes(fmt, group, cols, dtype=torch.bfloat16):
        return quant_kernels.dot_takes(empty_weight(fmt, group, 64, cols), dtype)

    assert takes("int4", 32, 256) and takes("int4", 256, 512, torch.float16)
    assert not takes("int4", 16, 256)  # a half-group under a product's 16 columns
    assert not takes("int4", 64, 256, torch.float32)
    assert takes("int8", None, 48) and not takes("int8", None, 40)
    assert quant_kernels.dot_blocking(empty_weight("int4", 128, 12288, 4096))[:3] == (64, 128, 3)  # 192 tiles x 3
    assert quant_kernels.dot_blocking(empty_weight("int4", 256, 4096, 4096))[:3] == (64, 256, 4)  # 16 steps, 4 each
    assert quant_kernels.dot_blocking(empty_weight("int8", None, 64, 48))[:2] == (64, 16)
    with pytest.raises(ValueError, match="up to 16 rows"):
        w = packed("int4", 64, 64, 256, DTYPES[0], seed=25)
        quant_kernels.linear(torch.zeros(17, 256, dtype=DTYPES[0], device=DEVICE), w,
                             blocking=quant_kernels.dot_blocking(w, 16))


_COMPILE_MATMUL_FOR_HOPPER = """
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from offload.models import quant_kernels
group, block_k = int(sys.argv[1]), int(sys.argv[2])
constexprs = dict(INT4=True, PER_CHANNEL=False, HAS_MIN=True, HAS_BIAS=False, FINAL=True, LAST=False, WORDS=False,
                  BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, GROUP=group)
types = {"x_ptr": "*bf16", "data_ptr": "*u8", "scale_ptr": "*bf16", "min_ptr": "*bf16", "bias_ptr": "*bf16",
         "out_ptr": "*fp32", "final_ptr": "*bf16", "count_ptr": "*i32"}
fn = quant_kernels._matmul_kernel
names = list(inspect.signature(fn.fn).parameters)
signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
print(triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}).asm["ptx"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("group", [16, 64])
def test_the_tiled_int4_product_compiles_for_hopper_to_tensor_core_products(group):
    """Compiled for sm_90 here (no GPU needed): the tiled product of int4 in groups of 64, and of two groups of 16
    a column step (a group's half, 8 columns, is narrower than a 16-bit product takes), multiply on tensor cores."""
    import re

    block_k = quant_kernels.matmul_blocking(empty_weight("int4", group, 256, 1024), 256)[2]
    assert block_k == max(group, 32)
    ptx = compile_for_hopper(_COMPILE_MATMUL_FOR_HOPPER, group, block_k)
    assert re.search(r"(wgmma\.mma_async|mma\.sync)\S*\.bf16\.bf16", ptx)


_COMPILE_DOT_FOR_HOPPER = """
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from offload.models import quant_kernels
fmt = sys.argv[1]
constexprs = dict(GROUP=128, INT4=fmt == "int4", PER_CHANNEL=fmt == "int8", HAS_MIN=fmt == "int4", HAS_BIAS=False,
                  HAS_RESIDUAL=False, FINAL=False, LAST=True, ASM=True, MAGIC=0x4300, FP16=False, EVEN=True,
                  BLOCK_N=128, BLOCK_M=8, BLOCK_K=128, PDL=0)
types = {"x_ptr": "*bf16", "data_ptr": "*u8" if fmt == "int4" else "*i8", "scale_ptr": "*bf16", "min_ptr": "*bf16",
         "bias_ptr": "*bf16", "res_ptr": "*bf16", "OFFSET": "fp32", "out_ptr": "*fp32", "final_ptr": "*bf16",
         "count_ptr": "*i32"}
fn = quant_kernels._dot_gemv_kernel
names = list(inspect.signature(fn.fn).parameters)
signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
           if n not in constexprs and n not in ("M", "N", "OFFSET")}
source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
print(triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}).asm["ptx"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_the_tensor_core_product_compiles_for_hopper_to_pipelined_loads_and_tensor_core_products(fmt):
    """Compiled for sm_90 here (no GPU needed), with the fields made by inline PTX: the weights' bytes are copied
    ahead into shared memory (``cp.async``: Triton's pipeline), the products are tensor-core MMAs, and each pair of
    bytes becomes four 16-bit numbers with two ``lop3`` (no conversion instruction)."""
    import re

    ptx = compile_for_hopper(_COMPILE_DOT_FOR_HOPPER, fmt)
    assert re.search(r"cp\.async\.c[ag]\.shared\.global", ptx)
    # tensor-core products: warpgroup MMAs (Triton 3.9), or the older MMAs where Triton picks them (3.6)
    assert re.search(r"(wgmma\.mma_async|mma\.sync)\S*\.bf16\.bf16", ptx)
    assert len(re.findall(r"lop3\.b32", ptx)) >= 2 and "prmt.b32" in ptx
    assert not re.search(r"cvt\.rn\.(bf16|f16|f32)\.[su](8|16|32)", ptx)
