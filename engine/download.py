"""HTTP(S) download of one file: streamed, resumable with Range, checksummed, renamed atomically.

The body is written to `<dest>.part`. After an interruption the `.part` file stays; the next attempt (a
retry within the same call, or a later call) sends `Range: bytes=<have>-` and appends. A server that
answers 200 instead of 206, or a Content-Range that does not start where we stopped, gets a fresh start.
Only a complete file whose checksum (when given) and validation pass is renamed to `dest`, so a file with
the final name is always whole. A file with no checksum to check is accepted with a warning that gives its
SHA-256. Redirects are followed, except from https to http (a downgrade anyone on the path could answer).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from tqdm import tqdm

from kawai.engine.errors import KawaiError

log = logging.getLogger("kawai.download")

CHUNK_BYTES = 1 << 20
USER_AGENT = "kawai/0.1"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# "The transfer broke off" (IncompleteRead, RemoteDisconnected, resets, timeouts): keep .part, resume.
_INTERRUPTED = (http.client.HTTPException, OSError)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def progress_bar(total: int | None, desc: str, *, initial: int = 0, enabled: bool = True) -> tqdm:
    """A byte-counting progress bar on stderr."""
    return tqdm(
        total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        disable=not enabled, leave=False, dynamic_ncols=True,
    )


def copy_stream(src: BinaryIO, dst: BinaryIO, *, what: str, hasher=None, bar: tqdm | None = None,
                limit: int | None = None) -> int:
    """Copy `src` to `dst` in 1 MiB chunks, feeding `hasher` and `bar`; returns the bytes copied.

    More than `limit` bytes is an error (a source larger than it claimed). A full disk is a KawaiError;
    errors raised while reading `src` pass through unchanged so the caller can tell them apart.
    """
    copied = 0
    while True:
        chunk = src.read(CHUNK_BYTES)
        if not chunk:
            break
        copied += len(chunk)
        if limit is not None and copied > limit:
            raise KawaiError(f"{what}: more data than the expected {limit} bytes")
        with disk_errors(what):
            dst.write(chunk)
        if hasher is not None:
            hasher.update(chunk)
        if bar is not None:
            bar.update(len(chunk))
    with disk_errors(what):
        dst.flush()
    return copied


@contextmanager
def disk_errors(what: str) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT inside the block into a one-line KawaiError; other OSErrors pass."""
    try:
        yield
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise KawaiError(f"{what}: disk full; free some space and try again") from None
        raise


def file_sha256(path: Path, *, desc: str = "verifying", progress: bool = False) -> str:
    """SHA-256 of a file, read in chunks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f, progress_bar(path.stat().st_size, desc, enabled=progress) as bar:
        while chunk := f.read(CHUNK_BYTES):
            hasher.update(chunk)
            bar.update(len(chunk))
    return hasher.hexdigest()


class _PartFile:
    """The `.part` file and the SHA-256 of the bytes in it, kept in step across resumes."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.hasher = hashlib.sha256()
        out.seek(0)
        while chunk := out.read(CHUNK_BYTES):
            self.hasher.update(chunk)

    @property
    def size(self) -> int:
        return self.out.seek(0, os.SEEK_END)

    def restart(self) -> None:
        self.out.truncate(0)
        self.out.seek(0)
        self.hasher = hashlib.sha256()


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    validate: Callable[[Path], object] | None = None,
    retries: int = 3,
    retry_wait: float = 1.0,
    timeout: float = 30.0,
    progress: bool = True,
) -> str:
    """Download `url` to `dest`; returns the file's SHA-256 (hex).

    `sha256` (hex) is checked before the rename; `validate(part_path)` may raise to reject the content
    (both failures delete the partial file). Up to `retries` interruptions are resumed in this call;
    after that the `.part` file is kept and a KawaiError says so.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise KawaiError(f"only http and https URLs can be downloaded, not {scheme or 'a bare path'!r}")
    name = dest.name
    part_path = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(part_path, "a+b") as out:
        try:
            fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KawaiError(f"another download of {name} is in progress") from None
        part = _PartFile(out)
        try:
            _fetch_with_retries(url, part, name=name, retries=retries, retry_wait=retry_wait,
                                timeout=timeout, progress=progress)
        except BaseException:
            if part.size == 0:  # nothing to resume: leave no empty .part behind
                part_path.unlink(missing_ok=True)
            raise
        digest = part.hasher.hexdigest()
        try:
            if sha256 is not None and digest != sha256.lower():
                raise KawaiError(f"checksum mismatch for {name}: expected sha256 {sha256.lower()}, got {digest}")
            if validate is not None:
                validate(part_path)
            with disk_errors(f"downloading {name}"):
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            part_path.unlink(missing_ok=True)
            raise
        os.replace(part_path, dest)
    if sha256 is None:
        log.warning("%s was not verified (no --sha256 given); its sha256 is %s", name, digest)
    return digest


def _fetch_with_retries(url: str, part: _PartFile, *, name: str, retries: int, retry_wait: float,
                        timeout: float, progress: bool) -> None:
    attempt = 0
    while True:
        try:
            if _fetch(url, part, name=name, timeout=timeout, progress=progress):
                return
            reason = "the connection closed early"
        except _INTERRUPTED as e:
            reason = type(e).__name__
        attempt += 1
        if attempt > retries:
            raise KawaiError(
                f"download of {name} interrupted ({reason}) after {part.size} bytes; "
                "run the same pull again to resume"
            )
        time.sleep(retry_wait * attempt)


def _fetch(url: str, part: _PartFile, *, name: str, timeout: float, progress: bool) -> bool:
    """One request, resuming from the end of `part`; True when the body arrived whole."""
    have = part.size
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = _OPENER.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:  # the .part is no prefix of what the server has now
            part.restart()
            return False
        raise KawaiError(f"download of {name} failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise KawaiError(f"cannot reach {urllib.parse.urlsplit(url).netloc}: {e.reason}") from None
    with resp:
        if resp.status == 206:
            total = _resumed_total(resp, have)
            if total is None:  # a range that does not continue where we stopped
                part.restart()
                return False
        else:  # 200: the server ignored Range (or there was none): the body is the whole file
            if have:
                part.restart()
                have = 0
            total = _content_length(resp)
        with progress_bar(total, name, initial=have, enabled=progress) as bar:
            copy_stream(resp, part.out, what=f"downloading {name}", hasher=part.hasher, bar=bar,
                        limit=None if total is None else total - have)
    # http.client returns EOF, not an error, when a Content-Length body is cut short: compare sizes.
    return total is None or part.size == total


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but never from https to http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlsplit(req.full_url).scheme, urllib.parse.urlsplit(newurl).scheme
        if old.lower() == "https" and new.lower() != "https":
            raise KawaiError(f"refusing a redirect from https to {new or 'a relative'} URL: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_NoDowngrade)


def _resumed_total(resp, have: int) -> int | None:
    """The full size from a 206 `Content-Range: bytes have-end/total`, or None if it starts elsewhere."""
    m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    if m is None or int(m.group(1)) != have:
        return None
    if m.group(3) == "*":
        length = _content_length(resp)
        return None if length is None else have + length
    return int(m.group(3))


def _content_length(resp) -> int | None:
    value = resp.headers.get("Content-Length", "").strip()
    return int(value) if value.isdigit() else None
