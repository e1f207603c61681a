"""The output parser (engine/output_parser.py) and the JSON prefix checker it streams with
(engine/json_stream.py), read through the assembler api/ builds content blocks with.

Every case is checked under every split of the model text into pieces, because tags, escapes and
multi-byte characters arrive split across tokens. The SDK's own partial-JSON parser (jiter, partial
mode, what `messages.stream()` uses) must accept every prefix of streamed tool input.
"""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jiter import from_json

from kawai.api.content import MessageAssembler
from kawai.engine.chat_format import HERMES
from kawai.engine.json_stream import JsonStream, JsonStreamError
from kawai.engine.output_parser import (
    OutputParser,
    TextDelta,
    ThinkingDelta,
    ThinkingEnd,
    ToolCallEnd,
    ToolCallStart,
    ToolInputDelta,
)


def _parser(chat_format=HERMES, **kw) -> OutputParser:
    counter = itertools.count()
    return OutputParser(chat_format, new_id=lambda: f"toolu_{next(counter)}", **{"parse_tools": True, **kw})


def run(pieces, cut=False, seed="", **kw):
    p = _parser(**kw)
    p.prime(seed)
    events = []
    for piece in pieces:
        events += p.feed(piece)
    return events + p.finish(cut=cut)


def blocks(events) -> list[dict]:
    """The final content a client would hold, via the same assembler the server uses."""
    a = MessageAssembler()
    stream = a.add(events) + a.close()
    _check_stream(stream)
    return a.content


def _check_stream(stream) -> None:
    """Indices in start order; deltas only inside their block; every partial tool input parses."""
    open_index, next_index, partial = None, 0, {}
    for e in stream:
        if e["type"] == "content_block_start":
            assert open_index is None and e["index"] == next_index
            open_index, next_index = e["index"], next_index + 1
        elif e["type"] == "content_block_delta":
            assert e["index"] == open_index
            if e["delta"]["type"] == "input_json_delta":
                partial[open_index] = partial.get(open_index, "") + e["delta"]["partial_json"]
                from_json(partial[open_index].encode(), partial_mode=True)  # what the SDK does per delta
        elif e["type"] == "content_block_stop":
            assert e["index"] == open_index
            open_index = None
    assert open_index is None


def splits(text: str, sizes=(1, 2, 3, 5, 7)):
    yield [text]
    for k in sizes:
        yield [text[i : i + k] for i in range(0, len(text), k)]


WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>'


def test_plain_text_passes_through():
    for pieces in splits("Hello! 2+2 is 4, and a < b > c."):
        assert blocks(run(pieces)) == [{"type": "text", "text": "Hello! 2+2 is 4, and a < b > c."}]


def test_tool_call_split_at_every_position():
    expected = [{"type": "tool_use", "id": "toolu_0", "name": "get_weather", "input": {"location": "Paris"}}]
    for pieces in splits(WEATHER):
        assert blocks(run(pieces)) == expected
    for i in range(1, len(WEATHER)):  # every two-piece split, tags included
        assert blocks(run([WEATHER[:i], WEATHER[i:]])) == expected


def test_arguments_stream_as_written_not_at_the_end():
    text = '<tool_call>\n{"name": "write", "arguments": {"path": "a.txt", "text": "one two three four"}}\n</tool_call>'
    events = run(text[i : i + 3] for i in range(0, len(text), 3))
    fragments = [e.partial_json for e in events if isinstance(e, ToolInputDelta)]
    assert len(fragments) > 5  # many deltas, not one blob at the end
    assert json.loads("".join(fragments)) == {"path": "a.txt", "text": "one two three four"}
    # the raw JSON text, as the model wrote it
    assert "".join(fragments) == '{"path": "a.txt", "text": "one two three four"}'


