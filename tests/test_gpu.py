"""GPU-only tests: numerics against transformers, budgets kept, offloaded == resident bit for bit.

Skipped without CUDA. Run on a GPU machine with ``pytest -m gpu -s`` (``-s`` shows the timings
that the tests print).
"""

import gc
import warnings

import pytest
import torch
from torch.nn.attention import sdpa_kernel

import offload
from offload.synthetic import RandomSource
from offload.models.layout import checkpoint_sources
from offload.models.llama import ATTENTION_BACKENDS
from offload.distributed import TensorParallel
from offload.models.shapes import shape_config

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
SEED = 1234


def caching_host_allocator_bytes() -> int:
    """Pinned bytes held by PyTorch's own pinned allocator (the pool must not use it)."""
    stats = torch.cuda.host_memory_stats()
    return stats.get("allocated_bytes.current", stats.get("reserved_bytes.current", 0))


def free_gpu():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


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


@cuda
def test_llama_2_7b_bf16_greedy_matches_transformers():
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889]], device="cuda")
    hf = hf_model_with_random_weights("llama-2-7b", torch.bfloat16)
    gen = transformers.GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad(), sdpa_kernel(ATTENTION_BACKENDS):  # the attention kernels offload uses
        expected = hf.generate(ids, generation_config=gen)
    del hf
    free_gpu()
    model = offload.load_model(shape_config("llama-2-7b"), random_weights=SEED, dtype=torch.bfloat16,
                               max_seq_len=64, progress=False)
    got = model.generate(ids, max_new_tokens=16, ignore_eos=True)
    assert got.tolist() == expected.tolist()
    result = model.generate(ids, max_new_tokens=64 - ids.shape[1], ignore_eos=True, return_result=True)
    needs = model.plan.needs
    weight_bytes = needs.n_layers * needs.block_bytes + needs.global_bytes + needs.embedding_bytes
    hbm_ms = 1e3 * weight_bytes / model.plan.bandwidth["hbm"]
    print(f"\nllama-2-7b bf16 resident decode at batch 1: {result.ms_per_step:.2f} ms/token; "
          f"HBM limit {hbm_ms:.2f} ms ({weight_bytes / 1e9:.2f} GB / {model.plan.bandwidth['hbm'] / 1e9:.0f} GB/s); "
          f"ratio {hbm_ms / result.ms_per_step:.2f} on {torch.cuda.get_device_name()}")
    model.close()


def _logits_and_tokens(model, ids):
    logits = model(ids)
    tokens = model.generate(ids, max_new_tokens=8, ignore_eos=True)
    return logits, tokens


@cuda
def test_offloaded_equals_resident_bitwise_on_gpu():
    ids = torch.randint(0, 32000, (2, 30), generator=torch.Generator().manual_seed(0))
    kw = dict(random_weights=SEED, dtype=torch.bfloat16, max_batch=2, max_seq_len=64, progress=False)
    shape = shape_config("llama-2-7b") | {"num_hidden_layers": 6}
    resident = offload.load_model(shape, **kw)
    assert set(resident.plan.placement) == {"resident"}
    want_logits, want_tokens = _logits_and_tokens(resident, ids)
    needs = resident.plan.needs
    resident.close()
    del resident
    free_gpu()
    for n_resident in (3, 1, 0):
        budget = needs.fixed_bytes + (n_resident + 2) * needs.block_bytes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = offload.load_model(shape, gpu_memory=budget, cpu_memory="8GiB", **kw)
        assert model.plan.placement.count("resident") == n_resident
        logits, tokens = _logits_and_tokens(model, ids)
        assert torch.equal(logits, want_logits)
        assert torch.equal(tokens, want_tokens)
        model.close()
        del model
        free_gpu()


@cuda
@pytest.mark.parametrize("gpu_gib", [3.5, 5, 8])
def test_peak_gpu_memory_and_pinned_bytes_stay_in_budget(gpu_gib):
    free_gpu()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    host_before = caching_host_allocator_bytes()
    gpu_budget, cpu_budget = int(gpu_gib * 2**30), 12 * 2**30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = offload.load_model(shape_config("llama-2-7b"), random_weights=SEED, dtype=torch.bfloat16,
                                   gpu_memory=gpu_budget, cpu_memory=cpu_budget, max_batch=4, max_seq_len=512,
                                   max_step_tokens=1024, progress=False)
    assert model.plan.host_bytes > 0
    ids = torch.randint(0, 32000, (4, 200), generator=torch.Generator().manual_seed(1))
    model(ids[:, :256])  # a full-logits forward over max_step_tokens
    model.generate(ids, max_new_tokens=16, ignore_eos=True)
    model.generate([[1, 2, 3], list(range(5, 300))], max_new_tokens=8)  # ragged prompts: masked attention
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    pinned = model.pool.pinned_bytes
    host_growth = caching_host_allocator_bytes() - host_before
    print(f"\nbudget {gpu_gib} GiB: peak {peak / 2**30:.3f} GiB; plan says {model.plan.gpu_bytes / 2**30:.3f} GiB; "
          f"pinned {pinned / 2**30:.3f} GiB (plan {model.plan.host_bytes / 2**30:.3f}); "
          f"caching host allocator grew {host_growth} B; layers {model.plan.layer_map()}")
    assert peak <= gpu_budget
    assert pinned == model.plan.host_bytes <= cpu_budget
    assert host_growth == 0
    model.close()


@cuda
@two_gpus
def test_peer_tier_equals_resident_bitwise():
    ids = torch.randint(0, 32000, (1, 30), generator=torch.Generator().manual_seed(2))
    shape = shape_config("llama-2-7b") | {"num_hidden_layers": 6}
    kw = dict(random_weights=SEED, dtype=torch.bfloat16, max_seq_len=64, progress=False)
    resident = offload.load_model(shape, **kw)
    want_logits, want_tokens = _logits_and_tokens(resident, ids)
    needs = resident.plan.needs
    resident.close()
    del resident
    free_gpu()
    budget = needs.fixed_bytes + 5 * needs.block_bytes  # 1 resident layer and a ring of 2 slots per link
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = offload.load_model(shape, gpu_memory=budget, cpu_memory=2 * needs.block_bytes + needs.embedding_bytes,
                                   peer_memory={"cuda:1": 3 * needs.block_bytes}, **kw)
    assert model.plan.placement.count("cuda:1") == 3 and model.plan.placement.count("host") == 2
    logits, tokens = _logits_and_tokens(model, ids)
    assert torch.equal(logits, want_logits)
    assert torch.equal(tokens, want_tokens)
    model.close()
