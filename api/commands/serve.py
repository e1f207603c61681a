"""`kawai serve [-m ID|PATH ...] [--host H] [--port P] [--no-auth] [--queue-size N] [--ctx N]
             [--max-sequences N] [--kv-dtype f16|f32] [--kv-memory SIZE] [--kv-disk SIZE] [--max-per-token N]
             [--drain-seconds S]
             [--mmproj FILE] [--allow-private-image-urls] [--alias PATTERN=ID ...] [--strict-model-ids]
             [--refuse-images] [--cors-origin ORIGIN ...]
             [--ray [--replicas N] [--replica-threads N] [--ray-address ADDR]]`.

Serves the Messages API. With no -m, the catalog's default model (pulled if missing). With auth on and
no token in $KAWAI_HOME/tokens.json, one token with every grant is created and printed once on a
terminal, else written to $KAWAI_HOME/first-token (mode 0600). --no-auth on a non-loopback --host also
needs --no-auth-on-network.
SIGTERM or Ctrl-C stops admitting requests (503), lets in-flight responses finish for up to
--drain-seconds, then cancels what is left and joins the engine threads (docs/serving.md).
With --ray (the `kawai[ray]` extra), N replicas of the same server run on a Ray cluster behind Ray
Serve's HTTP proxy, routed by prompt prefix (api/ray_app.py, docs/scale-out.md).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys

from kawai.engine.errors import KawaiError
from kawai.engine.kv_cache import DEFAULT_KV_DTYPE, KV_DTYPES

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_KV_DISK = "8GB"
FIRST_TOKEN_FILE = "first-token"  # in $KAWAI_HOME, mode 0600, when stdout is not a terminal


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the Messages API (Anthropic wire format)")
    p.add_argument("-m", "--model", dest="models", action="append", metavar="ID|PATH",
                   help="model to serve (repeatable; default: the catalog default, pulled if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--no-auth", action="store_true", help="serve without API tokens (local use only)")
    p.add_argument("--no-auth-on-network", action="store_true",
                   help="allow --no-auth on a non-loopback --host (anyone who can reach the port may use it)")
    p.add_argument("--queue-size", type=int, default=8, metavar="N",
                   help="requests waiting per model before 529 overloaded (default: 8)")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="context window in tokens (default: the model's trained context)")
    p.add_argument("--max-sequences", type=int, default=4, metavar="N",
                   help="sequences decoded together per model (continuous batching; default: 4)")
    p.add_argument("--kv-dtype", choices=list(KV_DTYPES), default=DEFAULT_KV_DTYPE,
                   help=f"KV cache storage: f16 (half the memory of f32) or f32 (default: {DEFAULT_KV_DTYPE})")
    p.add_argument("--kv-memory", default=None, metavar="SIZE",
                   help="KV cache memory per model, running sequences and prefix cache, e.g. 2GB "
                        "(default: two full-context caches per sequence, within half the memory)")
    p.add_argument("--kv-disk", default=DEFAULT_KV_DISK, metavar="SIZE",
                   help=f"prompt blocks kept in $KAWAI_HOME/kv across restarts, e.g. 20GB; 0 turns the disk tier "
                        f"off (default: {DEFAULT_KV_DISK})")
    p.add_argument("--max-per-token", type=int, default=None, metavar="N",
                   help="in-flight requests per API token before 429 rate_limit_error (default: no limit)")
    p.add_argument("--drain-seconds", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, how long in-flight responses may take to finish (default: 30)")
    p.add_argument("--mmproj", default=None, metavar="FILE",
                   help="vision projector (mmproj GGUF) for the -m model (default: one found next to it)")
    p.add_argument("--allow-private-image-urls", action="store_true",
                   help="let image URLs reach loopback and private addresses (local deployments only)")
    p.add_argument("--alias", dest="aliases", action="append", default=[], metavar="PATTERN=ID",
                   help="serve model ids matching the glob PATTERN with model ID, e.g. 'claude-*=qwen2.5-coder-1.5b-"
                        "instruct-q4_k_m' (repeatable; tried in order)")
    p.add_argument("--strict-model-ids", action="store_true",
                   help="404 for ids that are neither a served model nor an alias (default: with one model "
                        "served, every id reaches it)")
    p.add_argument("--refuse-images", action="store_true",
                   help="answer 400 to images sent to a model without vision (default: the model reads "
                        "'[image omitted: this model cannot see images]')")
    p.add_argument("--cors-origin", dest="cors_origins", action="append", default=[], metavar="ORIGIN",
                   help="let browser pages from ORIGIN call the API, e.g. http://localhost:3000 (repeatable; "
                        "'*' for any origin; default: none)")
    p.add_argument("--ray", action="store_true",
                   help="serve N replicas on Ray Serve, routed by prompt prefix (needs `pip install kawai[ray]`)")
    p.add_argument("--replicas", type=int, default=2, metavar="N", help="with --ray: engine replicas (default: 2)")
    p.add_argument("--replica-threads", type=int, default=1, metavar="N",
                   help="with --ray: kernel threads (and Ray CPUs) per replica (default: 1)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --ray: the Ray cluster to join (default: the local one `ray start` left, else a new one)")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    from kawai.engine import catalog

    if not 0 < args.port < 65536:
        raise KawaiError(f"--port must be in 1..65535, got {args.port}")
    if not 1 <= args.queue_size <= 10_000:
        raise KawaiError(f"--queue-size must be in 1..10000, got {args.queue_size}")
    if args.ctx is not None and args.ctx < 16:
        raise KawaiError(f"--ctx must be at least 16, got {args.ctx}")
    if not 1 <= args.max_sequences <= 256:
        raise KawaiError(f"--max-sequences must be in 1..256, got {args.max_sequences}")
    if args.max_per_token is not None and args.max_per_token < 1:
        raise KawaiError(f"--max-per-token must be at least 1, got {args.max_per_token}")
    if not 0 <= args.drain_seconds <= 3600:
        raise KawaiError(f"--drain-seconds must be in 0..3600, got {args.drain_seconds}")
    if not 1 <= args.replicas <= 1024:
        raise KawaiError(f"--replicas must be in 1..1024, got {args.replicas}")
    if not 1 <= args.replica_threads <= 1024:
        raise KawaiError(f"--replica-threads must be in 1..1024, got {args.replica_threads}")

    from kawai.api.worker import parse_bytes

    kv_memory = None
    if args.kv_memory is not None:
        try:
            kv_memory = parse_bytes(args.kv_memory)
        except ValueError as e:
            raise KawaiError(f"--kv-memory: {e}") from None
    kv_disk = None
    if args.kv_disk.strip() not in ("0", "off"):
        try:
            kv_disk = parse_bytes(args.kv_disk)
        except ValueError as e:
            raise KawaiError(f"--kv-disk: {e}") from None
    aliases = tuple(_parse_alias(a) for a in args.aliases)
    if args.no_auth and not _is_loopback(args.host) and not args.no_auth_on_network:
        raise KawaiError(
            f"--no-auth on {args.host} would open the API to the network (and share one prefix cache among "
            "all its users); bind to 127.0.0.1, or add --no-auth-on-network if that is what you want"
        )
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)

    from kawai.api.state import ServerSettings, check_aliases

    settings = ServerSettings(
        host=args.host, port=args.port, auth=not args.no_auth, queue_size=args.queue_size, n_ctx=args.ctx,
        kv_dtype=args.kv_dtype,
        max_sequences=args.max_sequences, kv_memory=kv_memory, kv_disk=kv_disk, max_per_token=args.max_per_token,
        drain_seconds=args.drain_seconds, allow_private_image_urls=args.allow_private_image_urls,
        aliases=aliases, strict_model_ids=args.strict_model_ids, refuse_images=args.refuse_images,
        cors_origins=tuple(args.cors_origins),
    )
    specs = args.models or [catalog.DEFAULT_MODEL_ID]
    if args.mmproj is not None and len(specs) != 1:
        raise KawaiError("--mmproj needs exactly one -m model (it is that model's vision projector)")
    for spec in specs:  # pull catalog models now: clear errors before anything starts
        if spec.lower() in catalog.CATALOG:
            catalog.ensure_model(spec)
        else:
            catalog.resolve_model(spec)
    if settings.auth:
        _first_token(settings)
    elif not _is_loopback(args.host):
        logging.getLogger("kawai.server").warning("--no-auth-on-network: the API is open to the network")
    if args.ray:
        return _serve_on_ray(args, settings, specs)
    llms = _load(specs, settings, args.mmproj)
    check_aliases(settings.aliases, [llm.id for llm in llms])
    _check_kv_memory(settings, llms)
    return _serve(settings, llms)


def _parse_alias(text: str) -> tuple[str, str]:
    pattern, sep, target = text.partition("=")
    if not sep or not pattern.strip() or not target.strip():
        raise KawaiError(f"--alias must be PATTERN=ID (e.g. 'claude-*=qwen2.5-coder-1.5b-instruct-q4_k_m'), got {text!r}")
    return pattern.strip(), target.strip()


def _serve_on_ray(args, settings, specs: list[str]) -> int:
    try:
        from kawai.api.ray_app import serve_on_ray
    except ImportError:
        raise KawaiError("--ray needs Ray Serve: pip install 'kawai[ray]'") from None
    return serve_on_ray(settings, specs, replicas=args.replicas, threads=args.replica_threads,
                        address=args.ray_address, mmproj=args.mmproj)


def _check_kv_memory(settings, llms: list) -> None:
    """--kv-memory must hold at least one block of KV memory of every model (prompts longer than it
    holds are refused with 529)."""
    from kawai.api.worker import format_bytes
    from kawai.engine.prefix_cache import BLOCK_TOKENS

    for llm in llms:
        need = llm.kv_bytes(BLOCK_TOKENS)
        if settings.kv_memory is not None and settings.kv_memory < need:
            raise KawaiError(
                f"--kv-memory {format_bytes(settings.kv_memory)} holds no KV block of {llm.id}: {BLOCK_TOKENS} "
                f"positions need {format_bytes(need)} (raise --kv-memory)"
            )


def _load(specs: list[str], settings, mmproj: str | None = None) -> list:
    """Load before the server starts, so a bad model file is one clear error, not a server traceback."""
    from kawai import engine

    log = logging.getLogger("kawai.server")
    llms = []
    for spec in specs:
        llm = engine.load(spec, n_ctx=settings.n_ctx, mmproj=mmproj, kv_dtype=settings.kv_dtype)
        if llm.has_vision:
            log.info("vision projector %s: images accepted", llm.projector.path.name)
        log.info("%s", llm.load_summary())
        llms.append(llm)
    return llms


def _serve(settings, llms: list) -> int:
    from kawai.api.app import create_app

    app = create_app(settings, llms)
    server = _draining_server(uvicorn_config(settings, app), app)
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


def uvicorn_config(settings, app):
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our logging setup; uvicorn's loggers propagate to it
        access_log=False,  # api/middleware.py writes the access log, with request ids
        timeout_graceful_shutdown=int(settings.drain_seconds),
        server_header=False,
        limit_concurrency=settings.max_connections,  # connections and requests at once; more get 503
        timeout_keep_alive=5,  # an idle kept-alive connection is closed after this many seconds
    )


def _draining_server(config, app):
    """A uvicorn.Server that, on SIGTERM/SIGINT, first tells every engine to stop admitting (new
    requests get 503) while uvicorn lets the in-flight ones finish."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            for model in app.state.server.models.values():
                model.worker.stop_admitting()
            super().handle_exit(sig, frame)

    return _Server(config)


def _first_token(settings) -> None:
    from kawai.api.api_keys import DEFAULT_ENDPOINTS, TokenStore
    from kawai.engine.catalog import kawai_home

    store = TokenStore(settings.home or kawai_home())
    if store.has_tokens():
        return
    rec, secret = store.create("default", DEFAULT_ENDPOINTS)
    usage = "Send it as `x-api-key: <token>` or `Authorization: Bearer <token>`. Manage tokens with `kawai tokens`."
    if sys.stdout.isatty():
        print(f"Created API token {rec.id} with access to {', '.join(DEFAULT_ENDPOINTS)}. It is shown only this once:\n\n"
              f"    {secret}\n\n{usage}", flush=True)
        return
    # Not a terminal: stdout is likely a log that containers and journald keep. The token goes to a file
    # only its owner can read, and the output says where.
    path = store.path.parent / FIRST_TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, 0o600)
    print(f"Created API token {rec.id} with access to {', '.join(DEFAULT_ENDPOINTS)}. Output is not a terminal, so it "
          f"was written to {path} (readable by its owner only); delete the file once you have it. {usage}",
          flush=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
