"""Readable NumPy dequantizers, one per GGML format: the spec the fast kernels are tested against.

Test-only: the engine runs the Numba block decoders of kernels/formats.py; tests/kernels/test_formats.py checks
that every row of that table has its function here. Every function takes `blocks` (n_blocks, type_size)
uint8 and returns (n_blocks, block_size) float32.
All arithmetic is float32 in the same order as ggml's C reference (`dequantize_row_*` in ggml-quants.c),
so results are bit-exact with it and with `gguf.quants`. Layouts are little-endian; "f16" is an IEEE
half. docs/quantization.md explains each format at more length.

Shape letters: n = blocks, s = sub-blocks per block, l = weights per sub-block.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np

from kawai.kernels.dequant import as_blocks
from kawai.kernels.formats import unpack_scale_min_k4
from kawai.kernels.qtypes import GGMLType

F32 = np.float32


def _f16(fields: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 little-endian halves -> (n, 1) float32 (exact: every half is a float32)."""
    return np.ascontiguousarray(fields).view("<f2").astype(F32)


def _low_high_nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., l) packed bytes -> (..., 2, l): low nibbles first, then high nibbles."""
    return np.stack([qs & 0x0F, qs >> 4], axis=-2)


# --- plain floats ---------------------------------------------------------------------------------


def dequant_f32(blocks: np.ndarray) -> np.ndarray:
    """F32: one little-endian float32 per 4 bytes."""
    return np.ascontiguousarray(blocks).view("<f4").astype(F32)


def dequant_f16(blocks: np.ndarray) -> np.ndarray:
    """F16: one IEEE half per 2 bytes (sign 1, exponent 5, mantissa 10); widening is exact."""
    return _f16(blocks)


def dequant_bf16(blocks: np.ndarray) -> np.ndarray:
    """BF16: the top 16 bits of a float32 (sign 1, exponent 8, mantissa 7); widen by a 16-bit shift."""
    bits = np.ascontiguousarray(blocks).view("<u2").astype(np.uint32) << 16
    return bits.view(F32)


# --- 32-weight blocks -------------------------------------------------------------------------------


def dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0: 32 weights in 18 bytes, x = d * (q - 8), q in 0..15.

        0      2                                   18
        | d f16 | qs[16]: byte j = q[j] | q[j+16] << 4 |
    """
    d = _f16(blocks[:, 0:2])  # (n, 1)
    q = _low_high_nibbles(blocks[:, 2:18]).reshape(-1, 32).astype(np.int8) - np.int8(8)  # (n, 32)
    return d * q.astype(F32)


def dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1: 32 weights in 20 bytes, x = d * q + m, q in 0..15.

        0      2      4                                    20
        | d f16 | m f16 | qs[16]: byte j = q[j] | q[j+16] << 4 |
    """
    d = _f16(blocks[:, 0:2])
    m = _f16(blocks[:, 2:4])
    q = _low_high_nibbles(blocks[:, 4:20]).reshape(-1, 32).astype(F32)
    return d * q + m


def _five_bit_quants(qh_bytes: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 quants: low 4 bits from the nibbles, bit 4 of q[j] is bit j of the u32 `qh`."""
    qh = np.ascontiguousarray(qh_bytes).view("<u4")  # (n, 1)
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (n, 32)
    low = _low_high_nibbles(qs).reshape(-1, 32)  # (n, 32)
    return low | (high << 4)


def dequant_q5_0(blocks: np.ndarray) -> np.ndarray:
    """Q5_0: 32 weights in 22 bytes, x = d * (q - 16), q in 0..31.

        0      2            6                                     22
        | d f16 | qh u32 LE | qs[16]: low 4 bits, like Q4_0         |
        bit j of qh is bit 4 of q[j]
    """
    d = _f16(blocks[:, 0:2])
    q = _five_bit_quants(blocks[:, 2:6], blocks[:, 6:22]).astype(np.int8) - np.int8(16)
    return d * q.astype(F32)


