"""Incremental parser of a model's reply text into content events (text, thinking, tool calls).

A model family writes reasoning and tool calls in its own markup (engine/chat_format.py); the parser
reads that markup so the layers above see events, never tags. In the hermes format (Qwen) a reply is

    <think>\nreasoning\n</think>\n\nSome text.
    <tool_call>
    {"name": "get_weather", "arguments": {"location": "Paris"}}
    </tool_call>

Small models (Qwen2.5-Coder 0.5B) often write the same call object without the tags, in a ```json fence
or bare as the whole reply; those are calls too, but only when the name is one of the offered tools (a
format without call tags, llama3, writes every call bare). `OutputParser.feed(text)` takes each decoded
piece as generated and returns events:

    TextDelta(text) | ThinkingDelta(text) | ThinkingEnd() |
    ToolCallStart(id, name) | ToolInputDelta(partial_json) | ToolCallEnd()

Rules:
- Tags may be split across pieces: text that could still become a tag is held back, never emitted.
- Once `{"name": "…", "arguments": ` is seen (the format's arguments key), the arguments object is
  streamed as the model writes it, checked by `JsonStream` (only completable prefixes are sent; braces
  inside strings are just text). If it turns invalid midway, the call is closed with a valid completion
  and the rest becomes text.
- Inside call tags any other shape (keys in another order, arguments as a string, no arguments)
  is buffered to the closing tag and parsed whole; a call that is not valid JSON becomes a text block.
  A call with no arguments gets `{}`. A fence or bare object that is not such a call stays text.
- The think tag (and a bare `{`) are recognised only before any text; nothing inside a think block is
  parsed as a tool call.
- Whitespace around tags (the newlines between calls, after the think block) is dropped.

Tool-use ids come from the caller (`new_id`): their style belongs to the API that shows them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto

from kawai.engine.chat_format import ChatFormat
from kawai.engine.json_stream import JsonStream, JsonStreamError

FENCE_OPENS = ("```json\n", "```\n")  # a call object in a code fence, closed by FENCE_CLOSE
FENCE_CLOSE = "```"
BARE_OPEN = "{"  # a call object as the whole reply
WHITESPACE = " \t\r\n"
MAX_HEAD_CHARS = 4096  # `{"name": "…", "arguments": ` longer than this is parsed whole instead


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ThinkingDelta:
    text: str


@dataclass(frozen=True)
class ThinkingEnd:
    pass


@dataclass(frozen=True)
class ToolCallStart:
    id: str
    name: str


@dataclass(frozen=True)
class ToolInputDelta:
    partial_json: str


@dataclass(frozen=True)
class ToolCallEnd:
    pass


Event = TextDelta | ThinkingDelta | ThinkingEnd | ToolCallStart | ToolInputDelta | ToolCallEnd


class _Frame(Enum):
    """How the call being parsed is delimited."""

    TAG = auto()  # <tool_call> … </tool_call> (the format's call tags)
    FENCE = auto()  # ```json … ```
    BARE = auto()  # { … } at the start of the reply


class _State(Enum):
    TEXT = auto()
    THINK = auto()
    TOOL_HEAD = auto()  # after the call's opening, before the arguments object opens
    TOOL_ARGS = auto()  # streaming the arguments object
    TOOL_TAIL = auto()  # arguments done, waiting for the end of the call
    TOOL_WHOLE = auto()  # buffering to the closing tag: an unusual shape, or the rest of broken arguments


class OutputParser:
    """Feed decoded text with `feed`, then call `finish` once; both return lists of events."""

    def __init__(
        self,
        chat_format: ChatFormat,
        *,
        new_id: Callable[[], str],
        parse_tools: bool,
        tool_names: frozenset[str] = frozenset(),
        parse_thinking: bool = True,
        in_thinking: bool = False,
        fenced_calls: bool = True,
    ):
        """new_id: a fresh tool-use id per call. tool_names: the offered tools; calls without call tags
        must name one of them. fenced_calls: False = a call in a code fence stays text (a grammar checks
        only the other forms)."""
        fmt = chat_format
        self.parse_tools = parse_tools
        self.tool_names = frozenset(tool_names) if parse_tools else frozenset()
        self.parse_thinking = parse_thinking and fmt.think_open is not None
        self.fenced_calls = fenced_calls
        self.new_id = new_id
        # The format's tags ("" where it has none: never searched for).
        self._tool_open, self._tool_close = fmt.call_open or "", fmt.call_close or ""
        self._think_open, self._think_close = fmt.think_open or "", fmt.think_close or ""
        self._arguments_key = fmt.arguments_key
        self.tool_calls = 0  # completed tool_use blocks
        self._state = _State.THINK if in_thinking else _State.TEXT
        self._buf = ""  # received, not yet decided
        self._events: list[Event] = []
        self._seen_text = False  # any text emitted (then the think tag is no longer special)
        self._strip_leading = True  # drop whitespace at the start of the next text / thinking
        self._json: JsonStream | None = None
        self._scanned = 0  # TOOL_WHOLE: the buffer before this holds no closing tag
        self._broken_rest: str | None = None  # arguments that turned invalid, shown as text
        self._frame = _Frame.TAG
        self._opener = ""  # the text that opened the current call (shown if it is no call after all)

    # ---- public -------------------------------------------------------------------------------------

    def prime(self, text: str) -> None:
        """Advance over text that is already in the prompt (an assistant prefill, a forced tool call
        opening) without emitting it."""
        self.feed(text)

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        while self._advance():
            pass
        return self._take()

    def finish(self, cut: bool = False) -> list[Event]:
        """End of generation. `cut`: stopped by a limit (max_tokens, stop sequence, context), so a
        half-written tag or tool call is dropped rather than shown as text."""
        buf, self._buf = self._buf, ""
        s = self._state
        if s is _State.TEXT:
            self._text(_drop_partial_tag(buf, self._text_tags()) if cut else buf, final=True)
        elif s is _State.THINK:
            self._thinking(_drop_partial_tag(buf, (self._think_close,)) if cut else buf, final=True)
            self._events.append(ThinkingEnd())
        elif s in (_State.TOOL_HEAD, _State.TOOL_WHOLE) and not cut:
            if self._broken_rest is not None:
                self._broken_text(buf)
            elif self._frame is _Frame.TAG:
                self._whole_call(buf, closed=False)
            else:
                self._strip_leading = False
                self._text((self._opener if self._frame is _Frame.FENCE else "") + buf, final=True)
        elif s is _State.TOOL_ARGS:
            self._close_arguments(complete=False)
        self._state = _State.TEXT
        return self._take()

    # ---- states -------------------------------------------------------------------------------------

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _text_tags(self) -> tuple[str, ...]:
        tags = (self._tool_open,) if self.parse_tools and self._tool_open else ()
        if self.tool_names and self.fenced_calls:
            tags += FENCE_OPENS
        if not self._seen_text:
            tags += (self._think_open,) if self.parse_thinking else ()
            tags += (BARE_OPEN,) if self.tool_names else ()
        return tags

    def _advance(self) -> bool:
        """Process what the buffer allows; True if the state changed and another pass may do more."""
        s = self._state
        if s is _State.TEXT:
            return self._advance_text()
        if s is _State.THINK:
            return self._advance_think()
        if s is _State.TOOL_HEAD:
            return self._advance_head()
        if s is _State.TOOL_ARGS:
            return self._advance_args()
        if s is _State.TOOL_TAIL:
            return self._advance_tail()
        return self._advance_whole()

    def _advance_text(self) -> bool:
        tags = self._text_tags()
        at, tag = _find_first(self._buf, tags)
        reply_openers = (self._think_open, BARE_OPEN)
        if tag in reply_openers and self._buf[:at].strip(WHITESPACE):  # these only open a reply
            tags = tuple(t for t in tags if t not in reply_openers)
            at, tag = _find_first(self._buf, tags)
        if tag is None:
            held = _partial_tag_len(self._buf, tags)
            ready = self._buf[: len(self._buf) - held]
            body = ready.rstrip(WHITESPACE)  # trailing whitespace waits: it is dropped before a tag
            self._text(body)
            self._buf = self._buf[len(body) :]
            return False
        before = self._buf[:at]
        body = before.rstrip(WHITESPACE)
        self._text(body)
        # Kept to show the opener as text if a fence turns out not to be a call.
        self._opener = (before[len(body) :] if self._seen_text else "") + tag
        self._buf = self._buf[at + len(tag) :]
        self._strip_leading = True
        if tag == self._think_open:
            self._state = _State.THINK
            return True
        self._state = _State.TOOL_HEAD
        if tag == BARE_OPEN:
            self._frame, self._buf = _Frame.BARE, tag + self._buf  # the brace belongs to the object
        else:
            self._frame = _Frame.TAG if tag == self._tool_open else _Frame.FENCE
        return True

    def _advance_think(self) -> bool:
        at = self._buf.find(self._think_close)
        if at < 0:
            held = _partial_tag_len(self._buf, (self._think_close,))
            body = self._buf[: len(self._buf) - held].rstrip(WHITESPACE)
            self._thinking(body)
            self._buf = self._buf[len(body) :]
            return False
        self._thinking(self._buf[:at], final=True)
        self._events.append(ThinkingEnd())
        self._buf = self._buf[at + len(self._think_close) :]
        self._strip_leading = True
        self._state = _State.TEXT
        return True

    def _advance_head(self) -> bool:
        close = self._buf.find(self._tool_close) if self._frame is _Frame.TAG else -1
        head = self._buf if close < 0 else self._buf[:close]
        status, name, args_at = _match_head(head, self._arguments_key)
        if self._frame is not _Frame.TAG and (
            status == "mismatch" or (status == "matched" and name not in self.tool_names) or len(head) > MAX_HEAD_CHARS
        ):
            # Not a call after all: a fence is text, and what follows is scanned again as text.
            self._state, self._seen_text, self._strip_leading = _State.TEXT, True, False
            if self._frame is _Frame.FENCE:
                self._text(self._opener)
            return True
        if status == "matched":
            self._events.append(ToolCallStart(self.new_id(), name))
            self._json = JsonStream()
            self._buf = self._buf[args_at:]
            self._state = _State.TOOL_ARGS
            return True
        if status == "mismatch" or close >= 0 or len(head) > MAX_HEAD_CHARS:
            self._state = _State.TOOL_WHOLE
            return True
        return False

    def _advance_args(self) -> bool:
        js = self._json
        before = js.pos
        try:
            js.feed(self._buf)
        except JsonStreamError:
            self._buf = self._buf[js.pos - before :]  # from the first bad character
            self._broken_rest = js.unsent()  # accepted but not sent
            self._close_arguments(complete=False)
            self._state = _State.TOOL_WHOLE  # the rest, up to the closing tag, becomes text
            return True
        self._buf = self._buf[js.pos - before :]
        self._send_safe()
        if js.done:
            self._close_arguments(complete=True)
            self._state = _State.TOOL_TAIL
            return True
        return False

    def _advance_tail(self) -> bool:
        """After the arguments: only the call's closing `}`, whitespace and the closing tag belong here."""
        if self._frame is _Frame.BARE:
            end = self._buf.find("}")
            if end < 0:
                self._buf = ""
                return False
            self._buf = self._buf[end + 1 :]
            self._strip_leading, self._state = True, _State.TEXT
            return True
        closers = (self._tool_close, self._tool_open) if self._frame is _Frame.TAG else (FENCE_CLOSE,)
        at, tag = _find_first(self._buf, closers)
        if tag is None:
            held = _partial_tag_len(self._buf, closers)
            self._buf = self._buf[len(self._buf) - held :]
            return False
        self._buf = self._buf[at + len(tag) :]
        self._strip_leading = True
        self._state = _State.TOOL_HEAD if tag == self._tool_open else _State.TEXT
        return True

    def _advance_whole(self) -> bool:
        if self._frame is not _Frame.TAG:  # broken arguments in a fence or bare object: the rest is text
            rest, self._buf = self._buf, ""
            self._broken_text(rest)
            self._seen_text, self._state = True, _State.TEXT
            return False
        close = self._tool_close
        at = self._buf.find(close, self._scanned)
        if at < 0:
            self._scanned = max(0, len(self._buf) - len(close) + 1)  # the next search starts here
            return False
        body, self._buf = self._buf[:at], self._buf[at + len(close) :]
        self._scanned = 0
        if self._broken_rest is not None:
            self._broken_text(body)
        else:
            self._whole_call(body, closed=True)
        self._strip_leading = True
        self._state = _State.TEXT
        return True

    # ---- emitting -----------------------------------------------------------------------------------

    def _text(self, text: str, final: bool = False) -> None:
        if final:
            text = text.rstrip(WHITESPACE)
        if self._strip_leading:
            text = text.lstrip(WHITESPACE)
        if text:
            self._strip_leading = False
            self._seen_text = True
            self._events.append(TextDelta(text))

    def _thinking(self, text: str, final: bool = False) -> None:
        if final:
            text = text.rstrip(WHITESPACE)
        if self._strip_leading:
            text = text.lstrip(WHITESPACE)
        if text:
            self._strip_leading = False
            self._events.append(ThinkingDelta(text))

    def _send_safe(self) -> None:
        piece = self._json.take_safe()
        if piece:
            self._events.append(ToolInputDelta(piece))

    def _close_arguments(self, complete: bool) -> None:
        js = self._json
        self._send_safe()
        if not complete:
            self._events.append(ToolInputDelta(js.completion))
        self._events.append(ToolCallEnd())
        self.tool_calls += 1
        self._json = None

    def _broken_text(self, body: str) -> None:
        text, self._broken_rest = self._broken_rest + body, None
        self._strip_leading = True
        self._text(text, final=True)

    def _whole_call(self, body: str, closed: bool) -> None:
        """A complete call in an unusual shape: parse it whole, or show it as text."""
        name, arguments = _parse_whole_call(body)
        if name is None:
            self._strip_leading = True
            self._text(self._tool_open + body + (self._tool_close if closed else ""), final=True)
            return
        self._events.append(ToolCallStart(self.new_id(), name))
        self._events.append(ToolInputDelta(arguments))
        self._events.append(ToolCallEnd())
        self.tool_calls += 1


