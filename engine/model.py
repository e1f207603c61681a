"""The forward pass shared by Qwen2, Qwen3 and Llama: tokens in, logits out, keys and values into the cache.

    embed -> n_layers x [ RMSNorm -> attention (QKV, +bias, +QK-norm, RoPE, cache, GQA) -> residual
                          RMSNorm -> SwiGLU MLP -> residual ]
          -> final RMSNorm -> output projection -> logits

The architectures differ only by flags on ModelConfig (qkv_bias, qk_norm, rope_style, tied_output,
rope_sections). The model holds no state: the KVCache is passed in, and the positions of the new tokens
start at `cache.length` unless the caller gives them (multimodal prompts: engine/vision/).

Letters used in shape comments:
    n  tokens in this chunk      d  d_model       H  n_heads      Hkv  n_kv_heads    hd  head_dim
    f  d_ff                      V  n_vocab
"""

from __future__ import annotations

import numpy as np

from kawai.engine.config import ModelConfig
from kawai.engine.errors import ContextLengthError, KawaiError
from kawai.engine.kv_cache import KVCache
from kawai.engine.vision.mrope import rope_multi
from kawai.engine.weights import LayerWeights, Weights
from kawai.kernels import ops
from kawai.kernels.attention import attention as causal_attention
from kawai.kernels.matmul import matmul, matmul_stacked
from kawai.kernels.matmul_precise import matmul_top_exact, precise

CHUNK = 256  # prompt tokens processed at once: bounds activation memory


def forward(
    cfg: ModelConfig,
    weights: Weights,
    tokens: np.ndarray | None,
    cache: KVCache,
    *,
    all_logits: bool = False,
    embeddings: np.ndarray | None = None,
    positions: np.ndarray | None = None,
) -> np.ndarray:
    """Run `tokens` (n,) after the cache's contents; append their keys/values to `cache`.

    Returns float32 logits (n, V) with `all_logits`, else (1, V) for the last token only.
    Multimodal prompts (engine/vision/multimodal.py) pass `embeddings` (n, d) instead of `tokens` and
    RoPE `positions`: (n,), or (3, n) t/h/w for M-RoPE (cfg.rope_sections). By default token i of the
    chunk sits at position cache.length + i.
    """
    if embeddings is None:
        tokens = _check_tokens(cfg, tokens)
        n = tokens.shape[0]
    else:
        embeddings = _check_embeddings(cfg, embeddings)
        n = embeddings.shape[0]
    if positions is not None:
        positions = _check_positions(cfg, positions, n)
    if n > cache.free:
        raise ContextLengthError(
            f"{n} new tokens do not fit in the context: {cache.length} of {cache.max_seq} positions used"
        )
    logits = []
    for lo in range(0, n, CHUNK):
        if embeddings is None:
            x = weights.token_embd.lookup(tokens[lo : lo + CHUNK])  # (n_chunk, d)
        else:
            x = embeddings[lo : lo + CHUNK].copy()
        chunk_positions = None if positions is None else positions[..., lo : lo + CHUNK]
        x = _forward_chunk(cfg, weights, x, cache, chunk_positions)  # (n_chunk, d) normalized final states
        if all_logits:
            logits.append(output_logits(weights, x))
        elif lo + CHUNK >= n:
            logits.append(output_logits(weights, x[-1:]))
    return logits[0] if len(logits) == 1 else np.concatenate(logits)


def output_logits(weights: Weights, h: np.ndarray) -> np.ndarray:
    """Final normalized states h (n, d) -> float32 logits (n, V). The logits near each token's largest are
    recomputed exactly (kernels/matmul_precise.py): int8 activations would flip near-ties at the top."""
    return matmul_top_exact(weights.output, h)


def _forward_chunk(
    cfg: ModelConfig, weights: Weights, x: np.ndarray, cache: KVCache, positions: np.ndarray | None
) -> np.ndarray:
    """x (n, d) input embeddings, the residual stream (modified in place)."""
    start = cache.length
    n = x.shape[0]
    if positions is None:
        positions = np.arange(start, start + n, dtype=np.int64)  # (n,)
    inv_freq = rope_inv_freq(cfg, weights)  # (hd/2,)

    h = np.empty_like(x)  # (n, d) normalized input of each sub-layer
    for i, layer in enumerate(weights.layers):
        ops.rms_norm(x, layer.attn_norm, cfg.rms_eps, h)
        x += attention(cfg, layer, h, positions, inv_freq, cache, i)
        ops.rms_norm(x, layer.ffn_norm, cfg.rms_eps, h)
        x += mlp(layer, h)
    ops.rms_norm(x, weights.output_norm, cfg.rms_eps, h)
    cache.length = start + n  # only once every layer has stored its keys and values
    return h


