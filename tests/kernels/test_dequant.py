"""Dequantizers: tests/kernels/quant_reference.py (NumPy, the spec) and kernels/dequant.py (the Numba block
decoders of kernels/formats.py), bit for bit against gguf.quants (the oracle).

Bit-exact means equal float32 bit patterns (so -0.0 != +0.0 and NaN payloads count), not np.allclose.
Random blocks cover every format of the table (`FORMATS`); the two catalog models cover every real
tensor (big ones by a sample of rows, always including the first and last).
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as oracle

import quant_reference as reference
from kawai.engine.gguf import open_gguf
from kawai.kernels import dequant
from kawai.kernels.formats import FORMATS, unpack_scale_min_k4
from kawai.kernels.qtypes import GGMLType
from python_runner import run_python

# Every quantized row of the table; gguf.quants has no Q8_K (tested on its own below).
QUANTIZED = [t for t, row in FORMATS.items() if row.block_size > 1 and t != GGMLType.Q8_K]
# Scale values that exercise the f16 widening: zero, negative zero, subnormals, the largest half.
SPECIAL_SCALES = np.array([0.0, -0.0, 6e-8, -3e-5, 65504.0, -1.0, 2.0**-14], dtype=np.float16)
FULL_TENSOR_ELEMENTS = 1 << 19  # compare bigger tensors on a sample of rows
SAMPLE_ROWS = 48


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def assert_bit_exact(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == np.float32, what
    assert got.shape == want.shape, what
    same = bits(got) == bits(want)
    if not same.all():
        at = np.unravel_index(np.argmin(same), same.shape)
        n_bad = int((~same).sum())
        pytest.fail(f"{what}: {n_bad} elements differ, first at {at}: {got[at]!r} != {want[at]!r}")


def oracle_dequantize(raw: np.ndarray, qtype: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    return oracle.dequantize(np.ascontiguousarray(raw), GGMLQuantizationType(int(qtype))).reshape(shape)


def random_blocks(qtype: GGMLType, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """(n_blocks, type_size) random bytes with finite f16 scales, some of them special values."""
    raw = rng.integers(0, 256, (n_blocks, qtype.type_size), dtype=np.uint8)
    for at in FORMATS[qtype].f16_fields:  # random bytes there could be NaN/inf
        magnitude = rng.choice([1e-4, 1e-2, 1.0, 100.0], n_blocks)
        scales = (rng.standard_normal(n_blocks) * magnitude).astype(np.float16)
        scales[: len(SPECIAL_SCALES)] = rng.permutation(SPECIAL_SCALES)
        raw[:, at : at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw


# --- random blocks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
@pytest.mark.parametrize("size", ["serial", "parallel"])
def test_random_blocks_match_gguf(qtype, size):
    rng = np.random.default_rng(int(qtype))
    if size == "serial":
        shape = (2, 8, 4 * qtype.block_size)  # 64 blocks, 3-D to check the output shape too
    else:  # enough weights for the driver's prange branch
        shape = (16, dequant.PARALLEL_MIN_ELEMENTS // 16)
    raw = random_blocks(qtype, int(np.prod(shape)) // qtype.block_size, rng)
    want = oracle_dequantize(raw, qtype, shape)
    assert_bit_exact(reference.dequantize(raw, qtype, shape), want, f"reference {qtype.name}")
    assert_bit_exact(dequant.dequantize(raw, qtype, shape), want, f"numba {qtype.name}")


def test_f16_every_bit_pattern():
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)  # every half, NaN payloads included
    want = raw.view(np.float16).astype(np.float32)
    assert_bit_exact(reference.dequantize(raw, GGMLType.F16, (1 << 16,)), want, "reference F16")
    assert_bit_exact(dequant.dequantize(raw, GGMLType.F16, (1 << 16,)), want, "numba F16")


def test_bf16_every_bit_pattern():
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    want = oracle_dequantize(raw, GGMLType.BF16, (256, 256))
    assert_bit_exact(reference.dequantize(raw, GGMLType.BF16, (256, 256)), want, "reference BF16")
    assert_bit_exact(dequant.dequantize(raw, GGMLType.BF16, (256, 256)), want, "numba BF16")


def test_f32_is_copied_bit_for_bit():
    raw = np.random.default_rng(1).integers(0, 256, 4 * 1000, dtype=np.uint8)  # NaNs and all
    want = raw.view(np.float32).reshape(10, 100)
    got = dequant.dequantize(raw, GGMLType.F32, (10, 100))
    assert_bit_exact(got, want, "numba F32")
    assert_bit_exact(reference.dequantize(raw, GGMLType.F32, (10, 100)), want, "reference F32")
    assert got.flags.writeable and not np.shares_memory(got, raw)


def test_q8_k_known_block_and_random():
    # gguf.quants has no Q8_K: check a hand-built block, then reference against numba on random blocks.
    qs = np.arange(-128, 128, dtype=np.int8)
    block = np.concatenate([
        np.array([0.5], dtype="<f4").view(np.uint8), qs.view(np.uint8),
        qs.reshape(16, 16).sum(axis=1, dtype=np.int16).astype("<i2").view(np.uint8),
    ])
    want = np.arange(-128, 128, dtype=np.float32) * np.float32(0.5)
    assert_bit_exact(reference.dequantize(block, GGMLType.Q8_K, (256,)), want, "reference Q8_K")
    assert_bit_exact(dequant.dequantize(block, GGMLType.Q8_K, (256,)), want, "numba Q8_K")

    rng = np.random.default_rng(15)
    for n_blocks in (4, dequant.PARALLEL_MIN_ELEMENTS // 256):  # serial and parallel branches
        raw = rng.integers(0, 256, (n_blocks, GGMLType.Q8_K.type_size), dtype=np.uint8)
        raw[:, 0:4] = rng.standard_normal((n_blocks, 1)).astype("<f4").view(np.uint8)
        assert_bit_exact(
            dequant.dequantize(raw, GGMLType.Q8_K, (n_blocks, 256)),
            reference.dequantize(raw, GGMLType.Q8_K, (n_blocks, 256)),
            "numba vs reference Q8_K",
        )


def test_q4_k_scale_min_unpacking_by_hand():
    # Sub-block j >= 4 takes its scale's low bits from byte j+4 and its high bits from byte j-4; its
    # min's high bits from byte j (the index a known port gets wrong). Give every field a distinct value.
    want_scales = np.array([1, 2, 3, 4, 13, 22, 47, 60], dtype=np.uint8)  # high bits differ from the mins
    want_mins = np.array([5, 6, 7, 8, 33, 50, 61, 29], dtype=np.uint8)
    packed = np.zeros((1, 12), dtype=np.uint8)
    packed[0, 0:4] = want_scales[:4] | ((want_scales[4:] >> 4) << 6)
    packed[0, 4:8] = want_mins[:4] | ((want_mins[4:] >> 4) << 6)
    packed[0, 8:12] = (want_scales[4:] & 0x0F) | ((want_mins[4:] & 0x0F) << 4)
    scales, mins = unpack_scale_min_k4(packed)
    np.testing.assert_array_equal(scales[0], want_scales)
    np.testing.assert_array_equal(mins[0], want_mins)

    # A Q4_K block with d = dmin = 1 and all quants 0: element 32*j dequantizes to -min[j].
    block = np.zeros(GGMLType.Q4_K.type_size, dtype=np.uint8)
    block[0:4] = np.array([1.0, 1.0], dtype=np.float16).view(np.uint8)
    block[4:16] = packed[0]
    for impl in (reference, dequant):
        got = impl.dequantize(block, GGMLType.Q4_K, (256,))
        np.testing.assert_array_equal(got[::32], -want_mins.astype(np.float32))


# --- every tensor of the real models --------------------------------------------------------------------


def sample_rows(n_rows: int, rng: np.random.Generator) -> np.ndarray:
    if n_rows <= SAMPLE_ROWS:
        return np.arange(n_rows)
    middle = rng.choice(np.arange(1, n_rows - 1), SAMPLE_ROWS - 2, replace=False)
    return np.sort(np.concatenate([[0, n_rows - 1], middle]))


@pytest.mark.parametrize("model_fixture", ["default_model_path", "smollm_model_path"])
def test_every_tensor_of_the_catalog_models(model_fixture, request):
    gguf_file = open_gguf(request.getfixturevalue(model_fixture))
    rng = np.random.default_rng(0)
    seen_types = set()
    for name, info in gguf_file.tensors.items():
        raw = gguf_file.tensor_data(name)  # (rows, row_bytes), read-only memmap view
        seen_types.add(info.ggml_type)
        what = f"{name} ({info.ggml_type.name}, {info.shape})"
        if info.n_elements <= FULL_TENSOR_ELEMENTS:
            want = oracle_dequantize(raw, info.ggml_type, info.shape)
            assert_bit_exact(dequant.dequantize(raw, info.ggml_type, info.shape), want, f"numba {what}")
            assert_bit_exact(reference.dequantize(raw, info.ggml_type, info.shape), want, f"reference {what}")
            continue
        n_rows, n_cols = raw.shape[0], info.shape[-1]
        rows = sample_rows(n_rows, rng)
        want = oracle_dequantize(raw[rows], info.ggml_type, (len(rows), n_cols))
        got = dequant.dequantize_row_ids(raw, info.ggml_type, rows)
        assert_bit_exact(got, want, f"numba rows {what}")
        got_ref = reference.dequantize(raw[rows], info.ggml_type, (len(rows), n_cols))
        assert_bit_exact(got_ref, want, f"reference rows {what}")
        # A contiguous window through dequantize_rows, ending at the last row.
        lo = n_rows - 5
        window = oracle_dequantize(raw[lo:], info.ggml_type, (5, n_cols))
        assert_bit_exact(dequant.dequantize_rows(raw, info.ggml_type, lo, n_rows), window, f"window {what}")
    assert seen_types <= set(reference.BLOCK_DEQUANTIZERS)


def test_full_big_tensor_through_dequantize(default_model_path):
    # One large quantized tensor whole, through the parallel driver, against the oracle.
    gguf_file = open_gguf(default_model_path)
    q4_k = [i for i in gguf_file.tensors.values() if i.ggml_type == GGMLType.Q4_K]
    info = max(q4_k, key=lambda i: i.n_elements)
    raw = gguf_file.tensor_data(info.name)
    want = oracle_dequantize(raw, info.ggml_type, info.shape)
    assert_bit_exact(dequant.dequantize(raw, info.ggml_type, info.shape), want, info.name)


# --- rows API and bad input ------------------------------------------------------------------------------


def test_rows_api_agrees_with_full_dequantize():
    qtype = GGMLType.Q6_K
    raw = random_blocks(qtype, 5 * 3, np.random.default_rng(3)).reshape(5, 3 * qtype.type_size)
    full = dequant.dequantize(raw, qtype, (5, 768))
    assert_bit_exact(dequant.dequantize_rows(raw, qtype, 1, 4), full[1:4], "rows 1..4")
    assert_bit_exact(dequant.dequantize_row_ids(raw, qtype, [4, 0, 4]), full[[4, 0, 4]], "row ids")
    assert dequant.dequantize_rows(raw, qtype, 2, 2).shape == (0, 768)
    assert dequant.dequantize_row_ids(raw, qtype, np.array([], dtype=np.int64)).shape == (0, 768)


@pytest.mark.parametrize("impl", [reference, dequant], ids=["reference", "numba"])
@pytest.mark.parametrize(
    "raw, qtype, shape, message",
    [
        (np.zeros(18, np.uint8), GGMLType.IQ2_XXS, (256,), "IQ2_XXS cannot be dequantized"),
        (np.zeros(18, np.uint8), 999, (32,), "unknown ggml type id 999"),
        (np.zeros(17, np.uint8), GGMLType.Q4_0, (32,), "needs 18 bytes, got 17"),
        (np.zeros(36, np.uint8), GGMLType.Q4_0, (32,), "needs 18 bytes, got 36"),
        (np.zeros(18, np.uint8), GGMLType.Q4_0, (16,), "not a multiple of the Q4_0 block size 32"),
        (np.zeros(18, np.int8), GGMLType.Q4_0, (32,), "must be uint8"),
        (np.zeros(0, np.uint8), GGMLType.F32, (0,), "all >= 1"),
        (np.zeros(0, np.uint8), GGMLType.F32, (), "at least one dimension"),
        (np.zeros(4, np.uint8), GGMLType.F32, (1.0,), "must be a tuple of integers"),
    ],
)
def test_bad_input_is_a_clear_error(impl, raw, qtype, shape, message):
    with pytest.raises(ValueError, match=message):
        impl.dequantize(raw, qtype, shape)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda raw: dequant.dequantize_rows(raw, GGMLType.Q8_0, -1, 2), r"range -1\.\.2 is outside 0\.\.4"),
        (lambda raw: dequant.dequantize_rows(raw, GGMLType.Q8_0, 3, 2), r"row range 3\.\.2"),
        (lambda raw: dequant.dequantize_rows(raw, GGMLType.Q8_0, 0, 5), r"row range 0\.\.5"),
        (lambda raw: dequant.dequantize_rows(raw, GGMLType.Q8_0, 0.5, 2), "integer"),
        (lambda raw: dequant.dequantize_rows(raw, GGMLType.Q4_0, 0, 1), "whole number of Q4_0 blocks"),
        (lambda raw: dequant.dequantize_rows(raw.reshape(-1), GGMLType.Q8_0, 0, 1), "2-D"),
        (lambda raw: dequant.dequantize_row_ids(raw, GGMLType.Q8_0, [0, -1]), r"row ids must be in 0\.\.3"),
        (lambda raw: dequant.dequantize_row_ids(raw, GGMLType.Q8_0, [4]), r"row ids must be in 0\.\.3"),
        (lambda raw: dequant.dequantize_row_ids(raw, GGMLType.Q8_0, [[0]]), "1-D integer"),
        (lambda raw: dequant.dequantize_row_ids(raw, GGMLType.Q8_0, [0.0]), "1-D integer"),
    ],
)
def test_bad_rows_are_a_clear_error(call, message):
    raw = np.zeros((4, 2 * GGMLType.Q8_0.type_size), dtype=np.uint8)
    with pytest.raises((ValueError, TypeError), match=message):
        call(raw)


# --- the kernels still run as plain Python ----------------------------------------------------------------


def test_kernels_run_without_jit():
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        sys.path.insert(0, "tests/kernels")
        import quant_reference as reference
        from kawai.kernels import dequant
        from kawai.kernels.qtypes import GGMLType
        rng = np.random.default_rng(7)
        for qtype in reference.BLOCK_DEQUANTIZERS:
            raw = rng.integers(0, 256, 4 * qtype.type_size, dtype=np.uint8)
            shape = (4 * qtype.block_size,)
            want = reference.dequantize(raw, qtype, shape)
            got = dequant.dequantize(raw, qtype, shape)
            finite = np.isfinite(want)  # random scale bytes may be NaN/inf; NaN arithmetic is not the point
            assert finite.mean() > 0.5, qtype.name
            assert np.array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32)), qtype.name
        print("ok", len(reference.BLOCK_DEQUANTIZERS))
        """
    )
    assert run_python(script, jit=False, timeout=120) == "ok 14"
