"""Image blocks -> decoded RGB images: base64 data, or an http(s) URL fetched under the rules of
docs/security.md ("Image URLs and image bytes"), with every request's images bounded together.

    data = await gather_image_bytes(sources, policy)         # on the event loop: URLs fetched concurrently
    images = decode_images(data, policy, count, max_tokens)  # in a worker thread: headers first, then pixels

One request's images share one budget, so one request cannot take the server's memory or threads:
- bytes: each image at most `max_bytes`, all of them at most `max_request_bytes`;
- time: one deadline (`timeout`) covers every download of the request: DNS, connect, headers and body,
  the URLs fetched concurrently (at most MAX_CONCURRENT_FETCHES at once) on the event loop, holding no
  thread while they wait;
- threads: host names are looked up (getaddrinfo blocks) in a dedicated, bounded pool (`Resolver`, DNS_THREADS
  for the process), each name once per request and at most DNS_PER_REQUEST at a time, never in the event
  loop's default executor or the threads that decode and render requests: a lookup cannot be cancelled (its
  thread waits for the system resolver even after the request's deadline), so slow DNS can only delay other
  lookups;
- pixels: every image's size is read from its header before any is decoded; their sum is at most
  `max_request_pixels`, and their image tokens (counted from those sizes) must fit in the context;
- memory: each image is downscaled straight after decoding (engine.vision.preprocess.decode_image with
  the encoder's max_pixels), so only one full-size image exists at a time.

URL fetching: one parser (urllib.parse.urlsplit) for checking and fetching; only http and https; the
host is resolved once and every address it resolves to must be public (loopback, private, link-local,
multicast, reserved and unspecified refused, IPv4-mapped / 6to4 / Teredo IPv6 checked as the IPv4
inside); the connection goes to the checked address (TLS still verifies the host name); redirects are
refused; h11 parses the response; the body is read with a hard byte cap, Content-Length is only a hint.
`allow_private` (`kawai serve --allow-private-image-urls`) admits loopback and private networks, never
link-local (cloud metadata), multicast or reserved addresses.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
import ssl
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
from PIL import Image

from kawai.api.errors import InvalidRequestError
from kawai.engine.vision.preprocess import MAX_SIDE, ImageError, decode_image, probe_image, sniff_format

MAX_IMAGES_PER_REQUEST = 100
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # one image, decoded base64 or downloaded
MAX_REQUEST_IMAGE_BYTES = 64 * 1024 * 1024  # all images of one request
MAX_REQUEST_PIXELS = 2 * MAX_SIDE * MAX_SIDE  # source pixels of all images of one request (128 megapixels)
FETCH_TIMEOUT_SECONDS = 10.0  # one deadline for all downloads of a request: DNS, connect, headers and body
MAX_CONCURRENT_FETCHES = 8  # downloads of one request at once
DNS_THREADS = 16  # host name lookups at once, in the whole process
DNS_PER_REQUEST = 4  # lookups of one request at once
USER_AGENT = "kawai-image-fetch/1"
MB = 1024 * 1024


class Resolver:
    """Host name lookups (socket.getaddrinfo, which blocks) in their own bounded set of threads, made as
    they are needed. Lookups past `threads` wait in line; one whose request gives up before it starts never
    runs."""

    def __init__(self, threads: int = DNS_THREADS):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="kawai-dns")

    async def lookup(self, host: str, port: int) -> list[str]:
        """The addresses `host` resolves to (OSError, UnicodeError as getaddrinfo raises them)."""
        infos = await asyncio.get_running_loop().run_in_executor(
            self.pool, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        return [info[4][0] for info in infos]


DNS = Resolver()  # the process's lookups (like the event loop's default executor, shared by every app)


@dataclass(frozen=True)
class ImagePolicy:
    allow_private: bool = False  # loopback and private addresses for image URLs (local deployments)
    max_bytes: int = MAX_IMAGE_BYTES
    max_request_bytes: int = MAX_REQUEST_IMAGE_BYTES
    max_request_pixels: int = MAX_REQUEST_PIXELS
    timeout: float = FETCH_TIMEOUT_SECONDS
    max_side: int = MAX_SIDE
    resolver: Resolver = DNS


async def gather_image_bytes(sources: Sequence, policy: ImagePolicy) -> list[bytes]:
    """The bytes of each image source (api.wire Base64ImageSource or UrlImageSource), in order: base64
    decoded, URLs fetched concurrently under one deadline for all of them. InvalidRequestError on any
    failure (the first one; the other downloads are cancelled)."""
    data: list[bytes | None] = [
        decode_base64(s.data, policy.max_bytes) if s.type == "base64" else None for s in sources
    ]
    budget = _ByteBudget(policy.max_request_bytes)
    for d in data:
        if d is not None:
            budget.take(len(d))
    urls = [(i, s.url) for i, s in enumerate(sources) if s.type != "base64"]
    if urls:
        gate = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)
        lookups = _Lookups(policy)

        async def fetch(i: int, url: str) -> None:
            async with gate:
                data[i] = await _fetch(url, policy, budget, lookups)

        try:
            async with asyncio.timeout(policy.timeout), asyncio.TaskGroup() as group:
                for i, url in urls:
                    group.create_task(fetch(i, url))
        except TimeoutError:
            raise InvalidRequestError(
                f"image url: the downloads took too long (at most {policy.timeout:g} s for all images of a request)"
            ) from None
        except BaseExceptionGroup as group_error:
            raise _first_client_error(group_error) from None
    return data  # type: ignore[return-value] - every slot is filled


def decode_images(
    data: Sequence[bytes],
    policy: ImagePolicy,
    count_tokens: Callable[[int, int], int] | None = None,
    max_tokens: int | None = None,
    max_pixels: int | None = None,
) -> list[Image.Image]:
    """Image bytes -> RGB images. Every header is read first: the pixels of all images are summed (at
    most policy.max_request_pixels) and, with `count_tokens(width, height)`, their prompt tokens (at most
    `max_tokens`, the context window), so a request that cannot fit is refused before any decoding.
    Then each image is decoded and downscaled to about `max_pixels` (the encoder's) at once."""
    pixels = tokens = 0
    for i, d in enumerate(data):
        width, height = _checked(d, lambda: probe_image(d, policy.max_side), i, len(data))
        pixels += width * height
        if pixels > policy.max_request_pixels:
            raise InvalidRequestError(
                f"images are too large together: at most {policy.max_request_pixels // 1_000_000} megapixels "
                f"per request (image {i + 1} of {len(data)} passes it)"
            )
        if count_tokens is not None and max_tokens is not None:
            tokens += count_tokens(width, height)
            if tokens > max_tokens:
                raise InvalidRequestError(
                    f"prompt is too long: images 1..{i + 1} of {len(data)} already take {tokens} image tokens; "
                    f"the model's context window is {max_tokens} tokens"
                )
    return [_checked(d, lambda d=d: decode_image(d, policy.max_side, max_pixels), i, len(data))
            for i, d in enumerate(data)]


def _checked(data: bytes, read: Callable, i: int, n: int):
    where = "image data" if n == 1 else f"image {i + 1} of {n}"
    if sniff_format(data) is None:
        raise InvalidRequestError(f"{where} is not a JPEG, PNG, GIF or WebP image")
    try:
        return read()
    except ImageError as e:
        raise InvalidRequestError(f"{where}: {e}") from None


def load_image(source, policy: ImagePolicy) -> Image.Image:
    """One image source -> RGB image, synchronously (outside an event loop: tools, tests)."""
    return decode_images(asyncio.run(gather_image_bytes([source], policy)), policy)[0]


def fetch_image(url: str, policy: ImagePolicy) -> bytes:
    """GET one image URL synchronously (outside an event loop) under the rules above."""

    async def one() -> bytes:
        try:
            async with asyncio.timeout(policy.timeout):
                return await _fetch(url, policy, _ByteBudget(policy.max_request_bytes), _Lookups(policy))
        except TimeoutError:
            raise InvalidRequestError("image url: the download took too long") from None

    return asyncio.run(one())


def decode_base64(text: str, max_bytes: int) -> bytes:
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise InvalidRequestError(f"image data is larger than {max_bytes // MB} MB")
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("image data is not valid base64") from None
    if not data:
        raise InvalidRequestError("image data is empty")
    return data


class _ByteBudget:
    """The bytes all images of one request may take together."""

    def __init__(self, limit: int):
        self.left = limit
        self.limit = limit

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise InvalidRequestError(f"images are larger than {self.limit // MB} MB together")


def _first_client_error(group_error: BaseExceptionGroup) -> BaseException:
    """The InvalidRequestError a failed download raised (any other error is re-raised as it is)."""
    errors = group_error.exceptions
    while len(errors) == 1 and isinstance(errors[0], BaseExceptionGroup):
        errors = errors[0].exceptions
    for e in errors:
        if isinstance(e, InvalidRequestError):
            return e
    raise group_error


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


async def _fetch(url: str, policy: ImagePolicy, budget: _ByteBudget, lookups: _Lookups) -> bytes:
    """GET an image URL under the rules above; the body's bytes. The caller bounds the time."""
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
    address = await lookups.address(host, port)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    tls = ssl.create_default_context() if scheme == "https" else None
    try:
        reader, writer = await asyncio.open_connection(address, port, ssl=tls, server_hostname=host if tls else None)
    except (OSError, ssl.SSLError):
        raise InvalidRequestError("image url: could not fetch the image (connection failed)") from None
    try:
        conn = h11.Connection(h11.CLIENT)
        headers = [("Host", parts.netloc), ("User-Agent", USER_AGENT), ("Accept", "image/*"), ("Connection", "close")]
        writer.write(conn.send(h11.Request(method="GET", target=path, headers=headers)))
        writer.write(conn.send(h11.EndOfMessage()))
        return await _read_response(conn, reader, policy.max_bytes, budget)
    except (OSError, ssl.SSLError, h11.ProtocolError):
        raise InvalidRequestError("image url: the download failed") from None
    finally:
        writer.close()


async def _read_response(conn: h11.Connection, reader: asyncio.StreamReader, max_bytes: int, budget: _ByteBudget) -> bytes:
    too_large = InvalidRequestError(f"image url: the image is larger than {max_bytes // MB} MB")
    chunks, total = [], 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))  # b"" (closed) ends the message or raises
        elif isinstance(event, h11.Response):
            if 300 <= event.status_code < 400:
                raise InvalidRequestError("image url: redirects are not followed; send the final URL")
            if event.status_code != 200:
                raise InvalidRequestError(f"image url: the server answered HTTP {event.status_code}")
            declared = dict(event.headers).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > max_bytes:
                raise too_large
        elif isinstance(event, h11.Data):
            total += len(event.data)
            if total > max_bytes:
                raise too_large
            budget.take(len(event.data))
            chunks.append(bytes(event.data))
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    if not total:
        raise InvalidRequestError("image url: the response is empty")
    return b"".join(chunks)


class _Lookups:
    """One request's host lookups: each (host, port) resolved once, at most DNS_PER_REQUEST at a time, in the
    policy's Resolver. Every address a host resolves to must pass check_address; the first is connected to."""

    def __init__(self, policy: ImagePolicy):
        self.policy = policy
        self.gate = asyncio.Semaphore(DNS_PER_REQUEST)
        self.started: dict[tuple[str, int], asyncio.Future] = {}

    async def address(self, host: str, port: int) -> str:
        key = (host, port)
        if key not in self.started:
            self.started[key] = asyncio.ensure_future(self._resolve(host, port))
        return await self.started[key]

    async def _resolve(self, host: str, port: int) -> str:
        try:
            async with self.gate:
                addresses = await self.policy.resolver.lookup(host, port)
        except (OSError, UnicodeError):
            raise InvalidRequestError("image url: the host name does not resolve") from None
        if not addresses:
            raise InvalidRequestError("image url: the host name does not resolve")
        for address in addresses:
            check_address(address, self.policy.allow_private)
        return addresses[0]
