"""The forward pass shared by Qwen2, Qwen3 and Llama: tokens in, logits out, keys and values into the cache.

    embed -> n_layers x [ RMSNorm -> attention (QKV, +bias, +QK-norm, RoPE, cache, GQA) -> residual
                          RMSNorm -> SwiGLU MLP -> residual ]
          -> final RMSNorm -> output projection -> logits

The architectures differ only by flags on ModelConfig (qkv_bias, qk_norm, rope_style, tied_output,
rope_sections). The model holds no state: each sequence's KVCache is passed in, and the positions of its
new tokens start at `cache.length` unless the caller gives them (image prompts: engine/vision/).

`forward` is the only layer loop. It runs one step of B sequences at once (a continuous-batching step:
prompt chunks next to decode tokens); a single sequence is B = 1. Splitting prompts into chunks is the
caller's job (engine/scheduler.py).

Letters used in shape comments:
    B  sequences in the step     n  rows of one sequence's chunk      N  rows of all of them (sum of n)
    d  d_model       H  n_heads      Hkv  n_kv_heads    hd  head_dim    f  d_ff    V  n_vocab
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kawai.engine.config import ModelConfig
from kawai.engine.errors import ContextLengthError, KawaiError
from kawai.engine.kv_cache import KVCache
from kawai.engine.vision.mrope import rope_multi
from kawai.engine.weights import LayerWeights, Weights
from kawai.kernels import ops
from kawai.kernels.attention import attention as causal_attention
from kawai.kernels.matmul import matmul, matmul_stacked
from kawai.kernels.matmul_precise import matmul_top_exact


@dataclass(frozen=True, eq=False)
class Chunk:
    """What one sequence feeds the model in one step: a decode step's token(s) or a slice of its prompt.

    Image rows (engine/vision/) carry their input as `embeddings` instead of a token-embedding lookup;
    their ids (the image pad id) are still what the cache records."""

    ids: np.ndarray  # (n,) token ids
    positions: np.ndarray | None = None  # (n,), or (3, n) t/h/w for M-RoPE; None: cache.length + 0..n-1
    embeddings: np.ndarray | None = None  # (m, d) input rows given by the caller (image embeddings) ...
    embedding_rows: np.ndarray | None = None  # (m,) ... and the rows of the chunk they stand for
    all_logits: bool = False  # logits of every row (teacher forcing), else of the last one
    prompt: bool = True  # prompt (or teacher-forced) rows; False: a decode step's generated token(s)


def forward(cfg: ModelConfig, weights: Weights, chunks: Sequence[Chunk], caches: Sequence[KVCache]) -> list[np.ndarray]:
    """Run chunks[b] after caches[b]'s contents for every sequence b; their keys, values and ids go to
    caches[b]. Returns per sequence float32 logits (n_b, V) with `all_logits`, else (1, V) of its last row.

    The B chunks are stacked into one activation matrix (N rows), so every projection is one matmul that
    reads each weight once for the whole step; attention is per sequence, over its own cache. Rows are
    independent (matmuls, norms and RoPE work row by row), so a sequence gets bit for bit the logits it
    would get alone (tests/engine/test_model_batch.py). Nothing is written to a cache unless every check passes;
    a cache's ids advance only once every layer has stored its keys and values.

    On CPUs with AMX, prompt rows run their layers' matmuls on the tile kernels and decode steps' rows on
    the vector kernels (kernels/matmul.py `tile_rows`): a property of the row, not of the batch, so the
    bit-for-bit promise holds. The prompt chunks go first in the stacked rows (`tiles` of them).
    """
    checked = [check_chunk(cfg, c, cache) for c, cache in _pairs(chunks, caches)]
    order = sorted(range(len(checked)), key=lambda b: not checked[b].prompt)  # prompt chunks first
    chunks, caches = [checked[b] for b in order], [caches[b] for b in order]
    counts = [c.ids.shape[0] for c in chunks]
    offsets = np.concatenate([[0], np.cumsum(counts)])  # (B+1,) sequence b owns rows offsets[b]:offsets[b+1]
    starts = [cache.length for cache in caches]
    ids = np.concatenate([c.ids for c in chunks]) if len(chunks) > 1 else chunks[0].ids  # (N,)
    tiles = sum(n for c, n in zip(chunks, counts) if c.prompt)  # rows 0..tiles-1: prompt rows

    x = weights.token_embd.lookup(ids)  # (N, d) the residual stream
    for b, c in enumerate(chunks):
        if c.embeddings is not None:
            x[offsets[b] + c.embedding_rows] = c.embeddings
    ropes = _rope_runs(chunks, starts, offsets)
    inv_freq = rope_inv_freq(cfg, weights)  # (hd/2,)

    h = np.empty_like(x)  # (N, d) normalized input of each sub-layer
    for i, layer in enumerate(weights.layers):
        ops.rms_norm(x, layer.attn_norm, cfg.rms_eps, h)
        x += attention(cfg, layer, h, ropes, inv_freq, caches, starts, offsets, i, tiles)
        ops.rms_norm(x, layer.ffn_norm, cfg.rms_eps, h)
        x += mlp(layer, h, tiles)
    for c, cache in zip(chunks, caches):
        cache.advance(c.ids)

    rows = [np.arange(lo, hi) if c.all_logits else np.array([hi - 1]) for c, lo, hi in zip(chunks, offsets, offsets[1:])]
    last = np.ascontiguousarray(x[np.concatenate(rows)])  # (R, d) the rows that need logits
    out = np.empty_like(last)
    ops.rms_norm(last, weights.output_norm, cfg.rms_eps, out)
    logits = output_logits(weights, out)  # (R, V)
    bounds = np.cumsum([len(r) for r in rows])[:-1]
    ordered = np.split(logits, bounds) if len(rows) > 1 else [logits]
    result = [None] * len(ordered)
    for b, logits_b in zip(order, ordered):  # back to the callers' order
        result[b] = logits_b
    return result


def output_logits(weights: Weights, h: np.ndarray) -> np.ndarray:
    """Final normalized states h (n, d) -> float32 logits (n, V). The logits near each token's largest are
    recomputed exactly (kernels/matmul_precise.py): int8 activations would flip near-ties at the top.
    Always the vector kernels (tiles=0): a row's logits must not depend on how many rows want theirs."""
    return matmul_top_exact(weights.output, h, tiles=0)


