"""Tensor parallelism on CPU: gloo processes, offloading active on every rank. (On a machine with a GPU too: the
ranks, and the single process they are compared with, compute on the CPU.)"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import offload

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    """This process as rank ``rank`` of ``world`` (gloo, one thread), as torchrun would set it up."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def _rank_main(rank, world, port, path, ids, kwargs, out):
    _join(rank, world, port)
    try:
        model = offload.load_model(path, tp=world, progress=False, **kwargs)
        logits = model(ids)
        tokens = model.generate(ids, max_new_tokens=8, ignore_eos=True)
        out[rank] = (logits, tokens, model.plan.placement, model.plan.host_bytes)
    except offload.OffloadError as e:
        out[rank] = str(e)
    finally:
        if torch.distributed.is_initialized():  # (else its error would hide the one that matters)
            torch.distributed.destroy_process_group()


def run_tp(world, path, ids, main=_rank_main, **kwargs):
    kwargs = {"device": "cpu", **kwargs}
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(main, args=(world, _free_port(), str(path), ids, kwargs, out), nprocs=world)
        return [out[r] for r in range(world)]


def assert_tp_equals_one(directory, ids, atol: float, max_seq_len: int, ranks: int = 2, **options) -> None:
    """Float32 logits within ``atol`` and the same 8 greedy tokens on every one of ``ranks`` gloo ranks as on
    one process (both with ``options``)."""
    kwargs = dict(dtype=torch.float32, max_batch=2, max_seq_len=max_seq_len, **options)
    with offload.load_model(directory, progress=False, device="cpu", **kwargs) as single:
        want_logits, want_tokens = single(ids), single.generate(ids, max_new_tokens=8, ignore_eos=True)
    for rank, result in enumerate(run_tp(ranks, directory, ids, **kwargs)):
        assert not isinstance(result, str), result
        logits, tokens, _, _ = result
        assert (logits - want_logits).abs().max().item() <= atol, f"rank {rank}"
        assert torch.equal(tokens, want_tokens), f"rank {rank}"


def _budget_streaming_everything(path, tp):
    """A budget per rank with room for the fixed parts and 2 slots only: every layer streams from the host."""
    needs = offload.plan_model(path, max_batch=2, max_seq_len=48, device="cpu").needs
    per_rank_block = needs.largest_block // tp
    return needs.fixed_bytes + 2 * needs.largest_block // tp + per_rank_block // 2


@pytest.mark.parametrize("world", [2, 4])
def test_tp_matches_tp1_with_offloading_on_every_rank(tiny, world):
    ids = torch.randint(0, 1024, (2, 20), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_batch=2, max_seq_len=48, cpu_memory="1GiB", device="cpu")
    single = offload.load_model(tiny, progress=False, gpu_memory=_budget_streaming_everything(
        tiny, 1), **kwargs)
    want_logits, want_tokens = single(ids), single.generate(ids, max_new_tokens=8, ignore_eos=True)
    assert set(single.plan.placement) == {"host"}
    results = run_tp(world, tiny, ids, gpu_memory=_budget_streaming_everything(tiny, world),
                     **kwargs)
    for rank, result in enumerate(results):
        assert not isinstance(result, str), result
        logits, tokens, placement, host_bytes = result
        assert "host" in placement, f"rank {rank} streams nothing"
        assert (logits - want_logits).abs().max().item() <= 1e-4
        assert torch.equal(tokens, want_tokens)
        # A rank's host tier holds 1/world of each streamed layer, plus what is replicated: the norms, and at
        # world=4 the key/value heads (the tiny shape has 2, so pairs of ranks hold the same one): +9%.
        per_layer, single_per_layer = host_bytes / placement.count("host"), single.plan.needs.largest_block
        assert single_per_layer / world <= per_layer <= (1.01 if world == 2 else 1.10) * single_per_layer / world


def test_budget_too_small_names_the_rank(tiny):
    ids = torch.zeros(1, 4, dtype=torch.long)
    results = run_tp(2, tiny, ids, gpu_memory="100KiB", cpu_memory="1GiB")
    for message in results:
        assert isinstance(message, str)
        assert "rank 0 of 2" in message and "rank 1 of 2" in message


def _rank_with_its_own_options(rank, world, port, path, ids, kwargs, out):
    _join(rank, world, port)
    try:
        offload.load_model(path, tp=world, progress=False, device="cpu", **kwargs["per_rank"][rank])
        out[rank] = "loaded"
    except offload.OffloadError as e:
        out[rank] = str(e)
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_given_different_options_all_refuse_to_load(tiny):
    """A rank with other options would break the collectives later (a hang, or a crash of gloo): every rank says
    which options differ instead."""
    per_rank = [dict(max_seq_len=32, max_batch=1), dict(max_seq_len=16, max_batch=1)]
    results = run_tp(2, tiny, None, main=_rank_with_its_own_options, per_rank=per_rank)
    assert all("different options (max_seq_len)" in message for message in results), results


