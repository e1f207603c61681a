"""KVCache: one conversation's keys and values, preallocated for every layer and passed into the model.

The model owns no runtime state: `engine.model.forward(cfg, weights, chunks, caches)` writes the new
positions' keys and values here and records their token ids (`advance`). A cache knows what it holds:
`tokens[i]` is the id at position i and `length == len(tokens)`, so the next prompt on the same cache
(a conversation's next turn, a prefix shared by the prefix cache) prefills only what differs. The ids
change only through `advance`, `truncate`, `copy_prefix` and `load`.

A cache may read its first `base` positions from another cache (`shared`: a prefix other sequences read
too, engine/prefix_cache.py), in place and read-only; its own arrays then hold positions base.. at index
p - base, and `positions` joins the two. Positions and ids are absolute either way: `length` counts the
shared positions, the model rotates and attends as if one cache held them all (engine/model.py).

Memory is committed as positions are written, 4 KiB page by page (`lazy_zeros`), so a cache as long as the
model's trained context costs only what its prompts use.

Layout (per layer), chosen for the attention kernel in kernels/attention.py:
    k  (n_layers, n_kv_heads, head_dim, max_seq)  keys transposed: a key dimension is contiguous over
                                                   positions
    v  (n_layers, n_kv_heads, max_seq, head_dim)  values: a position's value vector is contiguous

Storage `dtype`: "f16" (default, IEEE half, as llama.cpp keeps its cache) or "f32". Keys and values are
computed in float32 and rounded to the cache's type when stored; the attention kernel widens each tile
back to float32. Half the bytes halves what decoding at depth reads per token; the rounding (11
significant bits) moves the model's outputs far less than its int8 activations do (docs/engine.md).
"""

from __future__ import annotations

import mmap

import numpy as np

from kawai.engine.config import ModelConfig
from kawai.engine.errors import KawaiError

KV_DTYPES = {"f16": np.float16, "f32": np.float32}  # setting name -> storage type
DEFAULT_KV_DTYPE = "f16"