def _parse_whole_call(body: str) -> tuple[str | None, str]:
    """(name, arguments JSON) from a call body, or (None, "") if it is not a usable call."""
    try:
        call = json.loads(body)
    except ValueError:
        return None, ""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None, ""
    args = call.get("arguments", call.get("parameters"))
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None, ""
    if not isinstance(args, dict):
        return None, ""
    try:
        text = json.dumps(args, ensure_ascii=False)
        text.encode("utf-8")  # a lone surrogate from a `\ud83d` escape cannot be sent
    except (ValueError, UnicodeEncodeError):
        return None, ""
    return call["name"], text


def _match_head(buf: str, arguments_key: str) -> tuple[str, str, int]:
    """Match `{"name": "<name>", "<arguments_key>": {` at the start of buf (whitespace anywhere between).

    Returns ("matched", name, index of the arguments' `{`), ("more", "", 0) if buf is a prefix of that
    shape, or ("mismatch", "", 0).
    """
    i, n, name = 0, len(buf), ""
    for part in ("{", '"name"', ":", None, ",", f'"{arguments_key}"', ":", "{"):
        while i < n and buf[i] in WHITESPACE:
            i += 1
        if i == n:
            return "more", "", 0
        if part is None:  # the name: a JSON string
            end = _string_end(buf, i)
            if end < 0:
                return "more", "", 0
            if end == 0:
                return "mismatch", "", 0
            try:
                name = json.loads(buf[i:end])
            except ValueError:
                return "mismatch", "", 0
            if not name:
                return "mismatch", "", 0
            i = end
            continue
        got = buf[i : i + len(part)]
        if not part.startswith(got):
            return "mismatch", "", 0
        if len(got) < len(part):
            return "more", "", 0
        i += len(part)
    return "matched", name, i - 1


def _string_end(buf: str, i: int) -> int:
    """Index just past the JSON string starting at buf[i]; -1 if unfinished, 0 if buf[i] is not `"`."""
    if buf[i] != '"':
        return 0
    j = i + 1
    while j < len(buf):
        c = buf[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    return -1


def _find_first(buf: str, tags: tuple[str, ...]) -> tuple[int, str | None]:
    best, found = -1, None
    for tag in tags:
        at = buf.find(tag)
        if at >= 0 and (best < 0 or at < best):
            best, found = at, tag
    return best, found


def _partial_tag_len(buf: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of buf that is a proper prefix of one of the tags."""
    longest = max((len(t) for t in tags), default=0)
    for k in range(min(len(buf), longest - 1), 0, -1):
        tail = buf[len(buf) - k :]
        if any(t.startswith(tail) for t in tags):
            return k
    return 0


def _drop_partial_tag(buf: str, tags: tuple[str, ...]) -> str:
    return buf[: len(buf) - _partial_tag_len(buf, tags)]