def _rank_with_its_own_checkpoint(rank, world, port, path, ids, kwargs, out):
    _join(rank, world, port)
    try:
        offload.load_model(kwargs["paths"][rank], tp=world, progress=False, device="cpu", max_seq_len=32,
                           max_batch=1)
        out[rank] = "loaded"
    except offload.OffloadError as e:
        out[rank] = str(e)
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_given_different_checkpoints_all_refuse_to_load(tiny, tmp_path):
    """A rank that loads another model (here: 2 layers where the others have 8) runs other collectives: the ranks
    hung in their first pass. Every rank says that the models differ instead."""
    from offload.models.shapes import shape_config
    from offload.synthetic import write_checkpoint

    other = write_checkpoint({**shape_config("tiny"), "num_hidden_layers": 2}, tmp_path / "short", torch.float32,
                             seed=7, device="cpu", progress=False)
    results = run_tp(2, tiny, None, main=_rank_with_its_own_checkpoint, paths=[str(tiny), str(other)])
    assert all("different options (the model's config)" in message for message in results), results


def _rank_with_its_own_prompts(rank, world, port, path, ids, kwargs, out):
    _join(rank, world, port)
    model = offload.load_model(path, tp=world, progress=False, device="cpu", max_seq_len=32, max_batch=1)
    answers = []
    for prompts in kwargs["per_rank"][rank]:
        try:
            answers.append(model.generate(prompts, max_new_tokens=3, ignore_eos=True))
        except offload.OffloadError as e:
            answers.append(str(e))
    out[rank] = answers
    torch.distributed.destroy_process_group()


def test_ranks_called_with_different_prompts_all_refuse(tiny):
    """Other prompts on one rank, or a prompt only one rank refuses, would pair one rank's collectives with
    another's (a crash of gloo, or tokens from mismatched passes): every rank refuses, and the next call with the
    same prompts on every rank runs."""
    per_rank = [[[[1, 2, 3]], [[1, 2]], [[5, 6]]], [[[1, 2, 4]], [[1, 10**9]], [[5, 6]]]]
    results = run_tp(2, tiny, None, main=_rank_with_its_own_prompts, per_rank=per_rank)
    for answers in results:
        assert all("the ranks called generate with different arguments" in a for a in answers[:2]), answers
    assert results[0][2] == results[1][2] and len(results[0][2][0]) == 5


def test_heads_not_divisible_by_tp(tiny):
    with pytest.raises(offload.ConfigError, match="not divisible by tp=3"):
        offload.load_model(tiny, tp=3, progress=False)


def test_more_ranks_on_a_host_than_it_has_gpus_is_refused_by_name(monkeypatch):
    """NCCL refuses two ranks on one GPU (an error deep in its first collective): say so before, and how else."""
    from offload.distributed import local_gpu

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert local_gpu() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(offload.OffloadError, match=r"rank 1 of this host has no GPU of its own \(the host has 1\)"):
        local_gpu()


def test_each_rank_computes_on_its_own_gpu_whether_or_not_cuda_is_named(monkeypatch):
    """Under tensor parallelism, no device and "cuda" both mean this rank's GPU (its LOCAL_RANK, else its RANK);
    "cuda" went to the current device, cuda:0 on every rank, which NCCL refuses."""
    from offload.distributed import TensorParallel
    from offload.loading import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    second = TensorParallel(rank=1, size=2)
    for env in (dict(LOCAL_RANK="1", RANK="1"), dict(RANK="1")):
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert _device(None, second) == _device("cuda", second) == torch.device("cuda", 1)
    assert _device("cpu", second) == torch.device("cpu")


