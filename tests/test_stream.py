"""The copy rings: load order, fixed slots per layer, and a clean restart after a step fails half way."""

import pytest
import torch

import offload
from offload.models.blocks import BlockLayout, BlockSpec
from offload.models.parallel import REPLICATED
from offload.scheduler.stream import CopyStream, WeightStream

PLACEMENT = ["resident", "host", "host", "resident", "host"]  # the host ring streams layers 1, 2, 4
LAYOUT = BlockLayout([("x", (4,), "x", REPLICATED)], torch.float32)


class RecordingEngine(CopyStream):
    """A CPU copy engine that notes (layer, slot) of every load."""

    def __init__(self, blocks, slots):
        super().__init__("cpu", "cpu")
        self.blocks, self.slots, self.loads = blocks, slots, []

    def copy(self, dst, src, after, done):
        layer = next(i for i, b in enumerate(self.blocks) if b.data_ptr() == src.data_ptr())
        slot = next(s for s in range(len(self.slots)) if self.slots[s].data_ptr() == dst.data_ptr())
        self.loads.append((layer, slot))
        super().copy(dst, src, after, done)


def make_stream(slots: int = 2):
    blocks = []
    for layer in range(len(PLACEMENT)):
        block = torch.zeros(LAYOUT.nbytes, dtype=torch.uint8)
        LAYOUT.views(block)["x"].fill_(layer)
        blocks.append(block)
    ring_slots = torch.zeros(slots, LAYOUT.nbytes, dtype=torch.uint8)
    engine = RecordingEngine(blocks, ring_slots)
    specs = [BlockSpec(f"layer {i}", LAYOUT, i) for i in range(len(PLACEMENT))]
    return WeightStream(specs, blocks, PLACEMENT, {"host": ring_slots}, {"host": engine}), engine


def run_step(stream, layers=range(len(PLACEMENT))):
    for i in layers:
        [weights] = stream.acquire([i])
        assert torch.equal(weights["x"], torch.full((4,), float(i))), f"layer {i} computed with other weights"
        stream.release([i])


def test_loads_follow_the_ring_and_each_layer_keeps_its_slot():
    stream, engine = make_stream(slots=2)
    run_step(stream)
    run_step(stream)
    # Layer j of the ring (1, 2, 4) always lands in slot j % 2; a load waits for its slot's previous
    # user to be released, so the next step's layer 1 is issued only after layer 4 was released.
    assert engine.loads[:5] == [(1, 0), (2, 1), (4, 0), (1, 0), (2, 1)]
    assert {layer: {s for l, s in engine.loads if l == layer} for layer in (1, 2, 4)} == {1: {0}, 2: {1}, 4: {0}}
    assert [layer for layer, _ in engine.loads] == [1, 2, 4] * (len(engine.loads) // 3) + [1, 2, 4][
        : len(engine.loads) % 3]


def test_one_slot_serialises_the_ring():
    stream, engine = make_stream(slots=1)
    run_step(stream)
    assert all(slot == 0 for _, slot in engine.loads)
    assert [layer for layer, _ in engine.loads] == [1, 2, 4, 1]  # the next step's first load is in flight


def test_asking_for_a_layer_out_of_order_is_caught():
    stream, _ = make_stream()
    stream.acquire([0])
    with pytest.raises(AssertionError, match="layer 2 asked for while layer 1 is next"):
        stream.acquire([2])


def test_reset_after_a_failed_step_starts_the_ring_afresh():
    stream, engine = make_stream()
    run_step(stream, layers=[0, 1, 2])  # the step fails after layer 2
    stream.reset()
    engine.loads.clear()
    run_step(stream)  # every layer gets its own weights again
    assert engine.loads[:3] == [(1, 0), (2, 1), (4, 0)]


