"""An incremental JSON checker for tool arguments streamed as the model writes them.

`JsonStream.feed(text)` checks one more piece of a single JSON object, character by character, and keeps
two things a streaming server needs:

- `text`: the accepted characters (raw control characters inside strings, which models often write in
  code arguments, are repaired into escapes such as `\\n`; everything else is kept as written),
- `safe_end`: how much of `text` can be sent now. Every sent prefix stays *completable*: it
  ends inside a value string (not mid-escape), right after `{`/`[`, or right after a complete value — so a
  client's partial-JSON parser (the SDK uses jiter's partial mode) never sees an invalid prefix, and
- `completion`: the text that closes the sent prefix into a valid document (`"` and/or `}`/`]`), used when
  the model's JSON goes bad midway or generation is cut.

Commas, colons, keys and numbers are held back until what follows them starts (a number is only complete
when a non-digit arrives). Lone UTF-16 surrogates (`\\ud83d` alone) are rejected: they cannot be encoded
as UTF-8 on the way out.

Every character costs O(1), however deep the nesting or long the number (the text is model output a
client can steer, e.g. through an assistant prefill): numbers run through a small state machine, the
closing brackets are only spelled out when `completion` is read, and `take_safe()` hands out each newly
sendable piece once without joining the whole text again.
"""

from __future__ import annotations

from enum import Enum, auto

WHITESPACE = " \t\r\n"
ESCAPES = '"\\/bfnrt'
HEX = "0123456789abcdefABCDEF"
LITERALS = {"t": "true", "f": "false", "n": "null"}
CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


class JsonStreamError(ValueError):
    """The text is not a prefix of valid JSON."""


class _S(Enum):
    VALUE = auto()  # a value is expected
    FIRST_IN_ARRAY = auto()  # right after '[': a value or ']'
    FIRST_KEY = auto()  # right after '{': a key or '}'
    KEY = auto()  # after ',' in an object: a key
    COLON = auto()  # after a key
    STRING = auto()  # inside a string (key or value, see _in_key)
    NUMBER = auto()
    LITERAL = auto()
    AFTER_VALUE = auto()  # ',' or the closing bracket of the container
    DONE = auto()


# A JSON number, -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?, one character at a time:
# state -> {character class -> next state}; a number may end in the states of NUMBER_ENDS.
NUMBER_MOVES = {
    "minus": {"0": "zero", "digit": "int"},
    "zero": {".": "dot", "e": "exp"},
    "int": {"0": "int", "digit": "int", ".": "dot", "e": "exp"},
    "dot": {"0": "frac", "digit": "frac"},
    "frac": {"0": "frac", "digit": "frac", "e": "exp"},
    "exp": {"0": "exp_int", "digit": "exp_int", "sign": "exp_sign"},
    "exp_sign": {"0": "exp_int", "digit": "exp_int"},
    "exp_int": {"0": "exp_int", "digit": "exp_int"},
}
NUMBER_ENDS = frozenset({"zero", "int", "frac", "exp_int"})
NUMBER_CLASSES = {"0": "0", **dict.fromkeys("123456789", "digit"), ".": ".", "e": "e", "E": "e", "+": "sign", "-": "sign"}


