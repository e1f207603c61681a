"""Every block and tool type real clients send, through the official Python SDK against a real server.

Agents resend their whole history every turn, so each of these must be answered (never a 400 that
wedges the session). The oracle is count_tokens: a conversation with the block counts exactly as many
tokens as the same conversation with the text the block is documented to become (api/blocks.py), and
messages.create answers 200. A tiny random-weight model (byte-level tokenizer: every character counts).
"""

from __future__ import annotations

import base64
import json
import logging

import anthropic
import pytest

from kawai import engine
from kawai.api.blocks import CLIENT_TOOL_SCHEMAS, placeholder
from api_harness import home, live_server, tokens  # noqa: F401 (fixtures)
from tiny_models import write_tiny_model

MODEL = "tiny-qwen2-f32"


@pytest.fixture(scope="module")
def server(tmp_path_factory, home, tokens):
    llm = engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", n_ctx=4096), threads=1)
    with live_server(home, [llm]) as s:
        yield s


@pytest.fixture()
def client(server, tokens):
    return anthropic.Anthropic(base_url=server.url, api_key=tokens.all, max_retries=0, timeout=60)


def user(*blocks) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Read this."}, *blocks]}]


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def count(client, messages, **kw) -> int:
    return client.messages.count_tokens(model=MODEL, messages=messages, **kw).input_tokens


def assert_reads_as(client, messages, expected_messages, **kw):
    assert count(client, messages, **kw) == count(client, expected_messages, **kw)
    reply = client.messages.create(model=MODEL, max_tokens=2, messages=messages, **kw)
    assert reply.type == "message" and reply.stop_reason == "max_tokens"


def tiny_pdf(line: str) -> bytes:
    """A one-page PDF showing `line` in Helvetica (objects, xref and trailer written out)."""
    content = f"BT /F1 12 Tf 20 100 Td ({line}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 144] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


# ---- documents --------------------------------------------------------------------------------------


def test_text_document_is_inlined_with_its_title(client):
    doc = {"type": "document", "title": "notes.txt", "context": "From the user's desk.",
           "source": {"type": "text", "media_type": "text/plain", "data": "Buy milk."}}
    assert_reads_as(client, user(doc), user(text("Document: notes.txt\nFrom the user's desk.\nBuy milk.")))


def test_content_document_is_inlined(client):
    doc = {"type": "document", "source": {"type": "content", "content": [text("Part one."), text("Part two.")]}}
    assert_reads_as(client, user(doc), user(text("Part one.\nPart two.")))


def test_pdf_document_is_its_extracted_text(client):
    data = base64.b64encode(tiny_pdf("Hello from a PDF")).decode()
    doc = {"type": "document", "title": "letter.pdf",
           "source": {"type": "base64", "media_type": "application/pdf", "data": data}}
    assert_reads_as(client, user(doc), user(text("Document: letter.pdf\nHello from a PDF")))


def test_unreadable_pdf_and_url_document_become_placeholders(client):
    broken = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                             "data": base64.b64encode(b"%PDF-1.4 not really").decode()}}
    assert_reads_as(client, user(broken), user(text("[PDF document omitted: it could not be read]")))
    url = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
    assert_reads_as(client, user(url),
                    user(text("[document at https://example.com/a.pdf not fetched: send its text instead]")))


# ---- search results, tool references, server tools in history --------------------------------------


def test_search_result_is_text_with_its_source(client):
    result = {"type": "search_result", "source": "https://docs.example.com/a", "title": "Install",
              "content": [text("Run make install.")], "citations": {"enabled": True}}
    assert_reads_as(client, user(result),
                    user(text("Search result: Install\nSource: https://docs.example.com/a\nRun make install.")))


def test_search_result_and_tool_reference_inside_a_tool_result(client):
    def history(parts):
        return [{"role": "user", "content": "Find the tool."},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "search", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": parts}]}]

    got = history([{"type": "tool_reference", "tool_name": "get_weather"},
                   {"type": "search_result", "source": "s", "title": "t", "content": [text("c")]}])
    assert_reads_as(client, got, history([text("Tool reference: get_weather"), text("Search result: t\nSource: s\nc")]))


def test_server_tool_blocks_in_history_are_flattened(client):
    query = {"query": "weather Paris"}
    assistant = [
        text("Let me search."),
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": query},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
            {"type": "web_search_result", "url": "https://w.example/p", "title": "Paris weather",
             "encrypted_content": "xyz", "page_age": "1 day"}]},
        {"type": "web_fetch_tool_result", "tool_use_id": "srvtoolu_2", "content": {
            "type": "web_fetch_result", "url": "https://w.example/p", "retrieved_at": "2026-01-01T00:00:00Z",
            "content": {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Sunny."}}}},
        {"type": "code_execution_tool_result", "tool_use_id": "srvtoolu_3", "content": {
            "type": "code_execution_result", "stdout": "42\n", "stderr": "", "return_code": 0, "content": []}},
        text("It is sunny."),
    ]
    flat = [
        text("Let me search."),
        text(f"[server tool call web_search: {json.dumps(query)}]"),
        text("Web search results:\nParis weather https://w.example/p"),
        text("Fetched https://w.example/p\nSunny."),
        text("stdout: 42\n"),
        text("It is sunny."),
    ]

    def convo(blocks):
        return [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": blocks},
                {"role": "user", "content": "Thanks. And tomorrow?"}]

    assert_reads_as(client, convo(assistant), convo(flat))


def test_unknown_block_type_is_a_logged_placeholder(client, caplog):
    with caplog.at_level(logging.WARNING, logger="kawai.api"):
        assert_reads_as(client, user({"type": "hologram_2031", "data": "..."}), user(text(placeholder("hologram_2031"))))
    assert any("hologram_2031" in r.getMessage() for r in caplog.records)


# ---- tools ------------------------------------------------------------------------------------------


def test_anthropic_client_tools_get_their_documented_schemas(client):
    messages = user()
    for kind, name in [("bash_20250124", "bash"), ("text_editor_20250728", "str_replace_based_edit_tool"),
                       ("text_editor_20250124", "str_replace_editor"), ("memory_20250818", "memory")]:
        description, schema = next(v for prefix, v in CLIENT_TOOL_SCHEMAS.items() if kind.startswith(prefix))
        custom = {"name": name, "description": description, "input_schema": schema}
        assert_reads_as(client, messages, messages, tools=[{"type": kind, "name": name}])
        assert count(client, messages, tools=[{"type": kind, "name": name}]) == count(client, messages, tools=[custom])
        assert count(client, messages, tools=[custom]) > count(client, messages)


def test_server_tools_are_dropped_with_a_log_line(client, caplog):
    server_tools = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
                    {"type": "web_fetch_20250910", "name": "web_fetch"},
                    {"type": "code_execution_20250825", "name": "code_execution"}]
    weather = {"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}
    messages = user()
    with caplog.at_level(logging.INFO, logger="kawai.api"):
        assert count(client, messages, tools=server_tools + [weather]) == count(client, messages, tools=[weather])
        reply = client.messages.create(model=MODEL, max_tokens=2, messages=messages, tools=server_tools)
    assert reply.type == "message"
    assert any("web_search" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)
