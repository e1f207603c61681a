"""Repacking GGUF quant blocks into the structure-of-arrays layout the matmul kernels read.

Every supported format is rewritten at load time as integer quants plus float32 scales (and mins):

    w[r, k] = scale[r, k // g] * q[r, k] + min[r, k // g]       g = 32 (group) or 16 (K-quant subblocks)

Letters used in shape comments:
    R  rows (output features)     C  cols (input features)     B  = C // 32, blocks of 32
    G  groups per 32-block: 1 (one scale per 32 weights) or 2 (Q2_K, Q3_K, Q6_K: one per 16)

The integer quants of each format are picked out of the block bytes by one table per format: for
element e of a block, the byte that holds its bits and the shift (`_bits`). The tables follow the
block layouts in ../shared/docs/kernels.md and ggml's C code; the float results are bit-exact with
`gguf.quants.dequantize` (tests/test_matmul.py checks every format).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.qtypes import GGMLType

PACK_CHUNK_ROWS = 2048  # rows decoded at a time: bounds the temporaries of the NumPy gathers


@dataclass(frozen=True)
class Decoded:
    """One format's blocks as integers: q (N, E) int8, scale and min (N, E // g) float32 (min may be None)."""

    q: np.ndarray
    scale: np.ndarray
    min: np.ndarray | None


def _bits(blocks: np.ndarray, byte_index: np.ndarray, shift: np.ndarray, mask: int) -> np.ndarray:
    """(blocks[:, byte_index] >> shift) & mask, as int16 (N, len(byte_index))."""
    return (blocks[:, byte_index].astype(np.int16) >> shift.astype(np.int16)) & mask


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The little-endian half at byte `at` of each block, as float32 (N, 1)."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view("<f2").astype(np.float32)


def _i8(v: np.ndarray) -> np.ndarray:
    return v.astype(np.int8)


# --- 32-weight formats: one scale (and min) per block ---------------------------------------------

