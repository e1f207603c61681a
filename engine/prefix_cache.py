"""Prompt-prefix cache: KV memory for every sequence of one model, bounded by a budget, with prompts found
again by a chain of block hashes, in memory and (engine/kv_disk.py) on disk across restarts.

    pool = open_prefix_cache(llm, 2 << 30, disk_dir=home / "kv", disk_bytes=8 << 30)  # 2 GiB, 8 GiB
    lease = pool.acquire(tenant, prompt_ids)   # None: not yet (memory is full, or a disk look-up runs)
    while running:
        pool.reserve(lease, n)                 # before a step: room for n positions (False: budget spent)
        ... forward ...
        pool.publish(lease)                    # index (and write to disk) the prompt's newly filled blocks
    pool.release(lease)                        # the conversation stays, for its next turn

**Blocks.** A prompt is cut into blocks of `block_tokens` tokens (BLOCK_TOKENS = 64). Full block i is
named by a chain hash

    h_i = sha256(h_{i-1} || tokens[i*B:(i+1)*B] as little-endian int32),   h_{-1} = root

where `root = chain_root(model, kv format, tenant)`. Keys and values at a position depend on every token
before it, and so does h_i: equal names mean equal keys and values. Two tenants never share a name, so one
API token cannot learn another's prompts from time to first token (docs/serving.md).

**Memory.** Each sequence gets its own KVCache; the OS commits its pages as positions are written
(engine/kv_cache.py: lazy_zeros), so physical memory follows the positions used. The budget is
accounted in whole blocks of each cache's own positions (a shared block is counted once, by the cache
holding it): a sequence is admitted when the blocks of its prompt past its shared prefix fit (idle caches
are evicted, least recently used first, to make room), and it reserves one more block each time decoding
crosses a block boundary; when none is left, `reserve` says so and the scheduler ends that sequence
(`context_full`). A prompt longer than the whole budget can never run: `fits` is False.

**Matching.** The index maps a block's hash to the caches holding it (live or idle); a block stays
findable until the last of them is evicted. A finished conversation whose tokens the new prompt extends
entirely (the next turn) is handed over as it is, token-exact, generated tokens included. Otherwise the
new prompt takes the longest chain of blocks some cache holds (or a finished conversation sharing more
tokens): its whole blocks are shared, the rest (under a block) copied.

**Sharing.** A new cache reads its first P positions (whole blocks) in place from the cache holding them,
its source (KVCache.shared; the model attends over both, engine/model.py), instead of copying them. A
source is always a cache that shares nothing itself: matching a reader's blocks shares its prefix from its
source and copies the reader's own positions. The entries reading a source are its reference count: while
any exists, the source is never evicted (its readers go first, least recently used first), never cut
below what they read (a next turn only appends), and one released after an error (`reusable` False) is
cut to what they read, unfindable, and dropped with its last reader. So the shared positions never change
or disappear under a live reader. A tenant never shares another's blocks (their names differ).

**Disk.** With a DiskCache, each full prompt block a sequence fills is copied and queued for the disk
writer thread (the engine never waits for it). A prompt whose blocks are not all in memory is first looked
up on disk by the loader thread: `acquire` returns None until the look-up ends (the `on_ready` callback
wakes the scheduler), then the blocks found are in memory as an idle cache and are taken like any other.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kawai.engine.errors import KawaiError
from kawai.engine.generate import common_prefix_length
from kawai.engine.kv_cache import KVCache

BLOCK_TOKENS = 64  # tokens per block: the unit of matching, accounting and disk files
CHAIN_FORMAT = b"kawai-kv-chain/1"
MAX_PROBES = 1024  # finished disk look-ups remembered until their job comes back for the result


def chain_root(model: str, kv_format: str, tenant: str | None) -> bytes:
    """h_{-1} of every chain of one tenant on one model (its file hash) and KV format (dtype, weights)."""
    text = "\0".join((model, kv_format, "" if tenant is None else tenant))
    return hashlib.sha256(CHAIN_FORMAT + b"\0" + text.encode()).digest()


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.sha256(parent + np.asarray(tokens, dtype="<i4").tobytes()).digest()


def block_hashes(root: bytes, tokens: Sequence[int], block_tokens: int) -> list[bytes]:
    """Chain hashes of the full blocks of `tokens`: [h_0, h_1, ...] (a partial last block has none)."""
    out, parent = [], root
    for lo in range(0, len(tokens) - block_tokens + 1, block_tokens):
        parent = block_hash(parent, tokens[lo : lo + block_tokens])
        out.append(parent)
    return out


@dataclass
class Lease:
    """A cache lent to one sequence. `reused`: prompt tokens it already holds (keys/values valid), of
    which `disk_tokens` were read from disk; `created`: prompt tokens this sequence added to the cache."""

    cache: KVCache
    tenant: str | None
    reused: int
    prompt: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of the prompt's full blocks
    disk_tokens: int = 0
    created: int = 0


@dataclass(eq=False)
class _Entry:
    """A cache the pool accounts for: leased to a running sequence, or idle (kept for reuse)."""

    cache: KVCache
    tenant: str | None
    root: bytes
    hashes: list[bytes] = field(default_factory=list)  # indexed full blocks, in order (a chain prefix)
    reserved: int = 0  # positions accounted to it (whole blocks of its own positions, base..)
    leased: bool = False
    disk_tokens: int = 0  # leading positions loaded from disk and not yet reused
    source: _Entry | None = None  # the entry whose cache holds this one's shared prefix (cache.shared)
    readers: set[_Entry] = field(default_factory=set)  # entries reading a prefix of this one's cache
    retired: bool = False  # released as not reusable while read: unfindable, dropped with its last reader


@dataclass(frozen=True)
class PrefixCacheStats:
    leased: int  # caches in use by running sequences
    idle: int  # finished caches kept for reuse
    idle_tokens: int  # tokens held by the idle caches
    blocks: int  # distinct full blocks findable in memory
    shared_tokens: int  # positions running sequences read in place from a cache another entry holds
    used_bytes: int  # KV memory accounted (reserved blocks of every cache)
    budget_bytes: int
    memory_hit_tokens: int  # prompt tokens served from memory so far
    disk_hit_tokens: int  # prompt tokens served from blocks read from disk
    created_tokens: int  # prompt tokens newly cached (blocks no cache held before)
    evictions: int


_PENDING = object()  # a disk look-up in flight


class PrefixCache:
    """Thread-safe (one lock): the scheduler, the disk loader and /metrics call it from their threads.

    new_cache(): an empty full-context KVCache. memory_bytes: the KV budget. root(tenant): the chain root.
    """

    def __init__(
        self,
        new_cache: Callable[[], KVCache],
        memory_bytes: int,
        *,
        root: Callable[[str | None], bytes],
        block_tokens: int = BLOCK_TOKENS,
        disk=None,
        on_ready: Callable[[], None] | None = None,
    ):
        probe = new_cache()
        self.bytes_per_token = probe.nbytes // probe.max_seq  # keys and values of one position, all layers
        self.max_seq = probe.max_seq
        del probe
        self.block_tokens = block_tokens
        self.budget = memory_bytes // (self.bytes_per_token * block_tokens) * block_tokens  # positions
        if self.budget < 1:
            raise KawaiError(
                f"a KV memory budget of {memory_bytes} bytes holds no block of {block_tokens} positions "
                f"({self.bytes_per_token * block_tokens} bytes)"
            )
        self._new_cache = new_cache
        self._root = root
        self.disk = disk
        self._on_ready = on_ready or (lambda: None)
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # id(cache) -> entry, least recently used first
        self._index: dict[bytes, dict[int, _Entry]] = {}  # block hash -> its holders (id(cache) -> entry)
        self._probes: dict[bytes, object] = {}  # last block hash of a prompt -> _PENDING or True (looked up)
        self._used = 0  # positions reserved by all entries
        self._memory_hits = self._disk_hits = self._created = self._evictions = 0

    # ---- admission ----------------------------------------------------------------------------------

    def fits(self, n_tokens: int) -> bool:
        """Whether a prompt of n_tokens can ever be admitted (its blocks fit the whole budget)."""
        return self._blocks_for(n_tokens) <= self.budget

    def acquire(self, tenant: str | None, prompt: Sequence[int], reuse: bool = True) -> Lease | None:
        """A cache for `prompt`, holding its longest cached prefix (none with `reuse` False: image
        prompts); None when it must wait (memory is full until a running sequence ends, or its blocks
        are being looked up on disk)."""
        prompt = [int(t) for t in prompt]
        root = self._root(tenant)
        hashes = block_hashes(root, prompt, self.block_tokens) if reuse else []
        with self._lock:
            have = self._memory_blocks(root, prompt, hashes) if hashes else 0
            if not self._room(self._blocks_for(len(prompt)) - have * self.block_tokens):
                return None  # not even sharing what memory holds fits: wait for a running sequence to end
            if self.disk is not None and have < len(hashes):  # the disk may hold more of the prompt
                state = self._probes.get(hashes[-1])
                if state is None:
                    if len(self._probes) >= MAX_PROBES:  # look-ups whose job went away: forget them
                        self._probes = {h: v for h, v in self._probes.items() if v is _PENDING}
                    self._probes[hashes[-1]] = _PENDING
                    self.disk.load(lambda: self._load_from_disk(tenant, root, prompt, hashes, have))
                    return None
                if state is _PENDING:
                    return None
                del self._probes[hashes[-1]]
            lease = self._acquire(tenant, root, prompt, hashes, reuse)
            if lease is not None:
                self._memory_hits += lease.reused - lease.disk_tokens
                self._disk_hits += lease.disk_tokens
            return lease

    def _acquire(self, tenant, root: bytes, prompt: list[int], hashes: list[bytes], reuse: bool) -> Lease | None:
        B = self.block_tokens
        last = len(prompt) - 1  # positions a sequence keeps at most: its last prompt token is always run
        idle, common = self._best_idle(root, prompt) if reuse else (None, 0)
        held = self._held_blocks(hashes)
        if idle is not None and common >= held * B:
            source, n = idle, min(common, last)
        elif held:
            source, n = self._holder(hashes[held - 1]), min(held * B, last)
        else:
            source, n = None, 0
        entry = None
        if source is idle and idle is not None and common == idle.cache.length and self._readers_end(idle) <= n:
            entry = idle  # the prompt extends a finished conversation (its next turn): hand it over
        elif source is not None:
            share = n // B * B  # whole blocks are read in place, the rest (< one block) is copied
            if source.cache.shared is not None:
                share = min(share, source.cache.base)  # a reader: share what it shares, copy its own part
            if self._make_room(self._blocks_for(len(prompt) - share), keep=(source, source.source)):
                entry = self._new_entry(tenant, root)
                entry.cache.copy_prefix(source.cache, n, share)
                if share:
                    self._read_from(entry, source if source.cache.shared is None else source.source)
                entry.disk_tokens, source.disk_tokens = min(n, source.disk_tokens), 0
                self._index_blocks(entry, hashes[: n // B])
            elif source is idle and self._readers_end(idle) <= n:
                entry = idle  # no room to share: take it over, cut to the common prefix
        if entry is None:
            if not self._make_room(self._blocks_for(len(prompt)), keep=()):
                return None
            entry = self._new_entry(tenant, root)
        if entry.cache.length > n:
            self._truncate(entry, n)
        need = self._blocks_for(len(prompt) - entry.cache.base)
        if not self._make_room(need - entry.reserved, keep=(entry, entry.source)):
            return None
        entry.leased = True
        self._entries.move_to_end(id(entry.cache))
        self._used += max(0, need - entry.reserved)
        entry.reserved = max(entry.reserved, need)
        reused = entry.cache.length
        lease = Lease(entry.cache, tenant, reused, prompt, hashes, min(entry.disk_tokens, reused))
        entry.disk_tokens = 0
        return lease

    def reserve(self, lease: Lease, n_positions: int) -> bool:
        """Account room for n_positions in the lease's cache (whole blocks, evicting idle caches); False
        when the budget has no block left (the caller ends the sequence)."""
        with self._lock:
            entry = self._entries[id(lease.cache)]
            need = self._blocks_for(n_positions - entry.cache.base)
            if need <= entry.reserved:
                return True
            if n_positions > self.max_seq or not self._make_room(need - entry.reserved, keep=(entry, entry.source)):
                return False
            self._used += need - entry.reserved
            entry.reserved = need
            return True

    def publish(self, lease: Lease) -> None:
        """Index the prompt's full blocks the cache now holds (others may share them) and queue the new
        ones for the disk. Call after each forward step of a prefilling sequence."""
        B = self.block_tokens
        cache = lease.cache
        with self._lock:
            entry = self._entries.get(id(cache))
            if entry is None:
                return
            filled = min(cache.length // B, len(lease.hashes))
            start = len(entry.hashes)
            if filled <= start or entry.hashes != lease.hashes[:start]:
                return
            new = lease.hashes[start:filled]
            for i, h in enumerate(new, start):
                if not self._index.get(h):  # no cache held it: its tokens this sequence ran are newly cached
                    created = (i + 1) * B - max(i * B, lease.reused)
                    lease.created += created
                    self._created += created
            self._index_blocks(entry, new)
        if self.disk is not None:
            for i in range(start, filled):
                parent = lease.hashes[i - 1] if i else entry.root
                k, v = block_arrays(cache, i * B, B)
                self.disk.write(lease.tenant, i, parent, lease.hashes[i], lease.prompt[i * B : (i + 1) * B], k, v)

    def release(self, lease: Lease, reusable: bool = True) -> None:
        """Give the cache back; with `reusable` False (unknown contents after an error, image prompts)
        it is dropped and its memory freed -- once no other sequence reads its first positions: until
        then it stays, cut to what they read (positions filled before they were shared)."""
        with self._lock:
            entry = self._entries.get(id(lease.cache))
            if entry is None:
                return
            entry.leased = False
            if entry.readers and (not reusable or not entry.cache.length):
                self._truncate(entry, self._readers_end(entry))
                for h in entry.hashes:  # its readers hold these blocks too (and share them from here)
                    self._unindex(h, entry)
                entry.hashes, entry.retired = [], True
                keep = self._blocks_for(entry.cache.length)
                self._used -= max(0, entry.reserved - keep)
                entry.reserved = min(entry.reserved, keep)
            elif not reusable or not entry.cache.length:
                self._drop(entry)
            else:
                self._entries.move_to_end(id(entry.cache))

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            idle = [e for e in self._entries.values() if not e.leased]
            return PrefixCacheStats(
                len(self._entries) - len(idle), len(idle), sum(e.cache.length for e in idle), len(self._index),
                sum(e.cache.base for e in self._entries.values() if e.leased),
                self._used * self.bytes_per_token, self.budget * self.bytes_per_token,
                self._memory_hits, self._disk_hits, self._created, self._evictions,
            )

    def clear(self) -> None:
        """Drop every idle cache (their memory is freed) that no running sequence reads; leased ones are
        unaffected."""
        with self._lock:
            while (victim := self._victim(keep=())) is not None:
                self._drop(victim)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the disk threads, letting queued writes finish for up to `timeout` seconds."""
        if self.disk is not None:
            self.disk.close(timeout)

    # ---- the disk loader's side ------------------------------------------------------------------

    def _load_from_disk(self, tenant: str | None, root: bytes, prompt: list[int], hashes: list[bytes],
                        have: int) -> None:
        """Loader thread: if the disk holds block `have` of the prompt (memory holds blocks 0..have-1),
        read the prompt's blocks found on disk (verified, chain order from block 0) into a new cache,
        which becomes an idle cache if the budget has room; then wake the scheduler."""
        try:
            if not self.disk.has_block(hashes[have]):
                return  # nothing beyond what memory holds: read nothing
            B = self.block_tokens
            cache = self._new_cache()  # private until it is put in the pool: filled outside the lock
            for block in self.disk.read_chain(tenant, root, prompt, hashes):
                cache.load(block.k, block.v, block.tokens)
            n = cache.length
            if n > have * B:
                with self._lock:
                    if self._make_room(n, keep=()):
                        entry = _Entry(cache, tenant, root, reserved=n, disk_tokens=n)
                        self._used += n
                        self._entries[id(cache)] = entry
                        self._entries.move_to_end(id(cache), last=False)  # taken soon, or evicted first
                        self._index_blocks(entry, hashes[: n // B])
        finally:
            with self._lock:
                self._probes[hashes[-1]] = True
            self._on_ready()

    # ---- internals (called with the lock held) ---------------------------------------------------

    def _blocks_for(self, n: int) -> int:
        """n positions rounded up to whole blocks."""
        return -(-n // self.block_tokens) * self.block_tokens

    def _room(self, positions: int, keep: tuple[_Entry | None, ...] = ()) -> bool:
        """Whether `positions` more fit once every idle cache that may go is evicted: not `keep`, and not
        a cache that a leased or kept entry reads its prefix from."""
        stay = {e for e in self._entries.values() if e.leased} | {e for e in keep if e is not None}
        while more := {e.source for e in stay if e.source is not None} - stay:  # what they read stays too
            stay |= more
        return self._used - sum(e.reserved for e in self._entries.values() if e not in stay) + positions <= self.budget

    def _victim(self, keep: tuple[_Entry | None, ...]) -> _Entry | None:
        """The least recently used idle entry that may be evicted now: not kept, read by no entry (a
        cache others read goes after its readers)."""
        for entry in self._entries.values():
            if not entry.leased and not entry.readers and entry not in keep:
                return entry
        return None

    def _readers_end(self, entry: _Entry) -> int:
        """Positions of the entry's cache that other caches read: they must never change."""
        return max((r.cache.base for r in entry.readers), default=0)

    def _holder(self, h: bytes) -> _Entry:
        """A cache holding block h, preferably one holding it in its own arrays (it can share it)."""
        holders = list(self._index[h].values())
        return next((e for e in holders if e.cache.shared is None), holders[0])

    def _read_from(self, entry: _Entry, source: _Entry) -> None:
        """Record that entry's cache reads its first positions from source's (reference counting)."""
        entry.source = source
        source.readers.add(entry)

    def _memory_blocks(self, root: bytes, prompt: list[int], hashes: list[bytes]) -> int:
        """Leading blocks of the prompt memory can serve: held by some cache, or by a finished
        conversation's tokens (the blocks of its answer are not indexed)."""
        _, common = self._best_idle(root, prompt)
        return max(self._held_blocks(hashes), min(common // self.block_tokens, len(hashes)))

    def _held_blocks(self, hashes: list[bytes]) -> int:
        """Leading blocks of a chain that some cache holds (holding block i implies holding 0..i-1)."""
        n = 0
        while n < len(hashes) and self._index.get(hashes[n]):
            n += 1
        return n

    def _best_idle(self, root: bytes, prompt: list[int]) -> tuple[_Entry | None, int]:
        """The idle cache of this tenant sharing the most leading tokens with the prompt, and that count."""
        best, best_len = None, 0
        for entry in self._entries.values():
            if entry.leased or entry.retired or entry.root != root:
                continue
            n = common_prefix_length(entry.cache.tokens, prompt)
            if n > best_len:
                best, best_len = entry, n
        return best, best_len

    def _new_entry(self, tenant: str | None, root: bytes) -> _Entry:
        entry = _Entry(self._new_cache(), tenant, root)
        self._entries[id(entry.cache)] = entry
        return entry

    def _truncate(self, entry: _Entry, n: int) -> None:
        """Keep an idle cache's first n positions; its blocks past them are no longer findable."""
        keep = n // self.block_tokens
        for h in entry.hashes[keep:]:
            self._unindex(h, entry)
        del entry.hashes[keep:]
        entry.cache.truncate(n)
        if entry.cache.shared is None and entry.source is not None:  # cut before its shared prefix ended
            self._detach(entry)

    def _unindex(self, h: bytes, entry: _Entry) -> None:
        holders = self._index.get(h)
        if holders is not None:
            holders.pop(id(entry.cache), None)
            if not holders:
                del self._index[h]

    def _index_blocks(self, entry: _Entry, hashes: list[bytes]) -> None:
        for h in hashes:
            self._index.setdefault(h, {})[id(entry.cache)] = entry
        entry.hashes.extend(hashes)

    def _make_room(self, positions: int, keep: tuple[_Entry | None, ...]) -> bool:
        """Evict idle caches (least recently used first; never `keep`, nor a cache others read while
        they stay) until `positions` more fit. Evicts nothing when they cannot fit."""
        if positions <= 0:
            return True
        if not self._room(positions, keep):
            return False
        while self._used + positions > self.budget:
            victim = self._victim(keep)
            if victim is None:
                return False
            self._drop(victim)
            self._evictions += 1
        return True

    def _drop(self, entry: _Entry) -> None:
        """Forget an entry no other reads (its memory is freed with its cache)."""
        assert not entry.readers, "a cache other sequences read is never dropped"
        for h in entry.hashes:
            self._unindex(h, entry)
        entry.hashes = []
        self._used -= entry.reserved
        entry.reserved = 0
        del self._entries[id(entry.cache)]
        if entry.source is not None:
            self._detach(entry)

    def _detach(self, entry: _Entry) -> None:
        """The entry no longer reads its source's cache; a retired source read by no one is dropped."""
        source, entry.source = entry.source, None
        source.readers.discard(entry)
        if source.retired and not source.readers:
            self._drop(source)


def block_arrays(cache: KVCache, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous copies of positions start..start+n-1 (keys, values), in the cache's layout and dtype."""
    k, v = cache.positions(start, start + n)
    return np.ascontiguousarray(k), np.ascontiguousarray(v)


def open_prefix_cache(
    llm,
    memory_bytes: int,
    *,
    disk_dir=None,
    disk_bytes: int | None = None,
    block_tokens: int = BLOCK_TOKENS,
    on_ready: Callable[[], None] | None = None,
) -> PrefixCache:
    """The prefix cache of a loaded model (engine.LLM): `memory_bytes` of KV memory and, with a
    `disk_dir` ($KAWAI_HOME/kv) and `disk_bytes`, the disk tier. Chains are keyed by the model file's
    SHA-256, the KV format (cache dtype, weight layout) and the tenant."""
    from kawai.engine.catalog import model_sha256
    from kawai.engine.kv_disk import DiskCache

    dtype = llm.new_cache(1).k.dtype
    kv_format = f"{dtype.name}/{'exact' if llm.weights.exact else 'packed'}"
    disk = None
    if disk_dir is not None and disk_bytes and llm.n_ctx >= block_tokens:  # else no block ever fills
        sha = model_sha256(llm.path)
        k, v = llm.new_cache(block_tokens).positions(0, block_tokens)  # one block's shapes
        disk = DiskCache(disk_dir, model_sha256=sha, kv_format=kv_format, dtype=dtype, k_shape=k.shape,
                         v_shape=v.shape, block_tokens=block_tokens, max_bytes=disk_bytes)
        model = sha
    else:
        model = llm.id
    return PrefixCache(llm.new_cache, memory_bytes, root=lambda tenant: chain_root(model, kv_format, tenant),
                       block_tokens=block_tokens, disk=disk, on_ready=on_ready)


class OneCache:
    """Lends one cache the caller owns (`LLM.generate(..., cache=cache)`, `kawai chat` keeping its
    conversation): the PrefixCache interface with nothing shared, nothing evicted, nothing dropped. The
    sequence keeps what the cache holds of its prompt (engine.generate.SequenceState.start)."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self._lease: Lease | None = None

    def acquire(self, tenant: str | None, prompt: Sequence[int], reuse: bool = True) -> Lease | None:
        if self._lease is not None:
            return None  # lent already: one sequence at a time
        self._lease = Lease(self.cache, tenant, 0, list(prompt))
        return self._lease

    def reserve(self, lease: Lease, n_positions: int) -> bool:
        return n_positions <= self.cache.max_seq

    def publish(self, lease: Lease) -> None:
        pass

    def release(self, lease: Lease, reusable: bool = True) -> None:
        if lease is self._lease:
            self._lease = None
