"""Numeric pieces of the vision encoder that the text model does not have: LayerNorm, GELU variants and
bidirectional (non-causal) attention over a set of patches. RMSNorm and SiLU*up come from kernels/ops.py.

Letters: n patches (rows), d row width, H heads, hd head dimension.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from kawai.kernels import isa  # noqa: F401  (before any @njit: it fixes Numba's target, kernels/isa.py)

ATTENTION_BLOCK = 256  # query rows per score block: bounds the (H, block, n) score matrix


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis. x (n, d) float32 -> (n, d)."""
    mean = x.mean(axis=-1, keepdims=True, dtype=np.float64)
    centered = (x - mean).astype(np.float32)
    var = np.mean(np.square(centered, dtype=np.float64), axis=-1, keepdims=True)
    inv = (1.0 / np.sqrt(var + eps)).astype(np.float32)
    return centered * inv * weight + bias


@njit(cache=True, parallel=True)
def gelu(x):
    """Exact GELU in place: x * (1 + erf(x / sqrt(2))) / 2 (torch's nn.GELU()).  x (n, d) float32."""
    n, d = x.shape
    for i in prange(n):
        row = x[i]
        for j in range(d):
            v = row[j]
            row[j] = np.float32(0.5 * v * (1.0 + math.erf(v * 0.7071067811865476)))


def quick_gelu(x: np.ndarray) -> None:
    """In place: x * sigmoid(1.702 x) (CLIP's QuickGELU, Qwen2-VL's encoder MLP)."""
    x *= np.float32(1.0) / (np.float32(1.0) + np.exp(np.float32(-1.702) * x))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, out: np.ndarray) -> None:
    """Every query row attends to every key row (no mask). q, k, v (n, H, hd) -> out (n, H, hd).

    Queries go in blocks so the scores stay (H, block, n); softmax in float32 with the max subtracted.
    """
    n = q.shape[0]
    qh = np.ascontiguousarray(q.transpose(1, 0, 2)) * np.float32(scale)  # (H, n, hd)
    kt = np.ascontiguousarray(k.transpose(1, 2, 0))  # (H, hd, n)
    vh = np.ascontiguousarray(v.transpose(1, 0, 2))  # (H, n, hd)
    for lo in range(0, n, ATTENTION_BLOCK):
        hi = min(n, lo + ATTENTION_BLOCK)
        scores = np.matmul(qh[:, lo:hi], kt)  # (H, b, n)
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out[lo:hi] = np.matmul(scores, vh).transpose(1, 0, 2)  # (b, H, hd)
