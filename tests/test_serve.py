"""The HTTP server: a real uvicorn server on a loopback port, spoken to with the official openai client and,
for the errors, raw HTTP. Outputs are checked against model.generate on a second copy of the model."""

import asyncio
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

import offload
from offload.chat import stop_token_ids
from offload.text import Tokenizer

for module in ("fastapi", "uvicorn", "openai", "httpx"):  # the serve and test extras
    pytest.importorskip(module)

import h11  # noqa: E402
import httpx  # noqa: E402
import openai  # noqa: E402

from offload.serve import EngineLoop, ServerThread, Service, create_app  # noqa: E402
from offload.serve.cli import main as serve_main  # noqa: E402
from offload.serve.protocol import event  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQ = 128
QUESTION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "The quick brown fox?"}]


def load(path, rows, seq=SEQ, **kwargs):
    return offload.load_model(path, max_batch=rows, max_seq_len=seq, progress=False, **kwargs)


@pytest.fixture(scope="module")
def reference(tiny_chat):
    """A second copy of the model, for model.generate (the served one belongs to the engine thread)."""
    return load(tiny_chat, 32)


@pytest.fixture(scope="module")
def model_dir(tiny_chat, reference, tmp_path_factory):
    """``tiny_chat`` whose generation_config.json names, as a stop token, a token that greedy decoding of the
    chat QUESTION gives after a few others: only the server's reading of generation_config.json stops it there."""
    out = tmp_path_factory.mktemp("served")
    shutil.copytree(tiny_chat, out, dirs_exist_ok=True)
    ids = Tokenizer.from_dir(out).apply_chat_template(QUESTION)
    tokens = reference.generate([ids], max_new_tokens=16, eos_token_id=[], return_result=True).tokens[0]
    first_new = next(t for k, t in enumerate(tokens) if k >= 2 and t not in tokens[:k])
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": first_new}))
    return out


def start_server(path, rows, max_queue, seq=SEQ, api_docs=False, server_options=None, **load_kwargs):
    model = load(path, rows, seq, **load_kwargs)
    tokenizer = Tokenizer.from_dir(path)
    service = Service(EngineLoop(model, rows), tokenizer, "tiny-chat", stop_token_ids(path, model.config.eos_token_ids),
                      max_queue=max_queue, aliases=(str(path),))
    server = ServerThread(create_app(service, api_docs=api_docs), **(server_options or {})).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    return server, SimpleNamespace(url=server.url, client=client, service=service, tokenizer=tokenizer,
                                   eos=service.eos_ids)


