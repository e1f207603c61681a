"""Matmul kernel benchmark: matvec bandwidth per weight type, prefill throughput, repacking cost.

    .venv/bin/python benchmarks/bench_kernels.py [--model PATH] [--threads 1,2] [--quick]

Reports, for 1 and 2 threads, the median time of y = x @ W.T on real-size shapes (Qwen2.5-0.5B:
896x4864 ffn_down, 4864x896 ffn_gate/up, 151936x896 output), as GB/s of packed (resident) bytes read,
GB/s of GGUF bytes, and G weights/s; prefill (n tokens) as G multiply-adds/s; then, with a model file,
the time to repack all its matmul weights, the memory growth, and the matmul-only decode rate (the sum
of one token's matvecs over the real tensors). Weights are random bits with sane scales: speed does not
depend on the values. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


from kawai.kernels.matmul import matmul, pack, warmup
from kawai.kernels.matmul_simd import AVAILABLE as SIMD_AVAILABLE
from kawai.kernels.qtypes import GGMLType
from kawai.kernels.threads import configure_threads, max_threads

DEFAULT_MODEL = Path(os.environ.get("KAWAI_HOME", Path.home() / ".cache" / "kawai")) / "models" / (
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
MATVEC_TYPES = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.Q2_K,
                GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.F16]
SHAPES = [(896, 4864), (4864, 896)]  # (rows, cols)
BIG = (GGMLType.Q8_0, 151936, 896)
# Byte offsets of the f16 scales inside each block (the rest of the block is random bits).
HALF_FIELDS = {GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
               GGMLType.Q8_0: (0,), GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q4_K: (0, 2),
               GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,)}


def random_raw(qtype: GGMLType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if qtype == GGMLType.F16:
        return rng.standard_normal((rows, cols)).astype("<f2").view(np.uint8)
    blocks = rng.integers(0, 256, (rows * cols // qtype.block_size, qtype.type_size), dtype=np.uint8)
    for at in HALF_FIELDS[qtype]:
        blocks[:, at : at + 2] = np.full(blocks.shape[0], 0.01, "<f2").view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def timed(fn, reps: int) -> tuple[float, float, float]:
    """(median wall, best wall, best CPU) seconds of fn() after one warm-up call. On a shared machine the
    best run, and with one thread the CPU time of this thread, are the closer estimates of what the
    kernel does alone."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    return statistics.median(wall), min(wall), min(cpu)


