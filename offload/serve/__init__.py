"""An offloaded model behind an OpenAI-compatible HTTP API (the ``serve`` extra: FastAPI and uvicorn).

    python scripts/serve.py --model M --gpu-memory 8GiB --max-batch 8      # then point any OpenAI client at it

Two threads: uvicorn's event loop runs the HTTP handlers (``app.py``), and the
engine thread (``engine_loop.py``) steps the row engine, so requests join the
running batch at step boundaries and leave it when they finish. ``server.py`` runs
uvicorn with the limits a server open to any client needs, ``protocol.py`` is
OpenAI's wire format, ``metrics.py`` what ``GET /metrics`` reports.

From Python:

    from offload.serve import EngineLoop, Service, ServerThread, create_app
    service = Service(EngineLoop(model, rows=8), tokenizer, "my-model", eos_ids)
    with ServerThread(create_app(service)) as server:
        ...   # server.url
"""

from .app import Service, create_app
from .engine_loop import EngineLoop
from .server import ServerThread, serve

__all__ = ["EngineLoop", "Service", "ServerThread", "create_app", "serve"]
