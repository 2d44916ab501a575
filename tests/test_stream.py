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
