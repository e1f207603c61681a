"""The HTTP server end to end on a tiny random-weight model: wire shapes, SSE framing, limits, errors,
the engine thread (queue, cancellation, health). A real uvicorn server on a loopback port; raw HTTP.

The tiny model writes random tokens, so these tests check structure, never content (the real model's
behaviour is in test_api_sdk.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from datetime import datetime
from pathlib import Path

import anthropic
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from kawai import engine
from kawai.api.app import create_app
from kawai.api.errors import ApiError
from kawai.api.middleware import RequestContextMiddleware
from kawai.api.prompt import IMAGE_PLACEHOLDER, Prompt
from kawai.api.routes_messages import Reply
from kawai.api.sse import sse_frames
from kawai.api.state import ServerSettings
from kawai.api.wire import MessagesRequest, parse_request
from kawai.api.worker import Finished, Job, Started, StepChannel
from kawai.engine.generate import Step
from kawai.engine.sampling import SamplingParams
from api_harness import LiveServer, home, live_server, parse_sse, tokens  # noqa: F401 (fixtures)
from sse_grammar import check_stream
from tiny_models import write_tiny_model

N_CTX = 512
GOLDEN_STREAM = Path(__file__).parents[1] / "data" / "anthropic_stream_golden.sse"


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", n_ctx=N_CTX))


@pytest.fixture(scope="module")
def server(tiny_llm, home, tokens):
    with live_server(home, [tiny_llm], queue_size=1, ping_interval=0.2) as s:
        yield s


@pytest.fixture()
def client(server, tokens):
    with httpx.Client(base_url=server.url, headers={"x-api-key": tokens.all}, timeout=60) as c:
        yield c


def body(**kw):
    return {"model": "tiny-qwen2-f32", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Hello"}], **kw}


def check_error(r: httpx.Response, status: int, error_type: str) -> dict:
    assert r.status_code == status, r.text
    data = r.json()
    assert data["type"] == "error" and data["error"]["type"] == error_type
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    assert data["request_id"] == r.headers["request-id"] == r.headers["anthropic-request-id"]
    return data


def wait_idle(server, timeout=10.0) -> float:
    t0 = time.monotonic()
    worker = server.state.models["tiny-qwen2-f32"].worker
    while worker.busy:
        assert time.monotonic() - t0 < timeout, "engine still busy"
        time.sleep(0.01)
    return time.monotonic() - t0


# ---- messages ----------------------------------------------------------------------------------------


def test_message_response_shape_and_request_id_headers(client):
    r = client.post("/v1/messages", json=body())
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    m = r.json()
    assert m["id"].startswith("msg_") and m["type"] == "message" and m["role"] == "assistant"
    assert m["model"] == "tiny-qwen2-f32"
    assert m["stop_reason"] in ("end_turn", "max_tokens") and "stop_sequence" in m and m["stop_sequence"] is None
    assert all(b["type"] == "text" for b in m["content"])
    u = m["usage"]
    assert u["output_tokens"] >= 1 and u["input_tokens"] + u["cache_read_input_tokens"] > 0
    rid = r.headers["request-id"]
    assert rid.startswith("req_") and r.headers["anthropic-request-id"] == rid


def test_max_tokens_stop_reason(client):
    m = client.post("/v1/messages", json=body(max_tokens=5)).json()
    assert m["stop_reason"] == "max_tokens" and m["usage"]["output_tokens"] == 5


def test_stream_frames_follow_the_anthropic_event_order(server, client):
    checked = server.sse.checked  # the harness checks every stream too (SDK clients included)
    r = client.post("/v1/messages", json=body(stream=True, max_tokens=12))
    assert server.sse.checked == checked + 1 and not server.sse.failures
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["request-id"] == r.headers["anthropic-request-id"]
    message = check_stream(parse_sse(r.text))
    assert message["usage"]["input_tokens"] > 0 and message["content"][0]["type"] == "text"
    assert message["stop_reason"] == "max_tokens" and message["usage"]["output_tokens"] == 12


def test_stream_has_the_documented_shape(client):
    """Each kind of event carries at least the fields of the documented stream (the golden transcript)."""
    golden = {e: d for e, d in parse_sse(GOLDEN_STREAM.read_text())}
    ours = {e: d for e, d in parse_sse(client.post("/v1/messages", json=body(stream=True, max_tokens=3)).text)}
    for kind in ("message_start", "content_block_start", "content_block_delta", "content_block_stop",
                 "message_delta", "message_stop"):
        assert set(golden[kind]) <= set(ours[kind]), kind
    assert set(golden["message_start"]["message"]) <= set(ours["message_start"]["message"])
    assert set(golden["message_start"]["message"]["usage"]) <= set(ours["message_start"]["message"]["usage"])
    assert set(golden["message_delta"]["delta"]) <= set(ours["message_delta"]["delta"])


def test_stream_text_equals_non_stream_text(client):
    """Greedy decoding: the same tokens either way; the stream's deltas join to the JSON content."""
    plain = client.post("/v1/messages", json=body(max_tokens=20)).json()
    streamed = check_stream(parse_sse(client.post("/v1/messages", json=body(max_tokens=20, stream=True)).text))
    assert streamed["content"] == plain["content"]


