#!/usr/bin/env python3
"""Serve a model larger than the GPU over an OpenAI-compatible HTTP API. See ``--help``.

With no --model it serves the small built-in demo model (random weights).
Needs the serve extra: pip install -e ".[serve]".
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    from offload.serve.cli import main  # noqa: E402
except ModuleNotFoundError as e:
    if e.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
        raise
    print(f"serve: error: {e.name} is missing; install the serve extra: pip install -e \".[serve]\"", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
