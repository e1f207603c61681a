"""The official `anthropic` SDK (sync and async) against a real server running the real default model.

Also every example of the API docs (the seed, shared/seed/000_*.txt) as raw HTTP, streamed and not,
with `Authorization: Bearer` and `x-api-key`. The bodies are the documented ones except `model` (ours)
and a smaller `max_tokens` (the 0.5B model decodes ~20-40 tokens/s on CPU; tests stay short).

The model is loaded with one kernel thread: the assertions are about the HTTP layer, and on a shared
2-core machine one thread is both faster (no OpenMP spin under oversubscription) and leaves a core to
the event loop and the client.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from pathlib import Path

import anthropic
import httpx
import numpy as np
import pytest

from kawai import engine
from api_harness import home, live_server, parse_sse, tokens  # noqa: F401 (home, tokens: fixtures)
from sse_grammar import check_stream

GREEDY = {"temperature": 0}  # this SDK version has no sampling kwargs; they go in the body

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather for a location",
    "input_schema": {
        "type": "object",
        "properties": {"location": {"type": "string", "description": "City name"}},
        "required": ["location"],
    },
}


@pytest.fixture(scope="module")
def llm(default_model_path):
    return engine.load(default_model_path, threads=1)


@pytest.fixture(scope="module")
def server(llm, home, tokens):
    with live_server(home, [llm], queue_size=1, ping_interval=0.5) as s:
        yield s


@pytest.fixture()
def client(server, tokens):
    return anthropic.Anthropic(base_url=server.url, api_key=tokens.all, max_retries=0, timeout=120)


@pytest.fixture()
def model(llm) -> str:
    return llm.id


def text_of(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


# ---- SDK: messages, streaming, counting, models ---------------------------------------------------------


def test_sdk_create_with_api_key(client, model):
    m = client.messages.create(model=model, max_tokens=12, extra_body=GREEDY,
                               messages=[{"role": "user", "content": "Hello, how are you?"}])
    assert isinstance(m, anthropic.types.Message) and m.id.startswith("msg_") and m.model == model
    assert m.stop_reason in ("end_turn", "max_tokens") and m.content[0].type == "text" and text_of(m).strip()
    assert m.usage.output_tokens >= 1 and m._request_id.startswith("req_")


def test_sdk_create_with_bearer_auth_token(server, tokens, model):
    c = anthropic.Anthropic(base_url=server.url, auth_token=tokens.all, max_retries=0, timeout=120)
    m = c.messages.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert m.content and m.usage.output_tokens >= 1


def test_sdk_stream_get_final_message_matches_text_stream(client, model):
    with client.messages.stream(model=model, max_tokens=16, extra_body=GREEDY, system="You are a poet.",
                                messages=[{"role": "user", "content": "Write a haiku about coding"}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text_of(final) and streamed.strip()
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens >= 1


def test_sdk_async_create_and_stream(server, tokens, model):
    async def run():
        c = anthropic.AsyncAnthropic(base_url=server.url, api_key=tokens.all, max_retries=0, timeout=120)
        m = await c.messages.create(model=model, max_tokens=6, extra_body=GREEDY,
                                    messages=[{"role": "user", "content": "What is 2+2?"}])
        async with c.messages.stream(model=model, max_tokens=6, extra_body=GREEDY,
                                     messages=[{"role": "user", "content": "What is 2+2?"}]) as s:
            final = await s.get_final_message()
        count = await c.messages.count_tokens(model=model, messages=[{"role": "user", "content": "What is 2+2?"}])
        return m, final, count

    m, final, count = asyncio.run(run())
    assert text_of(m) == text_of(final)  # greedy: same text either way
    assert count.input_tokens == prompt_tokens(final.usage)


def test_sdk_count_tokens_matches_usage(client, model):
    kw = dict(model=model, system="Be brief.", tools=[WEATHER_TOOL],
              messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    counted = client.messages.count_tokens(**kw).input_tokens
    m = client.messages.create(max_tokens=1, **kw)
    assert counted == prompt_tokens(m.usage) > 100  # tools in the prompt


def prompt_tokens(usage) -> int:
    """The whole prompt: tokens run, written to the prefix cache, and read from it."""
    return usage.input_tokens + (usage.cache_creation_input_tokens or 0) + (usage.cache_read_input_tokens or 0)


def test_usage_counts_the_prompt_as_transformers_does(client, model):
    """usage.input_tokens and count_tokens are the length of transformers' apply_chat_template for the same
    messages (stored by tests/make_reference.py with transformers' own GGUF tokenizer)."""
    with np.load(Path(__file__).parents[1] / "data" / "qwen2.5-coder-reference.npz") as data:
        chats = json.loads(str(data["meta"]))["chats"]
        expected = [len(data[f"chat_ids_{j}"]) for j in range(len(chats))]
    for chat, n_tokens in zip(chats, expected):
        counted = client.messages.count_tokens(model=model, **chat).input_tokens
        m = client.messages.create(model=model, max_tokens=1, **chat)
        assert counted == prompt_tokens(m.usage) == n_tokens, chat


def test_sdk_models_list_and_retrieve(client, model):
    page = client.models.list()
    assert [m.id for m in page.data] == [model] and page.has_more is False
    info = client.models.retrieve(model)
    assert info.id == model and info.type == "model" and info.created_at.year >= 2024 and info.display_name


def test_default_context_is_the_trained_one_and_models_report_it(client, model, default_model_path):
    """No --ctx: the whole trained context (32768 for Qwen2.5), as /v1/models says (a prompt may fill it)."""
    from kawai.engine.gguf import open_gguf

    trained = open_gguf(default_model_path).metadata["qwen2.context_length"]
    info = client.models.retrieve(model).model_dump()
    assert trained == 32768 and info["max_input_tokens"] == info["max_tokens"] == trained


# ---- SDK: typed exceptions -----------------------------------------------------------------------------


def test_sdk_typed_exceptions(server, tokens, client, model):
    user = [{"role": "user", "content": "Hi"}]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=model, max_tokens=-1, messages=user)
    assert e.value.body["error"]["type"] == "invalid_request_error" and "max_tokens" in e.value.message
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="kawai-nope", max_retries=0).messages.create(
            model=model, max_tokens=1, messages=user)
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic.Anthropic(base_url=server.url, api_key=tokens.models_only, max_retries=0).messages.create(
            model=model, max_tokens=1, messages=user)
    with pytest.raises(anthropic.ContentTooLargeError):
        client.messages.create(model=model, max_tokens=1, messages=[{"role": "user", "content": "x" * (33 << 20)}])
    limited = anthropic.Anthropic(base_url=server.url, api_key=tokens.limited, max_retries=0)
    limited.models.list()
    limited.models.list()
    with pytest.raises(anthropic.RateLimitError) as e:
        limited.models.list()
    assert int(e.value.response.headers["retry-after"]) > 0