def test_streaming_is_decided_by_the_body_not_accept(client):
    r = client.post("/v1/messages?beta=true", json=body(stream=True), headers={"accept": "application/json",
                    "anthropic-version": "2023-06-01", "anthropic-beta": "tools-2024-04-04"})
    assert r.headers["content-type"].startswith("text/event-stream")
    r = client.post("/v1/messages", json=body(), headers={"accept": "text/event-stream"})
    assert r.headers["content-type"].startswith("application/json") and r.json()["type"] == "message"


def test_count_tokens_is_exactly_what_messages_counts(client):
    variants = [
        body(),
        body(system="Be brief.", messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                           {"role": "user", "content": "c"}]),
        body(tools=[{"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}],
             tool_choice={"type": "any"}),
    ]
    for b in variants:
        counted = client.post("/v1/messages/count_tokens", json={k: v for k, v in b.items() if k != "max_tokens"})
        assert counted.status_code == 200 and set(counted.json()) == {"input_tokens"}
        usage = client.post("/v1/messages", json=b).json()["usage"]
        assert counted.json()["input_tokens"] == (
            usage["input_tokens"] + usage["cache_creation_input_tokens"] + usage["cache_read_input_tokens"])


def test_stream_usage_is_the_same_at_start_and_end(client):
    """message_start carries the input / cache-read split that message_delta and the JSON response
    report (the prefix cache is matched before message_start goes out)."""
    b = body(system="Stream usage. " * 10, max_tokens=4)
    client.post("/v1/messages", json=b)  # now cached
    for _ in range(2):
        frames = [d for _, d in parse_sse(client.post("/v1/messages", json={**b, "stream": True}).text)]
        start = frames[0]["message"]["usage"]
        end = next(d for d in frames if d["type"] == "message_delta")["usage"]
        assert start["cache_read_input_tokens"] == end["cache_read_input_tokens"] > 0
        assert start["input_tokens"] == end["input_tokens"] >= 1 and start["cache_creation_input_tokens"] == 0
        usage = client.post("/v1/messages", json=b).json()["usage"]
        assert usage["input_tokens"] + usage["cache_read_input_tokens"] == start["input_tokens"] + start[
            "cache_read_input_tokens"]


def test_prefix_cache_reuse_is_reported_as_cache_read(client):
    b = body(system="You are terse. " * 20)
    client.post("/v1/messages", json=b)
    usage = client.post("/v1/messages", json=b).json()["usage"]
    assert usage["cache_read_input_tokens"] > 0
    assert usage["input_tokens"] >= 1


def prompt_of_about(client, n_tokens: int) -> tuple[dict, int]:
    """A request whose prompt has between n_tokens - 8 and n_tokens tokens, and its exact count."""
    def count(k):
        b = body(messages=[{"role": "user", "content": "word " * k}])
        return b, client.post("/v1/messages/count_tokens", json={**b, "max_tokens": None}).json()["input_tokens"]

    (_, one), (_, two) = count(1), count(2)
    k = (n_tokens - one) // (two - one)
    while True:
        b, n = count(k)
        if n <= n_tokens:
            assert n >= n_tokens - 8
            return b, n
        k -= 1


def test_max_tokens_is_a_ceiling_the_context_ends_the_reply(client):
    """prompt + max_tokens over the context is no error: the reply runs until the context is full and
    stops with model_context_window_exceeded; every position of the context is used."""
    b, n = prompt_of_about(client, N_CTX - 5)
    for stream in (False, True):
        r = client.post("/v1/messages", json={**b, "max_tokens": N_CTX, "stream": stream})
        assert r.status_code == 200, r.text
        if stream:
            frames = [d for _, d in parse_sse(r.text)]
            start, delta = frames[0]["message"], next(d for d in frames if d["type"] == "message_delta")
            stop_reason, usage = delta["delta"]["stop_reason"], {**start["usage"], **delta["usage"]}
        else:
            stop_reason, usage = r.json()["stop_reason"], r.json()["usage"]
        assert stop_reason == "model_context_window_exceeded"
        assert usage["input_tokens"] + usage.get("cache_creation_input_tokens", 0) + usage["cache_read_input_tokens"] == n
        assert usage["output_tokens"] == N_CTX - n + 1  # the last token is sampled from a full context


def test_only_a_prompt_that_does_not_fit_is_refused(client):
    b, n = prompt_of_about(client, N_CTX)
    assert client.post("/v1/messages", json={**b, "max_tokens": 1}).status_code == 200
    long_prompt = body(messages=[{"role": "user", "content": "word " * 3000}])
    counted = client.post("/v1/messages/count_tokens", json={**long_prompt, "max_tokens": None}).json()
    message = check_error(client.post("/v1/messages", json=long_prompt), 400, "invalid_request_error")["error"]["message"]
    assert message.startswith(f"prompt is too long: {counted['input_tokens']} tokens > {N_CTX} maximum")
    huge = body(messages=[{"role": "user", "content": "x" * (N_CTX * 40)}])  # refused before tokenizing
    assert "characters" in check_error(client.post("/v1/messages", json=huge), 400,
                                       "invalid_request_error")["error"]["message"]


def test_thinking_switch_reaches_the_template(client):
    """The tiny template appends an empty think block when enable_thinking is false (Qwen3's switch)."""
    def count(**kw):
        b = {k: v for k, v in body(**kw).items() if k != "max_tokens"}
        return client.post("/v1/messages/count_tokens", json=b).json()["input_tokens"]

    off, absent = count(thinking={"type": "disabled"}), count()
    on = count(thinking={"type": "enabled", "budget_tokens": 1024})
    assert off == absent > on and count(thinking={"type": "adaptive"}) == on


def test_tool_choice_rules(client):
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    for patch, needle in [
        ({"tool_choice": {"type": "any"}}, "requires tools"),
        ({"tools": tools, "tool_choice": {"type": "tool", "name": "other"}}, "no tool named"),
        ({"tools": tools, "tool_choice": {"type": "any"}, "thinking": {"type": "enabled", "budget_tokens": 1024}},
         "thinking"),
    ]:
        r = client.post("/v1/messages", json=body(**patch))
        assert needle in check_error(r, 400, "invalid_request_error")["error"]["message"]
    hidden = client.post("/v1/messages/count_tokens", json={**body(tools=tools, tool_choice={"type": "none"}),
                                                             "max_tokens": None}).json()["input_tokens"]
    assert hidden == client.post("/v1/messages/count_tokens", json=body()).json()["input_tokens"]  # tools hidden


def test_mid_conversation_system_and_tool_history_are_accepted(client):
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "system", "content": "Answer briefly."},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "call it", "signature": "x"},
                                          {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": True,
                                      "content": [{"type": "text", "text": "timeout"}]}]},
    ]
    b = body(messages=messages, system=[{"type": "text", "text": "Be nice."}],
             tools=[{"name": "get_weather", "input_schema": {"type": "object"}}])
    r = client.post("/v1/messages/count_tokens", json=b)  # the tiny tokenizer makes this too long to generate
    assert r.status_code == 200 and r.json()["input_tokens"] > 100


