"""A model's chat format (engine/chat_format.py) through api/: the forced-call seed (api/prompt.py) and
the strict-tools grammar (api/structured.py) speak the model's syntax, and the output parser reads it
back. A tiny llama model with a Llama 3.1-style template (bare `{"name": …, "parameters": …}` calls)
is the non-Qwen family; the Qwen one is covered by test_api_structured.py and test_api_toolcalls.py.
"""

from __future__ import annotations

import pytest

from kawai import engine
from kawai.api.prompt import build_prompt
from kawai.api.structured import reply_lark
from kawai.api.wire import MessagesRequest
from kawai.engine.chat_format import LLAMA3
from kawai.engine.output_parser import OutputParser, ToolCallEnd, ToolCallStart, ToolInputDelta
from tiny_models import LLAMA3_CHAT_TEMPLATE, write_tiny_model

WEATHER = {
    "name": "get_weather",
    "description": "Weather now",
    "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]},
}
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def llama3_llm(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("llama3"), "llama", chat_template=LLAMA3_CHAT_TEMPLATE)
    return engine.load(path)


def test_a_forced_call_is_seeded_in_the_models_format(llama3_llm):
    req = MessagesRequest.model_validate({"model": "m", "max_tokens": 9, "messages": USER, "tools": [WEATHER],
                                          "tool_choice": {"type": "tool", "name": "get_weather"}})
    prompt = build_prompt(llama3_llm, req)
    assert prompt.seed == '{"name": "get_weather", "parameters": ' and prompt.chat_format is LLAMA3
    assert not prompt.in_thinking
    parser = OutputParser(prompt.chat_format, new_id=lambda: "toolu_0", parse_tools=True, tool_names=prompt.tool_names)
    parser.prime(prompt.seed)
    events = parser.feed('{"city": "Paris"}}') + parser.finish()
    assert [type(e) for e in events] == [ToolCallStart, ToolInputDelta, ToolCallEnd]


def test_strict_tools_grammar_follows_the_format(llama3_llm):
    tools = [{**WEATHER, "strict": True}]
    req = MessagesRequest.model_validate({"model": "m", "max_tokens": 9, "messages": USER, "tools": tools})
    grammar = llama3_llm.grammars.compile(reply_lark(req, build_prompt(llama3_llm, req)))
    tok = llama3_llm.tokenizer

    def complete(text: str) -> bool:
        c = grammar.start()
        for i in tok.encode(text, special=False):
            if not c.allowed()[i]:
                return False
            c.advance(i)
        return bool(c.allowed()[min(tok.stop_ids)])

    assert complete('{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert complete("It is sunny.")
    assert not complete('{"name": "get_weather", "arguments": {"city": "Paris"}}')  # Qwen's key
    assert not complete('{"name": "get_weather", "parameters": {"city": "Rome"}}')  # not in the enum
