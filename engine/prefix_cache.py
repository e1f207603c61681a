"""Prompt-prefix cache: a fixed pool of KV caches that outlive their requests, reused by longest prefix.

    pool = PrefixCache(llm.new_cache, slots=8)
    lease = pool.acquire(tenant, prompt_ids)     # None when every slot is busy
    ... run the sequence in lease.cache (its .tokens / .length hold lease.reused tokens of the prompt) ...
    pool.release(lease)                          # the cache, prompt and answer included, becomes reusable

Memory is bounded by the slot count (each slot is one full-context KVCache, allocated on first use).
A finished sequence's cache stays in the pool, tagged with its tenant (API token id) and its token ids;
a new request of the same tenant takes the idle cache with the longest common prefix with its prompt, so
the second turn of a conversation prefills only the new turn. Caches are never matched across tenants,
so one tenant cannot learn another's prompts from time-to-first-token. When a slot is needed and none is
free, the least recently used idle cache is emptied (LRU eviction).

An idle cache that shares only part of its tokens with the prompt (two conversations with the same
system prompt) is copied up to the shared prefix into a fresh slot when one is free, so the entry stays
for others; a cache the prompt fully extends (multi-turn) is handed over without copying.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kawai.engine.errors import KawaiError
from kawai.engine.generate import cached_tokens, common_prefix_length
from kawai.engine.kv_cache import KVCache


@dataclass
class Lease:
    """A cache lent to one sequence. `reused`: prompt tokens it already holds (keys/values valid)."""

    cache: KVCache
    tenant: str | None
    reused: int


@dataclass(frozen=True)
class PrefixCacheStats:
    slots: int
    allocated: int  # slots whose arrays exist
    leased: int  # caches in use by running sequences
    idle: int  # finished caches kept for reuse
    idle_tokens: int  # tokens held by the idle caches
    hit_tokens: int  # prompt tokens served from the cache so far
    evictions: int
    nbytes: int  # bytes of the allocated caches


class PrefixCache:
    """Thread-safe. `new_cache()` makes an empty full-context KVCache; `slots` bounds how many exist."""

    def __init__(self, new_cache: Callable[[], KVCache], slots: int):
        if slots < 1:
            raise KawaiError(f"the KV cache pool needs at least one slot, got {slots}")
        self._new_cache = new_cache
        self.slots = slots
        self._lock = threading.Lock()
        self._idle: OrderedDict[int, tuple[str | None, KVCache]] = OrderedDict()  # id -> entry, LRU first
        self._leased = 0
        self._allocated = 0
        self._bytes = 0
        self._hit_tokens = 0
        self._evictions = 0

    def acquire(self, tenant: str | None, prompt: Sequence[int]) -> Lease | None:
        """A cache for `prompt`, holding its longest reusable prefix; None if every slot is leased."""
        with self._lock:
            key, shared = self._best_match(tenant, prompt)
            if key is not None:
                _, entry = self._idle[key]
                if shared < entry.length and self._allocated < self.slots:
                    cache = self._allocate()
                    _copy_prefix(entry, cache, shared)
                    self._idle.move_to_end(key)  # recently useful
                else:
                    del self._idle[key]
                    cache = entry
                    _keep(cache, shared)
            elif self._allocated < self.slots:
                cache = self._allocate()
            elif self._idle:
                _, (_, cache) = self._idle.popitem(last=False)  # evict the least recently used
                self._evictions += 1
                _keep(cache, 0)
            else:
                return None
            self._leased += 1
            return Lease(cache, tenant, shared)

    def release(self, lease: Lease, reusable: bool = True) -> None:
        """Give the cache back; with `reusable` False (unknown contents after an error) it is emptied."""
        with self._lock:
            self._leased -= 1
            cache = lease.cache
            if not reusable or not cached_tokens(cache):
                _keep(cache, 0)
            self._idle[id(cache)] = (lease.tenant, cache)
            self._idle.move_to_end(id(cache))

    def count_hit(self, tokens: int) -> None:
        with self._lock:
            self._hit_tokens += tokens

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            idle_tokens = sum(c.length for _, c in self._idle.values())
            return PrefixCacheStats(
                self.slots, self._allocated, self._leased, len(self._idle), idle_tokens,
                self._hit_tokens, self._evictions, self._bytes,
            )

    def clear(self) -> None:
        """Drop every idle cache (their memory is freed); leased ones are unaffected."""
        with self._lock:
            for _, cache in self._idle.values():
                self._bytes -= cache.nbytes
                self._allocated -= 1
            self._idle.clear()

    def _best_match(self, tenant: str | None, prompt: Sequence[int]) -> tuple[int | None, int]:
        """The idle cache of this tenant sharing the most leading tokens with prompt, and that count."""
        best, best_len = None, 0
        for key, (owner, cache) in self._idle.items():
            if owner != tenant:
                continue
            n = common_prefix_length(cached_tokens(cache), prompt)
            if n > best_len:
                best, best_len = key, n
        return best, best_len

    def _allocate(self) -> KVCache:
        cache = self._new_cache()
        cache.tokens = []
        self._allocated += 1
        self._bytes += cache.nbytes
        return cache


def _keep(cache: KVCache, n: int) -> None:
    """Truncate a cache (and its recorded token ids) to its first n positions."""
    tokens = cached_tokens(cache)[:n]
    cache.truncate(min(n, len(tokens)))
    cache.tokens = list(tokens)


def _copy_prefix(src: KVCache, dst: KVCache, n: int) -> None:
    """dst holds src's first n positions. k (L, Hkv, hd, S), v (L, Hkv, S, hd)."""
    dst.k[:, :, :, :n] = src.k[:, :, :, :n]
    dst.v[:, :, :n, :] = src.v[:, :, :n, :]
    dst.length = n
    dst.tokens = list(src.tokens[:n])