def attention(
    cfg: ModelConfig,
    layer: LayerWeights,
    h: np.ndarray,
    positions: np.ndarray,
    inv_freq: np.ndarray,
    cache: KVCache,
    i: int,
) -> np.ndarray:
    """Self-attention of the new tokens over the cached ones. h (n, d) -> (n, d).
    positions (n,), or (3, n) t/h/w for M-RoPE; the new keys go to cache slots cache.length.. ."""
    n = h.shape[0]
    q, k, v = qkv(cfg, layer, h, positions, inv_freq)  # (n, H, hd), (n, Hkv, hd) x2

    start = cache.length
    cache.store(i, start, k, v)
    out = np.empty_like(q)  # (n, H, hd)
    causal_attention(q, cache.k[i], cache.v[i], start, np.float32(cfg.head_dim**-0.5), out)
    return matmul(layer.attn_output, out.reshape(n, cfg.q_dim))  # (n, d)


def qkv(
    cfg: ModelConfig, layer: LayerWeights, h: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Queries, keys and values of the new tokens, rotated to their positions.
    h (n, d) -> q (n, H, hd), k (n, Hkv, hd), v (n, Hkv, hd); positions (n,), or (3, n) for M-RoPE.
    The projections get ~15-bit activations (kernels/matmul_precise.py): softmax amplifies q.k errors."""
    n = h.shape[0]
    q, k, v = precise(lambda x: matmul_stacked(layer.attn_qkv, x), h)  # (n, H*hd), (n, Hkv*hd) x2
    if cfg.qkv_bias:
        q += layer.attn_q_bias
        k += layer.attn_k_bias
        v += layer.attn_v_bias
    q = q.reshape(n, cfg.n_heads, cfg.head_dim)  # (n, H, hd)
    k = k.reshape(n, cfg.n_kv_heads, cfg.head_dim)  # (n, Hkv, hd)
    v = v.reshape(n, cfg.n_kv_heads, cfg.head_dim)  # (n, Hkv, hd)
    if cfg.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
        ops.rms_norm(q.reshape(-1, cfg.head_dim), layer.attn_q_norm, cfg.rms_eps, q.reshape(-1, cfg.head_dim))
        ops.rms_norm(k.reshape(-1, cfg.head_dim), layer.attn_k_norm, cfg.rms_eps, k.reshape(-1, cfg.head_dim))
    if positions.ndim == 2:  # M-RoPE: image tokens turn some pairs by their row / column
        rope_multi(q, positions, inv_freq, cfg.rope_sections)
        rope_multi(k, positions, inv_freq, cfg.rope_sections)
    else:
        neox = cfg.rope_style == "neox"
        ops.rope(q, positions, inv_freq, neox)
        ops.rope(k, positions, inv_freq, neox)
    return q, k, v


def mlp(layer: LayerWeights, h: np.ndarray) -> np.ndarray:
    """SwiGLU: down(silu(gate(h)) * up(h)). h (n, d) -> (n, d)."""
    gate, up = matmul_stacked(layer.ffn_gate_up, h)  # (n, f) x2
    ops.silu_mul(gate, up, gate)
    return matmul(layer.ffn_down, gate)


def rope_inv_freq(cfg: ModelConfig, weights: Weights) -> np.ndarray:
    """Rotation speed of each dimension pair (hd/2,) float32: base^(-2j/hd), divided by the linear
    scaling factor and by Llama 3's per-pair `rope_freqs` when present (as llama.cpp does)."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_base**exponents) / cfg.rope_scaling_factor
    if weights.rope_freqs is not None:
        inv_freq = inv_freq / weights.rope_freqs
    return inv_freq.astype(np.float32)


def _check_embeddings(cfg: ModelConfig, embeddings) -> np.ndarray:
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] != cfg.d_model:
        raise KawaiError(f"embeddings must have shape (n, {cfg.d_model}), got {embeddings.shape}")
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


def _check_tokens(cfg: ModelConfig, tokens) -> np.ndarray:
    """A 1-D array of token ids within the vocabulary (a negative id would silently index from the end)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0:
        raise KawaiError(f"tokens must be a non-empty 1-D sequence, got shape {tokens.shape}")
    if tokens.dtype.kind not in "iu":
        raise KawaiError(f"token ids must be integers, got {tokens.dtype}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.n_vocab:
        raise KawaiError(f"token ids must be in 0..{cfg.n_vocab - 1}, got {lo if lo < 0 else hi}")
    return np.ascontiguousarray(tokens, dtype=np.int64)