def check_kv_dtype(dtype: str) -> str:
    if dtype not in KV_DTYPES:
        raise KawaiError(f"KV cache dtype must be one of {', '.join(KV_DTYPES)}, got {dtype!r}")
    return dtype


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
    def __init__(self, cfg: ModelConfig, max_seq: int, dtype: str = DEFAULT_KV_DTYPE):
        if isinstance(max_seq, bool) or not isinstance(max_seq, (int, np.integer)) or max_seq < 1:
            raise KawaiError(f"KV cache size must be a positive integer, got {max_seq!r}")
        self.max_seq = int(max_seq)
        self.dtype = check_kv_dtype(dtype)
        shape_k = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, self.max_seq)
        shape_v = (cfg.n_layers, cfg.n_kv_heads, self.max_seq, cfg.head_dim)
        self.k = lazy_zeros(shape_k, KV_DTYPES[dtype])  # (n_layers, Hkv, hd, S)
        self.v = lazy_zeros(shape_v, KV_DTYPES[dtype])  # (n_layers, Hkv, S, hd)
        self.tokens: list[int] = []  # (length,) token id of each filled position (image rows: the pad id)
        self.shared: KVCache | None = None  # holds positions 0..base-1 (never one that shares itself)
        self.base = 0  # positions read from `shared`; own arrays hold position p at index p - base

    @staticmethod
    def bytes_for(cfg: ModelConfig, max_seq: int, dtype: str = DEFAULT_KV_DTYPE) -> int:
        """Bytes of a cache of max_seq positions, without allocating it."""
        itemsize = np.dtype(KV_DTYPES[check_kv_dtype(dtype)]).itemsize
        return 2 * itemsize * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * max_seq

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def length(self) -> int:
        """Positions 0..length-1 are filled."""
        return len(self.tokens)

    @property
    def free(self) -> int:
        """Positions still available."""
        return self.max_seq - self.length

    def positions(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of positions start..stop-1: k (n_layers, Hkv, hd, n), v (n_layers, Hkv, n, hd);
        views, or copies when the range spans the shared prefix and the cache's own positions."""
        base = self.base
        if start < base:  # some (or all) come from the shared prefix
            k, v = self.shared.positions(start, min(stop, base))
            if stop <= base:
                return k, v
            own_k, own_v = self.positions(base, stop)
            return np.concatenate([k, own_k], axis=3), np.concatenate([v, own_v], axis=2)
        return self.k[:, :, :, start - base : stop - base], self.v[:, :, start - base : stop - base, :]

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write n new keys and values, k and v (n, Hkv, hd) float32, at positions start..start+n-1 of
        one layer (rounded to the cache's dtype, to nearest even); start >= base (the shared prefix is
        read-only)."""
        n, lo = k.shape[0], start - self.base
        if lo < 0:
            raise KawaiError(f"position {start} is in the shared prefix ({self.base} positions): read-only")
        self.k[layer, :, :, lo : lo + n] = k.transpose(1, 2, 0)  # (Hkv, hd, n)
        self.v[layer, :, lo : lo + n, :] = v.transpose(1, 0, 2)  # (Hkv, n, hd)

    def advance(self, ids) -> None:
        """Record the ids (n,) whose keys and values every layer just stored at positions length.. ."""
        if len(ids) > self.free:
            raise KawaiError(f"{len(ids)} positions do not fit: {self.length} of {self.max_seq} used")
        self.tokens.extend(int(t) for t in ids)

    def truncate(self, n: int) -> None:
        """Keep the first n positions (for prefix reuse); later ones are overwritten by the next forward.
        Cut inside the shared prefix, the cache reads only its first n positions from it."""
        if not 0 <= n <= self.length:
            raise KawaiError(f"cannot truncate a KV cache of length {self.length} to {n}")
        del self.tokens[n:]
        if n < self.base:  # no own position is left: the next ones go to index 0 again
            self.base = n
            if n == 0:
                self.shared = None

    def copy_prefix(self, src: KVCache, n: int, share: int = 0) -> None:
        """Hold src's first n positions (ids, keys and values) and nothing else: the first `share` of them
        (at most what src holds itself or reads shared) are read in place from the cache holding them,
        never written; the rest are copied into this cache's own arrays."""
        if not 0 <= share <= n <= min(src.length, self.max_seq):
            raise KawaiError(f"cannot copy {n} positions of a KV cache of length {src.length}")
        owner = src
        if src.shared is not None:  # src reads its first positions from another cache: share from that one
            owner, share = src.shared, min(share, src.base)
        self.shared, self.base = (owner, share) if share else (None, 0)
        src_k, src_v = src.positions(share, n)
        self.k[:, :, :, : n - share], self.v[:, :, : n - share, :] = src_k, src_v
        self.tokens = list(src.tokens[:n])

    def load(self, k: np.ndarray, v: np.ndarray, ids) -> None:
        """Append n positions read from elsewhere (engine/kv_disk.py): k (n_layers, Hkv, hd, n),
        v (n_layers, Hkv, n, hd) in this cache's layout, and their ids (n,)."""
        lo, n = self.length - self.base, len(ids)
        if n > self.free or k.shape[-1] != n or v.shape[-2] != n:
            raise KawaiError(f"cannot load {n} positions into a KV cache with {self.free} free")
        self.k[:, :, :, lo : lo + n], self.v[:, :, lo : lo + n, :] = k, v
        self.tokens.extend(int(t) for t in ids)

    def __repr__(self) -> str:
        shared = f", shared={self.base}" if self.shared is not None else ""
        return (f"KVCache(length={self.length}{shared}, max_seq={self.max_seq}, dtype={self.dtype}, "
                f"{self.nbytes / 2**20:.1f} MiB)")