@pytest.fixture(scope="module")
def served(model_dir):
    """8 rows, 32 more requests may wait; half of the layers stream from host memory."""
    needs = offload.plan_model(model_dir, max_batch=8, max_seq_len=SEQ).needs
    server, s = start_server(model_dir, 8, 32, cpu_memory="1GiB",
                             gpu_memory=needs.gpu_budget_streaming(len(needs.blocks) // 2))
    assert "host" in s.service.loop.model.plan.placement
    yield s
    server.stop()


def expect(reference, tokenizer, eos, prompt, n, **sampling):
    """What the server should answer: model.generate's text (a closing eos unshown), finish reason, token count."""
    result = reference.generate([prompt], max_new_tokens=n, eos_token_id=list(eos), return_result=True, **sampling)
    tokens, reason = result.tokens[0], result.finish_reasons[0]
    return tokenizer.decode(tokens[:-1] if reason == "eos" else tokens), "stop" if reason == "eos" else "length", \
        len(tokens)


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def metric(url, name) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def wait_for(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------------- answers


def test_models_health_metrics(served):
    assert [m.id for m in served.client.models.list().data] == ["tiny-chat"]
    assert served.client.models.retrieve("tiny-chat").id == "tiny-chat"
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    text = httpx.get(served.url + "/metrics").text
    for name in ("requests_total", "queue_depth", "rows_busy", "step_seconds", "generation_tokens_total"):
        assert f"# TYPE offload_{name} " in text
    assert metric(served.url, "offload_rows") == 8


def test_completion_greedy_equals_generate(served, reference):
    prompt = "The quick brown fox jumps"
    text, reason, count = expect(reference, served.tokenizer, served.eos, served.tokenizer.encode(prompt), 12)
    answer = served.client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=12, temperature=0)
    assert answer.choices[0].text == text and answer.choices[0].finish_reason == reason
    assert answer.usage.completion_tokens == count
    assert answer.usage.prompt_tokens == len(served.tokenizer.encode(prompt))
    stream = served.client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == count


def test_token_id_prompt_and_ignore_eos(served, reference):
    ids = [5, 300, 17, 900, 42]
    text, _, _ = expect(reference, served.tokenizer, (), ids, 10)
    answer = served.client.completions.create(model="tiny-chat", prompt=ids, max_tokens=10, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert answer.choices[0].text == text and answer.choices[0].finish_reason == "length"


def test_chat_greedy_stops_at_the_generation_config_token(served, reference):
    prompt = served.tokenizer.apply_chat_template(QUESTION)
    text, reason, count = expect(reference, served.tokenizer, served.eos, prompt, 20)
    assert reason == "stop" and 3 <= count <= 16  # at the token model_dir's generation_config.json names
    answer = served.client.chat.completions.create(model="tiny-chat", messages=QUESTION, temperature=0)
    assert answer.choices[0].message.content == text and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), count)
    chunks = list(served.client.chat.completions.create(model="tiny-chat", messages=QUESTION, temperature=0,
                                                        stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_strings(served, reference):
    messages = [{"role": "user", "content": "Hello world!"}]
    prompt = served.tokenizer.apply_chat_template(messages)
    full, _, _ = expect(reference, served.tokenizer, (), prompt, 16)
    stop = full[5:8]  # a stop string somewhere in the middle of the greedy answer
    for stream in (False, True):
        answer = served.client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0,
                                                       max_tokens=16, stop=[stop, "never seen"], stream=stream,
                                                       extra_body={"ignore_eos": True})
        if stream:
            chunks = list(answer)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert text == full[: full.index(stop)] and reason == "stop"
    wait_for(lambda: metric(served.url, "offload_rows_busy") == 0)  # the stopped requests' rows were freed
    # a pass already queued for a stopped row gave it nothing: not a pass of the row (without a draft, 1)
    assert metric(served.url, "offload_tokens_per_pass") == 1


def test_a_stop_string_in_the_text_held_at_max_tokens_is_a_stop(served, reference):
    """The last token ends inside a character: its text is held until the answer ends, and a stop string found in it
    then ends the text there, as one found earlier does: the finish reason is "stop", not "length"."""
    for prompt in ("memory", "The quick brown fox", "offload runs", "Hello world", "lazy dog"):
        tokens = reference.generate([served.tokenizer.encode(prompt)], max_new_tokens=40, eos_token_id=[],
                                    return_result=True).tokens[0]
        cut = [n for n in range(2, 40) if served.tokenizer.decode(tokens[:n]).count("\ufffd") == 1
               and served.tokenizer.decode(tokens[:n]).endswith("\ufffd")]
        if cut:
            break
    assert cut, "no greedy answer ends inside a character"
    full = served.tokenizer.decode(tokens[: cut[0]])
    for stream in (False, True):
        answer = served.client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=cut[0], temperature=0,
                                                  stop=full[-2:], stream=stream, extra_body={"ignore_eos": True})
        chunks = list(answer) if stream else [answer]
        assert "".join(c.choices[0].text for c in chunks) == full[:-2]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_equals_generate(served, reference):
    ids = served.tokenizer.encode("offload runs")
    text, _, _ = expect(reference, served.tokenizer, (), ids, 12, do_sample=True, temperature=0.9, top_p=0.95,
                        seed=123)
    answers = [served.client.completions.create(model="tiny-chat", prompt="offload runs", max_tokens=12,
                                                temperature=0.9, top_p=0.95, seed=123,
                                                extra_body={"ignore_eos": True}).choices[0].text for _ in range(2)]
    assert answers == [text, text]


def test_32_concurrent_streaming_clients(served, reference):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1024, (int(torch.randint(2, 20, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(32)]
    limits = [int(torch.randint(4, 16, (1,), generator=gen)) for _ in range(32)]
    want = reference.generate(prompts, max_new_tokens=limits, eos_token_id=[], return_result=True)

    async def one(client, prompt, limit):
        stream = await client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=limit, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True},
                                                 stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens

    async def everyone():
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, limits)))

    busy_before = metric(served.url, "offload_step_seconds_count")
    answers = asyncio.run(everyone())
    for (text, count), tokens, limit in zip(answers, want.tokens, limits):
        assert text == served.tokenizer.decode(tokens) and count == limit
    steps = metric(served.url, "offload_step_seconds_count") - busy_before
    assert steps < sum(limits) / 2  # rows were shared: 8 at a time, not one request after another


# ---------------------------------------------------------------------- clients that leave


