"""Quantized matmul with more precise activations: x split into its int8 grid part and the residual.

    split_activations(x) -> (hi, lo)          x (n, C) = hi + lo exactly; hi on each block's int8 grid
    split_activations_reference(x)            the same in NumPy (the spec; tests compare bit for bit)
    matmul_precise(w, x) -> y                 x @ W.T with activations at about 15 bits instead of 8
    precise(multiply, x) -> [y1, y2, ...]     the same for any linear `multiply` (fused, stacked matmuls)
    matmul_top_exact(w, x) -> y               the fast matmul, then each token's top outputs made exact

Letters: n tokens, C cols (inputs), B = C // 32 blocks, R weight rows (outputs).

The fast matmul (kernels/matmul.py) quantizes x to int8 per block of 32 (d = amax / 127), so it computes
W @ x8 exactly, and x - x8 (up to d / 2 per element, about 0.6% of the output norm) is the whole error.
Here x is split per block of 32 with that same rule:

    d  = amax(|x_b|) / 127        hi_b = rint(x_b / d) * d        lo_b = x_b - hi_b   (|lo_b| <= d / 2)

hi is already on the int8 grid, so the matmul re-quantizes it without loss; lo is quantized on its own,
finer grid (its amax is at most d / 2), so what is lost is x - hi - lo8, about 1/254 of the int8 error.
Both halves go through ONE matmul call as 2n tokens: each weight row is read once for both (decode stays
one pass over the weights), and the matmul computes every token independently, so token t's output
y[t] + y[n + t] does not depend on the other tokens (prefill equals decode bit for bit).

hi + lo == x exactly: where q != 0, x and hi are within a factor 2 of each other (Sterbenz: x - hi is
exact in float32); where q == 0, lo is x itself. The price is twice the integer work of the plain call
(docs/quantization.md, "Activation precision", has the measurements), so the engine uses it only for
q, k and v (engine/model.py `qkv`), whose errors the attention softmax amplifies and which are a small
share of the weights.

The engine also uses `matmul_top_exact` for the logits: only the outputs near each token's largest
decide greedy picks, so only those are recomputed, exactly, from the dequantized rows (a few rows per
token instead of the whole vocabulary).
"""

from __future__ import annotations

import numpy as np

from kawai.kernels.matmul import (  # noqa: F401  (the split and `precise`: this module's subject, defined there)
    PARALLEL_SPLIT_TOKENS,
    MatmulError,
    PackedMatrix,
    check_blocks,
    matmul_fused,
    precise,
    select_rows,
    split_activations,
    unpack,
)

TOP_MARGIN = 2.0  # outputs this close to a token's largest one are recomputed by matmul_top_exact
TOP_MAX_ROWS = 256  # at most this many per token (the largest ones)


def split_activations_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """split_activations in NumPy, one block of 32 per row of a (n*B, 32) view."""
    x = check_blocks(x)
    blocks = x.reshape(-1, 32)  # (n*B, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127.0)  # (n*B, 1)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    hi = np.rint(blocks * inv) * d  # float32 throughout
    return hi.reshape(x.shape), (blocks - hi).reshape(x.shape)


def matmul_precise(w: PackedMatrix, x: np.ndarray) -> np.ndarray:
    """y (n, R) = x (n, C) @ W.T for quantized weights, the activations at about 15 bits (`precise` on the
    vector paths, or the AMX kernel's split into bfloat16 parts). Dense weights (already multiplied in
    float32) go straight to the matmul."""
    return matmul_fused([w], x, precise=True)[0]


def top_rows(y: np.ndarray, margin: float, max_rows: int) -> np.ndarray:
    """Indices (k,) of the entries of y (R,) within `margin` of its maximum, at most the `max_rows` largest."""
    rows = np.flatnonzero(y >= y.max() - np.float32(margin))
    if len(rows) > max_rows:
        rows = rows[np.argpartition(y[rows], -max_rows)[-max_rows:]]
    return np.sort(rows)


def matmul_top_exact(
    w: PackedMatrix, x: np.ndarray, margin: float = TOP_MARGIN, max_rows: int = TOP_MAX_ROWS,
    tiles: int | None = None,
) -> np.ndarray:
    """y (n, R) = x (n, C) @ W.T by the fast matmul, then, per token, the outputs within `margin` of its
    largest (at most `max_rows`) recomputed exactly: float64 dot products of x with those rows of W
    dequantized. Meant for the output projection: the logits that decide greedy picks (and carry most of
    the probability when sampling) no longer carry the int8 activation error, for the price of a few rows.

    The int8 error of one logit stays well below the margin (measured: at most about 0.5 on the real
    models, 0.2 at the top), so the token the exact product ranks first is among the recomputed ones.
    A token's rows depend only on its own outputs, so prefill still equals decode bit for bit."""
    y = matmul_fused([w], x, tiles=tiles)[0]  # (n, R); tiles: kernels/matmul.py `tile_rows`
    if w.fmt == "dense":
        return y
    x = check_blocks(x)
    for t in range(y.shape[0]):
        rows = top_rows(y[t], margin, max_rows)  # (k,)
        exact = unpack(select_rows(w, rows)).astype(np.float64) @ x[t].astype(np.float64)  # (k,)
        y[t, rows] = exact.astype(np.float32)
    return y
