"""Prefix-affinity keys: which replica most likely holds a request's prompt prefix in its KV cache.

A replica's prefix cache (engine/prefix_cache.py) reuses the longest common token prefix of the same
tenant. A router in front of several replicas cannot tokenize, but a conversation's prompt grows message
by message, so its prefixes can be named by hashing the request's JSON one message at a time:

    chain[0] = H(tenant, model, system, tools)          the part every turn starts with
    chain[i] = H(chain[i-1], messages[i-1])             the first i messages on top of it

Turn 2 of a conversation sends turn 1's messages again (plus the answer and a new question), so its
chain starts with turn 1's whole chain. `PrefixTable` remembers, for recent chain hashes, the replica a
request carrying them went to; the longest hash of a new request found there names its replica.

What the key leaves out, because it changes between turns without changing the prompt the model sees:
`cache_control` markers (clients move them to the newest message every turn), the system blocks that
api/routes_messages.py drops before rendering (Claude Code's per-request billing header), sampling
parameters and max_tokens. A plain-string content is the same as one text block. The tenant is a hash
of the presented API token: prefix caches are per tenant, so two tenants never share a chain.

No part of this module imports Ray: the Ray Serve router (api/ray_app.py) uses it, and it is unit-tested
on its own.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

from kawai.api.limits import MAX_JSON_VALUES, count_json_values
from kawai.api.routes_messages import VOLATILE_SYSTEM_PREFIXES

MAX_ENTRIES = 200_000  # chain hashes remembered (about 30 MB); the least recently used go first


def affinity_chain(tenant: str | None, body: bytes) -> tuple[str, ...]:
    """The chain of prefix hashes of a Messages request body; () when it is not a JSON object with a
    list of messages (the replica answers it with its usual 400, and the router balances by load), or
    when it holds more JSON values than a replica accepts (api/limits.py: counted before decoding, so a
    hostile body costs the proxy no more memory than it costs a replica)."""
    if count_json_values(body) > MAX_JSON_VALUES:
        return ()
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return ()
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        return ()
    head = {
        "tenant": tenant,
        "model": data.get("model"),
        "system": _kept_system(data.get("system")),
        "tools": _without_cache_control(data.get("tools")),
    }
    chain = [_hash("", head)]
    for message in data["messages"]:
        if isinstance(message, dict):
            message = {**message, "content": _blocks(message.get("content"))}
        chain.append(_hash(chain[-1], message))
    return tuple(chain)


def tenant_key(token: str | None) -> str | None:
    """A stand-in for the token's id: the same token, the same key; never the token itself."""
    return None if token is None else hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:32]


class PrefixTable:
    """chain hash -> the replica the last request carrying it went to; bounded, least recently used
    out first. Not thread-safe: the router calls it from its event loop only."""

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._owner: OrderedDict[str, Hashable] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def lookup(self, chain: Sequence[str], replicas: Iterable[Hashable]) -> tuple[Hashable | None, int]:
        """(replica, matched links): the replica among `replicas` holding the longest prefix of
        `chain`, and how many links of the chain matched (0: none)."""
        live = set(replicas)
        for n in range(len(chain), 0, -1):
            owner = self._owner.get(chain[n - 1])
            if owner is not None and owner in live:
                for link in chain[:n]:  # the whole matched prefix was just useful
                    if link in self._owner:
                        self._owner.move_to_end(link)
                return owner, n
        return None, 0

    def record(self, chain: Sequence[str], replica: Hashable) -> None:
        """The request with this chain went to `replica`: each of its prefixes is now there."""
        for link in chain:
            self._owner[link] = replica
            self._owner.move_to_end(link)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        """A replica is gone (its cache with it)."""
        for link in [k for k, owner in self._owner.items() if owner == replica]:
            del self._owner[link]


def _hash(previous: str, value: Any) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.blake2b(f"{previous}\n{text}".encode(), digest_size=16).hexdigest()


def _blocks(content: Any) -> Any:
    """A string is one text block; cache_control markers are dropped."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return _without_cache_control(content)


def _kept_system(system: Any) -> Any:
    """The system blocks the replica renders (volatile client metadata dropped, as the route does)."""
    blocks = _blocks(system)
    if not isinstance(blocks, list):
        return blocks
    return [
        b for b in blocks
        if not (isinstance(b, dict) and isinstance(b.get("text"), str)
                and b["text"].lstrip().startswith(VOLATILE_SYSTEM_PREFIXES))
    ]


def _without_cache_control(value: Any) -> Any:
    if isinstance(value, list):
        return [_without_cache_control(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_cache_control(v) for k, v in value.items() if k != "cache_control"}
    return value
