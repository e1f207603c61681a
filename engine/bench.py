"""Measuring the engine: compile, load, prefill, decode, memory bandwidth and peak RSS.

Our engine is timed on the path the server runs: `LLM.generate`, i.e. the scheduler (engine/scheduler.py)
with its chunk size, its batched forward, sampling and stop rules. Every result names the CPU, the
kernels' instruction set and the load average.

Used by `kawai bench` (our engine alone) and by `benchmarks/compare.py` (side by side with llama.cpp and
transformers). The rules (house style, lesson 11): warm up first, time prefill and decode separately,
report medians, never count prompt tokens as generated tokens, and state the bandwidth ceiling.

Letters: P = prompt tokens, G = generated tokens, V = vocabulary size.

Decode is driven token by token with greedy sampling and no end-of-sequence stop (`ignore_eos`), so every
engine decodes exactly G tokens from the same P prompt ids.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kawai.engine.errors import KawaiError
from kawai.engine.gguf import GGUFFile

NORMAL_TOKEN_TYPE = 1  # tokenizer.ggml.token_type: 1 = normal; control / user-defined / byte tokens are not
PROMPT_SEED = 0
DECODE_WARMUP_STEPS = 2  # the first decode steps after a prefill are slower (caches, page faults)
BANDWIDTH_BYTES = 512 << 20  # far larger than any L3 cache here (32 MB)
WARMUP_PROMPT_TOKENS = 32
WARMUP_GEN_TOKENS = 4


# ---------------------------------------------------------------- prompts and model facts


def prompt_token_ids(gguf: GGUFFile, n_tokens: int, seed: int = PROMPT_SEED) -> list[int]:
    """`n_tokens` deterministic ids drawn from the model's normal (non-special) tokens.

    Every engine gets these exact ids, so no tokenizer difference can change the work done.
    """
    token_types = np.asarray(gguf.metadata.get("tokenizer.ggml.token_type", []))  # (V,)
    normal_ids = np.flatnonzero(token_types == NORMAL_TOKEN_TYPE)
    if normal_ids.size == 0:
        raise KawaiError("the model has no normal tokens in tokenizer.ggml.token_type to build a prompt from")
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(normal_ids, size=n_tokens)]


def weight_bytes_per_token(gguf: GGUFFile) -> int:
    """Bytes of GGUF weights one decode step reads: every tensor except the token embedding, which is a
    single-row lookup — unless the output projection is tied to it (no `output.weight`), then it is read
    in full as the output matrix."""
    total = sum(info.n_bytes for info in gguf.tensors.values())
    if "output.weight" in gguf.tensors:
        total -= gguf.tensors["token_embd.weight"].n_bytes
    return total


# ---------------------------------------------------------------- machine measurements


def peak_rss_mb() -> float:
    """Peak resident set size of this program so far, in MiB.

    Linux: VmHWM from /proc/self/status. `getrusage().ru_maxrss` is the fallback only: it survives
    fork + exec, so a child started by a big parent reports at least the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_read_bandwidth(threads: int, n_bytes: int = BANDWIDTH_BYTES, repeats: int = 5) -> float:
    """Best-of-`repeats` DRAM read bandwidth in GB/s: `threads` threads each OR-reduce their own slice of
    an `n_bytes` uint64 array with NumPy (the reduction releases the GIL, so the threads overlap)."""
    data = np.ones(n_bytes // 8, dtype=np.uint64)  # written once so every page is resident
    slices = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.bitwise_or.reduce, slices))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def measure_read_bandwidth_isolated(threads: int) -> float:
    """`measure_read_bandwidth` in a child process, so its 512 MB array never counts in our peak RSS."""
    code = f"from kawai.engine.bench import measure_read_bandwidth as m; print(m({int(threads)}))"
    return float(_run_probe(code, dict(os.environ)))


# ---------------------------------------------------------------- kernel compile time