def test_disconnect_mid_stream_frees_the_row(served):
    cancelled = metric(served.url, 'offload_requests_total{finish_reason="cancelled"}')
    generated = metric(served.url, "offload_generation_tokens_total")
    body = {"prompt": "The quick", "max_tokens": 120, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body) as response:
        data = (line for line in response.iter_lines() if line.startswith("data: "))
        next(data), next(data)  # two tokens in: the request holds a row
        assert metric(served.url, "offload_rows_busy") == 1
    wait_for(lambda: metric(served.url, 'offload_requests_total{finish_reason="cancelled"}') == cancelled + 1)
    wait_for(lambda: metric(served.url, "offload_rows_busy") == 0)
    assert metric(served.url, "offload_generation_tokens_total") - generated < 120  # cut short


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_row(served):
    cancelled = metric(served.url, 'offload_requests_total{finish_reason="cancelled"}')
    generated = metric(served.url, "offload_generation_tokens_total")
    body = json.dumps({"prompt": "The quick", "max_tokens": 120, "temperature": 0, "ignore_eos": True}).encode()
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:  # raw HTTP: a client that hangs up mid-request
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: metric(served.url, "offload_rows_busy") == 1)
    wait_for(lambda: metric(served.url, 'offload_requests_total{finish_reason="cancelled"}') == cancelled + 1)
    wait_for(lambda: metric(served.url, "offload_rows_busy") == 0)
    assert metric(served.url, "offload_generation_tokens_total") - generated < 120  # cut short


def test_full_queue_answers_429(model_dir):
    server, s = start_server(model_dir, rows=1, max_queue=1, seq=512)
    body = {"prompt": "The quick", "max_tokens": 500, "temperature": 0, "stream": True, "ignore_eos": True}
    try:
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as first:
            lines = first.iter_lines()  # kept: closing it would close the connection
            next(line for line in lines if line.startswith("data: "))  # in the one row
            with httpx.stream("POST", s.url + "/v1/completions", json=body) as second:  # waits in the queue
                assert second.status_code == 200
                third = httpx.post(s.url + "/v1/completions", json=body)
                assert third.status_code == 429 and third.headers["retry-after"] == "1"
                assert third.json()["error"]["code"] == "queue_full"
                wait_for(lambda: metric(s.url, "offload_queue_depth") == 1)
        # both clients gone: their places are free again
        wait_for(lambda: metric(s.url, "offload_requests_running") == 0)
        wait_for(lambda: metric(s.url, "offload_rows_busy") + metric(s.url, "offload_queue_depth") == 0)
        answer = s.client.completions.create(model="tiny-chat", prompt="The quick", max_tokens=2, temperature=0)
        assert answer.usage.completion_tokens >= 1
        assert metric(s.url, "offload_requests_rejected_total") == 1
        assert metric(s.url, 'offload_requests_total{finish_reason="cancelled"}') == 2
    finally:
        server.stop()


def test_a_failed_step_answers_500_and_the_server_goes_on(served):
    loop = served.service.loop
    broken = loop.engine
    errors = metric(served.url, 'offload_requests_total{finish_reason="error"}')

    def fail():
        raise RuntimeError("a step that fails")

    broken.step = fail  # the next step fails; the engine loop replaces the engine
    response = httpx.post(served.url + "/v1/completions", json={"prompt": "The quick", "max_tokens": 3})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert loop.engine is not broken
    assert metric(served.url, 'offload_requests_total{finish_reason="error"}') == errors + 1
    answer = served.client.completions.create(model="tiny-chat", prompt="The quick", max_tokens=3, temperature=0)
    assert answer.usage.completion_tokens >= 1


