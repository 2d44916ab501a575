"""``CheckpointSource.read`` reads a tensor's rows with read() into their place (``_read_rows``): every way of
reading gives what cutting the memory-mapped tensor gives (``_cut`` + ``copy_piece``, the path kept for column
shards)."""

import errno
import functools
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from offload.errors import CheckpointError
from offload.models import checkpoint
from offload.models.blocks import TensorSpec
from offload.models.checkpoint import CheckpointSource
from offload.models.parallel import REPLICATED, Shard

TENSORS = {
    "matrix": torch.randn(37, 11).to(torch.bfloat16),
    "wide": torch.randn(5, 300, dtype=torch.float32),
    "vector": torch.randn(29, dtype=torch.float16),
    "bytes": torch.randint(0, 256, (13, 7), dtype=torch.uint8),
}


@pytest.fixture
def source(tmp_path):
    save_file(TENSORS, str(tmp_path / "model.safetensors"))
    s = CheckpointSource(tmp_path)
    yield s
    s.close()


def spec(name, shard=REPLICATED, dtype=None, rows=None):
    full = tuple(TENSORS[name].shape)
    local = full if shard.dim is None else (shard.stop - shard.start, *full[1:]) if shard.dim == 0 \
        else (full[0], shard.stop - shard.start)
    if rows is not None:
        local = (rows, *local[1:])
    return TensorSpec(name, local, full, name, shard, dtype or TENSORS[name].dtype, 0)


def mapped(source, s, name, out):
    """What the memory-map path puts in ``out``."""
    checkpoint.copy_piece(out, checkpoint._cut(source._open(source._file_of[name]).get_slice(name), s))
    return out


CASES = [  # name, shard, dtype of the destination, rows of the destination (padding past the piece)
    ("matrix", REPLICATED, None, None),
    ("matrix", Shard(0, 8, 21), None, None),
    ("matrix", Shard(0, 30, 37), torch.float32, 10),  # cast, and 3 rows of padding zeroed
    ("wide", Shard(0, 1, 4), torch.bfloat16, None),
    ("vector", REPLICATED, None, None),
    ("vector", Shard(0, 3, 17), torch.float32, None),
    ("bytes", Shard(0, 2, 9), None, None),
]


READS = [(8 << 20, 4), (24, 3), (24, 1)]  # (READ_PIECE, READ_THREADS): 24 bytes, a range in pieces read at once


@pytest.mark.parametrize("name, shard, dtype, rows", CASES)
@pytest.mark.parametrize("staging", [64 << 20, 40])  # 40 bytes: a row or a few at a time
@pytest.mark.parametrize("piece, threads", READS)
def test_reading_rows_from_the_file_equals_cutting_the_memory_map(source, monkeypatch, name, shard, dtype, rows,
                                                                   staging, piece, threads):
    monkeypatch.setattr(checkpoint, "STAGING", staging)
    monkeypatch.setattr(checkpoint, "READ_PIECE", piece)
    monkeypatch.setattr(checkpoint, "READ_THREADS", threads)
    s = spec(name, shard, dtype, rows)
    out = torch.full(s.shape, 7, dtype=s.dtype)  # padding rows must come out zero, not 7
    source.read(s, name, out)
    expected = mapped(source, s, name, torch.full(s.shape, 7, dtype=s.dtype))
    assert torch.equal(out, expected)
    assert source._read_rows(s, name, torch.empty(s.shape, dtype=s.dtype))  # read by this path, not the map


def test_a_piece_of_columns_is_cut_from_the_memory_map(source):
    s = spec("wide", Shard(1, 100, 250))
    assert not source._read_rows(s, "wide", torch.empty(s.shape))
    out = torch.empty(s.shape)
    source.read(s, "wide", out)
    assert torch.equal(out, TENSORS["wide"][:, 100:250])


