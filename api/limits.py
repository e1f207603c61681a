"""Per-token in-flight limit, counted from the first byte of a request to the last byte of its response.

    app.add_middleware(InFlightLimit, limit=settings.max_per_token)   # inside AuthMiddleware

The engine's own per-token limit (api/worker.py) counts a job from when it is queued; everything before
that -- reading a body of up to 32 MB, decoding it, downloading images, rendering the prompt -- is work a
token could otherwise start without bound. A request over the limit gets 429 `rate_limit_error` with
`retry-after` before its body is read. Only the generating routes are counted (/v1/messages*,
/v1/chat/completions).
"""

from __future__ import annotations

from collections import Counter

from starlette.types import ASGIApp, Receive, Scope, Send

from kawai.api.errors import RateLimitError, error_response

COUNTED_PREFIXES = ("/v1/messages", "/v1/chat/")


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
