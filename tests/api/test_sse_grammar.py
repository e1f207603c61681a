"""tests/sse_grammar.py, the checker every streaming test relies on: it accepts the documented Anthropic
stream and rebuilds its message, and it rejects each way a stream can break.

The golden transcript, tests/data/anthropic_stream_golden.sse, follows the examples of Anthropic's
"Streaming Messages" documentation (a thinking block with its signature_delta, a text block with a ping
inside, a tool_use block whose input arrives as input_json_delta fragments starting with "", then
message_delta with stop_reason tool_use) and shared/docs/messages-api.md.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from sse_grammar import check_stream, parse_sse

GOLDEN = parse_sse((Path(__file__).parents[1] / "data" / "anthropic_stream_golden.sse").read_text())


def test_the_documented_stream_builds_its_message():
    message = check_stream(GOLDEN)
    assert message == {
        "id": "msg_01Aq9w938a90dw8q", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [
            {"type": "thinking", "thinking": "The user wants the weather, so I call get_weather.",
             "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"},
            {"type": "text", "text": "Okay, let's check the weather for San Francisco, CA:"},
            {"type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather",
             "input": {"location": "San Francisco, CA", "unit": "fahrenheit"}},
        ],
        "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 472, "output_tokens": 89},
    }


def _kinds() -> list[str]:
    return [e for e, _ in GOLDEN]


def _without(kind: str, which: int = -1) -> list:
    at = [i for i, k in enumerate(_kinds()) if k == kind][which]
    return GOLDEN[:at] + GOLDEN[at + 1:]


def _delta_at(block_type_index: int):
    return next(i for i, (e, d) in enumerate(GOLDEN) if e == "content_block_delta" and d["index"] == block_type_index)


def _broken() -> dict[str, list]:
    ping = ("ping", {"type": "ping"})
    wrong_delta = copy.deepcopy(GOLDEN)
    wrong_delta[_delta_at(1)][1]["delta"] = {"type": "input_json_delta", "partial_json": "{}"}  # in a text block
    thinking_in_text = copy.deepcopy(GOLDEN)
    thinking_in_text[_delta_at(1)][1]["delta"] = {"type": "thinking_delta", "thinking": "x"}
    wrong_index = copy.deepcopy(GOLDEN)
    wrong_index[_delta_at(2)][1]["index"] = 1
    skipped_index = copy.deepcopy(GOLDEN)
    for _, d in skipped_index:
        if d.get("index") == 2:
            d["index"] = 3
    mismatched_event = copy.deepcopy(GOLDEN)
    mismatched_event[1] = ("content_block_delta", mismatched_event[1][1])
    after_signature = copy.deepcopy(GOLDEN)
    sig = next(i for i, (e, d) in enumerate(GOLDEN) if e == "content_block_delta" and d["delta"]["type"] == "signature_delta")
    after_signature.insert(sig + 1, copy.deepcopy(GOLDEN[sig - 1]))
    bad_json = copy.deepcopy(GOLDEN)
    bad_json[_delta_at(2) + 1][1]["delta"]["partial_json"] = "{\"location\";"
    stop_first = [GOLDEN[0], GOLDEN[-1]]
    return {
        "ping before message_start": [ping] + GOLDEN,
        "no message_start": GOLDEN[1:],
        "two message_starts": GOLDEN[:1] + GOLDEN,
        "last block never stopped": _without("content_block_stop"),
        "first block never stopped": _without("content_block_stop", 0),
        "a block stopped twice": GOLDEN[:-2] + [GOLDEN[-3]] + GOLDEN[-2:],
        "no message_delta": _without("message_delta"),
        "two message_deltas": GOLDEN[:-1] + [GOLDEN[-2]] + GOLDEN[-1:],
        "no message_stop": GOLDEN[:-1],
        "frames after message_stop": GOLDEN + [ping],
        "message_stop first": stop_first,
        "input_json_delta in a text block": wrong_delta,
        "thinking_delta in a text block": thinking_in_text,
        "delta for a block that is not open": wrong_index,
        "block indices skip one": skipped_index,
        "event name differs from data type": mismatched_event,
        "thinking after the signature": after_signature,
        "tool input fragments that are not JSON": bad_json,
    }


@pytest.mark.parametrize("name", list(_broken()))
def test_each_broken_stream_is_rejected(name):
    with pytest.raises((AssertionError, ValueError)):
        check_stream(_broken()[name])


def test_keepalive_message_deltas_may_come_anywhere_before_the_final_one():
    """A message_delta without a stop reason (the server's keepalive in long silences) only updates usage."""
    keepalive = ("message_delta", {"type": "message_delta", "delta": {"stop_reason": None, "stop_sequence": None},
                                   "usage": {"input_tokens": 472, "output_tokens": 0}})
    inside_a_block = GOLDEN[:2] + [keepalive] + GOLDEN[2:]
    before_any_block = GOLDEN[:1] + [keepalive, keepalive] + GOLDEN[1:]
    assert check_stream(inside_a_block) == check_stream(before_any_block) == check_stream(GOLDEN)
    with pytest.raises(AssertionError):
        check_stream(GOLDEN[:-1] + [keepalive] + GOLDEN[-1:])  # after the final message_delta


def test_an_error_event_may_end_a_started_stream():
    error = ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert check_stream(GOLDEN[:5] + [error])["error"]["type"] == "overloaded_error"
    with pytest.raises(AssertionError):
        check_stream(GOLDEN[:5] + [error] + GOLDEN[5:])
