"""Sampler benchmark: the time to pick one token from a Qwen-sized logit row (151936), per setting.

    .venv/bin/python -P benchmarks/bench_sampling.py [--reps 50]

The logits are peaked like a real model's (a few likely tokens over a long tail). Reports the median
time per token for top-k + top-p, top-p alone, and the defaults; the last line is one JSON object.
(Moved here from tests/engine/test_sampling.py: speed is measured, not asserted, on a shared machine.)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from kawai.engine.sampling import Sampler, SamplingParams

QWEN_VOCAB = 151936
SETTINGS = {"top_k=40,top_p=0.95": SamplingParams(top_p=0.95, top_k=40),
            "top_p=0.95": SamplingParams(top_p=0.95), "defaults": SamplingParams()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(8)
    logits = rng.standard_normal(QWEN_VOCAB).astype(np.float32) * 2
    logits[rng.integers(0, QWEN_VOCAB, 20)] += 12
    result = {"bench": "sampling", "vocab": QWEN_VOCAB, "cpu": platform.processor() or platform.machine(),
              "reps": args.reps, "median_ms": {}}
    for name, params in SETTINGS.items():
        sampler = Sampler(params)
        sampler.sample(logits)  # warm-up
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            sampler.sample(logits)
            times.append(time.perf_counter() - t0)
        result["median_ms"][name] = round(1000 * statistics.median(times), 3)
        print(f"{name:>22}: {result['median_ms'][name]:.2f} ms per token")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
