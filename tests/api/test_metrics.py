"""GET /metrics (Prometheus text format) and the structured generation log, on a real server."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from kawai import engine
from kawai.api.app import create_app
from kawai.api.metrics import Metrics
from kawai.api.state import ServerSettings
from kawai.api.api_keys import DEFAULT_ENDPOINTS, TokenStore
from api_harness import LiveServer, make_tokens
from tiny_models import write_tiny_model

LABEL = r'[a-z_]+="(?:[^"\\\n]|\\["\\n])*"'  # a value escapes only backslash, quote and newline
SAMPLE = re.compile(rf"^[a-z_]+(\{{{LABEL}(,{LABEL})*\}})? (-?[0-9.e+-]+|\+Inf)$")


def parse(text: str) -> dict[str, float]:
    """Every sample line -> value; checks the exposition format line by line."""
    samples = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        assert SAMPLE.match(line), line
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def test_render_counters_histograms_gauges_and_escaping():
    m = Metrics()
    m.inc("x_total", "Things.", 2, kind='a"b\\c\nd')
    for v in (0.01, 0.2, 7.0):
        m.observe("lat_seconds", "Latency.", v, (0.1, 1.0))
    m.add_gauges(lambda: [("g", (("model", "m"),), 3, "A gauge.")])
    text = m.render()
    samples = parse(text)
    assert samples['x_total{kind="a\\"b\\\\c\\nd"}'] == 2
    assert samples['lat_seconds_bucket{le="0.1"}'] == 1 and samples['lat_seconds_bucket{le="1"}'] == 2
    assert samples['lat_seconds_bucket{le="+Inf"}'] == 3 and samples["lat_seconds_count"] == 3
    assert abs(samples["lat_seconds_sum"] - 7.21) < 1e-9 and samples['g{model="m"}'] == 3
    assert "# TYPE lat_seconds histogram" in text and "# TYPE x_total counter" in text and "# TYPE g gauge" in text


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    llm = engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", n_ctx=256), threads=1)
    home = tmp_path_factory.mktemp("home")
    tokens = make_tokens(home)
    with LiveServer(create_app(ServerSettings(home=home, max_sequences=2), [llm])) as s:
        yield s, tokens


def test_metrics_need_their_own_grant(setup):
    """/metrics shows every tenant's traffic: the `metrics` grant, which tokens get only when asked for."""
    s, tokens = setup
    assert httpx.get(s.url + "/metrics").status_code == 401
    assert httpx.get(s.url + "/metrics", headers={"x-api-key": tokens.messages_only}).status_code == 403
    assert httpx.get(s.url + "/metrics", headers={"x-api-key": tokens.models_only}).status_code == 403
    _, default = TokenStore(s.state.settings.home).create("default", DEFAULT_ENDPOINTS)
    assert httpx.get(s.url + "/metrics", headers={"x-api-key": default}).status_code == 403
    r = httpx.get(s.url + "/metrics", headers={"x-api-key": tokens.all})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")


def test_requests_tokens_and_latencies_are_counted_and_logged(setup, caplog):
    s, tokens = setup
    headers = {"x-api-key": tokens.all}
    before = parse(httpx.get(s.url + "/metrics", headers=headers).text)
    body = {"model": "tiny-qwen2-f32", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": "Hello there"}]}
    with caplog.at_level(logging.INFO, logger="kawai.access"):
        r = httpx.post(s.url + "/v1/messages", json=body, headers=headers, timeout=60)
    assert r.status_code == 200
    usage = r.json()["usage"]
    assert httpx.post(s.url + "/v1/nothing", json=body, headers=headers).status_code == 404
    after = parse(httpx.get(s.url + "/metrics", headers=headers).text)

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    model = '{model="tiny-qwen2-f32"}'
    assert grew('kawai_requests_total{status="200"}') >= 2 and grew('kawai_requests_total{status="404"}') == 1
    assert grew("kawai_generated_tokens_total" + model) == usage["output_tokens"]
    assert grew("kawai_prompt_tokens_total" + model) == usage["input_tokens"] + usage["cache_creation_input_tokens"]
    assert grew("kawai_prefix_cache_hit_tokens_total" + model) == usage["cache_read_input_tokens"]
    assert grew("kawai_kv_memory_hit_tokens_total" + model) == usage["cache_read_input_tokens"]
    assert grew("kawai_kv_created_tokens_total" + model) == usage["cache_creation_input_tokens"]
    assert grew("kawai_time_to_first_token_seconds_count" + model) == 1
    assert grew("kawai_time_per_output_token_seconds_count" + model) == usage["output_tokens"] - 1
    assert after["kawai_active_sequences" + model] == 0 and after["kawai_engine_up" + model] == 1

    line = next(rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("generation "))
    fields = dict(kv.split("=", 1) for kv in line.split()[1:])
    assert fields["request_id"] == r.headers["request-id"] and fields["token_id"] == tokens.all_id
    assert fields["model"] == "tiny-qwen2-f32" and int(fields["output_tokens"]) == usage["output_tokens"]
    assert int(fields["input_tokens"]) == usage["input_tokens"] and float(fields["ttft_s"]) > 0
    assert int(fields["created_tokens"]) == usage["cache_creation_input_tokens"]
    assert all(tokens.all not in rec.getMessage() for rec in caplog.records)  # never the secret
