"""Constrained decoding: a grammar decides which tokens may come next; the sampler draws only among them.

The grammar engine is llguidance (the one llama.cpp and vLLM use): Lark-style grammars whose rules may
embed JSON Schemas (`args: %json {...}`), compiled against our vocabulary. Three types:

    GrammarCompiler  one per tokenizer: llguidance's view of the vocabulary (built once, ~2 s for 150k
                     tokens) and an LRU cache of compiled grammars, so each distinct schema compiles once
    Grammar          a compiled grammar: immutable, shared by every sequence that uses it
    Constraint       one sequence's position in a grammar: `allowed()` -> (V,) bool, `advance(token)`

The tokenizer's stop ids are the grammar's end-of-sequence tokens: they are allowed exactly when the
grammar is complete, so a constrained reply ends with an ordinary `eos`. Control tokens are special to
llguidance (never matched by grammar text); user-defined ones (`<tool_call>`) are text like any other.

Letters: V = vocabulary size.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from kawai.engine.errors import KawaiError

GRAMMAR_CACHE_SIZE = 64  # compiled grammars kept per tokenizer
# JSON inside grammars is written the way chat models write it, `{"a": 1, "b": [2, 3]}`: no free
# whitespace, which a sampled (or random) model could otherwise extend without end.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(KawaiError, ValueError):
    """A grammar or JSON Schema llguidance cannot compile or enforce; the message says what."""


def _llguidance():
    import llguidance  # imported on first use: plain generation never needs it

    return llguidance


def json_schema_error(schema: Any) -> str | None:
    """Why llguidance cannot enforce this JSON Schema (`Unimplemented keys: ["not"]`), or None."""
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    except (ValueError, TypeError) as e:
        return str(e) or "not a JSON Schema object"
    return llg.LLMatcher.validate_grammar(grammar) or None


def json_rule(schema: dict) -> str:
    """The Lark right-hand side for a JSON value valid against schema, in JSON_STYLE."""
    styled = {**schema, "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})}}
    return "%json " + json.dumps(styled, ensure_ascii=False)


class _VocabularyView:
    """What llguidance.TokenizerWrapper reads from a tokenizer: each id's bytes, the special ids, an
    encoder from text to ids."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        ids = range(tokenizer.vocab_size)
        self.tokens = [tokenizer.token_bytes(i) for i in ids]  # (V,) bytes
        self.special_token_ids = [i for i in ids if tokenizer.is_special(i)]
        self.eos_token_id = min(tokenizer.stop_ids)
        self.bos_token_id = tokenizer.bos_id

    def __call__(self, text):
        if not isinstance(text, str):
            raise TypeError("text only")
        return self._tokenizer.encode(text, special=False)


class GrammarCompiler:
    """Compiles Lark grammars for one tokenizer and caches them by text. Thread-safe."""

    def __init__(self, tokenizer, cache_size: int = GRAMMAR_CACHE_SIZE):
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._cache: OrderedDict[str, Grammar] = OrderedDict()

    def _vocabulary(self):
        """llguidance's LLTokenizer, built on first use (under the lock: once)."""
        if self._ll_tokenizer is None:
            if not self.tokenizer.stop_ids:
                raise GrammarError("the model has no end-of-sequence token: a constrained reply could never end")
            llg = _llguidance()
            view = llg.TokenizerWrapper(_VocabularyView(self.tokenizer))
            self._ll_tokenizer = llg.LLTokenizer(
                view, n_vocab=self.tokenizer.vocab_size, eos_token=sorted(self.tokenizer.stop_ids)
            )
        return self._ll_tokenizer

    def compile(self, lark: str) -> Grammar:
        """A compiled grammar for Lark text (cached); GrammarError naming the problem."""
        with self._lock:
            grammar = self._cache.get(lark)
            if grammar is not None:
                self._cache.move_to_end(lark)
                return grammar
            vocabulary = self._vocabulary()
        llg = _llguidance()
        limits = llg.LLParserLimits(verbose_errors=False)
        matcher = llg.LLMatcher(vocabulary, llg.LLMatcher.grammar_from_lark(lark), log_level=0, limits=limits)
        if matcher.is_error():
            raise GrammarError(_first_line(matcher.get_error()))
        grammar = Grammar(lark, matcher, self.tokenizer.vocab_size)
        with self._lock:
            self._cache[lark] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def cache_info(self) -> tuple[int, int]:
        """(grammars cached, capacity)."""
        with self._lock:
            return len(self._cache), self.cache_size


class Grammar:
    """A compiled grammar; `start()` gives a fresh Constraint at its beginning."""

    def __init__(self, lark: str, matcher, vocab_size: int):
        self.lark = lark
        self._initial = matcher  # never advanced: each sequence gets a copy
        self.vocab_size = vocab_size

    def start(self) -> Constraint:
        return Constraint(self._initial.deep_copy(), self.vocab_size)

    def __repr__(self) -> str:
        return f"Grammar({self.lark[:60]!r}…)"


class Constraint:
    """One sequence's state in a grammar. `allowed()` is computed once per position."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._allowed: np.ndarray | None = None

    def allowed(self) -> np.ndarray:
        """(V,) bool: the tokens the grammar accepts next (stop ids only once it is complete).
        GrammarError if the matcher failed (a resource limit): llguidance would then allow only the
        end-of-sequence tokens, which would end the reply as if it were complete."""
        if self._allowed is None:
            if self._matcher.is_error():
                raise GrammarError(f"the grammar failed: {_first_line(self._matcher.get_error())}")
            bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)  # (ceil(V/32)*4,)
            self._allowed = np.unpackbits(bits, bitorder="little")[: self.vocab_size].view(bool)
        return self._allowed

    def advance(self, token_id: int) -> None:
        """Record the sampled token; it must be one `allowed()` permitted."""
        self._allowed = None
        if not self._matcher.consume_token(int(token_id)):
            raise GrammarError(f"token {token_id} broke the grammar: {_first_line(self._matcher.get_error())}")

    @property
    def done(self) -> bool:
        """The grammar accepts nothing more but an end-of-sequence token."""
        return self._matcher.is_stopped()


def _first_line(message: str) -> str:
    """llguidance's first error line without its `at L(C): ` position (the grammar is ours, not the client's)."""
    line = message.strip().splitlines()[0] if message.strip() else "invalid grammar"
    if line.startswith("at ") and "): " in line:
        line = line.split("): ", 1)[1]
    return line
