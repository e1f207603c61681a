"""The grammar of an Anthropic Messages event stream, checked, and the message it builds.

    stream  := message_start  block*  final  message_stop       (pings, keepalives anywhere in between)
             | message_start  ...  error                      (an error ends a started stream)
    block   := content_block_start(index = number of blocks so far)  delta*  content_block_stop(index)
    final   := message_delta with a stop_reason

Pings may come anywhere after message_start (never before it), and so may keepalives: message_deltas
without a stop_reason, which only update the usage (the API allows several message_delta; the server sends
one after a long silence, as the SDKs drop pings). Each delta names the open block's index and has the type
that block takes: text -> text_delta; tool_use -> input_json_delta (the fragments join to the input's
JSON); thinking -> thinking_delta, then signature_delta last. Exactly one final message_delta, after every
block has stopped; then only pings before message_stop. Each frame's `event:` name equals its data's
`type` (the SDK drops frames otherwise).
See shared/docs/messages-api.md "Streaming" and tests/data/anthropic_stream_golden.sse.

    message = check_stream(parse_sse(response.text))   # AssertionError naming the broken rule

api_harness.LiveServer runs this on every stream it serves; tests that read raw frames call it too.
"""

from __future__ import annotations

import copy
import json

DELTA_TYPES = {  # content block type -> the delta types it takes
    "text": {"text_delta"},
    "tool_use": {"input_json_delta"},
    "thinking": {"thinking_delta", "signature_delta"},
}


def check_stream(frames: list[tuple[str | None, dict]]) -> dict:
    """frames [(event name, data)], e.g. from api_harness.parse_sse -> the message they build: the
    message_start message with its content blocks filled in, stop_reason/stop_sequence and usage from
    message_delta. A stream ended by an `error` event returns {"type": "error", "error": ...}."""
    assert frames, "empty stream"
    for i, (event, data) in enumerate(frames):
        assert isinstance(data, dict) and "type" in data, f"frame {i}: no JSON object with a type"
        assert event == data["type"], f"frame {i}: event {event!r} but data type {data['type']!r}"
    kinds = [data["type"] for _, data in frames]
    assert kinds[0] == "message_start", f"the stream starts with {kinds[0]!r}, not message_start"
    message = copy.deepcopy(frames[0][1]["message"])  # filled in as the stream goes
    assert message["type"] == "message" and message["role"] == "assistant", message
    assert message["content"] == [] and message["stop_reason"] is None, "message_start carries no content"
    assert isinstance(message["usage"]["input_tokens"], int), message

    open_index: int | None = None
    partial_json: dict[int, str] = {}
    signed: set[int] = set()  # thinking blocks whose signature_delta came
    finished = False  # the final message_delta seen
    for i, (_, data) in enumerate(frames[1:], start=1):
        kind = data["type"]
        where = f"frame {i} ({kind})"
        if kind == "error":
            assert i == len(frames) - 1, f"{where}: frames after an error"
            assert data["error"]["type"] and isinstance(data["error"]["message"], str), where
            return {"type": "error", "error": data["error"]}
        assert kind != "message_start", f"{where}: a second message_start"
        if kind == "ping":
            continue
        if kind == "message_stop":
            assert finished, f"{where}: message_stop before the final message_delta"
            assert i == len(frames) - 1, f"{where}: frames after message_stop"
            return message
        assert not finished, f"{where}: after the final message_delta"
        if kind == "message_delta" and data["delta"]["stop_reason"] is None:  # a keepalive
            assert isinstance(data["usage"]["output_tokens"], int), f"{where}: no usage.output_tokens"
            message["usage"].update(data["usage"])
            continue
        if kind == "content_block_start":
            assert open_index is None, f"{where}: block {open_index} is still open"
            assert data["index"] == len(message["content"]), f"{where}: index {data['index']}"
            block = copy.deepcopy(data["content_block"])
            assert block["type"] in DELTA_TYPES, f"{where}: unknown block type {block['type']!r}"
            if block["type"] == "tool_use":
                assert block["id"] and block["name"] and block["input"] == {}, f"{where}: {block}"
            message["content"].append(block)
            open_index = data["index"]
        elif kind == "content_block_delta":
            assert data["index"] == open_index, f"{where}: index {data['index']}, open block {open_index}"
            block, delta = message["content"][open_index], data["delta"]
            assert delta["type"] in DELTA_TYPES[block["type"]], f"{where}: {delta['type']} in a {block['type']} block"
            assert open_index not in signed, f"{where}: a delta after the signature"
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "input_json_delta":
                partial_json[open_index] = partial_json.get(open_index, "") + delta["partial_json"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            else:
                block["signature"] = delta["signature"]
                signed.add(open_index)
        elif kind == "content_block_stop":
            assert data["index"] == open_index, f"{where}: index {data['index']}, open block {open_index}"
            if open_index in partial_json:
                message["content"][open_index]["input"] = json.loads(partial_json[open_index])
            open_index = None
        elif kind == "message_delta":
            assert open_index is None, f"{where}: block {open_index} never stopped"
            assert data["delta"]["stop_reason"] is not None, f"{where}: no stop_reason"
            assert isinstance(data["usage"]["output_tokens"], int), f"{where}: no usage.output_tokens"
            message["stop_reason"] = data["delta"]["stop_reason"]
            message["stop_sequence"] = data["delta"].get("stop_sequence")
            message["usage"].update(data["usage"])
            finished = True
        else:
            raise AssertionError(f"{where}: unknown event")
    raise AssertionError("the stream ends without message_stop")


def parse_sse(raw: str) -> list[tuple[str | None, dict]]:
    """(event name, data) per frame; checks each frame's shape on the way."""
    frames = []
    for chunk in raw.split("\n\n"):
        if not chunk.strip():
            continue
        event, data = None, None
        for line in chunk.split("\n"):
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                assert data is None, "one data line per frame"
                data = json.loads(line[len("data: "):])
            else:
                raise AssertionError(f"unexpected SSE line {line!r}")
        frames.append((event, data))
    return frames
