"""Work before the queue is bounded (api/limits.py, api/routes_messages.py, api/commands/serve.py): a token's
in-flight requests are counted from their first byte, a body must arrive within its deadline, uvicorn
refuses connections past `max_connections`, and a prompt is rendered once. Real uvicorn servers on
loopback, raw sockets for the slow clients."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from kawai import engine
from kawai.api.app import create_app
from kawai.api.commands.serve import uvicorn_config
from kawai.api.prompt import build_prompt
from kawai.api.state import ServerSettings
from kawai.api.wire import MessagesRequest, parse_request
from api_harness import LiveServer, free_port
from tiny_models import write_tiny_model

BODY = json.dumps({"model": "tiny-qwen2-f32", "max_tokens": 2,
                   "messages": [{"role": "user", "content": "hello"}]}).encode()


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", n_ctx=256), threads=1)


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def stalled_request(url: str, path: str = "/v1/messages/count_tokens") -> socket.socket:
    """A connection that sends the headers and half the body, then waits."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n").encode()
    sock.sendall(head + BODY[: len(BODY) // 2])
    return sock


def response_of(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_in_flight_requests_of_a_token_count_from_their_first_byte(tiny_llm, tmp_path):
    """Two requests of the token are still sending their bodies (no job queued yet): a third is refused
    with 429 at once; when they end, the token may send again."""
    app = create_app(ServerSettings(home=tmp_path, auth=False, max_per_token=2), [tiny_llm])
    with LiveServer(app) as server:
        slow = [stalled_request(server.url) for _ in range(2)]
        wait_for(lambda: len(server.server.server_state.connections) == 2)  # both are being read
        r = httpx.post(server.url + "/v1/messages/count_tokens", content=BODY, timeout=10)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        for sock in slow:
            sock.sendall(BODY[len(BODY) // 2 :])
            assert response_of(sock)[0] == 200
            sock.close()
        r = httpx.post(server.url + "/v1/messages", content=BODY, timeout=60)
        assert r.status_code == 200


def test_a_body_must_arrive_within_its_deadline(tiny_llm, tmp_path):
    app = create_app(ServerSettings(home=tmp_path, auth=False, body_seconds=1.0), [tiny_llm])
    with LiveServer(app) as server:
        sock = stalled_request(server.url)
        t0 = time.monotonic()
        status, body = response_of(sock)
        sock.close()
    assert status == 400 and "did not arrive within 1 s" in json.loads(body)["error"]["message"]
    assert time.monotonic() - t0 < 10


def test_connections_past_max_connections_get_503(tiny_llm, tmp_path):
    """`kawai serve`'s uvicorn configuration: limit_concurrency = max_connections, so a request arriving
    while the server holds that many connections (its own included) gets 503."""
    settings = ServerSettings(home=tmp_path, auth=False, max_connections=3, port=free_port())
    config = uvicorn_config(settings, create_app(settings, [tiny_llm]))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{settings.port}"
        slow = [stalled_request(url) for _ in range(2)]
        wait_for(lambda: len(server.server_state.connections) == 2)
        r = httpx.get(url + "/health", timeout=10)
        assert r.status_code == 503
        for sock in slow:
            sock.close()
        wait_for(lambda: not server.server_state.connections)
        assert httpx.get(url + "/health", timeout=10).status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_prompt_is_rendered_once_and_its_marked_copy_once(tiny_llm):
    renders = []
    template = tiny_llm.chat_template
    real_render = template.render

    def counted(*args, **kwargs):
        renders.append(1)
        return real_render(*args, **kwargs)

    template.render = counted
    try:
        req = parse_request(MessagesRequest, json.loads(BODY))
        prompt = build_prompt(tiny_llm, req)
    finally:
        del template.render
    assert len(renders) == 2 and prompt.ids and "<|im_start|>user\nhello<|im_end|>" in prompt.text
