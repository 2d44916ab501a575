"""What ``offload.loading.prepare`` decides before a byte of weights is read: the chunk size of a pass, and the
room the plan reserves for logits."""

import warnings

import pytest
import torch

import offload
from offload.errors import OffloadWarning, PlanError
from offload.loading import prepare
from offload.models.shapes import shape_config

LINKS = {"host": 55e9, "hbm": 4e12, "matmul": 7e14}


def _prepare(shape, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        return prepare(shape_config(shape), offload.LoadOptions(device="cpu", link_bandwidth=LINKS, **kw))


def test_many_short_prompts_prefill_in_chunks_of_2048_tokens_not_of_one_prompt():
    """32 prompts of 128 tokens with max_seq_len 160: the chunk is 2048 tokens (it was max_seq_len, 160)."""
    setup = _prepare("llama-2-13b", dtype="bf16", gpu_memory="8GiB", cpu_memory="64GiB", max_batch=32,
                     max_seq_len=160)
    assert setup.options.max_step_tokens == 2048
    assert "chunks of 2048 tokens" in str(setup.plan)


def test_a_chunk_never_takes_more_than_a_block():
    """Where a chunk's temporaries would outweigh a layer (a tiny model), the chunk shrinks, down to 128 tokens;
    a chunk size given is kept."""
    setup = _prepare("llama-3-8b", dtype="bf16", gpu_memory="8GiB", cpu_memory="64GiB", max_seq_len=4096)
    block = setup.plan.needs.largest_block
    assert setup.options.max_step_tokens == 1024  # 2048 positions of 128,256 logits outweigh a 436 MiB layer
    assert setup.plan.needs.activation_bytes <= block
    assert _prepare("tiny", max_seq_len=512).options.max_step_tokens == 128
    assert _prepare("tiny", max_seq_len=512, max_step_tokens=300).options.max_step_tokens == 300
    assert _prepare("tiny", max_seq_len=40).options.max_step_tokens == 40  # one row of 40 tokens at most


def test_generation_alone_reserves_no_logits_for_every_position():
    """SmolLM2-135M's shape in float32 (a 49,152 vocabulary) with half of its weights' bytes as the budget: the
    logits of every position of 2048-token chunks take 384 MiB, more than the model's layers; a server, which
    reads each row's last position only, loads with all_logits=False and streams half the layers."""
    half = _prepare("smollm2-135m", dtype="float32", max_batch=8, max_seq_len=256).plan.needs.weight_bytes // 2
    kw = dict(dtype="float32", gpu_memory=half + 150 * 2**20, cpu_memory="2GiB", max_batch=8, max_seq_len=256,
              max_step_tokens=2048)
    with pytest.raises(PlanError, match="activations"):
        _prepare("smollm2-135m", **kw)
    setup = _prepare("smollm2-135m", all_logits=False, **kw)
    assert 0 < setup.plan.placement.count("host") < len(setup.plan.placement)
    assert setup.plan.needs.activation_bytes < 64 * 2**20


def test_a_model_loaded_for_generation_refuses_to_return_every_positions_logits(tiny):
    model = offload.load_model(tiny, all_logits=False, max_seq_len=64, progress=False)
    with pytest.raises(offload.InputError, match="all_logits=False"):
        model(torch.tensor([[1, 2, 3]]))
    assert len(model.generate([[1, 2, 3]], max_new_tokens=3)[0]) == 6
    model.close()


def test_cuda_graphs_is_true_or_false():
    from offload.options import LoadOptions

    assert LoadOptions().cuda_graphs is True
    with pytest.raises(offload.InputError, match="cuda_graphs"):
        LoadOptions(cuda_graphs="yes")


def test_the_plan_counts_a_decode_steps_kernels_by_family():
    tiny = shape_config("tiny")  # a small model's products take its norms: two kernels fewer
    assert offload.plan_model(tiny).needs.decode_kernels == 5 * tiny["num_hidden_layers"]
    large = shape_config("llama-2-7b") | {"num_hidden_layers": 2}
    assert offload.plan_model(large).needs.decode_kernels == 7 * 2
    moe = shape_config("qwen3-30b-a3b") | {"num_hidden_layers": 2, "mlp_only_layers": [1]}
    assert offload.plan_model(moe).needs.decode_kernels == (5 + 5 + 3 * 8 + 8) + 7


def test_a_process_plans_with_one_measurement_of_the_cpu():
    """The CPU's rates vary by half from one measurement to the next: every plan of a process sees the same, so
    a printed plan is the plan that loads (the int4 draft's keep or decline, ``--batch-size auto``)."""
    first = offload.plan_model(shape_config("tiny"), device="cpu", max_seq_len=64)
    second = offload.plan_model(shape_config("tiny"), device="cpu", max_seq_len=64, draft="ngram")
    assert first.bandwidth == second.bandwidth and first.bandwidth["host"] > 0 and first.bandwidth["matmul"] > 0


def test_a_draft_models_trees_passes_are_in_its_plan():
    """A draft model that grows trees (``tree_width``: passes of its own that wide, every position's logits and
    their float32 log-probabilities) reserves the activations of its widest pass where they outgrow a step's."""
    config = shape_config("smollm2-135m")
    kw = dict(dtype=torch.float32, max_seq_len=256, max_batch=8, max_step_tokens=16, all_logits=False)
    chain = offload.plan_model(config, **kw).needs.activation_bytes
    trees = offload.plan_model(config, tree_width=33, **kw).needs.activation_bytes
    assert trees > chain
    assert trees >= 8 * 33 * config["vocab_size"] * 4 * 2  # the logits' float32 copies of 8 rows x 33 tokens
