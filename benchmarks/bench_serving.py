"""Serving benchmark: the continuous-batching scheduler (api/worker.py) on a real model, no HTTP.

    KAWAI_THREADS=1 .venv/bin/python benchmarks/bench_serving.py [--model PATH] [--streams 1,2,4,8]
                                                                 [--tokens 48] [--prefix 600]

1. Aggregate decode tokens/s at 1, 2, 4, 8 concurrent streams: C requests are submitted together to a
   scheduler running C sequences; every token's arrival time is recorded; the rate is the number of
   tokens that arrived while all C streams were decoding (after the last first token, before the first
   finish) divided by that window. Prompt tokens are never counted. Greedy, counting prompts (long
   answers, no early end of turn).
2. Time to first token for a prompt with a long shared prefix (--prefix tokens of system text), cold
   (nothing cached for this tenant) and warm (the same tenant sent the same prefix before, a different
   question after it): median of 3, each with a fresh tenant.
Prints the machine load (1-minute load average) first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path


from kawai import engine
from kawai.api.worker import Failed, Finished, Job, Worker
from kawai.engine.sampling import SamplingParams

DEFAULT_MODEL = Path(os.environ.get("KAWAI_HOME", Path.home() / ".cache" / "kawai")) / "models" / (
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")


class TimedChannel:
    """Records when each token arrives; `done` is set by the final item."""

    def __init__(self):
        self.times: list[float] = []
        self.done = threading.Event()
        self.finished: Finished | None = None

    def put(self, item) -> bool:
        now = time.perf_counter()
        if isinstance(item, (Finished, Failed)):
            self.finished = item if isinstance(item, Finished) else None
            self.done.set()
        elif item.token_id is not None:
            self.times.append(now)
        return True


def run(worker: Worker, prompts: list[list[int]], params: SamplingParams, tenant: str) -> list[TimedChannel]:
    channels = [TimedChannel() for _ in prompts]
    for i, (p, ch) in enumerate(zip(prompts, channels)):
        worker.submit(Job(p, params, ch, f"bench_{i}", tenant=tenant))
    for ch in channels:
        ch.done.wait()
    return channels


def decode_rate(llm, streams: int, n_tokens: int) -> dict:
    worker = Worker(llm, queue_size=0, max_sequences=streams)
    worker.start()
    try:
        prompts = [llm.encode_chat([{"role": "user", "content": f"Count from {100 * i + 1} to {100 * i + 300}, "
                                     "one number per line, nothing else."}]) for i in range(streams)]
        params = SamplingParams(temperature=0, max_tokens=n_tokens)
        run(worker, prompts, params, "warm-up")
        channels = run(worker, prompts, params, f"decode-{streams}")
    finally:
        worker.stop(timeout=30)
    start = max(ch.times[0] for ch in channels)  # every stream is decoding from here on
    end = min(ch.times[-1] for ch in channels)  # ... until the first one finishes
    in_window = sum(1 for ch in channels for t in ch.times if start < t <= end)
    generated = sum(len(ch.times) for ch in channels)
    return {"streams": streams, "tokens": generated, "window_s": round(end - start, 3),
            "decode_tok_s": round(in_window / (end - start), 2) if end > start else None}


def ttft(llm, prefix_tokens: int) -> dict:
    filler = " ".join(f"Rule {i}: answer briefly and precisely." for i in range(prefix_tokens // 8))
    system = f"You are a careful assistant. {filler}"

    def prompt(question: str) -> list[int]:
        return llm.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": question}])

    worker = Worker(llm, queue_size=4, max_sequences=1)
    worker.start()
    params = SamplingParams(temperature=0, max_tokens=1)
    cold, warm = [], []
    try:
        run(worker, [prompt("Warm-up?")], params, "warm-up")
        for i in range(3):
            tenant = f"tenant-{i}"
            t0 = time.perf_counter()
            (ch,) = run(worker, [prompt(f"What is {i} plus {i}?")], params, tenant)
            cold.append(ch.times[0] - t0)
            t0 = time.perf_counter()
            (ch,) = run(worker, [prompt(f"And what is {i} times {i}?")], params, tenant)
            warm.append(ch.times[0] - t0)
            reused = ch.finished.cached_tokens
    finally:
        worker.stop(timeout=30)
    return {"prompt_tokens": len(prompt("What is 0 plus 0?")), "reused_tokens": reused,
            "ttft_cold_s": round(statistics.median(cold), 3), "ttft_warm_s": round(statistics.median(warm), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=48, help="max tokens per stream")
    ap.add_argument("--prefix", type=int, default=600, help="approximate shared-prefix length in tokens")
    args = ap.parse_args()
    threads = int(os.environ.get("KAWAI_THREADS", "1"))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; kernel threads {threads}")
    llm = engine.load(args.model, threads=threads, n_ctx=2048)
    print(f"model {llm.id}: loaded in {llm.load_seconds:.1f} s")
    results = {"model": llm.id, "threads": threads, "load_avg_1m": round(os.getloadavg()[0], 2), "decode": []}
    for streams in [int(s) for s in args.streams.split(",")]:
        r = decode_rate(llm, streams, args.tokens)
        print(f"{streams} stream(s): {r['decode_tok_s']} tok/s aggregate decode ({r['tokens']} tokens generated)")
        results["decode"].append(r)
    t = ttft(llm, args.prefix)
    print(f"ttft with a {t['prompt_tokens']}-token prompt: cold {t['ttft_cold_s']} s, "
          f"warm {t['ttft_warm_s']} s ({t['reused_tokens']} tokens reused)")
    results["ttft"] = t
    results["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
