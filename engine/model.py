"""The forward pass shared by Qwen2, Qwen3 and Llama: tokens in, logits out, keys and values into the cache.

    embed -> n_layers x [ RMSNorm -> attention (QKV, +bias, +QK-norm, RoPE, cache, GQA) -> residual
                          RMSNorm -> SwiGLU MLP -> residual ]
          -> final RMSNorm -> output projection -> logits

The architectures differ only by flags on ModelConfig (qkv_bias, qk_norm, rope_style, tied_output).
The model holds no state: the KVCache is passed in, and the positions of the new tokens start at
`cache.length`.

Letters used in shape comments:
    n  tokens in this chunk      d  d_model       H  n_heads      Hkv  n_kv_heads    hd  head_dim
    f  d_ff                      V  n_vocab
"""

from __future__ import annotations

import numpy as np

from engine.config import ModelConfig
from engine.errors import ContextLengthError, KawaiError
from engine.kv_cache import KVCache
from engine.weights import LayerWeights, Weights
from kernels import ops
from kernels.matmul import matmul, matmul_fused

CHUNK = 256  # prompt tokens processed at once: bounds activation memory and the attention scores


def forward(
    cfg: ModelConfig, weights: Weights, tokens: np.ndarray, cache: KVCache, *, all_logits: bool = False
) -> np.ndarray:
    """Run `tokens` (n,) after the cache's contents; append their keys/values to `cache`.

    Returns float32 logits (n, V) with `all_logits`, else (1, V) for the last token only.
    """
    tokens = _check_tokens(cfg, tokens)
    n = tokens.shape[0]
    if n > cache.free:
        raise ContextLengthError(
            f"{n} new tokens do not fit in the context: {cache.length} of {cache.max_seq} positions used"
        )
    logits = []
    for lo in range(0, n, CHUNK):
        chunk = tokens[lo : lo + CHUNK]
        x = _forward_chunk(cfg, weights, chunk, cache)  # (n_chunk, d) normalized final hidden states
        if all_logits:
            logits.append(matmul(weights.output, x))
        elif lo + CHUNK >= n:
            logits.append(matmul(weights.output, x[-1:]))
    return logits[0] if len(logits) == 1 else np.concatenate(logits)


def _forward_chunk(cfg: ModelConfig, weights: Weights, tokens: np.ndarray, cache: KVCache) -> np.ndarray:
    start = cache.length
    positions = np.arange(start, start + tokens.shape[0], dtype=np.int64)  # (n,)
    inv_freq = rope_inv_freq(cfg, weights)  # (hd/2,)

    x = weights.token_embd.lookup(tokens)  # (n, d) the residual stream
    h = np.empty_like(x)  # (n, d) normalized input of each sub-layer
    for i, layer in enumerate(weights.layers):
        ops.rms_norm(x, layer.attn_norm, cfg.rms_eps, h)
        x += attention(cfg, layer, h, positions, inv_freq, cache, i)
        ops.rms_norm(x, layer.ffn_norm, cfg.rms_eps, h)
        x += mlp(layer, h)
    ops.rms_norm(x, weights.output_norm, cfg.rms_eps, h)
    cache.length = start + tokens.shape[0]  # only once every layer has stored its keys and values
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
    """Self-attention of the new tokens over the cached ones. h (n, d) -> (n, d)."""
    n = h.shape[0]
    q, k, v = matmul_fused([layer.attn_q, layer.attn_k, layer.attn_v], h)  # (n, H*hd), (n, Hkv*hd) x2
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
    neox = cfg.rope_style == "neox"
    ops.rope(q, positions, inv_freq, neox)
    ops.rope(k, positions, inv_freq, neox)

    start = int(positions[0])
    ops.store_kv(k, v, cache.k[i], cache.v[i], start)
    out = np.empty_like(q)  # (n, H, hd)
    ops.attention(q, cache.k[i], cache.v[i], start, np.float32(cfg.head_dim**-0.5), out)
    return matmul(layer.attn_output, out.reshape(n, cfg.q_dim))  # (n, d)


def mlp(layer: LayerWeights, h: np.ndarray) -> np.ndarray:
    """SwiGLU: down(silu(gate(h)) * up(h)). h (n, d) -> (n, d)."""
    gate, up = matmul_fused([layer.ffn_gate, layer.ffn_up], h)  # (n, f) x2
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