def test_braces_and_tags_inside_strings():
    args = {"code": "if (x) { y(); } // </tool_call> {\"k\": 1}", "n": [1, {"m": "}"}]}
    text = "<tool_call>\n" + json.dumps({"name": "run", "arguments": args}) + "\n</tool_call>"
    for pieces in splits(text):
        assert blocks(run(pieces)) == [{"type": "tool_use", "id": "toolu_0", "name": "run", "input": args}]


def test_several_calls_in_one_turn_with_text_before():
    text = (
        "Let me check both.\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Tokyo"}}\n</tool_call>'
    )
    for pieces in splits(text):
        content = blocks(run(pieces))
        assert [b["type"] for b in content] == ["text", "tool_use", "tool_use"]
        assert content[0]["text"] == "Let me check both."
        assert [b["input"]["location"] for b in content[1:]] == ["Paris", "Tokyo"]
        assert content[1]["id"] != content[2]["id"]


def test_parameterless_tool_gets_empty_object():
    for text in (
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "get_time"}\n</tool_call>',
        '<tool_call>\n{"name": "get_time", "arguments": null}\n</tool_call>',
    ):
        for pieces in splits(text):
            events = run(pieces)
            assert blocks(events) == [{"type": "tool_use", "id": "toolu_0", "name": "get_time", "input": {}}]
            assert "".join(e.partial_json for e in events if isinstance(e, ToolInputDelta)) == "{}"


def test_final_brace_is_not_dropped():
    text = '<tool_call>\n{"name": "f", "arguments": {"a": {"b": [1, 2]}}}\n</tool_call>'
    events = run(list(text))
    assert "".join(e.partial_json for e in events if isinstance(e, ToolInputDelta)) == '{"a": {"b": [1, 2]}}'


def test_other_call_shapes_are_parsed_whole():
    for text, name, args in [
        ('<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>', "f", {"a": 1}),
        ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 2}"}</tool_call>', "f", {"a": 2}),
        ('<tool_call>{"name": "f", "parameters": {"a": 3}}</tool_call>', "f", {"a": 3}),
    ]:
        for pieces in splits(text):
            assert blocks(run(pieces)) == [{"type": "tool_use", "id": "toolu_0", "name": name, "input": args}]


def test_invalid_call_degrades_to_text():
    text = "<tool_call>\nthis is not json\n</tool_call>"
    for pieces in splits(text):
        content = blocks(run(pieces))
        assert content == [{"type": "text", "text": text}]


def test_arguments_turning_invalid_close_the_call_and_keep_the_rest_as_text():
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1, "b": tru}}\n</tool_call>\nDone.'
    for pieces in splits(text):
        content = blocks(run(pieces))
        assert content[0] == {"type": "tool_use", "id": "toolu_0", "name": "f", "input": {"a": 1}}
        assert content[1]["type"] == "text" and "tru" in content[1]["text"]
        assert content[2:] == [] or content[-1]["text"].endswith("Done.")


def test_raw_newlines_in_argument_strings_are_repaired():
    text = '<tool_call>\n{"name": "write", "arguments": {"code": "def f():\n\treturn 1\n"}}\n</tool_call>'
    for pieces in splits(text):
        assert blocks(run(pieces))[0]["input"] == {"code": "def f():\n\treturn 1\n"}


def test_utf8_and_escapes_split_across_pieces():
    args = {"city": "Zürich 東京 🚀", "esc": "tab\tquote\" \\u and \\ud83d"}
    text = "<tool_call>\n" + json.dumps({"name": "f", "arguments": args}) + "\n</tool_call>"  # \\u escapes
    for pieces in splits(text):
        assert blocks(run(pieces))[0]["input"] == args
    text2 = "<tool_call>\n" + json.dumps({"name": "f", "arguments": args}, ensure_ascii=False) + "\n</tool_call>"
    for pieces in splits(text2):
        assert blocks(run(pieces))[0]["input"] == args


