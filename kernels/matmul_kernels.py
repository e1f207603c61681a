"""Numba kernels behind kernels/matmul.py: activation quantization, and y = x @ W.T per packed format.

Letters used in shape comments:
    n  tokens (rows of x)     R  weight rows (outputs)     C  cols (inputs)
    B  = C // 32 blocks       G  scales per block (1, or 2 for one per 16 weights)   P  bytes per block

Weights (kernels/matmul_pack.py): w (R, B*P) uint8 holding unsigned (or, for FMT_S8, signed) quants,
scales s (R, B*G) and mins m (R, B*G) or (R, 0), and a constant `offset`:

    w[r, k] = s[r, k // g] * (q[r, k] - offset) + m[r, k // g]          g = 32 // G

Activations are quantized once per call to int8 per block of 32 (Q8_0-like: d = amax / 127). Then

    y[t, r] = sum_b sum_g s*d*isum  +  sum_g (m - offset * s) * xqsum[t, g]

where isum is the int32 block dot product and xqsum the sums of the quantized x per group: with them the
result is exactly W @ (quantized x), so the error scales with the weights, not with the stored quants. The first term comes
from the row dot products of kernels/matmul_simd.py (AVX2 intrinsics, or their portable plain-loop
definition elsewhere). Work is split over chunks of output rows
(`prange`); each chunk is swept once per tile of TOKEN_TILE tokens, so prefill reads each weight block
once for several tokens. Every (token, row) output goes through the same float operations whatever n is.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels import matmul_simd as simd

ROW_CHUNK = 16  # output rows per parallel work item
TOKEN_TILE = 4  # tokens per sweep over a chunk of weight rows (the `_t4` intrinsics)

FMT_S8, FMT_U8, FMT_U4, FMT_U5 = simd.FMT_S8, simd.FMT_U8, simd.FMT_U4, simd.FMT_U5


@njit(cache=True)
def quantize_activations(x, xq, xd, xqsum16):
    """x (n, C) f32 -> xq (n, B*32) int8, xd (n, B) scales, xqsum16 (n, 2B) sums of the quantized x per
    16 (d * sum q)."""
    n, cols = x.shape
    n_blocks = cols // 32
    for t in range(n):
        for b in range(n_blocks):
            xb = x[t, b * 32 : b * 32 + 32]
            amax = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(xb[j]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            for half in range(2):
                qs = 0
                for j in range(16 * half, 16 * half + 16):
                    q = int(np.rint(xb[j] * inv))
                    xq[t, b * 32 + j] = q
                    qs += q
                xqsum16[t, 2 * b + half] = d * np.float32(qs)
            xd[t, b] = d


@njit(cache=True, fastmath={"reassoc", "contract"})
def _dot_f32(a, a_off, b, b_off, n):
    """sum(a[a_off:a_off+n] * b[b_off:b_off+n]) in float32 (slices, so the loop vectorizes)."""
    a = a[a_off : a_off + n]
    b = b[b_off : b_off + n]
    acc = np.float32(0.0)
    for i in range(n):
        acc += a[i] * b[i]
    return acc


@njit(cache=True)
def _isum_t1(fmt, w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks):
    if fmt == FMT_S8:
        return simd.dot_s8_t1(w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks)
    if fmt == FMT_U8:
        return simd.dot_u8_g16_t1(w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks)
    if fmt == FMT_U4:
        return simd.dot_u4_t1(w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks)
    return simd.dot_u5_t1(w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks)


@njit(cache=True)
def _isum_t4(fmt, w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks):
    if fmt == FMT_S8:
        return simd.dot_s8_t4(w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks)
    if fmt == FMT_U8:
        return simd.dot_u8_g16_t4(w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks)
    if fmt == FMT_U4:
        return simd.dot_u4_t4(w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks)
    return simd.dot_u5_t4(w, w_off, s, s_off, x, x_off, xd, xd_off, n_blocks)


@njit(parallel=True, cache=True)
def gemm_quant(fmt, w, s, m, offset, xq, xd, xqsum, y):
    """y (n, R) for packed weights w (R, B*P), s and m (R, B*G); xq (n*B*32,) int8, xd (n*B,), and
    xqsum (n*B*G,) the per-group sums of the quantized x (all flattened, C-contiguous)."""
    rows = w.shape[0]
    n = y.shape[0]
    n_blocks = xd.shape[0] // n
    n_groups_row = s.shape[1]  # B*G
    has_min = m.shape[1] > 0
    wf = w.reshape(-1)
    sf = s.reshape(-1)
    mf = m.reshape(-1)
    row_bytes = w.shape[1]
    n_chunks = (rows + ROW_CHUNK - 1) // ROW_CHUNK
    for c in prange(n_chunks):
        out = np.empty(TOKEN_TILE, np.float32)
        for t0 in range(0, n, TOKEN_TILE):
            nt = min(TOKEN_TILE, n - t0)
            for r in range(c * ROW_CHUNK, min(rows, c * ROW_CHUNK + ROW_CHUNK)):
                w_off = r * row_bytes
                s_off = r * n_groups_row
                if nt == TOKEN_TILE:
                    out[0], out[1], out[2], out[3] = _isum_t4(
                        fmt, wf, w_off, sf, s_off, xq, t0 * n_blocks * 32, xd, t0 * n_blocks, n_blocks)
                else:
                    for i in range(nt):
                        t = t0 + i
                        out[i] = _isum_t1(fmt, wf, w_off, sf, s_off, xq, t * n_blocks * 32, xd, t * n_blocks,
                                          n_blocks)
                for i in range(nt):
                    t = t0 + i
                    v = out[i]
                    if has_min:
                        v += _dot_f32(mf, s_off, xqsum, t * n_groups_row, n_groups_row)
                    if offset != 0:
                        v -= np.float32(offset) * _dot_f32(sf, s_off, xqsum, t * n_groups_row, n_groups_row)
                    y[t, r] = v


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
                acc = np.float32(0.0)
                for j in range(cols):
                    acc += wr[j] * xt[j]
                y[t, r] = acc
