"""Malformed GGUF files: one case per validation rule in security.md, every truncation, a mutation fuzz.

Time limits are on CPU time (`time.process_time`), so a loaded machine cannot fail them but a hang can.

Files are built byte by byte here (not with gguf.GGUFWriter, which refuses to write most of them). The
builder records where each count, length, type and offset field sits, so the fuzz can aim at them.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kawai.engine.gguf import GGUFError, open_gguf

# GGUF value type ids
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
# ggml type ids
T_F32, T_Q8_0 = 0, 8


@dataclass
class Raw:
    """Little-endian GGUF bytes, with the position of every integer field a mutation may target."""

    buf: bytearray = field(default_factory=bytearray)
    fields: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, width, what)

    def int(self, value: int, width: int, what: str) -> Raw:
        self.fields.append((len(self.buf), width, what))
        self.buf += value.to_bytes(width, "little")
        return self

    def u32(self, v: int, what: str) -> Raw:
        return self.int(v, 4, what)

    def u64(self, v: int, what: str) -> Raw:
        return self.int(v, 8, what)

    def bytes_(self, b: bytes) -> Raw:
        self.buf += b
        return self

    def string(self, s: str | bytes, what: str, length: int | None = None) -> Raw:
        b = s.encode() if isinstance(s, str) else s
        self.u64(len(b) if length is None else length, f"{what} length")
        return self.bytes_(b)

    def header(self, n_tensors: int, n_kv: int, version: int = 3, magic: bytes = b"GGUF") -> Raw:
        self.bytes_(magic)
        self.u32(version, "version")
        self.u64(n_tensors, "tensor count")
        return self.u64(n_kv, "kv count")

    def kv(self, key: str | bytes, vtype: int, payload: bytes = b"") -> Raw:
        self.string(key, "key")
        self.u32(vtype, "value type")
        return self.bytes_(payload)

    def tensor(self, name: str | bytes, dims: list[int], ggml_type: int, offset: int) -> Raw:
        self.string(name, "tensor name")
        self.u32(len(dims), "n_dims")
        for d in dims:
            self.u64(d, "dim")
        self.u32(ggml_type, "ggml type")
        return self.u64(offset, "tensor offset")

    def pad(self, alignment: int = 32) -> Raw:
        self.buf += b"\0" * (-len(self.buf) % alignment)
        return self


def _str(s: str | bytes, length: int | None = None) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b) if length is None else length) + b


def _arr(etype: int, count: int, items: bytes = b"") -> bytes:
    return struct.pack("<IQ", etype, count) + items


def valid_file() -> Raw:
    """A small well-formed file: scalars, arrays (numeric, bool, string), an F32 and a Q8_0 tensor."""
    r = Raw().header(n_tensors=2, n_kv=6)
    r.kv("general.architecture", STR).string("llama", "value")
    r.kv("llama.block_count", U32).u32(2, "u32 value")
    r.kv("flag", BOOL, b"\x01")
    r.kv("tokenizer.ggml.tokens", ARR).u32(STR, "array type").u64(3, "array count")
    for tok in ("a", "bc", "<s>"):
        r.string(tok, "token")
    r.kv("scores", ARR).u32(F32, "array type").u64(2, "array count").bytes_(struct.pack("<2f", 0.5, -1.0))
    r.kv("bools", ARR).u32(BOOL, "array type").u64(2, "array count").bytes_(b"\x00\x01")
    r.tensor("norm", [8], T_F32, 0)
    r.tensor("w", [32, 2], T_Q8_0, 32)
    r.pad()
    r.bytes_(struct.pack("<8f", *range(8)))  # 32 bytes of F32 at offset 0
    r.bytes_(bytes(range(68)))  # 2 Q8_0 blocks (34 bytes each) at offset 32
    return r


def _write(tmp_path, data: bytes, name: str = "bad.gguf"):
    path = tmp_path / name
    path.unlink(missing_ok=True)  # ext4 flushes on truncate-and-rewrite (auto_da_alloc): 7 ms vs 0.5 ms
    path.write_bytes(bytes(data))
    return path


def test_the_valid_base_file_parses(tmp_path):
    g = open_gguf(_write(tmp_path, valid_file().buf))
    assert g.metadata["tokenizer.ggml.tokens"] == ["a", "bc", "<s>"]
    assert g.metadata["flag"] is True
    assert g.metadata["bools"].tolist() == [False, True]
    assert g.tensors["w"].shape == (2, 32) and g.tensors["w"].n_bytes == 68
    assert g.tensor_data("w").tobytes() == bytes(range(68))


def _header(n_tensors=0, n_kv=1, version=3) -> Raw:
    return Raw().header(n_tensors, n_kv, version)


def _one_kv(key, vtype, payload) -> bytes:
    return _header().kv(key, vtype, payload).buf


def _one_tensor(name="t", dims=(32,), ggml_type=T_F32, offset=0, data_bytes=128, kvs=b"", n_kv=0) -> bytes:
    r = _header(n_tensors=1, n_kv=n_kv).bytes_(kvs).tensor(name, list(dims), ggml_type, offset).pad()
    return r.bytes_(b"\0" * data_bytes).buf


def _align_kv(vtype: int, payload: bytes) -> bytes:
    return _header(n_tensors=0, n_kv=1).kv("general.alignment", vtype, payload).buf


# (case id, file bytes, a substring the error message must contain: the field it names)
CORPUS = [
    # header
    ("empty file", b"", "header"),
    ("bad magic", b"GGUX" + _header().buf[4:], "magic"),
    ("version 0", _header(version=0).buf, "version"),
    ("version 1", _header(version=1).buf, "version"),
    ("version 4", _header(version=4).buf, "version"),
    ("version byte-swapped", _header(version=0x03000000).buf, "big-endian"),
    ("truncated tensor count", b"GGUF\x03\0\0\0\0\0", "tensor count"),
    ("kv count 2^63", _header(n_kv=2**63).buf, "metadata count"),
    ("tensor count 2^63", _header(n_tensors=2**63, n_kv=0).buf + b"\0" * 64, "tensor count"),
    ("tensor count exceeds file", _header(n_tensors=3, n_kv=0).buf + b"\0" * 64, "tensor count"),
    # keys
    ("key length past the end", _header().bytes_(_str("k", length=2**40)).u32(U8, "t").buf + b"\0", "metadata key #0"),
    ("key over the cap", _header().bytes_(_str("k", length=(1 << 16) + 1)).buf + b"\0" * 32, "metadata key #0"),
    ("key not UTF-8", _one_kv(b"\xff\xfek", U8, b"\0"), "UTF-8"),
    ("empty key", _one_kv(b"", U8, b"\0"), "empty key"),
    ("duplicate key", _header(n_kv=2).kv("k", U8, b"\0").kv("k", U8, b"\0").buf, "'k': duplicate"),
    # values
    ("unknown value type", _one_kv("k", 13, b"\0" * 8), "k: value type"),
    ("value type 2^32-1", _one_kv("k", 2**32 - 1, b"\0" * 8), "k: value type"),
    ("truncated u64 value", _one_kv("k", U64, b"\0" * 7), "k: needs 8 bytes"),
    ("bool value 2", _one_kv("flag", BOOL, b"\x02"), "flag: bool"),
    ("bool value 255", _one_kv("flag", BOOL, b"\xff"), "flag: bool"),
    ("string value past the end", _one_kv("name", STR, _str("x", length=2**63)), "name"),
    ("string value over the cap", _one_kv("name", STR, _str("x", length=(1 << 24) + 1)), "name"),
    ("string value not UTF-8", _one_kv("name", STR, _str(b"\xc3\x28")), "name: invalid UTF-8"),
    # arrays
    ("nested array", _one_kv("arr", ARR, _arr(ARR, 1, _arr(U8, 1, b"\0"))), "arr: nested"),
    ("unknown array element type", _one_kv("arr", ARR, _arr(99, 1, b"\0")), "arr: array element type"),
    ("u8 array count past the end", _one_kv("arr", ARR, _arr(U8, 2**63)), "arr: array count"),
    ("f64 array count past the end", _one_kv("arr", ARR, _arr(F64, 2**61, b"\0" * 64)), "arr: array count"),
    ("array count 2^64-1", _one_kv("arr", ARR, _arr(U32, 2**64 - 1)), "arr: array count"),
    ("string array count past the end", _one_kv("toks", ARR, _arr(STR, 2**40, _str("a"))), "toks: array count"),
    ("string in array past the end", _one_kv("toks", ARR, _arr(STR, 2, _str("a") + _str("b", length=99))), "toks[1]"),
    ("string in array not UTF-8", _one_kv("toks", ARR, _arr(STR, 2, _str("a") + _str(b"\xff"))),
     "toks[1]: invalid UTF-8"),
    ("truncated string array", _one_kv("toks", ARR, _arr(STR, 3, _str("a") + _str("b") + b"\0" * 7)), "toks[2]"),
    ("bool array value 2", _one_kv("bools", ARR, _arr(BOOL, 3, b"\x00\x01\x02")), "bools: bool array"),
    # general.alignment
    ("alignment as u64", _align_kv(U64, struct.pack("<Q", 32)), "general.alignment"),
    ("alignment zero", _align_kv(U32, struct.pack("<I", 0)), "general.alignment"),
    ("alignment not a power of two", _align_kv(U32, struct.pack("<I", 48)), "general.alignment"),
    ("alignment too large", _align_kv(U32, struct.pack("<I", 1 << 20)), "general.alignment"),
    ("alignment as string", _align_kv(STR, _str("32")), "general.alignment"),
    # tensor infos
    ("tensor name empty", _one_tensor(name=b""), "tensor #0 name: empty"),
    ("tensor name too long", _one_tensor(name="n" * 64), "tensor #0 name"),
    ("tensor name not UTF-8", _one_tensor(name=b"\x80"), "tensor #0 name: invalid UTF-8"),
    ("duplicate tensor name",
     _header(n_tensors=2, n_kv=0).tensor("t", [8], T_F32, 0).tensor("t", [8], T_F32, 32).pad().buf + b"\0" * 64,
     "'t': duplicate"),
    ("n_dims 0", _one_tensor(dims=()), "n_dims 0"),
    ("n_dims 5", _one_tensor(dims=(1, 1, 1, 1, 1)), "n_dims 5"),
    ("dim 0", _one_tensor(dims=(32, 0)), "contain a zero"),
    ("element count over int64", _one_tensor(dims=(2**32, 2**31)), "overflows int64"),
    ("element count 2^64 wraps in uint64", _one_tensor(dims=(2**63, 2)), "overflows int64"),
    ("dim not a multiple of the block size", _one_tensor(dims=(31, 2), ggml_type=T_Q8_0), "block size"),
    ("unknown ggml type", _one_tensor(ggml_type=4), "unknown ggml type 4"),
    ("ggml type 2^31", _one_tensor(ggml_type=2**31), "unknown ggml type"),
    ("offset not aligned", _one_tensor(offset=1), "not aligned"),
    ("tensor past the data section", _one_tensor(dims=(64,), data_bytes=128), "exceed the data section"),
    ("offset 2^64-32", _one_tensor(offset=2**64 - 32), "exceed the data section"),
    ("data section past the end of file", _header(n_tensors=1, n_kv=0).tensor("t", [4], T_F32, 0).buf, "data section"),
    ("truncated tensor info",
     _header(n_tensors=1, n_kv=0).string("t", "name").u32(4, "n_dims").u64(32, "d").u64(1, "d").u64(1, "d").buf,
     "tensor t: dim 3"),
]


@pytest.mark.parametrize("data, expected", [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_malformed_file_is_rejected_naming_the_field(tmp_path, data, expected):
    path = _write(tmp_path, data)
    t0 = time.process_time()
    with pytest.raises(GGUFError) as info:
        open_gguf(path)
    assert time.process_time() - t0 < 1.0
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_every_truncation_of_a_valid_file_is_rejected(tmp_path):
    data = valid_file().buf
    for n in range(len(data)):
        with pytest.raises(GGUFError):
            open_gguf(_write(tmp_path, data[:n]))


@pytest.mark.parametrize("etype", [U8, I8, U16, I16, U32, I32, F32, BOOL, STR, U64, I64, F64])
def test_tiny_file_claiming_array_length_2_63_fails_fast(tmp_path, etype):
    """gguf-py 0.19 loops forever (growing memory) on a file this small claiming 2^63 elements."""
    data = _header().kv("a", ARR, _arr(etype, 2**63)).buf
    assert len(data) == 49  # the smallest file that can claim it: a 43-byte one would be truncated earlier
    t0 = time.process_time()
    with pytest.raises(GGUFError, match="array count"):
        open_gguf(_write(tmp_path, data))
    assert time.process_time() - t0 < 0.1


def test_43_byte_file_claiming_a_2_63_count_fails_fast(tmp_path):
    data = _header(n_tensors=0, n_kv=2**63).buf + b"\0" * 19
    assert len(data) == 43
    t0 = time.process_time()
    with pytest.raises(GGUFError, match="metadata count"):
        open_gguf(_write(tmp_path, data))
    assert time.process_time() - t0 < 0.1


# --- mutation fuzz ----------------------------------------------------------------------------------

BASE = valid_file()
SPECIAL = [0, 1, 2, 3, 31, 32, 33, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]


def _as_unsigned(value: int, width: int) -> int:
    return value % (1 << (8 * width))  # negative values wrap, as a C writer would store them


mutation = st.tuples(
    st.sampled_from(BASE.fields),
    st.one_of(st.sampled_from(SPECIAL), st.integers(-(2**63), -1), st.integers(0, 2**64 - 1)),
)


@settings(max_examples=1000, deadline=1000)
@given(st.lists(mutation, min_size=1, max_size=3), st.none() | st.integers(0, len(BASE.buf)))
def test_mutated_counts_lengths_offsets_and_types_raise_only_gguf_error(tmp_path_factory, mutations, cut):
    data = bytearray(BASE.buf)
    for (offset, width, _what), value in mutations:
        data[offset : offset + width] = _as_unsigned(value, width).to_bytes(width, "little")
    if cut is not None:
        data = data[:cut]
    path = _write(tmp_path_factory.getbasetemp(), data, "fuzz.gguf")
    t0 = time.process_time()
    try:
        g = open_gguf(path)
    except GGUFError as e:
        assert str(e) and "\n" not in str(e)
    else:  # accepted: then every tensor must be readable within the file
        for name, info in g.tensors.items():
            assert g.tensor_data(name).size == info.n_bytes
            assert info.offset + info.n_bytes <= len(data)
    assert time.process_time() - t0 < 1.0
