"""What one request body of the maximal size (32 MB) may cost the server (api/limits.py, api/routes_messages.py):
the body is read into one growing buffer (no list of chunks joined into a second copy), and its JSON values are
counted before any is decoded (at most MAX_JSON_VALUES: each becomes a Python object, and 32 MB of `{},` once
decoded to 1.6 GB). Peak RSS of a real server in this process, reset with Linux's clear_refs."""

from __future__ import annotations

import gc
import json
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kawai import engine
from kawai.api.app import create_app
from kawai.api.limits import MAX_JSON_VALUES, count_json_values
from kawai.api.state import ServerSettings
from api_harness import LiveServer
from tiny_models import write_tiny_model
from costs import peak_rss_growth

MB = 1 << 20
BODY = 32 * MB - 1024  # within the 32 MB limit
PEAK_BOUND = 256 * MB  # 8x the body: its buffer, its text once decoded, the values and their copies, the prompt


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    llm = engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", n_ctx=256), threads=1)
    with LiveServer(create_app(ServerSettings(auth=False), [llm])) as s:
        yield s


def filled(head: bytes, unit: bytes, tail: bytes) -> bytes:
    """head + unit repeated up to BODY bytes + tail (a trailing comma of the last unit dropped)."""
    body = head + unit * ((BODY - len(head) - len(tail)) // len(unit))
    return (body[:-1] if unit.endswith(b",") else body) + tail


USER = b'{"model":"m","max_tokens":1,"messages":[{"role":"user","content":'
CALL = USER + b'"x"},{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"f","input":{"a":['
SHAPES = {  # name -> (body, whether it is refused for its value count); peak RSS growth before the bound
    "one 32 MB string": lambda: filled(USER + b'"', b"a", b'"}]}'),  # 162 MB
    "empty text blocks": lambda: filled(USER + b"[", b'{"type":"text","text":""},', b"]}]}"),  # 1015 MB
    "zeros in a tool input": lambda: filled(CALL, b"0,", b"]}}]}]}"),  # 316 MB
    "empty objects in a tool input": lambda: filled(CALL, b"{},", b"]}}]}]}"),  # 1581 MB
    "empty messages": lambda: filled(b'{"model":"m","max_tokens":1,"messages":[', b'{"role":"user","content":""},',
                                     b"]}"),  # 406 MB
    "empty lists in an unknown field": lambda: filled(USER + b'"x"}],"junk":[', b"[],", b"]}"),  # 785 MB
    "objects in a tool input up to the value limit": lambda: filled(
        CALL + b"{}," * (MAX_JSON_VALUES // 2 - 100) + b'{}],"b":"', b"z", b'"}}]}]}'),  # accepted: 201 MB
}


@pytest.mark.parametrize("shape", SHAPES)
def test_a_32_mb_body_raises_peak_rss_by_less_than_256_mb(server, shape):
    body = SHAPES[shape]()
    assert 31 * MB < len(body) <= 32 * MB
    responses = []
    gc.collect()  # what earlier cases left is not counted
    grew = peak_rss_growth(lambda: responses.append(
        httpx.post(server.url + "/v1/messages/count_tokens", content=body, timeout=300)))
    r = responses[0]
    assert r.status_code in (200, 400), r.text[:300]
    if count_json_values(body) > MAX_JSON_VALUES:
        assert r.status_code == 400 and "more than 1,000,000 JSON values" in r.json()["error"]["message"]
    assert grew < PEAK_BOUND, f"{shape}: peak RSS grew by {grew / MB:.0f} MB"


def test_a_body_of_too_many_values_is_refused_before_decoding(server):
    body = b'{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x"}],"junk":[' + b"0," * MAX_JSON_VALUES + b"0]}"
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/messages", content=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "more than 1,000,000 JSON values" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 10
    text = json.dumps({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": ",[{" * 2_000_000}]})
    r = httpx.post(server.url + "/v1/messages/count_tokens", content=text, timeout=60)  # punctuation in text is text
    assert "JSON values" not in r.text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=',[]{}"\\:ab\n', max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(alphabet=',[{"\\a', max_size=4), inner, max_size=4),
    max_leaves=30,
)


def values_in(v) -> int:
    if isinstance(v, list):
        return 1 + sum(values_in(x) for x in v)
    if isinstance(v, dict):
        return 1 + sum(values_in(x) for x in v.values())
    return 1


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from([None, 1]), st.booleans())
def test_the_count_bounds_the_values_and_ignores_strings(value, indent, ascii_only):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode()
    n = count_json_values(text)
    assert values_in(value) <= n <= 2 * values_in(value)  # an empty container counts twice
    assert count_json_values(bytearray(text)) == n
