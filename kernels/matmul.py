"""Quantized matrix multiply: weights repacked once at load time, then y = x @ W.T per call.

    pack(raw, qtype, cols) -> PackedMatrix          raw GGUF rows (R, row_bytes) uint8, repacked at load
    pack_dense(w) -> PackedMatrix                   float32 (R, C) weights, exact float32 products
    matmul(w, x) -> y                               x (n, C) float32 -> y (n, R) float32
    matmul_fused([w1, w2, ...], x) -> [y1, y2, ...] one activation quantization for several weights
    warmup() -> seconds                             compiles (or loads from cache) every kernel

Letters: n tokens, R weight rows (outputs), C cols (inputs), B = C // 32.

Quantized weights become structure-of-arrays (kernels/matmul_pack.py): int8 quants (R, B, 32) and
float32 scales (and mins) per 32 or per 16 weights. The activations are quantized per call to int8 per
32 (kernels/matmul_kernels.py), so results differ from float64 x @ dequant(W).T by about 1e-2 of the
output norm; dense weights (F32/F16/BF16, or `pack_dense`) are multiplied in float32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from kernels import matmul_kernels as mk
from kernels.matmul_pack import DECODERS, GROUP_SIZE, decode_rows
from kernels.qtypes import GGMLType

DENSE_TYPES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16})
MATMUL_TYPES = DENSE_TYPES | frozenset(DECODERS)


class MatmulError(ValueError):
    """A weight or activation the matmul cannot use (unsupported type, wrong shape or size)."""


@dataclass(frozen=True, eq=False)
class PackedMatrix:
    """A weight matrix in the kernels' layout. `nbytes` counts the resident bytes of all arrays.

    layout "dense":  weights (R, C) float32
    layout "q8":     weights (R, B, 32) int8, scales (R, B) float32                 w = s * q
    layout "q8_min": as "q8" with mins (R, B) float32                               w = s * q + m
    layout "q8_g16": scales (R, 2B), mins (R, 2B) or (R, 0): one scale per 16 weights
    """

    qtype: GGMLType
    rows: int
    cols: int
    layout: str
    weights: np.ndarray
    scales: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float32))
    mins: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float32))

    @property
    def nbytes(self) -> int:
        return int(self.weights.nbytes + self.scales.nbytes + self.mins.nbytes)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)


def pack_dense(w: np.ndarray, qtype: GGMLType = GGMLType.F32) -> PackedMatrix:
    """Float weights (R, C) -> a dense PackedMatrix (a float32 copy; `qtype` records the source type)."""
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise MatmulError(f"dense weights must be a non-empty 2-D array, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise MatmulError(f"dense weights must be floating point, got {w.dtype}")
    w32 = np.ascontiguousarray(w, dtype=np.float32)
    if w32 is w:  # never alias the caller's (possibly memory-mapped) array
        w32 = w32.copy()
    return PackedMatrix(qtype, int(w.shape[0]), int(w.shape[1]), "dense", w32)


def pack(raw: np.ndarray, qtype: GGMLType, cols: int) -> PackedMatrix:
    """Raw GGUF tensor rows (R, row_bytes) uint8 of type `qtype` with `cols` weights per row -> PackedMatrix."""
    qtype = GGMLType(qtype)
    if qtype not in MATMUL_TYPES:
        raise MatmulError(f"{qtype.name} weights are not supported by the matmul")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise MatmulError(f"raw weights must be a 2-D uint8 array, got {raw.dtype} with shape {raw.shape}")
    cols = int(cols)
    if cols < 1 or cols % qtype.block_size:
        raise MatmulError(f"{cols} cols is not a positive multiple of the {qtype.name} block size {qtype.block_size}")
    if qtype not in DENSE_TYPES and cols % 32:
        raise MatmulError(f"{cols} cols is not a multiple of 32")
    if raw.shape[1] != qtype.row_bytes(cols):
        raise MatmulError(
            f"{qtype.name} rows of {cols} weights take {qtype.row_bytes(cols)} bytes, got {raw.shape[1]}"
        )
    rows = int(raw.shape[0])
    if rows < 1:
        raise MatmulError("weights have no rows")
    if qtype == GGMLType.F32:
        return pack_dense(np.ascontiguousarray(raw).view("<f4"), qtype)
    if qtype == GGMLType.F16:
        return pack_dense(np.ascontiguousarray(raw).view("<f2"), qtype)
    if qtype == GGMLType.BF16:  # bf16 is the top half of a float32
        bits = np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16
        return PackedMatrix(qtype, rows, cols, "dense", bits.view(np.float32))
    q, scales, mins = decode_rows(raw, qtype, cols)
    if GROUP_SIZE[qtype] == 16:
        layout = "q8_g16"
    else:
        layout = "q8_min" if mins.shape[1] else "q8"
    return PackedMatrix(qtype, rows, cols, layout, q, scales, mins)


def unpack(w: PackedMatrix) -> np.ndarray:
    """The float32 weights (R, C) a PackedMatrix stands for (for tests and debugging)."""
    if w.layout == "dense":
        return w.weights.copy()
    group = w.cols // w.scales.shape[1]
    out = w.weights.reshape(w.rows, w.cols).astype(np.float32) * np.repeat(w.scales, group, axis=1)
    if w.mins.shape[1]:
        out += np.repeat(w.mins, group, axis=1)
    return out


@dataclass(frozen=True, eq=False)
class QuantizedActivations:
    """x (n, C) quantized to int8 per 32: q (n, B, 32) int8, d (n, B) f32, sums16 (n, 2B) f32 sums per 16."""

    q: np.ndarray
    d: np.ndarray
    sums16: np.ndarray


def quantize_activations(x: np.ndarray) -> QuantizedActivations:
    n, cols = x.shape
    n_blocks = cols // 32
    xq = np.empty((n, n_blocks, 32), np.int8)
    xd = np.empty((n, n_blocks), np.float32)
    xs16 = np.empty((n, 2 * n_blocks), np.float32)
    mk.quantize_activations(x, xq, xd, xs16)
    return QuantizedActivations(xq, xd, xs16)


def _check_x(x: np.ndarray, cols: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != cols:
        raise MatmulError(f"activations must have shape (n, {cols}), got {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _apply(w: PackedMatrix, x: np.ndarray, xa: QuantizedActivations | None) -> np.ndarray:
    y = np.empty((x.shape[0], w.rows), np.float32)  # (n, R)
    if w.layout == "dense":
        mk.gemm_f32(w.weights, x, y)
    elif w.layout == "q8":
        mk.gemm_q8(w.weights, w.scales, xa.q, xa.d, y)
    elif w.layout == "q8_min":
        mk.gemm_q8_min(w.weights, w.scales, w.mins, xa.q, xa.d, xa.sums16, y)
    elif w.layout == "q8_g16":
        mk.gemm_q8_g16(w.weights, w.scales, w.mins, xa.q, xa.d, xa.sums16, y)
    else:
        raise MatmulError(f"unknown layout {w.layout!r}")
    return y


def matmul(w: PackedMatrix, x: np.ndarray) -> np.ndarray:
    """y (n, R) = x (n, C) @ W.T, float32."""
    return matmul_fused([w], x)[0]


def matmul_fused(ws: list[PackedMatrix], x: np.ndarray) -> list[np.ndarray]:
    """[x @ W.T for W in ws]: the weights share C, and x is quantized once for all of them."""
    if not ws:
        return []
    cols = ws[0].cols
    if any(w.cols != cols for w in ws):
        raise MatmulError(f"fused weights must share their cols, got {[w.cols for w in ws]}")
    x = _check_x(x, cols)
    xa = None
    if any(w.layout != "dense" for w in ws):
        xa = quantize_activations(x)
    return [_apply(w, x, xa) for w in ws]


def warmup() -> float:
    """Compile (or load from Numba's cache) every matmul kernel on tiny shapes; returns the seconds taken."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    for qtype in (GGMLType.F32, GGMLType.Q8_0, GGMLType.Q4_1, GGMLType.Q6_K, GGMLType.Q2_K):
        raw = rng.integers(0, 256, (2, qtype.row_bytes(256)), dtype=np.uint8)
        if qtype == GGMLType.F32:
            raw = rng.standard_normal((2, 256)).astype(np.float32).view(np.uint8)
        matmul(_sane_scales(pack(raw, qtype, 256)), x)
    return time.perf_counter() - start


def _sane_scales(w: PackedMatrix) -> PackedMatrix:
    """Random bytes can hold NaN scales; warm-up only needs the kernels compiled, so zero them."""
    np.nan_to_num(w.scales, copy=False)
    np.nan_to_num(w.mins, copy=False)
    return w
