"""A real uvicorn server on a free loopback port, in a background thread, for API tests.

    with LiveServer(create_app(settings, [llm])) as server:
        httpx.get(server.url + "/health")

Nothing is mocked: the app, the engine thread and the sockets are the real ones. Every Anthropic event
stream the server sends is checked against tests/sse_grammar.py on its way out (SSEGrammarCheck); a
broken one fails the test that asked for it (conftest.py). Also: SSE parsing for raw-HTTP tests, and a
token store pre-filled with tokens for the auth rules. Server test modules import the module fixtures
`home` and `tokens` from here and build their `server` with `live_server`.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from kawai.api.app import create_app
from kawai.api.state import ServerSettings
from kawai.api.api_keys import ENDPOINTS, Limit, TokenStore
from sse_grammar import check_stream, parse_sse  # noqa: F401 (parse_sse: for the test modules)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SSEGrammarCheck:
    """ASGI wrapper: each event stream answering POST /v1/messages is checked with sse_grammar.check_stream
    as its last frame (message_stop or error) goes out, before the client can see it. A stream cut short
    is checked when the response ends, unless the client disconnected. Broken streams are kept in
    `failures` (conftest.py asserts none after each test); `checked` counts the streams seen."""

    def __init__(self, app):
        self.app = app
        self.checked = 0
        self.failures: list[str] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/messages":
            return await self.app(scope, receive, send)
        body: bytearray | None = None  # the event stream so far, once the response is one
        done = disconnected = False

        async def watch_receive():
            nonlocal disconnected
            message = await receive()
            disconnected |= message["type"] == "http.disconnect"
            return message

        async def checked_send(message):
            nonlocal body, done
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                body = bytearray() if content_type.startswith(b"text/event-stream") else None
            elif message["type"] == "http.response.body" and body is not None and not done:
                body += message.get("body", b"")
                last = bytes(body[-4096:]).rstrip(b"\n").rsplit(b"\n\n", 1)[-1]  # the last frame
                finished = body.endswith(b"\n\n") and last.startswith((b"event: message_stop", b"event: error"))
                if finished or (not message.get("more_body", False) and not disconnected):
                    done = True
                    self.check(body.decode())
            await send(message)

        await self.app(scope, watch_receive, checked_send)

    def check(self, raw: str) -> None:
        self.checked += 1
        try:
            check_stream(parse_sse(raw))
        except (AssertionError, KeyError, TypeError, ValueError) as e:
            self.failures.append(f"{type(e).__name__}: {e}\n{raw[-2000:]}")


class LiveServer:
    running: set[LiveServer] = set()  # started and not yet stopped (conftest.py checks their streams)

    def __init__(self, app, start_timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sse = SSEGrammarCheck(app)
        config = uvicorn.Config(self.sse, host="127.0.0.1", port=self.port, log_config=None, access_log=False,
                                lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self.start_timeout = start_timeout
        self.app = app

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit:  # uvicorn's answer to a failed start-up; __enter__ reports it
            pass

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        LiveServer.running.add(self)
        return self

    def __exit__(self, *exc) -> None:
        LiveServer.running.discard(self)
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        return self.app.state.server


def live_server(home: Path, models: list, **settings) -> LiveServer:
    """A (not yet started) LiveServer for create_app(ServerSettings(home=home, **settings), models)."""
    return LiveServer(create_app(ServerSettings(home=home, **settings), models))


@dataclass(frozen=True)
class Tokens:
    all: str  # every grant
    messages_only: str
    models_only: str
    limited: str  # every grant, 2 requests per day
    all_id: str


def make_tokens(home: Path) -> Tokens:
    store = TokenStore(home)
    rec, full = store.create("all", ENDPOINTS)
    _, messages = store.create("messages-only", ("messages",))
    _, models = store.create("models-only", ("models",))
    _, limited = store.create("limited", ENDPOINTS, Limit(2, "day"))
    return Tokens(full, messages, models, limited, rec.id)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A fresh Kawai home (and token store) per test module."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def tokens(home) -> Tokens:
    return make_tokens(home)
