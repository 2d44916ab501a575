"""The HTTP side: an OpenAI-compatible FastAPI app in front of an :class:`EngineLoop`.

uvicorn's event loop runs every handler: parsing and checking a request (the chat
template and the tokenizer on worker threads), then turning the request's tokens into
text and server-sent events as they arrive. The engine thread runs the model and
nothing else; a handler never waits for a step, it waits on its own queue of tokens.

A request holds its place from acceptance to its last token. The engine has
``rows`` KV cache rows and the queue ``max_queue`` places behind them; a request
beyond both is answered 429. When a response ends early (a stop string, or a
client that closed its connection) its row is freed at the next step.

A client that half-closes its connection after a whole request is answered (see
:func:`whole_answer`); at shutdown, running answers get a grace period and then a
final event (:meth:`Service.drain`).

No request can stall the others: a body past ``max_request_bytes`` is answered 413
before it is read (:class:`BodyLimit`), the chat template and the tokenizer run on
worker threads (the tokenizer lets go of the GIL), so the event loop keeps serving
every other client while a long prompt is prepared, and a text far past the context
is refused from its beginning.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from ..errors import ConfigError, InputError
from ..inputs import unique_keys
from ..memory.budget import format_size
from ..sampling import Sampling
from ..scheduler.row_engine import Request
from ..text import IdText, TextStream, TooManyTokens
from . import protocol
from .engine_loop import EngineLoop
from .protocol import ApiError, ChatRequest, CompletionRequest, GenerationParams

log = logging.getLogger("offload.serve")

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; a chat may fill the context
HALF_CLOSED = "offload.half_closed"  # the scope extension (an asyncio.Event) set when the client half-closes
FIRST_PROBE_SECONDS, PROBE_SECONDS = 0.1, 1.0  # whitespace after a half-close: a client that has gone resets
# A prompt of 128k tokens is under 1 MiB of text or of JSON token ids; TGI's default payload limit is 2 MB.
DEFAULT_MAX_REQUEST_BYTES = 2 * 2**20


class ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


class Service:
    """What the handlers share: the engine loop, the model's text side and names, the limits."""

    def __init__(self, loop: EngineLoop, tokenizer, model_name: str, eos_ids: tuple[int, ...] = (),
                 max_queue: int = 64, aliases: tuple[str, ...] = (),
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.loop = loop
        self.metrics = loop.metrics
        self.tokenizer = tokenizer if tokenizer is not None else IdText()
        self.model_name = model_name
        self.names = {model_name, *aliases}
        self.eos_ids = tuple(eos_ids)
        self.max_queue = max_queue
        self.max_request_bytes = max_request_bytes
        self.generations: set[Generation] = set()  # accepted and not closed
        self.draining = False  # shutting down: new requests are refused
        self.max_seq_len = loop.model.max_seq_len
        self.created = int(time.time())

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise ApiError(404, f"The model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def completion_prompt(self, prompt) -> list[int]:
        """A completion's one prompt as token ids: text, or ids (alone or in a list of one). Text is tokenized:
        call it off the event loop."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, f"one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self._text_ids(lambda: self.tokenizer.encode(prompt, most=self.max_seq_len), "prompt")
        return list(prompt)

    def chat_prompt(self, messages: list) -> list[int]:
        """A conversation laid out by the chat template, as token ids (off the event loop, as above). Bad messages
        and a conversation the template refuses are the client's 400; the template failing otherwise is a 500."""
        protocol.check_roles(messages)
        try:
            return self._text_ids(lambda: self.tokenizer.apply_chat_template(messages, most=self.max_seq_len),
                                  "messages")
        except ConfigError as e:
            log.error("the chat template failed: %s", e)
            raise ApiError(500, f"{e}: the server's template is at fault, not the request") from None

    def start(self, prompt: list[int], params: GenerationParams, max_tokens: int | None, http: HttpRequest,
              prefix: str, prompt_param: str) -> "Generation":
        """Check a request, queue it, and return its generation: 400 for bad input, 429 when the queue is full.
        Without ``max_tokens`` it may fill the context."""
        stops = params.stop_strings()
        request = self._request(prompt, params, max_tokens, f"{prefix}-{uuid.uuid4().hex}", prompt_param)
        self.check_serving()
        if self.metrics.running >= self.metrics.rows + self.max_queue:
            self.metrics.rejected += 1
            raise ApiError(429, f"the server is busy: {self.metrics.rows} rows and {self.max_queue} queued "
                                "requests are taken; retry later", code="queue_full")
        generation = Generation(self, request, TextStream(self.tokenizer, stops, prompt), http)
        self.generations.add(generation)
        self.loop.submit(request, generation.sink)
        self.metrics.running += 1
        self.metrics.prompt_tokens += len(prompt)
        return generation

    def _text_ids(self, encode, param: str) -> list[int]:
        """``encode()``'s ids; a text far past the context is answered as one (400) before all of it is tokenized."""
        try:
            return encode()
        except TooManyTokens as e:
            raise self._context_error(f"more than {e.at_least}", None, param) from None
        except InputError as e:
            raise ApiError(400, str(e), param=param) from None

    def _context_error(self, prompt_tokens, max_tokens: int | None, param: str) -> ApiError:
        asked = f" and {max_tokens} completion tokens (max_tokens)" if max_tokens else ""
        return ApiError(400, f"This model's context holds {self.max_seq_len} tokens (max_seq_len), but "
                             f"{prompt_tokens} prompt tokens{asked} were asked for; shorten the prompt"
                             f"{' or lower max_tokens' if max_tokens else ''}",
                        param=param, code="context_length_exceeded")

    def check_serving(self) -> None:
        """503 while the server shuts down or when the engine thread has stopped."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if not self.loop.alive:
            raise ApiError(503, "the engine thread has stopped; see the server's log")

    async def drain(self, grace: float) -> None:
        """Before shutting down: refuse new requests, give the running ones ``grace`` seconds to finish, and end
        the rest now, each with a final event (a stream) or a 503 (a whole answer)."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self.generations and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for generation in list(self.generations):
            generation.end("the server is shutting down; the answer was cut short")

    def _request(self, prompt: list[int], params: GenerationParams, max_tokens: int | None, key: str,
                 prompt_param: str) -> Request:
        room = self.max_seq_len - len(prompt)
        if room < (max_tokens or 1):
            raise self._context_error(len(prompt), max_tokens, prompt_param)
        temperature = 1.0 if params.temperature is None else params.temperature
        # The protocol checks every range but float32's: a temperature too small for it is all Sampling refuses.
        sampling = _as_400(lambda: Sampling(temperature > 0, temperature, params.top_k or 0,
                                            1.0 if params.top_p is None else params.top_p, params.seed),
                           "temperature")
        request = Request(tuple(prompt), max_tokens or room, sampling, () if params.ignore_eos else self.eos_ids,
                          key=key)
        _as_400(lambda: self.loop.check(request, prompt_param), prompt_param)  # (the key: none of the client's)
        return request


class Generation:
    """One request as its handler sees it: tokens from the engine thread become text.

    ``close()`` gives the request back however its response ends: it frees the row of
    a request the engine has not finished and counts the outcome.
    """

    def __init__(self, service: Service, request: Request, text: TextStream, http: HttpRequest):
        self.service, self.text = service, text
        self.id = request.key
        self.prompt_tokens = len(request.prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # OpenAI's: "stop" or "length"
        self.engine_done = False  # the engine has freed the row itself
        self.failed = False
        self.closed = False
        self.events: asyncio.Queue = asyncio.Queue()
        self.half_closed: asyncio.Event | None = http.scope.get("extensions", {}).get(HALF_CLOSED)
        loop = asyncio.get_running_loop()

        def sink(token, reason) -> None:  # on the engine thread
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, (token, reason))
            except RuntimeError:  # the event loop has closed: the server is going down
                pass

        self.sink = sink
        self.watcher = asyncio.ensure_future(self._watch(http))

    async def _watch(self, http: HttpRequest) -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass
        self.events.put_nowait((None, "disconnected"))

    async def pieces(self) -> AsyncIterator[str]:
        """The new text of each token as soon as it is final; at the end ``finish_reason`` is set."""
        while self.finish_reason is None:
            token, reason = await self.events.get()
            if reason == "disconnected":
                raise ClientGone()
            if reason == "error":
                self.engine_done = self.failed = True
                raise ApiError(500, "the engine failed while generating; see the server's log")
            if reason == "ended":
                raise ApiError(503, token, code="shutting_down")
            self.completion_tokens += 1
            text = self.text.add(token) if reason != "eos" else ""  # an eos token ends the text, unshown
            if self.text.stopped:
                self.finish_reason = "stop"
            elif reason is not None:
                self.engine_done = True
                text += self.text.finish()  # the text held back (an unfinished character) may hold a stop string
                self.finish_reason = "length" if reason == "length" and not self.text.stopped else "stop"
            if text:
                yield text

    async def collect(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    def usage(self) -> dict:
        return protocol.usage(self.prompt_tokens, self.completion_tokens)

    def end(self, message: str) -> None:
        """End the answer now, with ``message`` as its error (the row is freed when the response closes)."""
        self.events.put_nowait((message, "ended"))  # the message where a token would be

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.watcher.cancel()
        if not self.engine_done:
            self.service.loop.cancel(self.id)
        outcome = "error" if self.failed else (self.finish_reason or "cancelled")
        self.service.metrics.finished[outcome] += 1
        self.service.metrics.running -= 1
        self.service.generations.discard(self)


class GenerationResponse(StreamingResponse):
    """A response written while its generation goes on; the generation is closed however the response ends."""

    def __init__(self, body: AsyncIterator, generation: Generation, media_type: str, headers: dict | None = None):
        super().__init__(body, media_type=media_type, headers=headers)
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


def event_stream(events: AsyncIterator[str], generation: Generation) -> GenerationResponse:
    """Server-sent events of a generation."""
    return GenerationResponse(events, generation, "text/event-stream",
                              {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def sse(generation: Generation, chunk: Callable[[str, str | None], dict], usage_chunk: Callable[[], dict]
              | None) -> AsyncIterator[str]:
    """A chunk per piece of text, one with the finish reason, the usage if asked for, then ``[DONE]``."""
    try:
        async for text in generation.pieces():
            yield protocol.event(chunk(text, None))
        yield protocol.event(chunk("", generation.finish_reason))
        if usage_chunk is not None:
            yield protocol.event(usage_chunk())
    except ClientGone:
        return
    except ApiError as e:
        yield protocol.event(e.body())
    yield protocol.event("[DONE]")


def create_app(service: Service, api_docs: bool = False) -> FastAPI:
    """The app; its lifespan starts the engine thread and stops it (on every rank) at shutdown. With ``api_docs``
    it also serves its OpenAPI schema at /openapi.json and pages about it at /docs."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.loop.start()
        yield
        service.loop.stop()

    app = FastAPI(title="offload", lifespan=lifespan, openapi_url="/openapi.json" if api_docs else None,
                  docs_url="/docs" if api_docs else None, redoc_url=None)
    app.router.route_class = UniqueKeysRoute  # (before any route is made)
    app.add_middleware(BodyLimit, limit=service.max_request_bytes)
    app.state.drain = service.drain  # what offload's Server awaits before uvicorn shuts down
    add_error_handlers(app)
    name = service.model_name

    def get(path: str):
        """A GET route that answers HEAD too, with the same headers and no body (curl -I, health checkers)."""
        def register(handler):
            app.head(path, include_in_schema=False)(handler)
            return app.get(path)(handler)
        return register

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        body.refuse_unsupported()
        service.check_model(body.model)
        prompt = await run_in_threadpool(service.completion_prompt, body.prompt)
        generation = service.start(prompt, body, body.max_tokens or COMPLETION_MAX_TOKENS, http, "cmpl", "prompt")
        if body.stream:
            chunk = lambda text, reason: protocol.completion_chunk(generation.id, name, text, reason)  # noqa: E731
            usage = lambda: protocol.usage_chunk(generation.id, name, "text_completion", generation.usage())  # noqa
            return event_stream(sse(generation, chunk, usage if body.include_usage else None), generation)
        return await whole_answer(generation, lambda text: protocol.completion(
            generation.id, name, text, generation.finish_reason, generation.usage()))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HttpRequest):
        body.refuse_unsupported()
        service.check_model(body.model)
        if None not in (body.max_tokens, body.max_completion_tokens) and body.max_tokens != body.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ; give one", param="max_tokens")
        prompt = await run_in_threadpool(service.chat_prompt, body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        generation = service.start(prompt, body, max_tokens, http, "chatcmpl", "messages")
        if body.stream:
            usage = lambda: protocol.usage_chunk(generation.id, name, "chat.completion.chunk",  # noqa: E731
                                                 generation.usage())
            return event_stream(sse(generation, _chat_deltas(generation.id, name),
                                    usage if body.include_usage else None), generation)
        return await whole_answer(generation, lambda text: protocol.chat_completion(
            generation.id, name, text, generation.finish_reason, generation.usage()))

    @get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(service)]}

    @get("/v1/models/{model:path}")
    async def model(model: str):
        service.check_model(model)
        return _model_card(service)

    @get("/health")
    async def health():
        service.check_serving()
        return {"status": "ok"}

    @get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


async def whole_answer(generation: Generation, answer: Callable[[str], dict]) -> Response:
    """The answer of a request that is not streamed: ``answer(text)`` once the text is complete.

    A client that half-closes its connection after its request may be waiting for the answer or
    may have closed altogether: from here the two look the same. So on a half-close the answer
    starts at once (200 and its headers) and whitespace, which JSON allows before a value, follows
    until the text is complete: a client that has gone answers those bytes with a reset, which
    frees its row; one that waits reads its answer (or, should the engine fail meanwhile, OpenAI's
    error body under that 200).

    However the wait ends, the generation is closed (its row freed): by the streamed answer that a half-close
    starts, when that ends, else here, a handler cancelled while it waits (its server shutting down) included.
    """
    collecting = asyncio.ensure_future(generation.collect())
    streamed = False
    try:
        if await _half_closed_first(generation, collecting):
            response = GenerationResponse(_answer_after_whitespace(collecting, answer), generation, "application/json")
            streamed = True  # the response closes the generation when it ends
            return response
        text = await collecting
    except ClientGone:
        return Response(status_code=499)  # nobody reads it: the client has gone
    finally:
        if not streamed:
            generation.close()
    return JSONResponse(answer(text))


async def _half_closed_first(generation: Generation, collecting: asyncio.Future) -> bool:
    """Whether the client half-closes its connection before the text is complete."""
    if generation.half_closed is None:  # served by a server that does not say (a plain uvicorn)
        return False
    half_closed = asyncio.ensure_future(generation.half_closed.wait())
    try:
        await asyncio.wait({collecting, half_closed}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        collecting.cancel()
        raise
    finally:
        half_closed.cancel()
    return not collecting.done()


async def _answer_after_whitespace(collecting: asyncio.Future, answer: Callable[[str], dict]) -> AsyncIterator[bytes]:
    try:
        wait = FIRST_PROBE_SECONDS
        while not collecting.done():
            await asyncio.wait({collecting}, timeout=wait)
            if not collecting.done():
                yield b" "
            wait = PROBE_SECONDS
        try:
            body = answer(collecting.result())
        except ClientGone:
            return
        except ApiError as e:
            body = e.body()
        yield JSONResponse(body).body
    finally:
        collecting.cancel()  # the response ended first (its client has gone)


def _chat_deltas(id: str, model: str) -> Callable[[str, str | None], dict]:
    """Chat chunks: the first carries the assistant's role, the last (with the finish reason) an empty delta."""
    first = True

    def chunk(text: str, finish_reason: str | None) -> dict:
        nonlocal first
        delta = {"role": "assistant", "content": text} if first else ({} if finish_reason else {"content": text})
        first = False
        return protocol.chat_chunk(id, model, delta, finish_reason)

    return chunk


def _model_card(service: Service) -> dict:
    return {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "offload",
            "max_model_len": service.max_seq_len}


def _as_400(make, param: str | None):
    try:
        return make()
    except InputError as e:
        raise ApiError(400, str(e), param=param) from None


# ---------------------------------------------------------------------- errors: OpenAI's body, never a traceback


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, e: RequestValidationError):
        return JSONResponse(_validation_error(e.errors(), request.headers.get("content-type")).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, _http_error_message(e)).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.exception("internal error")
        return JSONResponse(ApiError(500, f"internal error ({type(e).__name__})").body(), status_code=500)


class UniqueKeysRequest(HttpRequest):
    """A request whose JSON body may not give a key twice in one object: ``json`` would keep the last value without
    a word, so the request would do what its sender may not have meant (and another reader of it, a proxy that
    keeps the first, would see another request). A prompt file's records are read so too."""

    async def json(self):
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=unique_keys)
        return self._json


class UniqueKeysRoute(APIRoute):
    """A route whose handler reads its body as :class:`UniqueKeysRequest` does (an InputError there is FastAPI's
    400, worded by :func:`_http_error_message`)."""

    def get_route_handler(self):
        handle = super().get_route_handler()

        async def handler(request: HttpRequest):
            return await handle(UniqueKeysRequest(request.scope, request.receive))

        return handler


class BodyLimit:
    """ASGI middleware: a request body past ``limit`` bytes is answered 413 without being read, at once when its
    Content-Length says so, else as soon as the bytes received pass the limit (the rest is discarded as it comes).

    FastAPI's own ``max_body_size`` answers the first case with a plain-text body; this one answers both with
    OpenAI's error body.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await self._too_large()(scope, receive, send)
        received = 0

        async def receive_within_limit():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self._too_large_message())  # answered by the app's error handler
            return message

        await self.app(scope, receive_within_limit, send)

    def _too_large(self) -> JSONResponse:
        return JSONResponse(ApiError(413, self._too_large_message()).body(), status_code=413)

    def _too_large_message(self) -> str:
        return (f"the request body is larger than this server takes ({format_size(self.limit)}; "
                "serve.py --max-request-bytes)")


def _http_error_message(e: HTTPException) -> str:
    """Starlette's message; for a body that FastAPI could not read as JSON other than by a syntax error (its
    message says only "There was an error parsing the body"), why."""
    cause = e.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return (f"the request body is not valid JSON (not UTF-8: byte {cause.object[cause.start]:#04x} at position "
                f"{cause.start})")
    if isinstance(cause, InputError):  # a key given twice
        return f"the request body: {cause}"
    if isinstance(cause, RecursionError):
        return "the request body is not valid JSON (arrays or objects nested too deeply)"
    return str(e.detail)


def _validation_error(errors, content_type: str | None) -> ApiError:
    """pydantic's first complaint as one OpenAI-style error."""
    first = errors[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = where[0] if where else None
    if first["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})")
    if first["type"] == "string_unicode":  # a key or value with an unpaired surrogate ("\ud800" in the JSON)
        return ApiError(400, f"{'.'.join(where) or 'the request body'}: not valid Unicode (an unpaired surrogate)",
                        param=param)
    if not where and not _is_json(content_type):
        # Read as JSON only when it says so, as FastAPI does: a browser may send a form type to another site
        # without asking first, and a server on localhost should not take such a request (CSRF).
        sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        return ApiError(400, "the request body must be a JSON object of parameters, sent with Content-Type: "
                             f"application/json; this one came with {sent} (curl -d needs -H "
                             "'Content-Type: application/json')")
    if not where:
        return ApiError(400, "the request body must be a JSON object of parameters")
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {'.'.join(where)}", param=param)
    if first["type"] == "missing":
        return ApiError(400, f"'{'.'.join(where)}' is required", param=param)
    if param in protocol.UNION_TYPES and len(where) > 1:  # where[1] names the type that pydantic tried first
        return ApiError(400, f"{param} must be {protocol.UNION_TYPES[param]}", param=param)
    return ApiError(400, f"{'.'.join(where)}: {first['msg']}", param=param)


def _is_json(content_type: str | None) -> bool:
    """application/json or application/*+json, with any parameters."""
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
