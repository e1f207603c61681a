"""Outermost ASGI middleware: request ids, the last-resort 500, and the access log.

Every response carries `request-id` (read by the SDK into `_request_id`) and `anthropic-request-id`
(promised by the API docs) with the same `req_…` value. An exception that escapes a handler is logged
with its traceback and the request id, and the client gets a generic 500 `api_error` — never the
exception text. Logged values from the client are escaped (no CR/LF injection) and shortened; the
`authorization` and `x-api-key` headers are never logged.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kawai.api.errors import error_response, internal_error
from kawai.api.ids import new_request_id

access_log = logging.getLogger("kawai.access")
log = logging.getLogger("kawai.api")

MAX_LOGGED_CHARS = 200


def log_safe(value: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """A client-supplied value fit for one log line: control characters escaped, length capped."""
    out = []
    for ch in value[:limit]:
        if ch == "\r":
            out.append("\\r")
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out) + ("…" if len(value) > limit else "")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = {"code": 0, "started": False}
        id_headers = [(b"request-id", request_id.encode()), (b"anthropic-request-id", request_id.encode())]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message = {**message, "headers": list(message.get("headers", [])) + id_headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "request %s: unhandled error on %s %s", request_id, log_safe(scope["method"]), log_safe(scope["path"])
            )
            if not status["started"]:
                await error_response(internal_error(), request_id)(scope, receive, send_with_id)
        finally:
            access_log.info(
                "%s %s %s %s %.3fs token=%s",
                request_id,
                log_safe(scope["method"]),
                log_safe(scope["path"]),
                status["code"] or "-",
                time.perf_counter() - started,
                state.get("token_id", "-"),
            )
