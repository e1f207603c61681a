"""What real clients send, made into what a local text model can take: content blocks and tool types.

Agents keep every block of a conversation in its history and send it again on every turn, so a block
we refused once would fail every later turn of the session. Instead, each block type the Anthropic API
knows and we cannot run is turned into text the model can read (or a placeholder naming it), and each
tool type is either given its documented input schema or dropped with a log line:

  block                                   becomes (a text block)
  document (text, content, PDF, url/file)  "Document: <title>" + its text (PDF: extracted with pypdf)
  search_result                            "Search result: <title>\\nSource: <source>" + its text
  tool_reference                           "Tool reference: <tool_name>"
  server_tool_use, mcp_tool_use            "[server tool call <name>: <input JSON>]"
  web_search_tool_result                   one line per result: "<title> <url>"
  web_fetch_tool_result                    the fetched document, as a document block
  *_tool_result (code execution, mcp, …)   the result's text, stdout and stderr
  container_upload, anything unknown       "[<type> block omitted]", logged

  tool type                                becomes
  custom / none                            itself
  bash_*, text_editor_*, memory_*          a custom tool with the schema Anthropic documents
  web_search_*, web_fetch_*, code_execution_*, computer_*, tool_search_*, anything else without an
  input_schema                             dropped, logged (we cannot run server tools; no vision)

Images sent to a model without vision are handled where the model is known (api/prompt.py).
These run as pydantic `BeforeValidator`s (api/wire.py), on the decoded JSON, off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from typing import Any

log = logging.getLogger("kawai.api")

MESSAGE_BLOCKS = frozenset({"text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"})
TOOL_RESULT_PARTS = frozenset({"text", "image"})
MAX_PDF_PAGES = 100  # the Anthropic API's limit per document
MAX_PLACEHOLDER_TYPE_CHARS = 64


def placeholder(kind: str) -> str:
    return f"[{kind[:MAX_PLACEHOLDER_TYPE_CHARS]} block omitted]"


def degrade_blocks(value: Any, known: frozenset[str] = MESSAGE_BLOCKS) -> Any:
    """A content list with every block whose type is not in `known` turned into a text block. Anything
    else (not a list, a block that is no object or has no type) is left for validation to report."""
    if not isinstance(value, list):
        return value
    return [_as_text(b) if isinstance(b, dict) and isinstance(b.get("type"), str) and b["type"] not in known else b
            for b in value]


def degrade_tool_result_parts(value: Any) -> Any:
    return degrade_blocks(value, TOOL_RESULT_PARTS)


def _as_text(block: dict[str, Any]) -> dict[str, Any]:
    kind = block.get("type")
    convert = CONVERTERS.get(kind)
    if convert is None and kind.endswith("_tool_result"):
        convert = _tool_result_text
    if convert is None:
        log.warning("content block of type %r is not supported: replaced by a placeholder", kind[:64])
        text = placeholder(kind)
    else:
        try:
            text = convert(block)
        except (KeyError, TypeError, ValueError, AttributeError):
            log.warning("malformed %r content block: replaced by a placeholder", kind[:64])
            text = placeholder(kind)
    return {"type": "text", "text": text}


# ---- one converter per block type -------------------------------------------------------------------


def _document_text(block: dict[str, Any]) -> str:
    source = block.get("source") or {}
    kind = source.get("type")
    if kind == "text":
        body = str(source.get("data", ""))
    elif kind == "content":
        body = _plain_text(source.get("content"))
    elif kind == "base64" and source.get("media_type") == "application/pdf":
        body = pdf_text(source.get("data", ""))
    elif kind == "base64" and str(source.get("media_type", "")).startswith("text/"):
        body = _decode_base64(source.get("data", "")).decode("utf-8", errors="replace")
    elif kind == "url":
        body = f"[document at {str(source.get('url', ''))[:2000]} not fetched: send its text instead]"
    else:
        body = f"[{kind or 'unknown'} document source not supported]"
    head = [f"Document: {block['title']}"] if block.get("title") else []
    if block.get("context"):
        head.append(str(block["context"]))
    return "\n".join(head + [body])


def _search_result_text(block: dict[str, Any]) -> str:
    return (f"Search result: {block.get('title', '')}\nSource: {block.get('source', '')}\n"
            + _plain_text(block.get("content")))


def _tool_reference_text(block: dict[str, Any]) -> str:
    return f"Tool reference: {block['tool_name']}"


def _server_tool_use_text(block: dict[str, Any]) -> str:
    return f"[server tool call {block.get('name', '')}: {json.dumps(block.get('input', {}), ensure_ascii=False)}]"


def _web_search_result_text(block: dict[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, dict):  # web_search_tool_result_error
        return f"[web search failed: {content.get('error_code', 'error')}]"
    lines = [f"{r.get('title', '')} {r.get('url', '')}".strip() for r in content or [] if isinstance(r, dict)]
    return "Web search results:\n" + "\n".join(lines)


def _web_fetch_result_text(block: dict[str, Any]) -> str:
    content = block.get("content") or {}
    if content.get("type") != "web_fetch_result":
        return f"[web fetch failed: {content.get('error_code', 'error')}]"
    document = content.get("content") or {}
    return f"Fetched {content.get('url', '')}\n" + _document_text(document)


def _tool_result_text(block: dict[str, Any]) -> str:
    """Code execution, bash/text-editor code execution, MCP and other server-side tool results."""
    return _plain_text(block.get("content"))


CONVERTERS = {
    "document": _document_text,
    "search_result": _search_result_text,
    "tool_reference": _tool_reference_text,
    "server_tool_use": _server_tool_use_text,
    "mcp_tool_use": _server_tool_use_text,
    "web_search_tool_result": _web_search_result_text,
    "web_fetch_tool_result": _web_fetch_result_text,
}


def _plain_text(value: Any) -> str:
    """The readable text in a result: strings, text blocks, stdout/stderr, nested content."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(t for t in (_plain_text(v) for v in value) if t)
    if not isinstance(value, dict):
        return ""
    if isinstance(value.get("text"), str):
        return value["text"]
    if value.get("type") == "document":
        return _document_text(value)
    parts = [f"{key}: {value[key]}" for key in ("stdout", "stderr") if value.get(key)]
    if value.get("return_code") not in (None, 0):
        parts.append(f"return code: {value['return_code']}")
    if value.get("error_code"):
        parts.append(f"error: {value['error_code']}")
    nested = _plain_text(value.get("content"))
    return "\n".join(parts + ([nested] if nested else []))