def test_sdk_overloaded_when_the_queue_is_full(server, tokens, client, model):
    """queue_size=1: a running stream, a queued one, then the SDK gets OverloadedError (529) at once."""
    headers = {"x-api-key": tokens.all}
    long_body = {"model": model, "max_tokens": 400, "messages": [{"role": "user", "content": "Tell a long story."}],
                 "stream": True}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as a, \
            httpx.Client(base_url=server.url, headers=headers, timeout=120) as b:
        with a.stream("POST", "/v1/messages", json=long_body) as running:
            lines = running.iter_lines()
            for line in lines:
                if line.startswith("event: content_block_delta"):
                    break
            with b.stream("POST", "/v1/messages", json={**long_body, "max_tokens": 1}) as queued:
                with pytest.raises(anthropic.OverloadedError):
                    client.messages.create(model=model, max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
                assert queued.status_code == 200
            running.close()  # disconnect: the engine stops within a token
    worker = server.state.models[model].worker
    deadline = time.monotonic() + 60
    while worker.busy:  # the cancelled jobs leave the queue before the next test
        assert time.monotonic() < deadline
        time.sleep(0.05)


# ---- tools ------------------------------------------------------------------------------------------------


def test_tool_round_trip(client, model):
    """The model calls get_weather; the client sends the result; the model answers with it.

    The result goes back with a short instruction in the same user turn: greedy, the 0.5B model
    otherwise repeats its call (the prompt is Qwen's canonical tool format either way)."""
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = client.messages.create(model=model, max_tokens=48, extra_body=GREEDY, tools=[WEATHER_TOOL],
                                   messages=[question])
    assert first.stop_reason == "tool_use", first.content
    (call,) = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    assert "paris" in call.input["location"].lower()
    answer = client.messages.create(
        model=model, max_tokens=24, extra_body=GREEDY, tools=[WEATHER_TOOL],
        messages=[question, {"role": "assistant", "content": first.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                "content": "Sunny, 22°C"},
                                               {"type": "text", "text": "Answer my question in one sentence."}]}],
    )
    assert answer.stop_reason in ("end_turn", "max_tokens") and answer.content[0].type == "text"
    assert "22" in text_of(answer) or "sunny" in text_of(answer).lower()


