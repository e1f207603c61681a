"""Byte-level BPE tokenizer built from GGUF metadata with the `tokenizers` library.

A GGUF file carries no tokenizer.json; llama.cpp's converter stores the pieces under `tokenizer.ggml.*`:

    model        "gpt2" = byte-level BPE (the only kind served here; "llama" = sentencepiece is refused)
    pre          the pre-tokenizer family ("qwen2", "llama-bpe", "smollm", ...): how text is cut into words
    tokens       V strings, byte-level spelled (a space is "Ġ"); control/user-defined tokens are raw text
    token_type   V ints: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    merges       "left right" pairs, best first
    *_token_id   bos / eos / eot / eom / unknown / padding ids; add_bos_token

Encoding: control (and unknown) tokens written in the text become special added tokens, matched only when
`special=True`; user-defined tokens (`<tool_call>`) are always matched whole, as llama.cpp does.
Decoding is ours: each id maps to the bytes it stands for, and text is those bytes read as UTF-8 with
U+FFFD for invalid sequences (the same rule as the `tokenizers` ByteLevel decoder).

Letters: V = vocabulary size.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from kawai.engine.errors import KawaiError

MAX_VOCAB = 1 << 22  # 4M entries: far above any real vocabulary (Qwen: 151,936)


class TokenType(IntEnum):
    """`tokenizer.ggml.token_type` values (llama.cpp's llama_token_type)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# ---- pre-tokenizer families (regexes as in llama.cpp's llama-vocab.cpp and the HF tokenizer.json files) ----

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_EACH_DIGIT = r"\p{N}"  # StarCoder-style vocabularies (SmolLM) first split every digit off


@dataclass(frozen=True)
class PreTokenizer:
    """A family of `tokenizer.ggml.pre` names: regexes applied in turn (each match isolated)."""

    splits: tuple[str, ...]
    ignore_merges: bool = False  # a word that is already a token is not merged further (llama 3)
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token


_GPT2 = PreTokenizer((_GPT2_SPLIT,))
_LLAMA3 = PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer((_QWEN2_SPLIT,))
_STARCODER = PreTokenizer((_EACH_DIGIT, _GPT2_SPLIT))

PRE_TOKENIZERS: Mapping[str, PreTokenizer] = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "gpt-2": _GPT2,
    "phi-2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "pixtral": _LLAMA3,
    "dbrx": PreTokenizer((_LLAMA3_SPLIT,)),
    "smaug-bpe": PreTokenizer((_LLAMA3_SPLIT,)),
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "stablelm2": _QWEN2,
    "qwen35": PreTokenizer((_QWEN35_SPLIT,)),
    "smollm": _STARCODER,
    "starcoder": _STARCODER,
    "refact": _STARCODER,
    "codeshell": _STARCODER,
    "exaone": _STARCODER,
    "minerva": _STARCODER,
}