def bench_matvec(threads: list[int], reps: int, rng) -> list[dict]:
    rows_out = []
    cases = [(t, r, c) for t in MATVEC_TYPES for r, c in SHAPES if c % t.block_size == 0] + [BIG]
    for qtype, rows, cols in cases:
        raw = random_raw(qtype, rows, cols, rng)
        w = pack(raw, qtype, cols)
        x = rng.standard_normal((1, cols)).astype(np.float32)
        for n_threads in threads:
            configure_threads(n_threads)
            sec, best, cpu = timed(lambda: matmul(w, x), reps if rows < 100_000 else max(5, reps // 2))
            row = {"type": qtype.name, "rows": rows, "cols": cols, "threads": n_threads, "ms": sec * 1e3,
                   "best_ms": best * 1e3, "packed_gbs": w.nbytes / sec / 1e9, "gguf_gbs": raw.nbytes / sec / 1e9,
                   "gweights_s": rows * cols / sec / 1e9, "best_packed_gbs": w.nbytes / best / 1e9,
                   "best_gweights_s": rows * cols / best / 1e9, "packed_bytes_per_weight": w.nbytes / (rows * cols)}
            if n_threads == 1:
                row["cpu_gweights_s"] = rows * cols / cpu / 1e9
            rows_out.append(row)
            print(f"matvec {qtype.name:5s} {rows:6d}x{cols:<5d} T={n_threads}: {row['ms']:7.3f} ms  "
                  f"{row['packed_gbs']:5.1f} GB/s packed  {row['gguf_gbs']:5.1f} GB/s gguf  "
                  f"{row['gweights_s']:5.1f} Gw/s  | best {row['best_packed_gbs']:5.1f} GB/s "
                  f"{row['best_gweights_s']:5.1f} Gw/s  ({row['packed_bytes_per_weight']:.3f} B/w)", flush=True)
    return rows_out


def bench_prefill(threads: list[int], n_tokens: int, reps: int, rng) -> list[dict]:
    out = []
    for qtype, rows, cols in [(GGMLType.Q5_0, 4864, 896), (GGMLType.Q6_K, 896, 4864), (GGMLType.Q8_0, 896, 896)]:
        w = pack(random_raw(qtype, rows, cols, rng), qtype, cols)
        x = rng.standard_normal((n_tokens, cols)).astype(np.float32)
        for n_threads in threads:
            configure_threads(n_threads)
            sec, best, _ = timed(lambda: matmul(w, x), reps)
            row = {"type": qtype.name, "rows": rows, "cols": cols, "tokens": n_tokens, "threads": n_threads,
                   "ms": sec * 1e3, "gmacs": n_tokens * rows * cols / sec / 1e9,
                   "best_gmacs": n_tokens * rows * cols / best / 1e9}
            out.append(row)
            print(f"prefill {qtype.name:5s} {rows}x{cols} n={n_tokens} T={n_threads}: {row['ms']:8.2f} ms  "
                  f"{row['gmacs']:6.1f} GMAC/s  (best {row['best_gmacs']:6.1f})", flush=True)
    return out


def bench_model(path: Path, threads: list[int], reps: int, rng) -> dict:
    """Pack every matmul weight of a real model; time one decode token's matvecs over them."""
    from kawai.engine.gguf import open_gguf

    g = open_gguf(path)
    names = [n for n, t in g.tensors.items()
             if len(t.shape) == 2 and n != "token_embd.weight" and t.ggml_type != GGMLType.F32]
    start = time.perf_counter()
    packed = {n: pack(g.tensor_data(n), g.tensors[n].ggml_type, g.tensors[n].shape[1]) for n in names}
    pack_s = time.perf_counter() - start
    gguf_bytes = sum(g.tensors[n].n_bytes for n in names)
    packed_bytes = sum(w.nbytes for w in packed.values())
    xs = {c: rng.standard_normal((1, c)).astype(np.float32) for c in {w.cols for w in packed.values()}}
    result = {"model": path.name, "pack_s": pack_s, "gguf_mb": gguf_bytes / 1e6, "packed_mb": packed_bytes / 1e6,
              "growth": packed_bytes / gguf_bytes, "decode": []}
    print(f"model {path.name}: packed {len(names)} weights in {pack_s:.2f} s, {gguf_bytes / 1e6:.1f} MB gguf -> "
          f"{packed_bytes / 1e6:.1f} MB packed ({packed_bytes / gguf_bytes:.2f}x)", flush=True)

    def one_token():
        for w in packed.values():
            matmul(w, xs[w.cols])

    for n_threads in threads:
        configure_threads(n_threads)
        sec, best, cpu = timed(one_token, max(5, reps // 2))
        row = {"threads": n_threads, "ms": sec * 1e3, "tok_s": 1 / sec, "best_tok_s": 1 / best,
               "packed_gbs": packed_bytes / sec / 1e9, "best_packed_gbs": packed_bytes / best / 1e9}
        if n_threads == 1:
            row["cpu_tok_s"] = 1 / cpu
        result["decode"].append(row)
        cpu_note = f", CPU-time {1 / cpu:.1f}" if n_threads == 1 else ""
        print(f"decode matvecs T={n_threads}: {row['ms']:.2f} ms/token  {row['tok_s']:.1f} tok/s (matmuls only; "
              f"best {row['best_tok_s']:.1f}{cpu_note})  {row['packed_gbs']:.1f} GB/s "
              f"(best {row['best_packed_gbs']:.1f})", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--threads", default=",".join(str(t) for t in sorted({1, max_threads()})))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="only the Q5_0/Q6_K/Q8_0 matvecs and the model")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    rng = np.random.default_rng(0)

    configure_threads(max(threads))
    compile_s = warmup()
    print(f"warmup (compile or cache load): {compile_s:.2f} s", flush=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, simd={SIMD_AVAILABLE}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    if args.quick:
        MATVEC_TYPES[:] = [GGMLType.Q5_0, GGMLType.Q6_K, GGMLType.Q8_0]
    result = {"bench": "kernels", "simd": SIMD_AVAILABLE, "compile_s": compile_s, "threads": threads,
              "load_avg": os.getloadavg()[0]}
    result["matvec"] = bench_matvec(threads, args.reps, rng)
    result["prefill"] = bench_prefill(threads, args.prefill_tokens, max(3, args.reps // 4), rng)
    if args.model.exists():
        result["model"] = bench_model(args.model, threads, args.reps, rng)
    result["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
