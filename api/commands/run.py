"""`kawai run`: answer one prompt, streamed to stdout; load, compile and speed figures go to stderr.

    kawai run "Write a haiku about caches"
    echo "def fib(n):" | kawai run --raw --temperature 0 -

The model, thread and sampling options are shared with `kawai chat` (see the add_*_arguments helpers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from kawai.engine.errors import KawaiError
from kawai.engine.kv_cache import DEFAULT_KV_DTYPE, KV_DTYPES

DEFAULT_MAX_TOKENS = 512
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
DEFAULT_TOP_K = 40


def register(sub) -> None:
    p = sub.add_parser("run", help="answer one prompt (streamed to stdout)")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--system", metavar="TEXT", help="system prompt (chat mode only)")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    p.add_argument("prompt", help='the prompt, or "-" to read it from stdin')
    p.set_defaults(handler=_run)


# ---- options shared with `kawai chat` ---------------------------------------------------------------


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m", "--model", metavar="ID|PATH", help="model id or .gguf path (default: the catalog's default model)"
    )
    p.add_argument("--threads", type=int, metavar="N", help="kernel threads (default: KAWAI_THREADS or all cores)")
    p.add_argument("--n-ctx", type=int, metavar="N", help="context window in tokens (default: the trained context)")
    p.add_argument("--kv-dtype", choices=list(KV_DTYPES), default=DEFAULT_KV_DTYPE,
                   help=f"KV cache storage: f16 (half the memory of f32) or f32 (default: {DEFAULT_KV_DTYPE})")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help=f"most tokens to generate (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, metavar="T",
                   help=f"0 = greedy (default {DEFAULT_TEMPERATURE})")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, metavar="P",
                   help=f"nucleus sampling mass, 1 = off (default {DEFAULT_TOP_P})")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, metavar="K",
                   help=f"keep the K likeliest tokens, 0 = off (default {DEFAULT_TOP_K})")
    p.add_argument("--seed", type=int, metavar="S", help="random seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop sequence (repeatable)")


def sampling_params(args: argparse.Namespace):
    from kawai.engine.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
    )


def load_model(args: argparse.Namespace, err: TextIO | None = None):
    """Pull the model if it is a catalog id not yet local, load it, report load and compile times."""
    from kawai import engine
    from kawai.engine import catalog

    err = err or sys.stderr

    model = args.model or catalog.DEFAULT_MODEL_ID
    if model.lower() in catalog.CATALOG and not Path(model).is_file():
        catalog.ensure_model(model)  # downloads (with a progress bar on stderr) only when missing
    else:
        catalog.resolve_model(model)  # an unknown model fails here, before the kernels are set up
    llm = engine.load(model, n_ctx=args.n_ctx, threads=args.threads, kv_dtype=args.kv_dtype)
    cfg = llm.config
    threads = f"{llm.threads} thread{'s' if llm.threads != 1 else ''}"
    print(f"model: {llm.id} ({cfg.arch}, {cfg.n_layers} layers, n_ctx {llm.n_ctx}, KV cache {llm.kv_dtype}, {threads})", file=err)
    print(f"load time: {llm.load_seconds:.2f} s", file=err)
    print(f"kernel compile time: {llm.compile_seconds:.2f} s", file=err)
    return llm


def format_speed(tokens: int, seconds: float, per_second: float) -> str:
    rate = f"{per_second:.1f} tokens/s" if seconds > 0 else "n/a"
    return f"{tokens} tokens, {seconds:.2f} s, {rate}"


# ---- the command ------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise KawaiError("the prompt is empty")
    if args.raw and args.system is not None:
        raise KawaiError("--system needs the chat template; leave out --raw")
    params = sampling_params(args)  # bad values fail before the model loads
    llm = load_model(args)
    if args.raw:
        ids = llm.encode_prompt(prompt)
    else:
        if not llm.has_chat_template:
            print("note: the model has no chat template; using ChatML (--raw for plain completion)", file=sys.stderr)
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = llm.encode_chat(messages)

    generation = llm.generate(ids, params)
    out = sys.stdout
    last = ""
    for step in generation:
        if step.text:
            out.write(step.text)
            out.flush()
            last = step.text
    if not last.endswith("\n"):
        out.write("\n")
    out.flush()

    s = generation.stats
    print(f"prompt: {format_speed(s.prefill_tokens, s.prefill_seconds, s.prefill_tokens_per_second)}", file=sys.stderr)
    print(
        f"generation: {format_speed(s.generated_tokens, s.decode_seconds, s.decode_tokens_per_second)}"
        f" (finish: {s.finish_reason})",
        file=sys.stderr,
    )
    return 0
