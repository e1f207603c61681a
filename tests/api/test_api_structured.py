"""Guaranteed structure over HTTP (api/structured.py): structured outputs, strict tools, forced calls.

The model is the tiny random-weight one: without a grammar it writes garbage, so every schema-valid
object here was made valid by the grammar alone. Objects are checked with `jsonschema` (and the SDK's
own Pydantic parsing for `messages.parse`). Schemas use enums, booleans and short strings: a random
model has no reason to ever close an unbounded string.
"""

from __future__ import annotations

import json
from typing import Literal

import anthropic
import httpx
import jsonschema
import pytest
from pydantic import BaseModel

from kawai import engine
from kawai.api.structured import reply_lark
from kawai.api.prompt import build_prompt
from kawai.api.ids import new_tool_use_id
from kawai.engine.chat_format import LLAMA3
from kawai.engine.output_parser import OutputParser, ToolCallEnd, ToolCallStart, ToolInputDelta
from kawai.api.wire import MessagesRequest
from kawai.engine.prefix_cache import OneCache
from kawai.engine.scheduler import Generation, Request, Scheduler
from kawai.engine.sampling import SamplingParams
from api_harness import home, live_server, tokens  # noqa: F401 (fixtures)
from tiny_models import LLAMA3_CHAT_TEMPLATE, TOKEN_ID, write_tiny_model

MODEL = "tiny-qwen2-f32"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "rain": {"type": "boolean"},
    },
    "required": ["city", "unit", "rain"],
    "additionalProperties": False,
}
TIME_SCHEMA = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
WEATHER = {"name": "get_weather", "description": "Weather now", "input_schema": WEATHER_SCHEMA}
TIME = {"name": "get_time", "description": "Time now", "input_schema": TIME_SCHEMA}
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


class Forecast(BaseModel):
    unit: Literal["celsius", "fahrenheit"]
    rain: bool
    windy: bool


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", n_ctx=2048))


@pytest.fixture(scope="module")
def server(tiny_llm, home, tokens):
    with live_server(home, [tiny_llm], queue_size=4) as s:
        yield s


@pytest.fixture()
def client(server, tokens):
    return anthropic.Anthropic(base_url=server.url, api_key=tokens.all, max_retries=0, timeout=120)


@pytest.fixture()
def http(server, tokens):
    with httpx.Client(base_url=server.url, headers={"x-api-key": tokens.all}, timeout=120) as c:
        yield c


def tool_uses(message) -> list:
    return [b for b in message.content if b.type == "tool_use"]


# ---- structured outputs ---------------------------------------------------------------------------


def test_sdk_parse_returns_a_valid_object(client):
    for _ in range(3):
        m = client.messages.parse(model=MODEL, max_tokens=300, messages=USER, output_format=Forecast,
                                  extra_body={"temperature": 1.0})
        assert m.stop_reason == "end_turn"
        assert isinstance(m.parsed_output, Forecast)


def test_output_config_format_with_a_raw_schema(client):
    for _ in range(3):
        m = client.messages.create(model=MODEL, max_tokens=300, messages=USER, extra_body={"temperature": 1.0},
                                   output_config={"format": {"type": "json_schema", "schema": WEATHER_SCHEMA}})
        jsonschema.validate(json.loads(m.content[0].text), WEATHER_SCHEMA)


def test_beta_output_format_field(http):
    body = {"model": MODEL, "max_tokens": 300, "messages": USER, "temperature": 1.0,
            "output_format": {"type": "json_schema", "schema": TIME_SCHEMA}}
    r = http.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["content"][0]["text"]), TIME_SCHEMA)


def test_streamed_and_non_streamed_agree(client):
    kwargs = dict(model=MODEL, max_tokens=300, messages=USER, extra_body={"temperature": 0},
                  output_config={"format": {"type": "json_schema", "schema": WEATHER_SCHEMA}})
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 3  # token by token, not one block at the end
    assert "".join(pieces) == final.content[0].text == whole.content[0].text
    jsonschema.validate(json.loads(whole.content[0].text), WEATHER_SCHEMA)


# ---- tools ----------------------------------------------------------------------------------------


def test_forced_tool_gives_schema_valid_input(client):
    for _ in range(3):
        m = client.messages.create(model=MODEL, max_tokens=300, messages=USER, tools=[WEATHER, TIME],
                                   tool_choice={"type": "tool", "name": "get_weather",
                                                "disable_parallel_tool_use": True},
                                   extra_body={"temperature": 1.0})
        assert m.stop_reason == "tool_use"
        (call,) = tool_uses(m)
        assert call.name == "get_weather"
        jsonschema.validate(call.input, WEATHER_SCHEMA)


