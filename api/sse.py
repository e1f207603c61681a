"""Server-Sent Events in Anthropic's format.

Every frame is `event: <type>` + `data: <json with the same type>` + a blank line (the SDK drops frames
without an `event:` line). `sse_frames` turns an async iterator of event dicts into bytes and fills
silences with `ping` frames so clients never wait ~20 s without an event (CPU prefill can take that
long); an error after the response has started becomes an `event: error` frame.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from kawai.api.errors import ApiError, error_body, internal_error

log = logging.getLogger("kawai.api")

PING: dict[str, Any] = {"type": "ping"}


def encode_event(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    # U+2028/2029 are line breaks to some SSE readers (JavaScript); escaped they are the same JSON.
    data = data.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f"event: {event['type']}\ndata: {data}\n\n".encode("utf-8")


def error_event(err: ApiError, request_id: str | None) -> dict[str, Any]:
    return error_body(err.error_type, err.message, request_id)


async def sse_frames(events: AsyncIterator[dict[str, Any]], request_id: str) -> AsyncIterator[bytes]:
    """Encode events; a failure mid-stream is logged and sent as one `error` frame, then the stream ends."""
    try:
        async for event in events:
            yield encode_event(event)
    except ApiError as e:
        yield encode_event(error_event(e, request_id))
    except Exception:
        log.exception("request %s: stream failed", request_id)
        yield encode_event(error_event(internal_error(), request_id))