IMAGE = {"type": "image", "source": {"type": "url", "url": "https://example.com/image.jpg"}}


def test_images_to_a_text_model_become_a_placeholder(client):
    """Agents keep a pasted screenshot in their history: the model reads a placeholder (the URL is never
    fetched), in user turns and tool results alike."""
    def messages(image):
        return [{"role": "user", "content": [{"type": "text", "text": "What is in this image?"}, image]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [image]}]}]

    placeholder = {"type": "text", "text": IMAGE_PLACEHOLDER}
    counts = [client.post("/v1/messages/count_tokens", json={**body(messages=messages(b)), "max_tokens": None})
              for b in (IMAGE, placeholder)]
    assert counts[0].status_code == 200 and counts[0].json() == counts[1].json()
    assert client.post("/v1/messages", json=body(messages=messages(IMAGE))).status_code == 200


def test_refuse_images_restores_the_400_naming_the_model(tiny_llm, home, tokens):
    with live_server(home, [tiny_llm], refuse_images=True) as s:
        r = httpx.post(s.url + "/v1/messages", headers={"x-api-key": tokens.all}, timeout=60,
                       json=body(messages=[{"role": "user", "content": [{"type": "text", "text": "What?"}, IMAGE]}]))
    assert "tiny-qwen2-f32" in check_error(r, 400, "invalid_request_error")["error"]["message"]


