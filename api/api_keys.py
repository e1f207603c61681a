"""API tokens: $KAWAI_HOME/tokens.json, secrets stored only as SHA-256 hashes.

A token is `kawai-` + 43 base62 characters (256 random bits). It is shown once, at creation; the file
keeps its hash plus non-secret facts for listing and logs:

    {"version": 1, "tokens": [{"id": "tok_…", "name": "laptop", "prefix": "kawai-Ab12",
      "sha256": "<hex>", "endpoints": ["messages", "count_tokens", "models"],
      "limit": {"count": 1000, "period": "day"} | null, "created_at": "2026-05-01T12:00:00Z"}]}

Usage against limits lives next to it in token-usage.sqlite3 (written by the server only): each request
is counted in one SQLite transaction, so several server processes sharing a home count together and a
restart forgets nothing. The server re-reads tokens.json when it changes, so `kawai tokens revoke` takes
effect without a restart.
Lookups hash the presented token and compare against every stored hash with `secrets.compare_digest`,
without stopping at a match.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from kawai.api.ids import ALPHABET
from kawai.engine.errors import KawaiError

ENDPOINTS = ("messages", "count_tokens", "models", "chat_completions", "metrics")
# What a token gets unless asked otherwise: /metrics shows every tenant's traffic, so it is its own grant.
DEFAULT_ENDPOINTS = ("messages", "count_tokens", "models", "chat_completions")
PERIODS = ("day", "month")
TOKEN_PREFIX = "kawai-"
SECRET_CHARS = 43  # 43 base62 characters ~ 256 bits
SHOWN_PREFIX_CHARS = len(TOKEN_PREFIX) + 4
MAX_TOKEN_CHARS = 512  # a presented token longer than this is rejected without hashing
MAX_NAME_CHARS = 100
MAX_LIMIT = 10**9
TOKENS_FILE = "tokens.json"
USAGE_FILE = "token-usage.sqlite3"
USAGE_SCHEMA = "CREATE TABLE IF NOT EXISTS usage (token_id TEXT PRIMARY KEY, period TEXT NOT NULL, count INTEGER NOT NULL)"


class TokenStoreError(KawaiError):
    """A bad argument or an unreadable tokens file."""


@dataclass(frozen=True)
class Limit:
    count: int
    period: str  # "day" | "month" (UTC calendar periods)

    @classmethod
    def parse(cls, text: str) -> Limit:
        m = re.fullmatch(r"\s*(\d{1,10})\s*/\s*(day|month)\s*", text or "")
        if not m or not 1 <= int(m.group(1)) <= MAX_LIMIT:
            raise TokenStoreError(f"limit must look like N/day or N/month with 1 <= N <= {MAX_LIMIT}, got {text!r}")
        return cls(int(m.group(1)), m.group(2))

    def __str__(self) -> str:
        return f"{self.count}/{self.period}"

    def window(self, now: datetime) -> tuple[str, datetime]:
        """(key of the current period, when the next one starts)."""
        if self.period == "day":
            start = now.replace(hour=0, minute=0, second=0, microsecond=0)
            return start.strftime("%Y-%m-%d"), start + timedelta(days=1)
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start.strftime("%Y-%m"), nxt


@dataclass(frozen=True)
class TokenRecord:
    id: str
    name: str
    prefix: str
    sha256: str
    endpoints: tuple[str, ...]
    limit: Limit | None
    created_at: str

    def to_json(self) -> dict:
        d = asdict(self)
        d["endpoints"] = list(self.endpoints)
        d["limit"] = None if self.limit is None else {"count": self.limit.count, "period": self.limit.period}
        return d

    @classmethod
    def from_json(cls, d: dict) -> TokenRecord:
        try:
            limit = d.get("limit")
            rec = cls(
                id=str(d["id"]),
                name=str(d["name"]),
                prefix=str(d["prefix"]),
                sha256=str(d["sha256"]),
                endpoints=tuple(e for e in d["endpoints"] if e in ENDPOINTS),
                limit=None if limit is None else Limit(int(limit["count"]), str(limit["period"])),
                created_at=str(d.get("created_at", "")),
            )
        except (KeyError, TypeError, ValueError):
            raise TokenStoreError(f"{TOKENS_FILE}: malformed token entry") from None
        if not re.fullmatch(r"[0-9a-f]{64}", rec.sha256) or (rec.limit and rec.limit.period not in PERIODS):
            raise TokenStoreError(f"{TOKENS_FILE}: malformed token entry {rec.id!r}")
        return rec


@dataclass(frozen=True)
class QuotaExceeded:
    retry_after_seconds: int


@dataclass(frozen=True)
class QuotaState:
    """Where a limited token stands: what `anthropic-ratelimit-requests-*` headers report."""

    limit: int
    remaining: int
    reset: datetime  # when the next period starts (UTC)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_endpoints(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(p.strip() for p in (text or "").split(",") if p.strip()))
    bad = [n for n in names if n not in ENDPOINTS]
    if not names or bad:
        raise TokenStoreError(f"endpoints must be a comma-separated subset of {','.join(ENDPOINTS)}, got {text!r}")
    return names


class TokenStore:
    """Thread-safe access to the token file and the usage counters."""

    def __init__(self, home: Path):
        self.path = Path(home) / TOKENS_FILE
        self.usage_path = Path(home) / USAGE_FILE
        self._lock = threading.Lock()
        self._records: tuple[TokenRecord, ...] = ()
        self._stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read

    # ---- management (CLI) ---------------------------------------------------------------------------

    def create(self, name: str, endpoints: tuple[str, ...], limit: Limit | None = None) -> tuple[TokenRecord, str]:
        """Add a token; returns (record, the secret token — the only time it exists outside a hash)."""
        name = (name or "").strip()
        if not name or len(name) > MAX_NAME_CHARS or any(ord(c) < 0x20 for c in name):
            raise TokenStoreError(f"name must be 1..{MAX_NAME_CHARS} printable characters")
        bad = [e for e in endpoints if e not in ENDPOINTS]
        if not endpoints or bad:
            raise TokenStoreError(f"endpoints must be a subset of {', '.join(ENDPOINTS)}")
        secret = TOKEN_PREFIX + "".join(secrets.choice(ALPHABET) for _ in range(SECRET_CHARS))
        with self._lock:
            records = self._load()
            taken = {r.id for r in records}
            token_id = _new_token_id(taken)
            rec = TokenRecord(
                id=token_id,
                name=name,
                prefix=secret[:SHOWN_PREFIX_CHARS],
                sha256=hash_token(secret),
                endpoints=tuple(endpoints),
                limit=limit,
                created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            self._save(records + (rec,))
        return rec, secret

    def list(self) -> tuple[TokenRecord, ...]:
        with self._lock:
            return self._load()

    def revoke(self, token_id: str) -> TokenRecord:
        with self._lock:
            records = self._load()
            found = [r for r in records if r.id == token_id]
            if not found:
                raise TokenStoreError(f"no token with id {token_id!r} (see `kawai tokens list`)")
            self._save(tuple(r for r in records if r.id != token_id))
        return found[0]

    # ---- serving ------------------------------------------------------------------------------------

    def authenticate(self, token: str) -> TokenRecord | None:
        """The record whose hash matches, or None. Constant-time over the stored hashes."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        digest = hash_token(token)
        with self._lock:
            records = self._load()
        found = None
        for rec in records:  # no early exit: timing does not depend on which record matches
            if secrets.compare_digest(rec.sha256, digest):
                found = rec
        return found

    def consume(self, rec: TokenRecord, now: datetime | None = None) -> QuotaExceeded | None:
        """Count one request against the token's limit; QuotaExceeded when it is used up. One SQLite
        transaction (BEGIN IMMEDIATE: read, check, write), safe across threads and processes; it does
        file I/O, so the server calls it off the event loop."""
        if rec.limit is None:
            return None
        now = now or datetime.now(timezone.utc)
        key, next_start = rec.limit.window(now)
        with self._usage_db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT period, count FROM usage WHERE token_id = ?", (rec.id,)).fetchone()
            count = row[1] if row is not None and row[0] == key else 0
            if count >= rec.limit.count:
                db.execute("ROLLBACK")
                return QuotaExceeded(max(1, int((next_start - now).total_seconds()) + 1))
            db.execute("INSERT INTO usage (token_id, period, count) VALUES (?, ?, ?) ON CONFLICT (token_id) "
                       "DO UPDATE SET period = excluded.period, count = excluded.count", (rec.id, key, count + 1))
            db.execute("COMMIT")
        return None

    def quota(self, rec: TokenRecord, now: datetime | None = None) -> QuotaState | None:
        """The token's requests left in the current period; None for a token without a limit."""
        if rec.limit is None:
            return None
        now = now or datetime.now(timezone.utc)
        key, next_start = rec.limit.window(now)
        with self._usage_db() as db:
            row = db.execute("SELECT period, count FROM usage WHERE token_id = ?", (rec.id,)).fetchone()
        used = row[1] if row is not None and row[0] == key else 0
        return QuotaState(rec.limit.count, max(0, rec.limit.count - used), next_start)

    def has_tokens(self) -> bool:
        return bool(self.list())

    # ---- files --------------------------------------------------------------------------------------

    def _load(self) -> tuple[TokenRecord, ...]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._records, self._stamp = (), None
            return ()
        except OSError:
            raise TokenStoreError(f"cannot read {TOKENS_FILE}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                entries = data["tokens"]
                if not isinstance(entries, list):
                    raise TypeError
            except (OSError, ValueError, KeyError, TypeError):
                raise TokenStoreError(f"{TOKENS_FILE} is not a valid token file") from None
            self._records = tuple(TokenRecord.from_json(e) for e in entries)
            self._stamp = stamp
        return self._records

    def _save(self, records: tuple[TokenRecord, ...]) -> None:
        _write_json(self.path, {"version": 1, "tokens": [r.to_json() for r in records]})
        self._stamp = None  # re-read (and re-stamp) on next use
        self._records = records

    @contextmanager
    def _usage_db(self) -> Iterator[sqlite3.Connection]:
        """A connection to the usage database (created owner-only), closed after use."""
        if not self.usage_path.exists():
            self.usage_path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.usage_path, os.O_WRONLY | os.O_CREAT, 0o600))
        try:
            db = sqlite3.connect(self.usage_path, timeout=30, isolation_level=None)
        except sqlite3.Error:
            raise TokenStoreError(f"cannot open {USAGE_FILE}") from None
        try:
            db.execute(USAGE_SCHEMA)
            yield db
        except sqlite3.Error:
            raise TokenStoreError(f"{USAGE_FILE} cannot be updated") from None
        finally:
            db.close()


def _new_token_id(taken: set[str]) -> str:
    while True:
        token_id = "tok_" + "".join(secrets.choice(ALPHABET) for _ in range(10))
        if token_id not in taken:
            return token_id


def _write_json(path: Path, data) -> None:
    """Atomic replace, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
