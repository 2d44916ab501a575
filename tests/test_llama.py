"""The Llama family (``offload.models.llama``) against ``transformers`` on tiny random models (CPU, float32).

Every architecture and config convention: full-sequence logits, greedy generation, a left-padded
batch; then offloaded placements (host, emulated peer) against the fully resident model, bit for bit,
and seeded sampling.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import offload
from offload.errors import OffloadWarning
from offload.models.config import load_config

from conftest import CONVENTIONS, edit_config

ATOL = 1e-4
MAX_SEQ = 64
PROMPT = 12  # generation prompt length; + 10 new tokens crosses Mistral's window of 8
NEW = 10

_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

MODELS = {
    "llama-mha": ("llama", dict(_BASE, num_key_value_heads=4)),
    "llama-gqa-llama3": ("llama", dict(_BASE, num_key_value_heads=2, rope_parameters=_LLAMA3)),
    "llama-head-dim": ("llama", dict(_BASE, num_key_value_heads=2, head_dim=32)),
    "llama-tied": ("llama", dict(_BASE, vocab_size=384, num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral-window": ("mistral", dict(_BASE, num_key_value_heads=2, sliding_window=8)),
    "qwen2-bias": ("qwen2", dict(_BASE, vocab_size=512, num_key_value_heads=2)),
}
SEEDS = {key: i + 10 for i, key in enumerate(MODELS)}


def _make(factory, key, convention):
    arch, kwargs = MODELS[key]
    return factory(key, arch, convention, seed=SEEDS[key], **kwargs)


def _load(directory, **kw):
    kw.setdefault("max_batch", 2)
    kw.setdefault("max_seq_len", MAX_SEQ)
    return offload.load_model(directory, dtype=torch.float32, progress=False, **kw)


def _prompt(n, vocab, seed, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, n), generator=gen)


def _hf_greedy(hf, ids, attention_mask=None, eos_token_id=None, max_new_tokens=NEW):
    # eos_token_id=None (not min_new_tokens, which bans eos and so changes the argmax) keeps
    # transformers from stopping at the generation config's eos while leaving every logit alone.
    with torch.no_grad():
        return hf.generate(ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=eos_token_id, pad_token_id=0)


def _hf_logits(hf, ids, attention_mask=None):
    with torch.no_grad():
        if attention_mask is None:
            return hf(ids).logits
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return hf(ids, attention_mask=attention_mask, position_ids=position_ids).logits


@pytest.fixture(scope="module", params=[(k, c) for k in MODELS for c in CONVENTIONS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, checkpoint_factory):
    key, convention = request.param
    hf, directory = _make(checkpoint_factory, key, convention)
    model = _load(directory)
    yield key, hf, directory, model
    model.close()


# ---------------------------------------------------------------------- the helper itself


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_config_conventions_written_and_read_alike(checkpoint_factory, convention):
    hf, directory = _make(checkpoint_factory, "llama-gqa-llama3", convention)
    raw = json.loads((directory / "config.json").read_text())
    if convention == "4.x":
        assert "rope_parameters" not in raw
        assert raw["rope_theta"] == 10000.0
        assert raw["rope_scaling"] == {k: v for k, v in _LLAMA3.items() if k != "rope_theta"}
    else:
        assert "rope_theta" not in raw and "rope_scaling" not in raw
        assert raw["rope_parameters"] == _LLAMA3
    config = load_config(directory)
    assert config.rope_theta == 10000.0
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32.0}
    # offload's scaled frequencies are transformers' ones
    torch.testing.assert_close(config.rope_inv_freq(), hf.model.rotary_emb.inv_freq.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("key", list(MODELS))
def test_both_conventions_give_the_same_config(checkpoint_factory, key):
    a = load_config(_make(checkpoint_factory, key, "4.x")[1])
    b = load_config(_make(checkpoint_factory, key, "5.x")[1])
    assert a == b
    arch, kwargs = MODELS[key]
    assert a.architecture == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                              "qwen2": "Qwen2ForCausalLM"}[arch]
    assert a.n_kv_heads == kwargs["num_key_value_heads"]
    assert a.head_dim == kwargs.get("head_dim", 16)
    assert a.tie_word_embeddings == kwargs.get("tie_word_embeddings", False)
    assert a.qkv_bias == (arch == "qwen2")
    assert a.sliding_windows == ((8, 8) if arch == "mistral" else (None, None))
    assert (a.rope_scaling is not None) == (key == "llama-gqa-llama3")


# ---------------------------------------------------------------------- one row


def test_logits_match_transformers(case):
    key, hf, _, model = case
    ids = _prompt(20, model.config.vocab_size, seed=1)
    ours = model(ids)
    ref = _hf_logits(hf, ids)
    assert ours.shape == ref.shape == (1, 20, model.config.vocab_size)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= ATOL


def test_greedy_generation_matches_transformers(case):
    key, hf, _, model = case
    ids = _prompt(PROMPT, model.config.vocab_size, seed=2)
    ours = model.generate(ids, max_new_tokens=NEW, ignore_eos=True)
    ref = _hf_greedy(hf, ids)
    assert ref.shape == (1, PROMPT + NEW)
    assert ours.dtype == ref.dtype
    assert torch.equal(ours, ref), f"\n{ours}\n{ref}"


def _padded(vocab, seed, side="left"):
    """Two prompts of 12 and 7 tokens as a [2, 12] batch padded with 0 on ``side``, and the mask."""
    long, short = _prompt(PROMPT, vocab, seed)[0], _prompt(7, vocab, seed + 1)[0]
    ids = torch.zeros(2, PROMPT, dtype=torch.long)
    mask = torch.zeros(2, PROMPT, dtype=torch.long)
    ids[0], mask[0] = long, 1
    where = slice(PROMPT - 7, None) if side == "left" else slice(0, 7)
    ids[1, where], mask[1, where] = short, 1
    return ids, mask


def _left_padded(vocab, seed):
    return _padded(vocab, seed, "left")


def test_left_padded_batch_logits_match_transformers(case):
    key, hf, _, model = case
    ids, mask = _left_padded(model.config.vocab_size, seed=3)
    ours = model(ids, attention_mask=mask)
    ref = _hf_logits(hf, ids, mask)
    assert ours.shape == ref.shape
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max().item() <= ATOL
    assert torch.count_nonzero(ours[~real]) == 0  # padding gets zero logits
    # and each row alone gives the same logits as in the batch
    alone = model(ids[1:, PROMPT - 7 :])
    assert (alone[0] - ours[1, PROMPT - 7 :]).abs().max().item() <= ATOL


def test_left_padded_batch_greedy_matches_transformers(case):
    key, hf, _, model = case
    ids, mask = _left_padded(model.config.vocab_size, seed=4)
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, ignore_eos=True)
    ref = _hf_greedy(hf, ids, attention_mask=mask)
    assert ref.shape == (2, PROMPT + NEW)
    assert torch.equal(ours, ref), f"\n{ours}\n{ref}"


def test_right_padded_batch_logits_match_transformers(case):
    key, hf, _, model = case
    ids, mask = _padded(model.config.vocab_size, seed=11, side="right")
    assert mask[1, :7].all() and not mask[1, 7:].any() and mask[0].all()
    ours = model(ids, attention_mask=mask)
    ref = _hf_logits(hf, ids, mask)
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max().item() <= ATOL
    assert torch.count_nonzero(ours[~real]) == 0


@pytest.mark.parametrize("key", ["llama-gqa-llama3", "mistral-window", "qwen2-bias"])
def test_chunked_prefill_matches_transformers(checkpoint_factory, key):
    """Prompts longer than max_step_tokens are prefilled in several steps (uniform and ragged)."""
    hf, directory = _make(checkpoint_factory, key, "4.x")
    vocab = hf.config.vocab_size
    with _load(directory, max_step_tokens=6) as model:
        one = _prompt(PROMPT + 5, vocab, seed=12)  # 17 tokens: steps of 6, 6, 5
        assert torch.equal(model.generate(one, max_new_tokens=NEW, ignore_eos=True), _hf_greedy(hf, one))
        ids, mask = _left_padded(vocab, seed=13)  # two rows: steps of 3 tokens, ragged at the end
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, ignore_eos=True),
                           _hf_greedy(hf, ids, attention_mask=mask))


# ---------------------------------------------------------------------- the features matter


def _variant(src, dst, **changes):
    """A copy of checkpoint ``src`` whose config.json has ``changes`` (None deletes a key)."""
    shutil.copytree(src, dst)
    raw = edit_config(json.loads((dst / "config.json").read_text()), changes)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


def test_sliding_window_matters(checkpoint_factory, tmp_path):
    hf, directory = _make(checkpoint_factory, "mistral-window", "5.x")
    full = _variant(directory, tmp_path / "full")
    raw = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({**raw, "sliding_window": None}))  # (left out: 4096, as transformers)
    ids = _prompt(20, 256, seed=5)
    with _load(directory) as windowed, _load(full) as unwindowed:
        a, b = windowed(ids), unwindowed(ids)
    assert unwindowed.config.sliding_windows == (None, None)
    assert torch.equal(a[:, :8], b[:, :8])  # the first 8 positions see all their keys either way
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3  # later ones do not
    assert (a - _hf_logits(hf, ids)).abs().max() <= ATOL


def test_llama3_rope_scaling_matters(checkpoint_factory, tmp_path):
    hf, directory = _make(checkpoint_factory, "llama-gqa-llama3", "5.x")
    plain = _variant(directory, tmp_path / "plain", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    ids = _prompt(20, 256, seed=6)
    with _load(directory) as scaled, _load(plain) as unscaled:
        assert unscaled.config.rope_scaling is None
        assert (scaled(ids) - unscaled(ids)).abs().max() > 1e-3


@pytest.mark.parametrize("use_sliding_window, windows", [(False, (None, None)), (True, (None, 4))])
def test_qwen2_4x_sliding_window_fields(checkpoint_factory, tmp_path, use_sliding_window, windows):
    """A 4.x Qwen2 config (no layer_types): the window applies only when enabled, from max_window_layers on."""
    import transformers

    _, directory = _make(checkpoint_factory, "qwen2-bias", "4.x")
    variant = _variant(directory, tmp_path / "qwen", layer_types=None, sliding_window=4,
                       use_sliding_window=use_sliding_window, max_window_layers=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(variant, dtype=torch.float32).eval()
    ids = _prompt(20, 512, seed=14)
    with _load(variant) as model:
        assert model.config.sliding_windows == windows
        assert (model(ids) - _hf_logits(hf, ids)).abs().max() <= ATOL
        assert torch.equal(model.generate(ids[:, :PROMPT], max_new_tokens=NEW, ignore_eos=True),
                           _hf_greedy(hf, ids[:, :PROMPT]))


def test_llama_attention_bias_is_computed_with(checkpoint_factory):
    """Llama's ``attention_bias`` puts a bias on q, k, v *and* o_proj (transformers' LlamaAttention):
    offload computes with all four (dropping o_proj.bias would change the logits)."""
    hf, directory = checkpoint_factory("llama-attention-bias", "llama", "5.x", seed=21,
                                       **dict(_BASE, num_key_value_heads=2, attention_bias=True))
    assert hf.model.layers[0].self_attn.o_proj.bias is not None
    ids = _prompt(20, 256, seed=15)
    with _load(directory) as model:
        assert model.config.qkv_bias and model.config.o_bias
        assert (model(ids) - _hf_logits(hf, ids)).abs().max().item() <= ATOL


def test_eos_stops_generation_like_transformers(checkpoint_factory):
    hf, directory = _make(checkpoint_factory, "llama-mha", "5.x")
    ids = _prompt(PROMPT, 256, seed=7)
    greedy = _hf_greedy(hf, ids)
    new = greedy[0, PROMPT:].tolist()
    eos = new[3]
    stop = new.index(eos)  # the first time the chosen token comes out
    with _load(directory) as model:
        # ignore_eos: the full length even though eos comes out
        assert torch.equal(model.generate(ids, max_new_tokens=NEW, eos_token_id=eos, ignore_eos=True), greedy)
        stopped = model.generate(ids, max_new_tokens=NEW, eos_token_id=eos)
        result = model.generate(ids, max_new_tokens=NEW, eos_token_id=eos, return_result=True)
    ref = _hf_greedy(hf, ids, eos_token_id=eos)
    assert stopped.shape == (1, PROMPT + stop + 1)
    assert torch.equal(stopped, ref)
    assert result.tokens == [new[: stop + 1]] and result.finish_reasons == ["eos"]


# ---------------------------------------------------------------------- offloading: bit for bit

OFFLOAD_KEY = "llama-offload"
OFFLOAD_LAYERS = 6


@pytest.fixture(scope="module")
def offload_case(checkpoint_factory):
    hf, directory = checkpoint_factory(OFFLOAD_KEY, "llama", "5.x", seed=99,
                                       **dict(_BASE, num_hidden_layers=OFFLOAD_LAYERS, num_key_value_heads=2))
    kw = dict(dtype=torch.float32, max_batch=1, max_seq_len=MAX_SEQ)
    resident = offload.load_model(directory, progress=False, **kw)
    assert resident.plan.placement == ["resident"] * OFFLOAD_LAYERS
    ids = _prompt(20, 256, seed=8)
    logits = resident(ids)
    tokens = resident.generate(ids[:, :PROMPT], max_new_tokens=NEW, ignore_eos=True)
    assert (logits - _hf_logits(hf, ids)).abs().max() <= ATOL
    needs = resident.plan.needs
    resident.close()
    return directory, kw, needs, ids, logits, tokens


def _budget(needs, layers_on_gpu):
    """A compute-device budget of the must-stay bytes plus ``layers_on_gpu`` blocks (resident ones and slots)."""
    return needs.fixed_bytes + layers_on_gpu * needs.largest_block


@pytest.mark.parametrize("resident_layers, slots_and_layers", [(0, 2), (1, 3), (3, 5)],
                         ids=["none-resident", "one-resident", "half-resident"])
def test_host_offload_is_bitwise_equal(offload_case, resident_layers, slots_and_layers):
    directory, kw, needs, ids, logits, tokens = offload_case
    budget = dict(gpu_memory=_budget(needs, slots_and_layers), cpu_memory="1GiB")
    assert budget["gpu_memory"] < 2**21  # a few hundred KB to about 1 MB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        plan = offload.plan_model(directory, **kw, **budget)
        model = offload.load_model(directory, progress=False, **kw, **budget)
    with model:
        assert model.plan.placement == plan.placement
        assert plan.placement.count("resident") == resident_layers
        assert plan.placement.count("host") == OFFLOAD_LAYERS - resident_layers
        assert model.plan.slots == {"host": 2}
        out = model(ids)
        assert torch.equal(out, logits)
        assert torch.equal(model(ids), logits)  # the ring starts the next pass in the right place
        assert torch.equal(model.generate(ids[:, :PROMPT], max_new_tokens=NEW, ignore_eos=True), tokens)


def test_all_resident_under_budgets_is_bitwise_equal(offload_case):
    directory, kw, needs, ids, logits, tokens = offload_case
    budget = dict(gpu_memory=_budget(needs, OFFLOAD_LAYERS) + needs.embedding_bytes, cpu_memory="1GiB")
    with pytest.warns(OffloadWarning, match="nothing is offloaded"):
        model = offload.load_model(directory, progress=False, **kw, **budget)
    with model:
        assert model.plan.placement == ["resident"] * OFFLOAD_LAYERS and model.plan.slots == {}
        assert torch.equal(model(ids), logits)
    # one byte less and the embedding leaves the device (a step reads a few of its rows); the layers stay
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        plan = offload.plan_model(directory, **kw, gpu_memory=budget["gpu_memory"] - 1, cpu_memory="1GiB")
        assert plan.embedding_on_host and plan.placement == ["resident"] * OFFLOAD_LAYERS and plan.slots == {}
        # and a byte less than the layers: two slots take the place of three layers, which stream
        plan = offload.plan_model(directory, **kw, gpu_memory=budget["gpu_memory"] - needs.embedding_bytes - 1,
                                  cpu_memory="1GiB")
    assert plan.placement.count("host") == 3


def test_host_and_peer_offload_is_bitwise_equal(offload_case):
    directory, kw, needs, ids, logits, tokens = offload_case
    budget = dict(gpu_memory=_budget(needs, 5), cpu_memory="1GiB", peer_memory={"cpu:1": "1GiB"},  # 1 + 2 rings of 2
                  link_bandwidth={"host": 10e9, "cpu:1": 10e9, "hbm": 100e9})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        plan = offload.plan_model(directory, **kw, **budget)
        model = offload.load_model(directory, progress=False, **kw, **budget)
    with model:
        placement = model.plan.placement
        assert placement == plan.placement
        assert placement.count("resident") == 1
        assert placement.count("cpu:1") >= 1 and placement.count("host") >= 1
        assert placement.count("cpu:1") + placement.count("host") == OFFLOAD_LAYERS - 1
        assert model.plan.slots == {"host": 2, "cpu:1": 2}
        assert torch.equal(model(ids), logits)
        assert torch.equal(model.generate(ids[:, :PROMPT], max_new_tokens=NEW, ignore_eos=True), tokens)


# ---------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def sampling_model(checkpoint_factory):
    _, directory = _make(checkpoint_factory, "llama-gqa-llama3", "5.x")
    model = _load(directory)
    yield model
    model.close()


def test_sampling_is_seeded(sampling_model):
    model = sampling_model
    ids = _prompt(PROMPT, 256, seed=9)
    sample = lambda seed, **kw: model.generate(ids, max_new_tokens=NEW, do_sample=True, seed=seed,  # noqa: E731
                                               ignore_eos=True, **kw)
    a, b = sample(1), sample(1)
    assert a.shape == (1, PROMPT + NEW)
    assert torch.equal(a[:, :PROMPT], ids)
    assert torch.equal(a, b)
    others = [sample(s) for s in (2, 3, 4)]
    assert any(not torch.equal(a, o) for o in others)
    assert len({tuple(o[0, PROMPT:].tolist()) for o in [a, *others]}) >= 3
    # filtered sampling is seeded too
    assert torch.equal(sample(5, top_k=20, top_p=0.9, temperature=0.7),
                       sample(5, top_k=20, top_p=0.9, temperature=0.7))


def test_sampling_with_top_k_1_or_tiny_top_p_is_greedy(sampling_model):
    model = sampling_model
    ids = _prompt(PROMPT, 256, seed=10, batch=2)
    greedy = model.generate(ids, max_new_tokens=NEW, ignore_eos=True)
    for seed in (1, 2):
        assert torch.equal(model.generate(ids, max_new_tokens=NEW, do_sample=True, top_k=1, seed=seed,
                                          ignore_eos=True), greedy)
        assert torch.equal(model.generate(ids, max_new_tokens=NEW, do_sample=True, top_p=1e-6, seed=seed,
                                          ignore_eos=True), greedy)
