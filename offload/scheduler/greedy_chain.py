"""A draft model's greedy chain as replays of one CUDA graph a step: no host work between its steps.

A draft model drafts a chain by decoding its own argmax, step after step. Through
``OffloadedModel.decode`` each step's graph of layers is surrounded by a dozen kernels that
the host launches one by one (the positions' copy, the embedding, the LM head, the argmax, the
top-k of the likeliest tokens), and the GPU waits for them: on an H100 (2026-12-06, SmolLM2-135M
streamed, its int4 copy as the draft) a chain of 3 took 4.74 ms where 3.6 steps back to back
take 2.7. Here one graph holds a whole step of the chain: the embedding of the token in its
input buffer, every layer, the LM head, the step's likeliest tokens, its argmax written back
into the input buffer and the positions advanced by one. A chain of ``k`` tokens is then
``k`` replays and two small copies a step (its token and its likeliest ones, out of the
graph's buffers), queued without waiting: the first replay decodes the row's last token, which
the draft has not seen yet (where a row has more unseen tokens, after a pass that accepted its
whole chain, they go in first as the draft's usual catch-up, and the chain starts from its
logits).

A graph for each bucket of rows and key length, as the model's decode steps have, in their
memory pool (the plan's reserve for graphs counts one a layer for each bucket; a resident model
captures one a bucket); a step runs the kernels ``OffloadedModel.decode`` runs, so it drafts
the same tokens. Only where a whole step can be captured (:func:`fits`).
"""

from __future__ import annotations

import functools

import torch

from ..memory.host import to_device
from ..models.chunks import KV_BUCKET, DecodeChunk, bucket


def fits(model) -> bool:
    """Whether ``model`` (an ``OffloadedModel``) can capture a whole decode step: graphs in use (not compiled: the
    chain would run other kernels than its decode steps), every layer resident (no ring to wait on), the
    embedding on the device, no layer that the host decides inside, one rank."""
    graphs = model.graphs
    return (graphs is not None and not graphs.compile and not graphs.routes and not model.weights.rings
            and not model.plan.embedding_on_host and model.tp.size == 1)


class GreedyChain:
    """Greedy chains of ``model``'s decode steps, each step one replayed graph (``model.graphs``' capture)."""

    def __init__(self, model):
        self.model = model
        self.graphs: dict[tuple[int, int, int], object] = {}  # (rows, likeliest, key length) -> a step's graph
        self.buffers: dict[tuple[int, int], tuple] = {}  # (rows, likeliest) -> token, positions, live, top

    def run(self, tokens: torch.Tensor, positions: list[int | None], steps: int,
            likeliest: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``steps`` greedy decode steps from ``tokens [rows]`` (on the device) at ``positions[b]`` for row ``b``
        (None: the row takes no part): each step decodes a token into the KV cache and chooses the next, its
        argmax. Returns the chosen tokens ``[rows, steps]``, each step's ``likeliest`` likeliest tokens
        ``[rows, steps, likeliest]`` and their probabilities (float32); nothing waits for the GPU."""
        n, device, sink = len(positions), self.model.device, self.model.max_seq_len
        chosen = torch.empty(n, steps, dtype=torch.long, device=device)
        top = torch.empty(n, steps, likeliest, dtype=torch.long, device=device)
        chances = torch.empty(n, steps, likeliest, dtype=torch.float32, device=device)
        taking = [p for p in positions if p is not None]
        if not taking:
            return chosen.zero_(), top.zero_(), chances.zero_()
        rows = bucket(n, 1, self.model.max_batch)
        token, position, live, step_top, step_chances = self._buffers(rows, likeliest)
        token.zero_()
        token[:n].copy_(tokens)
        position.copy_(to_device([sink if p is None else p for p in positions] + [sink] * (rows - n), torch.long,
                                 device))
        live.copy_(to_device([int(p is not None) for p in positions] + [0] * (rows - n), torch.long, device))
        for step in range(steps):  # this step's token, at max(positions) + step, reads keys up to it
            self._step(rows, likeliest, bucket(max(taking) + step + 1, KV_BUCKET, sink))
            chosen[:, step].copy_(token[:n])
            top[:, step].copy_(step_top[:n])
            chances[:, step].copy_(step_chances[:n])
        return chosen, top, chances

    def _buffers(self, rows: int, likeliest: int) -> tuple:
        """What a step's graphs read and write: the token, the positions, which rows take part, the likeliest tokens
        and their probabilities."""
        if (rows, likeliest) not in self.buffers:
            zeros = functools.partial(torch.zeros, dtype=torch.long, device=self.model.device)
            self.buffers[rows, likeliest] = (zeros(rows), zeros(rows), zeros(rows), zeros(rows, likeliest),
                                             zeros(rows, likeliest, dtype=torch.float32))
        return self.buffers[rows, likeliest]

    def _step(self, rows: int, likeliest: int, kv_len: int) -> None:
        """One step of the chain: replayed, or (the bucket's first) run, then captured."""
        graph = self.graphs.get((rows, likeliest, kv_len))
        if graph is not None:
            graph.replay()
            return
        capture, work = self.model.graphs.capture, functools.partial(self._work, rows, likeliest, kv_len)
        with capture.on_side_stream():
            work()  # this step's result, and the kernels warmed up outside the capture
        capture.synchronize()
        buffers = self._buffers(rows, likeliest)
        kept = [b.clone() for b in buffers]  # a capture computes nothing (a stand-in that reruns it must not)
        with capture.on_side_stream():
            graph = capture.graph(work)
        for b, value in zip(buffers, kept):
            b.copy_(value)
        capture.join()
        self.graphs[rows, likeliest, kv_len] = graph
        self.model.graphs.captures += 1

    def _work(self, rows: int, likeliest: int, kv_len: int) -> None:
        """A step: the token in the buffer decoded at its position, its argmax the next token, one position on."""
        token, position, live, top, chances = self._buffers(rows, likeliest)
        model = self.model
        decoder = model.decoder
        chunk = DecodeChunk(position, kv_len, decoder.ropes, decoder.windows, tokens=token)
        logits = decoder.forward([chunk], model.weights, model.cache, rows)
        # the argmax is the next step's token; the likeliest tokens say where the chain's verdicts are likeliest to
        # break, and how (``drafts.ModelDraft.look_ahead``)
        decoder.ops.likeliest(logits, likeliest, out=(token, top, chances))
        position.add_(live)
