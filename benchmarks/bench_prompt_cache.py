"""Prompt cache across restarts: time to first token of a Claude-Code-sized prompt, cold and after a restart.

    .venv/bin/python benchmarks/bench_prompt_cache.py [-m PATH|ID] [--threads 2] [--home DIR]

The prompt: a fixed system prompt and tool definitions (~12,000 tokens, the size of Claude Code's first
request) and a short user turn. Steps, each a real `kawai serve` process on loopback (--no-auth, one
sequence), all on the same $KAWAI_HOME (a fresh temporary one unless --home is given):

  1. server A: the request, cold (nothing cached): its prefill writes the prompt's blocks to disk;
     server A is stopped with SIGTERM (a drained shutdown, as a restart does);
  2. server B, a new process: the same request -> time to first token from the disk tier (target <= 3 s
     for the 0.5B at 2 threads, issue 15), then a new user turn after the same system prompt and tools;
  3. server C, a second process started while B runs, on the same home: the same request gets the hit.

Time to first token is measured by the client: request sent -> first text delta of the stream. The
usage of each reply (cache_read_input_tokens, cache_creation_input_tokens, input_tokens) is recorded.
Prints the machine load first; the last line is one JSON object (also written to benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"
TOOL_COUNT = 49  # tool definitions; with the system prompt about 12,000 tokens on the Qwen2.5 tokenizer


def system_prompt() -> str:
    """A fixed coding-agent system prompt (deterministic text)."""
    rules = []
    for i in range(60):
        rules.append(
            f"- Rule {i}: when a task touches file number {i}, read it before editing, keep the existing style, "
            f"run the tests that cover it, and report what changed in one short paragraph."
        )
    return ("You are an interactive command line tool that helps users with software engineering tasks. "
            "Use the instructions below and the tools available to you to assist the user.\n\n" + "\n".join(rules))


def tools(count: int = TOOL_COUNT) -> list[dict]:
    """`count` tool definitions with JSON schemas, like an agent's."""
    out = []
    for i in range(count):
        out.append({
            "name": f"tool_{i}",
            "description": (f"Tool {i} operates on the workspace. It reads or changes files, runs commands or searches "
                            f"code. Use it only when the task requires operation kind {i}; prefer the dedicated tool "
                            f"for reading files over shell commands. The result is returned as text."),
            "input_schema": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": f"Absolute path of the file tool {i} works on."},
                    "pattern": {"type": "string", "description": "A regular expression to search for, if any."},
                    "limit": {"type": "integer", "description": "How many lines or results to return at most."},
                    "dry_run": {"type": "boolean", "description": "Report what would change without changing it."},
                },
                "required": ["path"],
            },
        })
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`kawai serve` in a subprocess; the seconds from launch to /health answering."""

    def __init__(self, model: str, home: Path, threads: int, ctx: int, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, KAWAI_HOME=str(home), KAWAI_THREADS=str(threads))
        cmd = [sys.executable, "-P", "-m", "kawai.api.cli", "serve", "-m", model, "--no-auth", "--port", str(self.port),
               "--ctx", str(ctx), "--max-sequences", "1", "--kv-disk", "8GB"]
        t0 = time.perf_counter()
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"bench_prompt_cache: the server exited ({self.proc.returncode}); see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.start_s = time.perf_counter() - t0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=600)
        self.log.close()

    def rss_mib(self) -> float:
        """The server process's resident memory."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        return 0.0

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        out = {}
        for line in text.splitlines():
            if line.startswith("kawai_kv_"):
                name, value = line.rsplit(" ", 1)
                out[name.split("{")[0]] = float(value)
        return out


def ask(server: Server, model_id: str, user: str, n_tools: int) -> dict:
    """Stream one request; seconds to the first text delta, total seconds, usage."""
    body = {"model": model_id, "max_tokens": 8, "temperature": 0, "stream": True, "system": system_prompt(),
            "tools": tools(n_tools), "messages": [{"role": "user", "content": user}]}
    t0 = time.perf_counter()
    first = None
    usage = {}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=3600) as r:
        r.raise_for_status()
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                if event == "content_block_delta" and first is None:
                    first = time.perf_counter() - t0
                if event == "message_start":
                    usage.update(data["message"]["usage"])
                if event == "message_delta":
                    usage.update(data["usage"])
    total = time.perf_counter() - t0
    return {"ttft_s": round(first if first is not None else total, 3), "total_s": round(total, 3), "usage": usage}


