"""The server against `kawai bench` at the same prompt length: time to first token (prefill) and decode
rate. A request through `kawai serve` runs the same engine path as the benchmark, so it must be as fast
(issue 14: prefill within 10%); the server only adds HTTP, SSE and a thread of its own for the engine.

    .venv/bin/python -P benchmarks/bench_server.py [-m MODEL] [--prompt-tokens 2000] [--gen-tokens 128]
                                                   [--requests 3]

Starts `kawai serve` on loopback (no auth, all cores), streams `--requests` Messages requests of about
`--prompt-tokens` tokens (a repeated sentence; each starts with its own number, so the prefix cache never
serves one from another), greedy, up to `--gen-tokens`: the seconds to the first content delta, and the
decode rate after it (output tokens from the final `usage`, less the first, over the seconds from the first
delta to `message_stop`). Then `kawai bench --prompt-tokens N --gen-tokens G --threads <cores>`; the
ratios are of medians. The last line is one JSON object, also written to benchmarks/results/ (with the CPU
and kernel instruction set).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

from kawai.engine.catalog import resolve_model
from kawai.kernels import isa

SENTENCE = "The quick brown fox jumps over the lazy dog. "
KAWAI = Path(sys.executable).with_name("kawai")


def wait_healthy(url: str, server: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"kawai serve exited with {server.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("kawai serve did not become healthy")


def prompt_of(url: str, tokens: int, i: int) -> tuple[str, int]:
    """A prompt of about `tokens` tokens (counted by the server) starting with i."""
    repeats = max(1, tokens // 10)
    for _ in range(4):
        text = f"{i} " + SENTENCE * repeats
        body = {"model": "m", "messages": [{"role": "user", "content": text}]}
        n = httpx.post(url + "/v1/messages/count_tokens", json=body, timeout=30).json()["input_tokens"]
        if abs(n - tokens) <= 40:
            break
        repeats = max(1, round(repeats * tokens / n))
    return text, n


def timed_stream(url: str, text: str, max_tokens: int) -> dict:
    """One greedy streamed request: seconds to the first content delta, decode tok/s after it."""
    body = {"model": "m", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": text}]}
    start = time.perf_counter()
    first = end = None
    output_tokens = 0
    with httpx.stream("POST", url + "/v1/messages", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if first is None and "content_block_delta" in line:
                first = time.perf_counter()
            elif line.startswith("data: ") and '"message_delta"' in line:
                output_tokens = json.loads(line[6:])["usage"]["output_tokens"]
            elif "message_stop" in line:
                end = time.perf_counter()
    if first is None or end is None:
        raise SystemExit("the stream ended without content")
    decode = (output_tokens - 1) / (end - first) if output_tokens > 1 and end > first else None
    return {"ttft_s": round(first - start, 3), "output_tokens": output_tokens,
            "decode_tok_s": round(decode, 2) if decode else None}


def median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v)
    return values[len(values) // 2] if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="qwen2.5-coder-0.5b-instruct-q4_k_m")
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--port", type=int, default=18089)
    ap.add_argument("--no-save", action="store_true", help="do not write a result JSON")
    ap.add_argument("--tag", default="", help="a word for the result file's name (runs of one day apart)")
    args = ap.parse_args()
    path = resolve_model(args.model)
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "KAWAI_HOME": tempfile.mkdtemp(prefix="kawai-ttft-")}  # no disk prompt cache
    server = subprocess.Popen([str(KAWAI), "serve", "-m", str(path), "--no-auth", "--port", str(args.port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, server)
        served = []
        for i in range(args.requests):
            text, n = prompt_of(url, args.prompt_tokens, i)
            served.append({"prompt_tokens": n, **timed_stream(url, text, args.gen_tokens)})
            print(f"server: {n} prompt tokens, first token after {served[-1]['ttft_s']:.3f} s, then "
                  f"{served[-1]['output_tokens']} tokens at {served[-1]['decode_tok_s']} tok/s", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    threads = os.cpu_count() or 1
    out = subprocess.run([str(KAWAI), "bench", "-m", str(path), "--threads", str(threads), "--prompt-tokens",
                          str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--no-compile"],
                         capture_output=True, text=True, check=True)
    bench = json.loads(out.stdout.strip().splitlines()[-1])
    server_rate = median([s["prompt_tokens"] / s["ttft_s"] for s in served])
    server_decode = median([s["decode_tok_s"] for s in served])
    result = {"benchmark": "server", "model": args.model, "date": date.today().isoformat(),
              "cpu": isa.cpu_model(), "isa": isa.ISA, "threads": threads, "served": served,
              "server_prefill_tok_s": round(server_rate, 1), "bench_prefill_tok_s": round(bench["prefill_tok_s"], 1),
              "bench_ttft_s": round(bench["ttft_s"], 3), "server_vs_bench": round(server_rate / bench["prefill_tok_s"], 3),
              "server_decode_tok_s": server_decode, "bench_decode_tok_s": round(bench["decode_tok_s"], 2),
              "server_vs_bench_decode": round(server_decode / bench["decode_tok_s"], 3) if server_decode else None}
    print(f"kawai bench: {args.prompt_tokens} prompt tokens in {bench['ttft_s']:.3f} s; server median "
          f"{server_rate:.1f} tok/s vs bench {bench['prefill_tok_s']:.1f} tok/s = {result['server_vs_bench']:.3f}; "
          f"decode {server_decode} vs {bench['decode_tok_s']:.2f} tok/s = {result['server_vs_bench_decode']}")
    if not args.no_save:
        tag = f"{args.tag}-" if args.tag else ""
        name = f"{result['date']}-{tag}server-{args.model}-{args.prompt_tokens}p.json"
        (Path(__file__).parent / "results" / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