def _rope_runs(chunks: list[Chunk], starts: list[int], offsets: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """Rotation positions as runs of rows (lo, hi, positions (n,) or (3, n)): neighbouring sequences of
    the same kind share one run, so a text-only step rotates all its rows in one call. Text rows keep the
    plain rotation next to M-RoPE rows: each row turns exactly as it would alone."""
    runs: list[tuple[int, int, np.ndarray]] = []
    for c, start, lo, hi in zip(chunks, starts, offsets, offsets[1:]):
        pos = np.arange(start, start + (hi - lo), dtype=np.int64) if c.positions is None else c.positions
        if runs and runs[-1][2].ndim == pos.ndim:
            prev_lo, _, prev = runs[-1]
            runs[-1] = (prev_lo, hi, np.concatenate([prev, pos], axis=-1))
        else:
            runs.append((lo, hi, pos))
    return runs


def attention(
    cfg: ModelConfig,
    layer: LayerWeights,
    h: np.ndarray,
    ropes: list[tuple[int, int, np.ndarray]],
    inv_freq: np.ndarray,
    caches: Sequence[KVCache],
    starts: list[int],
    offsets: np.ndarray,
    i: int,
    tiles: int | None = None,
) -> np.ndarray:
    """Self-attention of each sequence's new rows over its cache. h (N, d) -> (N, d).
    Stacked QKV and output projections; sequence b's keys go to its cache slots starts[b].. . A cache
    reading a shared prefix (engine/kv_cache.py) attends over it and its own positions together."""
    n = h.shape[0]
    q, k, v = qkv(cfg, layer, h, ropes, inv_freq, tiles)  # (N, H, hd), (N, Hkv, hd) x2

    out = np.empty_like(q)  # (N, H, hd)
    scale = np.float32(cfg.head_dim**-0.5)
    for b, cache in enumerate(caches):
        lo, hi = offsets[b], offsets[b + 1]
        cache.store(i, starts[b], k[lo:hi], v[lo:hi])
        shared = None if cache.shared is None else (cache.shared.k[i], cache.shared.v[i], cache.base)
        causal_attention(q[lo:hi], cache.k[i], cache.v[i], starts[b] - cache.base, scale, out[lo:hi], prefix=shared)
    return matmul(layer.attn_output, out.reshape(n, cfg.q_dim), tiles)  # (N, d)


def qkv(
    cfg: ModelConfig, layer: LayerWeights, h: np.ndarray, ropes: list[tuple[int, int, np.ndarray]], inv_freq: np.ndarray,
    tiles: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Queries, keys and values of the new rows, rotated to their positions.
    h (N, d) -> q (N, H, hd), k (N, Hkv, hd), v (N, Hkv, hd); ropes: runs of rows and their positions.
    The projections get ~15-bit activations (kernels/matmul_precise.py): softmax amplifies q.k errors."""
    n = h.shape[0]
    q, k, v = matmul_stacked(layer.attn_qkv, h, precise=True, tiles=tiles)  # (N, H*hd), (N, Hkv*hd) x2
    if cfg.qkv_bias:
        q += layer.attn_q_bias
        k += layer.attn_k_bias
        v += layer.attn_v_bias
    q = q.reshape(n, cfg.n_heads, cfg.head_dim)  # (N, H, hd)
    k = k.reshape(n, cfg.n_kv_heads, cfg.head_dim)  # (N, Hkv, hd)
    v = v.reshape(n, cfg.n_kv_heads, cfg.head_dim)  # (N, Hkv, hd)
    if cfg.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
        ops.rms_norm(q.reshape(-1, cfg.head_dim), layer.attn_q_norm, cfg.rms_eps, q.reshape(-1, cfg.head_dim))
        ops.rms_norm(k.reshape(-1, cfg.head_dim), layer.attn_k_norm, cfg.rms_eps, k.reshape(-1, cfg.head_dim))
    for lo, hi, positions in ropes:
        if positions.ndim == 2:  # M-RoPE: image tokens turn some pairs by their row / column
            rope_multi(q[lo:hi], positions, inv_freq, cfg.rope_sections)
            rope_multi(k[lo:hi], positions, inv_freq, cfg.rope_sections)
        else:
            neox = cfg.rope_style == "neox"
            ops.rope(q[lo:hi], positions, inv_freq, neox)
            ops.rope(k[lo:hi], positions, inv_freq, neox)
    return q, k, v


def mlp(layer: LayerWeights, h: np.ndarray, tiles: int | None = None) -> np.ndarray:
    """SwiGLU: down(silu(gate(h)) * up(h)). h (n, d) -> (n, d). tiles: the leading rows that may run on
    AMX tiles (kernels/matmul.py `tile_rows`)."""
    gate, up = matmul_stacked(layer.ffn_gate_up, h, tiles=tiles)  # (n, f) x2
    ops.silu_mul(gate, up, gate)
    return matmul(layer.ffn_down, gate, tiles)


def rope_inv_freq(cfg: ModelConfig, weights: Weights) -> np.ndarray:
    """Rotation speed of each dimension pair (hd/2,) float32: base^(-2j/hd), divided by the linear
    scaling factor and by Llama 3's per-pair `rope_freqs` when present (as llama.cpp does)."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_base**exponents) / cfg.rope_scaling_factor
    if weights.rope_freqs is not None:
        inv_freq = inv_freq / weights.rope_freqs
    return inv_freq.astype(np.float32)


# ---- input checks: the one place ids, embeddings, positions and context are validated ----------------


def _pairs(chunks: Sequence[Chunk], caches: Sequence[KVCache]):
    if len(chunks) != len(caches) or not chunks:
        raise KawaiError(f"forward needs one cache per sequence, got {len(chunks)} chunks and {len(caches)} caches")
    if len({id(c) for c in caches}) != len(caches):
        raise KawaiError("forward: a cache appears twice in one step")
    return zip(chunks, caches)


def check_chunk(cfg: ModelConfig, chunk: Chunk, cache: KVCache) -> Chunk:
    """The chunk with its arrays checked and made contiguous; KawaiError naming what is wrong, and
    ContextLengthError when its rows do not fit the cache."""
    ids = check_ids(cfg, chunk.ids)
    n = ids.shape[0]
    if n > cache.free:
        raise ContextLengthError(
            f"{n} new tokens do not fit in the context: {cache.length} of {cache.max_seq} positions used"
        )
    positions = None if chunk.positions is None else _check_positions(cfg, chunk.positions, n)
    embeddings, rows = chunk.embeddings, chunk.embedding_rows
    if (embeddings is None) != (rows is None):
        raise KawaiError("embeddings and embedding_rows go together")
    if embeddings is not None:
        rows = np.asarray(rows)
        if rows.ndim != 1 or rows.dtype.kind not in "iu" or (rows.size and (rows.min() < 0 or rows.max() >= n)):
            raise KawaiError(f"embedding_rows must be row indices in 0..{n - 1}")
        embeddings = _check_embeddings(cfg, embeddings, rows.shape[0])
        rows = rows.astype(np.int64)
    return Chunk(ids, positions, embeddings, rows, chunk.all_logits, chunk.prompt)


def check_ids(cfg: ModelConfig, ids) -> np.ndarray:
    """A non-empty 1-D array of token ids within the vocabulary (a negative id would silently index
    from the end), as int64."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0:
        raise KawaiError(f"tokens must be a non-empty 1-D sequence, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise KawaiError(f"token ids must be integers, got {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= cfg.n_vocab:
        raise KawaiError(f"token ids must be in 0..{cfg.n_vocab - 1}, got {lo if lo < 0 else hi}")
    return np.ascontiguousarray(ids, dtype=np.int64)


def _check_embeddings(cfg: ModelConfig, embeddings, m: int) -> np.ndarray:
    embeddings = np.asarray(embeddings)
    if embeddings.shape != (m, cfg.d_model):
        raise KawaiError(f"embeddings must have shape ({m}, {cfg.d_model}), got {embeddings.shape}")
    if not np.all(np.isfinite(embeddings)):
        raise KawaiError("embeddings hold NaN or infinite values")
    return np.ascontiguousarray(embeddings, dtype=np.float32)


def _check_positions(cfg: ModelConfig, positions, n: int) -> np.ndarray:
    """(n,) positions, or (3, n) t/h/w positions for an M-RoPE model; non-negative integers."""
    positions = np.asarray(positions)
    shapes = [(n,)] + ([(3, n)] if cfg.rope_sections else [])
    if positions.shape not in shapes or positions.dtype.kind not in "iu":
        raise KawaiError(f"positions must be integers of shape {' or '.join(map(str, shapes))}, got {positions.shape}")
    if positions.size and int(positions.min()) < 0:
        raise KawaiError("positions must be non-negative")
    return np.ascontiguousarray(positions, dtype=np.int64)
