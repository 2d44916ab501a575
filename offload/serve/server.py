"""Serving the app: uvicorn, with what a server open to any client needs besides.

* **A deadline to send a request.** uvicorn's keep-alive timeout closes a connection that
  sends nothing, but one that sends a byte now and then (slowloris) would hold its place
  for ever. :class:`Connection` gives a client ``request_timeout`` seconds, from its
  connection or from the end of its previous answer, to send a whole request (head and body).
* **Half-closed clients answered.** A client that shuts down its sending side after a whole
  request (``shutdown(SHUT_WR)``, as ``nc -N`` and many scripts do) still reads the answer;
  uvicorn would close the connection and cancel the request. :class:`Connection` keeps the
  answering side open and tells the app (the ``HALF_CLOSED`` event of the request's scope):
  a client that closed altogether looks the same from here, so the app starts a whole
  answer at once to find out (``app.whole_answer``).
* **A shutdown that ends every answer.** On SIGTERM or SIGINT, :class:`Server` first lets
  the service drain (``Service.drain``): new requests are answered 503, running ones get
  ``grace`` seconds, and the rest end with a final event (a stream) or a 503 (a whole
  answer), instead of being cut off when uvicorn's own graceful period runs out.

These rest on uvicorn's h11 protocol class, which a ``uvicorn.Config`` may name (``http=``).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import HALF_CLOSED

REQUEST_TIMEOUT = 30.0  # seconds to send a whole request: 2 MiB (the default body limit) at 70 KB/s
GRACE = 5.0  # seconds that running answers get to finish at shutdown
FINAL_WRITES = 5.0  # then uvicorn's own graceful period, for the final events to go out


class Connection(H11Protocol):
    """One HTTP/1.1 connection: uvicorn's, with a deadline to send each request and half-closes answered."""

    def __init__(self, *args, request_timeout: float = REQUEST_TIMEOUT, **kwargs):
        super().__init__(*args, **kwargs)
        self.request_timeout = request_timeout
        self.request_deadline = None  # asyncio.TimerHandle while a request is awaited

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_request()

    def handle_events(self) -> None:
        super().handle_events()
        if self.scope is not None:  # each request's scope gets its event (before its task first runs)
            self.scope.setdefault("extensions", {}).setdefault(HALF_CLOSED, asyncio.Event())
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._cancel_deadline()  # the whole request is in (or the connection is ending)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self._await_request()  # the next request on this connection (or the rest of a refused body)

    def eof_received(self) -> bool | None:
        """The client will send nothing more. After a whole request it may still be reading: keep the answering
        side open (True), answer, then close. Otherwise close as uvicorn does."""
        answering = self.cycle is not None and not self.cycle.response_complete
        if not (answering and self.conn.their_state is h11.DONE):
            return None
        self.cycle.keep_alive = False
        self.scope["extensions"][HALF_CLOSED].set()
        return True

    def connection_lost(self, exc) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _await_request(self) -> None:
        self._cancel_deadline()
        self.request_deadline = self.loop.call_later(self.request_timeout, self._too_slow)

    def _cancel_deadline(self) -> None:
        if self.request_deadline is not None:
            self.request_deadline.cancel()
            self.request_deadline = None

    def _too_slow(self) -> None:
        """No whole request in time: close without an answer (a request whose head is in learns that its client
        has gone)."""
        self.request_deadline = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection that did not send a whole request in %.0f s", self.request_timeout)
            self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server, which lets the app drain (``app.state.drain(grace)``) before it shuts down."""

    def __init__(self, config: uvicorn.Config, grace: float = GRACE):
        super().__init__(config)
        self.grace = grace

    async def shutdown(self, sockets=None) -> None:
        drain = getattr(self.config.app.state, "drain", None)
        if drain is not None:
            await drain(self.grace)
        await super().shutdown(sockets)


def server_config(app: FastAPI, host: str, port: int, log_level: str, request_timeout: float = REQUEST_TIMEOUT,
                  **uvicorn_options) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=functools.partial(Connection, request_timeout=request_timeout),
                          timeout_graceful_shutdown=FINAL_WRITES, **uvicorn_options)


def serve(app: FastAPI, host: str, port: int, log_level: str = "info", request_timeout: float = REQUEST_TIMEOUT,
          grace: float = GRACE) -> None:
    """Serve until interrupted (SIGINT or SIGTERM); answers still running get ``grace`` seconds to finish.

    As ``uvicorn.run``: after the shutdown, uvicorn raises the signal that caused it again, with the handler
    that was there before; a SIGINT's KeyboardInterrupt ends the serving, a SIGTERM ends the process."""
    try:
        Server(server_config(app, host, port, log_level, request_timeout), grace).run()
    except KeyboardInterrupt:
        pass


class ServerThread:
    """``app`` served by uvicorn on a thread of this process, on a free port (tests, benchmarks, notebooks).

        with ServerThread(create_app(service)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")

    ``uvicorn_options`` go to ``uvicorn.Config`` (``lifespan="off"`` serves an app whose engine thread
    another server already runs).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 request_timeout: float = REQUEST_TIMEOUT, grace: float = GRACE, **uvicorn_options):
        self.host = host
        self.server = Server(server_config(app, host, port, log_level, request_timeout, **uvicorn_options), grace)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.url = None

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see its log)")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def stop(self) -> None:
        """Stop as on SIGTERM (running answers get ``grace`` seconds) and wait for the thread."""
        self.server.should_exit = True
        self.thread.join()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
