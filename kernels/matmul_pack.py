"""Repacking GGUF quant blocks, once at load time, into the structure-of-arrays layout of the matmul kernels.

Each format becomes integer quants q and float32 scales (and mins) per group of g weights (g = 32, or 16
for the K-quants with 16 sub-blocks), bit-exact with `gguf.quants.dequantize`:

    w[r, k] = scale[r, k // g] * q[r, k] + min[r, k // g]

with q + offset stored in one of the packed block formats of kernels/matmul_simd.py ("s8", "u8", "u4",
"u5"): unsigned (except Q8_0) and as narrow as the format allows. Each format's `PackSpec` (its row in
kernels/formats.py) says which: the 32-weight formats already hold their quants that way, so their bytes
are only reordered (`PackSpec.copy`); the K-quants are decoded (`PackSpec.decode`) and re-encoded here
(`encode_blocks`; `decode_blocks` is the inverse, for `kernels.matmul.unpack`).

Letters used in shape comments:
    R  rows (output features)     C  cols (input features)     B  = C // 32 blocks of 32
    G  scales per block (1, or 2 with g = 16)                   P  bytes per packed block
"""

from __future__ import annotations

import numpy as np

from kawai.kernels.formats import FORMATS, f16_field
from kawai.kernels.matmul_simd import BLOCK_BYTES
from kawai.kernels.qtypes import GGMLType

PACK_CHUNK_ROWS = 2048  # rows decoded at a time: bounds the temporaries of the NumPy gathers


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


def decode_blocks(packed: np.ndarray, fmt: str) -> np.ndarray:
    """Packed bytes (N, BLOCK_BYTES[fmt]) -> the stored quants (N, 32) float32: the inverse of
    `encode_blocks` ("s8" read as signed)."""
    if fmt in ("s8", "u8"):
        return packed.view(np.int8 if fmt == "s8" else np.uint8).astype(np.float32)
    q = np.concatenate([packed[:, :16] & 15, packed[:, :16] >> 4], axis=1).astype(np.int64)
    if fmt == "u5":
        bits = np.ascontiguousarray(packed[:, 16:20]).view("<u4").astype(np.int64)  # (N, 1)
        q |= ((bits >> np.arange(32)) & 1) << 4
    return q.astype(np.float32)


def repack_rows(raw: np.ndarray, qtype: GGMLType, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw rows (R, row_bytes) -> w (R, B*P) uint8, scales (R, B*G) f32, mins (R, B*G) f32 or (R, 0)."""
    row = FORMATS[qtype]
    spec = row.pack
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
        if spec.copy:  # the scale (and min) are the block's f16 fields, in order
            w[lo:hi] = np.concatenate([blocks[:, a:b] for a, b in spec.copy], axis=1).reshape(hi - lo, -1)
            scales[lo:hi] = f16_field(blocks, row.f16_fields[0]).reshape(hi - lo, n_groups)
            if spec.has_min:
                mins[lo:hi] = f16_field(blocks, row.f16_fields[1]).reshape(hi - lo, n_groups)
            continue
        dec = spec.decode(blocks)
        w[lo:hi] = encode_blocks(dec.q.reshape(-1, 32), spec.fmt).reshape(hi - lo, -1)
        scales[lo:hi] = dec.scale.reshape(hi - lo, n_groups)
        if spec.has_min:
            mins[lo:hi] = dec.min.reshape(hi - lo, n_groups)
    return w, scales, mins
