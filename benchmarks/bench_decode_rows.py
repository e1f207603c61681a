"""The matmuls of one decode step as the number of sequences in it grows: every layer's weights of a
catalog model (attention and FFN projections), each multiplied by n rows of activations, for several n.

    .venv/bin/python -P benchmarks/bench_decode_rows.py [-m MODEL] [--threads 1] [--rows 1,2,3,4,8,128]

A step of n sequences reads each weight matrix once for all n (kernels/matmul_kernels.py: tiles of
TOKEN_TILE, SMALL_TILE and PAIR_TILE tokens, then single tokens), so the time per step grows far slower
than n; n = 128 is one prefill chunk (512 with AMX). On the "amx" path each n is also timed with every
row on the AMX tiles (`matmul(..., tiles=n)`, kernels/matmul_amx.py: what prompt rows take), next to the
vector kernels (`tiles=0`: what decode rows take). Prints the best of 5 sweeps per n in ms; the last line
is one JSON object, also written to benchmarks/results/ (with the CPU and kernel instruction set).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path

import numpy as np

from kawai.engine.catalog import resolve_model
from kawai.engine.gguf import open_gguf
from kawai.kernels import isa, matmul_amx
from kawai.kernels.matmul import matmul, pack
from kawai.kernels.qtypes import GGMLType
from kawai.kernels.threads import configure_threads


def layer_weights(path: Path) -> list:
    """Every 2-D weight of the model's blocks, packed as the engine packs them."""
    gguf = open_gguf(path)
    out = []
    for name, info in gguf.tensors.items():
        if name.startswith("blk.") and len(info.shape) == 2:
            out.append(pack(gguf.tensor_data(name), GGMLType(info.ggml_type), info.shape[1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="qwen2.5-coder-0.5b-instruct-q4_k_m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,2,3,4,8,128,512")
    ap.add_argument("--no-save", action="store_true", help="do not write a result JSON")
    args = ap.parse_args()
    configure_threads(args.threads)
    weights = layer_weights(resolve_model(args.model))
    rng = np.random.default_rng(0)
    result = {"benchmark": "decode_rows", "model": args.model, "date": date.today().isoformat(),
              "cpu": isa.cpu_model(), "isa": isa.ISA, "threads": args.threads,
              "load_avg": [round(v, 2) for v in os.getloadavg()], "ms": {}}
    paths = {"ms": 0, "ms_tiles": None} if matmul_amx.AVAILABLE else {"ms": 0}
    for n in (int(v) for v in args.rows.split(",")):
        xs = {c: rng.standard_normal((n, c)).astype(np.float32) for c in {w.cols for w in weights}}
        times = []
        for key, tiles in paths.items():
            tiles = n if tiles is None else tiles
            for w in weights:  # compile and warm
                matmul(w, xs[w.cols], tiles)
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for w in weights:
                    matmul(w, xs[w.cols], tiles)
                best = min(best, time.perf_counter() - start)
            result.setdefault(key, {})[n] = round(best * 1e3, 1)
            times.append(f"{key.removeprefix('ms').strip('_') or 'vector'} {best * 1e3:8.1f} ms")
        print(f"{n:4d} rows: " + ", ".join(times))
    if not args.no_save:
        out = Path(__file__).parent / "results" / f"{result['date']}-decode-rows-{args.model}-{args.threads}t.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
