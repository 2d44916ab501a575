"""OpenAI's wire format: the request bodies the server accepts and the JSON it answers with.

Requests are pydantic models, checked strictly (a string where a number belongs
is an error, not a number). Parameters of OpenAI's API that the engine has no
counterpart for are accepted only at the value that changes nothing (``n=1``,
``logprobs`` absent, penalties 0, ...); any other value is answered 400, naming the
parameter, as is a parameter OpenAI does not have. ``top_k`` and ``ignore_eos`` are
extensions, as in vLLM.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .. import chat
from ..errors import InputError

# Parameter -> the values that change nothing, which are accepted (and ignored).
UNSUPPORTED = {
    "n": (1,),
    "best_of": (1,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "echo": (False,),
    "suffix": ("",),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "parallel_tool_calls": (True, False),
}


# What a parameter of several types may be: a value of none of them is told this, not pydantic's complaint about the
# first type alone ("prompt.str: Input should be a valid string" for token ids with a float among them).
UNION_TYPES = {"prompt": "a string, token ids (a list of integers), or a list of one of them",
               "stop": "a string or a list of strings"}

MAX_STOPS, MAX_STOP_CHARS = 4, 256  # stop strings a request may give (OpenAI: four), and their length


def check_roles(messages: list) -> None:
    """Refuse a message whose role OpenAI's API does not have (``chat.check_roles``): the client's 400."""
    try:
        chat.check_roles(messages)
    except InputError as e:
        raise ApiError(400, str(e), param="messages") from None


class ApiError(Exception):
    """An answer other than 200, with OpenAI's error body."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class GenerationParams(BaseModel):
    """What completions and chat completions share. None stands for the default, as in OpenAI's API."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    # JSON parsers take NaN and Infinity: refused as not finite, rather than as out of range
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)  # default 1; 0 is greedy
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)  # extension: 0 keeps every token
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False  # extension: generate max_tokens tokens whatever comes
    user: str | None = None  # accepted, not used

    n: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None

    def refuse_unsupported(self) -> None:
        if self.stream_options is not None and not self.stream:  # OpenAI's answer too: the options would do nothing
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
        for name in self.model_fields_set & UNSUPPORTED.keys():
            value = getattr(self, name)
            if value is not None and not any(_same(value, ok) for ok in UNSUPPORTED[name]):
                raise ApiError(400, f"{name}={json.dumps(value)} is not supported by this server", param=name)

    def stop_strings(self) -> list[str]:
        """At most ``MAX_STOPS`` of at most ``MAX_STOP_CHARS`` characters (OpenAI's limit of four): each new token's
        text is checked against every one on the event loop, so a long list would slow every client."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise ApiError(400, "stop strings must not be empty", param="stop")
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(400, f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters",
                           param="stop")
        return stops

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationParams):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: Any = None
    echo: Any = None
    suffix: Any = None


class ChatRequest(GenerationParams):
    messages: list[Any]
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    store: bool | None = None  # accepted, not used: nothing is stored
    metadata: dict[str, str] | None = None  # accepted, not used (it goes with store)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    parallel_tool_calls: Any = None


def _same(value, ok) -> bool:
    if isinstance(value, bool) or isinstance(ok, bool):
        return value is ok  # True is not 1 here
    return value == ok


# ---------------------------------------------------------------------- answers


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id: str, model: str, text: str, finish_reason: str, used: dict) -> dict:
    return {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": used}


def completion_chunk(id: str, model: str, text: str, finish_reason: str | None) -> dict:
    return {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_completion(id: str, model: str, text: str, finish_reason: str, used: dict) -> dict:
    return {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": used}


def chat_chunk(id: str, model: str, delta: dict, finish_reason: str | None) -> dict:
    return {"id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(id: str, model: str, object: str, used: dict) -> dict:
    """The last chunk of a stream asked for with ``stream_options: {"include_usage": true}``."""
    return {"id": id, "object": object, "created": int(time.time()), "model": model, "choices": [], "usage": used}


# Characters that JSON may leave unescaped but that readers splitting text into lines (Python's str.splitlines, and
# httpx's iter_lines with it) take for line ends: escaped, an event stays one line for them too.
LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def event(data: dict | str) -> str:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False).translate(LINE_BREAKS)
    return f"data: {text}\n\n"
