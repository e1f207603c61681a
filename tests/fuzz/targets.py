"""Fuzz targets: the parsers that read what a client (or a steered model, or a model file) sends.

Each target takes plain values, runs one parser on them and asserts what must hold for every input: only
the documented error type escapes, and what is accepted is consistent. A failed assertion or any other
exception is a bug. Two drivers call them:

    tests/fuzz/test_fuzz_parsers.py   hypothesis, bounded, in the default suite
    tests/fuzz/fuzz.py TARGET         atheris, coverage-guided, as long as you like (docs/security.md)

Targets:
    json_stream(text, cuts)           engine/json_stream.JsonStream: JsonStreamError only; every prefix it calls
                                      safe + its completion is valid JSON; agrees with json.loads on objects
    request_body(body, openai)        the body of POST /v1/messages (or /v1/chat/completions) -> bytes decoded
                                      and validated: InvalidRequestError only, a 400 naming no more than 400 chars
    output_parser(seed, text, cuts, options)  engine/output_parser.OutputParser (any chat format): never raises; tool calls are
                                      well nested and their arguments a JSON object; without tags, text is kept
    gguf(data, path)                  engine/gguf.open_gguf: GGUFError only
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from kawai.api.errors import InvalidRequestError
from kawai.api.openai_wire import ChatCompletionRequest, to_messages_request
from kawai.api.routes_messages import _decode_request
from kawai.api.wire import MAX_ERROR_CHARS, MessagesRequest
from kawai.engine.chat_format import HERMES, ChatFormat
from kawai.engine.gguf import GGUFError, open_gguf
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

WHITESPACE = " \t\r\n"


def pieces(text: str, cuts: Sequence[int]) -> list[str]:
    """`text` cut at the given offsets (taken modulo its length + 1, sorted): how a stream delivers it."""
    at = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(at, at[1:])] or [""]


# ---- engine/json_stream.py --------------------------------------------------------------------------------


def _strict_object(text: str):
    """json.loads for what JsonStream promises to accept: one object, no NaN/Infinity, no lone surrogates."""
    def no_constant(name: str):
        raise ValueError(name)

    try:
        value = json.loads(text, parse_constant=no_constant)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # a lone surrogate cannot be encoded
    except (ValueError, RecursionError, UnicodeEncodeError):
        return None
    return value if isinstance(value, dict) else None


def json_stream(text: str, cuts: Sequence[int] = ()) -> None:
    js = JsonStream()
    sent = ""
    try:
        for piece in pieces(text, cuts):
            js.feed(piece)
            sent += js.take_safe()
            assert js.text.startswith(sent)
            if sent:  # every prefix sent so far closes into a valid document
                json.loads(sent + js.completion)
    except JsonStreamError:
        assert _strict_object(text) is None, f"refused a valid object: {text!r}"
        return
    if js.done:
        value = json.loads(js.text)  # raw control characters in strings were repaired into escapes
        assert isinstance(value, dict)
        strict = _strict_object(text)
        assert strict is None or strict == value
    else:  # a prefix of an object, never a whole one
        assert _strict_object(text) is None, f"a whole object left open: {text!r}"


# ---- request bodies -------------------------------------------------------------------------------------


def request_body(body: bytes, openai: bool = False) -> None:
    try:
        if openai:
            req = _decode_request(body, ChatCompletionRequest)
            to_messages_request(req, max_tokens=req.token_limit or 16)
        else:
            req = _decode_request(body, MessagesRequest)
            assert req.messages and 0 <= req.max_tokens
    except InvalidRequestError as e:
        assert e.status == 400 and e.message and len(e.message) <= MAX_ERROR_CHARS + 200


# ---- engine/output_parser.py -------------------------------------------------------------------------------------


def output_parser(seed: str, text: str, cuts: Sequence[int] = (), parse_tools: bool = True,
                  in_thinking: bool = False, fenced_calls: bool = True, cut: bool = False,
                  chat_format: ChatFormat = HERMES, tool_names: frozenset[str] = frozenset({"f", "get_weather"})) -> None:
    calls = iter(range(1 << 30))
    parser = OutputParser(chat_format, new_id=lambda: f"toolu_{next(calls)}", parse_tools=parse_tools,
                          tool_names=tool_names, in_thinking=in_thinking, fenced_calls=fenced_calls,
                          parse_thinking=parse_tools)
    events = parser.feed(seed)  # prime(), keeping what it would drop: a call may open in the prefill
    for piece in pieces(text, cuts):
        events += parser.feed(piece)
    events += parser.finish(cut=cut)
    in_call, arguments, calls = False, "", 0
    for e in events:
        if isinstance(e, ToolCallStart):
            assert not in_call and e.name and e.id
            in_call, arguments = True, ""
        elif isinstance(e, ToolInputDelta):
            assert in_call
            arguments += e.partial_json
        elif isinstance(e, ToolCallEnd):
            assert in_call and isinstance(json.loads(arguments or "{}"), dict), arguments
            in_call, calls = False, calls + 1
        else:
            assert isinstance(e, (TextDelta, ThinkingDelta, ThinkingEnd)) and not in_call
    assert not in_call and parser.tool_calls <= calls
    if not parse_tools and not in_thinking and not seed:  # nothing is markup: the text comes back whole
        assert "".join(e.text for e in events) == text.strip(WHITESPACE)  # whitespace at the ends is dropped


# ---- engine/gguf.py -------------------------------------------------------------------------------------


def gguf(data: bytes, path: Path) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    try:
        g = open_gguf(path)
    except GGUFError:
        return
    for name, info in g.tensors.items():
        assert info.offset + info.n_bytes <= g.file_size and math.prod(info.shape) >= 1, name
        g.tensor_data(name)
