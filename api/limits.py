"""Per-token in-flight limit, counted from the first byte of a request to the last byte of its response;
and the number of JSON values a request body may hold.

    app.add_middleware(InFlightLimit, limit=settings.max_per_token)   # inside AuthMiddleware
    check_json_values(body)                                            # before json.loads

It is the server's one per-token limit (`kawai serve --max-per-token`): counted from the first byte, it
also covers what comes before a job reaches the engine's queue -- reading a body of up to 32 MB, decoding
it, downloading images, rendering the prompt -- and one count covers every model served. A request over the limit gets 429 `rate_limit_error` with
`retry-after` before its body is read. Only the generating routes are counted (/v1/messages*,
/v1/chat/completions).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from starlette.types import ASGIApp, Receive, Scope, Send

from kawai.api.errors import InvalidRequestError, RateLimitError, error_response

COUNTED_PREFIXES = ("/v1/messages", "/v1/chat/")

# A JSON value costs a Python object once decoded (an empty object 64 bytes, then its validated copy), so a
# 32 MB body of `{},` (2 bytes a value) decoded to 1.6 GB. A million values is far more than a real request
# (a long agent session: ~10^5) and bounds what decoding a body can take (docs/security.md).
MAX_JSON_VALUES = 1_000_000
CHUNK = 1 << 20  # bytes scanned at once: the scan's own memory stays a few MB


def check_json_values(body: bytes | bytearray, limit: int = MAX_JSON_VALUES) -> None:
    """InvalidRequestError (400) for a body of more than `limit` JSON values, before any is decoded."""
    if 1 + _structural(body) <= limit:  # counting the strings' characters too: a quick first pass
        return
    if count_json_values(body) > limit:
        raise InvalidRequestError(f"The request body holds more than {limit:,} JSON values.")


def count_json_values(body: bytes | bytearray) -> int:
    """An upper bound of the values in a JSON text, without decoding it: every value but the first follows a
    `,` or opens a container, outside strings. Linear, in C and NumPy, with no object per value (a regex
    substitution would make one per string). For a text that is not valid JSON, a bound of what json.loads
    reads before its error: the valid prefix, where strings are delimited the same way."""
    # Escaped backslashes, then escaped quotes, out: every quote left opens or closes a string.
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    data = np.frombuffer(text, dtype=np.uint8)  # (n,)
    count, inside = 1, 0
    for start in range(0, data.size, CHUNK):
        chunk = data[start : start + CHUNK]
        # 1 from an opening quote up to (not including) its closing quote, carried across chunks
        in_string = np.bitwise_xor.accumulate((chunk == ord('"')).view(np.uint8)) ^ inside
        separators = (chunk == ord(",")) | (chunk == ord("[")) | (chunk == ord("{"))
        count += int(np.count_nonzero(separators & (in_string == 0)))
        inside = int(in_string[-1])
    return count


def _structural(text: bytes | bytearray) -> int:
    return text.count(b",") + text.count(b"[") + text.count(b"{")


class InFlightLimit:
    def __init__(self, app: ASGIApp, limit: int | None):
        """limit: requests of one API token in flight at once (None: no limit)."""
        self.app = app
        self.limit = limit
        self._in_flight: Counter = Counter()  # token id (None with auth off) -> requests in flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.limit is None or scope["type"] != "http" or not scope["path"].startswith(COUNTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        state = scope.get("state", {})
        tenant = state.get("token_id")
        if self._in_flight[tenant] >= self.limit:
            err = RateLimitError(
                f"Too many concurrent requests for this token (limit {self.limit}); retry shortly.",
                headers={"retry-after": "1"},
            )
            await error_response(err, state.get("request_id"))(scope, receive, send)
            return
        self._in_flight[tenant] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._in_flight[tenant] -= 1
            if not self._in_flight[tenant]:
                del self._in_flight[tenant]
