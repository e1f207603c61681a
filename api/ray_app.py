"""Kawai on Ray Serve: N engine replicas behind one endpoint, routed by prompt prefix (docs/scale-out.md).

    client ──HTTP──▶ Ray Serve proxy ──▶ Gateway ──handle + PrefixAffinityRouter──▶ Engine replica 1..N
                                         (relay)                                    (create_app: the same
                                                                                     Starlette app)

- `Engine` (N replicas, `threads` CPUs each) runs the whole single-process server in-process: the
  Starlette app of api/app.py with its lifespan, engine thread, token store, errors and metrics. Its
  `handle` method takes one HTTP request (ASGI scope + body) and yields the app's ASGI send messages.
- `Gateway` (one replica, no model) is a relay, not a second HTTP layer: it reads the body (capped as
  the app caps it), names the request's prompt prefixes (api/affinity.py) and streams the chosen
  replica's messages back to Ray's proxy unchanged — status, headers, every SSE frame and ping.
  It writes a response of its own only when no replica produced one: 529 when every replica's queue is
  full, 503 when the replica was lost before answering (the SDKs retry both), and an `event: error`
  (`api_error`) frame when a replica is lost in the middle of a stream.
- `PrefixAffinityRouter` plugs into Ray Serve's request-router extension point (`RequestRouter`): a later
  turn of a conversation goes to the replica that served its earlier turns, unless that replica already
  has `max_load` requests in flight; everything else to the least-loaded replica.

Run it with `kawai serve --ray [--replicas N]`, or `serve run kawai.api.ray_app:build_app models=ID
replicas=2`, or a Serve config / KubeRay RayService whose import_path is `kawai.api.ray_app:build_app`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kawai.api.affinity import PrefixTable, affinity_chain, tenant_key
from kawai.api.auth import _presented_token
from kawai.api.errors import ApiError, OverloadedError, UnavailableError, error_response
from kawai.api.ids import new_request_id
from kawai.api.sse import encode_event, error_event
from kawai.api.state import ServerSettings

log = logging.getLogger("kawai.ray")

APP_NAME = "kawai"
RECENT_S = 1.0  # how long the router counts a choice of its own as load (see PrefixAffinityRouter.recent)
ROUTINGS = ("affinity", "pow2")  # pow2: Ray Serve's default power-of-two-choices router, for comparison
REPLICA_LOST = "The replica serving this request stopped; retry the request."
# the ASGI scope keys a replica needs (the proxy's scope also carries objects that do not pickle)
SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path",
              "query_string", "headers", "client", "server")


@dataclass(frozen=True)
class RelayedRequest:
    """One HTTP request on its way from the gateway to an engine replica."""

    scope: dict[str, Any]  # the ASGI HTTP scope, picklable keys only
    body: bytes  # at most max_body_bytes + 1 (the replica answers a longer body with 413)
    chain: tuple[str, ...]  # prefix hashes (api/affinity.py); () for anything but a Messages request


# ---- the engine replica ----------------------------------------------------------------------------


class Engine:
    """One kawai server (create_app) inside a Ray Serve replica. `handle` drives the app as an ASGI
    server would; the client's disconnect arrives as Ray cancelling the call."""

    async def __init__(self, settings: ServerSettings, models: list[str], mmproj: str | None = None):
        from kawai.api.app import create_app
        from kawai.api.commands.serve import LOG_FORMAT, _check_kv_memory, _load

        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        llms = await asyncio.to_thread(_load, models, settings, mmproj)
        _check_kv_memory(settings, llms)
        self.app = create_app(settings, llms)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.state = self.app.state.server
        self.state.metrics.add_gauges(self._gauges)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the engine threads

    async def handle(self, request: RelayedRequest):
        """Run the app on one request; yields its ASGI send messages (start, body chunks)."""
        sent: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body = [{"type": "http.request", "body": request.body, "more_body": False}]

        async def receive() -> dict:
            if body:
                return body.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        done = object()
        task = asyncio.create_task(self.app(dict(request.scope), receive, sent.put))
        task.add_done_callback(lambda _: sent.put_nowait(done))
        try:
            while (message := await sent.get()) is not done:
                yield message
            task.result()  # the middleware turns handler errors into responses; anything else is a bug
        finally:  # the caller went away (Ray cancels this generator) or the response is complete
            gone.set()
            if not task.done():
                task.cancel()  # the route's finally blocks cancel the engine job

    def check_health(self) -> None:
        """Ray calls this every health_check_period_s; a dead or wedged engine thread gets the replica
        replaced."""
        if not self.state.healthy:
            raise RuntimeError("an engine thread is not running")

    async def __del__(self):
        """Ray stopped routing here and waited up to graceful_shutdown_timeout_s for in-flight requests;
        what is left is cancelled and the engine threads are joined, as `kawai serve` does on SIGTERM."""
        lifespan = getattr(self, "_lifespan", None)
        if lifespan is not None:
            for model in self.state.models.values():
                model.worker.stop_admitting()
            await lifespan.__aexit__(None, None, None)

    def _gauges(self):
        labels = (("replica", self.replica), ("pid", str(os.getpid())))
        yield "kawai_replica_info", labels, 1, "The Ray Serve replica that answered (its id and process)."


