"""Exploration on a GPU (not a benchmark): decode graphs vs eager, bitwise checks, a compiled-layer variant,
and which weight-only matmul ops this torch has on CUDA. Prints one line per finding."""

import gc
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import offload  # noqa: E402
from offload.models.shapes import shape_config  # noqa: E402

warnings.simplefilter("ignore")
SEED = 0


def free():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def attempt(name, fn):
    t = time.perf_counter()
    try:
        fn()
    except Exception:
        print(f"FAILED {name}:")
        traceback.print_exc()
    print(f"[{name} took {time.perf_counter() - t:.1f} s]", flush=True)


def ops():
    print("torch", torch.__version__, torch.cuda.get_device_name())
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randint(-128, 127, (512, 256), device="cuda", dtype=torch.int8)
    s = torch.rand(512, device="cuda", dtype=torch.bfloat16)
    try:
        out = torch._weight_int8pack_mm(x, w, s)
        ref = (x.float() @ (w.float() * s.float()[:, None]).T)
        print("int8pack_mm cuda: ok, rel err", ((out.float() - ref).norm() / ref.norm()).item())
    except Exception as e:
        print("int8pack_mm cuda: NO", type(e).__name__, str(e)[:120])
    try:
        q = torch.randint(0, 16, (512, 256), device="cuda", dtype=torch.int32)
        packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        packed = torch._convert_weight_to_int4pack(packed_u8, 8)
        sz = torch.rand(256 // 128, 512, 2, device="cuda", dtype=torch.bfloat16)
        out = torch._weight_int4pack_mm(x, packed, 128, sz)
        print("int4pack_mm cuda: ok", tuple(packed.shape), packed.dtype, tuple(out.shape))
    except Exception as e:
        print("int4pack_mm cuda: NO", type(e).__name__, str(e)[:160])


def bitwise():
    shape = shape_config("llama-2-7b") | {"num_hidden_layers": 4}
    kw = dict(random_weights=SEED, dtype=torch.bfloat16, max_batch=4, max_seq_len=256, progress=False)
    prompts = torch.randint(0, 32000, (3, 40), generator=torch.Generator().manual_seed(1)).tolist()
    prompts[1] = prompts[1][:17]
    results = {}
    for name, extra in [("eager", dict(cuda_graphs=False)), ("graphs", {})]:
        m = offload.load_model(shape, **kw, **extra)
        needs = m.plan.needs
        results[name] = trace(m, prompts)
        m.close()
        del m
        free()
    budget = needs.fixed_bytes + 3 * needs.block_bytes  # 1 resident + 2 slots: 3 layers stream from the host
    m = offload.load_model(shape, **kw, gpu_memory=budget, cpu_memory="8GiB")
    print("offloaded placement", m.plan.layer_map())
    results["offloaded graphs"] = trace(m, prompts)
    m.close()
    del m
    free()
    for name in ("graphs", "offloaded graphs"):
        same = all(torch.equal(a, b) for a, b in zip(results["eager"], results[name]))
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(results["eager"], results[name]))
        print(f"{name} vs eager: bitwise {same}, max diff {diff:.3g}")
    same = all(torch.equal(a, b) for a, b in zip(results["graphs"], results["offloaded graphs"]))
    print(f"offloaded graphs vs resident graphs: bitwise {same}")


def trace(m, prompts):
    """Prefill, then 12 decode steps with a row joining and one idle step: the logits of every step."""
    out = [m.step(prompts, [0] * len(prompts)).clone()]
    cached = [len(p) for p in prompts]
    nxt = out[-1].argmax(-1).tolist()
    for s in range(12):
        if s == 6:  # a new row joins with a one-token prompt
            cached, nxt = cached + [0], nxt + [5]
        rows = [[t] for t in nxt]
        if s == 9:
            rows[0] = []  # a row with nothing to add
        logits = m.step(rows, cached)
        out.append(logits.clone())
        cached = [c + len(r) for c, r in zip(cached, rows)]
        nxt = [n if not r else t for n, r, t in zip(nxt, rows, logits.argmax(-1).tolist())]
    return out


def timed_decode(m, tokens=64, prompt=32):
    ids = torch.randint(0, m.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    m.generate(ids, max_new_tokens=8, ignore_eos=True)  # warm-up (captures the graphs)
    r = m.generate(ids, max_new_tokens=tokens, ignore_eos=True, return_result=True)
    return r.ms_per_step


def resident(shape_name, compile_layers=False):
    m = offload.load_model(shape_config(shape_name), random_weights=SEED, dtype=torch.bfloat16, max_seq_len=256,
                           progress=False)
    needs = m.plan.needs
    limit = 1e3 * (needs.n_layers * needs.block_bytes + needs.global_bytes) / m.plan.bandwidth["hbm"]
    eager = None
    if not compile_layers:
        m.graphs, graphs = None, m.graphs
        eager = timed_decode(m, tokens=32)
        m.graphs = graphs
    else:
        m.transformer.decoder_layer = torch.compile(m.transformer.decoder_layer, dynamic=False)
    g = timed_decode(m)
    print(f"resident {shape_name}{' compiled' if compile_layers else ''}: eager {eager} ms, graphs {g:.2f} ms, "
          f"HBM limit {limit:.2f} ms (hbm {m.plan.bandwidth['hbm'] / 1e9:.0f} GB/s): graphs/limit {g / limit:.2f}")
    m.close()
    del m
    free()


def host_tier():
    torch.cuda.reset_peak_memory_stats()
    m = offload.load_model(shape_config("llama-2-13b"), random_weights=SEED, dtype=torch.bfloat16, max_seq_len=160,
                           gpu_memory="8GiB", cpu_memory="40GiB", progress=False)
    limit = 1e3 * m.plan.predicted_step_seconds
    g = timed_decode(m, tokens=12)
    m.graphs, graphs = None, m.graphs
    e = timed_decode(m, tokens=12)
    m.graphs = graphs
    pool = sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
               if tuple(seg.get("segment_pool_id", ())) == tuple(graphs.pool))
    print(f"host 13b 8GiB {m.plan.layer_map()}: graphs {g:.1f} ms, eager {e:.1f} ms, limit {limit:.1f} ms; "
          f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, graph pool {pool / 2**20:.0f} MiB, "
          f"planned graph bytes {m.plan.needs.graph_bytes / 2**20:.0f} MiB, plan gpu {m.plan.gpu_bytes / 2**30:.2f} GiB")
    m.close()
    del m
    free()


if __name__ == "__main__":
    attempt("ops", ops)
    attempt("bitwise", bitwise)
    attempt("resident 7b", lambda: resident("llama-2-7b"))
    attempt("resident 13b", lambda: resident("llama-2-13b"))
    attempt("host 13b", host_tier)
    attempt("resident 13b compiled", lambda: resident("llama-2-13b", compile_layers=True))
    attempt("resident 7b compiled", lambda: resident("llama-2-7b", compile_layers=True))
