"""Attention kernel benchmark: this tree's kernels/attention.py against another commit's, side by side.

    .venv/bin/python -P benchmarks/bench_attention.py [--base main] [--calls 7] [--threads 1,2] [--quick]

The base kernel is the file `git show BASE:kernels/attention.py`, loaded as a second module, so both run
in one process on the same arrays, calls alternating (old, new, old, new, ...): a shared, noisy machine
slows both alike and the ratio of the minimums stays meaningful. Workloads, one layer, random float16
caches (speed does not depend on the values):

    prefill   a chunk of 128 query rows at depth 11,904 (the end of a 12,032-token prompt)
    decode    one query row at depth 12,000

for Qwen2.5-0.5B's shapes (H 14, Hkv 2, hd 64) and Qwen2.5-1.5B's (H 12, Hkv 2, hd 128). Reported: min
time per call, G multiply-adds/s (scores plus values: 2 x hd per query head and visible position), and
new/old speed-up. Writes benchmarks/results/<date>-attention-<isa>.json with the CPU model and ISA path.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

from kawai.kernels import attention as new
from kawai.kernels import isa
from kawai.kernels.threads import configure_threads

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"0.5B": (14, 2, 64), "1.5B": (12, 2, 128)}  # H, Hkv, hd
WORKLOADS = {"prefill": (128, 11904), "decode": (1, 12000)}  # n rows, start


def load_base(rev: str, folder: Path):
    """kernels/attention.py at git revision `rev`, imported as module `attention_base`."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:kernels/attention.py"],
                            check=True, capture_output=True, text=True).stdout
    path = folder / "attention_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("attention_base", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for Numba's cache, which finds functions by module name
    spec.loader.exec_module(module)
    return module


def multiply_adds(n: int, start: int, heads: int, hd: int) -> int:
    visible = n * start + n * (n + 1) // 2  # sum over rows of start + i + 1
    return 2 * hd * heads * visible


def run(kernels: dict, shape, workload, threads: int, calls: int, rng) -> dict:
    heads, kv_heads, hd = shape
    n, start = workload
    capacity = start + n + 64
    k_cache = (rng.standard_normal((kv_heads, hd, capacity)) * 2).astype(np.float16)
    v_cache = rng.standard_normal((kv_heads, capacity, hd)).astype(np.float16)
    q = (rng.standard_normal((n, heads, hd)) * 2).astype(np.float32)
    scale = np.float32(hd**-0.5)
    numba.set_num_threads(threads)
    outs = {name: np.empty_like(q) for name in kernels}
    times = {name: [] for name in kernels}
    for name, module in kernels.items():  # compile and warm up
        module.attention(q, k_cache, v_cache, start, scale, outs[name])
    for _ in range(calls):
        for name, module in kernels.items():
            t0 = time.perf_counter()
            module.attention(q, k_cache, v_cache, start, scale, outs[name])
            times[name].append(time.perf_counter() - t0)
    macs = multiply_adds(n, start, heads, hd)
    result = {"n": n, "start": start, "heads": heads, "kv_heads": kv_heads, "head_dim": hd, "threads": threads,
              "multiply_adds": macs,
              "max_abs_difference": float(np.abs(outs["new"] - outs["old"]).max())}
    for name in kernels:
        best = min(times[name])
        result[name] = {"min_s": best, "median_s": float(np.median(times[name])), "gmac_per_s": macs / best / 1e9}
    result["speedup"] = result["old"]["min_s"] / result["new"]["min_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="main", help="git revision of the old kernel (default: main)")
    parser.add_argument("--calls", type=int, default=7, help="timed calls per kernel and case (min is reported)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--quick", action="store_true", help="one shape (0.5B), 3 calls, no JSON")
    args = parser.parse_args()
    configure_threads()  # OpenMP, as the engine runs
    rng = np.random.default_rng(0)
    shapes = {"0.5B": SHAPES["0.5B"]} if args.quick else SHAPES
    calls = 3 if args.quick else args.calls
    print(f"CPU: {isa.cpu_model()}; ISA {isa.ISA}; base {args.base}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        kernels = {"old": load_base(args.base, Path(tmp)), "new": new}
        for threads in [int(t) for t in args.threads.split(",")]:
            for model, shape in shapes.items():
                for workload_name, workload in WORKLOADS.items():
                    r = run(kernels, shape, workload, threads, calls, rng)
                    r.update(model=model, workload=workload_name)
                    results.append(r)
                    print(f"{threads}T {model:5} {workload_name:8} old {r['old']['min_s'] * 1e3:9.2f} ms "
                          f"{r['old']['gmac_per_s']:6.1f} GMAC/s | new {r['new']['min_s'] * 1e3:9.2f} ms "
                          f"{r['new']['gmac_per_s']:6.1f} GMAC/s | x{r['speedup']:.2f} "
                          f"(max |diff| {r['max_abs_difference']:.1e})", flush=True)
    if args.quick:
        return
    record = {"date": datetime.date.today().isoformat(), "cpu": isa.cpu_model(), "isa": isa.ISA,
              "base": args.base, "calls": calls, "kv_tile": new.KV_TILE, "q_tile": new.Q_TILE, "results": results}
    out = ROOT / "benchmarks" / "results" / f"{record['date']}-attention-{isa.ISA}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