def test_stop_sequence_ends_generation(client, tiny_llm):
    """Greedy output is deterministic: stop at a string we know it produces."""
    text = "".join(b["text"] for b in client.post("/v1/messages", json=body(max_tokens=30)).json()["content"])
    stop = text[5:8]
    assert len(stop) == 3
    m = client.post("/v1/messages", json=body(max_tokens=30, stop_sequences=[stop])).json()
    assert m["stop_reason"] == "stop_sequence" and m["stop_sequence"] == stop
    assert "".join(b["text"] for b in m["content"]) == text[: text.index(stop)].strip()


# ---- models, health, routing ---------------------------------------------------------------------------


def test_models_list_and_retrieve(client):
    listing = client.get("/v1/models").json()
    assert listing["has_more"] is False and listing["first_id"] == listing["last_id"] == "tiny-qwen2-f32"
    (info,) = listing["data"]
    assert info["type"] == "model" and info["id"] == "tiny-qwen2-f32" and info["display_name"]
    datetime.fromisoformat(info["created_at"].replace("Z", "+00:00"))
    assert client.get("/v1/models/tiny-qwen2-f32").json() == info
    assert client.get("/v1/models", params={"limit": 0}).status_code == 400


def test_unknown_model_is_404_without_paths(tiny_llm, home, tokens):
    with live_server(home, [tiny_llm], strict_model_ids=True) as s, \
            httpx.Client(base_url=s.url, headers={"x-api-key": tokens.all}, timeout=60) as client:
        for r in (client.get("/v1/models/nope"), client.post("/v1/messages", json=body(model="../../etc/passwd")),
                  client.post("/v1/messages", json=body(model=str(tiny_llm.path)))):
            message = check_error(r, 404, "not_found_error")["error"]["message"]
            assert str(tiny_llm.path.parent) not in message and ".gguf" not in message


