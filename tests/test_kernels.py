"""The Triton kernels of a decode step (``offload.models.kernels``): what takes them, and what they compute.

The kernels' tests need a CUDA GPU with Triton and are skipped without one; the
dispatch test runs everywhere. References are computed in float64.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from offload.errors import OffloadWarning
from offload.models import kernels, ops
from offload.models.chunks import DecodeChunk, Rope

from conftest import compile_for_hopper

needs_triton = pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None,
                                  reason="needs a CUDA GPU with Triton")


def reference(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    out = x.double() @ w.double().T
    return (out if bias is None else out + bias.double()).to(x.dtype)


def assert_one_rounding_apart(got: torch.Tensor, want: torch.Tensor) -> None:
    """At most one rounding step of the 16-bit result apart (float32 sums in another order than float64's)."""
    ulp = 2 ** -7 if got.dtype == torch.bfloat16 else 2 ** -10
    torch.testing.assert_close(got, want, rtol=ulp, atol=1e-3)


def test_the_kernels_take_one_row_of_16_bits_on_cuda():
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    assert ops.choose(torch.device("cpu"), torch.bfloat16) is ops.TORCH  # on the host: F.linear
    if not torch.cuda.is_available() or kernels.triton is None:
        return
    assert ops.choose(torch.device("cuda"), torch.float32) is ops.TORCH
    assert ops.choose(torch.device("cuda"), torch.bfloat16) is ops.TRITON
    w = w.cuda()
    x = torch.randn(1, 1, 32, dtype=torch.bfloat16, device="cuda")[..., :16]

    def decisions(x, w):
        return torch.tensor([kernels.gemv_takes(x, w),
                             kernels.gemv_takes(x.expand(2, 1, 16), w),  # two rows
                             kernels.gemv_takes(x.float(), w.float()),  # float32
                             kernels.gemv_takes(x, w.T.contiguous().T),  # a transposed weight
                             kernels.gemv_takes(x[..., ::2], w[:, :8])])  # a strided row

    assert decisions(x, w).tolist() == [True, False, False, False, False]
    torch._dynamo.reset()  # compiled, the answers are the same (constants of the traced graph)
    assert torch.compile(decisions, fullgraph=True)(x, w).tolist() == [True, False, False, False, False]


@needs_triton
@pytest.mark.gpu
def test_dependent_launches_that_fail_cost_a_warning_and_ordinary_launches(monkeypatch):
    """Where a dependent launch fails (a driver without it) but an ordinary one works, the first model's trial
    product warns once and every kernel is launched ordinarily from then on; the kernels stay."""
    if torch.cuda.get_device_capability()[0] < 9 or kernels.gdc_wait is None:
        pytest.skip("dependent launches need compute capability 9 and Triton's grid dependency control")
    real = kernels._gemv_kernel

    class NoDependents:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                if kw.get("launch_pdl"):
                    raise RuntimeError("CUDA driver error: invalid argument")
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(kernels, "_gemv_kernel", NoDependents())
    monkeypatch.setattr(kernels, "_works", None)
    monkeypatch.setattr(kernels, "PDL", 1)
    x = torch.ones(1, 64, dtype=torch.float16, device="cuda")
    with pytest.warns(OffloadWarning, match="dependent kernel launches fail"):
        assert kernels.works(x.device)
    assert kernels.PDL == 0 and kernels.dependent_launch(x.device) == {"PDL": 0}
    assert ops.choose(x.device, x.dtype) is ops.TRITON


@needs_triton
@pytest.mark.gpu
def test_a_triton_that_fails_costs_a_warning_and_the_kernels(monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(kernels, "_gemv_kernel", Broken())
    monkeypatch.setattr(kernels, "_works", None)
    x, w = torch.randn(1, 64, dtype=torch.float16, device="cuda"), torch.randn(8, 64, dtype=torch.float16, device="cuda")
    with pytest.warns(OffloadWarning, match="C compiler"):
        chosen = ops.choose(x.device, x.dtype)
    assert chosen is ops.TORCH
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kernels.works(x.device)  # tried once: no second warning
    assert torch.equal(chosen.linear(x, w), F.linear(x, w))


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 11008), (1000, 352), (3, 1030), (7, 64)])
def test_gemv_equals_the_exact_product_to_one_rounding(n, k, dtype):
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) / k**0.5
    x = torch.randn(1, 1, k, device="cuda", dtype=dtype, generator=gen)
    bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen)
    for b in (None, bias):
        got, want = kernels.gemv(x, w, b), reference(x, w, b)
        assert got.shape == (1, 1, n) and got.dtype == dtype
        assert_one_rounding_apart(got, want)
        cublas = F.linear(x, w, b)
        assert (got.float() - want.float()).abs().max() <= 2 * (cublas.float() - want.float()).abs().max() + 1e-3


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton (natively on a GPU, or its interpreter)")
@pytest.mark.parametrize("n, k", [(40, 96), (24, 1100)])  # one loop step; two, the second masked
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_the_gemv_takes_a_gated_mlps_gate_and_residual(n, k, activation, monkeypatch):
    """``gemv`` with ``gate`` and ``residual`` (a decode step's MLP ends in one kernel, not three): the bits of the
    gate's kernel, the product, and PyTorch's add. On a CPU under Triton's interpreter, in float16 (the
    interpreter rounds bfloat16 its own way); on a GPU in both."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float16, torch.bfloat16) if device == "cuda" else (torch.float16,):
        gen = torch.Generator().manual_seed(n + k)
        gate_up = (torch.randn(1, 1, 2 * k, generator=gen) * 2).to(dtype).to(device)
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(device)
        residual = torch.randn(1, 1, n, generator=gen).to(dtype).to(device)
        product = kernels.gemv(kernels.gated(gate_up, activation), w)
        assert torch.equal(kernels.gemv(gate_up, w, gate=activation), product)
        assert torch.equal(kernels.gemv(gate_up, w, gate=activation, residual=residual), residual + product)
        assert torch.equal(ops.TRITON.gated_linear(gate_up, activation, w, residual), residual + product)
        with monkeypatch.context() as patch:  # a weight too large to gate in each program: the gate's kernel first
            patch.setattr(kernels, "GATING_WORK", n * k - 1)
            assert not kernels.gemv_gates(w)
            assert torch.equal(ops.TRITON.gated_linear(gate_up, activation, w, residual), residual + product)
        # a residual that would broadcast, or a weight of other columns, is not the kernel's
        assert kernels.fused_down_takes(gate_up, residual, n, k)
        assert not kernels.fused_down_takes(gate_up, residual.view(1, n), n, k)
        assert not kernels.fused_down_takes(gate_up, residual, n, k + 8)
        assert not kernels.fused_down_takes(gate_up, residual.repeat(1, 1, 2)[..., ::2], n, k)  # strided
        # where the kernel does not take them (two rows of a bfloat16 weight): the gate, the product, the add
        two = gate_up.expand(2, 1, 2 * k).contiguous()
        assert not kernels.gemv_takes(two, w, gated=True) and kernels.gemv_takes(gate_up, w, gated=True)
        assert not kernels.gemv_takes(gate_up, w)  # twice the weight's columns: not its input
        if device == "cuda":
            assert torch.equal(ops.TRITON.gated_linear(two, activation, w, residual.expand(2, 1, n)),
                               residual + F.linear(kernels.gated(two, activation), w))


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton (natively on a GPU, or its interpreter)")
@pytest.mark.parametrize("n, k", [(40, 96), (24, 1100)])  # one loop step; two, the second masked
@pytest.mark.parametrize("offset", [False, True])
def test_the_gemv_normalizes_its_input_and_adds_a_residual(n, k, offset, monkeypatch):
    """``gemv`` with ``norm`` (a layer's first products: two kernels in one) computes the product of what
    ``rms_norm`` writes; ``linear`` with ``residual`` adds it as PyTorch's add would. On a CPU under Triton's
    interpreter, in float16, bit for bit; on a GPU in both dtypes, to a rounding of the norm (its sum of squares
    may be added in another order than the norm's kernel adds it)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float16, torch.bfloat16) if device == "cuda" else (torch.float16,):
        gen = torch.Generator().manual_seed(n + k)
        x = (torch.randn(1, 1, k, generator=gen) * 3).to(dtype).to(device)
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(device)
        bias = torch.randn(n, generator=gen).to(dtype).to(device)
        norm = kernels.Norm((torch.rand(k, generator=gen) + 0.5).to(dtype).to(device), 1e-5, offset)
        residual = torch.randn(1, 1, n, generator=gen).to(dtype).to(device)
        for b in (None, bias):
            apart = kernels.gemv(kernels.rms_norm(x, *norm), w, b)
            fused = kernels.gemv(x, w, b, norm=norm)
            if device == "cpu":
                assert torch.equal(fused, apart)
            else:
                assert_one_rounding_apart(fused, apart)
            assert torch.equal(ops.TRITON.normed_linear(x, norm, w, b), fused)
            assert torch.equal(ops.TRITON.linear(x, w, b, residual), residual + kernels.gemv(x, w, b))
        with monkeypatch.context() as patch:  # a weight too large to normalize in each program: the norm's kernel
            patch.setattr(kernels, "NORMING_WORK", n * k - 1)
            assert not kernels.gemv_norms(n, k)
            assert torch.equal(ops.TRITON.normed_linear(x, norm, w, bias), kernels.gemv(kernels.rms_norm(x, *norm), w,
                                                                                       bias))
        # a norm of other columns, or a residual that would broadcast, is not the kernel's
        assert kernels.norm_takes(x, norm) and not kernels.norm_takes(x[..., 1:], norm)
        assert not kernels.rms_norm_takes(x[..., 1:].contiguous(), norm.weight)  # nor the norm's kernel's
        with pytest.raises(ValueError, match="not both"):
            kernels.gemv(torch.cat([x, x], -1), w, gate="silu", norm=norm)
        assert not kernels.residual_takes(x, residual.view(1, n), n)
        assert torch.equal(ops.TRITON.linear(x, w, None, residual.view(1, n)), residual + kernels.gemv(x, w))
        torch.testing.assert_close(ops.TRITON.normed_linear(x.float(), kernels.Norm(norm.weight.float(), 1e-5, offset),
                                                            w.float()),
                                   ops.TORCH.normed_linear(x.float(), kernels.Norm(norm.weight.float(), 1e-5, offset),
                                                           w.float()))


@needs_triton
@pytest.mark.gpu
def test_compiled_code_runs_the_kernels_and_captures_them():
    """Compiled, the kernels' ``rms_norm`` and ``linear`` call the kernels (the bits of calling them directly),
    traced into the graph rather than broken out of it, and the compiled code replays in a CUDA graph."""
    torch._dynamo.reset()
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(512, 1030, device="cuda", dtype=torch.bfloat16, generator=gen)
    x = torch.randn(1, 1030, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = torch.randn(1030, device="cuda", dtype=torch.bfloat16, generator=gen)

    def product(x):
        return 2 * ops.TRITON.linear(ops.TRITON.rms_norm(x, scale, 1e-5), w)

    compiled = torch.compile(product, fullgraph=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = compiled(x)
        torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    assert {"_rms_norm_kernel", "_gemv_kernel"} <= names
    want = 2 * kernels.gemv(kernels.rms_norm(x, scale, 1e-5), w)
    assert torch.equal(got, want)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        compiled(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(x)
    x.copy_(torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=gen))
    graph.replay()
    assert torch.equal(out, compiled(x))


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (5, 5120), (2, 3, 100)])
@pytest.mark.parametrize("offset", [False, True], ids=["llama", "gemma"])
def test_rms_norm_equals_the_reference_to_one_rounding(shape, dtype, offset):
    gen = torch.Generator(device="cuda").manual_seed(len(shape))
    x = torch.randn(shape, device="cuda", dtype=dtype, generator=gen) * 3
    w = torch.randn(shape[-1], device="cuda", dtype=dtype, generator=gen)
    xd = x.double()
    normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    if offset:  # Gemma: (1 + w) times the unrounded row, rounded once
        want = (normed * (1.0 + w.double())).to(dtype)
    else:  # Llama: the row rounded before the weight
        want = (w.double() * normed.to(dtype).double()).to(dtype)
    got = kernels.rms_norm(x, w, 1e-5, offset)
    assert_one_rounding_apart(got, want)
    assert (got == want).float().mean() > 0.99  # a few elements a rounding apart, no more
    assert_one_rounding_apart(got, ops.TORCH.rms_norm(x, w, 1e-5, offset))


def attention_reference(q, keys, values, allowed, scale):
    group = q.shape[1] // keys.shape[1]
    k, v = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,heads,kv_heads,length,hd", [
    (1, 32, 32, 128, 128),  # llama-2-7b: one split per 64 keys
    (1, 32, 32, 4096, 128),  # long: splits of many blocks, merged
    (3, 8, 1, 300, 64),  # one kv head for eight query heads, a ragged last block
    (2, 28, 4, 1000, 128),  # seven query heads per kv head (not a power of two)
    (64, 8, 8, 200, 128),  # many rows: one split each
])
def test_decode_attention_equals_the_reference(batch, heads, kv_heads, length, hd, dtype):
    gen = torch.Generator(device="cuda").manual_seed(length)
    cache_k = torch.randn(batch, kv_heads, length + 5, hd, device="cuda", dtype=dtype, generator=gen)
    cache_v = torch.randn(batch, kv_heads, length + 5, hd, device="cuda", dtype=dtype, generator=gen)
    keys, values = cache_k[:, :, :length], cache_v[:, :, :length]  # the cache's strides, as a decode step reads it
    q = torch.randn(batch, 1, heads, hd, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
    positions = torch.randint(0, length, (batch,), device="cuda", generator=gen)
    positions[0] = length - 1
    if batch > 1:
        positions[1] = 0  # a row that sees one key
    key = torch.arange(length, device="cuda")
    allowed = key[None, :] <= positions[:, None]
    if batch > 2:
        allowed[2] &= key > positions[2] - 50  # a sliding window
    allowed = allowed[:, None, None, :]
    got = kernels.decode_attention(q, keys, values, allowed, hd**-0.5)
    want = attention_reference(q, keys, values, allowed, hd**-0.5)
    assert got.shape == (batch, heads, 1, hd)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 3e-3  # the softmax's weights round to 16 bits before P @ V
    assert (got.double() - want).abs().max() <= tolerance


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,heads,kv_heads,hd", [(1, 32, 32, 128), (3, 8, 2, 64), (2, 28, 4, 128)])
def test_rope_and_store_rotates_q_and_k_and_writes_the_cache(batch, heads, kv_heads, hd, dtype):
    gen = torch.Generator(device="cuda").manual_seed(batch * hd)
    qkv = torch.randn(batch, 1, (heads + 2 * kv_heads) * hd, device="cuda", dtype=dtype, generator=gen)
    rope = Rope(torch.rand(hd // 2) * 0.5, 64, dtype, torch.device("cuda"))
    positions = torch.tensor([5, 0, 40][:batch], device="cuda")
    step = DecodeChunk(positions, 64, [rope], {None})
    cos, sin = step.rotary(rope)
    caches = torch.randn(2, 2, 4, kv_heads, 65, hd, device="cuda", dtype=dtype, generator=gen)  # [k/v, layer, ...]
    mine, theirs = caches.clone(), caches.clone()
    q = kernels.rope_and_store(qkv, cos, sin, positions, mine[0, 1], mine[1, 1], heads)

    def rotated(x):  # in float64, rounded once
        x, half = x.double(), x.shape[-1] // 2
        return (x * cos.double() + torch.cat((-x[..., half:], x[..., :half]), -1) * sin.double()).to(dtype)

    q_ref, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    step.store(theirs[0, 1], theirs[1, 1], rotated(k.unflatten(-1, (kv_heads, hd))), v.unflatten(-1, (kv_heads, hd)))
    q_ref = rotated(q_ref.unflatten(-1, (heads, hd)))
    assert q.shape == q_ref.shape and torch.equal(mine[1], theirs[1])  # v copied, nothing else touched
    written = torch.zeros(mine.shape[1:-1], dtype=torch.bool, device="cuda")
    written[1, torch.arange(batch), :, positions] = True
    assert torch.equal(mine[0][~written], theirs[0][~written])
    for got, want in ((q, q_ref), (mine[0][written], theirs[0][written])):
        assert_one_rounding_apart(got, want)
        assert (got == want).float().mean() > 0.99


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (7, 5120), (2, 3, 100)])
@pytest.mark.parametrize("offset", [False, True], ids=["llama", "gemma"])
def test_add_rms_norm_equals_the_add_and_the_norm(shape, dtype, offset):
    gen = torch.Generator(device="cuda").manual_seed(len(shape))
    x, delta = (torch.randn(shape, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    w = torch.randn(shape[-1], device="cuda", dtype=dtype, generator=gen)
    total, normed = kernels.add_rms_norm(x, delta, w, 1e-5, offset)
    assert torch.equal(total, x + delta) and torch.equal(normed, kernels.rms_norm(x + delta, w, 1e-5, offset))


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 2 * 11008), (5, 2 * 1000)])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_the_gate_equals_pytorchs_to_one_rounding(shape, dtype, activation):
    gate_up = torch.randn(shape, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(0)) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    got, want = kernels.gated(gate_up, activation), act * up
    assert got.shape == want.shape
    # Triton's exp and CUDA's differ in the last float32 bits, which rarely moves a rounding; gelu's tanh is
    # built from exp here and is CUDA's own tanhf in PyTorch, which moves more of them (93-95% equal on an H200)
    assert (got == want).float().mean() > (0.99 if activation == "silu" else 0.9)
    assert_one_rounding_apart(got, want)


KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a CPU: Triton's interpreter (conftest.py)


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton (natively on a GPU, or its interpreter)")
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("batch,heads,kv_heads,hd", [(1, 4, 2, 16), (3, 8, 2, 64)])
def test_rope_and_store_normalizes_q_and_k_per_head_before_rotating(batch, heads, kv_heads, hd, offset):
    """Qwen3's and Gemma 3's decode step in one kernel: each q and k head RMS-normalized as ``rms_norm`` does it
    (rounded, ``offset``: times 1 + w), then rotated in float32 and rounded once; v copied. Float16 (the
    interpreter rounds bfloat16 its own way)."""
    device, dtype = KERNEL_DEVICE, torch.float16
    gen = torch.Generator().manual_seed(batch * hd + offset)
    qkv = (torch.randn(batch, 1, (heads + 2 * kv_heads) * hd, generator=gen) * 3).to(dtype).to(device)
    q_norm, k_norm = ((1 + 0.2 * torch.randn(hd, generator=gen)).to(dtype).to(device) for _ in range(2))
    rope = Rope(torch.rand(hd // 2, generator=gen) * 0.5, 64, dtype, torch.device(device))
    positions = torch.tensor([5, 0, 40][:batch], device=device)
    step = DecodeChunk(positions, 64, [rope], {None})
    cos, sin = step.rotary(rope)
    caches = torch.randn(2, kv_heads * batch, kv_heads, 65, hd, generator=gen).to(dtype).to(device)[:, :batch]
    mine, theirs = caches.clone(), caches.clone()
    q = kernels.rope_and_store(qkv, cos, sin, positions, mine[0], mine[1], heads, q_norm, k_norm, 1e-6, offset)

    def rotated(x):  # in float64, rounded once
        x, half = x.double(), x.shape[-1] // 2
        return (x * cos.double() + torch.cat((-x[..., half:], x[..., :half]), -1) * sin.double()).to(dtype)

    q_ref, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    q_ref = rotated(ops.rms_norm(q_ref.unflatten(-1, (heads, hd)), q_norm, 1e-6, offset))
    k = rotated(ops.rms_norm(k.unflatten(-1, (kv_heads, hd)), k_norm, 1e-6, offset))
    step.store(theirs[0], theirs[1], k, v.unflatten(-1, (kv_heads, hd)))
    assert q.shape == q_ref.shape and torch.equal(mine[1], theirs[1])  # v copied, nothing else touched
    written = torch.zeros(mine.shape[1:-1], dtype=torch.bool, device=device)
    written[torch.arange(batch), :, positions] = True
    assert torch.equal(mine[0][~written], theirs[0][~written])
    for got, want in ((q, q_ref), (mine[0][written], theirs[0][written])):
        assert_one_rounding_apart(got, want)
        assert (got == want).float().mean() > 0.95


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton (natively on a GPU, or its interpreter)")
@pytest.mark.parametrize("batch, heads, kv_heads, length, hd, norms", [
    (1, 9, 3, 64, 16, None), (3, 8, 2, 300, 32, None), (2, 4, 4, 700, 16, "llama"), (2, 6, 2, 128, 32, "gemma")])
def test_a_decode_steps_attention_rotates_and_stores_in_one_kernel(batch, heads, kv_heads, length, hd, norms):
    """``decode_self_attention`` (q and k (normalized and) rotated, k and v cached, attention: one kernel, split or
    not) leaves the caches and returns the bits of ``rope_and_store`` then ``decode_attention``; a row that adds
    nothing writes to the sink, past the keys read. (On a GPU, with q and k norms, to a rounding: the kernels'
    layouts add a head's squares in other orders.)"""
    device, dtype = KERNEL_DEVICE, torch.float16
    gen = torch.Generator().manual_seed(batch * length + hd)
    qkv = (torch.randn(batch, 1, (heads + 2 * kv_heads) * hd, generator=gen) * 2).to(dtype).to(device)
    q_norm, k_norm = ((1 + 0.2 * torch.randn(hd, generator=gen)).to(dtype).to(device) if norms else None
                      for _ in range(2))
    rope = Rope(torch.rand(hd // 2, generator=gen) * 0.5, 1024, dtype, torch.device(device))
    positions = torch.tensor([length - 1, 5, 1000][:batch], device=device)  # the third: the sink (max_seq_len)
    step = DecodeChunk(positions, length, [rope], {None})
    cos, sin = step.rotary(rope)
    caches = torch.randn(2, batch + 1, kv_heads, 1001, hd, generator=gen).to(dtype).to(device)
    mine, theirs = caches.clone(), caches.clone()
    args = (cos, sin, positions)
    norm_args = (q_norm, k_norm, 1e-6, norms == "gemma")
    q = kernels.rope_and_store(qkv, *args, theirs[0], theirs[1], heads, *norm_args)
    want = kernels.decode_attention(q.transpose(1, 2), theirs[0][:batch, :, :length], theirs[1][:batch, :, :length],
                                    step.mask(None), hd**-0.5)
    got = kernels.decode_self_attention(qkv, *args, mine[0], mine[1], length, step.mask(None), heads, hd**-0.5,
                                        *norm_args)
    assert got.shape == (batch, heads, 1, hd) and kernels.self_attention_takes(qkv, cos, sin, mine[0], mine[1],
                                                                               length, step.mask(None), q_norm, k_norm)
    if norms and device == "cuda":  # the two kernels may add a head's squares in other orders: one rounding
        assert_one_rounding_apart(mine, theirs)
        assert_one_rounding_apart(got, want)
        return
    assert torch.equal(mine, theirs) and torch.equal(got, want)
    assert torch.equal(ops.TRITON.cached_attention(qkv, *args, caches[0].clone(), caches[1].clone(), length,
                                                        step.mask(None), heads, hd**-0.5, *norm_args), want)
    assert not kernels.self_attention_takes(qkv, cos, sin, mine[0], mine[1], length, step.mask(None).to(torch.uint8))
    short = [c[..., :length - 1, :] for c in mine]  # fewer positions than keys
    assert not kernels.self_attention_takes(qkv, cos, sin, *short, length, step.mask(None))
    torch.testing.assert_close(  # PyTorch's operations: to a rounding (they rotate in the model dtype)
        ops.TORCH.cached_attention(qkv, *args, caches[0].clone(), caches[1].clone(), length, step.mask(None),
                                        heads, hd**-0.5, *norm_args), want, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton (natively on a GPU, or its interpreter)")
@pytest.mark.parametrize("norms", [None, "llama", "gemma"])
def test_a_verify_pass_rotates_and_stores_its_tokens_in_one_kernel(norms):
    """A verify pass's tokens (a tree: slots apart from the rotary positions, a pad at the sink) through
    ``ops.TRITON.cached_attention``: one kernel rotates and stores every token (``rope_and_store``), to a rounding
    of PyTorch's operations (which round each product), the same slots written and no other."""
    device, dtype = KERNEL_DEVICE, torch.float16
    batch, width, heads, kv_heads, hd, length = 2, 4, 6, 2, 16, 40
    gen = torch.Generator().manual_seed(width + (norms == "gemma"))
    qkv = (torch.randn(batch, width, (heads + 2 * kv_heads) * hd, generator=gen) * 2).to(dtype).to(device)
    q_norm, k_norm = ((1 + 0.2 * torch.randn(hd, generator=gen)).to(dtype).to(device) if norms else None
                      for _ in range(2))
    rope = Rope(torch.rand(hd // 2, generator=gen) * 0.5, 64, dtype, torch.device(device))
    slots = torch.tensor([[20, 21, 22, 23], [9, 10, 11, 64]], device=device)  # the second row's last: a pad
    positions = torch.tensor([[20, 21, 21, 22], [9, 10, 11, 11]], device=device)  # tree depths
    cos, sin = rope.cos[positions][:, :, None, :], rope.sin[positions][:, :, None, :]
    allowed = (torch.arange(length, device=device) <= slots[:, :, None])[:, None]  # [B, 1, W, L]
    caches = torch.randn(2, batch, kv_heads, 65, hd, generator=gen).to(dtype).to(device)
    mine, theirs = caches.clone(), caches.clone()
    args = (cos, sin, slots, length, allowed, heads, hd**-0.5, q_norm, k_norm, 1e-6, norms == "gemma")
    got = ops.TRITON.cached_attention(qkv, *args[:3], mine[0], mine[1], *args[3:])
    want = ops.TORCH.cached_attention(qkv, *args[:3], theirs[0], theirs[1], *args[3:])
    assert kernels.rope_and_store_takes(qkv, cos, mine[0], q_norm, k_norm) and got.shape == (batch, heads, width, hd)
    written = torch.zeros(mine.shape[1:-1], dtype=torch.bool, device=device)
    written[torch.arange(batch)[:, None], :, slots] = True
    assert torch.equal(mine[1], theirs[1]) and torch.equal(mine[0][~written], caches[0][~written])
    torch.testing.assert_close(mine[0], theirs[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    q = kernels.rope_and_store(qkv, cos, sin, slots, caches[0].clone(), caches[1].clone(), heads, q_norm, k_norm, 1e-6,
                               norms == "gemma")
    one = kernels.rope_and_store(qkv[:, 1:2].contiguous(), cos[:, 1:2].contiguous(), sin[:, 1:2].contiguous(),
                                 slots[:, 1], caches[0].clone(), caches[1].clone(), heads, q_norm, k_norm, 1e-6,
                                 norms == "gemma")
    assert torch.equal(q[:, 1:2], one)  # a token's rotation is the same in a pass of one or of several


def test_a_few_keys_are_not_split():
    """Up to two blocks of keys, one program a kv head: a merge would cost more than it saves."""
    assert kernels.decode_attention_splits(1, 3, 2 * kernels.BLOCK_KEYS) == (1, 2 * kernels.BLOCK_KEYS)
    assert kernels.decode_attention_splits(1, 3, 2 * kernels.BLOCK_KEYS + 1)[0] == 3
    assert kernels.decode_attention_splits(8, 32, 4096)[0] == 1  # 256 programs already
    assert kernels.decode_attention_splits(1, 32, 4096)[0] == 8


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton (natively on a GPU, or its interpreter)")
@pytest.mark.parametrize("batch,heads,kv_heads,length,hd", [(1, 4, 4, 700, 16), (3, 8, 2, 300, 32)])
def test_the_last_program_of_a_head_merges_the_splits_as_the_merging_kernel_does(monkeypatch, batch, heads, kv_heads,
                                                                                 length, hd):
    """With ``LAST_SUMS`` the last of a kv head's programs to finish merges its query heads' splits (one kernel
    instead of two): close to the reference, the same output every time, the merging kernel's bits under Triton's
    interpreter, and every counter zero again afterwards."""
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float16)
    gen = torch.Generator().manual_seed(length)
    keys, values = (torch.randn(batch, kv_heads, length, hd, generator=gen).to(dtype).to(device) for _ in range(2))
    q = torch.randn(batch, heads, 1, hd, generator=gen).to(dtype).to(device)
    allowed = (torch.arange(length) <= torch.tensor([length - 1, 5, length // 2][:batch])[:, None])[:, None, None]
    allowed = allowed.to(device)
    assert kernels.decode_attention_splits(batch, kv_heads, length)[0] > 1  # split, so merged
    monkeypatch.setattr(kernels, "LAST_SUMS", False)
    merged = kernels.decode_attention(q, keys, values, allowed, hd**-0.5)
    monkeypatch.setattr(kernels, "LAST_SUMS", True)
    counters = kernels.tile_counters(q.device, 1)
    outs = [kernels.decode_attention(q, keys, values, allowed, hd**-0.5) for _ in range(3 if device == "cpu" else 100)]
    assert not counters.any()
    want = attention_reference(q, keys, values, allowed, hd**-0.5)
    assert (outs[0].double() - want).abs().max() <= (2e-2 if dtype == torch.bfloat16 else 3e-3)
    assert all(out.equal(outs[0]) for out in outs)
    if device == "cpu":
        assert outs[0].equal(merged)


_COMPILE_LAST_SUMS_FOR_HOPPER = """
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from offload.models import kernels, quant_kernels

def compile(fn, constexprs, types):
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]

last = sys.argv[2] == "last"
if sys.argv[1] == "attention":
    ptx = compile(kernels._decode_attention_kernel,
                  dict(scale_log2=0.1, GROUP=4, GROUP_PAD=16, HD=128, BLOCK=64, SPLITS=4, SPLITS_PAD=4, LAST=last,
                       ROPE=True, NORM=False, OFFSET=False, PDL=0),
                  {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*i1", "partial_ptr": "*fp32",
                   "out_ptr": "*bf16", "count_ptr": "*i32", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "pos_ptr": "*i64",
                   "qn_ptr": "*bf16", "kn_ptr": "*bf16", "eps": "fp32"})
else:
    ptx = compile(quant_kernels._matmul_kernel,
                  dict(INT4=True, PER_CHANNEL=False, HAS_MIN=True, HAS_BIAS=True, FINAL=False, LAST=last, WORDS=False,
                       BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP=128),
                  {"x_ptr": "*bf16", "data_ptr": "*u8", "scale_ptr": "*bf16", "min_ptr": "*bf16", "bias_ptr": "*bf16",
                   "out_ptr": "*fp32", "final_ptr": "*bf16", "count_ptr": "*i32"})
print(ptx.count("atom.global.gpu.acq_rel.add"), ptx.count("ld.global.cg"))
"""


@pytest.mark.slow
@pytest.mark.skipif(kernels.triton is None, reason="needs Triton")
@pytest.mark.parametrize("kernel", ["attention", "product"])
def test_the_last_programs_sums_compile_for_hopper(kernel):
    """Decode attention and the compressed product of a few rows, compiled for sm_90 here (no GPU needed): with
    ``LAST_SUMS`` one acquire-release atomic a program and the partial results read past the SM's own cache;
    without, neither."""
    counts = {}
    for sums in ("last", "kernel"):
        out = compile_for_hopper(_COMPILE_LAST_SUMS_FOR_HOPPER, kernel, sums)
        counts[sums] = [int(n) for n in out.split()]
    assert counts["last"][0] == 1 and counts["last"][1] > 0 and counts["kernel"] == [0, 0]


@pytest.mark.slow
@pytest.mark.skipif(kernels.triton is None or torch.cuda.is_available(), reason="Triton's interpreter, on a CPU")
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_a_decode_step_through_the_kernels_agrees_with_pytorchs_operations(monkeypatch, quantize):
    """A whole decode step of a small model through offload's kernels under Triton's interpreter (the norms in the
    products, the rotation and the cache write in the attention, the residuals in the products) against PyTorch's
    operations: the same logits to float16's rounding, the same next token, and the same cache."""
    import offload
    from offload.models.shapes import shape_config

    def load():
        return offload.load_model(shape_config("tiny"), random_weights=0, dtype=torch.float16, progress=False,
                                  quantize=quantize, max_seq_len=64)

    reference = load()
    monkeypatch.setattr(ops, "choose", lambda device, dtype: ops.TRITON)
    mine = load()
    assert mine.decoder.ops is ops.TRITON and reference.decoder.ops is ops.TORCH
    prompt = [list(range(3, 40, 3))]
    steps = []
    for model in (reference, mine):
        model.extend(prompt, [0])
        logits = [model.decode(torch.tensor([7]), [len(prompt[0])])]
        logits.append(model.decode(logits[0].argmax(-1), [len(prompt[0]) + 1]))
        steps.append(torch.stack(logits).float())
    torch.testing.assert_close(steps[1], steps[0], atol=3e-2, rtol=3e-2)
    assert torch.equal(steps[1].argmax(-1), steps[0].argmax(-1))
    torch.testing.assert_close(mine.cache.k.float(), reference.cache.k.float(), atol=1e-2, rtol=1e-2)
    for model in (reference, mine):
        model.close()


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton (natively on a GPU, or its interpreter)")
@pytest.mark.parametrize("rows, vocab, k, dtype", [(1, 49152, 4, torch.float32), (3, 10000, 4, torch.float16),
                                                    (2, 4096, 1, torch.float32), (4, 130, 16, torch.float16)])
def test_the_likeliest_tokens_in_two_kernels(rows, vocab, k, dtype):
    """``likeliest``: each row's argmax (the first of equal maxima, as torch.argmax), its k likeliest (equal logits
    lowest index first, as a stable sort orders them) and their softmax probabilities, from rows whose stride is
    not their length; written into given buffers too."""
    gen = torch.Generator().manual_seed(rows * vocab + k)
    logits = (torch.randn(rows, vocab + 5, generator=gen) * 4).to(dtype).to(KERNEL_DEVICE)[:, :vocab]
    logits[0, 3] = logits[0, vocab - 1] = logits[0, 1000 % vocab] = logits[0].max() + 1  # a tie, in other parts
    logits[-1, 7] = logits[-1, 9] = logits[-1].max() + 1
    first, top, chances = kernels.likeliest(logits, k)
    order = torch.sort(logits.double(), dim=-1, descending=True, stable=True).indices[:, :k]
    want = (logits.double().gather(1, order) - logits.double().logsumexp(-1, keepdim=True)).exp()
    assert torch.equal(first, logits.argmax(dim=-1)) and torch.equal(top, order)
    torch.testing.assert_close(chances, want.float(), rtol=1e-5, atol=1e-7)
    out = (torch.zeros_like(first), torch.zeros_like(top), torch.zeros_like(chances))
    assert kernels.likeliest(logits, k, out) is out and torch.equal(out[1], top) and torch.equal(out[2], chances)
    torch_first, torch_top, torch_chances = ops.likeliest(logits, k)  # PyTorch's: topk orders ties its own way
    assert torch.equal(torch_first, first) and torch.equal(logits.gather(1, torch_top), logits.gather(1, top))
    torch.testing.assert_close(torch_chances, chances, rtol=1e-5, atol=1e-7)
    assert kernels.likeliest_takes(logits, k) and not kernels.likeliest_takes(logits.T, k)
    assert not kernels.likeliest_takes(logits, vocab + 1) and not kernels.likeliest_takes(logits.double(), k)
    logits[0, 11] = float("nan")  # a broken row still names tokens of the vocabulary: the NaN first, as argmax
    if rows > 1:
        logits[-1] = float("-inf")
    first, top, _ = kernels.likeliest(logits, k)
    assert first[0] == 11 and bool((top >= 0).all() and (top < vocab).all())


_COMPILE_LIKELIEST_FOR_HOPPER = """
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from offload.models import kernels

def compile(fn, constexprs, types, warps):
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]

part = compile(kernels._likeliest_part_kernel, dict(K=4, BLOCK=kernels.LIKELIEST_BLOCK, PDL=1),
               {"x_ptr": "*bf16", "sums_ptr": "*fp32", "found_ptr": "*i32"}, 8)
merge = compile(kernels._likeliest_merge_kernel, dict(PARTS=12, PARTS_PAD=16, K=4, PDL=1),
                {"sums_ptr": "*fp32", "found_ptr": "*i32", "first_ptr": "*i64", "top_ptr": "*i64",
                 "chances_ptr": "*fp32", "V": "i32"}, 1)
print(part.count("griddepcontrol.wait"), merge.count("griddepcontrol.wait"))
"""


@pytest.mark.slow
@pytest.mark.skipif(kernels.triton is None, reason="needs Triton")
def test_the_likeliest_kernels_compile_for_hopper():
    """``likeliest``'s two kernels compiled for sm_90 here (no GPU needed), as a draft's chain launches them: each
    waits for its inputs under a dependent launch."""
    assert compile_for_hopper(_COMPILE_LIKELIEST_FOR_HOPPER).split() == ["1", "1"]
