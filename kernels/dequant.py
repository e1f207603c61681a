"""Numba dequantizers: raw GGUF tensor bytes -> float32, bit-exact with kernels/reference.py and gguf.quants.

Public:
    dequantize(raw, qtype, shape) -> float32 array of `shape`
    dequantize_rows(raw2d, qtype, row_lo, row_hi) -> (row_hi - row_lo, n_cols) float32
    dequantize_row_ids(raw2d, qtype, ids) -> (len(ids), n_cols) float32   (embedding lookup)
    f16_to_f32(lo, hi), bf16_to_f32(lo, hi) -> float32   (njit helpers: a 16-bit float from two bytes)

Each format has a block kernel `_<type>_block(b, y)`, b (type_size,) uint8 -> y (block_size,) float32,
written as plain loops in the same float32 operation order as ggml's C reference, and a driver that runs
it over all blocks (with `prange` for big jobs: run kernels.threads.configure_threads first). Numba has
no float16, so halves are widened by bit manipulation (`f16_to_f32`), exact for every value including
subnormals, infinities and NaN payloads.
Integers are read with `int(...)` so the kernels compute the same with NUMBA_DISABLE_JIT=1 (NumPy
scalars would wrap in uint8). Layout diagrams: kernels/reference.py and docs/quantization.md.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np
from numba import njit, prange

from kawai.kernels import isa  # noqa: F401  (before any @njit: it fixes Numba's target, kernels/isa.py)
from kawai.kernels.qtypes import GGMLType
from kawai.kernels.reference import as_blocks

F32 = np.float32


# --- scalar helpers ---------------------------------------------------------------------------------


@njit(cache=True)
def f16_to_f32(lo, hi):
    """The IEEE half stored little-endian in bytes (lo, hi), widened exactly to float32."""
    h = int(lo) | (int(hi) << 8)
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exp == 0x1F:  # inf / NaN: keep the payload, as NumPy and the C code do
        bits = sign | 0x7F800000 | (mant << 13)
    elif exp != 0:  # normal: rebias the exponent from 15 to 127
        bits = sign | ((exp + 112) << 23) | (mant << 13)
    elif mant == 0:  # +-0
        bits = sign
    else:  # subnormal half = mant * 2^-24: normalize into a float32 exponent
        e = 113
        while (mant & 0x400) == 0:
            mant <<= 1
            e -= 1
        bits = sign | (e << 23) | ((mant & 0x3FF) << 13)
    return np.uint32(bits).view(np.float32)


@njit(cache=True)
def bf16_to_f32(lo, hi):
    """The bfloat16 stored little-endian in bytes (lo, hi): the top half of a float32."""
    return np.uint32((int(lo) << 16) | (int(hi) << 24)).view(np.float32)


@njit(cache=True)
def _f32_at(b, i):
    """The little-endian float32 in b[i:i+4]."""
    bits = int(b[i]) | (int(b[i + 1]) << 8) | (int(b[i + 2]) << 16) | (int(b[i + 3]) << 24)
    return np.uint32(bits).view(np.float32)


@njit(cache=True)
def _i8(byte):
    """A byte read as int8."""
    return (int(byte) ^ 0x80) - 0x80


@njit(cache=True)
def _scale_min_k4(b, at, j):
    """Six-bit scale and min of sub-block j (0..7) from the 12 packed bytes b[at:at+12] (Q4_K, Q5_K)."""
    if j < 4:
        sc = int(b[at + j]) & 63
        mn = int(b[at + j + 4]) & 63
    else:
        sc = (int(b[at + j + 4]) & 0x0F) | ((int(b[at + j - 4]) >> 6) << 4)
        mn = (int(b[at + j + 4]) >> 4) | ((int(b[at + j]) >> 6) << 4)
    return sc, mn


# --- block kernels: b (type_size,) uint8 -> y (block_size,) float32 ---------------------------------


@njit(cache=True)
def _q4_0_block(b, y):
    d = f16_to_f32(b[0], b[1])
    for j in range(16):
        q = int(b[2 + j])
        y[j] = d * F32((q & 0x0F) - 8)
        y[j + 16] = d * F32((q >> 4) - 8)


@njit(cache=True)
def _q4_1_block(b, y):
    d = f16_to_f32(b[0], b[1])
    m = f16_to_f32(b[2], b[3])
    for j in range(16):
        q = int(b[4 + j])
        y[j] = d * F32(q & 0x0F) + m
        y[j + 16] = d * F32(q >> 4) + m


@njit(cache=True)
def _q5_0_block(b, y):
    d = f16_to_f32(b[0], b[1])
    qh = int(b[2]) | (int(b[3]) << 8) | (int(b[4]) << 16) | (int(b[5]) << 24)
    for j in range(16):
        q = int(b[6 + j])
        lo = (q & 0x0F) | (((qh >> j) & 1) << 4)
        hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
        y[j] = d * F32(lo - 16)
        y[j + 16] = d * F32(hi - 16)


@njit(cache=True)
def _q5_1_block(b, y):
    d = f16_to_f32(b[0], b[1])
    m = f16_to_f32(b[2], b[3])
    qh = int(b[4]) | (int(b[5]) << 8) | (int(b[6]) << 16) | (int(b[7]) << 24)
    for j in range(16):
        q = int(b[8 + j])
        lo = (q & 0x0F) | (((qh >> j) & 1) << 4)
        hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
        y[j] = d * F32(lo) + m
        y[j + 16] = d * F32(hi) + m


@njit(cache=True)
def _q8_0_block(b, y):
    d = f16_to_f32(b[0], b[1])
    for j in range(32):
        y[j] = d * F32(_i8(b[2 + j]))


@njit(cache=True)
def _q2_k_block(b, y):
    d = f16_to_f32(b[80], b[81])
    dmin = f16_to_f32(b[82], b[83])
    for s in range(16):  # 16 sub-blocks of 16: element 128*h + 32*j + l, s = element // 16
        sc = int(b[s])
        scale = d * F32(sc & 0x0F)
        offset = dmin * F32(sc >> 4)
        half, j, part = s // 8, (s % 8) // 2, s % 2
        for l in range(16):
            q = (int(b[16 + 32 * half + 16 * part + l]) >> (2 * j)) & 3
            y[16 * s + l] = scale * F32(q) - offset


@njit(cache=True)
def _q3_k_block(b, y):
    d = f16_to_f32(b[108], b[109])
    for s in range(16):
        low = (int(b[96 + s % 8]) >> (4 * (s // 8))) & 0x0F
        high = (int(b[104 + s % 4]) >> (2 * (s // 4))) & 3
        scale = d * F32((low | (high << 4)) - 32)
        half, j, part = s // 8, (s % 8) // 2, s % 2
        bit = s // 2  # hmask bit for elements 32*bit .. 32*bit + 31
        for l in range(16):
            k = 16 * part + l  # 0..31
            q = (int(b[32 + 32 * half + k]) >> (2 * j)) & 3
            offset = (((int(b[k]) >> bit) & 1) ^ 1) << 2  # 4 when the hmask bit is clear
            y[16 * s + l] = scale * F32(q - offset)


@njit(cache=True)
def _q4_k_block(b, y):
    d = f16_to_f32(b[0], b[1])
    dmin = f16_to_f32(b[2], b[3])
    for c in range(4):  # chunks of 64: sub-blocks 2c (low nibbles) and 2c+1 (high nibbles)
        sc0, m0 = _scale_min_k4(b, 4, 2 * c)
        sc1, m1 = _scale_min_k4(b, 4, 2 * c + 1)
        scale0, offset0 = d * F32(sc0), dmin * F32(m0)
        scale1, offset1 = d * F32(sc1), dmin * F32(m1)
        for l in range(32):
            q = int(b[16 + 32 * c + l])
            y[64 * c + l] = scale0 * F32(q & 0x0F) - offset0
            y[64 * c + 32 + l] = scale1 * F32(q >> 4) - offset1


@njit(cache=True)
def _q5_k_block(b, y):
    d = f16_to_f32(b[0], b[1])
    dmin = f16_to_f32(b[2], b[3])
    for c in range(4):
        sc0, m0 = _scale_min_k4(b, 4, 2 * c)
        sc1, m1 = _scale_min_k4(b, 4, 2 * c + 1)
        scale0, offset0 = d * F32(sc0), dmin * F32(m0)
        scale1, offset1 = d * F32(sc1), dmin * F32(m1)
        for l in range(32):
            q = int(b[48 + 32 * c + l])
            qh = int(b[16 + l])
            q0 = (q & 0x0F) | (((qh >> (2 * c)) & 1) << 4)
            q1 = (q >> 4) | (((qh >> (2 * c + 1)) & 1) << 4)
            y[64 * c + l] = scale0 * F32(q0) - offset0
            y[64 * c + 32 + l] = scale1 * F32(q1) - offset1


@njit(cache=True)
def _q6_k_block(b, y):
    d = f16_to_f32(b[208], b[209])
    for half in range(2):  # weights 128*half + 32*j + l, j = 0..3: four weights per (ql, qh) byte pair
        ql, qh, sc, out = 64 * half, 128 + 32 * half, 192 + 8 * half, 128 * half
        for part in range(2):  # l in 16*part .. 16*part+15: sub-blocks 2j + part, each with an int8 scale
            scale0 = d * F32(_i8(b[sc + part]))
            scale1 = d * F32(_i8(b[sc + part + 2]))
            scale2 = d * F32(_i8(b[sc + part + 4]))
            scale3 = d * F32(_i8(b[sc + part + 6]))
            for l in range(16 * part, 16 * part + 16):
                a, c, h = int(b[ql + l]), int(b[ql + 32 + l]), int(b[qh + l])
                y[out + l] = scale0 * F32(((a & 0x0F) | ((h & 3) << 4)) - 32)
                y[out + 32 + l] = scale1 * F32(((c & 0x0F) | (((h >> 2) & 3) << 4)) - 32)
                y[out + 64 + l] = scale2 * F32(((a >> 4) | (((h >> 4) & 3) << 4)) - 32)
                y[out + 96 + l] = scale3 * F32(((c >> 4) | (((h >> 6) & 3) << 4)) - 32)


@njit(cache=True)
def _q8_k_block(b, y):
    d = _f32_at(b, 0)
    for j in range(256):
        y[j] = d * F32(_i8(b[4 + j]))


# --- drivers: blocks (n_blocks, type_size) uint8 -> out (n_blocks, block_size) float32 --------------
# One per format so a model compiles only the formats it uses. Small jobs (an embedding row) stay on the
# calling thread: a parallel launch costs more than dequantizing a few thousand weights.

PARALLEL_MIN_ELEMENTS = 1 << 16


@njit(parallel=True, cache=True)
def _dequant_f16(blocks, out):
    # One weight per "block": index directly, a per-element block call would cost more than the work.
    if blocks.shape[0] < PARALLEL_MIN_ELEMENTS:
        for i in range(blocks.shape[0]):
            out[i, 0] = f16_to_f32(blocks[i, 0], blocks[i, 1])
    else:
        for i in prange(blocks.shape[0]):
            out[i, 0] = f16_to_f32(blocks[i, 0], blocks[i, 1])


@njit(parallel=True, cache=True)
def _dequant_bf16(blocks, out):
    # One weight per "block": index directly, a per-element block call would cost more than the work.
    if blocks.shape[0] < PARALLEL_MIN_ELEMENTS:
        for i in range(blocks.shape[0]):
            out[i, 0] = bf16_to_f32(blocks[i, 0], blocks[i, 1])
    else:
        for i in prange(blocks.shape[0]):
            out[i, 0] = bf16_to_f32(blocks[i, 0], blocks[i, 1])


@njit(parallel=True, cache=True)
def _dequant_q4_0(blocks, out):
    if blocks.shape[0] * out.shape[1] < PARALLEL_MIN_ELEMENTS:
        for i in range(blocks.shape[0]):
            _q4_0_block(blocks[i], out[i])
    else:
        for i in prange(blocks.shape[0]):
            _q4_0_block(blocks[i], out[i])


@njit(parallel=True, cache=True)
def _dequant_q4_1(blocks, out):
    if blocks.shape[0] * out.shape[1] < PARALLEL_MIN_ELEMENTS:
        for i in range(blocks.shape[0]):
            _q4_1_block(blocks[i], out[i])
    else:
        for i in prange(blocks.shape[0]):
            _q4_1_block(blocks[i], out[i])


@njit(parallel=True, cache=True)
def _dequant_q5_0(blocks, out):
    if blocks.shape[0] * out.shape[1] < PARALLEL_MIN_ELEMENTS:
        for i in range(blocks.shape[0]):
            _q5_0_block(blocks[i], out[i])
    else:
        for i in prange(blocks.shape[0]):
            _q5_0_block(blocks[i], out[i])


@njit(parallel=True, cache=True)
def _dequant_q5_1(blocks, out):
    if blocks.shape[0] * out.shape[1] < PARALLEL_MIN_ELEMENTS:
        for i in range(blocks.shape[0]):
            _q5_1_block(blocks[i], out[i])
    else:
        for i in prange(blocks.shape[0]):
            _q5_1_block(blocks[i], out[i])


@njit(parallel=True, cache=True)
def _dequant_q8_0(blocks, out):
    if blocks.shape[0] * out.shape[1] < PARALLEL_MIN_ELEMENTS:
        for i in range(blocks.shape[0]):
            _q8_0_block(blocks[i], out[i])
    else:
        for i in prange(blocks.shape[0]):
            _q8_0_block(blocks[i], out[i])


@njit(parallel=True, cache=True)
def _dequant_q2_k(blocks, out):
    if blocks.shape[0] * out.shape[1] < PARALLEL_MIN_ELEMENTS:
        for i in range(blocks.shape[0]):
            _q2_k_block(blocks[i], out[i])
    else:
        for i in prange(blocks.shape[0]):
            _q2_k_block(blocks[i], out[i])


@njit(parallel=True, cache=True)
def _dequant_q3_k(blocks, out):
    if blocks.shape[0] * out.shape[1] < PARALLEL_MIN_ELEMENTS:
        for i in range(blocks.shape[0]):
            _q3_k_block(blocks[i], out[i])
    else:
        for i in prange(blocks.shape[0]):
            _q3_k_block(blocks[i], out[i])


@njit(parallel=True, cache=True)
def _dequant_q4_k(blocks, out):
    if blocks.shape[0] * out.shape[1] < PARALLEL_MIN_ELEMENTS:
        for i in range(blocks.shape[0]):
            _q4_k_block(blocks[i], out[i])
    else:
        for i in prange(blocks.shape[0]):
            _q4_k_block(blocks[i], out[i])


@njit(parallel=True, cache=True)
def _dequant_q5_k(blocks, out):
    if blocks.shape[0] * out.shape[1] < PARALLEL_MIN_ELEMENTS:
        for i in range(blocks.shape[0]):
            _q5_k_block(blocks[i], out[i])
    else:
        for i in prange(blocks.shape[0]):
            _q5_k_block(blocks[i], out[i])


@njit(parallel=True, cache=True)
def _dequant_q6_k(blocks, out):
    if blocks.shape[0] * out.shape[1] < PARALLEL_MIN_ELEMENTS:
        for i in range(blocks.shape[0]):
            _q6_k_block(blocks[i], out[i])
    else:
        for i in prange(blocks.shape[0]):
            _q6_k_block(blocks[i], out[i])


@njit(parallel=True, cache=True)
def _dequant_q8_k(blocks, out):
    if blocks.shape[0] * out.shape[1] < PARALLEL_MIN_ELEMENTS:
        for i in range(blocks.shape[0]):
            _q8_k_block(blocks[i], out[i])
    else:
        for i in prange(blocks.shape[0]):
            _q8_k_block(blocks[i], out[i])


def _copy_f32(blocks: np.ndarray, out: np.ndarray) -> None:
    out[:] = blocks.view("<f4")  # (n, 1): already float32, a copy is all it takes


_DRIVERS: dict[GGMLType, Callable[[np.ndarray, np.ndarray], None]] = {
    GGMLType.F32: _copy_f32,
    GGMLType.F16: _dequant_f16,
    GGMLType.BF16: _dequant_bf16,
    GGMLType.Q4_0: _dequant_q4_0,
    GGMLType.Q4_1: _dequant_q4_1,
    GGMLType.Q5_0: _dequant_q5_0,
    GGMLType.Q5_1: _dequant_q5_1,
    GGMLType.Q8_0: _dequant_q8_0,
    GGMLType.Q2_K: _dequant_q2_k,
    GGMLType.Q3_K: _dequant_q3_k,
    GGMLType.Q4_K: _dequant_q4_k,
    GGMLType.Q5_K: _dequant_q5_k,
    GGMLType.Q6_K: _dequant_q6_k,
    GGMLType.Q8_K: _dequant_q8_k,
}


# --- public API -------------------------------------------------------------------------------------


def dequantize(raw: np.ndarray, qtype: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """Raw tensor bytes (uint8, any shape; e.g. GGUFFile.tensor_data) -> a new float32 array of `shape`.

    `shape` is in NumPy order (TensorInfo.shape). Raises ValueError for an unsupported type or a byte
    count that does not match the shape.
    """
    blocks = as_blocks(raw, qtype, shape).view()  # (n_blocks, type_size)
    blocks.flags.writeable = False  # one compiled specialization for memmaps and in-memory arrays alike
    qtype = GGMLType(qtype)
    out = np.empty((blocks.shape[0], qtype.block_size), dtype=F32)  # (n_blocks, block_size)
    _DRIVERS[qtype](blocks, out)
    return out.reshape(tuple(operator.index(n) for n in shape))


def _row_layout(raw2d: np.ndarray, qtype: GGMLType) -> tuple[GGMLType, int]:
    """Validate a (rows, row_bytes) uint8 tensor; return (qtype, n_cols)."""
    try:
        qtype = GGMLType(qtype)
    except ValueError:
        raise ValueError(f"unknown ggml type id {qtype!r}") from None
    ndim = getattr(raw2d, "ndim", None)
    if ndim != 2:
        raise ValueError(f"raw rows must be a 2-D (rows, row_bytes) uint8 array, got ndim={ndim}")
    row_bytes = int(raw2d.shape[1])
    if row_bytes == 0 or row_bytes % qtype.type_size:
        raise ValueError(
            f"row of {row_bytes} bytes is not a whole number of {qtype.name} blocks ({qtype.type_size} bytes)"
        )
    return qtype, row_bytes // qtype.type_size * qtype.block_size


def dequantize_rows(raw2d: np.ndarray, qtype: GGMLType, row_lo: int, row_hi: int) -> np.ndarray:
    """Rows row_lo..row_hi-1 of a (rows, row_bytes) tensor -> (row_hi - row_lo, n_cols) float32."""
    qtype, n_cols = _row_layout(raw2d, qtype)
    lo, hi = operator.index(row_lo), operator.index(row_hi)
    if not 0 <= lo <= hi <= raw2d.shape[0]:
        raise ValueError(f"row range {lo}..{hi} is outside 0..{raw2d.shape[0]}")
    if lo == hi:
        return np.empty((0, n_cols), dtype=F32)
    return dequantize(raw2d[lo:hi], qtype, (hi - lo, n_cols))


def dequantize_row_ids(raw2d: np.ndarray, qtype: GGMLType, ids) -> np.ndarray:
    """Rows `ids` (1-D ints, e.g. token ids) of a (rows, row_bytes) tensor -> (len(ids), n_cols) float32."""
    qtype, n_cols = _row_layout(raw2d, qtype)
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(f"row ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if ids.size == 0:
        return np.empty((0, n_cols), dtype=F32)
    lowest, highest = int(ids.min()), int(ids.max())
    if lowest < 0 or highest >= raw2d.shape[0]:
        raise ValueError(f"row ids must be in 0..{raw2d.shape[0] - 1}, got {lowest}..{highest}")
    return dequantize(np.asarray(raw2d)[ids], qtype, (ids.size, n_cols))
