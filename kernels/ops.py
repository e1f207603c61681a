"""The transformer's element-wise kernels (everything but the matmuls and attention), in Numba.

Attention over the KV cache is kernels/attention.py.

Letters used in shape comments:
    n   rows (tokens) in this call     d   model width (or any row width)
    H   heads      hd   head dimension     f   SwiGLU hidden width

Every kernel writes into an output array the caller passes (no hidden allocation of big buffers), takes
C-contiguous float32 arrays, and runs unchanged with NUMBA_DISABLE_JIT=1.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kawai.kernels import isa  # noqa: F401  (before any @njit: it fixes Numba's target, kernels/isa.py)


@njit(cache=True)
def rms_norm(x, weight, eps, out):
    """out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * weight.  x, out (n, d); weight (d,). out may be x."""
    n, d = x.shape
    for i in range(n):
        row = x[i]
        ss = 0.0  # float64 accumulator
        for j in range(d):
            ss += row[j] * row[j]
        inv = np.float32(1.0 / math.sqrt(ss / d + eps))
        o = out[i]
        for j in range(d):
            o[j] = row[j] * inv * weight[j]


@njit(cache=True)
def rope(x, positions, inv_freq, neox):
    """Rotate query or key heads in place by their position.  x (n, H, hd); positions (n,) int;
    inv_freq (hd/2,) float32, already divided by any linear scaling factor.

    neox=True pairs dims (j, j + hd/2) (HF `rotate_half`, Qwen); neox=False pairs (2j, 2j+1) (GGUF Llama).
    Angles are float32 products as in transformers and llama.cpp; cos/sin are shared by all heads.
    """
    n, n_heads, head_dim = x.shape
    half = head_dim // 2
    cos = np.empty(half, np.float32)
    sin = np.empty(half, np.float32)
    for i in range(n):
        pos = np.float32(positions[i])
        for j in range(half):
            angle = pos * inv_freq[j]
            cos[j] = math.cos(angle)
            sin[j] = math.sin(angle)
        for h in range(n_heads):
            v = x[i, h]
            for j in range(half):
                if neox:
                    a, b = j, j + half
                else:
                    a, b = 2 * j, 2 * j + 1
                x0 = v[a]
                x1 = v[b]
                v[a] = x0 * cos[j] - x1 * sin[j]
                v[b] = x0 * sin[j] + x1 * cos[j]


# 2^f = exp(f ln 2) by its Taylor polynomial, highest degree first: (ln 2)^i / i! for i = 6..0. Also used
# by kernels/attention.py's `softmax_tile` (whose cached kernels do not see edits here: clear its cache).
EXP2_TAYLOR = (1.5403530393381606e-4, 1.3333558146428443e-3, 9.618129107628477e-3, 5.550410866482158e-2,
               0.2402265069591007, 0.6931471805599453, 1.0)


@njit(cache=True, fastmath={"contract"})
def exp_inplace(x, n, bits):
    """x[:n] = exp(x[:n]) in float32, for x within about [-87, 88] (clamped beyond); bits (>= n,) int32
    scratch. exp(x) = 2^k * 2^f with k = rint(x * log2 e), |f| <= 1/2: 2^f by its degree-6 Taylor
    polynomial (relative error ~2e-7), 2^k built as float32 exponent bits. Unlike `math.exp`, a scalar
    libm call, both loops vectorize (~4x faster)."""
    for p in range(n):
        t = min(max(x[p] * np.float32(1.4426950408889634), np.float32(-125.0)), np.float32(127.0))
        k = np.float32(np.rint(t))
        f = t - k
        y = np.float32(EXP2_TAYLOR[0])
        for c in EXP2_TAYLOR[1:]:
            y = y * f + np.float32(c)
        x[p] = y
        bits[p] = (np.int32(k) + np.int32(127)) << np.int32(23)
    scale = bits[:n].view(np.float32)  # 2^k
    for p in range(n):
        x[p] *= scale[p]


@njit(cache=True)
def silu_mul(gate, up, out):
    """SwiGLU: out = silu(gate) * up = gate / (1 + exp(-gate)) * up.  gate, up, out (n, f); out may be gate."""
    n, f = gate.shape
    e = np.empty(f, np.float32)  # exp(-gate) of one row
    bits = np.empty(f, np.int32)
    for i in range(n):
        g = gate[i]
        u = up[i]
        o = out[i]
        for j in range(f):
            e[j] = -g[j]
        exp_inplace(e, f, bits)
        for j in range(f):
            o[j] = g[j] / (np.float32(1.0) + e[j]) * u[j]


@njit(cache=True)
def softmax(x):
    """Row-wise softmax in place, max-subtracted.  x (n, d)."""
    n, d = x.shape
    bits = np.empty(d, np.int32)
    for i in range(n):
        _softmax_row(x[i], d, bits)


@njit(cache=True)
def _softmax_row(row, length, bits):
    """Softmax over row[:length] in place (float64 sum); bits (>= length,) int32 scratch."""
    m = row[0]
    for p in range(1, length):
        m = max(m, row[p])
    for p in range(length):
        row[p] -= m
    exp_inplace(row, length, bits)
    total = 0.0
    for p in range(length):
        total += row[p]
    inv = np.float32(1.0 / total)
    for p in range(length):
        row[p] = row[p] * inv
