"""The format table (kernels/formats.py): every row is complete, and the kernel tests take their parameters
from it, so a new row is tested without editing them (docs/quantization.md, "Adding a quant format")."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

import quant_reference
import test_dequant
import test_matmul
from kawai.kernels import dequant
from kawai.kernels import matmul_simd as simd
from kawai.kernels.formats import DENSE_TYPES, DRIVERS, FORMATS, PACKED_TYPES, SUPPORTED_TYPES, Decoded
from kawai.kernels.matmul import MATMUL_TYPES
from kawai.kernels.qtypes import GGMLType

ROWS = list(FORMATS.values())
NOT_A_WEIGHT = {GGMLType.Q8_K}  # the activation format of k-quant dot products: dequantized, never multiplied
STORED_MAX = {"s8": 255, "u8": 63, "u6": 63, "u4": 15, "u5": 31}  # largest stored quant (u8: vpmaddubsw pairs fit an i16)


def random_blocks(row, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """(n_blocks, type_size) random bytes with finite f16 scales."""
    blocks = rng.integers(0, 256, (n_blocks, row.type_size), dtype=np.uint8)
    for at in row.f16_fields:
        blocks[:, at : at + 2] = rng.uniform(-2, 2, (n_blocks, 1)).astype("<f2").view(np.uint8)
    return blocks


def test_sizes_agree_with_gguf():
    """kernels/qtypes.py's size table against gguf-py's. Q8_1 excepted: gguf-py still has the old layout with
    f32 d and s (40 bytes); ggml's block_q8_1 holds them as halves (36). No file stores it."""
    for qtype in set(GGMLType) - {GGMLType.Q8_1}:
        assert (qtype.block_size, qtype.type_size) == GGML_QUANT_SIZES[GGMLQuantizationType[qtype.name]], qtype
        assert int(GGMLQuantizationType[qtype.name]) == int(qtype)


def test_the_derived_sets():
    assert SUPPORTED_TYPES == set(FORMATS) and all(key == row.qtype for key, row in FORMATS.items())
    assert DENSE_TYPES == {GGMLType.F32, GGMLType.F16, GGMLType.BF16}
    assert MATMUL_TYPES == DENSE_TYPES | PACKED_TYPES
    assert SUPPORTED_TYPES == PACKED_TYPES | DENSE_TYPES | NOT_A_WEIGHT


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.qtype.name)
def test_every_row_is_complete(row):
    """A block decoder (F32 alone is a copy), a compiled driver, a reference decoder in tests/, f16 fields
    inside the block, and a pack spec for every quantized weight format."""
    assert (row.block is None) == (row.qtype == GGMLType.F32)
    assert row.qtype in DRIVERS
    assert row.qtype in quant_reference.BLOCK_DEQUANTIZERS
    assert all(0 <= at <= row.type_size - 2 for at in row.f16_fields)
    assert len({at // 2 for at in row.f16_fields}) == len(row.f16_fields)  # distinct, not overlapping
    if row.block_size == 1 or row.qtype in NOT_A_WEIGHT:
        assert row.pack is None
        return
    spec = row.pack
    assert spec is not None, f"{row.qtype.name} needs a PackSpec to be multiplied"
    assert spec.fmt in simd.BLOCK_BYTES and 32 // spec.group == simd.GROUPS[spec.fmt]
    assert row.block_size % 32 == 0 and spec.offset <= STORED_MAX[spec.fmt]
    assert bool(spec.copy) != (spec.decode is not None), "exactly one of copy and decode"
    if spec.copy:  # the block already is a packed block: scale (and min) are its f16 fields
        assert row.block_size == 32 and spec.group == 32
        assert sum(b - a for a, b in spec.copy) == simd.BLOCK_BYTES[spec.fmt]
        assert len(row.f16_fields) == 1 + spec.has_min


@pytest.mark.parametrize("row", [r for r in ROWS if r.pack is not None and r.pack.decode], ids=lambda r: r.qtype.name)
def test_pack_decoders_fit_their_packed_format(row):
    spec = row.pack
    n = 5
    dec = spec.decode(random_blocks(row, n, np.random.default_rng(int(row.qtype))))
    assert isinstance(dec, Decoded)
    assert dec.q.shape == (n, row.block_size) and dec.q.dtype == np.uint8
    assert int(dec.q.max()) <= STORED_MAX[spec.fmt]
    assert dec.scale.shape == (n, row.block_size // spec.group) and dec.scale.dtype == np.int8
    assert dec.d.shape == (n, 1) and dec.d.dtype == np.float32
    assert (dec.min is not None) == (dec.dmin is not None) == spec.has_min
    if spec.has_min:
        assert dec.min.shape == dec.scale.shape and dec.min.dtype == np.int8
        assert dec.dmin.shape == dec.d.shape and dec.dmin.dtype == np.float32


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.qtype.name)
def test_block_decoder_equals_reference(row):
    """Every row's compiled decoder against its NumPy reference, bit for bit, serial and parallel."""
    rng = np.random.default_rng(int(row.qtype))
    for n_blocks in (3, dequant.PARALLEL_MIN_ELEMENTS // row.block_size + 1):
        raw = random_blocks(row, n_blocks, rng)
        shape = (n_blocks * row.block_size,)
        with np.errstate(over="ignore", invalid="ignore"):  # F32 and Q8_K's f32 scale: any bits, NaN and inf too
            want = quant_reference.dequantize(raw, row.qtype, shape)
        got = dequant.dequantize(raw, row.qtype, shape)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_kernel_tests_take_their_parameters_from_the_table():
    assert set(test_dequant.QUANTIZED) | {GGMLType.Q8_K} | DENSE_TYPES == SUPPORTED_TYPES
    assert test_matmul.QUANT_TYPES == sorted(PACKED_TYPES)
    assert test_matmul.DENSE_TYPES == sorted(DENSE_TYPES)
