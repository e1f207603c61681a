"""POST /v1/chat/completions with the official `openai` SDK against a real server (api/routes_openai.py).

The model is the tiny random-weight one, so content is garbage except where a grammar shapes it
(response_format, forced tool calls): those are checked with `jsonschema`. A seeded request gives the
same tokens twice, which lets streamed and non-streamed replies be compared exactly.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from kawai import engine
from kawai.api.openai_wire import ChatCompletionRequest, to_messages_request
from kawai.api.prompt import build_prompt
from api_harness import home, live_server, tokens  # noqa: F401 (fixtures)
from tiny_models import write_tiny_model

MODEL = "tiny-qwen2-f32"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Tokyo"]}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                 "parameters": WEATHER_SCHEMA}}


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", n_ctx=2048))


@pytest.fixture(scope="module")
def server(tiny_llm, home, tokens):
    with live_server(home, [tiny_llm], queue_size=4, ping_interval=0.2) as s:
        yield s


@pytest.fixture()
def client(server, tokens):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=tokens.all, max_retries=0, timeout=120)


def test_create(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, seed=1)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    (choice,) = r.choices
    assert choice.finish_reason in ("length", "stop") and choice.message.role == "assistant"
    assert r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_completion_tokens_and_length(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=3, temperature=1.5, seed=2,
                                       stop=["never appears"])
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_stream_with_usage_matches_the_seeded_non_streamed_reply(client):
    kwargs = dict(model=MODEL, messages=USER, max_tokens=12, seed=7, temperature=1.0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_has_none(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, stream=True))
    assert chunks and all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_response_format_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA, "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=200, seed=seed, temperature=1.0,
                                           response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER_SCHEMA)


def test_response_format_json_object(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=300, seed=4, temperature=0.3,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":  # an unbounded object may run into max_tokens
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")


def test_tool_call_round_trip(client, tiny_llm):
    tools = [WEATHER_TOOL]
    first = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=200, tools=tools, seed=5,
                                           tool_choice="required", parallel_tool_calls=False, temperature=1.0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)

    history = USER + [choice.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 22 degrees"}]
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=5, tools=tools, seed=6)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the result reached the prompt, next to the call it answers (rendered the way the server renders it)
    chat = ChatCompletionRequest.model_validate({"model": MODEL, "messages": history, "tools": tools})
    text = build_prompt(tiny_llm, to_messages_request(chat, 5)).text
    assert "Sunny, 22 degrees" in text and call.function.arguments in text
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_named_tool_choice_streams_tool_call_deltas(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=200, tools=[WEATHER_TOOL], seed=8, temperature=1.0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False)
    chunks = list(stream)
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and all(d.index == 0 for d in deltas)
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), WEATHER_SCHEMA)
    assert len(deltas) > 3 and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_system_developer_and_image_parts_are_accepted(client):
    msgs = [{"role": "developer", "content": "Be brief."}, {"role": "system", "content": [{"type": "text", "text": "x"}]},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2).choices
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    # a text-only model gets a placeholder for the image (api/prompt.py), as on /v1/messages
    assert client.chat.completions.create(model=MODEL, messages=image, max_tokens=2).choices


# ---- errors ---------------------------------------------------------------------------------------


def test_errors_are_openai_shaped(client, server, tokens):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, n=2)
    assert e.value.body["message"] == "n: only n=1 is supported, got 2" and e.value.body["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/chat/nothing", json={}, headers={"x-api-key": tokens.all})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=USER, temperature=3.0)
    with pytest.raises(openai.BadRequestError, match="uniqueItems"):
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}
        client.chat.completions.create(model=MODEL, messages=USER, response_format=bad)
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server.url + "/v1", api_key="kawai-wrong", max_retries=0).chat.completions.create(
            model=MODEL, messages=USER)
    assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=server.url + "/v1", api_key=tokens.messages_only, max_retries=0).chat.completions.create(
            model=MODEL, messages=USER)
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"x-api-key": tokens.all})
    assert r.status_code == 400 and set(r.json()) == {"error"} and r.headers["request-id"].startswith("req_")


def test_messages_errors_keep_the_anthropic_shape(server, tokens):
    r = httpx.post(server.url + "/v1/messages", json={"model": MODEL}, headers={"x-api-key": tokens.all})
    assert r.status_code == 400 and r.json()["type"] == "error"


def test_models_answer_both_sdks(client, server, tokens):
    (m,) = client.models.list().data
    assert m.id == MODEL and m.object == "model" and isinstance(m.created, int) and m.owned_by
    import anthropic

    info = anthropic.Anthropic(base_url=server.url, api_key=tokens.all).models.list().data[0]
    assert info.id == MODEL and info.type == "model" and info.created_at.timestamp() == m.created


def test_sdk_parse_with_a_pydantic_model(client):
    from typing import Literal

    from pydantic import BaseModel

    class Forecast(BaseModel):
        city: Literal["Paris", "Tokyo"]
        rain: bool

    r = client.chat.completions.parse(model=MODEL, messages=USER, max_tokens=200, seed=9, temperature=1.0,
                                      response_format=Forecast)
    assert isinstance(r.choices[0].message.parsed, Forecast)


def test_the_sdk_message_object_goes_back_as_history(client):
    first = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=200, tools=[WEATHER_TOOL], seed=10,
                                           tool_choice="required", parallel_tool_calls=False)
    message = first.choices[0].message  # a ChatCompletionMessage, sent back as is (refusal, annotations: None)
    tool = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "Sunny"}
    second = client.chat.completions.create(model=MODEL, messages=USER + [message, tool], max_tokens=3)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ---- the real model (slow) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_server(default_model_path, home, tokens):
    llm = engine.load(default_model_path, threads=1)
    with live_server(home, [llm], queue_size=2) as s:
        yield s, llm.id


@pytest.mark.slow
def test_real_model_weather_round_trip_with_a_strict_tool(real_server, tokens):
    """The 0.5B, sampled at 0.7 with `tool_choice` auto: its call (bare or tagged) is checked by the grammar."""
    server, model = real_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=tokens.all, max_retries=0, timeout=600)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather",
                                             "parameters": {**WEATHER_SCHEMA, "required": ["city"]}, "strict": True}}
    for seed in range(2):
        first = client.chat.completions.create(model=model, messages=USER, tools=[tool], temperature=0.7, seed=seed,
                                               max_tokens=100)
        (call,) = first.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
        history = USER + [first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 22 C"}]
        second = client.chat.completions.create(model=model, messages=history, tools=[tool], temperature=0.7,
                                                seed=seed, max_tokens=60)
        assert second.choices[0].finish_reason in ("stop", "tool_calls", "length")
