"""KVCache: one conversation's keys and values, preallocated for every layer and passed into the model.

The model owns no runtime state: `engine.model.forward(cfg, weights, tokens, cache)` writes the new
positions' keys and values here and advances `length`. A server can hold one cache per conversation and
reuse a shared prefix with `truncate`.

Layout (per layer), chosen for the attention kernel in kernels/ops.py:
    k  (n_layers, n_kv_heads, head_dim, max_seq)  keys transposed: a key dimension is contiguous over
                                                   positions, so q.k streams over positions
    v  (n_layers, n_kv_heads, max_seq, head_dim)  values: a position's value vector is contiguous
"""

from __future__ import annotations

import numpy as np

from kawai.engine.config import ModelConfig
from kawai.engine.errors import KawaiError


class KVCache:
    def __init__(self, cfg: ModelConfig, max_seq: int):
        if isinstance(max_seq, bool) or not isinstance(max_seq, (int, np.integer)) or max_seq < 1:
            raise KawaiError(f"KV cache size must be a positive integer, got {max_seq!r}")
        self.max_seq = int(max_seq)
        shape_k = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, self.max_seq)
        shape_v = (cfg.n_layers, cfg.n_kv_heads, self.max_seq, cfg.head_dim)
        self.k = np.zeros(shape_k, dtype=np.float32)  # (n_layers, Hkv, hd, S)
        self.v = np.zeros(shape_v, dtype=np.float32)  # (n_layers, Hkv, S, hd)
        self.length = 0  # positions 0..length-1 are filled

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def free(self) -> int:
        """Positions still available."""
        return self.max_seq - self.length

    def truncate(self, n: int) -> None:
        """Keep the first n positions (for prefix reuse); later ones are overwritten by the next forward."""
        if not 0 <= n <= self.length:
            raise KawaiError(f"cannot truncate a KV cache of length {self.length} to {n}")
        self.length = int(n)

    def __repr__(self) -> str:
        return f"KVCache(length={self.length}, max_seq={self.max_seq}, {self.nbytes / 2**20:.1f} MiB)"
