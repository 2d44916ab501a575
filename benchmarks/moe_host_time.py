"""The host's time in a decode step of a mixture of experts whose experts stream, with the compute made negligible.

    python benchmarks/moe_host_time.py                  # qwen3-30b-a3b's layers, experts and routing, 64 wide
    python benchmarks/moe_host_time.py --profile        # and where the host's time goes (cProfile)
    python benchmarks/moe_host_time.py --prefetch-experts   # with the next layer's experts guessed ahead
    python benchmarks/moe_host_time.py --direct-experts     # read where they live (a GPU: one graph a step)

A streamed mixture of experts waits, at every routed layer, for the host: it reads the
routing, then issues the experts' copies and their products. Shrinking every width of
the model (not its layers, experts or top-k) leaves that host work and little else, so
this measures it on any machine. On a GPU each operation costs a launch on top. With
direct reads there is no such wait (on a CPU they run under Triton's interpreter:
measure them on a GPU).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import warnings

import torch

import offload
from offload.cli import report_bad_input
from offload.errors import InputError
from offload.models.shapes import SHAPES, shape_config

NARROW = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}


def routed_experts(config: dict) -> int:
    """Experts a routed layer of ``config`` has (Qwen's field, or Mixtral's); 0 for a dense model."""
    return config.get("num_experts") or config.get("num_local_experts") or 0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3-30b-a3b")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--prefetch-experts", action="store_true", help="with the next layer's experts guessed ahead")
    p.add_argument("--direct-experts", action="store_true", help="the kernels read the experts where they live")
    args = p.parse_args(argv)
    if args.steps < 2:  # one token comes from the prefill: fewer than 2 leaves no decode step to time
        raise InputError(f"--steps must be >= 2 (the first token comes from the prefill), got {args.steps}")
    config = shape_config(args.shape) | NARROW
    if not routed_experts(config):  # a dense model has no expert traffic to time
        moe = ", ".join(name for name in SHAPES if routed_experts(shape_config(name)))
        raise InputError(f"{args.shape} has no routed experts; give a mixture-of-experts shape: {moe}")
    warnings.simplefilter("ignore", offload.OffloadWarning)
    torch.set_num_threads(1)
    options = dict(dtype="float32", max_batch=1, max_seq_len=64)
    needs = offload.plan_model(config, **options).needs
    experts = needs.experts.total_bytes
    room = needs.fixed_bytes + sum(needs.blocks) + 64 * needs.experts.nbytes  # every layer, few experts resident
    model = offload.load_model(config, **options, gpu_memory=room, cpu_memory=2 * experts, random_weights=0,
                               progress=False, prefetch_experts=args.prefetch_experts,
                               direct_experts=args.direct_experts)
    print(model.plan.experts.summary())
    prompt = torch.tensor([[1, 2, 3, 4]])
    model.generate(prompt, max_new_tokens=4)  # warm-up
    result = model.generate(prompt, max_new_tokens=args.steps, return_result=True)
    routed = sum(1 for n in needs.experts.per_layer if n)
    ms = 1e3 * result.decode_seconds / result.decode_steps
    print(model.experts.summary())
    print(f"moe_host_time: {args.shape} narrowed, {model.device}: {ms:.2f} ms a decode step, "
          f"{1e3 * ms / routed:.0f} us a routed layer" + (", prefetching" if args.prefetch_experts else "")
          + (", read directly" if args.direct_experts else ""))
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(model.generate, prompt, max_new_tokens=args.steps)
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    sys.exit(report_bad_input("moe_host_time", main))
