"""One engine in its own process, driven by benchmarks/compare.py over JSON lines.

    python benchmarks/engine_process.py ENGINE MODEL_PATH --threads N --n-ctx C
    ENGINE: kawai | llama.cpp | transformers

On start it loads the model and answers {"ready": true, "load_s": ..., "version": ..., "info": ...}. Then, one JSON
command per stdin line, one JSON answer per stdout line:
    {"op": "run", "ids": [...], "gen": G} -> {"prefill_s": ..., "step_s": [G-1 floats], "tokens": [G ids]}
    {"op": "rss"}                         -> {"peak_rss_mb": ...}
    {"op": "quit"}                        -> exits
A failure answers {"error": "..."} and exits. The model's first generated token comes out of the prefill
(so prefill_s is the time to first token); the remaining G-1 come from single-token decode steps, each
timed on its own. Anything the engine prints goes to stderr, never into the answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from kawai.engine.bench import peak_rss_mb, timed_run


def make_runner(engine: str, path: Path, threads: int, n_ctx: int):
    if engine == "kawai":
        from kawai.engine.bench import KawaiRunner

        return KawaiRunner(path, threads, n_ctx)
    if engine == "llama.cpp":
        from peers import LlamaCppRunner

        return LlamaCppRunner(path, threads, n_ctx)
    if engine == "transformers":
        from peers import TransformersRunner

        return TransformersRunner(path, threads, n_ctx)
    raise ValueError(f"unknown engine {engine!r}")


def serve(engine: str, path: Path, threads: int, n_ctx: int, answers) -> None:
    def answer(obj: dict) -> None:
        answers.write(json.dumps(obj) + "\n")
        answers.flush()

    try:
        start = time.perf_counter()
        runner = make_runner(engine, path, threads, n_ctx)
        load_s = time.perf_counter() - start
        info = {"version": getattr(runner, "version", ""), "info": getattr(runner, "info", "")}
        answer({"ready": True, "load_s": load_s, **info})
        for line in sys.stdin:
            command = json.loads(line)
            if command["op"] == "run":
                answer(asdict(timed_run(runner, command["ids"], command["gen"])))
            elif command["op"] == "rss":
                answer({"peak_rss_mb": peak_rss_mb()})
            elif command["op"] == "quit":
                return
            else:
                raise ValueError(f"unknown op {command['op']!r}")
    except Exception as e:  # reported to the orchestrator as one line
        answer({"error": f"{engine}: {type(e).__name__}: {e}"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", choices=("kawai", "llama.cpp", "transformers"))
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--n-ctx", type=int, required=True)
    args = parser.parse_args()
    # Keep the answer channel private: fd 1 (Python and C prints alike) goes to stderr from here on.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(args.engine, args.model, args.threads, args.n_ctx, answers)


if __name__ == "__main__":
    main()
