"""Checkpoint bytes read from disk ahead of the loader (``offload/models/readahead.py``): which byte ranges are
asked for, in what order, how far ahead, and that they are the bytes the loader then reads."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from safetensors import safe_open

import offload
from offload.gguf import GGUFFiles, write_q4_k_m_like
from offload.models import checkpoint, readahead
from offload.models.checkpoint import _header
from offload.models.readahead import Readahead

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="the system has no posix_fadvise")


@pytest.fixture
def asked(monkeypatch):
    """The (offset, length) of every request to the kernel, as they are made."""
    calls, changed = [], threading.Condition()

    def record(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_WILLNEED
        with changed:
            calls.append((offset, length))
            changed.notify_all()

    def wait_for(n):
        with changed:
            assert changed.wait_for(lambda: len(calls) >= n, timeout=10), calls
        time.sleep(0.05)  # room for a request that should not come
        return list(calls)

    monkeypatch.setattr(readahead.os, "posix_fadvise", record)
    return wait_for


def test_ranges_are_asked_for_in_the_loaders_order_and_no_further_ahead_than_allowed(tmp_path, monkeypatch, asked):
    monkeypatch.setattr(readahead, "CHUNK", 128)
    file = tmp_path / "weights"
    file.write_bytes(bytes(1000))
    ahead = Readahead({"a": (file, 0, 100), "b": (file, 600, 1000), "c": (file, 100, 300)}, ahead=200)
    try:
        # the second range starts at byte 100 of the reading, its second chunk at 228: too far ahead
        assert asked(2) == [(0, 100), (600, 128)]
        ahead.reached("never announced")  # read, but not announced: the place stays
        assert asked(2) == [(0, 100), (600, 128)]
        ahead.reached("b")  # the loader is at byte 100 of the reading: bytes before 300 of it may be asked for
        assert asked(3) == [(0, 100), (600, 128), (728, 128)]
        ahead.reached("c")  # at byte 500: everything, in the reading's order
        assert asked(7) == [(0, 100), (600, 128), (728, 128), (856, 128), (984, 16), (100, 128), (228, 72)]
    finally:
        ahead.close()
    assert not ahead.thread.is_alive()


def test_closing_stops_a_thread_that_waits_for_the_loader(tmp_path, asked):
    file = tmp_path / "weights"
    file.write_bytes(bytes(100))
    ahead = Readahead({"a": (file, 0, 50), "b": (file, 50, 100)}, ahead=10)
    assert asked(1) == [(0, 50)]
    ahead.close()
    assert not ahead.thread.is_alive() and asked(1) == [(0, 50)]


def test_a_safetensors_files_header_gives_its_tensors_bytes_dtypes_and_shapes(tiny):
    for file in sorted(tiny.glob("*.safetensors")):
        data = file.read_bytes()
        with safe_open(str(file), framework="pt") as f:
            stored = _header(file)
            assert set(stored) == set(f.keys())
            for name, s in stored.items():
                tensor = f.get_tensor(name)
                assert data[s.start:s.end] == tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                assert f.get_slice(name).get_dtype() == s.dtype and tuple(tensor.shape) == s.shape


def test_a_load_asks_for_every_tensor_it_reads_before_reading_it(tiny, monkeypatch):
    made = []

    class Spy(Readahead):
        def __init__(self, ranges, ahead=None):
            self.reached_in_order = []
            made.append(self)
            super().__init__(ranges, ahead)

        def reached(self, name):
            self.reached_in_order.append(self.order[name])
            super().reached(name)

    monkeypatch.setattr(checkpoint, "Readahead", Spy)
    model = offload.load_model(tiny, dtype=torch.float32, progress=False, max_batch=1, max_seq_len=32)
    model.close()
    (spy,) = made
    everything = {(file, s.start, s.end) for file in tiny.glob("*.safetensors") for s in _header(file).values()}
    assert set(spy.ranges) == everything  # the tiny model reads every tensor of its checkpoint, each once
    assert spy.reached_in_order == sorted(spy.reached_in_order) and set(spy.reached_in_order) == set(
        range(len(spy.ranges)))
    assert not spy.thread.is_alive()  # closed with the source


def test_a_gguf_tensors_span_holds_its_bytes(tmp_path):
    config = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path / "q4km.gguf"
    write_q4_k_m_like(path, config, seed=3)
    files = GGUFFiles(path)
    data = path.read_bytes()
    for stored in files.tensors.values():
        start, end = stored.span
        assert data[start:end] == stored.data.tobytes()
    files.close()