# ---- the gateway -------------------------------------------------------------------------------------


class Relay:
    """The gateway's ASGI app: HTTP request -> RelayedRequest -> an engine replica -> the same bytes back."""

    def __init__(self, engine, max_body_bytes: int):
        self.engine = engine.options(stream=True, method_name="handle")
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan_noop(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive, self.max_body_bytes + 1)
        if body is None:
            return  # the client left before sending its request
        is_messages = scope["method"] == "POST" and scope["path"] == "/v1/messages"
        chain = ()
        if is_messages:  # decoding up to 32 MB of JSON is CPU work: off the proxy's event loop
            chain = await asyncio.to_thread(affinity_chain, tenant_key(_presented_token(scope)), body)
        request = RelayedRequest({k: scope[k] for k in SCOPE_KEYS if k in scope}, body, chain)
        stream = self.engine.remote(request)
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, stream))
        started: dict | None = None  # the replica's response start, once sent
        finished = False  # the response's last body message is sent
        try:
            async for message in stream:
                if message["type"] == "http.response.start":
                    started = message
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    finished = True  # stop here: the client may close before the generator reports its end
                    break
        except RequestCancelledError:
            pass  # the client left and the watcher cancelled the replica's generator
        except BackPressureError:
            await _send_error(OverloadedError("Overloaded: every replica's queue is full. Retry later."), send)
        except Exception:
            log.exception("a replica failed while serving %s %s", scope["method"], scope["path"])
            if started is None:
                await _send_error(UnavailableError(REPLICA_LOST), send)
            elif _is_event_stream(started):
                frame = encode_event(error_event(ApiError(REPLICA_LOST), _request_id(started)))
                await send({"type": "http.response.body", "body": frame, "more_body": False})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            if not finished:
                stream.cancel()  # no-op when the replica is gone or already done


class Gateway:
    """The ingress deployment: Ray's proxy hands it every HTTP request (see Relay)."""

    def __init__(self, engine, max_body_bytes: int):
        self.relay = Relay(engine, max_body_bytes)

    def __serve_build_asgi_app__(self):
        return self.relay


async def _read_body(receive, limit: int) -> bytes | None:
    """Up to `limit` bytes of the body; None if the client disconnected first."""
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk[: max(0, limit - total)])
        total += len(chunk)
        if total >= limit or not message.get("more_body", False):
            return b"".join(chunks)


async def _cancel_on_disconnect(receive, stream) -> None:
    """The body is read: the next message is the client going away."""
    while (await receive())["type"] != "http.disconnect":
        pass
    stream.cancel()


