"""One forward step over several sequences, each with its own KVCache: the continuous-batching kernel.

    logits = forward_batch(cfg, weights, [[t0], [t1, t2, t3], [t4]], [cache0, cache1, cache2])  # (3, V)

Each sequence contributes its new tokens (one for a decode step, a chunk for a prefill) and they are
stacked into one activation matrix, so every projection (QKV, output, gate/up, down, logits) is one
matmul that reads each weight once for the whole batch. Attention stays per sequence, over that
sequence's own cache. The matmul's rows are independent (kernels/matmul.py), norms, RoPE and attention
are per row, so a sequence gets bit for bit the logits it would get alone (tests/engine/test_batching.py).

Letters: B sequences, N stacked tokens (sum of n_b), n_b tokens of sequence b, d d_model, V n_vocab,
H heads, Hkv key/value heads, hd head_dim, f d_ff.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kawai.engine.config import ModelConfig
from kawai.engine.errors import ContextLengthError, KawaiError
from kawai.engine.kv_cache import KVCache
from kawai.engine.model import mlp, output_logits, qkv, rope_inv_freq
from kawai.engine.weights import Weights
from kawai.kernels import ops
from kawai.kernels.attention import attention
from kawai.kernels.matmul import matmul

PREFILL_CHUNK = 128  # the server's prompt tokens per batched step, across all prefilling sequences


def forward_batch(
    cfg: ModelConfig, weights: Weights, tokens: Sequence[Sequence[int]], caches: Sequence[KVCache]
) -> np.ndarray:
    """Run tokens[b] after caches[b]'s contents for every b; logits (B, V) of each sequence's last token.

    Appends each sequence's keys/values to its cache and advances its length. A cache must appear once.
    """
    if len(tokens) != len(caches) or not tokens:
        raise KawaiError(f"forward_batch needs one cache per sequence, got {len(tokens)} and {len(caches)}")
    if len({id(c) for c in caches}) != len(caches):
        raise KawaiError("forward_batch: a cache appears twice in one batch")
    counts = [len(t) for t in tokens]
    for n, cache in zip(counts, caches):
        if n == 0:
            raise KawaiError("forward_batch: every sequence needs at least one token")
        if n > cache.free:
            raise ContextLengthError(
                f"{n} new tokens do not fit in the context: {cache.length} of {cache.max_seq} positions used"
            )
    ids = np.fromiter((t for seq in tokens for t in seq), dtype=np.int64, count=sum(counts))  # (N,)
    if ids.min() < 0 or ids.max() >= cfg.n_vocab:
        raise KawaiError(f"token ids must be in 0..{cfg.n_vocab - 1}")
    offsets = np.concatenate([[0], np.cumsum(counts)])  # (B+1,) row range of sequence b: offsets[b]:offsets[b+1]
    starts = [c.length for c in caches]
    positions = np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in zip(starts, counts)])  # (N,)
    inv_freq = rope_inv_freq(cfg, weights)  # (hd/2,)

    x = weights.token_embd.lookup(ids)  # (N, d) the residual stream
    h = np.empty_like(x)  # (N, d) normalized input of each sub-layer
    for i, layer in enumerate(weights.layers):
        ops.rms_norm(x, layer.attn_norm, cfg.rms_eps, h)
        x += _attention(cfg, layer, h, positions, inv_freq, caches, starts, offsets, i)
        ops.rms_norm(x, layer.ffn_norm, cfg.rms_eps, h)
        x += mlp(layer, h)
    for cache, start, n in zip(caches, starts, counts):
        cache.length = start + n
    last = np.ascontiguousarray(x[offsets[1:] - 1])  # (B, d) each sequence's last token
    out = np.empty_like(last)
    ops.rms_norm(last, weights.output_norm, cfg.rms_eps, out)
    return output_logits(weights, out)  # (B, V), as forward() computes them


def _attention(cfg, layer, h, positions, inv_freq, caches, starts, offsets, i) -> np.ndarray:
    """Stacked QKV and output projections; attention per sequence over its own cache. h (N, d) -> (N, d)."""
    n = h.shape[0]
    q, k, v = qkv(cfg, layer, h, positions, inv_freq)  # (N, H, hd), (N, Hkv, hd) x2

    out = np.empty_like(q)  # (N, H, hd)
    scale = np.float32(cfg.head_dim**-0.5)
    for b, cache in enumerate(caches):
        lo, hi = offsets[b], offsets[b + 1]
        cache.store(i, starts[b], k[lo:hi], v[lo:hi])
        attention(q[lo:hi], cache.k[i], cache.v[i], starts[b], scale, out[lo:hi])
    return matmul(layer.attn_output, out.reshape(n, cfg.q_dim))  # (N, d)