def test_a_model_step_that_fails_half_way_leaves_the_model_usable(tiny):
    needs = offload.plan_model(tiny, max_seq_len=32).needs
    model = offload.load_model(tiny, max_seq_len=32, cpu_memory="1GiB", progress=False,
                               gpu_memory=needs.fixed_bytes + 5 * needs.largest_block)
    assert model.plan.placement.count("host") >= 4
    ids = torch.arange(3, 15)[None]
    expected = model(ids)
    calls = {"n": 0}
    original = model.decoder.layer

    def fails_at_the_fourth_layer(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("a layer failed")
        return original(*args)

    model.decoder.layer = fails_at_the_fourth_layer
    with pytest.raises(RuntimeError, match="a layer failed"):
        model(ids)
    del model.decoder.layer
    assert torch.equal(model(ids), expected)
    model.close()


# ---------------------------------------------------------------------- a whole pass in one graph, simulated
#
# CUDA's rules for a captured pass and its copies, checked without a GPU: fake streams and events record what
# each operation waits for (eagerly, or as a graph's nodes during a capture, instantiated again at each replay).
# The real ring runs on them (its own code, the fake CUDA calls). Then every read of a slot must see, as the last
# copy before it, the block its layer asked for, no copy into that slot may race it, and the capture must obey
# the rules: no wait in a capture on an event recorded outside it, no eager wait on an event recorded in one,
# every stream forked into a capture joined before its end, and a graph replayed from the state it was captured in.


class _Timeline:
    """Operations and what each happened after (eager), and graphs' templates (captured)."""

    def __init__(self):
        self.ops, self.problems = [], []  # ops: (kind, slot, block, set of earlier ops' indices, where)

    def add(self, kind, slot, block, after, where) -> int:
        self.ops.append((kind, slot, block, set(after), where))
        return len(self.ops) - 1


class _Capture:
    def __init__(self):
        self.nodes, self.streams, self.open = [], set(), True


class _Stream:
    def __init__(self, timeline: _Timeline, name: str):
        self.timeline, self.name = timeline, name
        self.front, self.capture, self.capture_front = set(), None, set()

    def add(self, kind, slot=None, block=None) -> None:
        if self.capture is not None:
            self.capture.nodes.append((kind, slot, block, set(self.capture_front), self.name))
            self.capture_front = {len(self.capture.nodes) - 1}
        else:
            self.front = {self.timeline.add(kind, slot, block, self.front, self.name)}

    def wait_event(self, event) -> None:
        if event.point is None:
            return  # never recorded: no wait
        capture, point = event.point
        if self.capture is not None:
            if capture is not self.capture:
                self.timeline.problems.append(f"{self.name} waits in a capture on an event recorded outside it")
            self.capture_front |= point
        elif capture is not None:
            if not capture.open:
                self.timeline.problems.append(f"{self.name} waits eagerly on an event recorded in a capture")
            else:  # the stream joins the capture
                self.capture, self.capture_front = capture, set(point)
                capture.streams.add(self)
        else:
            self.front |= point


class _Event:
    def __init__(self):
        self.point = None

    def record(self, stream: _Stream) -> None:
        self.point = ((stream.capture, set(stream.capture_front)) if stream.capture is not None
                      else (None, set(stream.front)))


class _Copies:
    """The copy engine of a link: waits for the slot to be free, copies, marks it ready."""

    source_stream = None

    def __init__(self, stream: _Stream, slot_of_part):
        self.stream, self.slot_of_part = stream, slot_of_part

    def copy(self, dst, src, after, done) -> None:
        self.stream.wait_event(after)
        self.stream.add("copy", self.slot_of_part(dst), int(src[0]))
        done.record(self.stream)


class _Simulation:
    """A ring of ``m`` blocks through ``k`` slots on fake streams: eager passes, captures and replays of a whole
    pass (keyed by a bucket's name), resets."""

    def __init__(self, m: int, k: int, monkeypatch):
        self.timeline = _Timeline()
        self.compute, self.side = _Stream(self.timeline, "compute"), _Stream(self.timeline, "capture")
        self.current = self.compute
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        layout = BlockLayout([("x", (4,), "x", REPLICATED)], torch.float32)
        specs = [BlockSpec(f"layer {i}", layout, i) for i in range(m)]
        buffers = [torch.full((layout.nbytes,), i, dtype=torch.uint8) for i in range(m)]  # byte 0: the block
        slots = torch.zeros(k, layout.nbytes, dtype=torch.uint8)
        copies = _Copies(_Stream(self.timeline, "copy"), lambda dst: (dst.data_ptr() - slots.data_ptr()) // dst.numel())
        self.stream = WeightStream(specs, buffers, ["host"] * m, {"host": slots}, {"host": copies})
        [self.ring] = self.stream.rings
        self.ring.device = torch.device("cuda")  # only its type is read: streams and events are the fakes
        self.ring.ready, self.ring.free = [_Event() for _ in range(k)], [_Event() for _ in range(k)]
        self.ring.captured_events = ([_Event() for _ in range(k)], [_Event() for _ in range(k)])
        self.slot_of_block = {i: j % k for j, i in enumerate(range(m))}
        self.graphs = {}

    def layers(self) -> None:
        for segment in self.stream.segments:
            self.stream.acquire(segment)
            for i in segment:
                self.current.add("read", self.slot_of_block[i], i)
            self.stream.release(segment)

    def eager(self, on=None) -> None:
        self.current = on or self.compute
        self.layers()

    def capture(self, key: str) -> None:
        """The bucket's first pass eagerly on the capture stream, then its capture (``DecodeGraphs`` does so)."""
        self.side.front |= self.compute.front
        self.eager(self.side)
        self.stream.wait_issued()
        capture = _Capture()
        self.side.capture, self.side.capture_front = capture, set()
        with self.stream.one_pass():
            self.layers()
        capture.open = False
        ends = self._reach(capture.nodes, self.side.capture_front)
        for stream in capture.streams:
            if not stream.capture_front <= ends:
                self.timeline.problems.append(f"{stream.name} not joined at the capture's end")
            stream.capture, stream.capture_front = None, set()
        self.side.capture = None
        self.graphs[key] = (capture.nodes, (self.ring.issued - self.ring.used, self.ring.used % len(self.ring.blocks)))
        self.compute.front |= self.side.front
        self.current = self.compute

    def replay(self, key: str) -> None:
        """What ``_WholePass`` does around a replay: wait for the loads issued, the graph's nodes, move on."""
        self.current = self.compute
        nodes, state = self.graphs[key]
        self.stream.wait_issued()
        self.stream.check_pass_start()
        if (self.ring.issued - self.ring.used, self.ring.used % len(self.ring.blocks)) != state:
            self.timeline.problems.append("a graph replayed from another ring state than it was captured in")
        made = []
        for kind, slot, block, after, where in nodes:
            made.append(self.timeline.add(kind, slot, block, {made[i] for i in after} or self.compute.front,
                                          "graph " + where))
        self.compute.front = set(made)
        self.stream.passed()

    @staticmethod
    def _reach(nodes, ends) -> set:
        seen, todo = set(), list(ends)
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += nodes[n][3]
        return seen

    def problems(self) -> list[str]:
        ops, before = self.timeline.ops, []
        for _, _, _, after, _ in ops:  # an op's predecessors come first
            before.append(set().union(*(before[p] | {p} for p in after)) if after else set())
        problems = list(self.timeline.problems)
        for r, (kind, slot, block, _, where) in enumerate(ops):
            if kind != "read":
                continue
            copies = [c for c, op in enumerate(ops) if op[0] == "copy" and op[1] == slot]
            if any(c not in before[r] and r not in before[c] for c in copies):
                problems.append(f"a read of layer {block} ({where}) races a copy into its slot")
            last = [c for c in copies if c in before[r] and not any(c in before[d] for d in copies if d in before[r])]
            if [ops[c][2] for c in last] != [block]:
                problems.append(f"a read of layer {block} ({where}) sees layers {[ops[c][2] for c in last]}")
        return sorted(set(problems))


@pytest.mark.parametrize("m, k", [(2, 1), (4, 2), (3, 2), (5, 2), (2, 2), (7, 3)])
@pytest.mark.parametrize("script", ["E Ca Ra Ra E Ra Cb Rb Ra E Rb", "E Ca Ra R Ra Ra"])
def test_a_whole_pass_in_one_graph_keeps_cudas_capture_rules_and_reads_the_right_blocks(m, k, script, monkeypatch):
    """Whole passes (``graphs.WHOLE_PASS``) simulated on fake CUDA streams: eager passes (E), captures (C) and
    replays (R) of two buckets' graphs (a, b), and a reset (R alone): every layer reads its own block, no copy
    races a read, and the captures keep CUDA's rules."""
    sim = _Simulation(m, k, monkeypatch)
    for step in script.split():
        if step == "R":
            sim.stream.reset()
        elif step == "E":
            sim.eager()
        else:
            (sim.capture if step[0] == "C" else sim.replay)(step[1:])
    assert sim.problems() == []