async def _lifespan_noop(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send_error(err: ApiError, send) -> None:
    """An Anthropic-shaped error of the gateway's own, with a request id like every response."""
    request_id = new_request_id()
    response = error_response(err, request_id)
    response.headers["request-id"] = response.headers["anthropic-request-id"] = request_id

    async def no_receive() -> dict:
        return {"type": "http.disconnect"}

    await response({"type": "http"}, no_receive, send)


def _header(start: dict, name: bytes) -> str:
    for key, value in start.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _is_event_stream(start: dict) -> bool:
    return _header(start, b"content-type").startswith("text/event-stream")


def _request_id(start: dict) -> str:
    return _header(start, b"request-id")


# ---- the router ------------------------------------------------------------------------------------


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router keyed by (tenant, prompt prefix).

    - A request whose chain shares at least one message with an earlier request's (a later turn of a
      conversation) goes to the replica that served the longest such prefix, while that replica has
      fewer than `max_load` requests in flight.
    - Anything else — a new conversation, one whose replica is busy or gone, a request without a chain
      (count_tokens, models, metrics) — goes to the least-loaded replica; among equals, a conversation
      goes to the one that least recently started one (conversations take turns over the replicas'
      caches), anything else to a random one.

    A match on the head alone (the same system prompt and tools, no message in common) does not pin a
    new conversation: piling every conversation with a popular system prompt onto one replica would
    overflow that replica's cache while the others sit empty. Each replica pays the head's prefill once.

    One router lives in each caller of the Engine deployment (the gateway replica), so the table is that
    gateway's view of where prefixes went."""

    def initialize_state(self, max_load: int = 4, max_entries: int = 200_000):
        self.max_load = max_load
        self.table = PrefixTable(max_entries)
        self.started: dict[ReplicaID, int] = {}  # replica -> when it last started a conversation
        self.clock = 0
        # Requests this router just chose a replica for. Ray counts a request in its queue-length cache
        # only once it is sent, after this method returns; a burst of arrivals would all see the same
        # loads and pick the same replica. Each choice counts here until Ray sends it (`on_send_request`:
        # from then on Ray's cache counts it, until it completes), or RECENT_S seconds at most. Counting it
        # for the whole RECENT_S made a finished request still look in flight: a conversation's next turn,
        # sent within a second, found its replica "full" and went elsewhere, its prefix cache missed.
        self.recent: dict[ReplicaID, set[int]] = {}  # replica -> ids of its choices not yet sent
        self.choices = 0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """One replica per rank, best first; Ray sends to the first with room (fewer requests in flight
        than its max_ongoing_requests)."""
        loads = await self._loads(candidate_replicas)
        chain = _chain_of(pending_request)
        order = sorted(random.sample(candidate_replicas, len(candidate_replicas)),  # random among equals
                       key=lambda r: (loads[r.replica_id], self.started.get(r.replica_id, 0) if chain else 0))
        owner = self._owner(pending_request, loads)
        if owner is not None and loads[owner] < self.max_load:
            order.sort(key=lambda r: r.replica_id != owner)  # stable: the rest stay least-loaded first
        self._count_recent(order[0].replica_id)
        return [[r] for r in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        chain = _chain_of(pending_request)
        if chain:
            if self._owner(pending_request, [replica_id]) is None:  # a conversation starts here
                self.clock += 1
                self.started[replica_id] = self.clock
            self.table.record(chain, replica_id)

    def _owner(self, pending_request: PendingRequest | None, replicas) -> ReplicaID | None:
        """The replica among `replicas` holding at least the first message of the request's chain."""
        owner, matched = self.table.lookup(_chain_of(pending_request), replicas)
        return owner if matched >= 2 else None

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id)
        self.started.pop(replica_id, None)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self.curr_replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for replica_id in gone:
            self.table.forget(replica_id)
            self.started.pop(replica_id, None)

    async def _loads(self, replicas: list[RunningReplica]) -> dict[ReplicaID, float]:
        """Requests in flight per replica: Ray's queue-length cache, probing the replicas it has no fresh
        entry for (a replica that does not answer counts as full)."""
        loads = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) for r in replicas}
        unknown = [r for r in replicas if loads[r.replica_id] is None]
        if unknown:
            for r, n in await self._probe_queue_lens(unknown, 0):
                loads[r.replica_id] = math.inf if n is None else n
        return {rid: n + len(self.recent.get(rid, ())) for rid, n in loads.items()}

    def _count_recent(self, replica_id: ReplicaID) -> None:
        self.choices += 1
        self.recent.setdefault(replica_id, set()).add(self.choices)
        asyncio.get_running_loop().call_later(RECENT_S, self._uncount_recent, replica_id, self.choices)

    def _uncount_recent(self, replica_id: ReplicaID, choice: int | None = None) -> None:
        """Stop counting a choice of replica_id: `choice` (its RECENT_S passed) or the oldest (one was sent)."""
        pending = self.recent.get(replica_id)
        if pending:
            pending.discard(min(pending) if choice is None else choice)
            if not pending:
                del self.recent[replica_id]

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)  # Ray's queue-length cache counts the request from here
        self._uncount_recent(replica_id)


