"""What the server has done, in the Prometheus text format (``GET /metrics``).

Each figure has one writer: the engine thread counts steps, tokens and rows, the
HTTP thread counts requests. Readers may see one figure a step ahead of another.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds


@dataclass
class Metrics:
    rows: int  # KV cache rows the engine may fill
    # HTTP thread
    finished: Counter = field(default_factory=Counter)  # requests by finish reason: stop, length, cancelled, error
    rejected: int = 0  # answered 429: the queue was full
    running: int = 0  # accepted and not finished (in a row, or waiting for one)
    prompt_tokens: int = 0
    # engine thread
    generated_tokens: int = 0
    rows_busy: int = 0
    queued: int = 0  # waiting for a row
    steps: int = 0
    step_seconds: float = 0.0
    step_buckets: list[int] = field(default_factory=lambda: [0] * len(STEP_BUCKETS))
    decode_tokens: int = 0  # tokens made by passes after a row's prompt
    decode_row_passes: int = 0  # rows given such a pass, summed over passes
    drafted_tokens: int = 0  # speculative decoding: tokens drafted, and those the model accepted
    accepted_tokens: int = 0
    expert_hits: int | None = None  # a mixture of experts: routed experts found on the device, and copied in
    expert_misses: int | None = None

    def observe_step(self, seconds: float, tokens: int) -> None:
        self.steps += 1
        self.step_seconds += seconds
        for i, bound in enumerate(STEP_BUCKETS):
            if seconds <= bound:
                self.step_buckets[i] += 1
        self.generated_tokens += tokens

    def observe_passes(self, before, after) -> None:
        """What the engine's counters (``offload.scheduler.row_engine.Stats``) gained from ``before`` to ``after``."""
        for name in ("decode_tokens", "decode_row_passes", "drafted_tokens", "accepted_tokens"):
            setattr(self, name, getattr(self, name) + getattr(after, name) - getattr(before, name))

    def render(self) -> str:
        out = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP offload_{name} {help}\n# TYPE offload_{name} {kind}\n")
            out.extend(f"offload_{name}{labels} {_number(value)}\n" for labels, value in samples)

        reasons = ("stop", "length", "cancelled", "error")
        metric("requests_total", "counter", "Generation requests finished, by finish reason.",
               [(f'{{finish_reason="{r}"}}', self.finished[r]) for r in reasons])
        metric("requests_rejected_total", "counter", "Requests answered 429 because the queue was full.",
               [("", self.rejected)])
        metric("requests_running", "gauge", "Requests accepted and not finished.", [("", self.running)])
        metric("queue_depth", "gauge", "Requests waiting for a KV cache row.", [("", self.queued)])
        metric("rows_busy", "gauge", "KV cache rows holding a request.", [("", self.rows_busy)])
        metric("rows", "gauge", "KV cache rows the engine may fill.", [("", self.rows)])
        metric("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", [("", self.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
        metric("draft_tokens_total", "counter", "Tokens drafted (speculative decoding).", [("", self.drafted_tokens)])
        metric("draft_accepted_tokens_total", "counter", "Drafted tokens the model accepted.",
               [("", self.accepted_tokens)])
        per_pass = self.decode_tokens / self.decode_row_passes if self.decode_row_passes else 0.0
        metric("tokens_per_pass", "gauge", "Mean tokens a request gains from one pass over the model after its "
               "prompt (1 without a draft; speculative decoding makes more).", [("", per_pass)])
        if self.expert_hits is not None:
            lookups = self.expert_hits + self.expert_misses
            metric("expert_lookups_total", "counter", "Routed experts a step needed: found on the device (hit) or "
                   "copied in (miss).", [('{result="hit"}', self.expert_hits), ('{result="miss"}', self.expert_misses)])
            metric("expert_hit_rate", "gauge", "Share of the routed experts needed that were on the device.",
                   [("", self.expert_hits / lookups if lookups else 0.0)])
        buckets = [(f'_bucket{{le="{b}"}}', n) for b, n in zip(STEP_BUCKETS, self.step_buckets)]
        metric("step_seconds", "histogram", "Time of one engine step (one forward pass over the batch).",
               [*buckets, ('_bucket{le="+Inf"}', self.steps), ("_sum", self.step_seconds), ("_count", self.steps)])
        return "".join(out)


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"
