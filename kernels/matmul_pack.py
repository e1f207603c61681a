"""Repacking GGUF quant blocks, once at load time, into the structure-of-arrays layout of the matmul kernels.

Each format becomes integer quants q and float32 scales (and mins) per group of g weights (g = 32, or 16
for the K-quants with 16 sub-blocks), bit-exact with `gguf.quants.dequantize`:

    w[r, k] = scale[r, k // g] * q[r, k] + min[r, k // g]

with q + offset stored in one of the packed block formats of kernels/matmul_simd.py ("s8", "u8", "u4",
"u5"; `PACK_SPECS`): unsigned (except Q8_0) and as narrow as the format allows. The 32-weight formats
already hold their quants that way, so their bytes are only reordered (`_DIRECT`); the K-quants are
decoded (`DECODERS`) and re-encoded (`encode_blocks`).

Letters used in shape comments:
    R  rows (output features)     C  cols (input features)     B  = C // 32 blocks of 32
    G  scales per block (1, or 2 with g = 16)                   P  bytes per packed block

The integer quants of each format are picked out of the block bytes by index tables: for element e of
a block, the byte that holds its bits and the shift (`_bits`). The tables follow the block layouts in
../shared/docs/kernels.md and ggml's C code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kawai.kernels.matmul_simd import BLOCK_BYTES
from kawai.kernels.qtypes import GGMLType

PACK_CHUNK_ROWS = 2048  # rows decoded at a time: bounds the temporaries of the NumPy gathers


@dataclass(frozen=True)
class Decoded:
    """One format's blocks as integers: the stored quants q (N, E) uint8 (the signed quant + the format's
    offset), scale and min (N, E // g) float32 (min may be None)."""

    q: np.ndarray
    scale: np.ndarray
    min: np.ndarray | None


def _bits(blocks: np.ndarray, byte_index: np.ndarray, shift: np.ndarray, mask: int) -> np.ndarray:
    """(blocks[:, byte_index] >> shift) & mask, as uint8 (N, len(byte_index))."""
    picked = np.take(blocks, byte_index, axis=1)
    picked >>= shift.astype(np.uint8)
    picked &= np.uint8(mask)
    return picked


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The little-endian half at byte `at` of each block, as float32 (N, 1)."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view("<f2").astype(np.float32)


# --- 32-weight formats: their bytes already are a packed format, in another order ----------------

# (byte ranges of a block that, concatenated, form the packed block; offset of d; offset of m or None)
_DIRECT = {
    GGMLType.Q4_0: ([(2, 18)], 0, None),  # d | qs[16]            -> "u4" qs
    GGMLType.Q4_1: ([(4, 20)], 0, 2),  # d | m | qs[16]           -> "u4" qs
    GGMLType.Q5_0: ([(6, 22), (2, 6)], 0, None),  # d | qh | qs[16] -> "u5" qs | qh
    GGMLType.Q5_1: ([(8, 24), (4, 8)], 0, 2),  # d | m | qh | qs[16] -> "u5" qs | qh
    GGMLType.Q8_0: ([(2, 34)], 0, None),  # d | qs:i8[32]          -> "s8" qs
}


# --- K-quants: 256-weight super-blocks with 8 or 16 sub-block scales -----------------------------

_E256 = np.arange(256)
_G16 = np.arange(16)
# Q2_K/Q3_K/Q6_K 2-bit planes: element e sits in byte (e // 128) * 32 + e % 32, at bit 2 * ((e % 128) // 32).
_PLANE2_BYTE = (_E256 // 128) * 32 + _E256 % 32
_PLANE2_SHIFT = 2 * ((_E256 % 128) // 32)
# 1-bit high plane (Q3_K hmask, Q5_K qh): element e in byte e % 32, bit e // 32.
_PLANE1_BYTE = _E256 % 32
_PLANE1_SHIFT = _E256 // 32


def _scale_min_k4(b: np.ndarray, at: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 6-bit (scale, min) pairs of the 8 sub-blocks from the 12 bytes at `at` (llama.cpp's
    get_scale_min_k4). Sub-block j < 4: low 6 bits of bytes j and j+4; j >= 4: a nibble of byte j+4
    plus the top 2 bits of bytes j-4 (scale) and j (min)."""
    s = b[:, at : at + 12].astype(np.int16)
    lo_sc, lo_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_sc = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    hi_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return np.concatenate([lo_sc, hi_sc], axis=1), np.concatenate([lo_m, hi_m], axis=1)


def _q2_k(b: np.ndarray) -> Decoded:  # scales[16] (lo: scale, hi: min) | qs[64] | d:f16 | dmin:f16
    q = _bits(b, 16 + _PLANE2_BYTE, _PLANE2_SHIFT, 3)
    d, dmin = _f16(b, 80), _f16(b, 82)
    sc = b[:, 0:16]
    return Decoded(q, d * (sc & 15).astype(np.float32), -(dmin * (sc >> 4).astype(np.float32)))


def _q3_k(b: np.ndarray) -> Decoded:  # hmask[32] | qs[64] | scales[12] (16 six-bit, biased 32) | d:f16
    low2 = _bits(b, 32 + _PLANE2_BYTE, _PLANE2_SHIFT, 3)
    high = _bits(b, _PLANE1_BYTE, _PLANE1_SHIFT, 1)
    q = low2 | (high << 2)  # value low2 - 4 when the mask bit is 0, else low2: stored as value + 4
    sc_lo = _bits(b, 96 + _G16 % 8, 4 * (_G16 // 8), 15)
    sc_hi = _bits(b, 104 + _G16 % 4, 2 * (_G16 // 4), 3)
    sc = ((sc_lo | (sc_hi << 4)).astype(np.int16) - 32).astype(np.float32)
    return Decoded(q, _f16(b, 108) * sc, None)


def _q4_k(b: np.ndarray) -> Decoded:  # d:f16 | dmin:f16 | scales[12] | qs[128]
    # Element e: byte 16 + (e // 64) * 32 + e % 32, low nibble for even 32-runs, high for odd ones.
    q = _bits(b, 16 + (_E256 // 64) * 32 + _E256 % 32, 4 * ((_E256 // 32) % 2), 15)
    sc, m = _scale_min_k4(b, 4)
    d, dmin = _f16(b, 0), _f16(b, 2)
    return Decoded(q, d * sc.astype(np.float32), -(dmin * m.astype(np.float32)))


def _q5_k(b: np.ndarray) -> Decoded:  # d:f16 | dmin:f16 | scales[12] | qh[32] | qs[128]
    low4 = _bits(b, 48 + (_E256 // 64) * 32 + _E256 % 32, 4 * ((_E256 // 32) % 2), 15)
    q = low4 | (_bits(b, 16 + _PLANE1_BYTE, _PLANE1_SHIFT, 1) << 4)
    sc, m = _scale_min_k4(b, 4)
    d, dmin = _f16(b, 0), _f16(b, 2)
    return Decoded(q, d * sc.astype(np.float32), -(dmin * m.astype(np.float32)))


def _q6_k(b: np.ndarray) -> Decoded:  # ql[128] | qh[64] | scales:i8[16] | d:f16
    # Low 4 bits: byte (e // 128) * 64 + e % 64, nibble (e % 128) // 64; high 2 bits: the 2-bit plane.
    low4 = _bits(b, (_E256 // 128) * 64 + _E256 % 64, 4 * ((_E256 % 128) // 64), 15)
    q = low4 | (_bits(b, 128 + _PLANE2_BYTE, _PLANE2_SHIFT, 3) << 4)  # value + 32
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    return Decoded(q, _f16(b, 208) * sc, None)


DECODERS = {
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
}


@dataclass(frozen=True)
class PackSpec:
    """How a format is stored for the kernels: `fmt` (kernels/matmul_simd.py), weights per scale, and the
    constant added to the signed quants to make them the unsigned stored ones."""

    fmt: str
    group: int
    offset: int
    has_min: bool


PACK_SPECS = {
    GGMLType.Q4_0: PackSpec("u4", 32, 8, False),
    GGMLType.Q4_1: PackSpec("u4", 32, 0, True),
    GGMLType.Q5_0: PackSpec("u5", 32, 16, False),
    GGMLType.Q5_1: PackSpec("u5", 32, 0, True),
    GGMLType.Q8_0: PackSpec("s8", 32, 0, False),
    GGMLType.Q2_K: PackSpec("u8", 16, 0, True),
    GGMLType.Q3_K: PackSpec("u8", 16, 4, False),
    GGMLType.Q4_K: PackSpec("u4", 32, 0, True),
    GGMLType.Q5_K: PackSpec("u5", 32, 0, True),
    GGMLType.Q6_K: PackSpec("u8", 16, 32, False),
}


def encode_blocks(u: np.ndarray, fmt: str) -> np.ndarray:
    """Stored quants (N, 32) -> packed bytes (N, BLOCK_BYTES[fmt]) uint8.

    "s8"/"u8": the bytes themselves; "u4": element j in the low nibble of byte j and element j + 16 in
    its high nibble; "u5": those nibbles, then a little-endian u32 whose bit j is bit 4 of element j."""
    if fmt in ("s8", "u8"):
        return u
    nibbles = (u[:, :16] & 15) | ((u[:, 16:] & 15) << 4)
    if fmt == "u4":
        return nibbles
    high = ((u >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    bits = np.bitwise_or.reduce(high, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)
    return np.concatenate([nibbles, bits], axis=1)


def repack_rows(raw: np.ndarray, qtype: GGMLType, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw rows (R, row_bytes) -> w (R, B*P) uint8, scales (R, B*G) f32, mins (R, B*G) f32 or (R, 0)."""
    spec = PACK_SPECS[qtype]
    rows = raw.shape[0]
    n_blocks = cols // 32
    n_groups = cols // spec.group
    block_bytes = BLOCK_BYTES[spec.fmt]
    w = np.empty((rows, n_blocks * block_bytes), np.uint8)  # (R, B*P)
    scales = np.empty((rows, n_groups), np.float32)  # (R, B*G)
    mins = np.empty((rows, n_groups if spec.has_min else 0), np.float32)
    for lo in range(0, rows, PACK_CHUNK_ROWS):
        hi = min(rows, lo + PACK_CHUNK_ROWS)
        blocks = np.asarray(raw[lo:hi]).reshape(-1, qtype.type_size)  # ((hi-lo)*B, type_size)
        if qtype in _DIRECT:
            ranges, d_at, m_at = _DIRECT[qtype]
            w[lo:hi] = np.concatenate([blocks[:, a:b] for a, b in ranges], axis=1).reshape(hi - lo, -1)
            scales[lo:hi] = _f16(blocks, d_at).reshape(hi - lo, n_groups)
            if m_at is not None:
                mins[lo:hi] = _f16(blocks, m_at).reshape(hi - lo, n_groups)
            continue
        dec = DECODERS[qtype](blocks)
        w[lo:hi] = encode_blocks(dec.q.reshape(-1, 32), spec.fmt).reshape(hi - lo, -1)
        scales[lo:hi] = dec.scale.reshape(hi - lo, n_groups)
        if spec.has_min:
            mins[lo:hi] = dec.min.reshape(hi - lo, n_groups)
    return w, scales, mins