def _chain_of(pending_request: PendingRequest | None) -> tuple[str, ...]:
    """The RelayedRequest's chain. Looked up by attribute, not isinstance: Ray may unpickle the router
    and the gateway with separate copies of this module's classes."""
    for arg in pending_request.args if pending_request is not None else ():
        chain = getattr(arg, "chain", None)
        if isinstance(chain, tuple):
            return chain
    return ()


# ---- building and running the application ----------------------------------------------------------


def build(
    settings: ServerSettings,
    models: list[str],
    *,
    replicas: int = 2,
    threads: int = 1,
    routing: str = "affinity",
    mmproj: str | None = None,
):
    """The Serve application: `replicas` Engine replicas of `threads` CPUs each behind one Gateway."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
    engine_options: dict[str, Any] = dict(
        name="Engine",
        num_replicas=replicas,
        # what one replica admits (running + its queue); beyond it on every replica, requests wait in the
        # gateway, up to queue_size per replica, then 529 there
        max_ongoing_requests=settings.max_sequences + settings.queue_size,
        max_queued_requests=settings.queue_size * replicas,
        graceful_shutdown_timeout_s=settings.drain_seconds,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5,
        health_check_timeout_s=30,
        ray_actor_options={"num_cpus": threads, "runtime_env": {"env_vars": {"KAWAI_THREADS": str(threads)}}},
    )
    if routing == "affinity":
        engine_options["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"max_load": settings.max_sequences},
        )
    engine = serve.deployment(Engine).options(**engine_options).bind(settings, list(models), mmproj)
    gateway = serve.deployment(serve.ingress()(Gateway)).options(
        name="Gateway", num_replicas=1, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0}
    )
    return gateway.bind(engine, settings.max_body_bytes)


def build_app(args: dict[str, Any]):
    """`serve run kawai.api.ray_app:build_app models=ID[,ID] replicas=2 threads=1 max_sequences=4
    home=DIR no_auth=false routing=affinity` (or the same keys under `args:` in a Serve config)."""
    models = args.get("models", "qwen2.5-coder-0.5b-instruct-q4_k_m")
    models = models.split(",") if isinstance(models, str) else list(models)
    settings = ServerSettings(
        auth=str(args.get("no_auth", "false")).lower() not in ("1", "true", "yes"),
        home=Path(args["home"]) if args.get("home") else None,
        max_sequences=int(args.get("max_sequences", 4)),
        queue_size=int(args.get("queue_size", 8)),
        n_ctx=int(args["ctx"]) if args.get("ctx") else None,
        drain_seconds=float(args.get("drain_seconds", 30)),
    )
    return build(settings, models, replicas=int(args.get("replicas", 2)), threads=int(args.get("threads", 1)),
                 routing=str(args.get("routing", "affinity")))


def serve_on_ray(settings: ServerSettings, models: list[str], *, replicas: int, threads: int,
                 address: str | None, mmproj: str | None = None) -> int:
    """`kawai serve --ray`: deploy on the Ray cluster at `address` (None: the one `ray start` left on
    this machine, else a new local one), serve on settings.host:port until SIGTERM/SIGINT, then drain
    (each replica finishes its in-flight requests for up to settings.drain_seconds) and exit 0."""
    ray.init(address=address, logging_level=logging.WARNING)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build(settings, models, replicas=replicas, threads=threads, mmproj=mmproj),
              name=APP_NAME, route_prefix="/")
    log.info("serving %s on http://%s:%d with %d replicas (Ray Serve)", ", ".join(models), settings.host,
             settings.port, replicas)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
        log.info("draining (up to %.0f s)", settings.drain_seconds)
        serve.delete(APP_NAME)
        serve.shutdown()
        ray.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0