def raw_request(url: str, path: str, body: dict) -> socket.socket:
    """A socket that has sent one whole POST request of ``body``."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(address(url))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), len(data), data))
    return sock


def read_until_closed(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of the one response on ``sock`` (any framing), read until the server closes."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    client.send(h11.EndOfMessage())  # h11 parses a response only to a request it has seen
    status, body = None, b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert sock.recv(1) == b""  # and then the server closes
            return status, body


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_client_that_half_closes_after_its_request_is_answered(served, reference, stream):
    """shutdown(SHUT_WR) after a whole request (nc -N, many scripts): the answer comes, and the request is not
    counted as cancelled."""
    cancelled = metric(served.url, 'offload_requests_total{finish_reason="cancelled"}')
    prompt = [5, 300, 17, 900, 42]
    text, _, _ = expect(reference, served.tokenizer, (), prompt, 40)
    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": stream}
    with raw_request(served.url, "/v1/completions", body) as sock:
        sock.shutdown(socket.SHUT_WR)
        status, answer = read_until_closed(sock)
    assert status == 200
    if stream:
        events = [line.removeprefix("data: ") for line in answer.decode().split("\n\n") if line]
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == text
    else:
        assert json.loads(answer)["choices"][0]["text"] == text  # after the whitespace that probed the client
    assert metric(served.url, 'offload_requests_total{finish_reason="cancelled"}') == cancelled


@pytest.fixture
def impatient(model_dir):
    """A server that gives a client 1 s to send a whole request, and running answers 0.5 s at shutdown."""
    server, s = start_server(model_dir, rows=1, max_queue=1, seq=512,
                             server_options={"request_timeout": 1.0, "grace": 0.5})
    s.server = server
    yield s
    server.stop()


def test_clients_that_send_slowly_are_disconnected_and_others_served(impatient):
    """20 slowloris connections (a header byte every 0.1 s) and 5 with a body that trickles: each is closed when
    its request is not whole in time (1 s here), and a normal client is answered meanwhile."""
    heads = [socket.create_connection(address(impatient.url)) for _ in range(20)]
    bodies = [socket.create_connection(address(impatient.url)) for _ in range(5)]
    for sock in heads:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    for sock in bodies:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
    start, still_open = time.monotonic(), set(heads + bodies)
    answer = impatient.client.completions.create(model="tiny-chat", prompt="The quick", max_tokens=2)
    assert answer.usage.completion_tokens >= 1
    while still_open and time.monotonic() - start < 5:
        for sock in still_open.copy():
            try:
                sock.sendall(b"X" if sock in heads else b" ")
            except OSError:  # reset by the server
                still_open.discard(sock)
        closed, _, _ = select.select(list(still_open), [], [], 0.1)  # readable: the server's end of the connection
        for sock in closed:
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
            still_open.discard(sock)
    seconds = time.monotonic() - start
    assert not still_open and 0.9 < seconds < 2.5, (len(still_open), seconds)
    for sock in heads + bodies:
        sock.close()


def test_at_shutdown_running_answers_end_with_a_final_event(impatient):
    """On SIGTERM (here: the server told to stop, as the signal does) a stream still running after the grace
    period ends with an error event and [DONE], a whole answer still waiting with a 503."""
    body = {"prompt": "The quick", "max_tokens": 500, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", impatient.url + "/v1/completions", json={**body, "stream": True}) as stream:
        lines = (line for line in stream.iter_lines() if line.startswith("data: "))
        next(lines)  # running, in the one row
        waiting = []  # a whole answer queued behind it
        asker = threading.Thread(target=lambda: waiting.append(httpx.post(impatient.url + "/v1/completions",
                                                                          json=body, timeout=30)))
        asker.start()
        wait_for(lambda: metric(impatient.url, "offload_queue_depth") == 1)
        stopper = threading.Thread(target=impatient.server.stop)
        stopper.start()
        events = [line.removeprefix("data: ") for line in lines]
    asker.join()
    stopper.join(timeout=30)
    assert not stopper.is_alive()
    assert events[-1] == "[DONE]" and "shutting down" in json.loads(events[-2])["error"]["message"]
    assert len(events) < 500  # cut short, with a final event
    assert waiting[0].status_code == 503 and waiting[0].json()["error"]["code"] == "shutting_down"


# ---------------------------------------------------------------------- bad requests: 4xx with OpenAI's error body

LONG = list(range(3, 3 + SEQ))


@pytest.mark.parametrize("content_type, words", [
    ("application/x-www-form-urlencoded", "this one came with Content-Type 'application/x-www-form-urlencoded'"),
    ("text/plain; charset=utf-8", "Content-Type 'text/plain; charset=utf-8'"),
    (None, "this one came with no Content-Type"),
])
def test_a_json_body_of_another_content_type_is_told_which_it_has(served, content_type, words):
    """curl -d sends a form type by default: a JSON body under it is not read (a browser may send a form to
    another site unasked), and the answer says what to send."""
    body = json.dumps({"prompt": "The quick", "max_tokens": 2, "temperature": 0, "ignore_eos": True}).encode()
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(served.url + "/v1/completions", content=body, headers=headers)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert words in message and "Content-Type: application/json" in message
    answer = httpx.post(served.url + "/v1/completions", content=body,
                        headers={"content-type": "application/vnd.api+json"})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", [1, 2], 400, None, "JSON object"),
    ("/v1/completions", b'{"prompt": "caf\xe9"}', 400, None, "not valid JSON (not UTF-8: byte 0xe9 at position 15)"),
    pytest.param("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, None, "nested too deeply", id="nested"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt", "'prompt' is required"),
    ("/v1/completions", {"prompt": "a", "n": 2}, 400, "n", "n=2 is not supported"),
    ("/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "only allowed with stream: true"),
    ("/v1/completions", {"prompt": "a", "logprobs": 1}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"prompt": "a", "echo": True}, 400, "echo", "not supported"),
    ("/v1/completions", {"prompt": "a", "frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 1"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "a", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ("/v1/completions", b'{"prompt": "a", "temperature": NaN}', 400, "temperature", "finite number"),
    ("/v1/completions", b'{"prompt": "a", "top_p": Infinity}', 400, "top_p", "finite number"),
    ("/v1/completions", {"prompt": "a", "temperature": 5e-324}, 400, "temperature", "beyond float32's range"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p", "greater than 0"),
    ("/v1/completions", {"prompt": "a", "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": "a", "stop": [""]}, 400, "stop", "must not be empty"),
    ("/v1/completions", {"prompt": "a", "stop": ["x"] * 5}, 400, "stop", "at most 4 stop strings"),
    ("/v1/completions", {"prompt": "a", "stop": "x" * 257}, 400, "stop", "at most 256 characters"),
    ("/v1/completions", {"prompt": "a", "bogus": 1}, 400, "bogus", "Unrecognized request argument supplied: bogus"),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 1}, 400, "prompt", "context holds 128 tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": SEQ}, 400, "prompt", "lower max_tokens"),
    ("/v1/completions", {"prompt": [5000]}, 400, "prompt", "prompt: token id 5000 is outside the vocabulary"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
    ("/v1/completions", {"prompt": [[1, 2.5]]}, 400, "prompt", "prompt must be a string, token ids"),
    ("/v1/completions", {"prompt": None}, 400, "prompt", "prompt must be a string, token ids"),
    ("/v1/completions", {"prompt": "a", "stop": [1]}, 400, "stop", "stop must be a string or a list of strings"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "model", "'gpt-4' does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": 1}]}, 400, "messages", "'role' must be a string"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages", "'content' is missing or null"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "messages",
     "messages[0]: 'content' is missing or null"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages",
     "messages[0].role 'wizard' is not one of system, developer, user, assistant, tool, function"),
    ("/v1/chat/completions", {"messages": QUESTION, "logprobs": True}, 400, "logprobs", "not supported"),
    ("/v1/chat/completions", {"messages": QUESTION, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 3, "max_completion_tokens": 4}, 400, "max_tokens",
     "differ"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages",
     "only text parts"),
    # lone surrogates: JSON can escape them, UTF-8 cannot hold them, a tokenizer refuses them
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800 x"}], "max_tokens": 3}', 400,
     "messages", "messages[0].content is not valid Unicode"),
    ("/v1/completions", b'{"prompt": "hi \\udfff there", "max_tokens": 3}', 400, "prompt", "not valid Unicode"),
    ("/v1/completions", b'{"prompt": "hi", "\\ud800": 1}', 400, None, "not valid Unicode"),
    # a key given twice: json would read its last value without a word
    ("/v1/completions", b'{"prompt": "a", "max_tokens": 2, "max_tokens": 90}', 400, None,
     "the request body: the key 'max_tokens' is given twice in one object"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a", "content": "b"}]}', 400, None,
     "the key 'content' is given twice"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, path, body, status, param, words):
    if isinstance(body, bytes):
        response = httpx.post(served.url + path, content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(served.url + path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] and error["param"] == param
    assert httpx.get(served.url + "/health").status_code == 200


def test_unknown_paths_and_no_op_parameters(served):
    missing = httpx.get(served.url + "/v1/nothing")
    assert missing.status_code == 404 and "message" in missing.json()["error"]
    assert httpx.get(served.url + "/v1/completions").status_code == 405
    with pytest.raises(openai.NotFoundError):
        served.client.completions.create(model="gpt-4", prompt="a", max_tokens=1)
    answer = served.client.completions.create(model="tiny-chat", prompt="a", max_tokens=2, n=1, frequency_penalty=0,
                                              presence_penalty=0, logit_bias={}, user="someone")
    assert answer.usage.completion_tokens >= 1
    chat = served.client.chat.completions.create(model="tiny-chat", messages=QUESTION, max_tokens=2, store=False,
                                                 metadata={"team": "offload"})  # OpenAI's, with nothing to do here
    assert chat.usage.completion_tokens >= 1


def test_head_on_every_get_route_and_no_api_docs_unless_asked(served, model_dir):
    for path in ("/health", "/metrics", "/v1/models", "/v1/models/tiny-chat"):
        head, get = httpx.head(served.url + path), httpx.get(served.url + path)
        assert head.status_code == get.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"]
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(served.url + path).status_code == 404
    server, documented = start_server(model_dir, 1, 0, api_docs=True)
    try:
        assert "/v1/chat/completions" in httpx.get(documented.url + "/openapi.json").json()["paths"]
        assert httpx.get(documented.url + "/docs").status_code == 200
    finally:
        server.stop()


# ---------------------------------------------------------------------- the server's own chat template

FUSSY = (  # ChatML that refuses system messages, and fails on two contents as a template with a bug would
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ raise_exception('this model takes no system messages') }}{% endif %}"
    "{%- if message['content'] == 'divide' %}{{ 1 // 0 }}{% endif %}"
    "{%- if message['content'] == 'peek' %}{{ message['content'].__class__.__name__ }}{% endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def with_template(source: Path, directory: Path, template: str) -> Path:
    shutil.copytree(source, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return directory


@pytest.fixture(scope="module")
def fussy(tiny_chat, tmp_path_factory):
    server, s = start_server(with_template(tiny_chat, tmp_path_factory.mktemp("fussy") / "model", FUSSY), 2, 2)
    yield s
    server.stop()


@pytest.mark.parametrize("messages, status, kind, words", [
    ([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}], 400, "invalid_request_error",
     "refused these messages: this model takes no system messages"),
    ([{"role": "user", "content": "divide"}], 500, "server_error", "of model failed (ZeroDivisionError"),
    ([{"role": "user", "content": "peek"}], 500, "server_error", "of model failed (SecurityError"),
])
def test_the_chat_template_refusing_is_a_400_and_failing_a_500(fussy, messages, status, kind, words):
    response = httpx.post(fussy.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and words in error["message"]
    assert error["param"] == ("messages" if status == 400 else None)  # a 500 blames no parameter
    answer = fussy.client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2)
    assert answer.usage.completion_tokens >= 1


def test_serve_refuses_a_template_that_cannot_lay_out_one_message(tiny_chat, tmp_path, capsys):
    broken = with_template(tiny_chat, tmp_path / "model", "{{ messages[0].content // 2 }}")
    # a budget that no plan fits: were the template not checked first, this would be the error (not a server)
    assert serve_main(["--model", str(broken), "--port", "0", "--gpu-memory", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("serve: error: chat template") and "failed (TypeError" in err, err


# ---------------------------------------------------------------------- no request stalls the others

MB = 2**20


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of one HTTP/1.1 response with a Content-Length, read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    headers = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    length = int(headers[b"content-length"])
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


def upload_slowly(url: str, megabytes: int, chunked: bool) -> tuple[int, bytes]:
    """POST a body of ``megabytes`` MiB, one MiB every 20 ms (with its Content-Length, or chunked), then read the
    answer."""
    with socket.create_connection(address(url)) as sock:
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % (megabytes * MB)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s\r\n\r\n"
                     % framing)
        piece = b"x" * MB
        for _ in range(megabytes):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            time.sleep(0.02)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        return read_response(sock)


def health_times_while(url: str, work) -> tuple[list[float], object]:
    """Run ``work`` on a thread; meanwhile GET /health again and again. Returns the seconds of each answer and the
    work's result."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=work()))
    thread.start()
    seconds = []
    while thread.is_alive():
        start = time.monotonic()
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        seconds.append(time.monotonic() - start)
        time.sleep(0.01)  # often: a fast machine lays out the long conversation in about 0.15 s
    thread.join()
    return seconds, result["value"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_past_the_limit_is_413_and_health_answers_within_a_second_meanwhile(served, chunked):
    seconds, (status, body) = health_times_while(served.url, lambda: upload_slowly(served.url, 50, chunked))
    assert status == 413
    error = json.loads(body)["error"]
    assert "larger than this server takes (2.00 MiB" in error["message"] and error["type"] == "invalid_request_error"
    assert len(seconds) >= 5 and max(seconds) < 1.0, seconds  # asked all along the upload, answered at once
    assert httpx.get(served.url + "/health").status_code == 200


def test_a_long_conversation_within_the_limit_is_laid_out_off_the_event_loop(served):
    messages = [{"role": "user", "content": "hi"}] * 60_000  # just under 2 MiB, a fraction of a second to render
    body = {"messages": messages, "max_tokens": 3}
    seconds, response = health_times_while(
        served.url, lambda: httpx.post(served.url + "/v1/chat/completions", json=body, timeout=120))
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert len(seconds) >= 2 and max(seconds) < 1.0, seconds


def test_a_prompt_far_past_the_context_is_refused_from_its_beginning(served):
    response = httpx.post(served.url + "/v1/completions", json={"prompt": "hello world " * 150_000, "max_tokens": 3})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "context holds 128 tokens (max_seq_len), but more than " in error["message"]


# ---------------------------------------------------------------------- scripts/serve.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, words", [
    (["--port", "70000"], "--port must be in"),
    # full-width digits, which int() and float() read (values that would be refused if read: no server starts)
    (["--port", "\uff17\uff10\uff10\uff10\uff10"], "--port: invalid int value"),
    (["--request-timeout", "\uff10"], "--request-timeout: invalid float value"),
    (["--max-request-bytes", "\uff18"], "--max-request-bytes: cannot parse"),
    (["--max-queue", "-1"], "--max-queue must be >= 0"),
    (["--request-timeout", "0"], "--request-timeout must be a positive number"),
    (["--request-timeout", "nan"], "--request-timeout must be a positive number"),
    (["--request-timeout", "inf"], "--request-timeout must be a positive number"),
    (["--max-request-bytes", "lots"], "cannot parse 'lots'"),
    (["--max-request-bytes", "0"], "--max-request-bytes must be at least 1KiB"),
    (["--served-model-name", " "], "--served-model-name must not be empty"),
    (["--model", "does/not/exist", "--port", "0"], "does/not/exist"),
    (["--tp", "2", "--port", "0"], "torchrun"),
])
def test_serve_bad_flags_are_one_line(capsys, argv, words, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert serve_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("serve: error:") and words in err, err


def test_serve_refuses_a_port_in_use(tiny, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert serve_main(["--model", str(tiny), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def launch(args, cache_dir, torchrun=0):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OFFLOAD_CACHE_DIR": str(cache_dir)}
    cmd = [sys.executable, str(ROOT / "scripts" / "serve.py"), *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun), *cmd[1:]]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_until_serving(process, url, seconds=180):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("the server did not come up")


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_serve_script_with_and_without_tensor_parallelism(model_dir, reference, tmp_path, tp):
    """scripts/serve.py as a user runs it; at tp=2 under torchrun, rank 0 serves and rank 1 follows its steps."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = launch(["--model", str(model_dir), "--port", str(port), "--max-seq-len", str(SEQ), "--max-batch", "4",
                      "--tp", str(tp), "--quiet", "--log-level", "warning"], tmp_path, torchrun=tp if tp > 1 else 0)
    try:
        wait_until_serving(process, url)
        tokenizer = Tokenizer.from_dir(model_dir)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        prompts = ["The quick brown fox", "Hello world", "offload runs", "A plan places"]
        want = [expect(reference, tokenizer, (), tokenizer.encode(p), 8, do_sample=bool(i % 2), temperature=0.8,
                       seed=i)[0] for i, p in enumerate(prompts)]
        answers = [client.completions.create(model=model_dir.name, prompt=p, max_tokens=8, temperature=0.8 * (i % 2),
                                             seed=i, stream=bool(i % 2), extra_body={"ignore_eos": True})
                   for i, p in enumerate(prompts)]
        texts = ["".join(c.choices[0].text for c in a) if i % 2 else a.choices[0].text for i, a in enumerate(answers)]
        assert texts == want
        chat = client.chat.completions.create(model=str(model_dir), messages=QUESTION, temperature=0)
        assert chat.choices[0].finish_reason == "stop" and chat.usage.completion_tokens <= 16
    finally:
        # Ctrl-C to the process that serves HTTP (under torchrun: rank 0, which then stops the other rank).
        os.kill(rank_zero(process) if tp > 1 else process.pid, signal.SIGINT)
        try:
            out, _ = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, out
    assert "Traceback" not in out, out


def rank_zero(launcher: subprocess.Popen) -> int:
    """The pid of the worker of a torchrun launch whose RANK is 0."""
    workers = psutil.Process(launcher.pid).children(recursive=True)
    return next(w.pid for w in workers if w.environ().get("RANK") == "0")


# ---------------------------------------------------------------------- speculative decoding


def test_speculative_decoding_serves_the_same_tokens_and_counts_them(structured):
    """The structured model (token ids, no tokenizer) with prompt lookup, its layers streaming: concurrent greedy
    requests, whole and streamed, get plain greedy decoding's tokens; /metrics shows the tokens gained per pass."""
    from offload.text import IdText

    bandwidth = {"host": 1e9, "hbm": 1e11, "matmul": 1e15}
    kw = dict(dtype="float32", link_bandwidth=bandwidth)
    needs = offload.plan_model(structured, max_batch=4, max_seq_len=SEQ, draft="ngram", **kw).needs
    server, s = start_server(structured, 4, 8, draft="ngram", cpu_memory="1GiB", slots=1,
                             gpu_memory=needs.gpu_budget_streaming(0, slots=1), **kw)
    reference = load(structured, 4, **kw)
    try:
        assert s.service.loop.model.draft is not None and "host" in s.service.loop.model.plan.placement
        prompts = [[3, 17, 40, 2, 9], [11, 5, 60], [7, 7, 21, 33, 1, 8], [50, 2]]
        want = [IdText().decode(reference.generate([p], max_new_tokens=24, ignore_eos=True,
                                                   return_result=True).tokens[0]) for p in prompts]

        def ask(i):
            answer = s.client.completions.create(model="tiny-chat", prompt=prompts[i], max_tokens=24, temperature=0,
                                                 stream=bool(i % 2), extra_body={"ignore_eos": True})
            return "".join(c.choices[0].text for c in answer) if i % 2 else answer.choices[0].text

        async def all_at_once():
            return await asyncio.gather(*[asyncio.to_thread(ask, i) for i in range(len(prompts))])

        assert asyncio.run(all_at_once()) == want
        assert metric(s.url, "offload_tokens_per_pass") > 1.5
        assert 0 < metric(s.url, "offload_draft_accepted_tokens_total") <= metric(s.url, "offload_draft_tokens_total")
    finally:
        server.stop()
        reference.close()


def test_the_servers_plan_reserves_only_the_logits_generation_reads():
    """The server once forced 2048-token chunks and reserved every position's logits (406.5 MiB for SmolLM2-135M
    in float32, more than its KV cache and non-layer tensors together), refusing a budget that streams most of its
    layers. Generation reads each row's last logits: that is all the plan reserves now."""
    from offload.cli import load_options
    from offload.loading import prepare
    from offload.models.shapes import shape_config
    from offload.serve.cli import build_parser

    args = build_parser().parse_args(["--device", "cpu", "--dtype", "float32", "--gpu-memory", "269045204",
                                      "--cpu-memory", "2GiB", "--max-batch", "8", "--max-seq-len", "256"])
    options = load_options(args, max_batch=8)
    assert options.all_logits is False and options.max_step_tokens is None
    plan = prepare(shape_config("smollm2-135m"), options).plan
    assert plan.blocks_on("host") and plan.needs.activation_bytes < 32 * 2**20


def test_metrics_show_the_expert_hit_rate_of_a_mixture_of_experts_only():
    from offload.serve.metrics import Metrics

    dense, moe = Metrics(rows=2), Metrics(rows=2, expert_hits=30, expert_misses=10)
    assert "expert" not in dense.render()
    text = moe.render()
    assert 'offload_expert_lookups_total{result="hit"} 30\n' in text
    assert 'offload_expert_lookups_total{result="miss"} 10\n' in text
    assert "offload_expert_hit_rate 0.75\n" in text


def test_a_streamed_event_is_one_line_for_readers_that_split_at_unicode_line_breaks():
    """U+2028, U+2029 and U+0085 are valid unescaped in JSON, but Python's str.splitlines (and httpx's iter_lines)
    ends a line at each: a chunk of text holding one arrived as two lines of broken JSON."""
    text = "a\u2028b\x85c\u2029d \u00e9\u4e2d"
    lines = event({"text": text}).splitlines()
    assert lines[1:] == [""] and json.loads(lines[0].removeprefix("data: ")) == {"text": text}
    assert "\u00e9\u4e2d" in lines[0]  # other characters stay as they are


@pytest.mark.parametrize("half_close", [True, False], ids=["offload-server", "plain-uvicorn"])
def test_a_whole_answer_cancelled_while_it_waits_gives_its_row_back(tiny, half_close):
    """A whole answer's handler cancelled while it waited for a half-close or its text (its server shutting down)
    skipped closing its generation where a half-close was awaited (under offload's own server, every whole answer):
    the engine kept its row and the request stayed counted as running."""
    from offload.serve.app import HALF_CLOSED, whole_answer
    from offload.serve.protocol import CompletionRequest

    loop, done = EngineLoop(load(tiny, 1), rows=1), threading.Event()
    loop.thread = threading.Thread(target=done.wait)  # an engine thread that takes no step: the request waits
    loop.thread.start()
    service = Service(loop, None, "tiny")

    async def cancelled_while_waiting():
        extensions = {HALF_CLOSED: asyncio.Event()} if half_close else {}
        http = SimpleNamespace(scope={"extensions": extensions}, receive=asyncio.Event().wait)  # a client that waits
        generation = service.start([1, 2, 3], CompletionRequest(prompt=[1, 2, 3]), 4, http, "cmpl", "prompt")
        handler = asyncio.ensure_future(whole_answer(generation, lambda text: {"text": text}))
        await asyncio.sleep(0.05)
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        return generation

    try:
        generation = asyncio.run(cancelled_while_waiting())
    finally:
        done.set()
    assert generation.closed and not service.generations
    assert service.metrics.running == 0 and service.metrics.finished["cancelled"] == 1
    messages = [loop.inbox.get_nowait() for _ in range(loop.inbox.qsize())]
    assert ("cancel", generation.id) in messages  # the engine frees the row at its next step


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the failure, on purpose
def test_requests_queued_as_the_engine_thread_ends_outside_a_step_are_answered(reference):
    """An engine loop that fails outside a step (a collective under tensor parallelism, say) answered the requests
    it had collected; those still in its inbox, and those queued after it ended, waited forever."""
    from offload.scheduler.row_engine import Request

    loop, answers = EngineLoop(reference, rows=2), []
    collect = loop._collect

    def failing_collect():
        inputs = collect()
        loop.submit(Request((1, 2), 4, key="waiting"), lambda token, reason: answers.append(("waiting", reason)))
        raise RuntimeError("a collective failed")

    loop._collect = failing_collect
    loop.submit(Request((1, 2), 4, key="collected"), lambda token, reason: answers.append(("collected", reason)))
    loop.start()
    loop.thread.join(timeout=60)
    assert not loop.alive and loop.ended
    loop.submit(Request((1, 2), 4, key="late"), lambda token, reason: answers.append(("late", reason)))
    assert sorted(answers) == [("collected", "error"), ("late", "error"), ("waiting", "error")]