@pytest.mark.parametrize("piece, threads", READS)
def test_a_file_cut_short_is_a_checkpoint_error(source, tmp_path, monkeypatch, piece, threads):
    monkeypatch.setattr(checkpoint, "READ_PIECE", piece)
    monkeypatch.setattr(checkpoint, "READ_THREADS", threads)
    entry = source._entry("wide")
    with open(tmp_path / "model.safetensors", "r+b") as f:  # safe_open checked the size already: cut it after
        f.truncate(entry.start + 100)
    s = spec("wide")
    with pytest.raises(CheckpointError, match="ends inside tensor 'wide'"):
        source.read(s, "wide", torch.empty(s.shape))


def test_a_piece_that_fails_leaves_no_read_running_into_the_destination(source, monkeypatch):
    """A range read in two pieces by two threads, the first failing (an I/O error) while the second is still being
    read: the CheckpointError comes once no thread reads into the destination any more (the caller has it back with
    the error), not while the second piece is still being written into it."""
    monkeypatch.setattr(checkpoint, "READ_PIECE", 24)
    monkeypatch.setattr(checkpoint, "READ_THREADS", 2)
    read, started, finished = checkpoint._read_fully, threading.Barrier(2), []

    def failing_first(fd, buffer, offset):
        started.wait(timeout=10)  # both pieces under way
        if offset == entry.start:
            raise OSError(errno.EIO, "Input/output error")
        time.sleep(0.3)
        filled = read(fd, buffer, offset)
        finished.append(offset)
        return filled

    monkeypatch.setattr(checkpoint, "_read_fully", failing_first)
    entry = source._entry("bytes")
    with pytest.raises(CheckpointError, match="cannot read tensor 'bytes' \\(Input/output error\\)"):
        source._reads.into(source._file_of["bytes"], entry.start, torch.empty(48, dtype=torch.uint8), "bytes")
    assert finished == [entry.start + 24]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, shard, dtype, rows", CASES)
@pytest.mark.parametrize("staging", [64 << 20, 40])
@pytest.mark.parametrize("pinned", [0, 1 << 30])  # no room in the host budget: one pageable buffer
def test_pieces_sent_to_a_gpu_equal_the_memory_map(source, monkeypatch, name, shard, dtype, rows, staging, pinned):
    monkeypatch.setattr(checkpoint, "STAGING", staging)
    source._reads.allow_pinned(pinned)
    s = spec(name, shard, dtype, rows)
    out = torch.full(s.shape, 7, dtype=s.dtype, device="cuda")
    source.read(s, name, out)
    assert bool(source._reads.pinned) == (pinned > 0)  # two buffers in turn, each copy queued
    expected = mapped(source, s, name, torch.full(s.shape, 7, dtype=s.dtype))
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])  # on a GPU: checked in the staging buffer
@pytest.mark.parametrize("dtype", [None, torch.float32])  # read into place, or through the staging buffer (a cast)
@pytest.mark.parametrize("staging", [64 << 20, 40])
def test_a_nan_read_from_the_file_is_a_checkpoint_error(tmp_path, monkeypatch, device, dtype, staging):
    monkeypatch.setattr(checkpoint, "STAGING", staging)
    bad = TENSORS["matrix"].clone()
    bad[30, 4] = float("nan")
    save_file({"matrix": bad}, str(tmp_path / "model.safetensors"))
    source = CheckpointSource(tmp_path)
    s = spec("matrix", dtype=dtype)
    with pytest.raises(CheckpointError, match="'matrix' holds NaN or infinite values"):
        source.read(s, "matrix", torch.empty(s.shape, dtype=s.dtype, device=device))
    source.close()


