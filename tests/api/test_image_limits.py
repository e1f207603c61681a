"""One request's images are bounded together (api/images.py): memory (pixels counted from the headers
before any decoding, each image downscaled straight after decoding) and time (one deadline for all of a
request's downloads, fetched on the event loop, so slow image hosts hold no thread).

A tiny random Qwen2-VL model served by a real uvicorn server; the image hosts are real loopback servers.
"""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

from kawai import engine
from kawai.api.app import create_app
from kawai.api.images import ImagePolicy, decode_images
from kawai.api.state import ServerSettings
from kawai.engine.vision.multimodal import image_token_count
from kawai.engine.vision.preprocess import DOWNSCALE_MARGIN, decode_image
from api_harness import LiveServer
from pictures import photo
from vision_models import write_tiny_vl
from costs import peak_rss_growth

MB = 1024 * 1024


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return engine.load(write_tiny_vl(tmp_path_factory.mktemp("vl"))[0], threads=1, exact=True)


@pytest.fixture(scope="module")
def server(llm):
    settings = ServerSettings(auth=False, allow_private_image_urls=True, ping_interval=1.0)
    with LiveServer(create_app(settings, [llm])) as s:
        yield s


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def b64_block(data: bytes) -> dict:
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(data).decode()}}


# ---- memory --------------------------------------------------------------------------------------


def test_100_huge_1bit_pngs_are_refused_before_decoding(server, llm):
    """100 8000x8000 1-bit PNGs: ~8 KB each, 100 x 192 MB once decoded to RGB. Refused with a 400 while
    the server's peak memory grows by less than 300 MB."""
    huge = encoded(Image.new("1", (8000, 8000)), "PNG")
    assert len(huge) < 10_000
    body = {"model": llm.id, "max_tokens": 4,
            "messages": [{"role": "user", "content": [b64_block(huge)] * 100 + [{"type": "text", "text": "hi"}]}]}
    responses = []
    grew = peak_rss_growth(lambda: responses.append(httpx.post(server.url + "/v1/messages", json=body, timeout=120)))
    r = responses[0]
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "megapixels" in r.json()["error"]["message"] or "prompt is too long" in r.json()["error"]["message"]
    assert grew < 300 * MB, f"peak RSS grew by {grew / MB:.0f} MB"
    ok = httpx.post(server.url + "/v1/messages", timeout=120, json={
        "model": llm.id, "max_tokens": 2, "messages": [{"role": "user", "content": [b64_block(encoded(photo(100, 73, seed=1), "PNG"))]}]})
    assert ok.status_code == 200


def test_image_tokens_are_counted_before_decoding(llm):
    """Images whose tokens cannot fit the context are refused from their headers alone: the first image
    is corrupt past its header, so decoding any image would give a different error."""
    width, height = 2000, 1500
    count = image_token_count(llm.projector, width, height) + 2
    fits = llm.n_ctx // count
    broken = encoded(Image.new("RGB", (width, height)), "PNG")[:200]  # a valid header, no pixels
    with pytest.raises(Exception, match="prompt is too long: images 1..") as e:
        decode_images([broken] * (fits + 1), ImagePolicy(), lambda w, h: count, llm.n_ctx)
    assert f"{(fits + 1) * count} image tokens" in str(e.value)
    with pytest.raises(Exception, match="corrupt"):
        decode_images([broken] * fits, ImagePolicy(), lambda w, h: count, llm.n_ctx)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_images_are_downscaled_straight_after_decoding(fmt):
    """A 6000x4000 photo for an encoder of 256 tokens (~200k pixels) is decoded to at most
    DOWNSCALE_MARGIN^2 times that (JPEG in draft mode, at 1/8 scale; others reduced), keeping its aspect
    ratio; the peak memory is one decode, not a full-size RGB copy and its conversions."""
    max_pixels = 28 * 28 * 256
    big = photo(600, 400, seed=3).resize((6000, 4000))
    data = encoded(big, fmt, quality=90) if fmt == "JPEG" else encoded(big, fmt)
    images = []
    grew = peak_rss_growth(lambda: images.append(decode_image(data, max_pixels=max_pixels)))
    image = images[0]
    assert image.mode == "RGB" and abs(image.width / image.height - 1.5) < 0.01
    assert max_pixels <= image.width * image.height <= DOWNSCALE_MARGIN**2 * max_pixels
    decoded = 6000 * 4000 * 4  # bytes of the full-size image as Pillow holds RGB (4 bytes a pixel)
    assert grew < (0.25 if fmt == "JPEG" else 1.5) * decoded, f"peak RSS grew by {grew / MB:.0f} MB"
    small = photo(300, 200, seed=4)  # within the bound: decoded as it is
    assert decode_image(encoded(small, "PNG"), max_pixels=max_pixels).tobytes() == small.tobytes()


# ---- time ----------------------------------------------------------------------------------------


class SlowImageHost:
    """A loopback HTTP server that answers every request with one header line every 0.3 s, forever."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/slow.png"
        self.connections = 0
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._dribble, args=(conn,), daemon=True).start()

    def _dribble(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                while not self.stop.is_set():
                    conn.sendall(b"X-Wait: 1\r\n")
                    time.sleep(0.3)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_one_deadline_covers_headers_for_every_image_of_a_request(server, llm):
    """Three URLs whose host sends a header line every 0.3 s: the request ends at its one deadline,
    with the downloads run at the same time (not three deadlines in a row)."""
    host = SlowImageHost()
    try:
        block = {"type": "image", "source": {"type": "url", "url": host.url}}
        body = {"model": llm.id, "max_tokens": 2, "messages": [{"role": "user", "content": [block] * 3}]}
        t0 = time.monotonic()
        r = httpx.post(server.url + "/v1/messages/count_tokens", json=body, timeout=60)
        took = time.monotonic() - t0
    finally:
        host.close()
    assert r.status_code == 400 and "took too long" in r.json()["error"]["message"]
    assert host.connections == 3
    timeout = ImagePolicy().timeout
    assert timeout <= took < 1.5 * timeout


def test_40_slow_image_requests_do_not_stop_a_plain_request(server, llm):
    """40 requests whose images never arrive are in flight; a text request still answers about as fast
    as on an idle server (before: the downloads held all 40 threads of Starlette's pool, ~10 s)."""
    host = SlowImageHost()
    plain = {"model": llm.id, "messages": [{"role": "user", "content": "hello"}]}
    slow = {"model": llm.id, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": host.url}}]}]}

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=100)) as c:
            async def timed() -> float:
                t0 = time.monotonic()
                r = await c.post("/v1/messages/count_tokens", json=plain)
                assert r.status_code == 200
                return time.monotonic() - t0

            idle = min([await timed() for _ in range(3)])
            hostile = [asyncio.create_task(c.post("/v1/messages/count_tokens", json=slow)) for _ in range(40)]
            while host.connections < 40:
                await asyncio.sleep(0.05)
            loaded = await timed()
            results = await asyncio.gather(*hostile)
            return idle, loaded, results

    try:
        idle, loaded, results = asyncio.run(scenario())
    finally:
        host.close()
    assert all(r.status_code == 400 for r in results)
    assert loaded < 2 * idle + 0.5, f"idle {idle:.3f} s, with 40 slow image requests {loaded:.3f} s"
