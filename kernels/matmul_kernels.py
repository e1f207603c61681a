"""Numba kernels behind kernels/matmul.py: activation quantization, and y = x @ W.T per packed format.

Letters used in shape comments:
    n  tokens (rows of x)     R  weight rows (outputs)     C  cols (inputs)
    B  = C // 32 blocks       G  scales per block (1, or 2 for one per 16 weights)   P  bytes per block

Weights (kernels/matmul_pack.py): w (R, B*P) uint8 holding the stored quants q, scales s (R, B*G), and
either mins m (R, B*G) or a constant offset:

    W[r, k] = s[r, k // g] * (q[r, k] - offset) + m[r, k // g]          g = 32 // G

(each s and m a float16, or an int8 times a float32 per 256 weights: kernels/matmul_pack.py).

Activations are quantized once per call to int8 per block of 32 (Q8_0-like: d = amax / 127). Then

    y[t, r] = sum_b sum_g s * d * isum  +  sum_g (m - offset * s) * xqsum[t, g]

where isum is the int32 dot product of a group's quants with the quantized x and xqsum the sums of the
quantized x per group: the result is exactly W @ (quantized x), so the error scales with the weights,
not with the stored quants. Both terms come from the dot products of kernels/matmul_simd.py (SIMD
intrinsics of the instruction set kernels/isa.py chose, or their portable plain-loop definition). Work is
split over chunks of ROW_CHUNK output rows (`prange`); prefill sweeps a chunk once per tile of TOKEN_TILE
tokens, reading and decoding each weight row once per tile; single tokens read the rows in order (one
sequential stream: interleaving several rows halved the DRAM bandwidth in measurements). Every (token,
row) output goes through the same float operations whatever n is.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from kawai.kernels import matmul_simd as simd

ROW_CHUNK = 16  # output rows per parallel work item
DENSE_TOKEN_TILE = 8  # tokens per sweep over a chunk of dense weight rows

TOKEN_TILE = simd.TOKEN_TILE  # tokens per prefill tile: 8 on the 512-bit paths, else 4
SMALL_TILE, PAIR_TILE = simd.SMALL_TILE, simd.PAIR_TILE  # tiles of a few sequences' decode step


@njit(cache=True)
def block_scale(x, t, b):
    """The int8 grid of block b (32 values) of row t of x (n, C) f32: (d = amax / 127, 1 / d or 0).
    Every activation quantization uses this rule (kernels/matmul_precise.py splits on the same grid)."""
    amax = np.float32(0.0)
    for j in range(b * 32, b * 32 + 32):
        amax = max(amax, abs(x[t, j]))
    d = amax / np.float32(127.0)
    inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
    return d, inv


@njit(cache=True)
def _quantize_token(x, t, xq, xd, xqsum16, xqsum32):
    """Row t of x (n, C) f32 -> xq[t] (B*32,) int8, xd[t] (B,) scales d = amax / 127, xqsum16[t] (2B,)
    the sums of the quantized values per 16 times d, xqsum32[t] (B,) the sums of each pair of those."""
    n_blocks = x.shape[1] // 32
    for b in range(n_blocks):
        d, inv = block_scale(x, t, b)
        for half in range(2):
            qs = 0
            for j in range(b * 32 + 16 * half, b * 32 + 16 * half + 16):
                q = int(np.rint(x[t, j] * inv))
                xq[t, j] = q
                qs += q
            xqsum16[t, 2 * b + half] = d * np.float32(qs)
        xqsum32[t, b] = xqsum16[t, 2 * b] + xqsum16[t, 2 * b + 1]
        xd[t, b] = d


@njit(cache=True)
def quantize_activations(x, xq, xd, xqsum16, xqsum32):
    """x (n, C) f32 -> xq (n, B*32) int8, xd (n, B), xqsum16 (n, 2B), xqsum32 (n, B): see `_quantize_token`."""
    for t in range(x.shape[0]):
        _quantize_token(x, t, xq, xd, xqsum16, xqsum32)


@njit(parallel=True, cache=True)
def quantize_activations_parallel(x, xq, xd, xqsum16, xqsum32):
    """As quantize_activations, tokens split over threads (for prefill; a decode step is too small)."""
    for t in prange(x.shape[0]):
        _quantize_token(x, t, xq, xd, xqsum16, xqsum32)


@njit(cache=True)
def split_token(x, t, hi, lo):
    """Row t of x (n, C) -> hi[t], lo[t]: per block of 32, d = amax / 127, hi = rint(x / d) * d, lo = x - hi.
    The grid is the matmul's own (`block_scale`), so hi is re-quantized without loss."""
    for b in range(x.shape[1] // 32):
        d, inv = block_scale(x, t, b)
        for j in range(b * 32, b * 32 + 32):
            h = np.float32(np.rint(x[t, j] * inv)) * d
            hi[t, j] = h
            lo[t, j] = x[t, j] - h


@njit(cache=True)
def split_serial(x, hi, lo):
    for t in range(x.shape[0]):
        split_token(x, t, hi, lo)


@njit(parallel=True, cache=True)
def split_parallel(x, hi, lo):
    for t in prange(x.shape[0]):
        split_token(x, t, hi, lo)


@njit(cache=True)
def _store_tile(y, t0, r, o):
    """y[t0 + i, r] = o[i] for the outputs of one row with a tile of tokens."""
    for i in range(len(o)):
        y[t0 + i, r] = o[i]


def dot_rows(fmt, size, w, row_bytes, s, m, ss, sm, n_groups, x, xd, xqsum, t0, n_blocks, bias_factor, r_lo, r_hi, y):
    """y[t0:t0+size, r_lo:r_hi]: each weight row read and decoded once for the `size` tokens; a single
    token (size 1) reads the rows in order, one sequential stream through the weights. (Plain Python here,
    for NUMBA_DISABLE_JIT=1; compiled code uses the overload below.)"""
    dot = simd.DOTS[fmt][size]
    for r in range(r_lo, r_hi):
        out = dot(w, r * row_bytes, s, m, ss, sm, r * n_groups, x, xd, xqsum, t0, n_blocks, bias_factor)
        if size == 1:
            y[t0, r] = out
        else:
            _store_tile(y, t0, r, out)


@overload(dot_rows, prefer_literal=True)
def _dot_rows_jit(fmt, size, w, row_bytes, s, m, ss, sm, n_groups, x, xd, xqsum, t0, n_blocks, bias_factor, r_lo,
                  r_hi, y):
    """In a format's gemm `fmt` and `size` are constants (literal types): the loop holds that format's
    block dot for that tile alone, and a single token's store is a scalar one."""
    if not (isinstance(fmt, types.IntegerLiteral) and isinstance(size, types.IntegerLiteral)):
        return None
    dot = simd.DOTS[fmt.literal_value][size.literal_value]
    if size.literal_value == 1:
        def impl(fmt, size, w, row_bytes, s, m, ss, sm, n_groups, x, xd, xqsum, t0, n_blocks, bias_factor, r_lo,
                 r_hi, y):
            for r in range(r_lo, r_hi):
                y[t0, r] = dot(w, r * row_bytes, s, m, ss, sm, r * n_groups, x, xd, xqsum, t0, n_blocks, bias_factor)
    else:
        def impl(fmt, size, w, row_bytes, s, m, ss, sm, n_groups, x, xd, xqsum, t0, n_blocks, bias_factor, r_lo,
                 r_hi, y):
            for r in range(r_lo, r_hi):
                _store_tile(y, t0, r, dot(w, r * row_bytes, s, m, ss, sm, r * n_groups, x, xd, xqsum, t0, n_blocks,
                                          bias_factor))
    return impl


def _make_gemm(fmt: int):
    """The gemm of one packed format. Numba types the captured int as a constant, so each is compiled, and
    cached, as if written out for its format alone (one function holding every format's loops ran its
    prefill tiles ~10% slower: LLVM allocated registers for the largest)."""

    @njit(parallel=True, cache=True)
    def gemm(w, s, m, ss, sm, bias_factor, xq, xd, xqsum, y):
        rows, row_bytes = w.shape
        n = y.shape[0]
        n_blocks = xd.shape[0] // n
        n_groups = s.shape[1]  # per row: B*G
        wf, sf, mf, ssf, smf = w.reshape(-1), s.reshape(-1), m.reshape(-1), ss.reshape(-1), sm.reshape(-1)
        n_chunks = (rows + ROW_CHUNK - 1) // ROW_CHUNK
        for c in prange(n_chunks):
            r_lo = c * ROW_CHUNK
            r_hi = min(rows, r_lo + ROW_CHUNK)
            t0 = 0
            while t0 + TOKEN_TILE <= n:  # prefill: tiles of tokens, each weight row decoded once per tile
                dot_rows(fmt, TOKEN_TILE, wf, row_bytes, sf, mf, ssf, smf, n_groups, xq, xd, xqsum, t0, n_blocks,
                         bias_factor, r_lo, r_hi, y)
                t0 += TOKEN_TILE
            while t0 + SMALL_TILE <= n:  # a few sequences' decode step (on the paths whose tiles are larger)
                dot_rows(fmt, SMALL_TILE, wf, row_bytes, sf, mf, ssf, smf, n_groups, xq, xd, xqsum, t0, n_blocks,
                         bias_factor, r_lo, r_hi, y)
                t0 += SMALL_TILE
            while t0 + PAIR_TILE <= n:
                dot_rows(fmt, PAIR_TILE, wf, row_bytes, sf, mf, ssf, smf, n_groups, xq, xd, xqsum, t0, n_blocks,
                         bias_factor, r_lo, r_hi, y)
                t0 += PAIR_TILE
            for t in range(t0, n):  # single tokens: row after row, one sequential stream through the weights
                dot_rows(fmt, 1, wf, row_bytes, sf, mf, ssf, smf, n_groups, xq, xd, xqsum, t, n_blocks, bias_factor,
                         r_lo, r_hi, y)

    return gemm


GEMMS = {code: _make_gemm(code) for code in simd.FORMAT_CODES.values()}


def gemm_quant(fmt, w, s, m, ss, sm, bias_factor, xq, xd, xqsum, y):
    """y (n, R) for packed weights of format code `fmt`: w (R, B*P), scales s (R, B*G) as float16 bits
    (uint16) or int8 with super-scales ss (R, B // 8) float32 (else (R, 0)), bias coefficients m and sm
    alike (the mins, or the scales for formats with an offset; bias_factor 1 or -offset); xq (n*B*32,)
    int8, xd (n*B,), xqsum (n*B*G,) the per-group sums of the quantized x (all C-contiguous)."""
    GEMMS[fmt](w, s, m, ss, sm, bias_factor, xq, xd, xqsum, y)


@njit(cache=True, fastmath={"reassoc", "contract"})
def _dot_dense(w, r, x, t):
    """w[r] . x[t] in float32 (the loop vectorizes: reassociation allowed)."""
    acc = np.float32(0.0)
    for j in range(w.shape[1]):
        acc += w[r, j] * x[t, j]
    return acc


@njit(parallel=True, cache=True)
def gemm_f32(w, x, y):
    """y (n, R) = x (n, C) @ w (R, C).T in float32 (dense weights). A chunk of weight rows stays in cache
    while tiles of DENSE_TOKEN_TILE tokens pass over it; every output is one `_dot_dense` call."""
    rows = w.shape[0]
    n = x.shape[0]
    n_chunks = (rows + ROW_CHUNK - 1) // ROW_CHUNK
    for c in prange(n_chunks):
        for t0 in range(0, n, DENSE_TOKEN_TILE):
            for r in range(c * ROW_CHUNK, min(rows, c * ROW_CHUNK + ROW_CHUNK)):
                for t in range(t0, min(n, t0 + DENSE_TOKEN_TILE)):
                    y[t, r] = _dot_dense(w, r, x, t)
