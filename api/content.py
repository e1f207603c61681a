"""Parser events -> Anthropic content blocks, for streaming and non-streaming responses alike.

`MessageAssembler.add(events)` returns the stream events (`content_block_start` / `_delta` / `_stop`,
block indices 0..n-1 in start order) and keeps the final content list, so a non-streaming response is
exactly what a client accumulating the stream would hold.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kawai.engine.output_parser import (
    Event,
    TextDelta,
    ThinkingDelta,
    ThinkingEnd,
    ToolCallEnd,
    ToolCallStart,
    ToolInputDelta,
)

SIGNATURE_PREFIX = "kawai-"


def thinking_signature(thinking: str) -> str:
    """An opaque value for `signature` (the API requires one); clients pass it back unread."""
    return SIGNATURE_PREFIX + hashlib.sha256(thinking.encode("utf-8")).hexdigest()[:32]


class MessageAssembler:
    def __init__(self, omit_thinking: bool = False) -> None:
        """omit_thinking: thinking blocks are sent empty, with their signature (`display: "omitted"`)."""
        self.omit_thinking = omit_thinking
        self.content: list[dict[str, Any]] = []  # final blocks
        self._open: dict[str, Any] | None = None  # the block receiving deltas
        self._tool_json: list[str] = []  # input fragments of the open tool_use block
        self._thinking: list[str] = []  # text of the open thinking block (also when omitted)

    @property
    def index(self) -> int:
        return len(self.content) - 1

    def add(self, events: list[Event]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for e in events:
            if isinstance(e, TextDelta):
                if self._open_type() != "text":
                    self._start({"type": "text", "text": ""}, out)
                self._open["text"] += e.text
                out.append(self._delta({"type": "text_delta", "text": e.text}))
            elif isinstance(e, ThinkingDelta):
                if self._open_type() != "thinking":
                    self._start({"type": "thinking", "thinking": "", "signature": ""}, out)
                self._thinking.append(e.text)
                if not self.omit_thinking:
                    self._open["thinking"] += e.text
                    out.append(self._delta({"type": "thinking_delta", "thinking": e.text}))
            elif isinstance(e, ThinkingEnd):
                if self._open_type() == "thinking":
                    self._stop(out)
            elif isinstance(e, ToolCallStart):
                self._start({"type": "tool_use", "id": e.id, "name": e.name, "input": {}}, out)
                self._tool_json = []
            elif isinstance(e, ToolInputDelta):
                if self._open_type() == "tool_use" and e.partial_json:
                    self._tool_json.append(e.partial_json)
                    out.append(self._delta({"type": "input_json_delta", "partial_json": e.partial_json}))
            elif isinstance(e, ToolCallEnd):
                if self._open_type() == "tool_use":
                    self._stop(out)
        return out

    def close(self) -> list[dict[str, Any]]:
        """Stop the open block, if any (end of generation)."""
        out: list[dict[str, Any]] = []
        if self._open is not None:
            self._stop(out)
        return out

    def _open_type(self) -> str | None:
        return None if self._open is None else self._open["type"]

    def _start(self, block: dict[str, Any], out: list[dict[str, Any]]) -> None:
        if self._open is not None:
            self._stop(out)
        self.content.append(block)
        self._open = block
        shown = dict(block)
        out.append({"type": "content_block_start", "index": self.index, "content_block": shown})

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}

    def _stop(self, out: list[dict[str, Any]]) -> None:
        block = self._open
        if block["type"] == "thinking":
            block["signature"] = thinking_signature("".join(self._thinking))
            self._thinking = []
            out.append(self._delta({"type": "signature_delta", "signature": block["signature"]}))
        elif block["type"] == "tool_use":
            block["input"] = _tool_input("".join(self._tool_json))
            self._tool_json = []
        out.append({"type": "content_block_stop", "index": self.index})
        self._open = None


def _tool_input(text: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:  # cannot happen: fragments are checked by JsonStream; never fail a response
        return {}
    return value if isinstance(value, dict) else {}
