"""Per-process server settings and state, reachable from a request (no module-level state).

`ServerSettings` is frozen configuration; `ServerState` (on `app.state.server`) holds the loaded models
with their engine workers and the token store. Middleware records per-request facts in `scope["state"]`:
the request id and the authenticated token id (the tenant).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import anyio
from starlette.requests import Request

from kawai.api.errors import NotFoundError
from kawai.api.images import ImagePolicy
from kawai.api.metrics import Metrics
from kawai.api.api_keys import TokenStore
from kawai.api.worker import Worker
from kawai.engine.errors import KawaiError
from kawai.engine.kv_cache import DEFAULT_KV_DTYPE
from kawai.engine.served import ServedModel

MAX_BODY_BYTES = 32 * 1024 * 1024  # the Anthropic API's limit
PROMPT_BUILDERS = 4  # request bodies decoded, prompts rendered and tokenized at once (threads of their own)
BODY_SECONDS = 60.0  # a request body must arrive within this (slow senders hold a connection, not more)
MAX_CONNECTIONS = 1000  # uvicorn's limit_concurrency: more connections get 503
PING_INTERVAL_SECONDS = 10.0


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    auth: bool = True  # False: every route is open (local use, `--no-auth`)
    queue_size: int = 8  # jobs waiting per model; more -> 529
    n_ctx: int | None = None  # context window per model (None: the engine's default)
    kv_dtype: str = DEFAULT_KV_DTYPE  # KV cache storage, "f16" or "f32" (engine.kv_cache)
    home: Path | None = None  # where tokens.json lives (None: $KAWAI_HOME)
    max_body_bytes: int = MAX_BODY_BYTES
    ping_interval: float = PING_INTERVAL_SECONDS
    drain_seconds: float = 30.0  # how long shutdown waits for in-flight responses
    # continuous batching (api/worker.py); the CLI runs 4 sequences at once, the library default is 1
    max_sequences: int = 1  # sequences decoded together per model; more wait in the queue
    kv_memory: int | None = None  # bytes of KV caches per model (None: api/worker.default_kv_memory)
    kv_disk: int | None = None  # bytes of KV blocks kept in $KAWAI_HOME/kv across restarts (None: no disk tier)
    max_per_token: int | None = None  # in-flight requests per API token, from their first byte; more -> 429
    body_seconds: float = BODY_SECONDS
    max_connections: int = MAX_CONNECTIONS
    allow_private_image_urls: bool = False  # image URLs may reach loopback/private hosts (api/images.py)
    # model ids clients send (docs/clients.md): (glob pattern, served model id) pairs, tried in order
    aliases: tuple[tuple[str, str], ...] = ()
    strict_model_ids: bool = False  # False: with one model served, any id reaches it
    refuse_images: bool = False  # images to a model without vision: 400 instead of a placeholder
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*": any); () = no CORS

    @property
    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(allow_private=self.allow_private_image_urls)


@dataclass
class LoadedModel:
    llm: ServedModel  # engine.LLM
    worker: Worker
    created_at: datetime
    display_name: str

    @property
    def id(self) -> str:
        return self.llm.id


@dataclass
class ServerState:
    settings: ServerSettings
    tokens: TokenStore | None  # None when auth is off
    models: dict[str, LoadedModel] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    prompt_builders: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(PROMPT_BUILDERS))

    def model(self, model_id: str) -> LoadedModel:
        """The model that serves a requested id: the model of that id, else the first alias whose glob
        matches, else the only model served (unless strict_model_ids); 404 otherwise."""
        found = self.models.get(model_id)
        if found is not None:
            return found
        for pattern, target in self.settings.aliases:
            if fnmatch.fnmatchcase(model_id, pattern):
                return self.models[target]
        if len(self.models) == 1 and not self.settings.strict_model_ids:
            return next(iter(self.models.values()))
        served = ", ".join(sorted(self.models)) or "none"
        raise NotFoundError(f"model: {shown_model_id(model_id)} is not served here. Available models: {served}")


    @property
    def healthy(self) -> bool:
        return bool(self.models) and all(m.worker.alive for m in self.models.values())


def check_aliases(aliases: tuple[tuple[str, str], ...], served_ids) -> None:
    """Every alias must name a served model."""
    for pattern, target in aliases:
        if target not in served_ids:
            raise KawaiError(f"--alias {pattern}={target}: no model {target!r} is served ({', '.join(served_ids)})")


def shown_model_id(model_id: str) -> str:
    """The requested id for an error message, unless it looks like anything but an id (a path)."""
    return repr(model_id) if re.fullmatch(r"[A-Za-z0-9._:-]{1,100}", model_id) else "the requested model"


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def request_id_of(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


def tenant_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("token_id")


def model_created_at(path: Path) -> datetime:
    """When the model file arrived (its mtime), as an aware UTC datetime."""
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).replace(microsecond=0)
    except OSError:
        return datetime(1970, 1, 1, tzinfo=timezone.utc)