def test_lone_surrogate_never_reaches_the_client():
    text = '<tool_call>\n{"name": "f", "arguments": {"a": "x\\ud83d"}}\n</tool_call>'
    content = blocks(run([text]))
    json.dumps(content, ensure_ascii=False).encode("utf-8")  # would raise on a lone surrogate
    assert content[0]["input"] == {"a": "x"}


def test_partial_tag_is_never_emitted_as_text():
    for pieces in (["Sure.\n<tool"], ["Sure.\n<", "tool_c"], ["Sure.", "\n<tool_call"]):
        p = _parser()
        shown = "".join(e.text for piece in pieces for e in p.feed(piece) if isinstance(e, TextDelta))
        assert shown == "Sure."
    # cut by max_tokens mid-tag: the fragment is dropped
    assert blocks(run(["Sure.\n<tool_ca"], cut=True)) == [{"type": "text", "text": "Sure."}]
    # the model really ended there (eos): it was text after all
    assert blocks(run(["x <tool_ca"])) == [{"type": "text", "text": "x <tool_ca"}]


def test_tags_not_parsed_without_tools():
    assert blocks(run([WEATHER], parse_tools=False)) == [{"type": "text", "text": WEATHER}]


def test_cut_mid_arguments_closes_valid_json():
    text = '<tool_call>\n{"name": "f", "arguments": {"path": "a.txt", "text": "half of it'
    content = blocks(run(list(text), cut=True))
    args = {"path": "a.txt", "text": "half of it"}
    assert content == [{"type": "tool_use", "id": "toolu_0", "name": "f", "input": args}]


def test_cut_before_arguments_drops_the_call():
    assert blocks(run(['Hi.\n<tool_call>\n{"name": "get_w'], cut=True)) == [{"type": "text", "text": "Hi."}]


def test_thinking_block_then_text_never_parses_tools_inside():
    text = "<think>\nThe user wants <tool_call>{}</tool_call>, hmm.\n</think>\n\nHello!"
    for pieces in splits(text):
        events = run(pieces)
        content = blocks(events)
        assert [b["type"] for b in content] == ["thinking", "text"]
        assert content[0]["thinking"] == "The user wants <tool_call>{}</tool_call>, hmm."
        assert content[0]["signature"]
        assert content[1]["text"] == "Hello!"


def test_thinking_then_tool_call():
    text = "<think>I should call it.</think>\n" + WEATHER
    for pieces in splits(text):
        content = blocks(run(pieces))
        assert [b["type"] for b in content] == ["thinking", "tool_use"]


def test_prompt_that_opens_think_starts_in_thinking():
    content = blocks(run(["reasoning here\n</think>\n\nanswer"], in_thinking=True))
    assert [(b["type"], b.get("thinking") or b.get("text")) for b in content] == [
        ("thinking", "reasoning here"),
        ("text", "answer"),
    ]


def test_think_tag_after_text_is_just_text():
    assert blocks(run(["Use the <think> tag."])) == [{"type": "text", "text": "Use the <think> tag."}]


def test_forced_call_seed_is_primed_not_emitted():
    seed = '<tool_call>\n{"name": "get_weather", "arguments": '
    for pieces in splits('{"location": "Paris"}}\n</tool_call>'):
        content = blocks(run(pieces, seed=seed))
        assert content == [{"type": "tool_use", "id": "toolu_0", "name": "get_weather", "input": {"location": "Paris"}}]
    for pieces in splits('get_time", "arguments": {}}\n</tool_call>'):
        assert blocks(run(pieces, seed='<tool_call>\n{"name": "'))[0]["name"] == "get_time"


def test_prefill_continues_without_repeating():
    assert blocks(run([" 4."], seed="The answer is")) == [{"type": "text", "text": " 4."}]


def test_event_kinds_in_order():
    kinds = [type(e) for e in run(["<think>a</think>b", WEATHER])]
    assert kinds[:4] == [ThinkingDelta, ThinkingEnd, TextDelta, ToolCallStart]
    assert set(kinds[4:-1]) == {ToolInputDelta} and kinds[-1] is ToolCallEnd


