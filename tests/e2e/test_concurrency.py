"""Continuous batching behind a real uvicorn server: concurrent SDK clients, a small KV memory, clients
that leave early, shutdown draining."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import anthropic
import httpx
import pytest

from kawai.api.app import create_app
from kawai.api.state import ServerSettings
from api_harness import LiveServer, home, live_server, parse_sse, tokens  # noqa: F401 (home, tokens: fixtures)
from batch_models import tiny_llm  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def server(tiny_llm, home, tokens):
    with live_server(home, [tiny_llm], queue_size=16, max_sequences=8, ping_interval=5.0) as s:
        yield s


def metric(server, tokens, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"x-api-key": tokens.all}).text
    line = next(line for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " "))
    return float(line.rsplit(" ", 1)[1])


def wait_idle(server, tokens, timeout=10.0) -> None:
    worker = server.state.models["tiny-qwen2-mixed"].worker
    t0 = time.monotonic()
    while worker.busy:
        assert time.monotonic() - t0 < timeout, "engine still busy"
        time.sleep(0.02)


def test_32_concurrent_streaming_sdk_clients(server, tokens):
    """8 run, 16 wait, the rest are refused at once with 529; every accepted stream ends with
    message_stop and its text matches its deltas. Greedy streams equal the same request alone."""
    client = anthropic.AsyncAnthropic(base_url=server.url, api_key=tokens.all, max_retries=0, timeout=120)
    prompt = [{"role": "user", "content": "Count with me"}]

    async def one(i: int):
        try:
            async with client.messages.stream(
                model="tiny-qwen2-mixed", max_tokens=24, messages=prompt, extra_body={"temperature": 0}
            ) as stream:
                kinds, text = [], []
                async for event in stream:
                    kinds.append(event.type)
                    if event.type == "content_block_delta" and event.delta.type == "text_delta":
                        text.append(event.delta.text)
                final = await stream.get_final_message()
            return kinds, "".join(text), final
        except anthropic.APIStatusError as e:
            return e.status_code, e.body, None

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(all_of_them())
    ok = [r for r in results if r[2] is not None]
    refused = [r for r in results if r[2] is None]
    assert all(code == 529 and body["error"]["type"] == "overloaded_error" for code, body, _ in refused), refused
    assert len(ok) >= 24 and len(ok) + len(refused) == 32
    texts = set()
    for kinds, text, final in ok:
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        assert final.content[0].text == text and final.usage.output_tokens > 0
        texts.add(text)
    assert len(texts) == 1  # greedy: the same answer for everyone, batched or from the prefix cache
    wait_idle(server, tokens)
    alone = anthropic.Anthropic(base_url=server.url, api_key=tokens.messages_only, max_retries=0).messages.create(
        model="tiny-qwen2-mixed", max_tokens=24, messages=prompt, extra_body={"temperature": 0})
    assert alone.usage.cache_read_input_tokens == 0 and texts == {alone.content[0].text}  # run alone, cold
    assert metric(server, tokens, 'kawai_requests_total{status="529"}') == len(refused)


def test_32_concurrent_streams_under_a_small_kv_memory_finish_or_fail_cleanly(tiny_llm, tmp_path):
    """KV memory for 3 blocks of 64 positions, 8 sequences, replies up to 100 tokens: admission waits for
    memory, a sequence that finds no block for its next token stops (model_context_window_exceeded), the
    rest are refused with 529. Nothing crashes and all memory comes back."""
    budget = 3 * 64 * tiny_llm.new_cache(1).nbytes
    app = create_app(ServerSettings(home=tmp_path, auth=False, queue_size=16, max_sequences=8, kv_memory=budget,
                                    ping_interval=5.0), [tiny_llm])
    body = {"model": "tiny-qwen2-mixed", "max_tokens": 100, "temperature": 0.9, "stream": True}

    async def one(c: httpx.AsyncClient, i: int):
        messages = [{"role": "user", "content": f"Story number {i}"}]
        async with c.stream("POST", "/v1/messages", json={**body, "messages": messages}) as r:
            if r.status_code != 200:
                return r.status_code, json.loads(await r.aread())["error"]["type"]
            frames = parse_sse((await r.aread()).decode())
        kinds = [event for event, _ in frames]
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
        return 200, next(d["delta"]["stop_reason"] for e, d in frames if e == "message_delta")

    async def crowd():
        async with httpx.AsyncClient(base_url=s.url, timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    with LiveServer(app) as s:
        outcomes = asyncio.run(crowd())
        worker = s.state.models["tiny-qwen2-mixed"].worker
        while worker.busy:
            time.sleep(0.02)
        stats = worker.pool.stats()
    ok = [reason for status, reason in outcomes if status == 200]
    assert len(ok) >= 24 and set(ok) <= {"end_turn", "max_tokens", "model_context_window_exceeded"}, outcomes
    assert "model_context_window_exceeded" in ok  # 3 blocks cannot hold 8 replies of 100 tokens
    assert all(o == (529, "overloaded_error") for o in outcomes if o[0] != 200), outcomes
    assert stats.leased == 0 and stats.used_bytes <= stats.budget_bytes == budget


def test_100_clients_that_disconnect_after_the_first_delta_leak_nothing(server, tokens):
    body = {"model": "tiny-qwen2-mixed", "max_tokens": 400, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a long story"}]}
    headers = {"x-api-key": tokens.all}

    async def leave_early(c: httpx.AsyncClient) -> str:
        try:
            async with c.stream("POST", "/v1/messages", json=body, headers=headers) as r:
                if r.status_code != 200:
                    return str(r.status_code)
                async for line in r.aiter_lines():
                    if line.startswith("event: content_block_delta"):
                        return "left"
        except httpx.HTTPError as e:
            return type(e).__name__
        return "ended"

    async def crowd():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*(leave_early(c) for _ in range(100)))

    outcomes = asyncio.run(crowd())
    assert set(outcomes) <= {"left", "529"} and outcomes.count("left") >= 24, outcomes
    client = anthropic.Anthropic(base_url=server.url, api_key=tokens.all, max_retries=0, timeout=60)
    message = client.messages.create(model="tiny-qwen2-mixed", max_tokens=8, extra_body={"temperature": 0},
                                     messages=[{"role": "user", "content": "Hi"}])
    assert message.usage.output_tokens > 0
    wait_idle(server, tokens)
    assert metric(server, tokens, "kawai_active_sequences") == 0
    assert metric(server, tokens, "kawai_queue_length") == 0
    assert metric(server, tokens, "kawai_prefix_cache_leased") == 0
    assert metric(server, tokens, "kawai_prefix_cache_shared_tokens") == 0  # no sequence reads a shared prefix


def test_shutdown_drains_in_flight_streams_and_leaves_no_engine_thread(tiny_llm, tmp_path):
    """Server exit (what SIGTERM triggers): the running stream still ends with message_stop, then the
    engine thread is joined."""
    app = create_app(ServerSettings(home=tmp_path, auth=False, max_sequences=2, drain_seconds=10), [tiny_llm])
    body = {"model": "tiny-qwen2-mixed", "max_tokens": 300, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Go on"}]}
    kinds = []
    before = set(threading.enumerate())
    with LiveServer(app) as s:
        worker = s.state.models["tiny-qwen2-mixed"].worker
        with httpx.Client(base_url=s.url, timeout=60) as c, c.stream("POST", "/v1/messages", json=body) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("event: "):
                    kinds.append(line[len("event: "):])
                if kinds[-1:] == ["content_block_delta"]:
                    break
            s.server.should_exit = True  # what uvicorn's SIGTERM handler does
            worker.stop_admitting()  # what `kawai serve` adds to it
            kinds += [line[len("event: "):] for line in lines if line.startswith("event: ")]
    assert kinds[-1] == "message_stop"
    time.sleep(0.2)
    assert [t.name for t in set(threading.enumerate()) - before] == []  # engine, uvicorn, pools: all gone