def _decode_base64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


def pdf_text(data: str) -> str:
    """The text of a base64 PDF (pypdf), page by page, at most MAX_PDF_PAGES pages; a placeholder
    when it cannot be read (encrypted, damaged, scanned images only)."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(_decode_base64(data)))
        pages = [page.extract_text() or "" for page in reader.pages[:MAX_PDF_PAGES]]
    except (PyPdfError, ValueError, KeyError, TypeError, OSError, RecursionError):
        return "[PDF document omitted: it could not be read]"
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    return text or "[PDF document omitted: it has no extractable text]"


# ---- tools ------------------------------------------------------------------------------------------
# The input schemas Anthropic documents for its client tools (the client runs them; the model only has
# to know their parameters). Keyed by the type's prefix: bash_20250124, text_editor_20250728, ...

_STRING = {"type": "string"}
_INT = {"type": "integer"}
_RANGE = {"type": "array", "items": {"type": "integer"}, "description": "[start_line, end_line]; -1 = end of file"}

CLIENT_TOOL_SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "bash_": (
        "Run a command in a persistent bash shell.",
        {"type": "object", "properties": {
            "command": {"type": "string", "description": "The bash command to run."},
            "restart": {"type": "boolean", "description": "Restart the shell."},
        }},
    ),
    "text_editor_": (
        "View, create and edit text files. view: a file or directory; create: a new file with file_text; "
        "str_replace: replace old_str (unique) with new_str; insert: insert insert_text after insert_line.",
        {"type": "object", "properties": {
            "command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "undo_edit"]},
            "path": {"type": "string", "description": "Absolute path of the file or directory."},
            "file_text": _STRING, "old_str": _STRING, "new_str": _STRING, "insert_line": _INT,
            "insert_text": _STRING, "view_range": _RANGE,
        }, "required": ["command", "path"]},
    ),
    "memory_": (
        "A memory directory (/memories) kept across conversations: view, create, str_replace, insert, "
        "delete and rename files in it.",
        {"type": "object", "properties": {
            "command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "delete", "rename"]},
            "path": _STRING, "view_range": _RANGE, "file_text": _STRING, "old_str": _STRING, "new_str": _STRING,
            "insert_line": _INT, "insert_text": _STRING, "old_path": _STRING, "new_path": _STRING,
        }, "required": ["command"]},
    ),
}


def client_tools(value: Any) -> Any:
    """The tools list with Anthropic-defined client tools given their schemas and server tools (and
    any typed tool we do not know, without an input_schema) dropped."""
    if not isinstance(value, list):
        return value
    out = []
    for tool in value:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind in (None, "custom") or not isinstance(kind, str):
            out.append(tool)
            continue
        known = next((v for prefix, v in CLIENT_TOOL_SCHEMAS.items() if kind.startswith(prefix)), None)
        if known is not None:
            description, schema = known
            out.append({"name": tool.get("name", kind.rsplit("_", 1)[0]), "description": description,
                        "input_schema": schema})
        elif isinstance(tool.get("input_schema"), dict):
            out.append({k: v for k, v in tool.items() if k != "type"})
        else:
            log.info("tool %r of type %r dropped: it runs on Anthropic's servers (or is unknown here)",
                     str(tool.get("name", ""))[:64], kind[:64])
    return out