# ---- calls written without <tool_call> tags (Qwen2.5-Coder 0.5B does this) --------------------------

OFFERED = frozenset({"get_weather"})
PARIS = {"type": "tool_use", "id": "toolu_0", "name": "get_weather", "input": {"location": "Paris"}}


@pytest.mark.parametrize(
    "text, expected",
    [
        ('```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "location": "Paris"\n  }\n}\n```', [PARIS]),
        ('{"name": "get_weather", "arguments": {"location": "Paris"}}', [PARIS]),
        (
            'Calling it:\n```json\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n```\nDone.',
            [{"type": "text", "text": "Calling it:"}, PARIS, {"type": "text", "text": "Done."}],
        ),
        # not calls: unknown tool, other JSON, other fences, a brace after text
        ('```json\n{"name": "other", "arguments": {}}\n```', None),
        ('Example:\n```json\n{"a": 1}\n```', None),
        ('```python\nprint("{x}")\n```', None),
        ('{"a": 1} is JSON', None),
        ('Use {"name": "get_weather", "arguments": {}} like this', None),
    ],
)
def test_untagged_calls_to_offered_tools(text, expected):
    for pieces in splits(text):
        content = blocks(run(pieces, tool_names=OFFERED))
        assert content == (expected or [{"type": "text", "text": text}])


def test_untagged_calls_need_offered_names():
    text = '{"name": "get_weather", "arguments": {"location": "Paris"}}'
    assert blocks(run([text])) == [{"type": "text", "text": text}]  # no tool names given


# ---- JsonStream ------------------------------------------------------------------------------------

DOCS = [
    '{"a": 1, "b": [true, false, null, -1.5e+3, "x\\u00e9\\ud83d\\ude00"], "c": {"d": {}}, "e": []}',
    '{}',
    '{"s": "a\\"b\\\\", "n": 0, "f": 0.25E-2}',
    '{"k": "日本語 🚀"}',
]


@pytest.mark.parametrize("doc", DOCS)
def test_every_safe_prefix_completes_to_valid_json(doc):
    for cut in range(1, len(doc) + 1):
        js = JsonStream()
        js.feed(doc[:cut])
        sent = js.text[: js.safe_end]
        assert sent == doc[: js.safe_end]
        if sent:
            from_json(sent.encode(), partial_mode=True)
            json.loads(sent + js.completion)
    js = JsonStream()
    js.feed(doc + "\n}</tool_call>")
    assert js.done and js.end == len(doc) and js.text == doc


@pytest.mark.parametrize(
    "bad",
    ['{"a": 01}', '{"a": tru}', '{"a" 1}', "{a: 1}", '{"a": 1,}', "[1]", '{"a": 1.}', '{"a": -}', '{"a": "\\x"}',
     '{"a": "\\ud83d"}', '{"a": "\\ude00"}', '{"a": "\\ud83dx"}', '{"a": 1 2}', '{"a": [1,]}'],
)
def test_invalid_json_is_refused_and_prefix_stays_completable(bad):
    js = JsonStream()
    with pytest.raises(JsonStreamError):
        js.feed(bad)
    if js.safe_end:
        json.loads(js.text[: js.safe_end] + js.completion)


@settings(max_examples=150, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
        max_leaves=12,
    ),
    st.integers(min_value=1, max_value=9),
    st.booleans(),
)
def test_any_arguments_round_trip_through_the_parser(value, piece, ascii_only):
    args = {"v": value}
    text = "<tool_call>\n" + json.dumps({"name": "f", "arguments": args}, ensure_ascii=ascii_only) + "\n</tool_call>"
    content = blocks(run([text[i : i + piece] for i in range(0, len(text), piece)]))
    assert content == [{"type": "tool_use", "id": "toolu_0", "name": "f", "input": args}]