def test_one_served_model_answers_any_id_under_its_own(client):
    """As llama-server does: Claude Code's background calls name claude-haiku-*; the reply's `model`
    is the id of the model that wrote it."""
    for model in ("claude-3-5-haiku-20241022", "claude-sonnet-4-5", "gpt-4o"):
        r = client.post("/v1/messages", json=body(model=model))
        assert r.status_code == 200 and r.json()["model"] == "tiny-qwen2-f32"
        assert client.get(f"/v1/models/{model}").json()["id"] == "tiny-qwen2-f32"


def test_aliases_are_globs_tried_before_a_404(tiny_llm, home, tokens):
    aliases = (("claude-*-haiku-*", "tiny-qwen2-f32"), ("claude-*", "tiny-qwen2-f32"))
    with live_server(home, [tiny_llm], aliases=aliases, strict_model_ids=True) as s, \
            httpx.Client(base_url=s.url, headers={"x-api-key": tokens.all}, timeout=60) as client:
        for model in ("claude-3-5-haiku-20241022", "claude-opus-4-1"):
            r = client.post("/v1/messages", json=body(model=model))
            assert r.status_code == 200 and r.json()["model"] == "tiny-qwen2-f32"
        check_error(client.post("/v1/messages", json=body(model="gpt-4o")), 404, "not_found_error")
        check_error(client.post("/v1/messages", json=body(model="Claude-x")), 404, "not_found_error")  # case counts


def test_an_alias_to_a_model_not_served_stops_the_start(tiny_llm, home):
    with pytest.raises(RuntimeError, match="did not start"):
        with live_server(home, [tiny_llm], aliases=(("claude-*", "qwen-none"),)):
            pass


def test_health_is_public_and_content_free(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_unknown_routes_and_wrong_methods_use_the_error_shape(client):
    check_error(client.get("/v1/nothing"), 404, "not_found_error")
    r = client.get("/v1/messages")
    check_error(r, 405, "invalid_request_error")
    assert "POST" in r.headers["allow"]
    check_error(client.get("/v1/models/"), 404, "not_found_error")  # no redirect built from Host


def test_bad_bodies_are_400(client):
    for content in (b"", b"{", b"[1, 2]", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b'{"a": ' + b"1" * 5000 + b"}"):
        r = client.post("/v1/messages", content=content, headers={"content-type": "application/json"})
        data = check_error(r, 400, "invalid_request_error")
        assert r.headers["x-should-retry"] == "false"
        assert "Traceback" not in data["error"]["message"]
    r = client.post("/v1/messages", json=body(max_tokens=-1))
    assert check_error(r, 400, "invalid_request_error")["error"]["message"].startswith("max_tokens:")


# ---- body cap: 32 MB, counted while reading ---------------------------------------------------------------

LIMIT = 32 * 1024 * 1024


def read_response(s: socket.socket) -> bytes:
    """One HTTP response with a Content-Length body, read from a raw socket."""
    s.settimeout(10)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            part = s.recv(65536)
            if not part:
                return data
            data += part
        head, _, rest = data.partition(b"\r\n\r\n")
        lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
        length = int(lengths[0])
        while len(rest) < length:
            part = s.recv(65536)
            if not part:
                break
            rest += part
        return head + b"\r\n\r\n" + rest
    except OSError:
        return data


def test_declared_oversize_body_is_413_before_reading_it(server, tokens):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-api-key: "
                  + tokens.all.encode() + b"\r\nContent-Length: %d\r\n\r\n{" % (LIMIT + 1))
        response = read_response(s)
    assert response.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in response


