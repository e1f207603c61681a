"""Every GGML type the engine computes with, declared once: `FORMATS`, one `QuantFormat` row per type.

A row ties together what the rest of the package needs to know about a format:

    qtype        the GGMLType (its block size and bytes per block come from kernels/qtypes.py)
    block        the Numba block decoder (blocks, i, out): block i of blocks (N, type_size) uint8 ->
                 out[i] (block_size,) float32
    f16_fields   byte offsets of the f16 scales in a block (random test blocks keep them finite)
    pack         how the matmul stores it (`PackSpec`, kernels/matmul_pack.py), or None for the dense
                 float types (multiplied in float32) and Q8_K (an activation format, never a weight)

and everything else is derived from the table: the supported types (`SUPPORTED_TYPES`), the dequantize
drivers (`DRIVERS`, each compiled when its type is first used), the matmul types (`DENSE_TYPES`,
`PACKED_TYPES`), and the test parameters (tests/kernels/test_formats.py checks that every row is
complete). docs/quantization.md, "Adding a quant format", lists what a new row needs.

Each format's section below holds its block decoder and, for the K-quants, the NumPy decoder that turns
its blocks into the integer quants and float scales of the matmul layout (`PackSpec.decode`). The block
decoders are plain loops in the same float32 operation order as ggml's C reference (`dequantize_row_*`
in ggml-quants.c), so they are bit-exact with it and with `gguf.quants`. Numba has no float16, so halves
are widened by bit manipulation (`f16_to_f32`), exact for every value including subnormals, infinities
and NaN payloads. Integers are read with `int(...)` so the kernels compute the same with
NUMBA_DISABLE_JIT=1 (NumPy scalars would wrap in uint8). Layout diagrams: docs/quantization.md and the
readable NumPy decoders of tests/kernels/quant_reference.py (the spec these are tested against).

Shape letters: N blocks, E weights per block (block_size), S scales per block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from kawai.kernels import isa  # noqa: F401  (before any @njit: it fixes Numba's target, kernels/isa.py)
from kawai.kernels.qtypes import GGMLType

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
def _u32_at(b, i):
    """The little-endian uint32 in b[i:i+4], as an int."""
    return int(b[i]) | (int(b[i + 1]) << 8) | (int(b[i + 2]) << 16) | (int(b[i + 3]) << 24)


@njit(cache=True)
def _f32_at(b, i):
    """The little-endian float32 in b[i:i+4]."""
    return np.uint32(_u32_at(b, i)).view(np.float32)


@njit(cache=True)
def _five_bit_pair(b, qs_at, qh, j):
    """Q5_0/Q5_1 quants j and j + 16 (0..31): the nibbles of byte qs_at + j, bit 4 from bits j and j + 16
    of the u32 `qh`."""
    q = int(b[qs_at + j])
    return (q & 0x0F) | (((qh >> j) & 1) << 4), (q >> 4) | (((qh >> (j + 16)) & 1) << 4)


@njit(cache=True)
def _i8(byte):
    """A byte read as int8."""
    return (int(byte) ^ 0x80) - 0x80


def scale_min_k4(b, at, j):
    """Six-bit scale and min of sub-block j (0..7) from the 12 packed bytes at b[at:at+12] (Q4_K, Q5_K;
    ggml's get_scale_min_k4). Sub-block j < 4: low 6 bits of bytes j and j+4; j >= 4: a nibble of byte
    j+4 plus the top 2 bits of bytes j-4 (scale) and j (min) -- the trap: not the other way round.

    b[k] is byte k: of one block in the Numba kernels (`_scale_min_k4`, compiled from this source), or of
    every block at once in NumPy (b = blocks.T, rows of N bytes; `unpack_scale_min_k4`). np.int64 widens
    a byte and an array of bytes alike (as `int` would in the kernels), so both compute the same."""
    i64 = np.int64
    if j < 4:
        return i64(b[at + j]) & 63, i64(b[at + j + 4]) & 63
    return ((i64(b[at + j + 4]) & 0x0F) | ((i64(b[at + j - 4]) >> 6) << 4),
            (i64(b[at + j + 4]) >> 4) | ((i64(b[at + j]) >> 6) << 4))


_scale_min_k4 = njit(cache=True)(scale_min_k4)  # the kernels' compiled copy of the one definition


def unpack_scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 12) packed bytes -> 8 six-bit scales and 8 six-bit mins, each (N, 8) int64."""
    pairs = [scale_min_k4(packed.T, 0, j) for j in range(8)]
    return np.stack([sc for sc, _ in pairs], axis=1), np.stack([mn for _, mn in pairs], axis=1)


# --- NumPy helpers of the pack decoders: blocks (N, type_size) uint8 -> integer quants and scales ------


@dataclass(frozen=True)
class Decoded:
    """One K-quant's super-blocks as integers: the stored quants q (N, E) uint8 (the signed quant + the
    format's offset), the integer sub-block scales (N, S) int8 and the super-block's float scale d (N, 1)
    float32, and the same pair for the mins (None without mins). Group g's scale is d * scale[:, g] and
    its min dmin * min[:, g], each one float32 product, as ggml's dequantizers compute them."""

    q: np.ndarray
    scale: np.ndarray
    d: np.ndarray
    min: np.ndarray | None = None
    dmin: np.ndarray | None = None


def _bits(blocks: np.ndarray, byte_index: np.ndarray, shift: np.ndarray, mask: int) -> np.ndarray:
    """(blocks[:, byte_index] >> shift) & mask, as uint8 (N, len(byte_index)): element e of a block is in
    byte byte_index[e] at bit shift[e]."""
    picked = np.take(blocks, byte_index, axis=1)
    picked >>= shift.astype(np.uint8)
    picked &= np.uint8(mask)
    return picked


def f16_bits(blocks: np.ndarray, at: int) -> np.ndarray:
    """The little-endian half at byte `at` of each block, as float16 (N, 1)."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view("<f2")


def f16_field(blocks: np.ndarray, at: int) -> np.ndarray:
    """The little-endian half at byte `at` of each block, as float32 (N, 1)."""
    return f16_bits(blocks, at).astype(F32)


_E256 = np.arange(256)
_G16 = np.arange(16)
# Q2_K/Q3_K/Q6_K 2-bit planes: element e sits in byte (e // 128) * 32 + e % 32, at bit 2 * ((e % 128) // 32).
_PLANE2_BYTE = (_E256 // 128) * 32 + _E256 % 32
_PLANE2_SHIFT = 2 * ((_E256 % 128) // 32)
# 1-bit high plane (Q3_K hmask, Q5_K qh): element e in byte e % 32, bit e // 32.
_PLANE1_BYTE = _E256 % 32
_PLANE1_SHIFT = _E256 // 32
# Q4_K/Q5_K nibbles: element e in byte (e // 64) * 32 + e % 32, low nibble for even 32-runs, high for odd.
_NIBBLE_BYTE = (_E256 // 64) * 32 + _E256 % 32
_NIBBLE_SHIFT = 4 * ((_E256 // 32) % 2)


# --- plain floats: one weight per "block" -----------------------------------------------------------


@njit(cache=True)
def _f16_block(blocks, i, out):  # indexed in place, not sliced: the drivers' loop then vectorizes
    out[i, 0] = f16_to_f32(blocks[i, 0], blocks[i, 1])


@njit(cache=True)
def _bf16_block(blocks, i, out):
    out[i, 0] = bf16_to_f32(blocks[i, 0], blocks[i, 1])


# --- 32-weight blocks: their bytes already are a packed matmul format, so repacking copies them ------


@njit(cache=True)
def _q4_0_block(blocks, i, out):  # d f16 | qs[16]: byte j = q[j] | q[j+16] << 4;  x = d * (q - 8)
    b, y = blocks[i], out[i]  # (type_size,), (block_size,)
    d = f16_to_f32(b[0], b[1])
    for j in range(16):
        q = int(b[2 + j])
        y[j] = d * F32((q & 0x0F) - 8)
        y[j + 16] = d * F32((q >> 4) - 8)


@njit(cache=True)
def _q4_1_block(blocks, i, out):  # d f16 | m f16 | qs[16];  x = d * q + m
    b, y = blocks[i], out[i]  # (type_size,), (block_size,)
    d = f16_to_f32(b[0], b[1])
    m = f16_to_f32(b[2], b[3])
    for j in range(16):
        q = int(b[4 + j])
        y[j] = d * F32(q & 0x0F) + m
        y[j + 16] = d * F32(q >> 4) + m


@njit(cache=True)
def _q5_0_block(blocks, i, out):  # d f16 | qh u32 (bit j: bit 4 of q[j]) | qs[16];  x = d * (q - 16)
    b, y = blocks[i], out[i]  # (type_size,), (block_size,)
    d = f16_to_f32(b[0], b[1])
    qh = _u32_at(b, 2)
    for j in range(16):
        lo, hi = _five_bit_pair(b, 6, qh, j)
        y[j] = d * F32(lo - 16)
        y[j + 16] = d * F32(hi - 16)


@njit(cache=True)
def _q5_1_block(blocks, i, out):  # d f16 | m f16 | qh u32 | qs[16];  x = d * q + m
    b, y = blocks[i], out[i]  # (type_size,), (block_size,)
    d = f16_to_f32(b[0], b[1])
    m = f16_to_f32(b[2], b[3])
    qh = _u32_at(b, 4)
    for j in range(16):
        lo, hi = _five_bit_pair(b, 8, qh, j)
        y[j] = d * F32(lo) + m
        y[j + 16] = d * F32(hi) + m


@njit(cache=True)
def _q8_0_block(blocks, i, out):  # d f16 | qs: int8[32];  x = d * q
    b, y = blocks[i], out[i]  # (type_size,), (block_size,)
    d = f16_to_f32(b[0], b[1])
    for j in range(32):
        y[j] = d * F32(_i8(b[2 + j]))


# --- 256-weight super-blocks (k-quants): decoded and re-encoded for the matmul ------------------------


@njit(cache=True)
def _q2_k_block(blocks, i, out):  # scales[16] (sc | m << 4) | qs[64] | d f16 | dmin f16
    b, y = blocks[i], out[i]  # (type_size,), (block_size,)
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


def _q2_k_pack(b: np.ndarray) -> Decoded:
    q = _bits(b, 16 + _PLANE2_BYTE, _PLANE2_SHIFT, 3)
    d, dmin = f16_field(b, 80), f16_field(b, 82)
    sc = b[:, 0:16]
    return Decoded(q, (sc & 15).astype(np.int8), d, (sc >> 4).astype(np.int8), -dmin)


@njit(cache=True)
def _q3_k_block(blocks, i, out):  # hmask[32] | qs[64] | scales[12] (16 six-bit, biased 32) | d f16
    b, y = blocks[i], out[i]  # (type_size,), (block_size,)
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


def _q3_k_pack(b: np.ndarray) -> Decoded:
    low2 = _bits(b, 32 + _PLANE2_BYTE, _PLANE2_SHIFT, 3)
    high = _bits(b, _PLANE1_BYTE, _PLANE1_SHIFT, 1)
    q = low2 | (high << 2)  # value low2 - 4 when the mask bit is 0, else low2: stored as value + 4
    sc_lo = _bits(b, 96 + _G16 % 8, 4 * (_G16 // 8), 15)
    sc_hi = _bits(b, 104 + _G16 % 4, 2 * (_G16 // 4), 3)
    sc = ((sc_lo | (sc_hi << 4)).astype(np.int16) - 32).astype(np.int8)
    return Decoded(q, sc, f16_field(b, 108))


@njit(cache=True)
def _k4_chunk_scales(b, d, dmin, c):
    """Q4_K/Q5_K chunk c (64 weights, sub-blocks 2c and 2c+1): scale d * sc and offset dmin * m of each."""
    sc0, m0 = _scale_min_k4(b, 4, 2 * c)
    sc1, m1 = _scale_min_k4(b, 4, 2 * c + 1)
    return d * F32(sc0), dmin * F32(m0), d * F32(sc1), dmin * F32(m1)


@njit(cache=True)
def _q4_k_block(blocks, i, out):  # d f16 | dmin f16 | scales[12] | qs[128]
    b, y = blocks[i], out[i]  # (type_size,), (block_size,)
    d = f16_to_f32(b[0], b[1])
    dmin = f16_to_f32(b[2], b[3])
    for c in range(4):  # chunks of 64: sub-blocks 2c (low nibbles) and 2c+1 (high nibbles)
        scale0, offset0, scale1, offset1 = _k4_chunk_scales(b, d, dmin, c)
        for l in range(32):
            q = int(b[16 + 32 * c + l])
            y[64 * c + l] = scale0 * F32(q & 0x0F) - offset0
            y[64 * c + 32 + l] = scale1 * F32(q >> 4) - offset1


def _q4_k_pack(b: np.ndarray) -> Decoded:
    q = _bits(b, 16 + _NIBBLE_BYTE, _NIBBLE_SHIFT, 15)
    sc, m = unpack_scale_min_k4(b[:, 4:16])
    d, dmin = f16_field(b, 0), f16_field(b, 2)
    return Decoded(q, sc.astype(np.int8), d, m.astype(np.int8), -dmin)


@njit(cache=True)
def _q5_k_block(blocks, i, out):  # d f16 | dmin f16 | scales[12] | qh[32] | qs[128] as Q4_K
    b, y = blocks[i], out[i]  # (type_size,), (block_size,)
    d = f16_to_f32(b[0], b[1])
    dmin = f16_to_f32(b[2], b[3])
    for c in range(4):
        scale0, offset0, scale1, offset1 = _k4_chunk_scales(b, d, dmin, c)
        for l in range(32):
            q = int(b[48 + 32 * c + l])
            qh = int(b[16 + l])
            q0 = (q & 0x0F) | (((qh >> (2 * c)) & 1) << 4)
            q1 = (q >> 4) | (((qh >> (2 * c + 1)) & 1) << 4)
            y[64 * c + l] = scale0 * F32(q0) - offset0
            y[64 * c + 32 + l] = scale1 * F32(q1) - offset1


def _q5_k_pack(b: np.ndarray) -> Decoded:
    q = _bits(b, 48 + _NIBBLE_BYTE, _NIBBLE_SHIFT, 15) | (_bits(b, 16 + _PLANE1_BYTE, _PLANE1_SHIFT, 1) << 4)
    sc, m = unpack_scale_min_k4(b[:, 4:16])
    d, dmin = f16_field(b, 0), f16_field(b, 2)
    return Decoded(q, sc.astype(np.int8), d, m.astype(np.int8), -dmin)


@njit(cache=True)
def _q6_k_block(blocks, i, out):  # ql[128] | qh[64] | scales: int8[16] | d f16;  x = d * sc * (q - 32)
    b, y = blocks[i], out[i]  # (type_size,), (block_size,)
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


def _q6_k_pack(b: np.ndarray) -> Decoded:
    # Low 4 bits: byte (e // 128) * 64 + e % 64, nibble (e % 128) // 64; high 2 bits: the 2-bit plane.
    low4 = _bits(b, (_E256 // 128) * 64 + _E256 % 64, 4 * ((_E256 % 128) // 64), 15)
    q = low4 | (_bits(b, 128 + _PLANE2_BYTE, _PLANE2_SHIFT, 3) << 4)  # value + 32
    return Decoded(q, b[:, 192:208].view(np.int8), f16_field(b, 208))


@njit(cache=True)
def _q8_k_block(blocks, i, out):  # d f32 | qs: int8[256] | bsums: int16[16] (not needed to dequantize)
    b, y = blocks[i], out[i]  # (type_size,), (block_size,)
    d = _f32_at(b, 0)
    for j in range(256):
        y[j] = d * F32(_i8(b[4 + j]))


# --- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackSpec:
    """How a format is stored for the matmul kernels (kernels/matmul_pack.py):

        W[k] = scale[k // group] * (q[k] - offset) + min[k // group]

    `fmt` is the packed block format of kernels/matmul_simd.py ("s8", "u8", "u6", "u4", "u5"), `group`
    the weights per scale, `offset` the constant added to the signed quants to make them the stored
    unsigned ones, `has_min` whether there are mins. Exactly one of:
        `copy`    byte ranges of a block that, concatenated, are already the packed block (32-weight
                  formats; the scale, and the min if any, are the block's f16 fields in order, kept as
                  float16: scale[g] = f16 s[g])
        `decode`  blocks (N, type_size) -> Decoded (K-quants): the quants are re-encoded into `fmt`, the
                  scales kept as the format's int8 sub-scales and one float32 per super-block of 256
                  weights: scale[g] = d[g // (256 / group)] * s[g] (and the mins alike)."""

    fmt: str
    group: int
    offset: int
    has_min: bool
    copy: tuple[tuple[int, int], ...] = ()
    decode: Callable[[np.ndarray], Decoded] | None = None


@dataclass(frozen=True)
class QuantFormat:
    """One GGML type as the engine computes with it (see the module docstring)."""

    qtype: GGMLType
    block: Callable | None  # None for F32 only: its bytes are the values, dequantizing is a copy
    f16_fields: tuple[int, ...] = ()
    pack: PackSpec | None = None

    @property
    def block_size(self) -> int:
        return self.qtype.block_size

    @property
    def type_size(self) -> int:
        return self.qtype.type_size


_ROWS = (
    QuantFormat(GGMLType.F32, None),
    QuantFormat(GGMLType.F16, _f16_block),
    QuantFormat(GGMLType.BF16, _bf16_block),
    QuantFormat(GGMLType.Q4_0, _q4_0_block, (0,), PackSpec("u4", 32, 8, False, copy=((2, 18),))),
    QuantFormat(GGMLType.Q4_1, _q4_1_block, (0, 2), PackSpec("u4", 32, 0, True, copy=((4, 20),))),
    QuantFormat(GGMLType.Q5_0, _q5_0_block, (0,), PackSpec("u5", 32, 16, False, copy=((6, 22), (2, 6)))),
    QuantFormat(GGMLType.Q5_1, _q5_1_block, (0, 2), PackSpec("u5", 32, 0, True, copy=((8, 24), (4, 8)))),
    QuantFormat(GGMLType.Q8_0, _q8_0_block, (0,), PackSpec("s8", 32, 0, False, copy=((2, 34),))),
    QuantFormat(GGMLType.Q2_K, _q2_k_block, (80, 82), PackSpec("u8", 16, 0, True, decode=_q2_k_pack)),
    QuantFormat(GGMLType.Q3_K, _q3_k_block, (108,), PackSpec("u8", 16, 4, False, decode=_q3_k_pack)),
    QuantFormat(GGMLType.Q4_K, _q4_k_block, (0, 2), PackSpec("u4", 32, 0, True, decode=_q4_k_pack)),
    QuantFormat(GGMLType.Q5_K, _q5_k_block, (0, 2), PackSpec("u5", 32, 0, True, decode=_q5_k_pack)),
    QuantFormat(GGMLType.Q6_K, _q6_k_block, (208,), PackSpec("u6", 16, 32, False, decode=_q6_k_pack)),
    QuantFormat(GGMLType.Q8_K, _q8_k_block),  # f32 scale; the activation format of k-quant dot products
)
FORMATS: dict[GGMLType, QuantFormat] = {row.qtype: row for row in _ROWS}
SUPPORTED_TYPES = frozenset(FORMATS)  # the types this engine computes with; others are read but rejected
DENSE_TYPES = frozenset(t for t, row in FORMATS.items() if row.block_size == 1)  # multiplied in float32
PACKED_TYPES = frozenset(t for t, row in FORMATS.items() if row.pack is not None)  # quantized matmul


# --- the dequantize driver: blocks (N, type_size) uint8 -> out (N, E) float32 -----------------------
# One compiled driver per type, made from the table (`_make_driver`), so a model compiles only the types
# it uses. Small jobs (an embedding row) stay on the calling thread: a parallel launch costs more than
# dequantizing a few thousand weights.

PARALLEL_MIN_ELEMENTS = 1 << 16


def decode_block(type_id, blocks, i, out):
    """Block i of blocks (N, type_size) uint8 -> out[i] (block_size,) float32 by the block decoder of GGML
    type id `type_id`. (Plain Python here, for NUMBA_DISABLE_JIT=1; compiled code uses the overload below.)"""
    FORMATS[GGMLType(type_id)].block(blocks, i, out)


@overload(decode_block, prefer_literal=True, inline="always")
def _decode_block_jit(type_id, blocks, i, out):
    """In a driver `type_id` is a constant (a literal type), so the call is the format's decoder itself."""
    if not isinstance(type_id, types.IntegerLiteral):
        return None
    block = FORMATS[GGMLType(type_id.literal_value)].block

    def impl(type_id, blocks, i, out):
        block(blocks, i, out)

    return impl


def _make_driver(type_id: int):
    """The driver of one type. Numba types the captured int as a constant, so each driver is compiled,
    and cached, as if written out for its format alone. (Capturing the decoder itself would not cache:
    Numba keys a closure's cache entry on its captured values, and a jitted function pickles with a
    per-process id.)"""

    @njit(parallel=True, cache=True)
    def driver(blocks, out):
        if blocks.shape[0] * out.shape[1] < PARALLEL_MIN_ELEMENTS:
            for i in range(blocks.shape[0]):
                decode_block(type_id, blocks, i, out)
        else:  # (the prange index is a uint64: the decoder is compiled for it too; a cast to int64 cost speed)
            for i in prange(blocks.shape[0]):
                decode_block(type_id, blocks, i, out)

    return driver


def _copy_f32(blocks: np.ndarray, out: np.ndarray) -> None:
    out[:] = blocks.view("<f4")  # (N, 1): already float32, a copy is all it takes


# DRIVERS[qtype](blocks (N, type_size) uint8, out (N, block_size) float32): every supported type.
DRIVERS = {t: _copy_f32 if row.block is None else _make_driver(int(t)) for t, row in FORMATS.items()}
