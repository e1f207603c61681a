"""KVCache: one conversation's keys and values, preallocated for every layer and passed into the model.

The model owns no runtime state: `engine.model.forward(cfg, weights, tokens, cache)` writes the new
positions' keys and values here and advances `length`. A server can hold one cache per conversation and
reuse a shared prefix with `truncate`.

Memory is committed as positions are written, 4 KiB page by page (`lazy_zeros`), so a cache as long as the
model's trained context costs only what its prompts use.

Layout (per layer), chosen for the attention kernel in kernels/ops.py:
    k  (n_layers, n_kv_heads, head_dim, max_seq)  keys transposed: a key dimension is contiguous over
                                                   positions, so q.k streams over positions
    v  (n_layers, n_kv_heads, max_seq, head_dim)  values: a position's value vector is contiguous
"""

from __future__ import annotations

import mmap

import numpy as np

from kawai.engine.config import ModelConfig
from kawai.engine.errors import KawaiError


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zero array on an anonymous memory mapping: the OS commits a 4 KiB page when it is first written.

    Not np.zeros: numpy asks for 2 MiB transparent huge pages on large arrays, and a key row of a long
    context is only 128 KiB (32768 positions), so writing position 0 of every row would commit the whole
    key array (384 MiB for Qwen2.5-0.5B at 32768 tokens) on the first request."""
    nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    buf = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # also where the kernel gives huge pages unasked (THP "always")
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


class KVCache:
    def __init__(self, cfg: ModelConfig, max_seq: int):
        if isinstance(max_seq, bool) or not isinstance(max_seq, (int, np.integer)) or max_seq < 1:
            raise KawaiError(f"KV cache size must be a positive integer, got {max_seq!r}")
        self.max_seq = int(max_seq)
        shape_k = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, self.max_seq)
        shape_v = (cfg.n_layers, cfg.n_kv_heads, self.max_seq, cfg.head_dim)
        self.k = lazy_zeros(shape_k, np.float32)  # (n_layers, Hkv, hd, S)
        self.v = lazy_zeros(shape_v, np.float32)  # (n_layers, Hkv, S, hd)
        self.length = 0  # positions 0..length-1 are filled

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def free(self) -> int:
        """Positions still available."""
        return self.max_seq - self.length

    def positions(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of positions start..stop-1: k (n_layers, Hkv, hd, n), v (n_layers, Hkv, n, hd)."""
        return self.k[:, :, :, start:stop], self.v[:, :, start:stop, :]

    def truncate(self, n: int) -> None:
        """Keep the first n positions (for prefix reuse); later ones are overwritten by the next forward."""
        if not 0 <= n <= self.length:
            raise KawaiError(f"cannot truncate a KV cache of length {self.length} to {n}")
        self.length = int(n)

    def __repr__(self) -> str:
        return f"KVCache(length={self.length}, max_seq={self.max_seq}, {self.nbytes / 2**20:.1f} MiB)"
