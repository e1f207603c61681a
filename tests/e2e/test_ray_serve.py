"""Kawai on Ray Serve (api/ray_app.py): a local Ray cluster on loopback, two replicas of the default model,
the official SDK and raw HTTP against Ray Serve's proxy. Slow suite; skipped when Ray is not installed
(`make install-ray`).

The cluster is kept small for a shared machine: 2 CPUs (one per replica, one kernel thread each) and a
200 MB object store. Every request loop is bounded in count and time; nothing leaves loopback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import anthropic  # noqa: E402
import httpx  # noqa: E402
from api_harness import free_port, home, live_server, parse_sse, tokens  # noqa: E402,F401 (fixtures)
from conftest import DEFAULT_MODEL  # noqa: E402

from kawai.api.ray_app import APP_NAME, build  # noqa: E402
from kawai.api.state import ServerSettings  # noqa: E402

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather for a location",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
}
SYSTEM = "You are a helpful assistant. Answer in one short sentence."
TOPICS = ["the moon", "tea", "rivers", "owls", "bicycles", "snow"]


@pytest.fixture(scope="module")
def endpoint(home, tokens, default_model_path):
    """The Ray Serve proxy's URL, with two Engine replicas (max 2 sequences each) behind the Gateway."""
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")  # all of Ray's traffic on loopback
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # 16 KV slots of 24 MiB per replica, allocated on first use: more than this module's conversations,
        # so the engine's prefix cache never has to give one up (what is tested here is where they land)
        settings = ServerSettings(home=home, max_sequences=2, queue_size=4, n_ctx=1024, ping_interval=0.5,
                                  drain_seconds=20, kv_memory=16 * 24 * 2**20)
        serve.run(build(settings, [DEFAULT_MODEL], replicas=2), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture()
def client(endpoint, tokens):
    return anthropic.Anthropic(base_url=endpoint, api_key=tokens.all, max_retries=0, timeout=180)


def replica_metrics(endpoint: str, token: str, seen: int = 2, deadline_s: float = 60.0) -> dict[str, dict]:
    """replica id -> {"pid", "active", "generated"}, polling /metrics (each poll lands on one replica)
    until `seen` replicas answered."""
    found: dict[str, dict] = {}
    deadline = time.monotonic() + deadline_s
    while len(found) < seen:
        assert time.monotonic() < deadline, f"only replicas {sorted(found)} answered /metrics"
        text = httpx.get(endpoint + "/metrics", headers={"x-api-key": token}, timeout=30).text
        info = re.search(r'kawai_replica_info\{replica="([^"]+)",pid="(\d+)"\} 1', text)
        active = re.search(r"kawai_active_sequences\{[^}]*\} (\d+)", text)
        generated = re.search(r"kawai_generated_tokens_total\{[^}]*\} (\d+)", text)
        found[info.group(1)] = {"pid": int(info.group(2)), "active": int(active.group(1)),
                                "generated": int(generated.group(1)) if generated else 0}
    return found


def text_of(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


# ---- the same API through Ray Serve ---------------------------------------------------------------------


def test_json_matches_a_single_process_server(client, home, tokens, default_model_path):
    """Greedy: the replica's answer is the one the same app gives in this process (an independent run)."""
    from kawai import engine

    kw = dict(model=DEFAULT_MODEL, max_tokens=12, extra_body=GREEDY,
              messages=[{"role": "user", "content": "Name three colors."}])
    m = client.messages.create(**kw)
    assert m.id.startswith("msg_") and m.model == DEFAULT_MODEL and m.stop_reason in ("end_turn", "max_tokens")
    assert m._request_id.startswith("req_")
    with live_server(home, [engine.load(default_model_path, threads=1, n_ctx=1024)]) as local:
        expected = anthropic.Anthropic(base_url=local.url, api_key=tokens.all, max_retries=0,
                                       timeout=180).messages.create(**kw)
    assert text_of(m) == text_of(expected) and m.usage.output_tokens == expected.usage.output_tokens


def test_sse_stream_events_in_order(endpoint, tokens):
    body = {"model": DEFAULT_MODEL, "max_tokens": 16, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Write a haiku about rain."}]}
    r = httpx.post(endpoint + "/v1/messages", json=body, headers={"x-api-key": tokens.all}, timeout=180)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["request-id"].startswith("req_")
    names = [e for e, _ in parse_sse(r.text) if e != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1] == "content_block_start" and names.count("content_block_delta") >= 2


def test_sdk_stream_and_count_tokens_and_models(client):
    with client.messages.stream(model=DEFAULT_MODEL, max_tokens=10, extra_body=GREEDY, system="Be brief.",
                                messages=[{"role": "user", "content": "Say hello."}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text_of(final) and final.usage.output_tokens >= 1
    counted = client.messages.count_tokens(model=DEFAULT_MODEL, system="Be brief.",
                                           messages=[{"role": "user", "content": "Say hello."}]).input_tokens
    assert counted == final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL]


def test_forced_tool_call(client):
    m = client.messages.create(model=DEFAULT_MODEL, max_tokens=32, extra_body=GREEDY, tools=[WEATHER_TOOL],
                               tool_choice={"type": "tool", "name": "get_weather"},
                               messages=[{"role": "user", "content": "Weather in Tokyo?"}])
    (call,) = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and call.name == "get_weather" and call.id.startswith("toolu_")
    assert "tokyo" in call.input["location"].lower()


def test_auth_is_the_token_store_of_the_server(endpoint, tokens):
    user = [{"role": "user", "content": "Hi"}]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=endpoint, api_key="kawai-wrong", max_retries=0).messages.create(
            model=DEFAULT_MODEL, max_tokens=1, messages=user)
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic.Anthropic(base_url=endpoint, api_key=tokens.models_only, max_retries=0).messages.create(
            model=DEFAULT_MODEL, max_tokens=1, messages=user)
    assert httpx.get(endpoint + "/health", timeout=30).status_code == 200  # open, content-free
    r = httpx.post(endpoint + "/v1/messages", content=b"{not json", timeout=30,
                   headers={"x-api-key": tokens.all, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


# ---- prefix affinity ----------------------------------------------------------------------------------


def test_second_turns_land_on_the_replica_holding_the_first(endpoint, tokens, client):
    """Six two-turn conversations with the same system prompt: the first turns spread over both replicas,
    and every second turn reads at least 90% of its first turn's prompt from the prefix cache (with the
    conversations split, random routing would miss about half of them)."""
    before = replica_metrics(endpoint, tokens.all)
    firsts = []
    for topic in TOPICS:
        question = {"role": "user", "content": f"Tell me one fact about {topic}."}
        m = client.messages.create(model=DEFAULT_MODEL, max_tokens=8, extra_body=GREEDY, system=SYSTEM,
                                   messages=[question])
        firsts.append((question, m, m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)))
    after = replica_metrics(endpoint, tokens.all)
    assert all(after[r]["generated"] > before[r]["generated"] for r in before), (before, after)
    for question, first, prompt_tokens in firsts:
        second = client.messages.create(
            model=DEFAULT_MODEL, max_tokens=4, extra_body=GREEDY, system=SYSTEM,
            messages=[question, {"role": "assistant", "content": first.content},
                      {"role": "user", "content": "And another one?"}])
        assert second.usage.cache_read_input_tokens >= 0.9 * prompt_tokens, (question, second.usage)


# ---- faults ------------------------------------------------------------------------------------------


def test_client_disconnect_cancels_the_generation(endpoint, tokens):
    body = {"model": DEFAULT_MODEL, "max_tokens": 900, "stream": True,
            "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}]}
    with httpx.stream("POST", endpoint + "/v1/messages", json=body, headers={"x-api-key": tokens.all},
                      timeout=180) as r:
        deltas = 0
        for line in r.iter_lines():
            deltas += line.startswith("event: content_block_delta")
            if deltas >= 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 60
    while any(r["active"] for r in replica_metrics(endpoint, tokens.all).values()):
        assert time.monotonic() < deadline, "the abandoned generation is still running"
        time.sleep(0.5)


def test_killed_replica_ends_its_streams_with_an_error_and_is_replaced(endpoint, tokens):
    """Four streams over two replicas; one replica's process is SIGKILLed mid-stream. Its streams end with
    an `api_error` event, the other replica's finish normally, and Ray starts a new replica."""
    # Every stream must still run when the replicas are asked: a prompt the 0.5B answers at length (asked
    # to count, it may repeat the request and stop after ~10 tokens), and enough tokens to outlast the
    # question at today's decode speed.
    body = {"model": DEFAULT_MODEL, "max_tokens": 400, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}]}
    outcomes: list[str] = []
    started = threading.Barrier(5, timeout=300)

    def stream(i: int) -> None:
        b = {**body, "messages": [{"role": "user", "content": f"{body['messages'][0]['content']} ({i})"}]}
        frames, waited = [], False
        with httpx.stream("POST", endpoint + "/v1/messages", json=b, headers={"x-api-key": tokens.all},
                          timeout=300) as r:
            raw = ""
            for chunk in r.iter_text():
                raw += chunk
                if not waited and "content_block_delta" in raw:
                    waited = True
                    started.wait()
        frames = [e for e, _ in parse_sse(raw)]
        errors = [d for e, d in parse_sse(raw) if e == "error"]
        if errors:
            assert errors[0]["error"]["type"] == "api_error" and frames[-1] == "error"
            outcomes.append("error")
        else:
            assert frames[-1] == "message_stop"
            outcomes.append("complete")

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait()  # every stream has its first token
    replicas = replica_metrics(endpoint, tokens.all)
    busy = [(rid, r) for rid, r in replicas.items() if r["active"] > 0]
    assert len(busy) == 2, replicas  # the streams were spread over both replicas
    victim, info = busy[0]
    os.kill(info["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    for t in threads:
        t.join(timeout=300)
    assert len(outcomes) == 4 and outcomes.count("error") >= 1 and outcomes.count("complete") >= 1, outcomes
    # Ray replaces the replica; the service takes new requests (bounded wait)
    replicas = replica_metrics(endpoint, tokens.all, deadline_s=120)  # two live replicas answer again
    assert victim not in replicas and time.monotonic() - killed_at < 120
    m = anthropic.Anthropic(base_url=endpoint, api_key=tokens.all, max_retries=2, timeout=180).messages.create(
        model=DEFAULT_MODEL, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert m.stop_reason in ("end_turn", "max_tokens")


# ---- shutdown (last: it removes the application) -------------------------------------------------------


def test_deleting_the_application_lets_running_streams_finish(endpoint, tokens):
    """A stream running when the application is deleted finishes normally: Ray stops routing to the
    replicas and waits for their in-flight requests (up to drain_seconds) before stopping them."""
    body = {"model": DEFAULT_MODEL, "max_tokens": 24, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]}
    first, out = threading.Event(), {}

    def run() -> None:
        raw = ""
        with httpx.stream("POST", endpoint + "/v1/messages", json=body, headers={"x-api-key": tokens.all},
                          timeout=300) as r:
            for chunk in r.iter_text():
                raw += chunk
                if "content_block_delta" in raw:
                    first.set()
        out["raw"] = raw

    t = threading.Thread(target=run)
    t.start()
    assert first.wait(timeout=300)
    serve.delete(APP_NAME)  # returns once the replicas are stopped
    t.join(timeout=300)
    frames = parse_sse(out["raw"])
    assert frames[-1][0] == "message_stop", frames[-3:]
    usage = [d for e, d in frames if e == "message_delta"][0]["usage"]
    assert usage["output_tokens"] >= 1
    assert httpx.post(endpoint + "/v1/messages", json=body, headers={"x-api-key": tokens.all},
                      timeout=30).status_code != 200  # nothing serves it any more
