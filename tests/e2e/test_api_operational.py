"""Operational details clients rely on: quota headers, when not to retry, CORS for browser clients,
max_tokens 0 as a prompt-cache pre-warm. A real server on a tiny random-weight model; the real SDK where
it reads these (retries, rate-limit errors)."""

from __future__ import annotations

from datetime import datetime, timezone

import anthropic
import httpx
import pytest

from kawai import engine
from kawai.api.api_keys import ENDPOINTS, Limit, TokenStore
from api_harness import home, live_server, tokens  # noqa: F401 (fixtures)
from tiny_models import write_tiny_model

MODEL = "tiny-qwen2-f32"
ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", n_ctx=512), threads=1)


@pytest.fixture(scope="module")
def server(tiny_llm, home, tokens):
    with live_server(home, [tiny_llm], cors_origins=(ORIGIN,)) as s:
        yield s


def body(**kw):
    return {"model": MODEL, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "Hello"}], **kw}


def test_max_tokens_0_prewarms_the_prompt_cache(server, tokens):
    client = anthropic.Anthropic(base_url=server.url, api_key=tokens.all, max_retries=0)
    system = "A long shared system prompt. " * 8
    warm = client.messages.create(model=MODEL, max_tokens=0, system=system, messages=[{"role": "user", "content": "Hi"}])
    assert warm.content == [] and warm.stop_reason == "max_tokens" and warm.usage.output_tokens == 0
    prompt_tokens = (warm.usage.input_tokens + warm.usage.cache_creation_input_tokens
                     + warm.usage.cache_read_input_tokens)
    assert prompt_tokens == client.messages.count_tokens(
        model=MODEL, system=system, messages=[{"role": "user", "content": "Hi"}]).input_tokens
    used = client.messages.create(model=MODEL, max_tokens=2, system=system, messages=[{"role": "user", "content": "Hi"}])
    assert used.usage.cache_read_input_tokens == prompt_tokens - 1  # the last prompt token runs again, for its logits


def test_quota_headers_and_no_retry_past_a_minute(server, home):
    _, secret = TokenStore(home).create("quota", ENDPOINTS, Limit(2, "day"))
    headers = {"x-api-key": secret}
    first = httpx.get(server.url + "/v1/models", headers=headers)
    assert first.headers["anthropic-ratelimit-requests-limit"] == "2"
    assert first.headers["anthropic-ratelimit-requests-remaining"] == "1"
    reset = datetime.strptime(first.headers["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%SZ")
    assert reset.replace(tzinfo=timezone.utc) > datetime.now(timezone.utc)
    assert httpx.get(server.url + "/v1/models", headers=headers).headers["anthropic-ratelimit-requests-remaining"] == "0"
    # used up until midnight UTC: the SDK must not retry (it would wait at most 60 s, then fail again)
    client = anthropic.Anthropic(base_url=server.url, api_key=secret, max_retries=3)
    with pytest.raises(anthropic.RateLimitError) as e:
        client.models.list()
    response = e.value.response
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert int(response.headers["retry-after"]) > 60 and response.headers["x-should-retry"] == "false"
    assert "anthropic-ratelimit-requests-limit" not in httpx.get(
        server.url + "/v1/models", headers={"x-api-key": TokenStore(home).create("free", ENDPOINTS)[1]}).headers


def test_529_says_when_to_retry(tiny_llm, home, tokens):
    with live_server(home, [tiny_llm]) as s:
        s.state.models[MODEL].worker.stop(timeout=5)  # a stopped engine refuses with 529
        r = httpx.post(s.url + "/v1/messages", json=body(), headers={"x-api-key": tokens.all})
    assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error"
    assert int(r.headers["retry-after"]) >= 1


def test_cors_preflight_and_exposed_headers(server, tokens):
    preflight = httpx.options(server.url + "/v1/messages", headers={
        "origin": ORIGIN, "access-control-request-method": "POST",
        "access-control-request-headers": "x-api-key,anthropic-version,anthropic-dangerous-direct-browser-access,"
                                          "content-type"})
    assert preflight.status_code == 200  # no token needed for a preflight
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "anthropic-dangerous-direct-browser-access" in preflight.headers["access-control-allow-headers"].lower()
    r = httpx.post(server.url + "/v1/messages", json=body(), headers={
        "origin": ORIGIN, "x-api-key": tokens.all, "anthropic-dangerous-direct-browser-access": "true"}, timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "request-id" in r.headers["access-control-expose-headers"]
    other = httpx.options(server.url + "/v1/messages", headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_no_cors_headers_without_cors_origin(tiny_llm, home, tokens):
    with live_server(home, [tiny_llm]) as s:
        r = httpx.post(s.url + "/v1/messages", json=body(), headers={"origin": ORIGIN, "x-api-key": tokens.all},
                       timeout=60)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
