"""Request validation (api/wire.py) and Anthropic -> HF message mapping (api/prompt.py), no model needed."""

from __future__ import annotations

import pytest

from kawai.api.errors import InvalidRequestError
from kawai.api.prompt import to_hf_messages
from kawai.api.wire import CountTokensRequest, MessagesRequest, ThinkingEnabled, ToolChoiceTool, parse_request

USER = [{"role": "user", "content": "Hi"}]


def ok(**body):
    return parse_request(MessagesRequest, {"model": "m", "max_tokens": 8, "messages": USER, **body})


def err(body) -> str:
    with pytest.raises(InvalidRequestError) as e:
        parse_request(MessagesRequest, body)
    assert e.value.status == 400 and e.value.error_type == "invalid_request_error"
    return e.value.message


def test_minimal_request_and_defaults():
    r = ok()
    assert r.model == "m" and r.max_tokens == 8 and not r.stream
    assert r.messages[0].content[0].text == "Hi"  # string content is one text block
    assert r.system == [] and r.tools == [] and r.tool_choice is None and r.thinking is None


def test_unknown_fields_are_ignored():
    r = ok(metadata={"user_id": "u1", "extra": 1}, service_tier="auto", container=None, whatever={"x": [1]})
    assert r.metadata.user_id == "u1"
    r = parse_request(MessagesRequest, {"model": "m", "max_tokens": 8, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]}]})
    assert r.messages[0].content[0].text == "x"


@pytest.mark.parametrize(
    "patch, path",
    [
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": "8"}, "max_tokens"),
        ({"max_tokens": 8.5}, "max_tokens"),
        ({"temperature": 1.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"stop_sequences": [""]}, "stop_sequences.0"),
        ({"stop_sequences": ["x"] * 65}, "stop_sequences"),
        ({"stream": "yes"}, "stream"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "messages.0.content.0.source"),
        ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages.0.content.0"),
        (
            {"messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": "x"}}]}]},
            "messages.0.content.0.source.media_type",
        ),
        (
            {"messages": [{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": 1}]}]}]},
            "messages.0.content.0.content.0.text",
        ),
        ({"system": [{"type": "text", "text": 5}]}, "system.0.text"),
        ({"tools": [{"name": "bad name!", "input_schema": {}}]}, "tools.0.name"),
        ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
    ],
)
def test_validation_errors_name_the_field(patch, path):
    body = {"model": "m", "max_tokens": 8, "messages": USER, **patch}
    message = err(body)
    assert message.startswith(path + ":"), message
    assert len(message) <= 400


def test_missing_required_fields():
    assert err({"model": "m", "messages": USER}).startswith("max_tokens:")
    assert err({"max_tokens": 8, "messages": USER}).startswith("model:")
    assert "JSON object" in err([1, 2])


def test_error_message_does_not_echo_large_input():
    message = err({"model": "m", "max_tokens": 8, "messages": USER, "tool_choice": {"type": "x" * 100_000}})
    assert len(message) <= 400


def test_count_tokens_request_ignores_generation_fields():
    r = parse_request(CountTokensRequest, {"model": "m", "messages": USER, "max_tokens": "ignored", "stream": 3})
    assert r.model == "m"


def test_tool_choice_and_thinking_variants():
    r = ok(tools=[{"name": "f", "input_schema": {"type": "object"}}],
           tool_choice={"type": "tool", "name": "f", "disable_parallel_tool_use": True},
           thinking={"type": "enabled", "budget_tokens": 1024})
    assert isinstance(r.tool_choice, ToolChoiceTool) and r.tool_choice.disable_parallel_tool_use
    assert isinstance(r.thinking, ThinkingEnabled) and r.thinking_on
    assert ok(thinking={"type": "adaptive"}).thinking_on
    assert not ok(thinking={"type": "disabled"}).thinking_on


# ---- Anthropic messages -> HF messages ---------------------------------------------------------------


def hf(**body):
    return to_hf_messages(parse_request(CountTokensRequest, {"model": "m", **body}))


def test_system_string_blocks_and_mid_conversation_system_are_folded():
    messages, prefill = hf(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "system", "content": "Answer in French."},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "Ça va?"},
        ],
    )
    assert prefill == ""
    assert messages == [
        {"role": "system", "content": "Be brief.\n\nBe kind.\n\nAnswer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Ça va?"},
    ]


def test_tool_use_and_tool_result_mapping():
    messages, _ = hf(
        messages=[
            {"role": "user", "content": "Weather in Paris and Tokyo?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Two calls.", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"location": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"location": "Tokyo"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "Sunny, 22°C"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "boom"}],
                 "is_error": True},
                {"type": "text", "text": "Summarize."},
            ]},
        ]
    )
    assert messages[1] == {
        "role": "assistant",
        "content": "Checking.",
        "reasoning_content": "Two calls.",
        "tool_calls": [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": "get_weather", "arguments": {"location": city}}}
            for i, city in ((1, "Paris"), (2, "Tokyo"))
        ],
    }
    assert messages[2] == {"role": "tool", "content": "Sunny, 22°C", "tool_call_id": "call_1", "name": "get_weather"}
    assert messages[3] == {"role": "tool", "content": "Error: boom", "tool_call_id": "call_2", "name": "get_weather"}
    assert messages[4] == {"role": "user", "content": "Summarize."}


def test_final_assistant_text_is_a_prefill():
    messages, prefill = hf(messages=[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is"}])
    assert messages == [{"role": "user", "content": "2+2?"}] and prefill == "It is"


def test_consecutive_user_turns_merge():
    messages, _ = hf(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert messages == [{"role": "user", "content": "a\n\nb"}]


def test_conversation_without_user_message_is_refused():
    with pytest.raises(InvalidRequestError, match="user message"):
        hf(messages=[{"role": "system", "content": "x"}])
