"""Authentication and authorization, as ASGI middleware in front of the router.

- The token comes from `x-api-key` (what the SDKs send) or `Authorization: Bearer`.
- Which grant a request needs is decided from the route that matches `scope["path"]` and the method —
  never from a URL rebuilt from the Host header (Starlette CVE-2026-48710).
- Deny by default: every request needs a valid token except the content-free `GET /health`; a path
  that matches no route still needs one (then gets 404), and a route without a declared grant is 403.
- A token that may call `messages` may also count their tokens (`count_tokens`): clients such as Claude
  Code call both with one key.
- Missing/invalid token -> 401; valid token without the grant -> 403; limit used up -> 429 with
  `retry-after` (and `x-should-retry: false` past a minute). A token with a limit gets
  `anthropic-ratelimit-requests-{limit,remaining,reset}` on every response. The token id (never the token) is recorded in `scope["state"]["token_id"]`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import anyio
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kawai.api.errors import ApiError, AuthenticationError, PermissionDeniedError, RateLimitError, error_response
from kawai.api.api_keys import QuotaState, TokenStore, TokenStoreError

log = logging.getLogger("kawai.api")

PUBLIC = "public"  # grant name for routes open without a token
IMPLIED_GRANTS = {"count_tokens": ("messages",)}  # grant -> grants that include it


class AuthMiddleware:
    def __init__(self, app: ASGIApp, store: TokenStore | None, routes: list[BaseRoute], grants: Mapping[str, str]):
        """store None = auth disabled. grants: route name -> endpoint grant (or PUBLIC)."""
        self.app = app
        self.store = store
        self.routes = routes
        self.grants = grants

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        grant = self.required_grant(scope)
        if grant == PUBLIC or self.store is None:
            await self.app(scope, receive, send)
            return
        quota: list[tuple[bytes, bytes]] = []
        try:
            token_id = await anyio.to_thread.run_sync(self.authorize, scope, grant, quota)  # file and SQLite I/O
        except ApiError as e:
            state = scope.get("state", {})
            await error_response(e, state.get("request_id"))(scope, receive, _with_headers(send, quota))
            return
        scope.setdefault("state", {})["token_id"] = token_id
        await self.app(scope, receive, _with_headers(send, quota))

    def required_grant(self, scope: Scope) -> str | None:
        """The grant of the route matching this path (and method, if one matches fully); None if no
        route matches the path."""
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            name = getattr(route, "name", None)
            if match is Match.FULL:
                return self.grants.get(name, "")  # "" = no declared grant: nobody may use it
            if match is Match.PARTIAL and partial is None:
                partial = self.grants.get(name, "")
        if partial == PUBLIC:  # e.g. POST /health: a wrong method still needs no token to get its 405
            return PUBLIC
        return partial

    def authorize(self, scope: Scope, grant: str | None, quota_headers: list | None = None) -> str:
        """The token id, or raise. For a token with a limit, `quota_headers` receives the
        `anthropic-ratelimit-requests-*` headers (limit, remaining, reset) of the response."""
        token = _presented_token(scope)
        if token is None:
            raise AuthenticationError(
                "Missing API token: send `x-api-key: <token>` or `Authorization: Bearer <token>`."
            )
        try:
            rec = self.store.authenticate(token)
        except TokenStoreError:
            log.exception("token store unreadable")
            raise ApiError("The token store could not be read.") from None
        if rec is None:
            raise AuthenticationError("Invalid API token.")
        if grant is None:  # no such route: authenticated callers get the router's 404
            return rec.id
        if not has_grant(rec.endpoints, grant):
            raise PermissionDeniedError(f"This token ({rec.id}) has no access to the {grant or 'requested'} endpoint.")
        try:
            exceeded = self.store.consume(rec)
            quota = self.store.quota(rec)
        except TokenStoreError:
            log.exception("token usage store unwritable")
            raise ApiError("The token usage could not be counted.") from None
        if quota is not None and quota_headers is not None:
            quota_headers.extend(ratelimit_headers(quota))
        if exceeded is not None:
            raise RateLimitError(
                f"This token ({rec.id}) has used its limit of {rec.limit} requests.",
                headers={"retry-after": str(exceeded.retry_after_seconds)},
            )
        return rec.id


def ratelimit_headers(quota: QuotaState) -> list[tuple[bytes, bytes]]:
    """What the Anthropic API sends about request limits (clients show or pace by them)."""
    reset = quota.reset.strftime("%Y-%m-%dT%H:%M:%SZ")  # RFC 3339
    return [(b"anthropic-ratelimit-requests-limit", str(quota.limit).encode()),
            (b"anthropic-ratelimit-requests-remaining", str(quota.remaining).encode()),
            (b"anthropic-ratelimit-requests-reset", reset.encode())]


def _with_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    if not headers:
        return send

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": list(message.get("headers", [])) + headers}
        await send(message)

    return send_with_headers


def has_grant(endpoints, grant: str) -> bool:
    return grant in endpoints or any(g in endpoints for g in IMPLIED_GRANTS.get(grant, ()))


def _presented_token(scope: Scope) -> str | None:
    api_key = bearer = None
    for name, value in scope.get("headers", []):
        if name == b"x-api-key":
            api_key = value.decode("latin-1").strip()
        elif name == b"authorization":
            scheme, _, rest = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer":
                bearer = rest.strip()
    return api_key or bearer or None