def test_tool_choice_any_picks_an_offered_tool_with_valid_input(client):
    seen = set()
    for _ in range(4):
        m = client.messages.create(model=MODEL, max_tokens=400, messages=USER, tools=[WEATHER, TIME],
                                   tool_choice={"type": "any"}, extra_body={"temperature": 1.0})
        calls = tool_uses(m)
        if m.stop_reason == "tool_use":  # several calls may run into max_tokens; finished ones all count
            assert calls and not [b for b in m.content if b.type == "text"]
        for call in calls[: len(calls) if m.stop_reason == "tool_use" else -1]:
            jsonschema.validate(call.input, SCHEMAS[call.name])
            seen.add(call.name)
    assert seen


def test_forced_call_streams_input_json_deltas_that_match(client):
    kwargs = dict(model=MODEL, max_tokens=300, messages=USER, tools=[WEATHER],
                  tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
                  extra_body={"temperature": 1.0})
    with client.messages.stream(**kwargs) as stream:
        deltas = [e.partial_json for e in stream if e.type == "input_json"]
        final = stream.get_final_message()
    (call,) = tool_uses(final)
    assert len(deltas) > 3 and json.loads("".join(deltas)) == call.input
    jsonschema.validate(call.input, WEATHER_SCHEMA)


def test_strict_tools_under_auto_check_every_tagged_call(tiny_llm):
    """Engine-level, seeded. The model is nudged to open `<tool_call>` at its first token (a random model
    rarely does); everything after that is the model's own choice among what the grammar allows."""
    open_call = TOKEN_ID["<tool_call>"]

    def nudged(chunks, caches):
        logits = tiny_llm.forward_batch(chunks, caches)  # one sequence: [(1, V)]
        if prefill.todo and len(prefill.todo) == len(chunks[0].ids):  # the last prompt chunk: its logits
            logits[0][-1, open_call] += 30.0  # give the first generated token
        return logits

    tools = [{**WEATHER, "strict": True}, {**TIME, "strict": True}]
    req = MessagesRequest.model_validate({"model": MODEL, "max_tokens": 200, "messages": USER, "tools": tools})
    prompt = build_prompt(tiny_llm, req)
    grammar = tiny_llm.grammars.compile(reply_lark(req, prompt))
    calls = 0
    for seed in range(8):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=200, grammar=grammar)
        scheduler = Scheduler(tiny_llm, OneCache(tiny_llm.new_cache(2048)), max_sequences=1, forward=nudged)
        gen = Generation(scheduler, Request(prompt.ids, params))
        prefill = gen.seq
        steps = list(gen)
        if steps[-1].finish_reason != "eos":
            continue  # cut by max_tokens: a call may be half written
        parser = OutputParser(tiny_llm.chat_format, new_id=new_tool_use_id, parse_tools=True)
        events = [e for s in steps for e in parser.feed(s.text)] + parser.finish()
        name, args = None, ""
        for e in events:
            if isinstance(e, ToolCallStart):
                if name:
                    jsonschema.validate(json.loads(args), SCHEMAS[name])
                name, args, calls = e.name, "", calls + 1
            elif isinstance(e, ToolInputDelta):
                args += e.partial_json
        if name:
            jsonschema.validate(json.loads(args), SCHEMAS[name])
    assert calls >= 4


def test_strict_flag_makes_auto_constrained_and_plain_tools_are_not(tiny_llm):
    plain = MessagesRequest.model_validate({"model": MODEL, "max_tokens": 9, "messages": USER, "tools": [WEATHER]})
    prompt = build_prompt(tiny_llm, plain)
    assert reply_lark(plain, prompt) is None  # no strict tool, no format, not forced: unconstrained
    strict = plain.model_copy(update={"tools": [plain.tools[0].model_copy(update={"strict": True})]})
    lark = reply_lark(strict, prompt)
    assert "text_to_call[lazy]" in lark and "bare_call" in lark


def test_strict_auto_grammar_takes_bare_and_tagged_calls_and_text_but_no_bad_call(tiny_llm):
    """What the strict auto grammar accepts, token by token (the reply forms of engine/output_parser.py)."""
    tools = [{**WEATHER, "strict": True}]
    req = MessagesRequest.model_validate({"model": MODEL, "max_tokens": 9, "messages": USER, "tools": tools})
    grammar = tiny_llm.grammars.compile(reply_lark(req, build_prompt(tiny_llm, req)))

    def complete(text: str) -> bool:
        return accepts(tiny_llm, grammar, text)

    args = '{"city": "Paris", "unit": "celsius", "rain": false}'
    assert complete('{"name": "get_weather", "arguments": ' + args + "}")
    assert complete('Sure. <tool_call>\n{"name": "get_weather", "arguments": ' + args + "}\n</tool_call>")
    assert complete('<tool_call>\n{"name": "get_weather", "arguments": ' + args + "}\n</tool_call>\nDone.")
    assert complete("Plain text, ```json\n{}\n``` included.")
    assert not complete('{"name": "get_weather", "arguments": {"city": "Paris"}}')  # required keys missing
    assert not complete('{"name": "get_time", "arguments": {}}')  # not an offered tool
    assert not complete('<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>')
    assert not complete('```json\n{"name": "get_weather"}\n```')  # a fenced call cannot open the reply


