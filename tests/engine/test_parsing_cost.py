"""Tool-call parsing costs O(1) per character (engine/json_stream.py, engine/output_parser.py), whatever the text:
a client can steer it with an assistant prefill (32,000 `[` once took 13 s, a 32,000-digit number 18 s,
on the event loop). Measured as the CPU time of 8x the input against 1x (linear: ~8, quadratic: ~64),
on this thread only, so other processes on the machine do not count."""

from __future__ import annotations

import json

import pytest

from kawai.engine.chat_format import HERMES
from kawai.engine.json_stream import JsonStream
from kawai.engine.output_parser import OutputParser, ToolCallEnd, ToolCallStart, ToolInputDelta
from costs import cpu_seconds

HEAD = '<tool_call>\n{"name": "f", "arguments": {"a": '
SMALL, LARGE = 4000, 32000


def primed(seed: str) -> OutputParser:
    parser = OutputParser(HERMES, new_id=lambda: "toolu_0", parse_tools=True, tool_names=frozenset({"f"}))
    parser.prime(seed)
    return parser


@pytest.mark.parametrize("body", [lambda n: "[" * n, lambda n: "1" * n, lambda n: '{"k": ' * n])
def test_priming_with_a_long_prefill_is_linear(body):
    small = cpu_seconds(lambda: primed(HEAD + body(SMALL)))
    large = cpu_seconds(lambda: primed(HEAD + body(LARGE)))
    assert large < 20 * max(small, 1e-3), f"{SMALL} chars: {small:.3f} s, {LARGE} chars: {large:.3f} s"


def test_a_deeply_nested_cut_call_still_closes_into_valid_json():
    parser = primed(HEAD + "[" * LARGE)
    events = parser.feed("[1, 2") + parser.finish(cut=True)
    assert isinstance(events[-1], ToolCallEnd)
    arguments = "".join(e.partial_json for e in events if isinstance(e, ToolInputDelta))
    # after the prefill's part (never sent): the value 1, then every bracket closed; `, 2` was held back
    assert arguments == "[1" + "]" * (LARGE + 1) + "}"


def test_a_long_number_streamed_digit_by_digit_is_linear():
    def stream(n: int) -> None:
        js = JsonStream()
        js.feed('{"n": ')
        for _ in range(n):
            js.feed("7")
            js.take_safe()
        js.feed("}")
        assert js.done and js.take_safe().endswith("7}")

    small, large = cpu_seconds(lambda: stream(SMALL)), cpu_seconds(lambda: stream(LARGE))
    assert large < 20 * max(small, 1e-3), f"{SMALL} digits: {small:.3f} s, {LARGE} digits: {large:.3f} s"


def test_an_unusual_call_shape_buffered_to_its_closing_tag_is_found_once():
    """Keys in another order: the call is buffered to </tool_call> and parsed whole."""
    parser = OutputParser(HERMES, new_id=lambda: "toolu_0", parse_tools=True, tool_names=frozenset({"f"}))
    text = '<tool_call>\n{"arguments": {"s": "' + "x" * LARGE + '"}, "name": "f"}\n</tool_call>'
    events = []
    for i in range(0, len(text), 3):
        events += parser.feed(text[i : i + 3])
    events += parser.finish()
    assert [type(e) for e in events] == [ToolCallStart, ToolInputDelta, ToolCallEnd]
    assert json.loads(events[1].partial_json) == {"s": "x" * LARGE}
