"""URL pulls against a real http.server on 127.0.0.1: full download, resume after a dropped connection,
servers that ignore Range, checksum mismatch, HTTP errors, unreachable hosts, a full disk."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gguf
import numpy as np
import pytest

from kawai.engine import catalog
from kawai.engine.download import copy_stream, download_file
from kawai.engine.errors import KawaiError
from kawai.engine.gguf import GGUFError, open_gguf


@dataclass
class Behaviour:
    body: bytes
    drop_first: int = 0  # drop the connection after this many body bytes, for the first N responses
    drops_left: int = 0
    reset: bool = False  # drop with a TCP reset instead of a clean close
    honour_range: bool = True
    status: int = 200
    ranges: list[str | None] = field(default_factory=list)  # the Range header of every request


def _handler(b: Behaviour):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def do_GET(self):
            rng = self.headers.get("Range")
            b.ranges.append(rng)
            if b.status != 200:
                self.send_error(b.status)
                return
            start = 0
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if m and b.honour_range:
                start = int(m.group(1))
                if start >= len(b.body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(b.body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(b.body) - 1}/{len(b.body)}")
            else:
                self.send_response(200)
            payload = b.body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if b.drops_left > 0:
                b.drops_left -= 1
                self.wfile.write(payload[: b.drop_first])
                self.wfile.flush()
                if b.reset:  # SO_LINGER 0: close sends RST
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                return
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def serve():
    servers = []

    def start(behaviour: Behaviour, name: str = "Tiny-Model.Q8_0.gguf") -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(behaviour))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/files/{name}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    """A valid ~300 KB GGUF (random Q8_0 weights), big enough to cut in the middle."""
    path = tmp_path_factory.mktemp("m") / "m.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    rng = np.random.default_rng(1)
    w.add_tensor("w", rng.integers(0, 256, size=(256, 34 * 36), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_full_download(serve, tmp_path, model_bytes):
    b = Behaviour(model_bytes)
    dest = tmp_path / "m.gguf"
    digest = download_file(serve(b), dest, sha256=_sha(model_bytes), progress=False)
    assert digest == _sha(model_bytes)
    assert dest.read_bytes() == model_bytes
    assert not (tmp_path / "m.gguf.part").exists()
    assert b.ranges == [None]


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_interrupted_transfer_is_resumed_with_range(serve, tmp_path, model_bytes, reset):
    cut = 100_003
    b = Behaviour(model_bytes, drop_first=cut, drops_left=1, reset=reset)
    dest = tmp_path / "m.gguf"
    download_file(serve(b), dest, sha256=_sha(model_bytes), retry_wait=0, progress=False)
    assert dest.read_bytes() == model_bytes
    assert len(b.ranges) == 2 and b.ranges[0] is None
    if not reset:
        assert b.ranges[1] == f"bytes={cut}-"
    # After a reset the kernel may discard bytes already in flight: resuming from wherever the
    # .part ended (possibly zero) is right; the checksum above proves the result whole.


def test_interruption_keeps_the_part_file_and_a_later_pull_resumes(serve, tmp_path, model_bytes):
    b = Behaviour(model_bytes, drop_first=150_000, drops_left=1)
    url = serve(b)
    dest = tmp_path / "m.gguf"
    with pytest.raises(KawaiError, match="interrupted .* after 150000 bytes; run the same pull again") as e:
        download_file(url, dest, retries=0, progress=False)
    assert "\n" not in str(e.value)
    assert not dest.exists()
    assert (tmp_path / "m.gguf.part").stat().st_size == 150_000
    download_file(url, dest, sha256=_sha(model_bytes), progress=False)
    assert b.ranges == [None, "bytes=150000-"]
    assert dest.read_bytes() == model_bytes


def test_server_ignoring_range_restarts_from_zero(serve, tmp_path, model_bytes):
    b = Behaviour(model_bytes, drop_first=70_000, drops_left=1, honour_range=False)
    dest = tmp_path / "m.gguf"
    download_file(serve(b), dest, sha256=_sha(model_bytes), retry_wait=0, progress=False)
    assert b.ranges == [None, "bytes=70000-"]  # asked to resume, got a 200: the whole body again
    assert dest.read_bytes() == model_bytes


def test_stale_part_longer_than_the_file_restarts(serve, tmp_path, model_bytes):
    dest = tmp_path / "m.gguf"
    (tmp_path / "m.gguf.part").write_bytes(b"x" * (len(model_bytes) + 10))  # server answers 416
    b = Behaviour(model_bytes)
    download_file(serve(b), dest, sha256=_sha(model_bytes), retry_wait=0, progress=False)
    assert dest.read_bytes() == model_bytes
    assert b.ranges == [f"bytes={len(model_bytes) + 10}-", None]


def test_checksum_mismatch_leaves_nothing(serve, tmp_path, model_bytes):
    dest = tmp_path / "m.gguf"
    with pytest.raises(KawaiError, match="checksum mismatch for m.gguf"):
        download_file(serve(Behaviour(model_bytes)), dest, sha256="0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_error_and_unreachable_host(serve, tmp_path, model_bytes):
    with pytest.raises(KawaiError, match="HTTP 404"):
        download_file(serve(Behaviour(model_bytes, status=404)), tmp_path / "m.gguf", progress=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(KawaiError, match=f"cannot reach 127.0.0.1:{port}"):
        download_file(f"http://127.0.0.1:{port}/m.gguf", tmp_path / "m.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []  # not even an empty .part


def test_disk_full_is_one_clear_line():
    with open("/dev/full", "wb", buffering=0) as full:  # the kernel answers every write with ENOSPC
        with pytest.raises(KawaiError, match="disk full") as e:
            copy_stream(io.BytesIO(b"x" * 3_000_000), full, what="downloading m.gguf")
    assert str(e.value) == "downloading m.gguf: disk full; free some space and try again"


def test_copy_stream_refuses_more_than_the_limit():
    with pytest.raises(KawaiError, match="more data than the expected 10 bytes"):
        copy_stream(io.BytesIO(b"x" * 11), io.BytesIO(), what="x", limit=10)


def test_a_concurrent_download_of_the_same_file_is_refused(serve, tmp_path, model_bytes):
    import fcntl

    dest = tmp_path / "m.gguf"
    with open(tmp_path / "m.gguf.part", "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(KawaiError, match="another download of m.gguf is in progress"):
            download_file(serve(Behaviour(model_bytes)), dest, progress=False)


# --- through the catalog: `kawai pull URL` ------------------------------------------------------------

@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KAWAI_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_pull_url_derives_the_id_and_lists_the_model(serve, home, model_bytes):
    url = serve(Behaviour(model_bytes))
    path = catalog.pull(url, sha256=_sha(model_bytes), progress=False)
    assert path == home / "models" / "tiny-model.q8_0.gguf"
    assert open_gguf(path).tensors["w"].shape == (256, 32 * 36)
    [m] = catalog.list_local_models()
    assert (m.id, m.architecture, m.quantization) == ("tiny-model.q8_0", "llama", "Q8_0")
    assert catalog.pull(url, progress=False) == path  # present: no second request needed
    with pytest.raises(KawaiError, match="already exists with another checksum"):
        catalog.pull(url, sha256="1" * 64, progress=False)


def test_pull_url_that_is_not_gguf_leaves_nothing(serve, home):
    url = serve(Behaviour(b"<!DOCTYPE html><html>not a model</html>"), name="page.gguf")
    with pytest.raises(GGUFError, match="magic"):
        catalog.pull(url, progress=False)
    assert [p.name for p in (home / "models").iterdir() if not p.name.startswith(".")] == []
