"""Chat formats (engine/chat_format.py): which family a model file belongs to, the strings a format
derives, and that the output parser reads each format's calls (tests/api/test_api_structured.py
follows a format through the prompt seed and the strict-tools grammar).

The real catalog models are read for detection; a tiny llama model carrying a Llama 3.1-style template
(calls as bare `{"name": …, "parameters": …}` objects, no tags, no thinking) stands in for the second
family, since no Llama 3 file is in the catalog.
"""

from __future__ import annotations

import itertools
import json

import pytest

from kawai import engine
from kawai.engine.chat_format import CHAT_FORMATS, HERMES, LLAMA3, chat_format_for
from kawai.engine.output_parser import OutputParser, TextDelta, ToolCallEnd, ToolCallStart, ToolInputDelta
from tiny_models import CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE, write_tiny_model


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
    assert chat_format_for(meta, LLAMA3_CHAT_TEMPLATE) is LLAMA3
    assert chat_format_for(meta, CHAT_TEMPLATE) is HERMES
    # Hermes-2-Pro on Llama 3 writes <tool_call> tags around its calls, with Llama 3's header tokens.
    assert chat_format_for(meta, CHAT_TEMPLATE + "<|eot_id|>" + '"parameters": ') is HERMES


def test_the_llm_exposes_its_format(tmp_path):
    hermes = engine.load(write_tiny_model(tmp_path, "qwen3"))
    llama3 = engine.load(write_tiny_model(tmp_path / "l3.gguf", "llama", chat_template=LLAMA3_CHAT_TEMPLATE))
    assert hermes.chat_format is HERMES and llama3.chat_format is LLAMA3


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
