#!/usr/bin/env python3
"""Run a model larger than the GPU: one prompt, or a JSONL batch file. See ``--help``.

With no arguments it runs a small built-in model (random weights) under a
memory budget that forces half of its layers to stream from host memory.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run() -> int:
    # Importing torch takes seconds, so Ctrl-C often lands there, where a library's bare `except:` may swallow
    # the KeyboardInterrupt: while importing, Ctrl-C ends the process at once (there is nothing to clean up).
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    from offload.cli import main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    return main()


if __name__ == "__main__":
    sys.exit(run())