def test_streamed_forced_tool_call_sends_arguments_as_they_are_written(server, tokens, model):
    body = {"model": model, "max_tokens": 32, "temperature": 0, "stream": True, "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            "messages": [{"role": "user", "content": "Weather in Tokyo?"}]}
    r = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": tokens.all}, timeout=120)
    frames = parse_sse(r.text)
    message = check_stream(frames)
    starts = [d for e, d in frames if e == "content_block_start"]
    assert starts[0]["index"] == 0 and starts[0]["content_block"]["type"] == "tool_use"
    assert starts[0]["content_block"]["name"] == "get_weather" and starts[0]["content_block"]["input"] == {}
    fragments = [d["delta"]["partial_json"] for e, d in frames
                 if e == "content_block_delta" and d["delta"]["type"] == "input_json_delta"]
    assert len(fragments) >= 3  # streamed token by token, not one piece at the end
    assert "tokyo" in message["content"][0]["input"]["location"].lower()
    assert message["content"][0]["input"] == json.loads("".join(fragments))
    assert message["stop_reason"] == "tool_use"


def test_sdk_stream_accumulates_tool_input(client, model):
    with client.messages.stream(model=model, max_tokens=32, extra_body=GREEDY, tools=[WEATHER_TOOL],
                                tool_choice={"type": "any"},
                                messages=[{"role": "user", "content": "Weather in Berlin?"}]) as stream:
        final = stream.get_final_message()
    calls = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and calls[0].name == "get_weather"
    assert "berlin" in calls[0].input["location"].lower()


# ---- stop sequences, thinking, pings -------------------------------------------------------------------


def test_stop_sequence_spanning_tokens(client, model):
    kw = dict(model=model, max_tokens=40, extra_body=GREEDY, stop_sequences=["5, 6"],
              messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}])
    m = client.messages.create(**kw)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "5, 6"
    assert text_of(m).rstrip().endswith("4,") and "5, 6" not in text_of(m)
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "5, 6" and text_of(final) == text_of(m)


def test_thinking_parameter_is_accepted_by_a_model_without_thinking(client, model):
    m = client.messages.create(model=model, max_tokens=4, thinking={"type": "enabled", "budget_tokens": 1024},
                               messages=[{"role": "user", "content": "Hi"}])
    assert m.content and all(b.type in ("text", "thinking") for b in m.content)


def test_ping_arrives_during_a_long_prefill(server, tokens, model):
    """ping_interval is 0.5 s on this server; a ~250-token prompt takes longer than that to prefill."""
    body = {"model": model, "max_tokens": 1, "stream": True,
            "messages": [{"role": "user", "content": "Summarize: " + "The quick brown fox jumps. " * 40}]}
    r = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": tokens.all}, timeout=300)
    frames = parse_sse(r.text)
    check_stream(frames)
    kinds = [e for e, _ in frames]
    assert "ping" in kinds[: kinds.index("message_delta")]


# ---- the seed's examples, verbatim bodies ------------------------------------------------------------------

