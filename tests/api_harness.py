"""A real uvicorn server on a free loopback port, in a background thread, for API tests.

    with LiveServer(create_app(settings, [llm])) as server:
        httpx.get(server.url + "/health")

Nothing is mocked: the app, the engine thread and the sockets are the real ones. Also: SSE parsing
for raw-HTTP tests, and a token store pre-filled with tokens for the auth rules. Server test modules
import the module fixtures `home` and `tokens` from here and build their `server` with `live_server`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from kawai.api.app import create_app
from kawai.api.state import ServerSettings
from kawai.api.tokens import ENDPOINTS, Limit, TokenStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app, start_timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, access_log=False,
                                lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self.start_timeout = start_timeout
        self.app = app

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
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


def parse_sse(raw: str) -> list[tuple[str | None, dict]]:
    """(event name, data) per frame; checks each frame's shape on the way."""
    frames = []
    for chunk in raw.split("\n\n"):
        if not chunk.strip():
            continue
        event, data = None, None
        for line in chunk.split("\n"):
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                assert data is None, "one data line per frame"
                data = json.loads(line[len("data: "):])
            else:
                raise AssertionError(f"unexpected SSE line {line!r}")
        frames.append((event, data))
    return frames
