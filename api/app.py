"""The Starlette app factory and its lifespan.

    app = create_app(ServerSettings(port=8080), ["qwen2.5-coder-0.5b-instruct-q4_k_m"])

The lifespan loads each model (engine.load compiles/warms the kernels), starts one engine thread per
model, logs load and compile times on their own lines and then the address, and on shutdown stops the
engine threads. Middleware, outermost first: CORS (with `cors_origins`), OpenAI error shapes (under
/v1/chat/ only), request ids + last-resort 500 + access log, metrics, auth, then the per-token in-flight
limit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kawai.api.auth import PUBLIC, AuthMiddleware
from kawai.api.errors import ApiError, InvalidRequestError, MethodNotAllowedError, NotFoundError, error_response
from kawai.api.limits import InFlightLimit
from kawai.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kawai.api.metrics import MetricsMiddleware
from kawai.api.middleware import RequestContextMiddleware
from kawai.api.openapi import openapi_document
from kawai.api.routes_messages import count_tokens, create_message
from kawai.api.routes_models import get_model, health, list_models
from kawai.api.routes_openai import OpenAIErrors, create_chat_completion
from kawai.api.state import LoadedModel, check_aliases, ServerSettings, ServerState, model_created_at, request_id_of, server_state
from kawai.api.api_keys import TokenStore
from kawai.api.worker import Worker
from kawai.engine.errors import KawaiError
from kawai.engine.served import ServedModel

log = logging.getLogger("kawai.server")

# route name -> the endpoint grant a token needs (see api/auth.py)
GRANTS = {
    "messages": "messages",
    "chat_completions": "chat_completions",
    "count_tokens": "count_tokens",
    "list_models": "models",
    "get_model": "models",
    "health": PUBLIC,
    "openapi": PUBLIC,  # a constant of the code (no model, tenant or setting in it): api/openapi.py
    "metrics": "metrics",  # every tenant's traffic: a grant of its own, not in the default token
}


CORS_EXPOSED_HEADERS = [
    "request-id", "anthropic-request-id", "retry-after", "x-should-retry", "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-requests-reset",
]


def build_routes() -> list[Route]:
    return [
        Route("/v1/messages", create_message, methods=["POST"], name="messages"),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"], name="count_tokens"),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"], name="chat_completions"),
        Route("/v1/models", list_models, methods=["GET"], name="list_models"),
        Route("/v1/models/{model_id}", get_model, methods=["GET"], name="get_model"),
        Route("/health", health, methods=["GET"], name="health"),
        Route("/metrics", metrics_page, methods=["GET"], name="metrics"),
        Route("/openapi.json", openapi_page, methods=["GET"], name="openapi"),
    ]


def create_app(settings: ServerSettings, models: Sequence[str | Path | ServedModel]) -> Starlette:
    """models: catalog ids or .gguf paths to load at start-up (or already loaded engine.LLM objects)."""
    if not models:
        raise KawaiError("no model to serve")
    store = None
    if settings.auth:
        from kawai.engine.catalog import kawai_home

        store = TokenStore(settings.home or kawai_home())
    state = ServerState(settings, store)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        try:
            await _load_models(state, models)
            check_aliases(settings.aliases, list(state.models))
            log.info("serving %s on http://%s:%d", ", ".join(state.models), _host(settings.host), settings.port)
            if not settings.auth:
                log.warning("authentication is OFF (--no-auth): anyone who can reach the port can use it")
            yield
        finally:
            for m in state.models.values():
                m.worker.stop(timeout=settings.drain_seconds)

    app = Starlette(
        routes=build_routes(),
        exception_handlers={ApiError: _on_api_error, HTTPException: _on_http_error},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # a redirect would be built from the Host header
    # add_middleware puts each one outermost; auth reads the router's live route list, so a route added
    # later without a grant is denied rather than open.
    app.add_middleware(InFlightLimit, limit=settings.max_per_token)  # inside auth: it counts per token
    app.add_middleware(AuthMiddleware, store=store, routes=app.router.routes, grants=GRANTS)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(OpenAIErrors)  # reshapes every error under /v1/chat/, 500s included
    if settings.cors_origins:  # outermost: a preflight (OPTIONS, no token) is answered before auth
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],  # x-api-key, anthropic-version, anthropic-dangerous-direct-browser-access, ...
            expose_headers=CORS_EXPOSED_HEADERS,
            max_age=600,
        )
    app.state.server = state
    app.state.openapi = json.dumps(openapi_document(), separators=(",", ":")).encode()
    return app


async def _load_models(state: ServerState, models: Sequence[str | Path | ServedModel]) -> None:
    from kawai import engine

    for spec in models:
        if isinstance(spec, (str, Path)):
            llm = await run_in_threadpool(engine.load, spec, n_ctx=state.settings.n_ctx,
                                         kv_dtype=state.settings.kv_dtype)
            log.info("%s", llm.load_summary())
        else:
            llm = spec
        if llm.id in state.models:
            raise KawaiError(f"model {llm.id!r} is listed twice")
        settings = state.settings
        worker = Worker(
            llm,
            settings.queue_size,
            max_sequences=settings.max_sequences,
            kv_memory=settings.kv_memory,
            kv_dir=_kv_dir(settings),
            kv_disk=settings.kv_disk,
            metrics=state.metrics,  # the per-token limit is InFlightLimit's alone (api/limits.py)
        )
        state.metrics.add_gauges(worker.gauges)
        state.metrics.add_gauges(worker.counters, kind="counter")
        worker.start()
        state.models[llm.id] = LoadedModel(
            llm=llm,
            worker=worker,
            created_at=model_created_at(Path(llm.path)),
            display_name=llm.display_name,
        )


def _kv_dir(settings: ServerSettings) -> Path:
    """The disk tier of the prefix cache: $KAWAI_HOME/kv (docs/serving.md)."""
    from kawai.engine.catalog import kawai_home

    return Path(settings.home or kawai_home()) / "kv"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def metrics_page(request: Request) -> Response:
    """Prometheus text format (api/metrics.py)."""
    return Response(server_state(request).metrics.render(), media_type=METRICS_CONTENT_TYPE)


async def openapi_page(request: Request) -> Response:
    """The OpenAPI 3.1 document of this API (api/openapi.py)."""
    return Response(request.app.state.openapi, media_type="application/json")


async def _on_api_error(request: Request, exc: ApiError):
    return error_response(exc, request_id_of(request))


async def _on_http_error(request: Request, exc: HTTPException):
    if exc.status_code == 404:
        err: ApiError = NotFoundError("Not found: no such endpoint.")
    elif exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        err = MethodNotAllowedError(f"Method {request.method} is not allowed on this endpoint.", {"allow": allow})
    elif exc.status_code < 500:
        err = InvalidRequestError("Invalid request.")
    else:
        err = ApiError("Internal server error.")
    return error_response(err, request_id_of(request))