# Control tokens that end a turn when the model emits them (llama.cpp's end-of-generation list, trimmed
# to the chat families we serve). EOS / EOT / EOM ids from the metadata are always included.
TURN_END_TEXTS = frozenset(
    {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>"}
)

_SPECIAL_ID_KEYS = ("bos", "eos", "eot", "eom", "unknown", "padding")


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the other
    68 bytes to U+0100.. in byte order (so a space is "Ġ" = U+0120 and a newline "Ċ")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# ---- metadata validation ----


def _require_string_list(metadata: Mapping[str, Any], key: str) -> list[str]:
    value = metadata.get(key)
    if value is None:
        raise KawaiError(f"{key} is missing: the file has no tokenizer")
    if not isinstance(value, list) or not set(map(type, value)) <= {str}:
        raise KawaiError(f"{key} must be an array of strings")
    return value


def _token_types(metadata: Mapping[str, Any], n_vocab: int) -> np.ndarray:
    """(V,) int8 token types; all NORMAL when the file has none."""
    key = "tokenizer.ggml.token_type"
    value = metadata.get(key)
    if value is None:
        return np.full(n_vocab, TokenType.NORMAL, dtype=np.int8)
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "iu":
            raise KawaiError(f"{key} must be an array of integers")
        types = value.astype(np.int64)
    elif isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        types = np.asarray(value, dtype=np.int64)
    else:
        raise KawaiError(f"{key} must be an array of integers")
    if types.shape[0] != n_vocab:
        raise KawaiError(f"{key} has {types.shape[0]} entries, the vocabulary {n_vocab}")
    bad = np.nonzero((types < TokenType.UNDEFINED) | (types > TokenType.BYTE))[0]
    if bad.size:
        raise KawaiError(f"{key}[{int(bad[0])}] = {int(types[bad[0]])} is not a token type (0..6)")
    return types.astype(np.int8)


def _token_id(metadata: Mapping[str, Any], name: str, n_vocab: int) -> int | None:
    key = f"tokenizer.ggml.{name}_token_id"
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise KawaiError(f"{key} must be an integer, got {type(value).__name__}")
    if not 0 <= int(value) < n_vocab:
        raise KawaiError(f"{key} = {int(value)} is outside the vocabulary (0..{n_vocab - 1})")
    return int(value)


def _flag(metadata: Mapping[str, Any], key: str, default: bool) -> bool:
    value = metadata.get(key)
    if value is None:
        return default
    if not isinstance(value, (bool, np.bool_)):
        raise KawaiError(f"{key} must be a boolean, got {type(value).__name__}")
    return bool(value)


def _merge_pairs(merges: list[str], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """(left, right) pairs, checked here: on a bad merge `tokenizers` panics (PanicException, a BaseException)."""
    pairs = [m.split(" ") for m in merges]
    ok = [len(p) == 2 and p[0] in vocab and p[1] in vocab and p[0] + p[1] in vocab for p in pairs]
    if not all(ok):
        i = ok.index(False)
        raise KawaiError(
            f"tokenizer.ggml.merges[{i}] = {merges[i][:40]!r} is not two vocabulary tokens whose join is one too"
        )
    return [(left, right) for left, right in pairs]


def _byte_decoder(alphabet: Mapping[int, str]) -> dict[int, str]:
    """A str.translate table: alphabet character -> the Latin-1 character of its byte, so that
    `text.translate(table).encode("latin-1")` is the token's bytes. Every other character below U+0100
    maps to U+FFFF, so a token not spelled in the alphabet fails to encode instead of passing silently."""
    table = {c: "\uffff" for c in range(256)}
    table.update({ord(ch): chr(b) for b, ch in alphabet.items()})
    return table


class Tokenizer:
    """Text <-> token ids for one model. Read-only after construction and safe to share across threads."""

    def __init__(
        self,
        tokens: list[str],
        token_types: np.ndarray,
        merges: list[str],
        *,
        pre: str = "default",
        bos_id: int | None = None,
        eos_id: int | None = None,
        eot_id: int | None = None,
        eom_id: int | None = None,
        unk_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool | None = None,
    ):
        n_vocab = len(tokens)
        if pre not in PRE_TOKENIZERS:
            raise KawaiError(
                f"tokenizer.ggml.pre {pre!r} is not supported (known: {', '.join(sorted(PRE_TOKENIZERS))})"
            )
        family = PRE_TOKENIZERS[pre]
        self.pre = pre
        self.bos_id, self.eos_id, self.eot_id, self.eom_id = bos_id, eos_id, eot_id, eom_id
        self.unk_id, self.pad_id = unk_id, pad_id
        if add_bos is None:  # the file does not say: llama.cpp's default for the family, if there is a BOS
            add_bos = family.add_bos and bos_id is not None
        self.add_bos = add_bos
        if add_bos and bos_id is None:
            raise KawaiError("tokenizer.ggml.add_bos_token is true, but the file names no bos_token_id")
        self._types = token_types  # (V,) int8
        token_types = token_types.tolist()  # plain ints: much faster to index in the loop below
        self._tokens = tokens

        alphabet = byte_alphabet()
        byte_decoder = _byte_decoder(alphabet)
        vocab: dict[str, int] = {}
        pieces: list[bytes] = []  # (V,) the bytes each id decodes to
        added: list[AddedToken] = []
        for i, text in enumerate(tokens):
            kind = token_types[i]
            if not text:
                key, piece = f"[EMPTY_{i}]", b""  # llama.cpp's name for an empty entry; it decodes to nothing
            elif kind == TokenType.CONTROL or kind == TokenType.USER_DEFINED or kind == TokenType.UNKNOWN:
                key, piece = text, text.encode("utf-8")  # stored as raw text, matched in raw text
                added.append(AddedToken(text, special=kind != TokenType.USER_DEFINED, normalized=False))
            else:
                try:
                    key, piece = text, text.translate(byte_decoder).encode("latin-1")
                except UnicodeEncodeError:  # not byte-level spelled: respell its UTF-8 (as transformers does)
                    piece = text.encode("utf-8")
                    key = "".join(alphabet[b] for b in piece)
            if key in vocab:
                raise KawaiError(f"tokenizer.ggml.tokens: {text[:40]!r} appears twice (ids {vocab[key]} and {i})")
            vocab[key] = i
            pieces.append(piece)
        self._pieces = pieces

        model = models.BPE(vocab=vocab, merges=_merge_pairs(merges, vocab), ignore_merges=family.ignore_merges)
        split = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in family.splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        # Two pipelines over one shared BPE model: `_hf` parses special tokens written in the text,
        # `_hf_plain` reads them as ordinary text (user-defined tokens stay whole in both, as in llama.cpp).
        self._hf, self._hf_plain = HFTokenizer(model), HFTokenizer(model)
        for hf in (self._hf, self._hf_plain):
            hf.pre_tokenizer = split
            hf.decoder = decoders.ByteLevel()
            hf.add_special_tokens([t for t in added if t.special])
            hf.add_tokens([t for t in added if not t.special])
        self._hf_plain.encode_special_tokens = True
        for t in added:  # an added token that got a fresh id instead of its own would shift the vocabulary
            if self._hf.token_to_id(t.content) != vocab[t.content]:
                raise KawaiError(f"tokenizer.ggml.tokens: added token {t.content[:40]!r} could not keep its id")
        if self._hf.get_vocab_size(with_added_tokens=True) != n_vocab:
            raise KawaiError("tokenizer vocabulary size changed while registering special tokens")

        special = (TokenType.CONTROL, TokenType.UNKNOWN)
        self._special_ids = frozenset(i for i, kind in enumerate(token_types) if kind in special)
        turn_ends = {i for i in (eos_id, eot_id, eom_id) if i is not None}
        turn_ends |= {vocab[t] for t in TURN_END_TEXTS if t in vocab and self.is_control(vocab[t])}
        self.stop_ids: frozenset[int] = frozenset(turn_ends)

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from a GGUF metadata dict (GGUFFile.metadata); a bad or unsupported field -> KawaiError."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind is None:
            raise KawaiError("tokenizer.ggml.model is missing: the file has no tokenizer")
        if kind != "gpt2":
            hint = " (sentencepiece)" if kind == "llama" else ""
            raise KawaiError(f"tokenizer kind {kind!r}{hint} is not supported; only byte-level BPE ('gpt2') is")
        tokens = _require_string_list(metadata, "tokenizer.ggml.tokens")
        n_vocab = len(tokens)
        if not 1 <= n_vocab <= MAX_VOCAB:
            raise KawaiError(f"tokenizer.ggml.tokens has {n_vocab} entries (expected 1..{MAX_VOCAB})")
        arch = metadata.get("general.architecture")
        declared = metadata.get(f"{arch}.vocab_size") if isinstance(arch, str) else None
        if declared is not None and declared != n_vocab:
            raise KawaiError(f"{arch}.vocab_size is {declared}, but tokenizer.ggml.tokens has {n_vocab} entries")
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if not isinstance(pre, str):
            raise KawaiError("tokenizer.ggml.pre must be a string")
        ids = {name: _token_id(metadata, name, n_vocab) for name in _SPECIAL_ID_KEYS}
        add_bos = metadata.get("tokenizer.ggml.add_bos_token")
        return cls(
            tokens,
            _token_types(metadata, n_vocab),
            _require_string_list(metadata, "tokenizer.ggml.merges"),
            pre=pre,
            bos_id=ids["bos"],
            eos_id=ids["eos"],
            eot_id=ids["eot"],
            eom_id=ids["eom"],
            unk_id=ids["unknown"],
            pad_id=ids["padding"],
            add_bos=None if add_bos is None else _flag(metadata, "tokenizer.ggml.add_bos_token", False),
        )

    # ---- vocabulary ----

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def _check_id(self, token_id: int) -> int:
        if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
            raise KawaiError(f"token id must be an integer, got {type(token_id).__name__}")
        if not 0 <= token_id < len(self._pieces):
            raise KawaiError(f"token id {int(token_id)} is outside the vocabulary (0..{len(self._pieces) - 1})")
        return int(token_id)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry as the file spells it (byte-level: "Ġworld"; control: "<|im_end|>")."""
        return self._tokens[self._check_id(token_id)]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token stands for in text (may be part of a UTF-8 character)."""
        return self._pieces[self._check_id(token_id)]

    def token_type(self, token_id: int) -> TokenType:
        return TokenType(int(self._types[self._check_id(token_id)]))

    def is_control(self, token_id: int) -> bool:
        return self.token_type(token_id) == TokenType.CONTROL

    def is_special(self, token_id: int) -> bool:
        """Control or unknown tokens: parsed from text only with special=True, dropped by skip_special."""
        return self._check_id(token_id) in self._special_ids

    # ---- encode / decode ----

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids for text. special=True: control tokens written in the text (`<|im_start|>`) become
        their ids (for rendered chat prompts); special=False: they are ordinary text. Never adds BOS."""
        if not isinstance(text, str):
            raise KawaiError(f"text to encode must be a string, got {type(text).__name__}")
        encoder = self._hf if special else self._hf_plain
        try:
            return encoder.encode(text, add_special_tokens=False).ids
        except TypeError:  # the Rust side refuses a str it cannot convert, e.g. one with a lone surrogate
            raise KawaiError("cannot tokenize this text: it is not valid Unicode (lone surrogate?)") from None

    def split_special(self, text: str) -> list[str | int]:
        """text -> its plain-text runs and the control tokens written in it, in order:
        "<|im_start|>user\n" -> [151644, "user\n"]."""
        if not isinstance(text, str):
            raise KawaiError(f"text to encode must be a string, got {type(text).__name__}")
        try:
            encoding = self._hf.encode(text, add_special_tokens=False)
        except TypeError:
            raise KawaiError("cannot tokenize this text: it is not valid Unicode (lone surrogate?)") from None
        parts: list[str | int] = []
        at = 0  # characters of text consumed
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
            if token_id in self._special_ids:
                if start > at:
                    parts.append(text[at:start])
                parts.append(token_id)
                at = end
        if at < len(text):
            parts.append(text[at:])
        return parts

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text for ids: their bytes joined and read as UTF-8 (U+FFFD where the bytes are not valid)."""
        return b"".join(self._bytes_of(ids, skip_special)).decode("utf-8", errors="replace")

    def _bytes_of(self, ids: Iterable[int], skip_special: bool) -> list[bytes]:
        out = []
        for token_id in ids:
            i = self._check_id(token_id)
            if not (skip_special and i in self._special_ids):
                out.append(self._pieces[i])
        return out

    def incremental_decoder(self, *, skip_special: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special=skip_special)


class IncrementalDecoder:
    """Streaming decode: push ids one at a time and get only complete UTF-8 text back; the pieces
    (with flush()) concatenate to exactly tokenizer.decode(ids)."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(b"".join(self._tokenizer._bytes_of((token_id,), self._skip_special)))

    def flush(self) -> str:
        """Text still held (an incomplete UTF-8 sequence becomes U+FFFD); the decoder is then reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