SEED_EXAMPLES = {
    "basic": {"model": "qwen3-8b-q8_0", "max_tokens": 1024,
              "messages": [{"role": "user", "content": "Hello, how are you?"}]},
    "system": {"model": "qwen3-8b-q8_0", "max_tokens": 1024, "system": "You are a helpful assistant.",
               "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    "streaming": {"model": "qwen3-8b-q8_0", "max_tokens": 1024, "stream": True,
                  "messages": [{"role": "user", "content": "Write a haiku about coding"}]},
    "multi_turn": {"model": "qwen3-8b-q8_0", "max_tokens": 1024,
                   "messages": [{"role": "user", "content": "What is 2+2?"},
                                {"role": "assistant", "content": "2+2 equals 4."},
                                {"role": "user", "content": "What about 2+3?"}]},
    "tool_calling": {"model": "qwen3-8b-q8_0", "max_tokens": 1024,
                     "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                     "tools": [WEATHER_TOOL]},
    "tool_result": {
        "model": "qwen3-8b-q8_0", "max_tokens": 1024,
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_xyz789", "name": "get_weather",
                                               "input": {"location": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_xyz789",
                                          "content": "Sunny, 22°C"}]},
        ],
        "tools": [{"name": "get_weather", "description": "Get the current weather for a location",
                   "input_schema": {"type": "object", "properties": {"location": {"type": "string"}},
                                    "required": ["location"]}}],
    },
}
VISION_EXAMPLES = {
    "vision_url": {"model": "qwen2.5-vl-3b-instruct-q8_0", "max_tokens": 1024,
                   "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/image.jpg"}}]}]},
    "vision_base64": {"model": "qwen2.5-vl-3b-instruct-q8_0", "max_tokens": 1024,
                      "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe this image"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ..."}}]}]},
}
SEED_MAX_TOKENS = {"tool_calling": 40}  # enough to finish a call; others are cut at 8
STOP_REASONS = {"end_turn", "max_tokens", "stop_sequence", "tool_use"}


def seed_body(name: str, model: str, stream: bool) -> dict:
    examples = {**SEED_EXAMPLES, **VISION_EXAMPLES}
    body = copy.deepcopy(examples[name])
    body.update(model=model, max_tokens=SEED_MAX_TOKENS.get(name, 8), stream=stream)
    return body


def auth_header(style: str, token: str) -> dict:
    return {"Authorization": f"Bearer {token}"} if style == "bearer" else {"x-api-key": token}


def check_message(m: dict, model: str) -> None:
    """The documented non-streaming response format."""
    assert m["type"] == "message" and m["role"] == "assistant" and m["id"].startswith("msg_") and m["model"] == model
    assert m["stop_reason"] in STOP_REASONS and "stop_sequence" in m
    assert m["usage"]["input_tokens"] >= 1 and m["usage"]["output_tokens"] >= 1
    for block in m["content"]:
        assert block["type"] in ("text", "tool_use")
        if block["type"] == "tool_use":
            assert block["id"] and block["name"] == "get_weather" and isinstance(block["input"], dict)
    if any(b["type"] == "tool_use" for b in m["content"]):
        # A sampled reply may go on after a finished call (a second call, text) and be cut: then the
        # reason is max_tokens, as the Anthropic API reports a cut reply whatever blocks it holds.
        assert m["stop_reason"] in ("tool_use", "max_tokens")


@pytest.mark.parametrize("name", sorted(SEED_EXAMPLES))
@pytest.mark.parametrize("stream, style", [(False, "x-api-key"), (True, "bearer")])
def test_seed_example(server, tokens, model, name, stream, style):
    r = httpx.post(server.url + "/v1/messages?beta=true", json=seed_body(name, model, stream),
                   headers={**auth_header(style, tokens.all), "anthropic-version": "2023-06-01"}, timeout=300)
    assert r.status_code == 200, r.text
    assert r.headers["anthropic-request-id"] == r.headers["request-id"]
    if stream:
        assert r.headers["content-type"].startswith("text/event-stream")
        check_message(check_stream(parse_sse(r.text)), model)
    else:
        check_message(r.json(), model)


@pytest.mark.parametrize("name", sorted(VISION_EXAMPLES))
@pytest.mark.parametrize("stream, style", [(False, "x-api-key"), (True, "bearer")])
def test_seed_vision_example_reaches_a_text_model_as_a_placeholder(server, tokens, model, name, stream, style):
    """The image becomes `[image omitted: ...]` (api/prompt.py); the URL is not fetched."""
    r = httpx.post(server.url + "/v1/messages", json={**seed_body(name, model, stream), "max_tokens": 4},
                   headers=auth_header(style, tokens.all), timeout=120)
    assert r.status_code == 200, r.text
    if not stream:
        check_message(r.json(), model)


def test_seed_examples_with_the_documented_model_names_are_served_by_the_one_model(server, tokens, model):
    """One model served: any id reaches it (unless --strict-model-ids); `model` names the one that answered."""
    r = httpx.post(server.url + "/v1/messages", json={**SEED_EXAMPLES["basic"], "max_tokens": 2},
                   headers=auth_header("bearer", tokens.all), timeout=120)
    assert r.status_code == 200 and r.json()["model"] == model
