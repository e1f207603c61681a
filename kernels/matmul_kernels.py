"""Numba kernels behind kernels/matmul.py: activation quantization and y = x @ W.T per weight layout.

Letters used in shape comments:
    n  tokens (rows of x)     R  weight rows (outputs)     C  cols (inputs)
    B  = C // 32, blocks of 32 weights                     G  scales per 32-block (1 or 2)

Activations are quantized once per call to int8 per block of 32 (Q8_0-like: d = amax / 127), with
exact float sums per 16 for the formats that carry a min. A block dot product stays in int32 and is
scaled once per block (or once per 16 for G = 2). Work is split over output rows in chunks (`prange`);
each weight block is read once and applied to all n tokens, so prefill reads the weights once.

Integer sums are written `np.int32(s + np.int32(a) * np.int32(b))`: without the wraps Numba widens to
int64 and LLVM cannot use vpmaddwd. Every (token, row) output is computed by the same instruction
sequence whatever n is, so a row of a prefill equals the same token decoded alone, bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

ROW_CHUNK = 16  # output rows per parallel work item
TOKEN_TILE = 8  # tokens per pass over a chunk of weight rows (keeps their activations in L1)


@njit(cache=True)
def quantize_activations(x, xq, xd, xs16):
    """x (n, C) f32 -> xq (n, B, 32) int8, xd (n, B) f32 scales, xs16 (n, 2B) f32 exact sums per 16."""
    n, cols = x.shape
    n_blocks = cols // 32
    for t in range(n):
        for b in range(n_blocks):
            xb = x[t, b * 32 : b * 32 + 32]
            amax = np.float32(0.0)
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            for j in range(16):
                s0 += xb[j]
                s1 += xb[j + 16]
            for j in range(32):
                amax = max(amax, abs(xb[j]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            for j in range(32):
                xq[t, b, j] = np.int8(np.rint(xb[j] * inv))
            xd[t, b] = d
            xs16[t, 2 * b] = s0
            xs16[t, 2 * b + 1] = s1


@njit(cache=True)
def _dot32(w, x):
    """int32 dot of two int8 (32,) blocks."""
    s = np.int32(0)
    for j in range(32):
        s = np.int32(s + np.int32(w[j]) * np.int32(x[j]))
    return s


@njit(cache=True)
def _dot16(w, x, off):
    """int32 dot of w[off:off+16] and x[off:off+16]."""
    s = np.int32(0)
    for j in range(16):
        s = np.int32(s + np.int32(w[off + j]) * np.int32(x[off + j]))
    return s


@njit(parallel=True, cache=True)
def gemm_q8(qw, sw, xq, xd, y):
    """y (n, R) = x @ W.T with W = sw * qw: qw (R, B, 32) int8, sw (R, B) f32; xq (n, B, 32), xd (n, B)."""
    rows, n_blocks, _ = qw.shape
    n = xq.shape[0]
    n_chunks = (rows + ROW_CHUNK - 1) // ROW_CHUNK
    for c in prange(n_chunks):
        acc = np.empty(TOKEN_TILE, np.float32)
        for t0 in range(0, n, TOKEN_TILE):
            nt = min(TOKEN_TILE, n - t0)
            for r in range(c * ROW_CHUNK, min(rows, c * ROW_CHUNK + ROW_CHUNK)):
                acc[:] = 0.0
                for b in range(n_blocks):
                    wb = qw[r, b]
                    scale = sw[r, b]
                    for i in range(nt):
                        s = _dot32(wb, xq[t0 + i, b])
                        acc[i] += scale * xd[t0 + i, b] * np.float32(s)
                for i in range(nt):
                    y[t0 + i, r] = acc[i]


@njit(parallel=True, cache=True)
def gemm_q8_min(qw, sw, mw, xq, xd, xs16, y):
    """As gemm_q8 with a min per block: W = sw * qw + mw; mw (R, B) f32; xs16 (n, 2B) sums of x per 16."""
    rows, n_blocks, _ = qw.shape
    n = xq.shape[0]
    n_chunks = (rows + ROW_CHUNK - 1) // ROW_CHUNK
    for c in prange(n_chunks):
        acc = np.empty(TOKEN_TILE, np.float32)
        for t0 in range(0, n, TOKEN_TILE):
            nt = min(TOKEN_TILE, n - t0)
            for r in range(c * ROW_CHUNK, min(rows, c * ROW_CHUNK + ROW_CHUNK)):
                acc[:] = 0.0
                for b in range(n_blocks):
                    wb = qw[r, b]
                    scale = sw[r, b]
                    mn = mw[r, b]
                    for i in range(nt):
                        t = t0 + i
                        s = _dot32(wb, xq[t, b])
                        acc[i] += scale * xd[t, b] * np.float32(s) + mn * (xs16[t, 2 * b] + xs16[t, 2 * b + 1])
                for i in range(nt):
                    y[t0 + i, r] = acc[i]


@njit(parallel=True, cache=True)
def gemm_q8_g16(qw, sw, mw, xq, xd, xs16, y):
    """Scales (and optional mins) per 16 weights: sw, mw (R, 2B) f32; mw may be (R, 0) for no mins."""
    rows, n_blocks, _ = qw.shape
    n = xq.shape[0]
    has_min = mw.shape[1] > 0
    n_chunks = (rows + ROW_CHUNK - 1) // ROW_CHUNK
    for c in prange(n_chunks):
        acc = np.empty(TOKEN_TILE, np.float32)
        for t0 in range(0, n, TOKEN_TILE):
            nt = min(TOKEN_TILE, n - t0)
            for r in range(c * ROW_CHUNK, min(rows, c * ROW_CHUNK + ROW_CHUNK)):
                acc[:] = 0.0
                for b in range(n_blocks):
                    wb = qw[r, b]
                    s_lo = sw[r, 2 * b]
                    s_hi = sw[r, 2 * b + 1]
                    for i in range(nt):
                        t = t0 + i
                        xb = xq[t, b]
                        lo = _dot16(wb, xb, 0)
                        hi = _dot16(wb, xb, 16)
                        v = xd[t, b] * (s_lo * np.float32(lo) + s_hi * np.float32(hi))
                        if has_min:
                            v += mw[r, 2 * b] * xs16[t, 2 * b] + mw[r, 2 * b + 1] * xs16[t, 2 * b + 1]
                        acc[i] += v
                for i in range(nt):
                    y[t0 + i, r] = acc[i]


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def gemm_f32(w, x, y):
    """y (n, R) = x (n, C) @ w (R, C).T in float32 (dense weights)."""
    rows, cols = w.shape
    n = x.shape[0]
    n_chunks = (rows + ROW_CHUNK - 1) // ROW_CHUNK
    for c in prange(n_chunks):
        for r in range(c * ROW_CHUNK, min(rows, c * ROW_CHUNK + ROW_CHUNK)):
            wr = w[r]
            for t in range(n):
                xt = x[t]
                s = np.float32(0.0)
                for j in range(cols):
                    s += wr[j] * xt[j]
                y[t, r] = s