_E32 = np.arange(32)
_NIBBLE_BYTE = _E32 % 16  # element j in the low nibble of byte j, element j+16 in the high one
_NIBBLE_SHIFT = 4 * (_E32 // 16)
_QH_BYTE = _E32 // 8  # 5th bit of element j: bit j of a little-endian u32
_QH_SHIFT = _E32 % 8


def _q4_0(b: np.ndarray) -> Decoded:  # d:f16 | qs[16]
    q = _bits(b, 2 + _NIBBLE_BYTE, _NIBBLE_SHIFT, 15) - 8
    return Decoded(_i8(q), _f16(b, 0), None)


def _q4_1(b: np.ndarray) -> Decoded:  # d:f16 | m:f16 | qs[16]
    q = _bits(b, 4 + _NIBBLE_BYTE, _NIBBLE_SHIFT, 15)
    return Decoded(_i8(q), _f16(b, 0), _f16(b, 2))


def _q5_0(b: np.ndarray) -> Decoded:  # d:f16 | qh:u32 | qs[16]
    q = _bits(b, 6 + _NIBBLE_BYTE, _NIBBLE_SHIFT, 15) | (_bits(b, 2 + _QH_BYTE, _QH_SHIFT, 1) << 4)
    return Decoded(_i8(q - 16), _f16(b, 0), None)


def _q5_1(b: np.ndarray) -> Decoded:  # d:f16 | m:f16 | qh:u32 | qs[16]
    q = _bits(b, 8 + _NIBBLE_BYTE, _NIBBLE_SHIFT, 15) | (_bits(b, 4 + _QH_BYTE, _QH_SHIFT, 1) << 4)
    return Decoded(_i8(q), _f16(b, 0), _f16(b, 2))


def _q8_0(b: np.ndarray) -> Decoded:  # d:f16 | qs:i8[32]
    return Decoded(np.ascontiguousarray(b[:, 2:34]).view(np.int8), _f16(b, 0), None)


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
    return Decoded(_i8(q), d * (sc & 15).astype(np.float32), -(dmin * (sc >> 4).astype(np.float32)))


def _q3_k(b: np.ndarray) -> Decoded:  # hmask[32] | qs[64] | scales[12] (16 six-bit, biased 32) | d:f16
    low2 = _bits(b, 32 + _PLANE2_BYTE, _PLANE2_SHIFT, 3)
    high = _bits(b, _PLANE1_BYTE, _PLANE1_SHIFT, 1)
    q = low2 - 4 * (1 - high)  # the offset of 4 applies when the mask bit is 0
    sc_lo = _bits(b, 96 + _G16 % 8, 4 * (_G16 // 8), 15)
    sc_hi = _bits(b, 104 + _G16 % 4, 2 * (_G16 // 4), 3)
    sc = ((sc_lo | (sc_hi << 4)) - 32).astype(np.float32)
    return Decoded(_i8(q), _f16(b, 108) * sc, None)


def _q4_k(b: np.ndarray) -> Decoded:  # d:f16 | dmin:f16 | scales[12] | qs[128]
    # Element e: byte 16 + (e // 64) * 32 + e % 32, low nibble for even 32-runs, high for odd ones.
    q = _bits(b, 16 + (_E256 // 64) * 32 + _E256 % 32, 4 * ((_E256 // 32) % 2), 15)
    sc, m = _scale_min_k4(b, 4)
    d, dmin = _f16(b, 0), _f16(b, 2)
    return Decoded(_i8(q), d * sc.astype(np.float32), -(dmin * m.astype(np.float32)))


def _q5_k(b: np.ndarray) -> Decoded:  # d:f16 | dmin:f16 | scales[12] | qh[32] | qs[128]
    low4 = _bits(b, 48 + (_E256 // 64) * 32 + _E256 % 32, 4 * ((_E256 // 32) % 2), 15)
    q = low4 | (_bits(b, 16 + _PLANE1_BYTE, _PLANE1_SHIFT, 1) << 4)
    sc, m = _scale_min_k4(b, 4)
    d, dmin = _f16(b, 0), _f16(b, 2)
    return Decoded(_i8(q), d * sc.astype(np.float32), -(dmin * m.astype(np.float32)))


def _q6_k(b: np.ndarray) -> Decoded:  # ql[128] | qh[64] | scales:i8[16] | d:f16
    # Low 4 bits: byte (e // 128) * 64 + e % 64, nibble (e % 128) // 64; high 2 bits: the 2-bit plane.
    low4 = _bits(b, (_E256 // 128) * 64 + _E256 % 64, 4 * ((_E256 % 128) // 64), 15)
    q = (low4 | (_bits(b, 128 + _PLANE2_BYTE, _PLANE2_SHIFT, 3) << 4)) - 32
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    return Decoded(_i8(q), _f16(b, 208) * sc, None)


DECODERS = {
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
}
# Weights per scale: 16 for the K-quants with 16 sub-blocks, else 32.
GROUP_SIZE = {t: 16 if t in (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q6_K) else 32 for t in DECODERS}
HAS_MIN = frozenset({GGMLType.Q4_1, GGMLType.Q5_1, GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.Q5_K})


def decode_rows(raw: np.ndarray, qtype: GGMLType, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw rows (R, row_bytes) uint8 -> q (R, B, 32) int8, scale (R, B*G) f32, min (R, B*G) f32 (or (R, 0))."""
    decode = DECODERS[qtype]
    rows = raw.shape[0]
    per_block = qtype.block_size
    group = GROUP_SIZE[qtype]
    n_blocks32 = cols // 32
    n_groups = cols // group
    q = np.empty((rows, n_blocks32, 32), np.int8)  # (R, B, 32)
    scale = np.empty((rows, n_groups), np.float32)  # (R, B*G)
    mins = np.empty((rows, n_groups if qtype in HAS_MIN else 0), np.float32)
    for lo in range(0, rows, PACK_CHUNK_ROWS):
        hi = min(rows, lo + PACK_CHUNK_ROWS)
        blocks = np.asarray(raw[lo:hi]).reshape(-1, qtype.type_size)  # ((hi-lo) * cols/per_block, bytes)
        dec = decode(blocks)
        q[lo:hi] = dec.q.reshape(hi - lo, n_blocks32, 32)
        scale[lo:hi] = dec.scale.reshape(hi - lo, n_groups)
        if dec.min is not None:
            mins[lo:hi] = dec.min.reshape(hi - lo, n_groups)
        del blocks, dec
    assert per_block % group == 0
    return q, scale, mins