def test_oversize_body_without_length_is_counted_while_streaming(server, tokens):
    """Chunked upload, no Content-Length, and the body never ends: the answer can only come from
    counting bytes as they arrive."""
    chunk = b"a" * (1024 * 1024)
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"x-api-key: " + tokens.all.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(LIMIT // len(chunk) + 2):  # just past the limit; no terminating 0-chunk
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:  # the server may answer and close before the last chunk
            pass
        response = read_response(s)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b'"request_too_large"' in response


# ---- the engine thread: queue, cancellation, ping ------------------------------------------------------------


def first_delta(response: httpx.Response):
    """Read up to the first content delta; returns the line iterator, which keeps the stream open."""
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("event: content_block_delta"):
            return lines
    raise AssertionError("no content delta")


def generated_tokens(server, tokens) -> float:
    """kawai_generated_tokens_total, from /metrics."""
    text = httpx.get(server.url + "/metrics", headers={"x-api-key": tokens.all}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kawai_generated_tokens_total"))


def test_client_disconnect_stops_generation(server, tokens):
    """A 480-token greedy run takes seconds on the tiny model; closing the stream ends it early."""
    worker = server.state.models["tiny-qwen2-f32"].worker
    before = generated_tokens(server, tokens)
    with httpx.Client(base_url=server.url, headers={"x-api-key": tokens.all}, timeout=60) as c:
        with c.stream("POST", "/v1/messages", json=body(stream=True, max_tokens=480)) as r:
            lines = first_delta(r)
            assert worker.busy and next(lines) is not None  # still generating (480 tokens take a while)
            r.close()
            wait_idle(server, timeout=60)
    assert generated_tokens(server, tokens) - before < 480  # cut short, not run to max_tokens


def test_non_streaming_client_disconnect_also_cancels(server, tokens):
    worker = server.state.models["tiny-qwen2-f32"].worker
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        payload = json.dumps(body(max_tokens=480)).encode()
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-api-key: "
                  + tokens.all.encode() + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
        t0 = time.monotonic()
        while not worker.busy:
            assert time.monotonic() - t0 < 60, "the request never started"  # a hang guard, not a speed test
            time.sleep(0.01)
        time.sleep(0.02)  # the request is in generation; a 480-token run lasts far longer than this
        assert worker.busy
        before = generated_tokens(server, tokens)
    wait_idle(server, timeout=60)
    assert generated_tokens(server, tokens) - before < 480


def test_full_queue_is_529_at_once(server, tokens):
    """queue_size=1: one request running, one waiting, the third is refused immediately."""
    headers = {"x-api-key": tokens.all}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as running, \
            httpx.Client(base_url=server.url, headers=headers, timeout=60) as waiting:
        with running.stream("POST", "/v1/messages", json=body(stream=True, max_tokens=480)) as r1:
            lines = first_delta(r1)  # running
            with waiting.stream("POST", "/v1/messages", json=body(stream=True, max_tokens=2)) as r2:  # queued
                r3 = httpx.post(server.url + "/v1/messages", json=body(), headers=headers, timeout=60)
                check_error(r3, 529, "overloaded_error")
                # At once: refused while the first request still runs and the second still waits.
                assert server.state.models["tiny-qwen2-f32"].worker.busy
                assert r2.status_code == 200 and next(lines) is not None
            r1.close()
    wait_idle(server)


def test_pings_fill_silences_before_and_between_events():
    """Reply.events with a slow producer standing in for the engine thread (prefill, then two tokens)."""

    async def scenario():
        channel = StepChannel(asyncio.get_running_loop())
        job = Job([1, 2], SamplingParams(max_tokens=2), channel, "req_test")
        prompt = Prompt("x", [1, 2], "", parse_tools=False, tool_names=frozenset(), in_thinking=False)
        reply = Reply("m", prompt, parse_request(MessagesRequest, body()), job, ping_interval=0.05)

        async def engine_thread():
            channel.put(Started(cached_tokens=0))  # admitted
            await asyncio.sleep(0.3)  # "prefill"
            channel.put(Step(5, "Hi", None))
            await asyncio.sleep(0.3)
            channel.put(Step(6, "!", "eos"))
            channel.put(Finished(prompt_tokens=2, cached_tokens=0, generated_tokens=2))

        producer = asyncio.create_task(engine_thread())
        events = [e async for e in reply.events()]
        await producer
        return events, reply.message()

    events, message = asyncio.run(scenario())
    assert check_stream([(e["type"], e) for e in events])["content"] == message["content"]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    first_block = kinds.index("content_block_start")
    assert kinds[1:first_block].count("ping") >= 3  # during "prefill"
    between = kinds[first_block:kinds.index("content_block_stop")]
    assert between.count("ping") >= 3 and between.count("content_block_delta") == 2
    assert message["content"] == [{"type": "text", "text": "Hi!"}] and message["stop_reason"] == "end_turn"


def test_long_silences_get_a_message_delta_the_sdk_passes_on():
    """The SDKs drop pings before their callers see them; Claude Code aborts a stream after 300 s without
    an event. A long prefill therefore gets `message_delta` keepalives, which the SDK's own accumulator
    takes without changing the final message."""
    from anthropic.lib.streaming._messages import accumulate_event
    from anthropic.types import RawMessageStreamEvent
    from pydantic import TypeAdapter

    async def scenario():
        channel = StepChannel(asyncio.get_running_loop())
        job = Job([1, 2], SamplingParams(max_tokens=2), channel, "req_test")
        prompt = Prompt("x", [1, 2], "", parse_tools=False, tool_names=frozenset(), in_thinking=False)
        reply = Reply("m", prompt, parse_request(MessagesRequest, body()), job, ping_interval=0.02,
                      keepalive_interval=0.1)

        async def engine_thread():
            channel.put(Started(cached_tokens=1))
            await asyncio.sleep(0.5)  # a long "prefill"
            channel.put(Step(5, "Hi", None))
            channel.put(Step(6, "!", "eos"))
            channel.put(Finished(prompt_tokens=2, cached_tokens=1, generated_tokens=2))

        producer = asyncio.create_task(engine_thread())
        events = [e async for e in reply.events()]
        await producer
        return events

    events = asyncio.run(scenario())
    check_stream([(e["type"], e) for e in events])
    kinds = [e["type"] for e in events]
    prefill = kinds[1:kinds.index("content_block_start")]
    assert prefill.count("message_delta") >= 3 and "ping" in prefill
    assert all(e["delta"]["stop_reason"] is None for e in events[1:kinds.index("content_block_start")]
               if e["type"] == "message_delta")
    snapshot, parse = None, TypeAdapter(RawMessageStreamEvent).validate_python
    for e in events:
        if e["type"] != "ping":
            snapshot = accumulate_event(event=parse(e), current_snapshot=snapshot, json_bufs={})
    assert snapshot.stop_reason == "end_turn" and snapshot.content[0].text == "Hi!"
    assert (snapshot.usage.input_tokens, snapshot.usage.cache_read_input_tokens, snapshot.usage.output_tokens) == (1, 1, 2)


def test_a_request_queued_for_long_starts_its_stream_before_admission():
    """Every slot busy: message_start goes out after a keepalive interval (without the cache split, not
    yet known), keepalives follow, and the final message_delta carries the real split."""
    async def scenario():
        channel = StepChannel(asyncio.get_running_loop())
        job = Job([1, 2, 3], SamplingParams(max_tokens=1), channel, "req_test")
        prompt = Prompt("x", [1, 2, 3], "", parse_tools=False, tool_names=frozenset(), in_thinking=False)
        reply = Reply("m", prompt, parse_request(MessagesRequest, body()), job, ping_interval=0.02,
                      keepalive_interval=0.1)

        async def engine_thread():
            await asyncio.sleep(0.4)  # queued
            channel.put(Started(cached_tokens=2))
            channel.put(Step(5, "Hi", "max_tokens"))
            channel.put(Finished(prompt_tokens=3, cached_tokens=2, generated_tokens=1))

        producer = asyncio.create_task(engine_thread())
        events = [e async for e in reply.events()]
        await producer
        return events

    events = asyncio.run(scenario())
    assert check_stream([(e["type"], e) for e in events])["usage"]["cache_read_input_tokens"] == 2
    assert events[0]["type"] == "message_start" and events[0]["message"]["usage"]["input_tokens"] == 3
    assert "cache_read_input_tokens" not in events[0]["message"]["usage"]  # not known yet
    assert any(e["type"] == "message_delta" and e["delta"]["stop_reason"] is None for e in events)
    final = [e for e in events if e["type"] == "message_delta"][-1]
    assert final["delta"]["stop_reason"] == "max_tokens"
    assert (final["usage"]["input_tokens"], final["usage"]["cache_read_input_tokens"]) == (1, 2)


def test_lifespan_loads_models_by_path_and_logs_compile_time_then_address(tiny_llm, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kawai.server"):
        with LiveServer(create_app(ServerSettings(home=tmp_path, auth=False), [str(tiny_llm.path)])) as s:
            assert httpx.get(s.url + "/v1/models").json()["data"][0]["id"] == "tiny-qwen2-f32"
    lines = [r.getMessage() for r in caplog.records if r.name == "kawai.server"]
    compiled = next(i for i, line in enumerate(lines)
                    if line.startswith("loaded tiny-qwen2-f32 in ") and ", kernels warmed in " in line)
    serving = next(i for i, line in enumerate(lines) if line.startswith("serving tiny-qwen2-f32 on http://"))
    assert compiled < serving


def test_health_reports_a_dead_engine_thread(tiny_llm, tmp_path):
    with LiveServer(create_app(ServerSettings(home=tmp_path, auth=False), [tiny_llm])) as s:
        assert httpx.get(s.url + "/health").status_code == 200
        s.state.models["tiny-qwen2-f32"].worker.stop(timeout=5)
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json() == {"status": "unavailable"}
        r = httpx.post(s.url + "/v1/messages", json=body())
        check_error(r, 529, "overloaded_error")


# ---- errors never leak internals -------------------------------------------------------------------


def test_unhandled_exception_is_a_generic_500_logged_with_the_request_id(caplog):
    async def broken(request):
        raise RuntimeError("secret detail in /home/user/.cache/kawai/models/x.gguf")

    routes = [Route("/boom", broken), Route("/v1/messages", broken, methods=["POST"])]
    app = Starlette(routes=routes, middleware=[Middleware(RequestContextMiddleware)])
    with caplog.at_level(logging.ERROR, logger="kawai.api"), LiveServer(app) as s:
        r = httpx.get(s.url + "/boom")
        sdk = anthropic.Anthropic(base_url=s.url, api_key="k", max_retries=0)
        with pytest.raises(anthropic.InternalServerError) as e:  # the SDK's typed error for a 500
            sdk.messages.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 500 and "secret" not in str(e.value.body)
    data = check_error(r, 500, "api_error")
    assert "secret" not in r.text and "/home" not in r.text and "RuntimeError" not in r.text
    logged = "\n".join(rec.getMessage() + (rec.exc_text or "") for rec in caplog.records)
    assert data["request_id"] in logged and "secret detail" in caplog.text


def test_errors_after_the_stream_started_become_an_error_event():
    asyncio.run(_error_events())


async def _error_events():
    start = {"id": "msg_x", "type": "message", "role": "assistant", "content": [], "model": "m",
             "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 0}}

    async def events():
        yield {"type": "message_start", "message": start}
        raise RuntimeError("engine exploded at /secret/path")

    frames = [f async for f in sse_frames(events(), "req_x")]
    parsed = parse_sse(b"".join(frames).decode())
    event, data = parsed[-1]
    assert event == "error" and data["type"] == "error" and data["request_id"] == "req_x"
    assert check_stream(parsed)["error"]["type"] == "api_error"
    assert data["error"]["type"] == "api_error"
    assert "secret" not in data["error"]["message"]

    async def refused():
        yield {"type": "message_start", "message": start}
        raise ApiError("Generation failed.")

    frames = [f async for f in sse_frames(refused(), "req_y")]
    assert json.loads(frames[-1].decode().split("data: ")[1])["error"]["message"] == "Generation failed."
