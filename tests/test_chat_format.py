"""Chat formats (engine/chat_format.py): which family a model file belongs to, and that a family's reply
syntax flows through the prompt seed, the output parser and the strict-tools grammar alike.

The real catalog models are read for detection; a tiny llama model carrying a Llama 3.1-style template
(calls as bare `{"name": …, "parameters": …}` objects, no tags, no thinking) stands in for the second
family, since no Llama 3 file is in the catalog.
"""

from __future__ import annotations

import itertools
import json

import pytest

from kawai import engine
from kawai.api.prompt import build_prompt
from kawai.api.structured import reply_lark
from kawai.api.wire import MessagesRequest
from kawai.engine.chat_format import CHAT_FORMATS, HERMES, LLAMA3, chat_format_for
from kawai.engine.output_parser import OutputParser, TextDelta, ToolCallEnd, ToolCallStart, ToolInputDelta
from tiny_models import CHAT_TEMPLATE, write_tiny_model

# The shape of Llama 3.1's template (meta-llama/Llama-3.1-8B-Instruct), trimmed to what matters here:
# header tokens, <|eot_id|>, and tool calls written as a bare JSON object with "parameters".
LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- if tools %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n' }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {%- for t in tools %}{{- '\\n' + t | tojson }}{%- endfor %}
    {{- '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.tool_calls %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {{- '{"name": "' + call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- call.arguments | tojson }}
        {{- '}<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""
WEATHER = {
    "name": "get_weather",
    "description": "Weather now",
    "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]},
}
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def llama3_llm(tmp_path_factory):
    return engine.load(write_tiny_model(tmp_path_factory.mktemp("llama3"), "llama", chat_template=LLAMA3_TEMPLATE))


def run(fmt, text, **kw) -> list:
    counter = itertools.count()
    parser = OutputParser(fmt, new_id=lambda: f"toolu_{next(counter)}", **kw)
    events = []
    for i in range(0, len(text), 3):  # tags and keys split across pieces
        events += parser.feed(text[i : i + 3])
    return events + parser.finish()


def call_of(events) -> tuple[str, dict]:
    assert [type(e) for e in events if not isinstance(e, ToolInputDelta)] == [ToolCallStart, ToolCallEnd]
    return events[0].name, json.loads("".join(e.partial_json for e in events if isinstance(e, ToolInputDelta)))


# ---- detection ------------------------------------------------------------------------------------


def test_qwen_files_are_hermes_by_their_template(qwen_meta):
    assert "<tool_call>" in qwen_meta["tokenizer.chat_template"]
    assert chat_format_for(qwen_meta, qwen_meta["tokenizer.chat_template"]) is HERMES


def test_smollm2_writes_no_calls_and_gets_its_architecture_default(smollm_meta):
    """SmolLM2's template has no tool syntax and its vocabulary no <tool_call>: the llama row decides."""
    template = smollm_meta["tokenizer.chat_template"]
    assert "tool" not in template and "<tool_call>" not in smollm_meta["tokenizer.ggml.tokens"]
    assert chat_format_for(smollm_meta, template) is HERMES


def test_a_qwen_vocabulary_means_hermes_whatever_the_template(qwen_meta):
    assert chat_format_for({**qwen_meta, "general.architecture": "llama"}, "{{ messages }}") is HERMES


def test_templates_pick_their_family():
    meta = {"general.architecture": "llama", "tokenizer.ggml.tokens": ["a", "b"]}
    assert chat_format_for(meta, LLAMA3_TEMPLATE) is LLAMA3
    assert chat_format_for(meta, CHAT_TEMPLATE) is HERMES
    # Hermes-2-Pro on Llama 3 writes <tool_call> tags around its calls, with Llama 3's header tokens.
    assert chat_format_for(meta, CHAT_TEMPLATE + "<|eot_id|>" + '"parameters": ') is HERMES


def test_the_llm_exposes_its_format(tiny_llm_hermes, llama3_llm):
    assert tiny_llm_hermes.chat_format is HERMES and llama3_llm.chat_format is LLAMA3


@pytest.fixture(scope="module")
def tiny_llm_hermes(tmp_path_factory):
    return engine.load(write_tiny_model(tmp_path_factory.mktemp("hermes"), "qwen3"))


# ---- the pieces ------------------------------------------------------------------------------------


def test_hermes_pieces_are_qwens_markup():
    """The strings api/ used to spell itself, now derived from the format."""
    assert HERMES.forced_call_opening() == '<tool_call>\n{"name": "'
    assert HERMES.forced_call_opening("f") == '<tool_call>\n{"name": "f", "arguments": '
    assert HERMES.call_suffix == "}\n</tool_call>"
    assert HERMES.forced_think_close == "\n</think>\n\n"
    assert HERMES.opens_thinking("<|im_start|>assistant\n<think>\n") and not HERMES.opens_thinking("x</think>")


@pytest.mark.parametrize("fmt", CHAT_FORMATS.values(), ids=CHAT_FORMATS)
def test_a_formatted_call_parses_back(fmt):
    """What the format writes for a call (its forced opening + arguments + suffix) is read back as that call."""
    text = fmt.forced_call_opening("get_weather") + '{"city": "Paris"}' + fmt.call_suffix
    events = run(fmt, text, parse_tools=True, tool_names=frozenset({"get_weather"}))
    assert call_of(events) == ("get_weather", {"city": "Paris"})


def test_llama3_reads_bare_parameters_and_leaves_qwen_tags_as_text():
    names = frozenset({"get_weather"})
    assert call_of(run(LLAMA3, '{"name": "get_weather", "parameters": {"city": "Oslo"}}', parse_tools=True,
                       tool_names=names)) == ("get_weather", {"city": "Oslo"})
    tagged = '<think>hm</think> <tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    events = run(LLAMA3, tagged, parse_tools=True, tool_names=names)
    assert all(isinstance(e, TextDelta) for e in events) and "".join(e.text for e in events) == tagged


# ---- through api/ ------------------------------------------------------------------------------------


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
