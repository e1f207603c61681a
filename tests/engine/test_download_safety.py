"""Downloads (engine/download.py) never follow https -> http, and an unverified file is said to be so."""

from __future__ import annotations

import logging
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kawai.engine.download import _NoDowngrade, download_file
from kawai.engine.errors import KawaiError

DATA = b"GGUF" + bytes(range(256)) * 10


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/file.bin")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(DATA)))
        self.end_headers()
        self.wfile.write(DATA)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_redirect_from_https_to_http_is_refused():
    handler = _NoDowngrade()
    request = urllib.request.Request("https://models.example/model.gguf")
    with pytest.raises(KawaiError, match="from https to http"):
        handler.redirect_request(request, None, 302, "Found", {}, "http://models.example/model.gguf")
    followed = handler.redirect_request(request, None, 302, "Found", {}, "https://cdn.example/model.gguf")
    assert followed.full_url == "https://cdn.example/model.gguf"


def test_other_redirects_are_followed_and_an_unverified_file_is_named_in_a_warning(server, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kawai.download"):
        digest = download_file(server + "/moved", tmp_path / "m.bin", progress=False)
    assert (tmp_path / "m.bin").read_bytes() == DATA
    assert any("not verified" in r.getMessage() and digest in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kawai.download"):
        download_file(server + "/file.bin", tmp_path / "n.bin", sha256=digest, progress=False)
    assert not caplog.records
