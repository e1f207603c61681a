"""Image blocks -> decoded RGB images: base64 data, or an http(s) URL fetched under the rules of
docs/security.md ("Image URLs and image bytes").

    policy = ImagePolicy(allow_private=False)
    image = load_image(block.source, policy)      # PIL.Image (RGB); InvalidRequestError on any failure

URL fetching: one parser (urllib.parse.urlsplit) for checking and fetching; only http and https; the
host is resolved once and every address it resolves to must be public (loopback, private, link-local,
multicast, reserved and unspecified refused, IPv4-mapped / 6to4 / Teredo IPv6 checked as the IPv4
inside); the connection goes to the checked address (TLS still verifies the host name); redirects are
refused; the body is streamed with a hard byte cap and an overall deadline, Content-Length is only a
hint. `allow_private` (`kawai serve --allow-private-image-urls`) admits loopback and private networks,
never link-local (cloud metadata), multicast or reserved addresses.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from PIL import Image

from kawai.api.errors import InvalidRequestError
from kawai.engine.vision.preprocess import MAX_SIDE, ImageError, decode_image, sniff_format

MAX_IMAGES_PER_REQUEST = 100
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # one image, decoded base64 or downloaded
FETCH_TIMEOUT_SECONDS = 10.0  # whole download: connect, headers and body
USER_AGENT = "kawai-image-fetch/1"


@dataclass(frozen=True)
class ImagePolicy:
    allow_private: bool = False  # loopback and private addresses for image URLs (local deployments)
    max_bytes: int = MAX_IMAGE_BYTES
    timeout: float = FETCH_TIMEOUT_SECONDS
    max_side: int = MAX_SIDE


def load_image(source, policy: ImagePolicy) -> Image.Image:
    """An image block's source (api.wire Base64ImageSource or UrlImageSource) -> RGB image."""
    if source.type == "base64":
        data = decode_base64(source.data, policy.max_bytes)
        where = "image data"
    else:
        data = fetch_image(source.url, policy)
        where = "image at the url"
    if sniff_format(data) is None:
        raise InvalidRequestError(f"{where} is not a JPEG, PNG, GIF or WebP image")
    try:
        return decode_image(data, policy.max_side)
    except ImageError as e:
        raise InvalidRequestError(f"{where}: {e}") from None


def decode_base64(text: str, max_bytes: int) -> bytes:
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise InvalidRequestError(f"image data is larger than {max_bytes // (1024 * 1024)} MB")
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("image data is not valid base64") from None
    if not data:
        raise InvalidRequestError("image data is empty")
    return data


# ---- URLs ----------------------------------------------------------------------------------------


def check_address(address: str, allow_private: bool) -> None:
    """Refuse an address an image URL may not reach (InvalidRequestError, without the address)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return check_address(str(ip.ipv4_mapped), allow_private)
        for inner in (ip.sixtofour, ip.teredo[1] if ip.teredo else None):
            if inner is not None:
                check_address(str(inner), allow_private)
    if ip.is_loopback and allow_private:  # ::1 counts as reserved too
        return None
    if ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        raise InvalidRequestError("image url: the host resolves to a non-public address")
    if ip.is_global:
        return None
    if ip.is_loopback or ip.is_private:
        if allow_private:
            return None
        raise InvalidRequestError(
            "image url: the host resolves to a private or loopback address (a local deployment may allow "
            "them with `kawai serve --allow-private-image-urls`)"
        )
    raise InvalidRequestError("image url: the host resolves to a non-public address")


def fetch_image(url: str, policy: ImagePolicy) -> bytes:
    """GET an image URL under the rules above; the body's bytes."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidRequestError("image url: only http and https URLs are fetched")
    try:
        host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise InvalidRequestError("image url: invalid port") from None
    if not host:
        raise InvalidRequestError("image url: no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequestError("image url: credentials in URLs are not accepted")
    deadline = time.monotonic() + policy.timeout
    address = _resolve(host, port, policy.allow_private)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = _connection(scheme, host, port, address, _remaining(deadline))
    try:
        try:
            conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Connection": "close"})
            response = conn.getresponse()
        except (OSError, http.client.HTTPException):
            raise InvalidRequestError("image url: could not fetch the image (connection failed)") from None
        if 300 <= response.status < 400:
            raise InvalidRequestError("image url: redirects are not followed; send the final URL")
        if response.status != 200:
            raise InvalidRequestError(f"image url: the server answered HTTP {response.status}")
        return _read_capped(conn, response, policy.max_bytes, deadline)
    finally:
        conn.close()


def _resolve(host: str, port: int, allow_private: bool) -> str:
    """Resolve once; every address must pass; the first one is the one connected to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise InvalidRequestError("image url: the host name does not resolve") from None
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise InvalidRequestError("image url: the host name does not resolve")
    for address in addresses:
        check_address(address, allow_private)
    return addresses[0]


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise InvalidRequestError("image url: the download took too long")
    return left


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to an already checked address (the Host header keeps the name)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = self.pinned_sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an already checked address; the certificate is verified for the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.pinned_sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _connection(scheme: str, host: str, port: int, address: str, timeout: float) -> http.client.HTTPConnection:
    cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    return cls(host, port, address, timeout)


def _read_capped(conn, response, max_bytes: int, deadline: float) -> bytes:
    declared = response.getheader("content-length", "")
    too_large = InvalidRequestError(f"image url: the image is larger than {max_bytes // (1024 * 1024)} MB")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, total = [], 0
    try:
        while True:
            conn.pinned_sock.settimeout(_remaining(deadline))  # conn.sock is None once the response holds it
            chunk = response.read1(65536)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise too_large
            chunks.append(chunk)
            _remaining(deadline)
    except (OSError, http.client.HTTPException):
        raise InvalidRequestError("image url: the download failed or took too long") from None
    if not total:
        raise InvalidRequestError("image url: the response is empty")
    return b"".join(chunks)