class JsonStream:
    def __init__(self) -> None:
        self._stack: list[str] = []  # open containers, '{' or '['
        self._state = _S.VALUE
        self._in_key = False
        self._escape = ""  # inside a string: "" or the escape read so far ("\\", "\\u12", ...)
        self._high_surrogate = False  # a \uD800-\uDBFF escape waits for its low half
        self._number = ""  # NUMBER_MOVES state inside a number
        self._literal = ""  # the rest of true/false/null still expected
        self._out: list[str] = []  # accepted characters (one per item; a repaired control character: its escape)
        self._out_len = 0
        self._safe_items = 0  # len(self._out) at safe_end
        self._taken_items = 0  # items handed out by take_safe
        self._safe_quote = ""  # '"' when text[:safe_end] ends inside a string
        self._safe_depth = 0  # open containers at safe_end
        self.pos = 0  # input characters consumed
        self.safe_end = 0  # in `text`
        self.end: int | None = None  # position just past the complete value

    @property
    def text(self) -> str:
        return "".join(self._out)

    @property
    def completion(self) -> str:
        """Closes text[:safe_end] into a valid document. (Containers only change at safe points, so the
        first `_safe_depth` of the stack are the ones open there.)"""
        closers = "".join("}" if c == "{" else "]" for c in reversed(self._stack[: self._safe_depth]))
        return self._safe_quote + closers

    def take_safe(self) -> str:
        """The sendable text not handed out yet: text[previous safe_end:safe_end]."""
        piece = "".join(self._out[self._taken_items : self._safe_items])
        self._taken_items = self._safe_items
        return piece

    def unsent(self) -> str:
        """Accepted text past safe_end (held back, never sent)."""
        return "".join(self._out[self._safe_items :])

    @property
    def done(self) -> bool:
        return self._state is _S.DONE

    def feed(self, text: str) -> None:
        """Consume `text`; raises JsonStreamError at the first character that cannot continue JSON.

        After DONE, the remaining characters are not consumed (`end` marks where the value stopped).
        """
        for ch in text:
            if self._state is _S.DONE:
                return
            self._step(ch)
            self.pos += 1
            self._mark_safe()

    def _mark_safe(self) -> None:
        s = self._state
        if s is _S.STRING and not self._in_key and not self._escape and not self._high_surrogate:
            self._safe(quote='"')
        elif s in (_S.AFTER_VALUE, _S.FIRST_KEY, _S.FIRST_IN_ARRAY, _S.DONE):
            self._safe(quote="")

    def _safe(self, quote: str) -> None:
        self.safe_end, self._safe_items = self._out_len, len(self._out)
        self._safe_quote, self._safe_depth = quote, len(self._stack)

    def _step(self, ch: str) -> None:
        """Check one character; it is appended to the output unless an error is raised."""
        s = self._state
        if s is _S.STRING:
            self._string_char(ch)
            return  # _string_char appends
        elif s is _S.NUMBER:
            after = NUMBER_MOVES[self._number].get(NUMBER_CLASSES.get(ch, ""))
            if after is not None:
                self._number = after
                self._append(ch)
                return
            if self._number not in NUMBER_ENDS:
                raise JsonStreamError("bad number")
            self._state = _S.AFTER_VALUE
            self._mark_safe()  # the number ended just before this character
            self._step(ch)
            return
        elif s is _S.LITERAL:
            if ch != self._literal[0]:
                raise JsonStreamError("bad literal")
            self._literal = self._literal[1:]
            if not self._literal:
                self._value_done()
        elif ch in WHITESPACE:
            pass
        elif s in (_S.VALUE, _S.FIRST_IN_ARRAY):
            if s is _S.FIRST_IN_ARRAY and ch == "]":
                self._close()
            else:
                self._start_value(ch)
        elif s in (_S.FIRST_KEY, _S.KEY):
            if s is _S.FIRST_KEY and ch == "}":
                self._close()
            elif ch == '"':
                self._state, self._in_key = _S.STRING, True
            else:
                raise JsonStreamError("expected a key")
        elif s is _S.COLON:
            if ch != ":":
                raise JsonStreamError("expected ':'")
            self._state = _S.VALUE
        elif s is _S.AFTER_VALUE:
            top = self._stack[-1]
            if ch == ",":
                self._state = _S.KEY if top == "{" else _S.VALUE
            elif ch == ("}" if top == "{" else "]"):
                self._close()
            else:
                raise JsonStreamError("expected ',' or a closing bracket")
        else:
            raise JsonStreamError("unexpected state")
        self._append(ch)

    def _append(self, chars: str) -> None:
        self._out.append(chars)
        self._out_len += len(chars)

    def _start_value(self, ch: str) -> None:
        if not self._stack and ch != "{":
            raise JsonStreamError("expected an object")
        if ch == "{":
            self._stack.append("{")
            self._state = _S.FIRST_KEY
        elif ch == "[":
            self._stack.append("[")
            self._state = _S.FIRST_IN_ARRAY
        elif ch == '"':
            self._state, self._in_key = _S.STRING, False
        elif ch == "-" or ch in "0123456789":
            self._state, self._number = _S.NUMBER, "minus" if ch == "-" else NUMBER_MOVES["minus"][NUMBER_CLASSES[ch]]
        elif ch in LITERALS:
            self._state, self._literal = _S.LITERAL, LITERALS[ch][1:]
        else:
            raise JsonStreamError(f"unexpected character {ch!r}")

    def _close(self) -> None:
        self._stack.pop()
        self._value_done()

    def _value_done(self) -> None:
        if self._stack:
            self._state = _S.AFTER_VALUE
        else:
            self._state = _S.DONE
            self.end = self.pos + 1

    def _string_char(self, ch: str) -> None:
        if not self._escape and not self._high_surrogate and ord(ch) < 0x20:
            self._append(CONTROL_ESCAPES.get(ch, f"\\u{ord(ch):04x}"))  # repaired, see module docstring
            return
        self._check_string_char(ch)
        self._append(ch)

    def _check_string_char(self, ch: str) -> None:
        esc = self._escape
        if esc == "":
            if self._high_surrogate:
                if ch != "\\":
                    raise JsonStreamError("lone surrogate")
                self._escape = "\\"
            elif ch == '"':
                if self._in_key:
                    self._state = _S.COLON
                else:
                    self._value_done()
            elif ch == "\\":
                self._escape = "\\"
            elif 0xD800 <= ord(ch) <= 0xDFFF:
                raise JsonStreamError("lone surrogate")
        elif esc == "\\":
            if self._high_surrogate and ch != "u":
                raise JsonStreamError("lone surrogate")
            if ch == "u":
                self._escape = "\\u"
            elif ch in ESCAPES:
                self._escape = ""
            else:
                raise JsonStreamError("bad escape")
        else:  # "\\u" + up to 3 hex digits so far
            if ch not in HEX:
                raise JsonStreamError("bad \\u escape")
            esc += ch
            if len(esc) < 6:
                self._escape = esc
                return
            code = int(esc[2:], 16)
            self._escape = ""
            if self._high_surrogate:
                if not 0xDC00 <= code <= 0xDFFF:
                    raise JsonStreamError("lone surrogate")
                self._high_surrogate = False
            elif 0xD800 <= code <= 0xDBFF:
                self._high_surrogate = True
            elif 0xDC00 <= code <= 0xDFFF:
                raise JsonStreamError("lone surrogate")
