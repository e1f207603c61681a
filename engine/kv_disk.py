"""The disk tier of the prompt-prefix cache: full prompt blocks of keys and values, one file per block,
written and read by two background threads, bounded in size (least recently used files go first).

    $KAWAI_HOME/kv/<model sha256>/<block hash hex>.kvb

A block's file name is its chain hash (engine/prefix_cache.py), which covers the tenant, the KV format and
every token up to the block's end, so a file is found only by the same prompt prefix of the same tenant.

File layout (little-endian):

    offset  size  field
    0       8     magic b"KAWAIKV\\0"
    8       4     header length H (u32)
    12      4     CRC-32 of the header bytes and the payload (u32)
    16      8     payload length P (u64)
    24      H     header, JSON: format, model_sha256, kv_format, dtype, layout, k_shape, v_shape,
                  block_tokens, tenant, index, parent (hash hex), hash (hex), tokens (the block's ids)
    ...           zero padding to a multiple of 64 bytes
    ...     P     payload: keys k (L, Hkv, hd, B) then values v (L, Hkv, B, hd), C order, in `dtype`

A file is served only if everything agrees: magic, sizes, format version, model hash, KV format, dtype,
shapes, tenant, position in the chain, parent hash, sha256(parent || tokens) == hash == file name, and
the checksum. Anything else (truncated, corrupt, another model's, another tenant's) is deleted, counted
and never served. Files are written to a temporary name and renamed, so readers never see half a file.

Neither thread blocks the engine: `write` copies nothing and queues (dropping the block when the backlog is
over WRITE_BACKLOG bytes); `load` queues a look-up whose result arrives through a callback.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kawai.engine.prefix_cache import block_hash

log = logging.getLogger("kawai.kv_disk")

MAGIC = b"KAWAIKV\0"
FORMAT = 1
PREFIX = struct.Struct("<8sIIQ")  # magic, header length, crc32, payload length
ALIGN = 64
MAX_HEADER = 1 << 20
SUFFIX = ".kvb"
WRITE_BACKLOG = 512 << 20  # bytes of blocks queued for writing before new ones are dropped
LAYOUT = "k (L, Hkv, hd, B) then v (L, Hkv, B, hd), C order"


@dataclass(frozen=True)
class Block:
    """One verified block read back: its chain hash, token ids, k (L, Hkv, hd, B), v (L, Hkv, B, hd)."""

    hash: bytes
    tokens: list[int]
    k: np.ndarray
    v: np.ndarray


@dataclass(frozen=True)
class DiskStats:
    bytes: int  # on disk under the kv directory (this process's view)
    written_bytes: int
    written_blocks: int
    read_bytes: int
    read_blocks: int  # blocks served from disk
    load_seconds: float  # spent reading and verifying them
    rejected_files: int  # truncated, corrupt or foreign: deleted
    dropped_writes: int  # blocks not written because the backlog was full
    evicted_files: int  # removed to stay within the size bound


class DiskCache:
    """One model's blocks on disk. `root`: the kv directory ($KAWAI_HOME/kv); `max_bytes` bounds all of it."""

    def __init__(
        self,
        root: Path,
        *,
        model_sha256: str,
        kv_format: str,
        dtype,
        k_shape: tuple[int, ...],
        v_shape: tuple[int, ...],
        block_tokens: int,
        max_bytes: int,
    ):
        self.root = Path(root)
        self.dir = self.root / model_sha256
        self.model_sha256 = model_sha256
        self.kv_format = kv_format
        self.dtype = np.dtype(dtype)
        self.k_shape, self.v_shape = tuple(k_shape), tuple(v_shape)  # (L, Hkv, hd, B), (L, Hkv, B, hd)
        self.block_tokens = block_tokens
        self.max_bytes = max_bytes
        self._k_bytes = int(np.prod(self.k_shape)) * self.dtype.itemsize
        self._v_bytes = int(np.prod(self.v_shape)) * self.dtype.itemsize
        self._writes: queue.Queue = queue.Queue()
        self._loads: queue.Queue = queue.Queue()
        self._backlog = 0  # bytes queued for writing
        self._backlog_lock = threading.Lock()  # also guards _bytes (both threads change it)
        self._bytes = 0
        self._written = self._written_blocks = self._read = self._read_blocks = 0
        self._rejected = self._dropped = self._evicted = 0
        self._load_seconds = 0.0
        self._threads = [
            threading.Thread(target=self._write_loop, name="kv-disk-writer", daemon=True),
            threading.Thread(target=self._load_loop, name="kv-disk-loader", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ---- the engine's side (never waits) ------------------------------------------------------------

    def write(self, tenant: str | None, index: int, parent: bytes, hash_: bytes, tokens: Sequence[int],
              k: np.ndarray, v: np.ndarray) -> None:
        """Queue block `index` of a chain (k, v: copies the caller will not touch again)."""
        size = k.nbytes + v.nbytes
        with self._backlog_lock:
            if self._backlog + size > WRITE_BACKLOG:
                self._dropped += 1
                return
            self._backlog += size
        self._writes.put((tenant, index, parent, hash_, list(tokens), k, v))

    def load(self, job: Callable[[], None]) -> None:
        """Run `job` on the loader thread (it reads blocks with `read_chain`)."""
        self._loads.put(job)

    def close(self, timeout: float) -> None:
        """Finish the queued writes (up to `timeout` seconds), then end both threads."""
        self._writes.put(None)
        self._loads.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def stats(self) -> DiskStats:
        return DiskStats(self._bytes, self._written, self._written_blocks, self._read, self._read_blocks,
                         self._load_seconds, self._rejected, self._dropped, self._evicted)

    # ---- reading (loader thread) ------------------------------------------------------------------

    def has_block(self, hash_: bytes) -> bool:
        return (self.dir / (hash_.hex() + SUFFIX)).exists()

    def read_chain(self, tenant: str | None, root: bytes, prompt: Sequence[int], hashes: Sequence[bytes]) -> Iterator[Block]:
        """The prompt's blocks found on disk, from block 0 on, stopping at the first missing or bad one."""
        B = self.block_tokens
        parent = root
        for i, h in enumerate(hashes):
            path = self.dir / (h.hex() + SUFFIX)
            if not path.exists():
                return
            t0 = time.perf_counter()
            block = self._read_block(path, tenant, i, parent, h, prompt[i * B : (i + 1) * B])
            self._load_seconds += time.perf_counter() - t0
            if block is None:
                return
            _touch(path)  # recently used: evicted last
            self._read += block.k.nbytes + block.v.nbytes
            self._read_blocks += 1
            yield block
            parent = h

    def _read_block(self, path: Path, tenant, index: int, parent: bytes, hash_: bytes, tokens) -> Block | None:
        try:
            with open(path, "rb") as f:
                problem, header, k, v = self._parse(f, os.fstat(f.fileno()).st_size)
        except OSError as e:
            problem, header = f"unreadable ({e.strerror})", None
        if problem is None:
            want = {"model_sha256": self.model_sha256, "kv_format": self.kv_format, "tenant": tenant,
                    "index": index, "parent": parent.hex(), "hash": hash_.hex()}
            wrong = [key for key, value in want.items() if header.get(key) != value]
            if wrong:
                problem = "foreign (" + ", ".join(wrong) + ")"
            elif header.get("tokens") != list(tokens) or block_hash(parent, tokens) != hash_:
                problem = "its tokens do not match its hash"
        if problem is not None:
            self._reject(path, problem)
            return None
        return Block(hash_, list(tokens), k, v)

    def _parse(self, f, size: int):
        """(problem or None, header, k, v) of an open block file."""
        raw = f.read(PREFIX.size)
        if len(raw) < PREFIX.size:
            return "truncated", None, None, None
        magic, header_len, crc, payload_len = PREFIX.unpack(raw)
        if magic != MAGIC or header_len > MAX_HEADER:
            return "not a block file", None, None, None
        start = _payload_offset(header_len)
        if payload_len != self._k_bytes + self._v_bytes or size != start + payload_len:
            return f"truncated or resized ({size} bytes)", None, None, None
        header_bytes = f.read(header_len)
        try:
            header = json.loads(header_bytes)
        except ValueError:
            return "unreadable header", None, None, None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            return "another format version", None, None, None
        if (header.get("dtype") != self.dtype.name or header.get("k_shape") != list(self.k_shape)
                or header.get("v_shape") != list(self.v_shape)):
            return "another dtype or layout", None, None, None
        f.seek(start)
        k = np.fromfile(f, dtype=self.dtype, count=int(np.prod(self.k_shape))).reshape(self.k_shape)
        v = np.fromfile(f, dtype=self.dtype, count=int(np.prod(self.v_shape))).reshape(self.v_shape)
        if zlib.crc32(v, zlib.crc32(k, zlib.crc32(header_bytes))) != crc:
            return "checksum mismatch", None, None, None
        return None, header, k, v

    def _reject(self, path: Path, problem: str) -> None:
        log.warning("KV block file %s ignored and deleted: %s", path.name, problem)
        self._rejected += 1
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            return
        with self._backlog_lock:
            self._bytes -= size

    def _load_loop(self) -> None:
        while (job := self._loads.get()) is not None:
            try:
                job()
            except Exception:
                log.exception("KV disk look-up failed")

    # ---- writing (writer thread) --------------------------------------------------------------------

    def _write_loop(self) -> None:
        _remove_stale_temporaries(self.dir)
        self._bytes = _directory_bytes(self.root)
        while (item := self._writes.get()) is not None:
            tenant, index, parent, hash_, tokens, k, v = item
            try:
                self._write(tenant, index, parent, hash_, tokens, k, v)
            except OSError as e:
                log.warning("KV block not written to disk: %s", e.strerror)
            except Exception:
                log.exception("KV block not written to disk")
            finally:
                with self._backlog_lock:
                    self._backlog -= k.nbytes + v.nbytes

    def _write(self, tenant, index: int, parent: bytes, hash_: bytes, tokens: list[int], k, v) -> None:
        path = self.dir / (hash_.hex() + SUFFIX)
        if path.exists():
            _touch(path)
            return
        header = json.dumps({
            "format": FORMAT, "model_sha256": self.model_sha256, "kv_format": self.kv_format,
            "dtype": self.dtype.name, "layout": LAYOUT, "k_shape": list(self.k_shape),
            "v_shape": list(self.v_shape), "block_tokens": self.block_tokens, "tenant": tenant,
            "index": index, "parent": parent.hex(), "hash": hash_.hex(), "tokens": tokens,
        }).encode()
        k = np.ascontiguousarray(k, dtype=self.dtype)
        v = np.ascontiguousarray(v, dtype=self.dtype)
        crc = zlib.crc32(v, zlib.crc32(k, zlib.crc32(header)))
        prefix = PREFIX.pack(MAGIC, len(header), crc, k.nbytes + v.nbytes)
        padding = b"\0" * (_payload_offset(len(header)) - PREFIX.size - len(header))
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{hash_.hex()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "wb") as f:
                for part in (prefix, header, padding, k.data, v.data):
                    f.write(part)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        size = path.stat().st_size
        with self._backlog_lock:
            self._bytes += size
        self._written += size
        self._written_blocks += 1
        if self._bytes > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        """Delete the least recently used block files under the kv directory until it fits max_bytes."""
        files = sorted(_block_files(self.root), key=lambda e: e[1])  # (path, mtime, size), oldest first
        total = sum(size for _, _, size in files)
        for path, _, size in files:
            if total <= self.max_bytes:
                break
            try:
                path.unlink()
                self._evicted += 1
            except FileNotFoundError:
                pass  # another server removed it
            total -= size
        with self._backlog_lock:
            self._bytes = total


def _remove_stale_temporaries(directory: Path, age: float = 3600.0) -> None:
    """Delete half-written files an interrupted server left (a live writer renames its own within seconds)."""
    for path in directory.glob(".*.tmp"):
        try:
            if time.time() - path.stat().st_mtime > age:
                path.unlink()
        except OSError:
            pass


def _payload_offset(header_len: int) -> int:
    return -(-(PREFIX.size + header_len) // ALIGN) * ALIGN


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _block_files(root: Path) -> list[tuple[Path, float, int]]:
    """(path, mtime, size) of every block file under root/<model>/."""
    out = []
    try:
        model_dirs = [d for d in os.scandir(root) if d.is_dir()]
    except OSError:
        return out
    for d in model_dirs:
        try:
            entries = list(os.scandir(d.path))
        except OSError:
            continue
        for e in entries:
            if e.name.endswith(SUFFIX):
                try:
                    st = e.stat()
                except OSError:
                    continue
                out.append((Path(e.path), st.st_mtime, st.st_size))
    return out


def _directory_bytes(root: Path) -> int:
    return sum(size for _, _, size in _block_files(root))


# ---- `kawai cache`: what is on disk -------------------------------------------------------------------


@dataclass(frozen=True)
class ModelBlocks:
    """The disk tier of one model: its directory, block files, bytes, tenants, newest use."""

    model_sha256: str
    files: int
    bytes: int
    tenants: tuple[str, ...]  # "local" for --no-auth
    last_used: float  # mtime of the most recently used file (0 when empty)


def read_header(path: Path) -> dict | None:
    """A block file's JSON header, or None when it is not a readable block file."""
    try:
        with open(path, "rb") as f:
            magic, header_len, _, _ = PREFIX.unpack(f.read(PREFIX.size))
            if magic != MAGIC or header_len > MAX_HEADER:
                return None
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error):
        return None
    return header if isinstance(header, dict) else None


def list_blocks(root: Path) -> list[ModelBlocks]:
    by_model: dict[str, list[tuple[Path, float, int]]] = {}
    for path, mtime, size in _block_files(root):
        by_model.setdefault(path.parent.name, []).append((path, mtime, size))
    out = []
    for model, files in sorted(by_model.items()):
        tenants = set()
        for path, _, _ in files:
            header = read_header(path)
            if header is not None:
                tenants.add(header.get("tenant") or "local")
        out.append(ModelBlocks(model, len(files), sum(s for _, _, s in files), tuple(sorted(tenants)),
                               max(m for _, m, _ in files)))
    return out


def clear_blocks(root: Path, model_sha256: str | None = None) -> tuple[int, int]:
    """Delete the block files (of one model, or all); returns (files, bytes) removed."""
    files = bytes_ = 0
    for path, _, size in _block_files(root):
        if model_sha256 is None or path.parent.name == model_sha256:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            files += 1
            bytes_ += size
    return files, bytes_
