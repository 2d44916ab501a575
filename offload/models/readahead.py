"""Checkpoint bytes read from disk ahead of the loader, so that reading and copying overlap.

A load copies each tensor from the file's pages into its place. Left alone, the disk reads
only what the copy faults in (and the kernel's readahead of it), so it idles while the
loader does anything else: pinning tens of GB of host memory before the first copy takes
seconds. A cold load of llama-2-70b in int4 took 17.6 s where reading its files took 13.9
(an H200, 2026-12-05). On a CPU machine's disk, copying from the pages kept the disk near
its rate; with a second's pause before the copies (as pinning takes), reading ahead saved
most of the second (docs/benchmarks.md, ninth session).

:class:`Readahead` runs beside the loader: a thread walks the byte ranges the loader
will read, in its order, and asks the kernel to read each into the page cache
(``posix_fadvise(WILLNEED)``: large reads, queued, no bytes copied into this process),
staying at most ``ahead`` bytes past the range the loader is copying. The loader says
where it is with :meth:`Readahead.reached`. Where the system has no ``posix_fadvise``
nothing runs, and loading reads as before.
"""

from __future__ import annotations

import os
import threading
from itertools import accumulate
from pathlib import Path

import psutil

from .. import switches

# OFFLOAD_READ_AHEAD=0 asks for nothing (read at import): a load then reads as the loader reaches each range.
ON = switches.choice("OFFLOAD_READ_AHEAD", switches.ON_OFF, True)
# The most bytes asked for past the loader's place (and at most a quarter of the free memory): the disk reads on
# while host memory is pinned (the loader's place stays 0 meanwhile: seconds for tens of GB) and while it copies.
AHEAD = 8 * 2**30
CHUNK = 64 * 2**20  # one request to the kernel (a thread asked to stop stops between requests)


class Readahead:
    """Asks for ``ranges`` (``name -> (file, start, end)``, in the order the loader reads them) to be read into the
    page cache, at most ``ahead`` bytes past the range the loader last said it :meth:`reached` (by default
    ``AHEAD`` or a quarter of the free memory, the less)."""

    def __init__(self, ranges: dict[str, tuple[Path, int, int]], ahead: int | None = None):
        self.order = {name: i for i, name in enumerate(ranges)}
        self.ranges = list(ranges.values())
        self.ahead = ahead if ahead is not None else min(AHEAD, psutil.virtual_memory().available // 4)
        self.starts = [0, *accumulate(end - start for _, start, end in self.ranges)]  # of range i, in the reading
        self.place = 0  # bytes of the reading before the range the loader is copying
        self.stopping = False
        self.changed = threading.Condition()
        self.thread = None
        if self.ranges and ON and hasattr(os, "posix_fadvise"):
            self.thread = threading.Thread(target=self._run, name="offload-readahead", daemon=True)
            self.thread.start()

    def reached(self, name: str) -> None:
        """The loader is copying range ``name`` (one it did not announce: nothing changes)."""
        i = self.order.get(name)
        if i is None:
            return
        with self.changed:
            if self.starts[i] > self.place:
                self.place = self.starts[i]
                self.changed.notify()

    def close(self) -> None:
        """Stop asking (what was asked for is read anyway) and wait for the thread."""
        with self.changed:
            self.stopping = True
            self.changed.notify()
        if self.thread is not None:
            self.thread.join()

    def _run(self) -> None:
        files: dict[Path, int] = {}
        try:
            for i, (file, start, end) in enumerate(self.ranges):
                for offset in range(start, end, CHUNK):
                    if not self._may_ask(self.starts[i] + offset - start):
                        return
                    if file not in files:
                        files[file] = os.open(file, os.O_RDONLY)
                    os.posix_fadvise(files[file], offset, min(CHUNK, end - offset), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only a hint: the loader reads the file itself and reports what goes wrong
        finally:
            for fd in files.values():
                os.close(fd)

    def _may_ask(self, at: int) -> bool:
        """Wait until byte ``at`` of the reading is within ``ahead`` of the loader; False once stopping."""
        with self.changed:
            self.changed.wait_for(lambda: self.stopping or at - self.place < self.ahead)
            return not self.stopping
