"""Anthropic-shaped errors: `{"type": "error", "error": {"type", "message"}, "request_id"}`.

Handlers raise `ApiError` subclasses; the app turns them into JSON responses (or an `event: error` frame
once a stream has started). Messages are written here or by validation code — never exception text,
tracebacks or file-system paths.
"""

from __future__ import annotations

import json

from starlette.responses import Response

# status -> error.type, as in the Anthropic API.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    529: "overloaded_error",
}


class ApiError(Exception):
    """An error to send to the client as-is. `headers` are extra response headers."""

    status = 500
    should_retry: bool | None = None  # sets `x-should-retry` when not None

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    @property
    def error_type(self) -> str:
        return ERROR_TYPES[self.status]


class InvalidRequestError(ApiError):
    status = 400
    should_retry = False


class AuthenticationError(ApiError):
    status = 401
    should_retry = False


class PermissionDeniedError(ApiError):
    status = 403
    should_retry = False


class NotFoundError(ApiError):
    status = 404
    should_retry = False


class MethodNotAllowedError(ApiError):
    status = 405
    should_retry = False


class RequestTooLargeError(ApiError):
    status = 413
    should_retry = False


MAX_RETRY_WAIT_SECONDS = 60  # the SDKs wait at most this long for a retry-after


class RateLimitError(ApiError):
    """The SDK waits `retry-after` and retries; past MAX_RETRY_WAIT_SECONDS (a used-up daily quota) it
    would retry early and in vain, so `x-should-retry: false` tells it to stop."""

    status = 429

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message, headers)
        wait = self.headers.get("retry-after", "")
        if wait.isdigit() and int(wait) > MAX_RETRY_WAIT_SECONDS:
            self.should_retry = False


class InternalError(ApiError):
    status = 500


class UnavailableError(ApiError):
    status = 503


class OverloadedError(ApiError):
    """The queue is full: a retry later can help, `retry-after` seconds from now."""

    status = 529
    retry_after_seconds = 2

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message, {"retry-after": str(self.retry_after_seconds), **(headers or {})})


def error_body(error_type: str, message: str, request_id: str | None) -> dict:
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}


def error_response(err: ApiError, request_id: str | None) -> Response:
    headers = dict(err.headers)
    if err.should_retry is not None:
        headers["x-should-retry"] = "true" if err.should_retry else "false"
    body = json.dumps(error_body(err.error_type, err.message, request_id), ensure_ascii=False, separators=(",", ":"))
    return Response(body, status_code=err.status, headers=headers, media_type="application/json")


def internal_error() -> InternalError:
    return InternalError("Internal server error. The request id is in the `request-id` header.")
