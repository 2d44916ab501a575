"""Planning batch jobs for throughput: the job forecast, and the choice of rows and placement."""

import pytest

from offload import Budget, PlanError
from offload.batch import choose_batch_size, forecast_job
from offload.memory.planner import MemoryNeeds, make_plan

GB = 10**9


def test_forecast_counts_passes_like_the_engine_runs_them():
    constant = lambda tokens, keys: 1.0  # noqa: E731  every pass costs a second
    # two records of 5 new tokens on 2 rows: one pass reads both prompts (first tokens), 4 decode passes
    two_rows = forecast_job([(10, 5), (10, 5)], rows=2, pass_seconds=constant)
    assert (two_rows.passes, two_rows.prefill_seconds, two_rows.decode_seconds) == (5, 1.0, 4.0)
    one_row = forecast_job([(10, 5), (10, 5)], rows=1, pass_seconds=constant)
    assert one_row.passes == 10 and one_row.tokens_per_s == pytest.approx(10 / 10)
    # a row that frees is refilled in the next pass, which also decodes the others
    refill = forecast_job([(4, 3), (4, 1), (4, 2)], rows=2, pass_seconds=constant)
    assert refill.passes == 3 and refill.generated_tokens == 6


def test_forecast_charges_compute_for_long_prompts():
    per_token = lambda tokens, keys: max(0.1, tokens * 0.01)  # noqa: E731  link floor, or 10 ms a token
    f = forecast_job([(512, 2)] * 4, rows=4, pass_seconds=per_token)
    assert f.prefill_seconds == pytest.approx(4 * 512 * 0.01 + 0)  # one pass reads all four prompts
    assert f.decode_seconds == pytest.approx(0.1)


def plans_for(host_bandwidth: float):
    """A 40-layer model of 1 GB layers whose KV cache takes 1 GB per row: 4 rows leave every layer resident."""
    def plans(rows: int):
        needs = MemoryNeeds(blocks=(GB,) * 40, global_bytes=GB // 2, kv_bytes=rows * GB,
                            activation_bytes=GB // 4, workspace_bytes=GB // 4, max_batch=rows, max_seq_len=512,
                            flops_per_token=2 * 40 * GB / 2, flops_per_key=1e6)
        budget = Budget(needs.fixed_bytes - rows * GB + 44 * GB, 100 * GB, {})
        bandwidth = {"host": host_bandwidth, "hbm": 4000 * GB, "matmul": 800e12}
        return [make_plan(needs, budget, bandwidth, "cuda:0", offload_requested=True)]
    return plans


def test_auto_keeps_a_smaller_batch_when_more_rows_would_stream_over_a_slow_link():
    shapes = [(128, 64)] * 32
    best, tried = choose_batch_size(shapes, plans_for(host_bandwidth=25 * GB), most=32)
    by_rows = {f.rows: f for f in tried}
    assert plans_for(25 * GB)(4)[0].placement.count("host") == 0  # 4 rows: all resident
    assert plans_for(25 * GB)(16)[0].placement.count("host") > 0  # 16 rows: layers stream
    assert best.rows == 4 and best.tokens_per_s == max(f.tokens_per_s for f in tried)
    assert by_rows[4].tokens_per_s > by_rows[max(by_rows)].tokens_per_s  # "as many rows as fit" would be slower


def test_auto_takes_more_rows_when_streaming_them_is_cheap():
    shapes = [(128, 64)] * 32
    best, tried = choose_batch_size(shapes, plans_for(host_bandwidth=4000 * GB), most=32)
    assert best.rows == max(f.rows for f in tried) > 4


def test_auto_refuses_with_the_planners_reason_when_nothing_fits():
    def nothing_fits(rows):
        raise PlanError("the budget cannot hold the KV cache")
    with pytest.raises(PlanError, match="KV cache"):
        choose_batch_size([(8, 8)], nothing_fits, most=8)