def model_id_of(server: Server) -> str:
    return httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default="qwen2.5-coder-0.5b-instruct-q4_k_m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=16384)
    p.add_argument("--tools", type=int, default=TOOL_COUNT, help="tool definitions in the prompt (its size)")
    p.add_argument("--home", type=Path, default=None, help="KAWAI_HOME to use (default: a new temporary one)")
    args = p.parse_args(argv)
    from kawai.engine.catalog import resolve_model

    model = str(resolve_model(args.model))  # a path: the temporary home has no models directory
    home = args.home or Path(tempfile.mkdtemp(prefix="kawai-bench-home-"))
    home.mkdir(parents=True, exist_ok=True)
    log = home / "servers.log"
    print(f"load average: {os.getloadavg()[0]:.2f}; KAWAI_HOME={home}; server logs in {log}", flush=True)
    load_start = os.getloadavg()[0]

    a = Server(model, home, args.threads, args.ctx, log)
    model_id = model_id_of(a)
    rss_idle = a.rss_mib()
    n_prompt = httpx.post(a.url + "/v1/messages/count_tokens", timeout=600, json={
        "model": model_id, "system": system_prompt(), "tools": tools(args.tools),
        "messages": [{"role": "user", "content": "Fix the failing test in tests/test_api.py."}]}).json()["input_tokens"]
    print(f"prompt: {n_prompt} tokens; server A up in {a.start_s:.1f} s; cold request...", flush=True)
    cold = ask(a, model_id, "Fix the failing test in tests/test_api.py.", args.tools)
    rss_after = a.rss_mib()
    print(f"cold: {cold}; server RSS {rss_idle} MiB idle, {rss_after} MiB holding the conversation", flush=True)
    a.stop()

    b = Server(model, home, args.threads, args.ctx, log)
    print(f"server B (restart) up in {b.start_s:.1f} s", flush=True)
    restart = ask(b, model_id, "Fix the failing test in tests/test_api.py.", args.tools)
    print(f"after restart, same request: {restart}", flush=True)
    new_turn = ask(b, model_id, "Add a --verbose flag to the command line.", args.tools)
    print(f"after restart, new user turn (in memory now): {new_turn}", flush=True)
    metrics_b = b.metrics()

    c = Server(model, home, args.threads, args.ctx, log)
    print(f"server C (second process, same home) up in {c.start_s:.1f} s", flush=True)
    second = ask(c, model_id, "Fix the failing test in tests/test_api.py.", args.tools)
    print(f"second process, same request: {second}", flush=True)
    metrics_c = c.metrics()
    c.stop()
    b.stop()

    disk_bytes = sum(f.stat().st_size for f in (home / "kv").glob("*/*.kvb"))
    result = {
        "benchmark": "prompt_cache", "model": args.model, "threads": args.threads, "ctx": args.ctx,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "load_avg_1m": round(load_start, 2), "prompt_tokens": n_prompt,
        "cold": cold, "restart_same_request": restart, "restart_new_user_turn": new_turn,
        "second_process_same_request": second, "server_start_s": {"a": round(a.start_s, 2), "b": round(b.start_s, 2),
                                                                  "c": round(c.start_s, 2)},
        "server_rss_mib": {"idle": rss_idle, "holding_the_conversation": rss_after},
        "disk_bytes": disk_bytes, "metrics_b": metrics_b, "metrics_c": metrics_c,
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
    }
    RESULTS.mkdir(exist_ok=True)
    model_name = Path(args.model).name.removesuffix(".gguf")  # an id, or a file's name
    name = f"{result['date']}-prompt-cache-{model_name}-{args.threads}t.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
