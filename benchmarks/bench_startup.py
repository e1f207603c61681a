"""Start-up benchmark: seconds from launching `kawai run` to its first answer byte on stdout.

    .venv/bin/python benchmarks/bench_startup.py [-m MODEL] [--repeats 3] [--threads N]

The target (issue 5): with the kernel cache warm, the first token within 10 s of launch. One unmeasured
run first fills Numba's cache (its time is reported as the cold start when the cache was empty), then
`--repeats` measured runs. Each run is a fresh process: interpreter start, imports, model load and
repacking, kernel cache load, chat template, prefill of the prompt, first decode step. The stderr
report of the last run (load time, kernel compile time, prompt tokens/s) is printed too.
Prints the machine load first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a haiku about the sea."


def first_byte_seconds(kawai: str, model: str, threads: int | None) -> tuple[float, str]:
    """(seconds until the first stdout byte, the run's stderr)."""
    cmd = [kawai, "run", "-m", model, "--max-tokens", "8", "--temperature", "0", PROMPT]
    if threads:
        cmd[2:2] = ["--threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    _, err = proc.communicate()
    if proc.returncode != 0 or not first:
        raise SystemExit(f"bench_startup: `{' '.join(cmd)}` failed: {err.decode(errors='replace').strip()[-300:]}")
    return elapsed, err.decode(errors="replace")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default="qwen2.5-coder-0.5b-instruct-q4_k_m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    kawai = shutil.which("kawai", path=str(Path(sys.executable).parent)) or shutil.which("kawai")
    if kawai is None:
        raise SystemExit("bench_startup: the `kawai` command is not installed in this environment")
    print(f"load average: {os.getloadavg()[0]:.2f}", flush=True)
    first_s, _ = first_byte_seconds(kawai, args.model, args.threads)
    print(f"first run (fills the kernel cache if it was empty): {first_s:.2f} s", flush=True)
    times = []
    for i in range(args.repeats):
        seconds, err = first_byte_seconds(kawai, args.model, args.threads)
        times.append(seconds)
        print(f"run {i + 1}: first answer byte after {seconds:.2f} s", flush=True)
    print(err.strip())
    result = {"model": args.model, "threads": args.threads, "first_run_s": round(first_s, 3),
              "warm_first_byte_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times]}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
