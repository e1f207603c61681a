"""`kawai bench`: how fast our engine runs a model on this machine.

Reports kernel compile time (cold and cached, each in a fresh process), model load time, prefill and
decode tokens/s, time to first token, achieved weight-read GB/s against the measured memory bandwidth,
and peak RSS. The last line is one JSON object. Side-by-side figures against llama.cpp and transformers
come from benchmarks/compare.py (docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path

from kawai.engine.catalog import DEFAULT_MODEL_ID
from kawai.engine.errors import KawaiError

MAX_BENCH_TOKENS = 32768


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure compile, load, prefill and decode speed of a model")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL_ID,
                   help=f"local model id or .gguf path (default {DEFAULT_MODEL_ID})")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for prefill (default 512)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens to generate for decode (default 128)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all usable cores)")
    p.add_argument("--no-compile", action="store_true", help="skip the cold/cached kernel compile measurement")
    p.add_argument("--json", action="store_true", help="print only the final JSON line")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    from kawai.engine.bench import BenchSettings, run_bench, to_json_line
    from kawai.engine.compute_threads import default_threads, max_threads

    threads = args.threads if args.threads is not None else default_threads()
    if not 1 <= threads <= max_threads():
        raise KawaiError(f"--threads must be between 1 and {max_threads()}, got {threads}")
    if not 1 <= args.prompt_tokens <= MAX_BENCH_TOKENS:
        raise KawaiError(f"--prompt-tokens must be between 1 and {MAX_BENCH_TOKENS}, got {args.prompt_tokens}")
    if not 2 <= args.gen_tokens <= MAX_BENCH_TOKENS:
        raise KawaiError(f"--gen-tokens must be between 2 and {MAX_BENCH_TOKENS}, got {args.gen_tokens}")
    model_id, path = _resolve(args.model)
    settings = BenchSettings(
        model_path=path,
        model_id=model_id,
        threads=threads,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        measure_compile=not args.no_compile,
    )
    log = (lambda msg: None) if args.json else (lambda msg: print(msg, flush=True))
    log(f"kawai bench: {model_id}, {threads} threads, {args.prompt_tokens} prompt tokens, "
        f"{args.gen_tokens} generated")
    result = run_bench(settings, log)
    print(to_json_line(result), flush=True)
    return 0


def _resolve(id_or_path: str) -> tuple[str, Path]:
    """(model id, GGUF path) for a local model id or a .gguf path; local files are named <id>.gguf."""
    from kawai.engine.catalog import resolve_model

    path = resolve_model(id_or_path)
    return path.name.removesuffix(".gguf"), path
