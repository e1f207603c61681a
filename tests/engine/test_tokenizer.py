"""engine/tokenizer.py against transformers' GGUF tokenizer (the oracle) on both real model files.

One known oracle bug is worked around, not copied: transformers builds SmolLM's tokenizer from a GGUF with
plain GPT-2 splitting, while SmolLM2's own tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) first
split off every numeric character (`Digits(individual_digits=True)`). For text with a non-ASCII numeric
("x²", "½") the two differ, so SmolLM is also checked against the oracle's vocabulary with SmolLM2's real
pre-tokenizer put back.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers
from tokenizer_oracle import hf_gguf_tokenizer

from kawai.engine.errors import KawaiError
from kawai.engine.tokenizer import Tokenizer, TokenType, byte_alphabet

MODELS = ("qwen", "smollm")

CORPUS = [
    "Hello world",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # naive\n\n\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\r\n",
    "    \t  leading whitespace\n\n  \r\n trailing   ",
    "\n\n\n\n",
    "日本語のテキスト、中文文本，还有한국어 텍스트.",
    "emoji 😀🎉 family 👩‍👩‍👧‍👦 flag 🇯🇵 heart ❤️!",
    "numbers 1234567890 3.14159 -42 1e10 1,000,000",
    "superscripts x²+y²=z², fractions ½ ⅔, circled ①, roman Ⅻ, arabic-indic ٣٤",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "mixed<|im_end|>inline<|im_start|>tokens<|endoftext|>",
    "I'm sure they'll say it's fine; don't you? WE'VE SEEN IT'S",
    "Café naïve résumé Ångström Zoë façade señor",
    "combining e\u0301 a\u0308 (not NFC)",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "<jupyter_code>print(1)<empty_output><file_sep>",
    "tabs\t\t\tand\u00a0nbsp\u2003em space\u200bzero width",
    "Ｆｕｌｌｗｉｄｔｈ １２３ and ﬁ ligature",
    "'''triple''' \"double\" `back` «guillemets» „low“",
    "Ġ Ċ ĉ literal byte-level characters",
    "a" * 300,
    " ",
    "",
]


@pytest.fixture(scope="module")
def qwen(qwen_meta):
    return Tokenizer.from_gguf(qwen_meta)


@pytest.fixture(scope="module")
def smollm(smollm_meta):
    return Tokenizer.from_gguf(smollm_meta)


@pytest.fixture(scope="module")
def hf_qwen(default_model_path):
    return hf_gguf_tokenizer(default_model_path)


@pytest.fixture(scope="module")
def hf_smollm(smollm_model_path):
    return hf_gguf_tokenizer(smollm_model_path)


def smollm2_pipeline(backend: HFTokenizer, *, split_special: bool = False) -> HFTokenizer:
    """The oracle's vocabulary with SmolLM2's tokenizer.json pre-tokenizer (Digits, then GPT-2 ByteLevel)."""
    fixed = HFTokenizer.from_str(backend.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    fixed.encode_special_tokens = split_special
    return fixed


@pytest.fixture(scope="module")
def smollm2_reference(hf_smollm):
    backend = hf_smollm.backend_tokenizer
    return smollm2_pipeline(backend), smollm2_pipeline(backend, split_special=True)


def has_non_ascii_numeric(text: str) -> bool:
    return any(not c.isascii() and unicodedata.category(c).startswith("N") for c in text)


def hf_ids(hf, text: str, *, special: bool) -> list[int]:
    return hf(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"]


# ---- encoding equals the oracle ------------------------------------------------------------------


@pytest.mark.parametrize("special", [True, False], ids=["special", "plain"])
@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_qwen_encode_matches_transformers(qwen, hf_qwen, text, special):
    assert qwen.encode(text, special=special) == hf_ids(hf_qwen, text, special=special)


@pytest.mark.parametrize("special", [True, False], ids=["special", "plain"])
@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_smollm_encode_matches_transformers(smollm, hf_smollm, smollm2_reference, text, special):
    ours = smollm.encode(text, special=special)
    reference = smollm2_reference[0] if special else smollm2_reference[1]
    assert ours == reference.encode(text, add_special_tokens=False).ids
    if not has_non_ascii_numeric(text):  # where transformers' GGUF loader is right, match it exactly
        assert ours == hf_ids(hf_smollm, text, special=special)


def test_smollm_splits_every_numeric_character(smollm):
    # SmolLM2 learned no merge across a digit: "x²" is x, ² (two byte tokens) and "2024" is four digits
    assert [smollm.decode([i]) for i in smollm.encode("2024")] == ["2", "0", "2", "4"]
    assert b"".join(smollm.token_bytes(i) for i in smollm.encode(" ²"))[:1] == b" "
    assert smollm.decode(smollm.encode(" ²")) == " ²"


# ---- special and user-defined tokens -------------------------------------------------------------


def test_special_tokens_in_text(qwen):
    im_start, im_end, tool_call = 151644, 151645, 151657
    assert qwen.encode("<|im_start|>user")[:1] == [im_start]
    plain = qwen.encode("<|im_start|>user<|im_end|>", special=False)
    assert im_start not in plain and im_end not in plain
    assert qwen.decode(plain) == "<|im_start|>user<|im_end|>"
    # user-defined tokens are matched whole in both modes (llama.cpp does the same)
    assert tool_call in qwen.encode("<tool_call>x", special=True)
    assert tool_call in qwen.encode("<tool_call>x", special=False)


def test_vocabulary_facts(qwen, smollm, qwen_meta):
    assert qwen.vocab_size == len(qwen_meta["tokenizer.ggml.tokens"]) == 151936
    assert smollm.vocab_size == 49152
    assert (qwen.bos_id, qwen.eos_id, qwen.add_bos) == (151643, 151645, False)
    assert (smollm.bos_id, smollm.eos_id, smollm.add_bos) == (1, 2, False)
    assert qwen.stop_ids == frozenset({151643, 151645})  # <|endoftext|>, <|im_end|>
    assert smollm.stop_ids == frozenset({0, 2})  # <|endoftext|>, <|im_end|>
    assert qwen.id_to_piece(9707) == "Hello" and qwen.id_to_piece(151645) == "<|im_end|>"
    assert qwen.id_to_piece(220) == "Ġ" and qwen.token_bytes(220) == b" "
    assert qwen.token_type(151645) == TokenType.CONTROL and qwen.is_special(151645)
    assert qwen.token_type(151657) == TokenType.USER_DEFINED and not qwen.is_special(151657)
    assert not qwen.is_special(9707)


def test_skip_special(qwen, hf_qwen):
    ids = qwen.encode("<|im_start|>assistant\n<tool_call>{}</tool_call><|im_end|>")
    assert qwen.decode(ids, skip_special=True) == "assistant\n<tool_call>{}</tool_call>"
    assert qwen.decode(ids, skip_special=True) == hf_qwen.decode(ids, skip_special_tokens=True)


# ---- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_decode_matches_transformers_and_round_trips(request, model, text):
    ours, hf = request.getfixturevalue(model), request.getfixturevalue(f"hf_{model}")
    ids = ours.encode(text)
    assert ours.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False)
    assert ours.decode(ids) == text  # both vocabularies hold every byte these texts use


@pytest.mark.parametrize("char", ["🫠", "龘"])
def test_character_split_across_tokens_streams_whole(qwen, char):
    ids = qwen.encode(char)
    assert len(ids) > 1  # one multi-byte character, several byte tokens (🫠: f09f | ab | a0)
    decoder = qwen.incremental_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == char
    assert decoder.flush() == ""


def test_incomplete_character_is_flushed_as_replacement(qwen):
    first_byte = qwen.encode("🫠")[0]  # b"\xf0\x9f": half of a 4-byte character
    decoder = qwen.incremental_decoder()
    assert decoder.push(first_byte) == ""
    assert decoder.flush() == qwen.decode([first_byte]) == "\ufffd"


# Texts without SmolLM's missing bytes: its vocabulary lacks a few control bytes and the UTF-8 lead bytes
# F1, F2 (U+40000..U+BFFFF, unassigned planes); BPE drops a byte it has no token for, as llama.cpp does.
SMOLLM_MISSING = "".join(chr(b) for b in (4, 6, 19, 20, 22, 29))
SMOLLM_CHARACTERS = st.characters(codec="utf-8", max_codepoint=0x3FFFF, exclude_characters=SMOLLM_MISSING)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _assert_round_trips_and_streams(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    decoder = tok.incremental_decoder()
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == text


@PROPERTY
@given(text=st.text(max_size=80))
def test_qwen_round_trip_and_stream_random_text(qwen, text):
    _assert_round_trips_and_streams(qwen, text)


@PROPERTY
@given(text=st.text(SMOLLM_CHARACTERS, max_size=80))
def test_smollm_round_trip_and_stream_random_text(smollm, text):
    _assert_round_trips_and_streams(smollm, text)


@PROPERTY
@given(text=st.text(max_size=60), special=st.booleans())
def test_random_text_encodes_like_the_oracle(qwen, hf_qwen, smollm, smollm2_reference, text, special):
    assert qwen.encode(text, special=special) == hf_ids(hf_qwen, text, special=special)
    reference = smollm2_reference[0] if special else smollm2_reference[1]
    assert smollm.encode(text, special=special) == reference.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def qwen_high_bytes(qwen):
    """Ids of single-byte tokens >= 0x80 (UTF-8 lead and continuation bytes): streams of these split
    characters across tokens and make invalid UTF-8."""
    return [i for i in range(qwen.vocab_size) if len(qwen.token_bytes(i)) == 1 and qwen.token_bytes(i)[0] >= 0x80]


@PROPERTY
@given(data=st.data())
def test_stream_of_random_ids_equals_decode(qwen, hf_qwen, qwen_high_bytes, data):
    """Random ids (often lone UTF-8 lead/continuation bytes): streamed text concatenates to decode(ids),
    which equals the `tokenizers` ByteLevel decoder's lossy UTF-8 reading (U+FFFD per bad sequence)."""
    ids = data.draw(
        st.lists(st.one_of(st.sampled_from(qwen_high_bytes), st.integers(0, qwen.vocab_size - 1)), max_size=40)
    )
    skip = data.draw(st.booleans())
    decoder = qwen.incremental_decoder(skip_special=skip)
    streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert streamed == qwen.decode(ids, skip_special=skip)
    assert streamed == hf_qwen.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


