"""Host name lookups of image URLs (api/images.py, Resolver): in a dedicated bounded pool of threads, never the
event loop's default executor or the worker threads that decode and render requests; each name once per
request, a few at a time; under the request's one deadline even when the system resolver hangs.

A hanging DNS server is stood in for by wrapping socket.getaddrinfo: names under `.slow.test` block until the
test releases them (as a lookup blocks on an unanswering server); every other name goes to the real resolver."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import pytest

from kawai.api.errors import InvalidRequestError
from kawai.api.images import DNS_PER_REQUEST, ImagePolicy, Resolver, gather_image_bytes
from kawai.api.wire import UrlImageSource
from test_image_fetch import PNG


class HangingDNS:
    """Lookups of `*.slow.test` hang until `release`; the rest are real. Records what ran where."""

    def __init__(self, monkeypatch):
        self.real = socket.getaddrinfo
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.threads: set[str] = set()
        self.names: list[str] = []
        self.hanging = self.most_hanging = 0
        monkeypatch.setattr(socket, "getaddrinfo", self.getaddrinfo)

    def getaddrinfo(self, host, *args, **kwargs):
        with self.lock:
            self.threads.add(threading.current_thread().name)
            self.names.append(host)
        if not str(host).endswith(".slow.test"):
            return self.real(host, *args, **kwargs)
        with self.lock:
            self.hanging += 1
            self.most_hanging = max(self.most_hanging, self.hanging)
        self.released.wait(30)
        with self.lock:
            self.hanging -= 1
        raise socket.gaierror("no answer")


@pytest.fixture
def dns(monkeypatch):
    hanging = HangingDNS(monkeypatch)
    yield hanging
    hanging.released.set()


def urls(*hosts: str) -> list[UrlImageSource]:
    return [UrlImageSource(type="url", url=f"http://{h}/img.png") for h in hosts]


def test_hanging_lookups_hold_only_their_own_threads_and_end_at_the_deadline(dns):
    """Three requests, 8 hanging host names each, 1 s deadline: each ends with a 400 at its deadline; at most
    DNS_PER_REQUEST lookups of a request and the pool's size in all run at once, all in `kawai-dns` threads;
    meanwhile the default executor and anyio's worker threads answer at once."""
    resolver = Resolver(threads=6)
    policy = ImagePolicy(timeout=1.0, resolver=resolver)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def hostile(n: int) -> float:
            t0 = time.monotonic()
            with pytest.raises(InvalidRequestError, match="took too long"):
                await gather_image_bytes(urls(*(f"h{n}-{i}.slow.test" for i in range(8))), policy)
            return time.monotonic() - t0

        tasks = [asyncio.create_task(hostile(n)) for n in range(3)]
        await asyncio.sleep(0.3)  # the lookups are hanging now
        t0 = time.monotonic()
        assert await loop.run_in_executor(None, lambda: 7) == 7
        assert await anyio.to_thread.run_sync(lambda: 8) == 8
        assert time.monotonic() - t0 < 0.5
        waited = await asyncio.gather(*tasks)
        assert all(0.9 < w < 3.0 for w in waited), waited

    asyncio.run(scenario())
    assert dns.threads and all(name.startswith("kawai-dns") for name in dns.threads), dns.threads
    assert dns.most_hanging <= 6 and len(dns.threads) <= 6
    assert len(dns.names) <= 3 * DNS_PER_REQUEST + 6  # the rest were still waiting in line when time ran out


class ImageHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)


def test_each_host_is_looked_up_once_per_request(dns):
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        policy = ImagePolicy(allow_private=True, resolver=Resolver(threads=2))
        sources = urls(*[f"localhost:{port}"] * 5)
        assert asyncio.run(gather_image_bytes(sources, policy)) == [PNG] * 5
        assert dns.names == ["localhost"]
        assert asyncio.run(gather_image_bytes(sources[:2], policy)) == [PNG] * 2  # a new request looks again
        assert dns.names == ["localhost"] * 2
    finally:
        server.shutdown()
