"""Authentication and authorization over real HTTP (tiny model server), one test per rule in
shared/docs/security.md: both headers, 401/403/429 semantics, deny by default, authorization on the
routed path (Host header and path tricks), tokens never logged, CR/LF escaped in logs."""

from __future__ import annotations

import logging
import re
import socket
import time

import httpx
import pytest
from starlette.responses import JSONResponse
from starlette.routing import Route

from kawai import engine
from kawai.api.app import GRANTS
from kawai.api.api_keys import TokenStore
from api_harness import home, live_server, tokens  # noqa: F401 (home, tokens: fixtures)
from tiny_models import write_tiny_model

MESSAGE = {"model": "tiny-qwen2-f32", "max_tokens": 2, "temperature": 0,
           "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory, home, tokens):
    llm = engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", n_ctx=256))
    live = live_server(home, [llm])

    async def undeclared(request):
        return JSONResponse({"secret": True})

    live.app.router.routes.append(Route("/v1/undeclared", undeclared, name="undeclared"))  # no grant declared
    with live as s:
        yield s


def call(server, method, path, headers=None, **kw) -> httpx.Response:
    return httpx.request(method, server.url + path, headers=headers or {}, timeout=60, **kw)


def error_type(r: httpx.Response) -> str:
    data = r.json()
    if r.url.path.startswith("/v1/chat/"):  # OpenAI's shape (api/routes_openai.py): a 401 is typed by its code
        error = data["error"]
        return "authentication_error" if error["code"] == "invalid_api_key" else error["type"]
    assert data["type"] == "error" and data["request_id"] == r.headers["request-id"]
    return data["error"]["type"]


def raw(server, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(request)
        s.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            part = s.recv(65536)
            if not part:
                break
            data += part
    return data


ENDPOINTS = [("POST", "/v1/messages", MESSAGE), ("POST", "/v1/messages/count_tokens", MESSAGE),
             ("GET", "/v1/models", None), ("GET", "/v1/models/tiny-qwen2-f32", None)]


@pytest.mark.parametrize("method, path, body", ENDPOINTS)
def test_missing_or_invalid_token_is_401(server, tokens, method, path, body):
    for headers in ({}, {"x-api-key": "kawai-wrong"}, {"authorization": "Bearer kawai-wrong"},
                    {"authorization": tokens.all},  # no scheme
                    {"authorization": "Basic " + tokens.all}, {"x-api-key": tokens.all[:-1]}):
        r = call(server, method, path, headers, json=body)
        assert r.status_code == 401 and error_type(r) == "authentication_error", headers
        assert r.headers["x-should-retry"] == "false"


@pytest.mark.parametrize("method, path, body", ENDPOINTS)
def test_both_header_styles_are_accepted(server, tokens, method, path, body):
    for headers in ({"x-api-key": tokens.all}, {"authorization": f"Bearer {tokens.all}"},
                    {"Authorization": f"bearer {tokens.all}"}):
        assert call(server, method, path, headers, json=body).status_code == 200, headers


def test_valid_token_without_the_grant_is_403(server, tokens):
    messages_only = {"x-api-key": tokens.messages_only}
    assert call(server, "POST", "/v1/messages", messages_only, json=MESSAGE).status_code == 200
    # the messages grant includes count_tokens (clients count with the key they send messages with)
    assert call(server, "POST", "/v1/messages/count_tokens", messages_only, json=MESSAGE).status_code == 200
    for method, path, body in ENDPOINTS[2:]:
        r = call(server, method, path, messages_only, json=body)
        assert r.status_code == 403 and error_type(r) == "permission_error"
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = call(server, "POST", path, {"authorization": f"Bearer {tokens.models_only}"}, json=MESSAGE)
        assert r.status_code == 403 and error_type(r) == "permission_error"


def test_used_up_limit_is_429_with_retry_after(server, tokens):
    limited = {"x-api-key": tokens.limited}
    assert call(server, "GET", "/v1/models", limited).status_code == 200
    assert call(server, "POST", "/v1/messages/count_tokens", limited, json=MESSAGE).status_code == 200
    r = call(server, "POST", "/v1/messages", limited, json=MESSAGE)
    assert r.status_code == 429 and error_type(r) == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 86_401


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def route_matrix(server) -> list[tuple[str, str, bool]]:
    """(method, path, allowed) for every declared route of the live router and every method; path
    parameters filled in. New routes are covered as they are added."""
    cells = []
    for route in server.app.router.routes:
        if route.name not in GRANTS:
            continue  # /v1/undeclared: test_route_without_a_declared_grant_is_denied
        path = re.sub(r"\{[^}]+\}", "tiny-qwen2-f32", route.path)
        cells += [(method, path, method in route.methods) for method in METHODS]
    return cells


def test_every_route_and_method_without_a_token_is_401(server):
    """Only GET/HEAD /health and /openapi.json (a constant of the code: api/openapi.py) answer without a
    token; every other route, whatever the method, is 401 — a wrong method included (its 405 would tell a
    stranger the route exists)."""
    cells = route_matrix(server)
    assert {path for _, path, _ in cells} >= {"/v1/messages", "/v1/models", "/health", "/metrics"}
    for method, path, allowed in cells:
        r = call(server, method, path)
        if path in ("/health", "/openapi.json"):
            assert r.status_code == (200 if allowed else 405), (method, path)
        else:
            assert r.status_code == 401, (method, path, r.status_code)
            if method != "HEAD":
                assert error_type(r) == "authentication_error"


def test_every_route_with_a_valid_token_and_a_wrong_method_is_405(server, tokens):
    for method, path, allowed in route_matrix(server):
        r = call(server, method, path, {"x-api-key": tokens.all}, json=MESSAGE if method == "POST" else None)
        if allowed:
            assert r.status_code not in (401, 403, 405), (method, path, r.status_code)
        else:
            assert r.status_code == 405, (method, path, r.status_code)
            assert method == "HEAD" or error_type(r) == "invalid_request_error"
            assert r.headers["allow"], (method, path)


def test_health_and_the_api_document_are_the_only_open_routes(server):
    assert call(server, "GET", "/health").status_code == 200
    assert call(server, "GET", "/openapi.json").status_code == 200
    assert call(server, "POST", "/health").status_code == 405  # wrong method, still no token needed
    r = call(server, "GET", "/v1/nothing-here")
    assert r.status_code == 401 and error_type(r) == "authentication_error"  # no route enumeration


def test_unknown_route_with_a_token_is_404(server, tokens):
    r = call(server, "GET", "/v1/nothing-here", {"x-api-key": tokens.all})
    assert r.status_code == 404 and error_type(r) == "not_found_error"


def test_route_without_a_declared_grant_is_denied(server, tokens):
    assert call(server, "GET", "/v1/undeclared").status_code == 401
    r = call(server, "GET", "/v1/undeclared", {"x-api-key": tokens.all})
    assert r.status_code == 403 and "secret" not in r.text


def test_host_header_cannot_move_the_checked_path(server):
    """Starlette CVE-2026-48710: a malformed Host poisoned request.url.path; we check scope['path']."""
    for host in ("evil/health?", "evil/health#", "x/health/..", "localhost:1/health"):
        r = call(server, "GET", "/v1/models", {"host": host})
        assert r.status_code in (400, 401), host  # never 200
    response = raw(server, b"GET /v1/models HTTP/1.1\r\nHost: a/health?x=\r\n\r\n")
    assert response.split(b" ")[1] in (b"400", b"401")


@pytest.mark.parametrize(
    "target",
    [b"/health/../v1/models", b"//v1/models", b"/v1/models/", b"/v1/models%2f..%2fhealth",
     b"/health%00/v1/models", b"/HEALTH", b"/v1/models/..%2f..%2fhealth", b"http://localhost/v1/models"],
)
def test_path_tricks_do_not_reach_a_protected_route_without_a_token(server, target):
    response = raw(server, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    status = response.split(b" ")[1]
    assert status in (b"400", b"401"), (target, response[:100])


def test_revoked_token_stops_working_without_restart(server, home):
    store = TokenStore(home)
    rec, secret = store.create("temporary", ("models",))
    assert call(server, "GET", "/v1/models", {"x-api-key": secret}).status_code == 200
    store.revoke(rec.id)
    assert call(server, "GET", "/v1/models", {"x-api-key": secret}).status_code == 401


def test_tokens_never_appear_in_logs_and_crlf_is_escaped(server, tokens, caplog):
    with caplog.at_level(logging.DEBUG):
        call(server, "GET", "/v1/models", {"x-api-key": tokens.all})
        call(server, "POST", "/v1/messages", {"authorization": f"Bearer {tokens.all}"}, json=MESSAGE)
        call(server, "GET", "/v1/models", {"x-api-key": tokens.all + "-wrong"})
        raw(server, b"GET /v1/x%0d%0aINJECTED%20log%20line HTTP/1.1\r\nHost: x\r\nx-api-key: "
            + tokens.all.encode() + b"\r\n\r\n")
        deadline = time.monotonic() + 5  # the server thread logs after sending the response
        while time.monotonic() < deadline and not any(
            r.name == "kawai.access" and "INJECTED" in r.getMessage() for r in caplog.records
        ):
            time.sleep(0.01)
    access = [r.getMessage() for r in caplog.records if r.name == "kawai.access"]
    assert len(access) >= 4 and any(tokens.all_id in line for line in access)  # the id, not the token
    assert tokens.all not in caplog.text and tokens.all[:20] not in caplog.text
    injected = [line for line in access if "INJECTED" in line]
    assert injected and all("\n" not in line and "\r" not in line for line in injected)
    assert "\\r\\nINJECTED" in injected[0]
