"""Exploration on a GPU (not a benchmark): where a compiled, graph-replayed decode step of llama-2-7b spends
its time, and whether inductor's coordinate-descent tuning helps."""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import offload  # noqa: E402
from offload.models.shapes import shape_config  # noqa: E402

warnings.simplefilter("ignore")


def decode_ms(m, tokens=64):
    ids = torch.randint(0, 32000, (1, 32), generator=torch.Generator().manual_seed(0))
    m.generate(ids, max_new_tokens=8, ignore_eos=True)
    return m.generate(ids, max_new_tokens=tokens, ignore_eos=True, return_result=True).ms_per_step


def kernels(m):
    ids = torch.randint(0, 32000, (1, 32), generator=torch.Generator().manual_seed(0))
    m.generate(ids, max_new_tokens=4, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        m.generate(ids, max_new_tokens=9, ignore_eos=True)  # 8 decode steps
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:18]
    total = sum(e.device_time_total for e in prof.key_averages())
    print(f"  device time per decode step ~{total / 9 / 1e3:.2f} ms over {sum(e.count for e in rows)} top launches")
    for e in rows:
        print(f"  {e.device_time_total / 9:9.1f} us/step  {e.count // 9:5d} calls/step  {e.key[:90]}")


for tuning in (False, True):
    torch._inductor.config.coordinate_descent_tuning = tuning
    torch._dynamo.reset()
    m = offload.load_model(shape_config("llama-2-7b"), random_weights=0, dtype=torch.bfloat16, max_seq_len=256,
                           progress=False)
    limit = 1e3 * (m.plan.needs.n_layers * m.plan.needs.block_bytes + m.plan.needs.global_bytes) / m.plan.bandwidth["hbm"]
    ms = decode_ms(m)
    print(f"7b compiled graphs, coordinate descent {tuning}: {ms:.2f} ms, limit {limit:.2f} ms: {ms / limit:.2f}x",
          flush=True)
    kernels(m)
    m.close()
    del m
    torch.cuda.empty_cache()
