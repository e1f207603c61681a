"""Property-based fuzzing of the parsers a client can reach (tests/fuzz/targets.py), bounded to run in the
default suite: the streaming JSON checker, request bodies (decode + validation, both APIs), the tool-call
output parser, the GGUF reader. Inputs are JSON-ish character soup, real JSON with random formatting and
edits, and valid requests with one subtree replaced. Then: no input costs more than linear time (8x the
input, at most 20x the CPU time; tests/engine/test_parsing_cost.py has the fixed worst cases).

Long coverage-guided runs of the same targets: `tests/fuzz/fuzz.py` (atheris), see docs/security.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import targets
from kawai.engine.chat_format import HERMES, LLAMA3
from kawai.engine.gguf import open_gguf
from kawai.engine.json_stream import JsonStream, JsonStreamError
from kawai.engine.output_parser import OutputParser
from tiny_models import write_tiny_model
from costs import cpu_seconds

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- inputs -------------------------------------------------------------------------------------------

JSON_BITS = list('{}[]":,0123456789-+.eE \n\t\\/abcuntrlsfd') + ["\\u00e9", "\\ud83d", "\\ude00", "\x01", "é", "true",
                                                               "null", "false", '"k"', "1e999", "-0"]
soup = st.lists(st.sampled_from(JSON_BITS), max_size=80).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
objects = st.dictionaries(st.text(max_size=6), json_values, max_size=5)


@st.composite
def formatted(draw, values=objects) -> str:
    """A JSON text with random formatting, sometimes edited (a character inserted, dropped or replaced)."""
    text = json.dumps(draw(values), indent=draw(st.sampled_from([None, 0, 2])), ensure_ascii=draw(st.booleans()))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(JSON_BITS + [""])) + text[at + draw(st.integers(0, 1)):]
    return text


json_texts = soup | formatted()
cuts = st.lists(st.integers(0, 10_000), max_size=8)

VALID_REQUESTS = [
    {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
    {"model": "m", "max_tokens": 16, "stream": True, "system": [{"type": "text", "text": "s"}], "temperature": 0.5,
     "stop_sequences": ["x"], "metadata": {"user_id": "u"}, "thinking": {"type": "enabled", "budget_tokens": 8},
     "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                               {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                            "data": "iVBORw0KGgo="}}]},
                  {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": ""},
                                                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"},
                                               {"type": "document", "source": {"type": "text", "data": "d"}}]}],
     "tools": [{"name": "f", "input_schema": {"type": "object"}}, {"type": "bash_20250124", "name": "bash"}],
     "tool_choice": {"type": "tool", "name": "f"},
     "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
]
VALID_CHAT = [
    {"model": "m", "max_tokens": 16, "messages": [{"role": "system", "content": "s"},
                                                  {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                                  {"role": "assistant", "content": None, "tool_calls": [
                                                      {"id": "c", "type": "function",
                                                       "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
                                                  {"role": "tool", "tool_call_id": "c", "content": "ok"}],
     "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
     "tool_choice": "required", "response_format": {"type": "json_object"}, "stop": ["x"]},
]


@st.composite
def edited_request(draw, bases) -> object:
    """A valid request with one subtree (or key) replaced by any JSON value."""
    value = json.loads(json.dumps(draw(st.sampled_from(bases))))
    node = value
    for _ in range(draw(st.integers(0, 6))):
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        if not isinstance(node[key], (dict, list)) or draw(st.booleans()):
            node[key] = draw(json_values)
            break
        node = node[key]
    return value


def bodies(bases) -> st.SearchStrategy[bytes]:
    return (edited_request(bases).map(lambda v: json.dumps(v).encode())
            | formatted(edited_request(bases)).map(str.encode)
            | st.binary(max_size=64)
            | st.integers(1, 5000).map(lambda n: b'{"messages": ' + b"[" * n))


TAGS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "```json\n", "```\n", "```", "<tool_", "</th"]
CALL_BITS = ['{"name": "f", "arguments": ', '{"name": "get_weather", "arguments": {', '"arguments": ', '"name": ',
             '{"a": ', '"x"', "1", "[", "]", "{", "}", ",", ":", " ", "\n", '"', "\\", "\\u12", "x", "é", "\x00"]
model_text = st.lists(st.sampled_from(TAGS + CALL_BITS), max_size=40).map("".join) | st.text(max_size=40)


# ---- properties --------------------------------------------------------------------------------------------


@FUZZ
@given(json_texts, cuts)
def test_json_stream(text, cut_at):
    targets.json_stream(text, cut_at)


@FUZZ
@given(bodies(VALID_REQUESTS))
def test_messages_request_bodies(body):
    targets.request_body(body)


@FUZZ
@given(bodies(VALID_CHAT))
def test_chat_completion_request_bodies(body):
    targets.request_body(body, openai=True)


@FUZZ
@given(model_text | st.just(""), model_text, cuts, st.booleans(), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from([HERMES, LLAMA3]))
def test_output_parser(seed, text, cut_at, parse_tools, in_thinking, fenced_calls, cut, chat_format):
    targets.output_parser(seed, text, cut_at, parse_tools, in_thinking, fenced_calls, cut, chat_format)


@pytest.fixture(scope="module")
def gguf_seed(tmp_path_factory) -> tuple[bytes, int]:
    """A tiny real model file (metadata of every kind, a vocabulary, tensors) and where its tensor data starts."""
    path = write_tiny_model(tmp_path_factory.mktemp("fuzz-gguf"), "qwen2")
    return path.read_bytes(), open_gguf(path).data_offset


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_gguf_reader(gguf_seed, tmp_path_factory, data):
    """Bytes overwritten in the header, metadata and tensor table (the data section is never parsed), or cut."""
    seed, data_offset = gguf_seed
    buf = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, data_offset))
        chunk = data.draw(st.binary(min_size=1, max_size=9) | st.sampled_from([b"\xff" * 8, b"\0" * 8]))
        buf[at : at + len(chunk)] = chunk
    cut = data.draw(st.none() | st.integers(0, data_offset))
    targets.gguf(bytes(buf[:cut]), tmp_path_factory.getbasetemp() / "fuzz.gguf")


# ---- cost ----------------------------------------------------------------------------------------------


def linear(make, run, small: int = 300) -> None:
    """run(make(8n)) costs at most 20x run(make(n)) (linear: ~8x; quadratic: ~64x)."""
    t_small = cpu_seconds(lambda: run(make(small)))
    t_large = cpu_seconds(lambda: run(make(8 * small)))
    assert t_large < 20 * max(t_small, 2e-3), f"{t_small:.4f} s -> {t_large:.4f} s"


def stream_chars(text: str) -> None:
    js = JsonStream()
    try:
        for ch in text:
            js.feed(ch)
            js.take_safe()
        js.completion
    except JsonStreamError:
        pass


def prime(text: str) -> None:
    parser = OutputParser(HERMES, new_id=lambda: "toolu_0", parse_tools=True, tool_names=frozenset({"f"}))
    parser.prime(text)
    parser.feed("x")
    parser.finish(cut=True)


COST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
units = st.lists(st.sampled_from(JSON_BITS + CALL_BITS + TAGS), min_size=1, max_size=4).map("".join)


@COST
@given(soup, units)
def test_json_stream_cost_is_linear(prefix, unit):
    linear(lambda n: prefix + unit * (n // len(unit) + 1), stream_chars)


@COST
@given(model_text, units)
def test_output_parser_cost_is_linear(prefix, unit):
    linear(lambda n: prefix + unit * (n * 4 // len(unit) + 1), prime)


@COST
@given(st.sampled_from([b'{"model": "m", "max_tokens": 1, "messages": [', b'{"messages": [{"role": "user", "content": ']),
       units)
def test_request_body_cost_is_linear(prefix, unit):
    linear(lambda n: prefix + unit.encode() * (n * 4 // len(unit) + 1), targets.request_body)


# ---- the long-running driver still runs --------------------------------------------------------------------


@pytest.mark.parametrize("target", ["json_stream", "request_body", "chat_request_body", "output_parser", "gguf"])
def test_the_atheris_driver_runs_each_target(target, tmp_path):
    """tests/fuzz/fuzz.py (docs/security.md), a few hundred coverage-guided runs from its seeds."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    done = subprocess.run([sys.executable, "-P", str(Path(targets.__file__).parent / "fuzz.py"), target, "-runs=300",
                           "-timeout=60", str(corpus)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and "Done 300 runs" in done.stderr, done.stderr[-3000:]
    assert any(corpus.iterdir())