def dequant_q5_1(blocks: np.ndarray) -> np.ndarray:
    """Q5_1: 32 weights in 24 bytes, x = d * q + m, q in 0..31.

        0      2      4            8                       24
        | d f16 | m f16 | qh u32 LE | qs[16]: low 4 bits      |
    """
    d = _f16(blocks[:, 0:2])
    m = _f16(blocks[:, 2:4])
    q = _five_bit_quants(blocks[:, 4:8], blocks[:, 8:24]).astype(F32)
    return d * q + m


def dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0: 32 weights in 34 bytes, x = d * q, q int8.

        0      2                  34
        | d f16 | qs: int8[32]     |
    """
    d = _f16(blocks[:, 0:2])
    q = np.ascontiguousarray(blocks[:, 2:34]).view(np.int8)
    return d * q.astype(F32)


# --- 256-weight super-blocks (k-quants) -------------------------------------------------------------


def _two_bit_planes(qs: np.ndarray) -> np.ndarray:
    """(n, 64) bytes -> (n, 256) 2-bit values: element 128*h + 32*j + l is bits 2j..2j+1 of byte 32*h + l."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


def dequant_q2_k(blocks: np.ndarray) -> np.ndarray:
    """Q2_K: 256 weights in 84 bytes; 16 sub-blocks of 16, each with a 4-bit scale and a 4-bit min.

        0                   16                  80      82         84
        | scales[16]         | qs[64]            | d f16 | dmin f16 |
        scales[s] = sc | m << 4             2-bit q, see _two_bit_planes
        x = (d * sc[s]) * q - (dmin * m[s]),  s = element // 16
    """
    sc = (blocks[:, 0:16] & 0x0F).astype(F32)  # (n, 16)
    mn = (blocks[:, 0:16] >> 4).astype(F32)
    q = _two_bit_planes(blocks[:, 16:80]).reshape(-1, 16, 16).astype(F32)  # (n, s, l)
    d = _f16(blocks[:, 80:82])
    dmin = _f16(blocks[:, 82:84])
    scale = (d * sc)[:, :, None]
    offset = (dmin * mn)[:, :, None]
    return (scale * q - offset).reshape(-1, 256)


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """(n, 12) bytes -> (n, 16) signed 6-bit scales (stored + 32).

    Scale k: low 4 bits = nibble k // 8 of byte k % 8; high 2 bits = bits 2*(k//4).. of byte 8 + k % 4.
    """
    k = np.arange(16)
    low = (packed[:, k % 8] >> (4 * (k // 8)).astype(np.uint8)) & 0x0F
    high = (packed[:, 8 + k % 4] >> (2 * (k // 4)).astype(np.uint8)) & 3
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def dequant_q3_k(blocks: np.ndarray) -> np.ndarray:
    """Q3_K: 256 weights in 110 bytes; 16 sub-blocks of 16 with signed 6-bit scales.

        0            32            96              108     110
        | hmask[32]   | qs[64]      | scales[12]     | d f16 |
        low 2 bits of q like Q2_K; bit 2 of element 32*b + l is bit b of hmask[l], b = 0..7
        x = (d * sc[s]) * (low - (hbit ? 0 : 4)),  s = element // 16
    """
    hbits = (blocks[:, 0:32].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    low = _two_bit_planes(blocks[:, 32:96]).astype(np.int8)  # (n, 256)
    q = low - ((hbits.reshape(-1, 256) ^ 1) << 2).astype(np.int8)
    sc = _q3_k_scales(blocks[:, 96:108]).astype(F32)  # (n, 16)
    d = _f16(blocks[:, 108:110])
    scale = (d * sc)[:, :, None]
    return (scale * q.reshape(-1, 16, 16).astype(F32)).reshape(-1, 256)


def dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    """Q4_K: 256 weights in 144 bytes; 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min.

        0      2         4             16                       144
        | d f16 | dmin f16 | scales[12] | qs[128]                 |
        byte 32*c + l of qs: low nibble = element 64*c + l, high nibble = element 64*c + 32 + l
        x = (d * sc[s]) * q - (dmin * m[s]),  s = element // 32
    """
    d = _f16(blocks[:, 0:2])
    dmin = _f16(blocks[:, 2:4])
    sc, mn = unpack_scale_min_k4(blocks[:, 4:16])  # (n, 8) each
    q = _low_high_nibbles(blocks[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 8, 32)  # (n, s, l)
    scale = (d * sc.astype(F32))[:, :, None]
    offset = (dmin * mn.astype(F32))[:, :, None]
    return (scale * q.astype(F32) - offset).reshape(-1, 256)


def dequant_q5_k(blocks: np.ndarray) -> np.ndarray:
    """Q5_K: 256 weights in 176 bytes; like Q4_K plus a fifth bit per weight.

        0      2         4             16          48                 176
        | d f16 | dmin f16 | scales[12] | qh[32]    | qs[128] as Q4_K   |
        bit 4 of element 32*s + l is bit s of qh[l]
        x = (d * sc[s]) * q - (dmin * m[s])
    """
    d = _f16(blocks[:, 0:2])
    dmin = _f16(blocks[:, 2:4])
    sc, mn = unpack_scale_min_k4(blocks[:, 4:16])
    high = (blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    low = _low_high_nibbles(blocks[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    q = low | (high << 4)  # (n, s, l)
    scale = (d * sc.astype(F32))[:, :, None]
    offset = (dmin * mn.astype(F32))[:, :, None]
    return (scale * q.astype(F32) - offset).reshape(-1, 256)


def dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K: 256 weights in 210 bytes; 16 sub-blocks of 16 with int8 scales; q in 0..63, x = d*sc*(q-32).

        0                 128            192              208     210
        | ql[128]          | qh[64]        | scales: int8[16] | d f16 |
        Two halves of 128 weights; half h uses ql[64h : 64h+64] and qh[32h : 32h+32]. Within a half,
        element 32*j + l (j = 0..3, l = 0..31) takes
          low 4 bits:  nibble j // 2 of ql[64h + 32*(j % 2) + l]
          high 2 bits: bits 2j..2j+1 of qh[32h + l]
        x = (d * sc[s]) * (q - 32),  s = element // 16
    """
    ql = blocks[:, 0:128].reshape(-1, 2, 2, 32)  # (n, half, j % 2, l)
    low = np.stack([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 4, 32)  # (n, half, j, l)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = (blocks[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3  # (n, half, j, l)
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(F32)  # (n, 16)
    d = _f16(blocks[:, 208:210])
    scale = (d * sc)[:, :, None]
    return (scale * q.reshape(-1, 16, 16).astype(F32)).reshape(-1, 256)


def dequant_q8_k(blocks: np.ndarray) -> np.ndarray:
    """Q8_K: 256 weights in 292 bytes, x = d * q; the activation format of k-quant dot products.

        0        4                    260                    292
        | d f32   | qs: int8[256]      | bsums: int16[16]     |
        bsums[i] = sum of qs[16i : 16i+16] (not needed to dequantize)
    """
    d = np.ascontiguousarray(blocks[:, 0:4]).view("<f4")  # (n, 1)
    q = np.ascontiguousarray(blocks[:, 4:260]).view(np.int8)
    return d * q.astype(F32)


BLOCK_DEQUANTIZERS: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.F32: dequant_f32,
    GGMLType.F16: dequant_f16,
    GGMLType.BF16: dequant_bf16,
    GGMLType.Q4_0: dequant_q4_0,
    GGMLType.Q4_1: dequant_q4_1,
    GGMLType.Q5_0: dequant_q5_0,
    GGMLType.Q5_1: dequant_q5_1,
    GGMLType.Q8_0: dequant_q8_0,
    GGMLType.Q2_K: dequant_q2_k,
    GGMLType.Q3_K: dequant_q3_k,
    GGMLType.Q4_K: dequant_q4_k,
    GGMLType.Q5_K: dequant_q5_k,
    GGMLType.Q6_K: dequant_q6_k,
    GGMLType.Q8_K: dequant_q8_k,
}


def dequantize(raw: np.ndarray, qtype: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """Raw tensor bytes (uint8, any shape) of type `qtype` -> float32 array of `shape` (NumPy order)."""
    blocks = as_blocks(raw, qtype, shape)
    return BLOCK_DEQUANTIZERS[GGMLType(qtype)](blocks).reshape(tuple(operator.index(n) for n in shape))
