"""`kawai serve [-m ID|PATH ...] [--host H] [--port P] [--no-auth] [--queue-size N] [--ctx N]`.

Serves the Messages API. With no -m, the catalog's default model (pulled if missing). With auth on and
no token in $KAWAI_HOME/tokens.json, one token with every grant is created and printed once.
SIGTERM or Ctrl-C stops accepting connections and lets in-flight responses finish (bounded wait).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys

from engine.errors import KawaiError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the Messages API (Anthropic wire format)")
    p.add_argument("-m", "--model", dest="models", action="append", metavar="ID|PATH",
                   help="model to serve (repeatable; default: the catalog default, pulled if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--no-auth", action="store_true", help="serve without API tokens (local use only)")
    p.add_argument("--queue-size", type=int, default=8, metavar="N",
                   help="requests waiting per model before 529 overloaded (default: 8)")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="context window in tokens (default: the engine's default, at most the trained one)")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    from engine import catalog

    if not 0 < args.port < 65536:
        raise KawaiError(f"--port must be in 1..65535, got {args.port}")
    if not 1 <= args.queue_size <= 10_000:
        raise KawaiError(f"--queue-size must be in 1..10000, got {args.queue_size}")
    if args.ctx is not None and args.ctx < 16:
        raise KawaiError(f"--ctx must be at least 16, got {args.ctx}")
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)

    from api.state import ServerSettings

    settings = ServerSettings(
        host=args.host, port=args.port, auth=not args.no_auth, queue_size=args.queue_size, n_ctx=args.ctx
    )
    specs = args.models or [catalog.DEFAULT_MODEL_ID]
    for spec in specs:  # pull catalog models now: clear errors before anything starts
        if spec.lower() in catalog.CATALOG:
            catalog.ensure_model(spec)
        else:
            catalog.resolve_model(spec)
    if settings.auth:
        _first_token(settings)
    elif not _is_loopback(args.host):
        logging.getLogger("kawai.server").warning("--no-auth on a non-loopback address: the API is open to the network")
    llms = _load(specs, settings)
    return _serve(settings, llms)


def _load(specs: list[str], settings) -> list:
    """Load before the server starts, so a bad model file is one clear error, not a server traceback."""
    import engine

    log = logging.getLogger("kawai.server")
    llms = []
    for spec in specs:
        llm = engine.load(spec, n_ctx=settings.n_ctx)
        log.info("loaded %s in %.1f s (n_ctx %d)", llm.id, llm.load_seconds - llm.compile_seconds, llm.n_ctx)
        log.info("kernels compiled and warmed in %.1f s", llm.compile_seconds)
        llms.append(llm)
    return llms


def _serve(settings, llms: list) -> int:
    import uvicorn

    from api.app import create_app

    app = create_app(settings, llms)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our logging setup; uvicorn's loggers propagate to it
        access_log=False,  # api/middleware.py writes the access log, with request ids
        timeout_graceful_shutdown=int(settings.drain_seconds),
        server_header=False,
    )
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler that was installed
    # before it: make that one a no-op, so a drained shutdown exits 0 instead of dying by the signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logging.getLogger("kawai.server").info("stopped")
    return 0 if server.started else 1


def _first_token(settings) -> None:
    from api.tokens import ENDPOINTS, TokenStore
    from engine.catalog import kawai_home

    store = TokenStore(settings.home or kawai_home())
    if store.has_tokens():
        return
    rec, secret = store.create("default", ENDPOINTS)
    print(
        f"Created API token {rec.id} with access to {', '.join(ENDPOINTS)}. It is shown only this once:\n\n"
        f"    {secret}\n\n"
        "Send it as `x-api-key: <token>` or `Authorization: Bearer <token>`. Manage tokens with `kawai tokens`.",
        flush=True,
    )
    sys.stdout.flush()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