def test_tp_without_torchrun_is_refused(tiny, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(offload.OffloadError, match="torchrun"):
        offload.load_model(tiny, tp=2, progress=False)


def _rank_speculates(rank, world, port, path, ids, kwargs, out):
    _join(rank, world, port)
    try:
        model = offload.load_model(path, tp=world, progress=False, **kwargs)
        greedy = model.generate(ids, max_new_tokens=12, ignore_eos=True, return_result=True)
        sampled = model.generate(ids, max_new_tokens=12, ignore_eos=True, do_sample=True, temperature=0.8, seed=1,
                                 return_result=True)
        width = model.draft.model.options.tree_width if hasattr(model.draft, "model") else 1
        out[rank] = (greedy.tokens, sampled.tokens, model.draft is not None, greedy.drafted_tokens, width)
    finally:
        torch.distributed.destroy_process_group()


def _rank_speculates_timed(rank, world, port, path, ids, kwargs, out):
    """Greedy rows through a row engine whose speculator prices passes by their times (as on a GPU)."""
    from conftest import greedy_through
    from offload.scheduler.row_engine import RowEngine

    _join(rank, world, port)
    try:
        model = offload.load_model(path, tp=world, progress=False, **kwargs)
        engine = RowEngine(model, rows=len(ids))
        engine.speculator.timed = True
        tokens = greedy_through(engine, ids, 12)
        prices = model.speculation_prices
        out[rank] = (tokens, list(prices.verify.ratios), list(prices.draft_step.ratios))
    finally:
        torch.distributed.destroy_process_group()


def _rank_measures_its_own_links(rank, world, port, path, ids, kwargs, out):
    """A draft model loaded where each rank measured links of its own (as GPUs do: no ``link_bandwidth`` given)."""
    from offload import loading

    links = {"host": 1e9 * (1 + rank), "hbm": 1e11, "matmul": 1e15}  # each rank's own figures
    loading.link_bandwidths = lambda *args, **kwargs: dict(links)
    _join(rank, world, port)
    try:
        model = offload.load_model(path, tp=world, progress=False, **kwargs)
        result = model.generate(ids, max_new_tokens=12, ignore_eos=True, return_result=True)
        out[rank] = (result.tokens, result.drafted_tokens)
    except offload.OffloadError as e:
        out[rank] = str(e)
    finally:
        torch.distributed.destroy_process_group()


def test_a_draft_model_loads_under_tp_where_each_rank_measured_its_own_links(tiny):
    """The draft is planned with its target's links, which each rank measures for itself: they differ between
    ranks, and the options every rank must give alike stay alike (a draft used to be refused under tensor
    parallelism unless the links were given)."""
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(1)).tolist()
    kwargs = dict(max_batch=2, max_seq_len=48, dtype="float32", device="cpu")
    with offload.load_model(tiny, progress=False, **kwargs) as single:
        want = single.generate(ids, max_new_tokens=12, ignore_eos=True, return_result=True).tokens
    for result in run_tp(2, tiny, ids, main=_rank_measures_its_own_links, draft="int4", **kwargs):
        assert not isinstance(result, str), result
        tokens, drafted = result
        assert tokens == want and drafted > 0


def test_under_tp_every_rank_prices_passes_by_rank_0s_times(tiny):
    """Each rank chooses the next pass's shape from the measured prices: they are rank 0's times on every rank,
    or the ranks could verify passes of different widths."""
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(1)).tolist()
    kwargs = dict(max_batch=2, max_seq_len=48, dtype="float32", device="cpu", draft="int4",
                  link_bandwidth={"host": 1e9, "hbm": 1e11, "matmul": 1e15})
    with offload.load_model(tiny, progress=False, **{**kwargs, "draft": None}) as single:
        want = [t[12:] for t in single.generate(ids, max_new_tokens=12, ignore_eos=True)]
    (tokens, verify, steps), other = run_tp(2, tiny, ids, main=_rank_speculates_timed, **kwargs)
    assert tokens == want and other[0] == want
    assert verify and steps and (verify, steps) == other[1:]


@pytest.mark.parametrize("draft, branches, best_first", [("ngram", None, False), ("int4", None, False),
                                                         ("int4", 4, False), ("int4", 4, True)])
def test_speculative_decoding_under_tp_equals_plain_greedy(tiny, draft, branches, best_first, monkeypatch):
    """Every rank drafts, verifies and accepts the same tokens (sampled ones are rank 0's draws; a tree's rows
    keep the same branch on every rank, grown best first by the draft too); greedy tokens are plain greedy
    decoding's of one process. Links that bind (streaming costs a hundred times HBM) make the plan keep the int4
    draft."""
    if best_first:
        monkeypatch.setenv("OFFLOAD_BEST_FIRST_TREES", "1")  # read by each rank's process at import
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(1)).tolist()
    ids[1] = ids[1][:5] * 3  # a prompt that repeats itself: prompt lookup finds drafts
    kwargs = dict(max_batch=2, max_seq_len=48, dtype="float32", device="cpu",
                  link_bandwidth={"host": 1e9, "hbm": 1e11, "matmul": 1e15})
    single = offload.load_model(tiny, progress=False, **kwargs)
    want = single.generate(ids, max_new_tokens=12, ignore_eos=True, return_result=True).tokens
    results = run_tp(2, tiny, ids, main=_rank_speculates, draft=draft, draft_branches=branches, **kwargs)
    for greedy, sampled, has_draft, drafted, tree_width in results:
        assert has_draft and drafted > 0 and (tree_width > 1) == best_first
        assert greedy == want
        assert sampled == results[0][1]
