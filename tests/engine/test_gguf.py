"""The GGUF reader against files written by an independent implementation (gguf.GGUFWriter) and against
gguf.GGUFReader on the real catalog models."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kawai.engine.gguf import GGUFError, GGUFValueType, open_gguf
from kawai.kernels.qtypes import GGMLType

VT = gguf.GGUFValueType

SCALARS = [
    ("t.u8", 255, VT.UINT8),
    ("t.i8", -128, VT.INT8),
    ("t.u16", 65535, VT.UINT16),
    ("t.i16", -32768, VT.INT16),
    ("t.u32", 2**32 - 1, VT.UINT32),
    ("t.i32", -(2**31), VT.INT32),
    ("t.u64", 2**64 - 1, VT.UINT64),
    ("t.i64", -(2**63), VT.INT64),
    ("t.f32", 1.5, VT.FLOAT32),
    ("t.f64", -2.25e300, VT.FLOAT64),
    ("t.bool_true", True, VT.BOOL),
    ("t.bool_false", False, VT.BOOL),
    ("t.str", "héllo ✓ 你好", VT.STRING),
    ("t.str_empty_ish", " ", VT.STRING),
]

NUMERIC_ARRAYS = [
    ("a.u8", [0, 1, 255], VT.UINT8, np.uint8),
    ("a.i8", [-128, 0, 127], VT.INT8, np.int8),
    ("a.u16", [0, 65535], VT.UINT16, np.uint16),
    ("a.i16", [-32768, 32767], VT.INT16, np.int16),
    ("a.u32", [0, 2**32 - 1], VT.UINT32, np.uint32),
    ("a.i32", [-(2**31), 2**31 - 1], VT.INT32, np.int32),
    ("a.u64", [0, 2**64 - 1], VT.UINT64, np.uint64),
    ("a.i64", [-(2**63), 2**63 - 1], VT.INT64, np.int64),
    ("a.f32", [0.5, -1.0, 3.25], VT.FLOAT32, np.float32),
    ("a.f64", [1e-300, -7.0], VT.FLOAT64, np.float64),
    ("a.bool", [True, False, True], VT.BOOL, np.bool_),
]


def _ggml_types_known_to_both() -> list[GGMLType]:
    """Every type both tables know, except Q8_1: gguf-py 0.19 still sizes its block with f32 d and s
    (40 bytes) while ggml's block_q8_1 is two halves + 32 int8 = 36 bytes (static_assert in
    ggml-common.h). It is an activation format, never stored in model files."""
    theirs = {t.value for t in gguf.GGMLQuantizationType}
    return [t for t in GGMLType if t.value in theirs and t != GGMLType.Q8_1]


def _random_tensor(rng: np.random.Generator, qtype: GGMLType, rows: int, n_blocks: int) -> tuple[np.ndarray, dict]:
    """Random raw bytes for a (rows, n_blocks * block_size) tensor, with GGUFWriter.add_tensor kwargs."""
    row_bytes = n_blocks * qtype.type_size
    raw = rng.integers(0, 256, size=(rows, row_bytes), dtype=np.uint8)
    return raw, {"raw_dtype": gguf.GGMLQuantizationType(qtype.value)}


def _write(path, *, kvs=(), arrays=(), tensors=(), alignment=None):
    w = gguf.GGUFWriter(str(path), arch="testarch")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, val, vtype in kvs:
        w.add_key_value(key, val, vtype)
    for key, vals, sub_type in arrays:
        w.add_key_value(key, vals, VT.ARRAY, sub_type=sub_type)
    for name, arr, kwargs in tensors:
        w.add_tensor(name, arr, **kwargs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_scalar_value_type_round_trips(tmp_path):
    g = open_gguf(_write(tmp_path / "s.gguf", kvs=SCALARS))
    assert g.version == 3
    assert g.architecture == "testarch"
    for key, val, vtype in SCALARS:
        field = g.fields[key]
        assert field.value_type == GGUFValueType(vtype.value), key
        assert field.element_type is None
        if isinstance(val, float):
            assert field.value == pytest.approx(val, rel=1e-7)
        else:
            assert field.value == val and type(field.value) is type(val), key


def test_numeric_bool_and_string_arrays_round_trip(tmp_path):
    strings = ["", "a", "Ġthe", "é✓", "<|im_end|>", "x" * 1000]
    arrays = [(k, v, t) for k, v, t, _ in NUMERIC_ARRAYS] + [("a.str", strings, VT.STRING)]
    g = open_gguf(_write(tmp_path / "a.gguf", arrays=arrays))
    for key, vals, vtype, dtype in NUMERIC_ARRAYS:
        field = g.fields[key]
        assert field.value_type == GGUFValueType.ARRAY
        assert field.element_type == GGUFValueType(vtype.value)
        assert field.value.dtype == np.dtype(dtype), key
        np.testing.assert_array_equal(field.value, np.array(vals, dtype=dtype))
    assert g.fields["a.str"].value == strings
    assert g.fields["a.str"].element_type == GGUFValueType.STRING


def test_many_tensor_types_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    tensors = []
    for i, qtype in enumerate(_ggml_types_known_to_both()):
        rows = 1 + i % 3
        raw, kwargs = _random_tensor(rng, qtype, rows, n_blocks=2 if qtype.block_size > 1 else 64)
        name = f"t{i}.{qtype.name.lower()}"
        tensors.append((name, raw, kwargs))
        expected[name] = (qtype, (rows, raw.shape[1] // qtype.type_size * qtype.block_size), raw)
    dense = {
        "d.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "d.f16": rng.standard_normal((2, 7)).astype(np.float16),
        "d.f32_4d": rng.standard_normal((2, 3, 4, 5)).astype(np.float32),
        "d.f32_1d": rng.standard_normal(11).astype(np.float32),
    }
    tensors += [(k, v, {}) for k, v in dense.items()]
    path = _write(tmp_path / "t.gguf", tensors=tensors)
    g = open_gguf(path)
    assert len(g.tensors) == len(expected) + len(dense)
    for name, (qtype, shape, raw) in expected.items():
        info = g.tensors[name]
        assert info.ggml_type == qtype, name
        assert info.shape == shape, name
        assert info.n_bytes == raw.nbytes
        assert info.offset % g.alignment == 0
        np.testing.assert_array_equal(g.tensor_data(name), raw)
    for name, arr in dense.items():
        assert g.tensors[name].shape == arr.shape
        np.testing.assert_array_equal(g.tensor_array(name), arr)
    # The same table as gguf's own reader (whose shapes are innermost-first).
    theirs = gguf.GGUFReader(str(path))
    assert len(theirs.tensors) == len(g.tensors)
    for t in theirs.tensors:
        ours = g.tensors[t.name]
        assert ours.ggml_type.value == t.tensor_type.value
        assert ours.shape == tuple(int(d) for d in reversed(t.shape))
        assert ours.offset == t.data_offset
        assert ours.n_bytes == t.n_bytes


def test_tensor_data_is_a_zero_copy_view(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    g = open_gguf(_write(tmp_path / "v.gguf", tensors=[("w", arr, {})]))
    view = g.tensor_data("w")
    assert view.shape == (3, 16) and view.dtype == np.uint8
    assert not view.flags.owndata and not view.flags.writeable
    assert g.tensor_array("w").base is not None


@pytest.mark.parametrize("alignment", [1, 8, 64, 4096])
def test_custom_alignment(tmp_path, alignment):
    tensors = [(f"w{i}", np.full(i + 1, i, dtype=np.float32), {}) for i in range(3)]
    g = open_gguf(_write(tmp_path / "al.gguf", tensors=tensors, alignment=alignment))
    assert g.alignment == alignment
    assert g.data_offset % alignment == 0
    for i in range(3):
        assert g.tensors[f"w{i}"].offset % alignment == 0
        np.testing.assert_array_equal(g.tensor_array(f"w{i}"), np.full(i + 1, i, dtype=np.float32))


def test_ggml_type_sizes_match_gguf_package():
    for qtype in _ggml_types_known_to_both():
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype.value)]
        assert (qtype.block_size, qtype.type_size) == (block, size), qtype.name
    # The known gguf-py discrepancy (see above): if gguf-py is fixed, this line fails and can go.
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1] == (32, 40)
    assert (GGMLType.Q8_1.block_size, GGMLType.Q8_1.type_size) == (32, 36)


def test_typed_metadata_accessors(tmp_path):
    g = open_gguf(_write(tmp_path / "s.gguf", kvs=SCALARS, arrays=[("a.u8", [1], VT.UINT8)]))
    assert g.get_int("t.u64") == 2**64 - 1
    assert g.get_float("t.u32") == float(2**32 - 1)
    assert g.get_float("t.f32") == 1.5
    assert g.get_str("t.str") == "héllo ✓ 你好"
    assert g.get_bool("t.bool_true") is True
    assert g.get_int("missing.key", None) is None
    with pytest.raises(GGUFError, match="'missing.key' is missing"):
        g.get_int("missing.key")
    with pytest.raises(GGUFError, match="'t.str': expected an integer, found STRING"):
        g.get_int("t.str")
    with pytest.raises(GGUFError, match="'t.bool_true': expected an integer"):
        g.get_int("t.bool_true")  # a bool is not silently an int
    with pytest.raises(GGUFError, match="'a.u8': expected a string, found ARRAY of UINT8"):
        g.get_str("a.u8")


_keys = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20)
_values = st.one_of(
    st.tuples(st.integers(0, 2**64 - 1), st.just(VT.UINT64)),
    st.tuples(st.integers(-(2**31), 2**31 - 1), st.just(VT.INT32)),
    st.tuples(st.booleans(), st.just(VT.BOOL)),
    st.tuples(st.text(max_size=50).filter(bool).map(lambda s: s.encode("utf-8", "replace").decode("utf-8", "replace")),
              st.just(VT.STRING)),
    st.tuples(st.floats(width=64, allow_nan=False), st.just(VT.FLOAT64)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(_keys.filter(lambda k: k != "general.architecture"), _values, max_size=8))
def test_random_metadata_round_trips(tmp_path, kv):
    g = open_gguf(_write(tmp_path / "h.gguf", kvs=[(k, v, t) for k, (v, t) in kv.items()]))
    assert set(g.fields) == set(kv) | {"general.architecture"}
    for key, (val, vtype) in kv.items():
        assert g.fields[key].value_type == GGUFValueType(vtype.value)
        assert g.fields[key].value == val


# --- the real catalog models ------------------------------------------------------------------------

def test_default_model_header(default_model_path):
    g = open_gguf(default_model_path)
    assert g.version == 3
    assert g.architecture == "qwen2"
    assert len(g.tensors) == 291
    assert g.get_int("qwen2.block_count") == 24
    assert g.get_int("qwen2.attention.head_count") == 14
    assert g.get_int("qwen2.attention.head_count_kv") == 2
    assert g.get_int("qwen2.embedding_length") == 896
    assert g.get_int("qwen2.context_length") == 32768
    assert g.get_float("qwen2.rope.freq_base") == 1e6
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 151936
    assert len(g.metadata["tokenizer.ggml.merges"]) == 151387
    assert g.metadata["tokenizer.ggml.tokens"][151645] == "<|im_end|>"
    assert g.get_str("tokenizer.chat_template").startswith("{%- if tools %}")
    assert {t.ggml_type for t in g.tensors.values()} == {
        GGMLType.F32, GGMLType.Q4_K, GGMLType.Q5_0, GGMLType.Q6_K, GGMLType.Q8_0
    }
    assert g.tensors["output.weight"].ggml_type == GGMLType.Q8_0
    assert g.tensors["token_embd.weight"].shape == (151936, 896)
    assert g.tensor_data("token_embd.weight").shape == (151936, 896 // 32 * 22)
    # Tensors tile the data section: aligned, in bounds, never overlapping.
    infos = sorted(g.tensors.values(), key=lambda t: t.offset)
    for a, b in zip(infos, infos[1:]):
        assert a.offset + a.n_bytes <= b.offset
    assert all(t.offset % g.alignment == 0 for t in infos)
    assert infos[0].offset == g.data_offset
    assert infos[-1].offset + infos[-1].n_bytes <= default_model_path.stat().st_size


def _assert_same_as_gguf_reader(path):
    ours = open_gguf(path)
    theirs = gguf.GGUFReader(str(path))
    their_fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(their_fields) == list(ours.fields)
    for key, f in their_fields.items():
        mine = ours.fields[key]
        assert mine.value_type.value == f.types[0].value, key
        expected = f.contents()
        if mine.element_type is not None:
            assert mine.element_type.value == f.types[1].value, key
            got = mine.value if isinstance(mine.value, list) else mine.value.tolist()
            assert got == list(expected), key
        elif isinstance(expected, float):
            assert mine.value == pytest.approx(expected, rel=1e-7), key
        else:
            assert mine.value == expected, key
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type.value == t.tensor_type.value
        assert info.shape == tuple(int(d) for d in reversed(t.shape))
        assert info.offset == t.data_offset
        assert info.n_bytes == t.n_bytes
        assert math.prod(info.shape) == t.n_elements


@pytest.mark.slow  # gguf.GGUFReader takes 10-35 s on a 151k-token vocabulary
def test_default_model_matches_gguf_reader(default_model_path):
    _assert_same_as_gguf_reader(default_model_path)


def test_smollm_model_matches_gguf_reader(smollm_model_path):  # ~4 s: gguf-py parses a 49k-token vocabulary
    _assert_same_as_gguf_reader(smollm_model_path)
