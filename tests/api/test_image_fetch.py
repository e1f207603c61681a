"""Image URL fetching and image bytes (docs/security.md, "Image URLs and image bytes"), against a real
local HTTP server: private hosts refused unless allowed, redirects refused, byte cap without trusting
Content-Length, overall timeout, magic bytes; base64 errors are client errors."""

from __future__ import annotations

import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from kawai.api.errors import InvalidRequestError
from kawai.api.images import ImagePolicy, check_address, decode_base64, fetch_image, load_image
from kawai.api.wire import Base64ImageSource, UrlImageSource


def png_bytes(w=40, h=30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


PNG = png_bytes()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _send(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self):
        if self.path == "/img.png":
            self._send(200, PNG, [("Content-Type", "image/png"), ("Content-Length", str(len(PNG)))])
        elif self.path == "/redirect":
            self._send(302, headers=[("Location", "/img.png"), ("Content-Length", "0")])
        elif self.path == "/html":
            body = b"<html>not an image</html>"
            self._send(200, body, [("Content-Type", "image/png"), ("Content-Length", str(len(body)))])
        elif self.path == "/liar":  # declares 100 bytes, sends 50 KB
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(PNG[:8] + b"\0" * 50_000)
        elif self.path == "/unbounded":  # no Content-Length, keeps sending
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"\0" * 10_000)
            except OSError:
                pass
        elif self.path == "/slow":  # a byte every 0.2 s: each read is quick, the whole is not
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif self.path == "/missing":
            self._send(404, b"no", [("Content-Length", "2")])
        else:
            self._send(500)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


ALLOW = ImagePolicy(allow_private=True)


def test_loopback_allowed_with_the_flag(server):
    assert fetch_image(server + "/img.png", ALLOW) == PNG
    image = load_image(UrlImageSource(type="url", url=server + "/img.png"), ALLOW)
    assert image.size == (40, 30) and image.mode == "RGB"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.1", "0x7f000001", "[::ffff:127.0.0.1]"])
def test_loopback_refused_by_default(server, host):
    port = server.rsplit(":", 1)[1]
    with pytest.raises(InvalidRequestError, match="private or loopback|non-public|does not resolve"):
        fetch_image(f"http://{host}:{port}/img.png", ImagePolicy())


def test_redirects_are_refused(server):
    with pytest.raises(InvalidRequestError, match="redirects are not followed"):
        fetch_image(server + "/redirect", ALLOW)


def test_byte_cap_does_not_trust_content_length(server):
    policy = ImagePolicy(allow_private=True, max_bytes=20_000)
    with pytest.raises(InvalidRequestError, match="larger than"):
        fetch_image(server + "/unbounded", policy)  # no Content-Length: counted as it arrives
    assert len(fetch_image(server + "/liar", policy)) <= 100  # a short declared length admits no more
    with pytest.raises(InvalidRequestError, match="corrupt"):
        load_image(UrlImageSource(type="url", url=server + "/liar"), policy)


def test_overall_timeout(server):
    with pytest.raises(InvalidRequestError, match="too long"):  # /slow drips for 20 s: only the 1 s timeout ends it
        fetch_image(server + "/slow", ImagePolicy(allow_private=True, timeout=1.0))


def test_wrong_magic_and_http_errors(server):
    with pytest.raises(InvalidRequestError, match="not a JPEG, PNG, GIF or WebP"):
        load_image(UrlImageSource(type="url", url=server + "/html"), ALLOW)
    with pytest.raises(InvalidRequestError, match="HTTP 404"):
        fetch_image(server + "/missing", ALLOW)


@pytest.mark.parametrize(
    "url, message",
    [
        ("file:///etc/passwd", "only http and https"),
        ("ftp://example.com/a.png", "only http and https"),
        ("gopher://127.0.0.1/", "only http and https"),
        ("http://user:pw@example.com/a.png", "credentials"),
        ("http://example.com:99999/a.png", "invalid port"),
        ("http:///a.png", "no host"),
        ("http://no-such-host.invalid/a.png", "does not resolve"),
    ],
)
def test_bad_urls(url, message):
    with pytest.raises(InvalidRequestError, match=message):
        fetch_image(url, ALLOW)


@pytest.mark.parametrize(
    "address, allowed_by_default, allowed_with_flag",
    [
        ("8.8.8.8", True, True),
        ("2606:4700:4700::1111", True, True),
        ("127.0.0.1", False, True),
        ("10.1.2.3", False, True),
        ("192.168.0.1", False, True),
        ("172.16.0.1", False, True),
        ("::1", False, True),
        ("fd00::1", False, True),
        ("::ffff:127.0.0.1", False, True),  # IPv4-mapped
        ("::ffff:8.8.8.8", True, True),
        ("2002:7f00:1::", False, True),  # 6to4 around 127.0.0.1
        ("169.254.169.254", False, False),  # cloud metadata: never
        ("::ffff:169.254.169.254", False, False),
        ("fe80::1", False, False),
        ("224.0.0.1", False, False),
        ("ff02::1", False, False),
        ("0.0.0.0", False, False),
        ("::", False, False),
        ("240.0.0.1", False, False),  # reserved
        ("100.64.0.1", False, False),  # shared address space (carrier NAT)
    ],
)
def test_address_rules(address, allowed_by_default, allowed_with_flag):
    for allow, expected in ((False, allowed_by_default), (True, allowed_with_flag)):
        if expected:
            check_address(address, allow)
        else:
            with pytest.raises(InvalidRequestError):
                check_address(address, allow)


def test_base64_errors_are_client_errors():
    policy = ImagePolicy()
    good = base64.b64encode(PNG).decode()
    assert load_image(Base64ImageSource(type="base64", media_type="image/png", data=good), policy).size == (40, 30)
    for data, message in [
        ("not base64!!", "not valid base64"),
        ("", "empty"),
        (base64.b64encode(b"GIF89a" + b"\0" * 20).decode(), "corrupt"),  # right magic, broken image
        (base64.b64encode(b"%PDF-1.4 hello").decode(), "not a JPEG, PNG, GIF or WebP"),
        (base64.b64encode(PNG[:60]).decode(), "corrupt"),  # truncated
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            load_image(Base64ImageSource(type="base64", media_type="image/png", data=data), policy)
    with pytest.raises(InvalidRequestError, match="larger than"):
        decode_base64("A" * 2_000_000, 1024 * 1024)


def test_pixel_cap():
    buf = io.BytesIO()
    Image.new("L", (8001, 2)).save(buf, "PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    with pytest.raises(InvalidRequestError, match="at most 8000"):
        load_image(Base64ImageSource(type="base64", media_type="image/png", data=data), ImagePolicy())
