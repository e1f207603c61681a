"""Server time to first token against `kawai bench`'s prefill at the same prompt length: the server must
prefill as fast as the benchmark says (issue 14: within 10%).

    .venv/bin/python -P benchmarks/bench_server_ttft.py [-m MODEL] [--prompt-tokens 2000] [--requests 3]

Starts `kawai serve` on loopback (no auth, all cores), streams `--requests` Messages requests of about
`--prompt-tokens` tokens (a repeated sentence; each starts with its own number, so the prefix cache never
serves one from another) and times each up to its first content delta; then runs `kawai bench
--prompt-tokens N --threads <cores>` and compares prefill rates. The last line is one JSON object, also
written to benchmarks/results/ (with the CPU and kernel instruction set).
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


def first_token_seconds(url: str, text: str) -> float:
    body = {"model": "m", "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": text}]}
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/messages", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if "content_block_delta" in line:
                return time.perf_counter() - start
    raise SystemExit("the stream ended without content")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="qwen2.5-coder-0.5b-instruct-q4_k_m")
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--port", type=int, default=18089)
    ap.add_argument("--no-save", action="store_true", help="do not write a result JSON")
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
            served.append({"prompt_tokens": n, "ttft_s": round(first_token_seconds(url, text), 3)})
            print(f"server: {n} prompt tokens, first token after {served[-1]['ttft_s']:.3f} s", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    threads = os.cpu_count() or 1
    out = subprocess.run([str(KAWAI), "bench", "-m", str(path), "--threads", str(threads), "--prompt-tokens",
                          str(args.prompt_tokens), "--gen-tokens", "4"], capture_output=True, text=True, check=True)
    bench = json.loads(out.stdout.strip().splitlines()[-1])
    server_rate = sorted(s["prompt_tokens"] / s["ttft_s"] for s in served)[len(served) // 2]  # median
    result = {"benchmark": "server_ttft", "model": args.model, "date": date.today().isoformat(),
              "cpu": isa.cpu_model(), "isa": isa.ISA, "threads": threads, "served": served,
              "server_prefill_tok_s": round(server_rate, 1), "bench_prefill_tok_s": round(bench["prefill_tok_s"], 1),
              "bench_ttft_s": round(bench["ttft_s"], 3), "server_vs_bench": round(server_rate / bench["prefill_tok_s"], 3)}
    print(f"kawai bench: {args.prompt_tokens} prompt tokens in {bench['ttft_s']:.3f} s; server median "
          f"{server_rate:.1f} tok/s vs bench {bench['prefill_tok_s']:.1f} tok/s = {result['server_vs_bench']:.3f}")
    if not args.no_save:
        name = f"{result['date']}-server-ttft-{args.model}-{args.prompt_tokens}p.json"
        (Path(__file__).parent / "results" / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
