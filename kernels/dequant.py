"""Dequantize raw GGUF tensor bytes to float32, bit-exact with ggml's C reference and `gguf.quants`.

    dequantize(raw, qtype, shape) -> float32 array of `shape`
    dequantize_rows(raw2d, qtype, row_lo, row_hi) -> (row_hi - row_lo, n_cols) float32
    dequantize_row_ids(raw2d, qtype, ids) -> (len(ids), n_cols) float32   (embedding lookup)

The per-format block decoders and the compiled drivers that run them over all blocks (with `prange` for
big jobs: run kernels.threads.configure_threads first) are in kernels/formats.py, one table row per type;
this module checks its input and calls them. Layout diagrams: docs/quantization.md.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from kawai.kernels.formats import DRIVERS, FORMATS, PARALLEL_MIN_ELEMENTS  # noqa: F401  (tests use it)
from kawai.kernels.qtypes import GGMLType

F32 = np.float32


def as_blocks(raw: np.ndarray, qtype: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """Check that `raw` holds exactly a `qtype` tensor of `shape`; return it as (n_blocks, type_size).

    Raises ValueError naming the mismatch.
    """
    try:
        qtype = GGMLType(qtype)
    except ValueError:
        raise ValueError(f"unknown ggml type id {qtype!r}") from None
    if qtype not in FORMATS:
        raise ValueError(f"tensor type {qtype.name} cannot be dequantized (not supported)")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise ValueError(f"raw tensor bytes must be uint8, got {raw.dtype}")
    try:
        dims = tuple(operator.index(n) for n in shape)
    except TypeError:
        raise ValueError(f"shape {shape!r} must be a tuple of integers") from None
    if not dims or any(n < 1 for n in dims):
        raise ValueError(f"shape {dims} must have at least one dimension, all >= 1")
    if dims[-1] % qtype.block_size:
        raise ValueError(
            f"row length {dims[-1]} is not a multiple of the {qtype.name} block size {qtype.block_size}"
        )
    n_blocks = math.prod(dims) // qtype.block_size  # Python ints: no wrapping
    if raw.size != n_blocks * qtype.type_size:
        raise ValueError(
            f"{qtype.name} tensor of shape {dims} needs {n_blocks * qtype.type_size} bytes, got {raw.size}"
        )
    return np.ascontiguousarray(raw).reshape(n_blocks, qtype.type_size)


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
    DRIVERS[qtype](blocks, out)
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
