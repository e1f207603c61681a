"""Our engine side by side with llama.cpp and transformers, in one run (run it with .venv-bench).

    .venv-bench/bin/python benchmarks/compare.py -m qwen2.5-coder-0.5b-instruct-q4_k_m --threads 2

Our engine runs the server's path (LLM.generate: the scheduler, its chunks, its batched forward and
sampling; see engine/bench.py). Long prompts: --prompt-tokens 12000 --n-ctx 12200 --no-serving-rss.

Same GGUF file, same prompt token ids (P random normal tokens, fixed seed), same thread count and n_ctx.
Each engine lives in its own worker process (benchmarks/engine_process.py), loaded once; kawai and llama.cpp
runs alternate (kawai first, then llama.cpp first, ...) so a noisy neighbour hurts both alike, and the
reported figures are medians over the repeats. Every engine first does one untimed warm-up run.

- prefill tok/s = P / time to first token (the prefill returns the first generated token)
- decode tok/s  = 1 / median single-token step time (the first steps after a prefill are skipped);
  prompt tokens are never counted as generated tokens
- weight GB/s   = GGUF weight bytes read per decode step x decode tok/s, against the measured read
  bandwidth of this machine (NumPy streaming read with the same thread count)
- serving RSS   = peak RSS of a fresh process that loads the model with a 4096-token context and serves
  one request (P prompt tokens, 16 generated), for kawai and llama.cpp each in its own process
- transformers (fp32 weights dequantized from the same GGUF) decodes only a few tokens: it is slow.

Prints a table and the ratios, writes benchmarks/results/<date>-<model>-<threads>t-<prompt>p.json,
and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from kawai.engine.bench import (
    DECODE_WARMUP_STEPS,
    PROMPT_SEED,
    machine_info,
    median_step_s,
    measure_read_bandwidth_isolated,
    prompt_token_ids,
    weight_bytes_per_token,
)
from kawai.engine import catalog
from kawai.engine.errors import KawaiError
from kawai.engine.gguf import open_gguf

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"
SERVING_CTX = 4096
SERVING_GEN = 16
WARMUP_GEN = 8


class Worker:
    """One engine in a subprocess (benchmarks/engine_process.py), spoken to in JSON lines."""

    def __init__(self, engine: str, python: str, model: Path, threads: int, n_ctx: int):
        self.engine = engine
        self._log = tempfile.TemporaryFile(mode="w+")
        command = [python, str(HERE / "engine_process.py"), engine, str(model), "--threads", str(threads)]
        self._proc = subprocess.Popen(
            command + ["--n-ctx", str(n_ctx)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=HERE,
        )
        self.hello = self._read()  # {"ready", "load_s", "version"}

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            self._log.seek(0)
            tail = " | ".join(self._log.read().strip().splitlines()[-5:])
            raise SystemExit(f"compare: {self.engine} worker exited ({self._proc.returncode}): {tail}")
        answer = json.loads(line)
        if "error" in answer:
            self.close()
            raise SystemExit(f"compare: {answer['error']}")
        return answer

    def request(self, **command) -> dict:
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def run(self, ids: list[int], gen: int) -> dict:
        return self.request(op="run", ids=ids, gen=gen)

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self._proc.stdin.flush()
            except BrokenPipeError:
                pass
            self._proc.wait(timeout=60)
        self._log.close()


# ---------------------------------------------------------------- summaries


def summarize(runs: list[dict], prompt_tokens: int, bytes_per_token: int, read_gb_s: float) -> dict:
    """Medians over repeated runs of one engine."""
    ttft = statistics.median(r["prefill_s"] for r in runs)
    step = statistics.median(median_step_s(r["step_s"]) for r in runs)
    decode_tok_s = 1.0 / step
    weight_gb_s = bytes_per_token * decode_tok_s / 1e9
    return {
        "prefill_tok_s": prompt_tokens / ttft,
        "decode_tok_s": decode_tok_s,
        "ttft_s": ttft,
        "weight_gb_s": weight_gb_s,
        "bandwidth_fraction": weight_gb_s / read_gb_s,
        "prefill_s_runs": [r["prefill_s"] for r in runs],
        "decode_step_s_runs": [median_step_s(r["step_s"]) for r in runs],
    }


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many greedy tokens two engines produce alike before they first differ."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def ratio(a: dict, b: dict, key: str) -> float | None:
    if key not in a or key not in b or not b[key]:
        return None
    return a[key] / b[key]


# ---------------------------------------------------------------- phases


def speed_phase(engines: dict[str, str], args, model: Path, ids: list[int], log) -> dict[str, dict]:
    """Load every engine once, warm each up, then alternate timed runs."""
    workers = {}
    try:
        for engine, python in engines.items():
            log(f"loading {engine} ...")
            workers[engine] = Worker(engine, python, model, args.threads, args.n_ctx)
            workers[engine].run(ids, WARMUP_GEN)
        runs: dict[str, list[dict]] = {engine: [] for engine in engines}
        order = list(engines)
        for repeat in range(args.repeats):
            for engine in order if repeat % 2 == 0 else order[::-1]:
                run = workers[engine].run(ids, args.gen_tokens)
                runs[engine].append(run)
                log(f"  repeat {repeat + 1}/{args.repeats} {engine}: prefill {run['prefill_s']:.2f} s, "
                    f"decode step {median_step_s(run['step_s']) * 1e3:.1f} ms")
        return {
            engine: {"hello": workers[engine].hello, "runs": runs[engine],
                     "peak_rss_mb": workers[engine].request(op="rss")["peak_rss_mb"]}
            for engine in engines
        }
    finally:
        for worker in workers.values():
            worker.close()


def transformers_phase(args, model: Path, ids: list[int], log) -> dict:
    log("loading transformers (fp32) ...")
    worker = Worker("transformers", args.hf_python, model, args.threads, args.n_ctx)
    try:
        worker.run(ids, 2)
        runs = [worker.run(ids, args.hf_gen_tokens) for _ in range(args.hf_repeats)]
        for run in runs:
            log(f"  transformers: prefill {run['prefill_s']:.2f} s, "
                f"decode step {median_step_s(run['step_s']) * 1e3:.0f} ms")
        return {"hello": worker.hello, "runs": runs, "peak_rss_mb": worker.request(op="rss")["peak_rss_mb"]}
    finally:
        worker.close()


def serving_rss_mb(engine: str, python: str, args, model: Path, ids: list[int]) -> float:
    """Peak RSS of a fresh process: load with a 4096-token context, serve one request."""
    worker = Worker(engine, python, model, args.threads, SERVING_CTX)
    try:
        worker.run(ids, SERVING_GEN)
        return worker.request(op="rss")["peak_rss_mb"]
    finally:
        worker.close()


# ---------------------------------------------------------------- main


def resolve_model(id_or_path: str) -> tuple[str, Path]:
    """(model id, GGUF path) for a local model id or a .gguf path; local files are named <id>.gguf."""
    try:
        path = catalog.resolve_model(id_or_path)
    except KawaiError as e:
        raise SystemExit(f"compare: {e}") from None
    return path.name.removesuffix(".gguf"), path.resolve()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="kawai vs llama.cpp vs transformers, side by side.")
    p.add_argument("-m", "--model", default="qwen2.5-coder-0.5b-instruct-q4_k_m", help="catalog id or .gguf path")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-ctx", type=int, default=SERVING_CTX)
    p.add_argument("--engines", default="kawai,llama.cpp", help="comma list of kawai, llama.cpp")
    p.add_argument("--hf-python", default=str(REPO / ".venv" / "bin" / "python"),
                   help="interpreter with torch + transformers + gguf (the test venv)")
    p.add_argument("--hf-gen-tokens", type=int, default=8)
    p.add_argument("--hf-repeats", type=int, default=1)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--no-serving-rss", action="store_true")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the result JSON goes")
    p.add_argument("--no-save", action="store_true", help="do not write a result JSON")
    args = p.parse_args(argv)
    if args.threads < 1 or args.prompt_tokens < 1 or args.gen_tokens < DECODE_WARMUP_STEPS + 2:
        p.error("need --threads >= 1, --prompt-tokens >= 1, --gen-tokens >= 4")
    context = args.n_ctx if args.no_serving_rss else min(args.n_ctx, SERVING_CTX)
    if args.prompt_tokens + max(args.gen_tokens, SERVING_GEN) > context:
        p.error("prompt + generated tokens must fit the context (and the serving check's 4096 unless --no-serving-rss)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    model_id, model = resolve_model(args.model)
    gguf = open_gguf(model)
    ids = prompt_token_ids(gguf, args.prompt_tokens)
    bytes_per_token = weight_bytes_per_token(gguf)
    del gguf
    engines = {e: sys.executable for e in args.engines.split(",") if e}
    unknown = set(engines) - {"kawai", "llama.cpp"}
    if unknown:
        raise SystemExit(f"compare: unknown engine(s) {sorted(unknown)}")

    machine = machine_info()
    log(f"CPU: {machine['cpu']}; kawai kernels: {machine['isa']}; load average {machine['load_avg']}")
    read_gb_s = measure_read_bandwidth_isolated(args.threads)  # keeps this process small
    log(f"memory read bandwidth ({args.threads} threads): {read_gb_s:.1f} GB/s")
    raw = speed_phase(engines, args, model, ids, log)
    if not args.no_transformers:
        raw["transformers"] = transformers_phase(args, model, ids, log)

    results = {}
    for engine, data in raw.items():
        results[engine] = {
            "version": data["hello"]["version"],
            "build_info": data["hello"].get("info", ""),
            "load_s": data["hello"]["load_s"],
            "worker_peak_rss_mb": data["peak_rss_mb"],
            **summarize(data["runs"], args.prompt_tokens, bytes_per_token, read_gb_s),
        }
        results[engine]["gen_tokens"] = len(data["runs"][0]["tokens"])
    if not args.no_serving_rss:
        for engine, python in engines.items():
            log(f"serving RSS of {engine} ({SERVING_CTX} ctx) ...")
            results[engine]["serving_peak_rss_mb"] = serving_rss_mb(engine, python, args, model, ids)

    machine["load_avg_after"] = machine_info()["load_avg"]
    report = build_report(args, model_id, model, bytes_per_token, read_gb_s, raw, results, machine)
    print_table(report)
    if not args.no_save:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        out = args.results_dir / f"{report['date']}-{model_id}-{args.threads}t-{args.prompt_tokens}p.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {out}")
    print(json.dumps(report["summary"]))
    return 0


def build_report(args, model_id, model, bytes_per_token, read_gb_s, raw, results, machine) -> dict:
    ratios = {}
    ours = results.get("kawai")
    for peer, tag in (("llama.cpp", "llama_cpp"), ("transformers", "transformers")):
        if ours and peer in results:
            for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "serving_peak_rss_mb"):
                value = ratio(ours, results[peer], key)
                if value is not None:
                    ratios[f"{key}_vs_{tag}"] = value
    agreement = None
    if "kawai" in raw and "llama.cpp" in raw:
        agreement = leading_agreement(raw["kawai"]["runs"][0]["tokens"], raw["llama.cpp"]["runs"][0]["tokens"])
    summary = {"model": model_id, "cpu": machine["cpu"], "kawai_isa": machine["isa"], "threads": args.threads,
               "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
               "mem_read_gb_s": round(read_gb_s, 2), "load_avg_before": machine["load_avg"]}
    for engine, r in results.items():
        tag = engine.replace(".", "_")
        for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "serving_peak_rss_mb"):
            if key in r:
                summary[f"{tag}_{key}"] = round(r[key], 3)
    summary.update({k: round(v, 3) for k, v in ratios.items()})
    return {
        "date": datetime.date.today().isoformat(),
        "model": model_id,
        "model_file": model.name,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "prompt": f"{args.prompt_tokens} random normal-token ids, numpy seed {PROMPT_SEED}",
        "gen_tokens": args.gen_tokens,
        "repeats": args.repeats,
        "n_ctx": args.n_ctx,
        "machine": {"cpu": machine["cpu"], "kawai_isa": machine["isa"], "logical_cpus": os.cpu_count(),
                    "python": platform.python_version(), "mem_read_gb_s": read_gb_s,
                    "load_avg_before": machine["load_avg"], "load_avg_after": machine["load_avg_after"]},
        "weight_bytes_per_token": bytes_per_token,
        "engines": results,
        "ratios": ratios,
        "greedy_tokens_agreeing_with_llama_cpp": agreement,
        "summary": summary,
    }


def print_table(report: dict) -> None:
    print(f"model {report['model']}  threads {report['threads']}  prompt {report['prompt_tokens']}  "
          f"gen {report['gen_tokens']}  repeats {report['repeats']}  n_ctx {report['n_ctx']}")
    m = report["machine"]
    print(f"CPU {m['cpu']}  kawai kernels {m['kawai_isa']}  load average {m['load_avg_before']} -> "
          f"{m['load_avg_after']}")
    read = report["machine"]["mem_read_gb_s"]
    per_token = report["weight_bytes_per_token"]
    print(f"memory read {read:.1f} GB/s; weights read per token {per_token / 1e6:.0f} MB "
          f"(decode ceiling {read * 1e9 / per_token:.0f} tok/s)")
    header = f"{'engine':24} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} {'ttft s':>7} " \
             f"{'weight GB/s':>12} {'serving RSS MB':>15}"
    print(header)
    for engine, r in report["engines"].items():
        rss = r.get("serving_peak_rss_mb")
        print(f"{engine + ' ' + r['version']:24} {r['load_s']:7.2f} {r['prefill_tok_s']:14.1f} "
              f"{r['decode_tok_s']:13.2f} {r['ttft_s']:7.3f} {r['weight_gb_s']:12.1f} "
              f"{(f'{rss:.0f}' if rss else '-'):>15}")
    for key, value in report["ratios"].items():
        print(f"  kawai / {key.split('_vs_')[1].replace('_', '.')}: {key.split('_vs_')[0]} {value:.2f}x")
    if report["greedy_tokens_agreeing_with_llama_cpp"] is not None:
        print(f"greedy tokens identical to llama.cpp before the first difference: "
              f"{report['greedy_tokens_agreeing_with_llama_cpp']}/{report['gen_tokens']}")


if __name__ == "__main__":
    sys.exit(main())