def accepts(llm, grammar, text: str) -> bool:
    """The grammar takes `text` token by token and may end after it."""
    tok = llm.tokenizer
    c = grammar.start()
    for i in tok.encode(text, special=False):
        if not c.allowed()[i]:
            return False
        c.advance(i)
    return bool(c.allowed()[min(tok.stop_ids)])


# ---- another chat format: Llama 3.1's bare `{"name": …, "parameters": …}` calls ------------------------


@pytest.fixture(scope="module")
def llama3_llm(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("llama3"), "llama", chat_template=LLAMA3_CHAT_TEMPLATE)
    return engine.load(path)


def test_a_forced_call_is_seeded_in_the_models_chat_format(llama3_llm):
    """The seed (api/prompt.py) and the parser that reads the reply (engine/output_parser.py) use the
    model's format, not Qwen's."""
    req = MessagesRequest.model_validate({"model": MODEL, "max_tokens": 9, "messages": USER, "tools": [WEATHER],
                                          "tool_choice": {"type": "tool", "name": "get_weather"}})
    prompt = build_prompt(llama3_llm, req)
    assert prompt.seed == '{"name": "get_weather", "parameters": ' and prompt.chat_format is LLAMA3
    assert not prompt.in_thinking
    parser = OutputParser(prompt.chat_format, new_id=new_tool_use_id, parse_tools=True, tool_names=prompt.tool_names)
    parser.prime(prompt.seed)
    events = parser.feed('{"city": "Paris", "unit": "celsius", "rain": false}}') + parser.finish()
    assert [type(e) for e in events] == [ToolCallStart, ToolInputDelta, ToolCallEnd]


def test_strict_tools_grammar_follows_the_models_chat_format(llama3_llm):
    tools = [{**WEATHER, "strict": True}]
    req = MessagesRequest.model_validate({"model": MODEL, "max_tokens": 9, "messages": USER, "tools": tools})
    grammar = llama3_llm.grammars.compile(reply_lark(req, build_prompt(llama3_llm, req)))
    args = '{"city": "Paris", "unit": "celsius", "rain": false}'
    assert accepts(llama3_llm, grammar, '{"name": "get_weather", "parameters": ' + args + "}")
    assert accepts(llama3_llm, grammar, "It is sunny.")
    assert not accepts(llama3_llm, grammar, '{"name": "get_weather", "arguments": ' + args + "}")  # Qwen's key
    assert not accepts(llama3_llm, grammar, '{"name": "get_weather", "parameters": {"city": "Paris"}}')


# ---- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, feature, where",
    [
        ({"tools": [{**WEATHER, "strict": True, "input_schema": {"type": "object", "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}}]},
         "uniqueItems", "tools.0.input_schema"),
        ({"output_config": {"format": {"type": "json_schema", "schema": {"not": {"type": "string"}}}}},
         "not", "output_config.format.schema"),
        ({"output_format": {"type": "json_schema", "schema": {"type": "string", "format": "shoe-size"}}},
         "shoe-size", "output_config.format.schema"),
    ],
)
def test_unsupported_schema_feature_is_a_400_naming_it(http, extra, feature, where):
    r = http.post("/v1/messages", json={"model": MODEL, "max_tokens": 20, "messages": USER, **extra})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert feature in message and where in message and r.json()["error"]["type"] == "invalid_request_error"


def test_a_plain_forced_tool_with_an_unenforceable_schema_still_gets_a_json_object(client):
    odd = {**WEATHER, "input_schema": {"type": "object", "properties": {"city": {"not": {"type": "integer"}}}}}
    m = client.messages.create(model=MODEL, max_tokens=200, messages=USER, tools=[odd],
                               tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
                               extra_body={"temperature": 0})
    if m.stop_reason == "tool_use":
        assert isinstance(tool_uses(m)[0].input, dict)


def test_thinking_with_a_format_is_refused(http):
    body = {"model": MODEL, "max_tokens": 50, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 10},
            "output_config": {"format": {"type": "json_schema", "schema": TIME_SCHEMA}}}
    r = http.post("/v1/messages", json=body)
    assert r.status_code == 400 and "thinking" in r.json()["error"]["message"]