def _compile_probe(path: str, threads: int) -> None:
    """Entry point of the compile subprocess; prints the seconds spent compiling (or loading from
    Numba's cache) every kernel the engine uses: the start-up warm-up inside `engine.load`, plus what
    the first short run costs more than an identical second one (the kernels it compiles on first use)."""
    runner = KawaiRunner(Path(path), threads, WARMUP_PROMPT_TOKENS + WARMUP_GEN_TOKENS)
    gguf = GGUFFile(path)
    ids = prompt_token_ids(gguf, WARMUP_PROMPT_TOKENS)
    first, second = (_seconds(lambda: timed_run(runner, ids, WARMUP_GEN_TOKENS)) for _ in range(2))
    print(runner.llm.compile_seconds + max(0.0, first - second))


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_compile_times(path: Path, threads: int) -> tuple[float, float]:
    """(cold, cached) kernel compile seconds, each measured in a fresh interpreter.

    Both runs share a new, empty NUMBA_CACHE_DIR: the first compiles everything and fills it, the second
    loads from it. The user's own Numba cache is neither read nor touched.
    """
    with tempfile.TemporaryDirectory(prefix="kawai-bench-numba-") as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        code = f"from kawai.engine.bench import _compile_probe; _compile_probe({str(path)!r}, {int(threads)})"
        return float(_run_probe(code, env)), float(_run_probe(code, env))


def _run_probe(code: str, env: dict[str, str]) -> str:
    """Run `code` in a fresh interpreter; return the last line it printed."""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise KawaiError(f"benchmark probe failed: {last}")
    return done.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------- timed runs


@dataclass(frozen=True)
class TimedRun:
    """One prompt evaluated, then G tokens generated greedily. The first generated token comes out of the
    prefill (so prefill_s is the time to first token); the other G-1 each take one decode step."""

    prefill_s: float
    step_s: list[float]  # (G-1,) seconds of each single-token decode step
    tokens: list[int]  # (G,) generated ids

    def median_step_s(self, warmup_steps: int = DECODE_WARMUP_STEPS) -> float:
        """Median decode step, skipping the first steps after the prefill."""
        return median_step_s(self.step_s, warmup_steps)


def median_step_s(step_s: list[float], warmup_steps: int = DECODE_WARMUP_STEPS) -> float:
    return statistics.median(step_s[warmup_steps:] or step_s)


def timed_run(runner, ids: list[int], gen: int) -> TimedRun:
    """Drive any runner (`prefill(ids) -> token`, `decode_step(token) -> token`) and time it."""
    start = time.perf_counter()
    token = runner.prefill(ids)
    prefill_s = time.perf_counter() - start
    tokens, step_s = [token], []
    for _ in range(gen - 1):
        start = time.perf_counter()
        token = runner.decode_step(token)
        step_s.append(time.perf_counter() - start)
        tokens.append(token)
    return TimedRun(prefill_s, step_s, tokens)


class KawaiRunner:
    """Our engine behind the runner interface of benchmarks/peers.py (greedy, no stop rules), on the path
    the server runs: `LLM.generate` (the scheduler), one Step per call. `prefill` is the generation's first
    Step (prompt chunks + the first token), each `decode_step` the next one (one forward + sampling).

    `engine.load` also warms the kernels up; `llm.load_seconds` excludes that, `llm.compile_seconds` is it.
    """

    name = "kawai"

    def __init__(self, path: Path, threads: int, n_ctx: int):
        from kawai.engine.llm import load

        self.version = _kawai_version()
        self.info = machine_info()
        self.llm = load(path, threads=threads, n_ctx=n_ctx)
        self._generation = None

    def prefill(self, ids: list[int]) -> int:
        from kawai.engine.sampling import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=self.llm.n_ctx, ignore_eos=True)  # ends at context_full
        self._generation = self.llm.generate(ids, params)
        return next(self._generation).token_id

    def decode_step(self, token: int) -> int:
        return next(self._generation).token_id

    @property
    def cache(self):
        return self._generation.seq.cache


def machine_info() -> dict:
    """The CPU, the kernels' instruction set (kernels/isa.py) and the load average: what a number depends on."""
    from kawai.kernels import isa

    return {"cpu": isa.cpu_model(), "isa": isa.ISA, "isa_best": isa.BEST,
            "load_avg": [round(v, 2) for v in os.getloadavg()]}


def _kawai_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kawai")
    except PackageNotFoundError:
        return "dev"


# ---------------------------------------------------------------- `kawai bench`


@dataclass(frozen=True)
class BenchSettings:
    model_path: Path
    model_id: str
    threads: int
    prompt_tokens: int = 512
    gen_tokens: int = 128
    measure_compile: bool = True