class FakeGPUs:
    """CUDA as the staging buffers see it, on a CPU: a copy queued on a GPU's stream runs only when the host waits for
    that stream (an event recorded on it, or that GPU synchronized), so a buffer reused or unpinned before its copy
    has run shows (the copy then reads what came after)."""

    def __init__(self, monkeypatch, current: int = 0):
        self.current, self.queued, self.unpinned_early = current, {}, 0
        gpus = self

        class Event:
            def __init__(self, **kw):
                self.stream = None

            def record(self, stream=None):
                self.stream = stream or gpus.stream()

            def synchronize(self):
                gpus.run(self.stream)

        class Pinned:  # PinnedMemory: closing it synchronizes the current GPU only (``host._unregister``)
            def __init__(self, nbytes):
                self.tensor = torch.zeros(nbytes, dtype=torch.uint8)

            def close(self):
                gpus.run(gpus.stream())
                gpus.unpinned_early += sum(map(len, gpus.queued.values()))

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "current_stream", self.stream)
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)
        monkeypatch.setattr(checkpoint, "PinnedMemory", Pinned)

    def stream(self, device=None) -> str:
        return f"stream of cuda:{self.current if device is None else torch.device(device).index}"

    def run(self, stream: str) -> None:
        for copy in self.queued.pop(stream, []):
            copy()

    def on(self, index: int, like: torch.Tensor):
        """A destination on GPU ``index``: its copies from pinned memory queued on that GPU's current stream."""
        gpus = self

        class OnGPU:
            is_cuda, device, data = True, torch.device("cuda", index), torch.zeros_like(like)

            def copy_(self, piece, non_blocking=False):
                copy = functools.partial(self.data.copy_, piece)
                if non_blocking:
                    gpus.queued.setdefault(gpus.stream(self.device), []).append(copy)
                else:
                    copy()

        return OnGPU()


@pytest.mark.parametrize("gpu", [0, 1])  # the current GPU, or a peer GPU (the plan's peer tier) while 0 is current
def test_a_staging_buffer_is_reused_and_unpinned_only_once_its_copy_has_run(monkeypatch, gpu):
    gpus = FakeGPUs(monkeypatch, current=0)
    monkeypatch.setattr(checkpoint, "STAGING", 64)
    reads = checkpoint.FileReads()
    reads.allow_pinned(1 << 20)
    outs = [gpus.on(gpu, torch.empty(16, dtype=torch.uint8)) for _ in range(5)]
    for i, out in enumerate(outs):  # as _read_rows sends a tensor's pieces: two buffers in turn
        piece = reads.staged(16)
        piece.fill_(i)
        reads.send(piece, out)
    assert len(reads.pinned) == 2
    reads.close()
    assert gpus.unpinned_early == 0  # no copy read a buffer after it was unpinned
    for stream in list(gpus.queued):
        gpus.run(stream)
    assert [int(out.data[0]) for out in outs] == [0, 1, 2, 3, 4]  # none read a piece that came after its own


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_pieces_sent_to_a_peer_gpu_equal_the_memory_map(source, monkeypatch):
    """A block of the plan's peer tier is read while the compute GPU is current: its copies run on the peer's stream."""
    monkeypatch.setattr(checkpoint, "STAGING", 40)  # a row at a time: the two buffers reused many times
    source._reads.allow_pinned(1 << 30)
    s = spec("matrix")
    with torch.cuda.device(0):
        out = torch.full(s.shape, 7, dtype=s.dtype, device="cuda:1")
        source.read(s, "matrix", out)
        source.close()  # the buffers unpinned: every copy has run
    assert torch.equal(out.cpu(), TENSORS["matrix"])


def test_staging_falls_back_to_a_pageable_buffer_where_pinning_is_refused(monkeypatch):
    """Pinned staging buffers only speed a load up: where the system refuses to pin them, one pageable buffer."""
    from offload.errors import OffloadError

    def refused(nbytes):
        raise OffloadError("could not pin")

    monkeypatch.setattr(checkpoint.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(checkpoint, "PinnedMemory", refused)
    reads = checkpoint.FileReads()
    reads.allow_pinned(1 << 30)
    buffer = reads.staged(100)
    assert buffer.numel() == 100 and not reads.pinned and len(reads.buffers) == 1
    reads.close()
