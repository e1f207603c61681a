"""Repacking GGUF quant blocks, once at load time, into the structure-of-arrays layout of the matmul kernels.

Each format becomes integer quants q and scales (and mins) per group of g weights (g = 32, or 16 for the
K-quants with 16 sub-blocks), bit-exact with `gguf.quants.dequantize`:

    w[r, k] = scale[r, k // g] * q[r, k] + min[r, k // g]

with q + offset stored in one of the packed block formats of kernels/matmul_simd.py ("s8", "u8", "u6",
"u4", "u5"): unsigned (except Q8_0) and as narrow as the format allows. The scales are stored as the
GGUF block holds them, so a weight costs about the bytes it costs in the file:

    32-weight formats   scale = s[r, k // g]                      s float16 (the block's own f16 field)
    K-quants            scale = d[r, k // 256] * s[r, k // g]     s int8 sub-scale, d float32 per 256

(the mins alike), and the kernels form each scale as they go: one conversion, or one float32 product --
the product the GGUF dequantizers compute, so the weights are the same to the bit.

Each format's `PackSpec` (its row in kernels/formats.py) says which: the 32-weight formats already hold
their quants that way, so their bytes are only reordered (`PackSpec.copy`); the K-quants are decoded
(`PackSpec.decode`) and re-encoded here (`encode_blocks`; `decode_blocks` is the inverse, for
`kernels.matmul.unpack`).

Letters used in shape comments:
    R  rows (output features)     C  cols (input features)     B  = C // 32 blocks of 32
    G  scales per block (1, or 2 with g = 16)                   P  bytes per packed block
    S  super-blocks of 256 weights per row: C // 256 for the K-quants, else 0
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kawai.kernels.formats import FORMATS, f16_bits
from kawai.kernels.matmul_simd import BLOCK_BYTES
from kawai.kernels.qtypes import GGMLType

PACK_CHUNK_ROWS = 2048  # rows decoded at a time: bounds the temporaries of the NumPy gathers


def encode_blocks(u: np.ndarray, fmt: str) -> np.ndarray:
    """Stored quants (N, 32) -> packed bytes (N, BLOCK_BYTES[fmt]) uint8.

    "s8"/"u8": the bytes themselves; "u4": element j in the low nibble of byte j and element j + 16 in
    its high nibble; "u5": those nibbles, then a little-endian u32 whose bit j is bit 4 of element j;
    "u6": the nibbles, then 8 bytes: byte i holds bits 4-5 of elements i, i + 8, i + 16, i + 24 at its
    bits 0-1, 2-3, 4-5, 6-7 (so one 64-bit shift by 2k brings element i + 8k's pair to byte i's bottom)."""
    if fmt in ("s8", "u8"):
        return u
    nibbles = (u[:, :16] & 15) | ((u[:, 16:] & 15) << 4)
    if fmt == "u4":
        return nibbles
    if fmt == "u6":
        pairs = ((u >> 4) & 3).reshape(-1, 4, 8)  # (N, k, i): element i + 8k
        high = pairs[:, 0] | (pairs[:, 1] << 2) | (pairs[:, 2] << 4) | (pairs[:, 3] << 6)
        return np.concatenate([nibbles, high.astype(np.uint8)], axis=1)
    high = ((u >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    bits = np.bitwise_or.reduce(high, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)
    return np.concatenate([nibbles, bits], axis=1)


def decode_blocks(packed: np.ndarray, fmt: str) -> np.ndarray:
    """Packed bytes (N, BLOCK_BYTES[fmt]) -> the stored quants (N, 32) float32: the inverse of
    `encode_blocks` ("s8" read as signed)."""
    if fmt in ("s8", "u8"):
        return packed.view(np.int8 if fmt == "s8" else np.uint8).astype(np.float32)
    q = np.concatenate([packed[:, :16] & 15, packed[:, :16] >> 4], axis=1).astype(np.int64)
    if fmt == "u5":
        bits = np.ascontiguousarray(packed[:, 16:20]).view("<u4").astype(np.int64)  # (N, 1)
        q |= ((bits >> np.arange(32)) & 1) << 4
    if fmt == "u6":
        j = np.arange(32)
        q |= ((packed[:, 16 + j % 8].astype(np.int64) >> (2 * (j // 8))) & 3) << 4
    return q.astype(np.float32)


@dataclass(frozen=True)
class Repacked:
    """One matrix in the kernels' layout (see the module docstring): w (R, B*P) uint8; scales and mins
    (R, B*G) float16 or int8 (mins (R, 0) without mins); super_scales, super_mins (R, S) float32 or (R, 0)."""

    w: np.ndarray
    scales: np.ndarray
    mins: np.ndarray
    super_scales: np.ndarray
    super_mins: np.ndarray


def repack_rows(raw: np.ndarray, qtype: GGMLType, cols: int) -> Repacked:
    """Raw rows (R, row_bytes) -> the kernels' arrays (`Repacked`)."""
    row = FORMATS[qtype]
    spec = row.pack
    rows = raw.shape[0]
    n_blocks = cols // 32
    n_groups = cols // spec.group
    n_supers = 0 if spec.copy else cols // 256
    small = np.float16 if spec.copy else np.int8  # the stored scale type
    out = Repacked(np.empty((rows, n_blocks * BLOCK_BYTES[spec.fmt]), np.uint8),
                   np.empty((rows, n_groups), small),
                   np.empty((rows, n_groups if spec.has_min else 0), small),
                   np.empty((rows, n_supers), np.float32),
                   np.empty((rows, n_supers if spec.has_min else 0), np.float32))
    for lo in range(0, rows, PACK_CHUNK_ROWS):
        hi = min(rows, lo + PACK_CHUNK_ROWS)
        blocks = np.asarray(raw[lo:hi]).reshape(-1, qtype.type_size)  # ((hi-lo)*B, type_size)
        if spec.copy:  # the scale (and min) are the block's f16 fields, in order
            out.w[lo:hi] = np.concatenate([blocks[:, a:b] for a, b in spec.copy], axis=1).reshape(hi - lo, -1)
            fields = [f16_bits(blocks, at).reshape(hi - lo, n_groups) for at in row.f16_fields]
            out.scales[lo:hi] = fields[0]
            if spec.has_min:
                out.mins[lo:hi] = fields[1]
            continue
        dec = spec.decode(blocks)
        out.w[lo:hi] = encode_blocks(dec.q.reshape(-1, 32), spec.fmt).reshape(hi - lo, -1)
        out.scales[lo:hi] = dec.scale.reshape(hi - lo, n_groups)
        out.super_scales[lo:hi] = dec.d.reshape(hi - lo, n_supers)
        if spec.has_min:
            out.mins[lo:hi] = dec.min.reshape(hi - lo, n_groups)
            out.super_mins[lo:hi] = dec.dmin.reshape(hi - lo, n_supers)
    return out