# ---- pre-tokenizer families against transformers' table -------------------------------------------

FAMILY_TEXTS = ["$hello .World don't DON'T", "x\n\n  y\r\n\r\nz   ", "12345678 and 999", "ab\u0301c ½ 日本"]


def test_pre_tokenizer_families_match_transformers():
    """A vocabulary with merges across the places the families cut ("$h", "12", "123"): each family's
    splitting against transformers' GGUF regex table."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    extra = ["$h", "12", "123", "Ġ1"]
    meta = tiny_metadata(
        **{
            "tokenizer.ggml.tokens": TOKENS + extra,
            "llama.vocab_size": len(TOKENS) + len(extra),
            "tokenizer.ggml.token_type": np.array([1] * 258 + [3] + [1] * len(extra), dtype=np.int32),
            "tokenizer.ggml.merges": ["a b", "ab c", "$ h", "1 2", "12 3", "Ġ 1"],
        }
    )
    encodings = {}
    for pre in ("gpt2", "qwen2", "llama-bpe"):
        ours = Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": pre})
        oracle, _ = convert_gguf_tokenizer(
            "llama",
            {
                "tokenizer_type": "gpt2",
                "pre_tokenizer_type": pre,
                "tokens": meta["tokenizer.ggml.tokens"],
                "merges": meta["tokenizer.ggml.merges"],
                "token_type": meta["tokenizer.ggml.token_type"].tolist(),
            },
        )
        encodings[pre] = [ours.encode(t) for t in FAMILY_TEXTS]
        assert encodings[pre] == [oracle.encode(t, add_special_tokens=False).ids for t in FAMILY_TEXTS], pre
    assert len({str(e) for e in encodings.values()}) == 3  # the texts tell the three families apart
    assert Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": "llama-bpe"}).add_bos is False  # file says no
    assert Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.bos_token_id": 0}).add_bos


# ---- bad metadata: one clear KawaiError -----------------------------------------------------------


def tiny_metadata(**changes) -> dict:
    """A valid byte-level vocabulary: the 256 byte tokens, "ab", "abc", and a control <|im_end|>."""
    alphabet = byte_alphabet()
    tokens = [alphabet[b] for b in range(256)] + ["ab", "abc", "<|im_end|>"]
    meta = {
        "general.architecture": "llama",
        "llama.vocab_size": len(tokens),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array([1] * 258 + [3], dtype=np.int32),
        "tokenizer.ggml.merges": ["a b", "ab c"],
        "tokenizer.ggml.eos_token_id": 258,
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def test_tiny_vocabulary_works():
    tok = Tokenizer.from_gguf(tiny_metadata())
    assert tok.encode("abc ab<|im_end|>") == [257, 32, 256, 258]  # "abc", " " (byte 0x20), "ab", <|im_end|>
    assert tok.stop_ids == frozenset({258}) and tok.bos_id is None and not tok.add_bos


TOKENS = tiny_metadata()["tokenizer.ggml.tokens"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tokenizer.ggml.model": "llama"}, "'llama' (sentencepiece) is not supported"),
        ({"tokenizer.ggml.model": "bert"}, "'bert' is not supported"),
        ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model is missing"),
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens is missing"),
        ({"tokenizer.ggml.tokens": [*TOKENS[:-1], 7]}, "tokenizer.ggml.tokens must be an array of strings"),
        ({"tokenizer.ggml.tokens": []}, "has 0 entries"),
        ({"llama.vocab_size": 300}, "llama.vocab_size is 300, but tokenizer.ggml.tokens has 259"),
        ({"tokenizer.ggml.tokens": [*TOKENS[:-1], "ab"]}, "appears twice"),
        ({"tokenizer.ggml.token_type": np.ones(10, dtype=np.int32)}, "token_type has 10 entries"),
        ({"tokenizer.ggml.token_type": np.full(259, 9, dtype=np.int32)}, "is not a token type"),
        ({"tokenizer.ggml.token_type": np.ones(259, dtype=np.float32)}, "must be an array of integers"),
        ({"tokenizer.ggml.eos_token_id": 259}, "eos_token_id = 259 is outside the vocabulary"),
        ({"tokenizer.ggml.eos_token_id": -1}, "eos_token_id = -1 is outside the vocabulary"),
        ({"tokenizer.ggml.bos_token_id": True}, "bos_token_id must be an integer"),
        ({"tokenizer.ggml.padding_token_id": 2**40}, "padding_token_id = 1099511627776 is outside"),
        ({"tokenizer.ggml.merges": ["a b", "a z!"]}, "merges[1]"),
        ({"tokenizer.ggml.merges": ["abc"]}, "merges[0] = 'abc'"),
        ({"tokenizer.ggml.merges": ["a b c"]}, "merges[0]"),
        ({"tokenizer.ggml.merges": ["a c"]}, "merges[0] = 'a c'"),  # "ac" is not a token
        ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges is missing"),
        ({"tokenizer.ggml.pre": "klingon"}, "tokenizer.ggml.pre 'klingon' is not supported"),
        ({"tokenizer.ggml.pre": 3}, "tokenizer.ggml.pre must be a string"),
        ({"tokenizer.ggml.add_bos_token": True}, "add_bos_token is true, but the file names no bos_token_id"),
        ({"tokenizer.ggml.add_bos_token": 1}, "add_bos_token must be a boolean"),
    ],
)
def test_bad_metadata_is_a_clear_error(changes, message):
    with pytest.raises(KawaiError) as err:
        Tokenizer.from_gguf(tiny_metadata(**changes))
    assert message in str(err.value)


def test_bad_inputs_are_clear_errors():
    tok = Tokenizer.from_gguf(tiny_metadata())
    with pytest.raises(KawaiError, match="not valid Unicode"):
        tok.encode("a\ud800b")  # a lone surrogate cannot cross into Rust
    with pytest.raises(KawaiError, match="must be a string"):
        tok.encode(b"bytes")
    for bad in (-1, 259, 10**12):
        with pytest.raises(KawaiError, match="outside the vocabulary"):
            tok.decode([1, bad])
        with pytest.raises(KawaiError, match="outside the vocabulary"):
            tok.incremental_decoder().push(bad)
    with pytest.raises(KawaiError, match="must be an integer"):
        tok.decode([1.5])
    assert tok.decode(np.array([97, 98], dtype=np.int64)) == "ab"  # numpy ids are fine
