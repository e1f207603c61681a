"""Quantized matrix multiply: weights repacked once at load time, then y = x @ W.T per call.

    pack(raw, qtype, cols) -> PackedMatrix          raw GGUF rows (R, row_bytes) uint8, repacked at load
    pack_dense(w) -> PackedMatrix                   float32 (R, C) weights, exact float32 products
    matmul(w, x) -> y                               x (n, C) float32 -> y (n, R) float32
    matmul_fused([w1, w2, ...], x) -> [y1, y2, ...] one activation quantization for several weights
                                                    (precise=True: activations at ~15 bits, for q, k, v)
    stack([w1, w2, ...]) -> StackedMatrix            matrices sharing cols, rows stacked at load where formats agree
    matmul_stacked(s, x) -> [y1, y2, ...]           one kernel launch per stack instead of one per matrix
    select_rows(w, rows) -> PackedMatrix            some rows: a view for a slice, a copy for indices
    warmup() -> seconds                             compiles (or loads from cache) every kernel
    unpack(w) -> float32 (R, C)                     the weights a PackedMatrix stands for (tests)

Letters: n tokens, R weight rows (outputs), C cols (inputs), B = C // 32 blocks, P bytes per block.

Quantized weights become structure-of-arrays (kernels/matmul_pack.py): packed integer quants (R, B*P)
uint8 (8, 6, 5 or 4 bits per weight) and scales (and mins) per 32 or 16 weights, as compact as the GGUF
file keeps them (float16, or int8 sub-scales of a float32 per 256 weights): a decode step reads about
the file's bytes, so its speed is the memory's. The activations
are quantized per call to int8 per block of 32 (kernels/matmul_kernels.py), and the block dot products
run in integers (kernels/matmul_simd.py), so results differ from float64 x @ dequant(W).T by about 5e-3
of the output norm (tests bound it by 1e-2). Dense weights (F32/F16/BF16, or `pack_dense`) are multiplied
in float32. A token's output never depends on the other tokens in the call, so prefill and decode agree
bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kawai.kernels import matmul_amx as amx
from kawai.kernels import matmul_kernels as mk
from kawai.kernels.formats import DENSE_TYPES, FORMATS, PACKED_TYPES
from kawai.kernels.matmul_pack import decode_blocks, repack_rows
from kawai.kernels.matmul_simd import BLOCK_BYTES, FORMAT_CODES, GROUPS
from kawai.kernels.qtypes import GGMLType

MATMUL_TYPES = DENSE_TYPES | PACKED_TYPES  # dense weights are multiplied in float32, the others repacked
PARALLEL_QUANTIZE_TOKENS = 16  # fewer tokens are quantized on one thread (a parallel launch costs more)
PARALLEL_SPLIT_TOKENS = 16  # fewer tokens are split on one thread (a parallel launch costs more)


class MatmulError(ValueError):
    """A weight or activation the matmul cannot use (unsupported type, wrong shape or size)."""


@dataclass(frozen=True, eq=False)
class PackedMatrix:
    """A weight matrix in the kernels' layout. `nbytes` counts the resident bytes of all arrays.

    fmt "dense": weights (R, C) float32. Otherwise (kernels/matmul_pack.py) weights (R, B*P) uint8
    packed quants q, scales (R, C // group) and mins (R, C // group) or (R, 0), and

        W[r, k] = scale(r, k // group) * (q[r, k] - offset) + min(r, k // group)

    where scale(r, g) is scales[r, g] itself (float16: the 32-weight formats), or the int8 sub-scale
    times its super-block's super_scales[r, k // 256] (float32: the K-quants), and min(r, g) alike.
    """

    qtype: GGMLType
    rows: int
    cols: int
    fmt: str
    weights: np.ndarray
    scales: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float16))
    mins: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float16))
    super_scales: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float32))
    super_mins: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float32))
    group: int = 0
    offset: int = 0

    def __post_init__(self):
        """The kernels read these arrays without bounds checks: their shapes and dtypes must agree."""
        if self.fmt == "dense":
            expected = [(self.weights, np.float32, (self.rows, self.cols))]
        elif self.fmt in BLOCK_BYTES and self.group in (16, 32) and self.cols % 32 == 0:
            groups = self.cols // self.group
            small = self.scales.dtype if self.scales.dtype in (np.float16, np.int8) else np.float16
            supers = self.cols // 256 if small == np.int8 else 0
            has_min = self.mins.size > 0
            expected = [(self.weights, np.uint8, (self.rows, self.cols // 32 * BLOCK_BYTES[self.fmt])),
                        (self.scales, small, (self.rows, groups)),
                        (self.mins, small, (self.rows, groups if has_min else 0)),
                        (self.super_scales, np.float32, (self.rows, supers)),
                        (self.super_mins, np.float32, (self.rows, supers if has_min else 0))]
            if 32 // self.group != GROUPS[self.fmt]:
                raise MatmulError(f"format {self.fmt!r} needs a scale per {32 // GROUPS[self.fmt]} weights")
            if supers and self.cols % 256:
                raise MatmulError(f"int8 sub-scales need super-blocks of 256 weights, got {self.cols} cols")
        else:
            raise MatmulError(f"no packed format {self.fmt!r} with groups of {self.group} for {self.cols} cols")
        for arr, dtype, shape in expected:
            if arr.dtype != dtype or arr.shape != shape or not arr.flags.c_contiguous:
                raise MatmulError(f"packed array {arr.dtype}{arr.shape} is not C-contiguous {np.dtype(dtype)}{shape}")

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.weights, self.scales, self.mins, self.super_scales, self.super_mins)))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def group_scales(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, min) per group as float32 (R, C // group), each formed as the kernels form it;
        min is (R, 0) without mins."""
        out = []
        for small, big in ((self.scales, self.super_scales), (self.mins, self.super_mins)):
            value = small.astype(np.float32)
            if big.shape[1] and small.shape[1]:
                value = np.repeat(big, small.shape[1] // big.shape[1], axis=1) * value  # float32 products
            out.append(value)
        return out[0], out[1]


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
    spec = FORMATS[qtype].pack
    r = repack_rows(raw, qtype, cols)
    return PackedMatrix(qtype, rows, cols, spec.fmt, r.w, r.scales, r.mins, r.super_scales, r.super_mins,
                        spec.group, spec.offset)


def unpack(w: PackedMatrix) -> np.ndarray:
    """The float32 weights (R, C) a PackedMatrix stands for (for tests and debugging)."""
    if w.fmt == "dense":
        return w.weights.copy()
    q = decode_blocks(w.weights.reshape(-1, BLOCK_BYTES[w.fmt]), w.fmt)  # (R*B, 32)
    q = (q - np.float32(w.offset)).reshape(w.rows, w.cols)
    scales, mins = w.group_scales()
    out = np.repeat(scales, w.group, axis=1) * q
    if mins.shape[1]:
        out += np.repeat(mins, w.group, axis=1)
    return out


@dataclass(frozen=True, eq=False)
class QuantizedActivations:
    """x (n, C) as int8 per block of 32: q (n*B*32,) int8, d (n*B,) scales, and the sums of the quantized
    x per group of 16 and of 32, (n*2B,) and (n*B,) float32 (they carry the mins and offsets)."""

    q: np.ndarray
    d: np.ndarray
    qsum16: np.ndarray
    qsum32: np.ndarray


def quantize_activations(x: np.ndarray) -> QuantizedActivations:
    n, cols = x.shape
    n_blocks = cols // 32
    xq = np.empty((n, n_blocks * 32), np.int8)
    xd = np.empty((n, n_blocks), np.float32)
    qsum16 = np.empty((n, 2 * n_blocks), np.float32)
    qsum32 = np.empty((n, n_blocks), np.float32)
    quantize = mk.quantize_activations_parallel if n >= PARALLEL_QUANTIZE_TOKENS else mk.quantize_activations
    quantize(x, xq, xd, qsum16, qsum32)
    return QuantizedActivations(xq.reshape(-1), xd.reshape(-1), qsum16.reshape(-1), qsum32.reshape(-1))


def _check_x(x: np.ndarray, cols: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != cols:
        raise MatmulError(f"activations must have shape (n, {cols}), got {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def check_blocks(x: np.ndarray) -> np.ndarray:
    """x (n, C) with C a multiple of 32, as C-contiguous float32; MatmulError otherwise."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] % 32:
        raise MatmulError(f"activations must have shape (n, C) with C a multiple of 32, got {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def split_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (n, C) float32 -> hi (n, C), lo (n, C) float32 with hi + lo == x, hi on the int8 grid the
    matmul quantizes x to (kernels/matmul_precise.py explains why that is exact)."""
    x = check_blocks(x)
    hi = np.empty_like(x)
    lo = np.empty_like(x)
    split = mk.split_parallel if x.shape[0] >= PARALLEL_SPLIT_TOKENS else mk.split_serial
    split(x, hi, lo)
    return hi, lo


def precise(multiply: Callable[[np.ndarray], Sequence[np.ndarray]], x: np.ndarray) -> list[np.ndarray]:
    """[y1, y2, ...] = multiply(x) with precise activations. `multiply` maps (m, C) -> arrays (m, R_i), one
    token per row independently (the vector kernels, matmul_stacked...); it is called once, on 2n tokens."""
    hi, lo = split_activations(x)
    n = hi.shape[0]
    return [y[:n] + y[n:] for y in multiply(np.concatenate([hi, lo]))]  # (n, R_i) each


def _apply_amx(w: PackedMatrix, x: np.ndarray, xb: np.ndarray, precise: bool) -> np.ndarray:
    y = np.empty((x.shape[0], w.rows), np.float32)  # (n, R)
    if w.fmt == "dense":
        mk.gemm_f32(w.weights, x, y)
        return y
    amx.GEMMS[FORMAT_CODES[w.fmt]](w.weights, kernel_view(w.scales), kernel_view(w.mins), w.super_scales,
                                   w.super_mins, w.offset, amx.SEGMENTS[precise], xb, x.shape[0], y)
    return y


def _apply(w: PackedMatrix, x: np.ndarray, xa: QuantizedActivations | None) -> np.ndarray:
    y = np.empty((x.shape[0], w.rows), np.float32)  # (n, R)
    if w.fmt == "dense":
        mk.gemm_f32(w.weights, x, y)
        return y
    qsums = xa.qsum16 if w.group == 16 else xa.qsum32
    if w.mins.shape[1]:  # bias = sum mins * xqsum
        coefs, super_coefs, factor = w.mins, w.super_mins, 1.0
    else:  # bias = -offset * sum scales * xqsum
        coefs, super_coefs, factor = w.scales, w.super_scales, -float(w.offset)
    mk.gemm_quant(FORMAT_CODES[w.fmt], w.weights, kernel_view(w.scales), kernel_view(coefs), w.super_scales,
                  super_coefs, factor, xa.q, xa.d, qsums, y)
    return y


def kernel_view(a: np.ndarray) -> np.ndarray:
    """Scales as the kernels take them: float16 as its uint16 bits (Numba has no float16), int8 unchanged."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


def tile_rows(n: int, requested: int | None = None) -> int:
    """How many of a call's n rows (the first ones) run on the AMX tiles (kernels/matmul_amx.py): none
    without AMX; else `requested` (the engine passes its prompt rows), or by default all of them when
    there are amx.MIN_TOKENS or more (a prompt's chunk) and none otherwise (a decode step)."""
    if not amx.AVAILABLE:
        return 0
    if requested is None:
        return n if n >= amx.MIN_TOKENS else 0
    return max(0, min(n, int(requested)))


def _vector(ws: list[PackedMatrix], x: np.ndarray, fine: bool) -> list[np.ndarray]:
    """The vector kernels: x quantized to int8 once (or split into its int8 part and residual)."""
    if all(w.fmt == "dense" for w in ws):
        return [_apply(w, x, None) for w in ws]
    if fine:  # precise activations: the int8 grid's part and the residual as 2n tokens, summed back
        return precise(lambda both: _vector(ws, both, False), x)
    xa = quantize_activations(x)
    return [_apply(w, x, xa) for w in ws]


def _tiles(ws: list[PackedMatrix], x: np.ndarray, precise: bool) -> list[np.ndarray]:
    """The AMX kernels: x rounded to bfloat16 tiles once (three segments if precise)."""
    xb = amx.activation_tiles(x, precise) if any(w.fmt != "dense" for w in ws) else None
    return [_apply_amx(w, x, xb, precise) for w in ws]


def matmul(w: PackedMatrix, x: np.ndarray, tiles: int | None = None) -> np.ndarray:
    """y (n, R) = x (n, C) @ W.T, float32."""
    return matmul_fused([w], x, tiles=tiles)[0]


def matmul_fused(ws: list[PackedMatrix], x: np.ndarray, precise: bool = False,
                 tiles: int | None = None) -> list[np.ndarray]:
    """[x @ W.T for W in ws]: the weights share C, and x is quantized once for all of them. precise=True:
    the activations at ~15 bits instead of int8 (or bfloat16 on AMX), for about twice the work (three
    times on AMX). tiles: how many leading rows may run on the AMX tiles (`tile_rows`)."""
    if not ws:
        return []
    cols = ws[0].cols
    if any(w.cols != cols for w in ws):
        raise MatmulError(f"fused weights must share their cols, got {[w.cols for w in ws]}")
    x = _check_x(x, cols)
    n = x.shape[0]
    if n == 0:
        return [np.zeros((0, w.rows), np.float32) for w in ws]
    k = tile_rows(n, tiles)
    if k == 0:
        return _vector(ws, x, precise)
    if k == n:
        return _tiles(ws, x, precise)
    ys = [np.empty((n, w.rows), np.float32) for w in ws]  # (n, R_i): rows :k on the tiles, k: on vectors
    for y, part in zip(ys, _tiles(ws, x[:k], precise)):
        y[:k] = part
    for y, part in zip(ys, _vector(ws, x[k:], precise)):
        y[k:] = part
    return ys


ARRAYS = ("weights", "scales", "mins", "super_scales", "super_mins")  # a PackedMatrix's arrays, one row per row


def _stack_key(w: PackedMatrix) -> tuple:
    """Matrices with equal keys can share one kernel launch: same format, scales and bias layout."""
    return (w.qtype, w.fmt, w.cols, w.group, w.offset, w.mins.shape[1] > 0, w.scales.dtype)


@dataclass(frozen=True, eq=False)
class StackedMatrix:
    """Matrices sharing their cols, multiplied together: `stacks` hold the rows of consecutive parts with
    the same format one after another (each part's rows in its own order), and `parts` are the original
    matrices as views into the stacks (no copy). Row outputs are independent of their neighbours, so a
    part's outputs are bit for bit those of the part alone."""

    stacks: tuple[PackedMatrix, ...]
    parts: tuple[PackedMatrix, ...]
    part_stack: tuple[int, ...]  # the stack of each part
    part_lo: tuple[int, ...]  # the first row of each part in its stack

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.stacks)


def _concat_rows(ws: list[PackedMatrix]) -> PackedMatrix:
    first = ws[0]
    if len(ws) == 1:
        return first
    joined = [np.concatenate([getattr(w, name) for w in ws]) for name in ARRAYS]
    return PackedMatrix(first.qtype, sum(w.rows for w in ws), first.cols, first.fmt, *joined,
                        group=first.group, offset=first.offset)


def select_rows(w: PackedMatrix, rows: slice | np.ndarray) -> PackedMatrix:
    """Some rows of w as a PackedMatrix: a view for a slice, a copy for an index array (k,)."""
    picked = [getattr(w, name)[rows] for name in ARRAYS]
    return PackedMatrix(w.qtype, picked[0].shape[0], w.cols, w.fmt, *picked, group=w.group, offset=w.offset)


def stack(ws: Sequence[PackedMatrix]) -> StackedMatrix:
    """Stack consecutive matrices of the same format (they must share cols): one launch per stack.
    Copies each stacked matrix's arrays once (the inputs can then be dropped)."""
    ws = list(ws)
    if not ws or any(w.cols != ws[0].cols for w in ws):
        raise MatmulError(f"stacked weights must share their cols, got {[w.cols for w in ws]}")
    runs: list[list[PackedMatrix]] = []
    for w in ws:
        if runs and _stack_key(runs[-1][0]) == _stack_key(w):
            runs[-1].append(w)
        else:
            runs.append([w])
    stacks, parts, part_stack, part_lo = [], [], [], []
    for i, run in enumerate(runs):
        stacked = _concat_rows(run)
        lo = 0
        for w in run:
            parts.append(stacked if len(run) == 1 else select_rows(stacked, slice(lo, lo + w.rows)))
            part_stack.append(i)
            part_lo.append(lo)
            lo += w.rows
        stacks.append(stacked)
    return StackedMatrix(tuple(stacks), tuple(parts), tuple(part_stack), tuple(part_lo))


def matmul_stacked(s: StackedMatrix, x: np.ndarray, precise: bool = False,
                   tiles: int | None = None) -> list[np.ndarray]:
    """[x @ P.T for P in s.parts] (n, R_i) float32, C-contiguous: one kernel launch per stack, x quantized once."""
    ys = matmul_fused(list(s.stacks), x, precise, tiles)
    if len(s.parts) == len(s.stacks):
        return ys
    out = []
    for part, i, lo in zip(s.parts, s.part_stack, s.part_lo):
        y = ys[i][:, lo : lo + part.rows]  # a view; contiguous for a single token
        out.append(y if y.flags.c_contiguous else np.ascontiguousarray(y))
    return out


def warmup() -> float:
    """Compile (or load from Numba's cache) the matmul kernels on tiny shapes; returns the seconds taken:
    the dense one, activation quantization, and the gemms of a format with float16 scales (Q8_0) and one
    with int8 sub-scales (Q4_K). Each packed format has its own gemm (kernels/matmul_kernels.py): a
    model's others compile on its first forward (engine/llm.py's warm-up runs one)."""
    start = time.perf_counter()
    for n in (5, PARALLEL_QUANTIZE_TOKENS):  # tiles of 4 tokens, a single token, parallel quantization
        x = np.ones((n, 256), np.float32)
        for qtype in (GGMLType.F32, GGMLType.Q8_0, GGMLType.Q4_K):
            matmul(pack(np.zeros((4, qtype.row_bytes(256)), np.uint8), qtype, 256), x)
    return time.perf_counter() - start
