#!/usr/bin/env python3
"""Run a model larger than the GPU: one prompt, or a JSONL batch file. See ``--help``.

With no arguments it runs a small built-in model (random weights) under a
memory budget that forces half of its layers to stream from host memory.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run() -> int:
    try:
        from offload.cli import main  # importing torch takes seconds: Ctrl-C often lands here
    except KeyboardInterrupt:
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