@dataclass(frozen=True)
class BenchResult:
    model: str
    cpu: str
    isa: str  # the kernels' instruction set (kernels/isa.py)
    load_avg_before: list[float]  # 1, 5, 15 minutes: a shared machine's noise
    load_avg_after: list[float]
    threads: int
    prompt_tokens: int
    gen_tokens: int
    compile_s: float | None  # cold: empty Numba cache
    compile_cached_s: float | None  # warm: kernels loaded from Numba's cache
    load_s: float
    prefill_tok_s: float
    decode_tok_s: float
    ttft_s: float
    weight_bytes_per_token: int
    weight_gb_s: float  # GGUF weight bytes read per decode step x decode tok/s
    mem_read_gb_s: float  # measured streaming-read bandwidth, same thread count
    bandwidth_fraction: float  # weight_gb_s / mem_read_gb_s
    decode_ceiling_tok_s: float  # mem_read_gb_s / weight bytes per token
    peak_rss_mb: float
    packed_weight_mb: float  # resident weights in the kernels' layout (the repacking's memory cost)


def run_bench(settings: BenchSettings, log=lambda msg: None) -> BenchResult:
    """Compile (cold and cached, in child processes), memory bandwidth (child process), then in this
    process: load, one warm-up run, one measured run."""
    before = machine_info()
    log(f"CPU: {before['cpu']}; kernels: {before['isa']} (best here: {before['isa_best']}); "
        f"load average {before['load_avg']}")
    gguf = GGUFFile(settings.model_path)  # a bad file fails here, before the slow probes
    ids = prompt_token_ids(gguf, settings.prompt_tokens)
    bytes_per_token = weight_bytes_per_token(gguf)
    del gguf

    compile_s = compile_cached_s = None
    if settings.measure_compile:
        compile_s, compile_cached_s = measure_compile_times(settings.model_path, settings.threads)
        log(f"kernel compile: {compile_s:.2f} s cold, {compile_cached_s:.2f} s cached")
    read_gb_s = measure_read_bandwidth_isolated(settings.threads)
    log(f"memory read bandwidth: {read_gb_s:.1f} GB/s ({settings.threads} threads)")

    runner = KawaiRunner(settings.model_path, settings.threads, settings.prompt_tokens + settings.gen_tokens)
    load_s = runner.llm.load_seconds
    log(f"load: {load_s:.2f} s (+ {runner.llm.compile_seconds:.2f} s kernel warm-up)")
    timed_run(runner, ids[:WARMUP_PROMPT_TOKENS], WARMUP_GEN_TOKENS)  # touches every weight page
    run = timed_run(runner, ids, settings.gen_tokens)
    decode_tok_s = 1.0 / run.median_step_s()
    weight_gb_s = bytes_per_token * decode_tok_s / 1e9
    result = BenchResult(
        model=settings.model_id,
        cpu=before["cpu"],
        isa=before["isa"],
        load_avg_before=before["load_avg"],
        load_avg_after=machine_info()["load_avg"],
        threads=settings.threads,
        prompt_tokens=settings.prompt_tokens,
        gen_tokens=settings.gen_tokens,
        compile_s=compile_s,
        compile_cached_s=compile_cached_s,
        load_s=load_s,
        prefill_tok_s=settings.prompt_tokens / run.prefill_s,
        decode_tok_s=decode_tok_s,
        ttft_s=run.prefill_s,
        weight_bytes_per_token=bytes_per_token,
        weight_gb_s=weight_gb_s,
        mem_read_gb_s=read_gb_s,
        bandwidth_fraction=weight_gb_s / read_gb_s,
        decode_ceiling_tok_s=read_gb_s * 1e9 / bytes_per_token,
        peak_rss_mb=peak_rss_mb(),
        packed_weight_mb=runner.llm.weights.nbytes / 2**20,
    )
    log(f"prefill: {result.prefill_tok_s:.1f} tok/s ({settings.prompt_tokens} tokens, "
        f"time to first token {result.ttft_s:.3f} s)")
    log(f"decode: {decode_tok_s:.2f} tok/s (median of {len(run.step_s)} steps), weights read at "
        f"{weight_gb_s:.1f} GB/s = {100 * result.bandwidth_fraction:.0f}% of {read_gb_s:.1f} GB/s "
        f"(ceiling {result.decode_ceiling_tok_s:.1f} tok/s)")
    log(f"peak RSS: {result.peak_rss_mb:.0f} MB; packed weights {result.packed_weight_mb:.0f} MB "
        f"(the file's weights read per token: {bytes_per_token / 2**20:.0f} MB)")
    return result


def to_json_line(result: BenchResult) -> str:
    """One JSON object on one line, floats rounded for reading."""
    data = asdict(result)
    return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in data.items()})
