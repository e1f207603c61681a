"""The benchmark harness: prompt ids, bytes per token, timing, bandwidth, RSS, `kawai bench`, compare.py
summaries. The real-engine run is on the smallest catalog model with tiny token counts."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kawai.api.cli import main
from kawai.engine.scheduler import CHUNK
from kawai.engine.bench import (
    KawaiRunner,
    TimedRun,
    measure_read_bandwidth,
    median_step_s,
    peak_rss_mb,
    prompt_token_ids,
    timed_run,
    weight_bytes_per_token,
)
from kawai.engine.errors import KawaiError
from kawai.engine.gguf import open_gguf
from kawai.kernels import isa

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load_script(name: str):
    """benchmarks/ is not a package: load one of its scripts as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- prompt and model facts


def test_prompt_ids_are_deterministic_normal_tokens(smollm_model_path):
    gguf = open_gguf(smollm_model_path)
    ids = prompt_token_ids(gguf, 300)
    assert ids == prompt_token_ids(gguf, 300)
    assert len(ids) == 300 and ids != prompt_token_ids(gguf, 300, seed=1)
    token_types = np.asarray(gguf.metadata["tokenizer.ggml.token_type"])
    assert all(token_types[i] == 1 for i in ids)
    assert len(set(ids)) > 250  # drawn across the vocabulary, not a constant


def test_prompt_ids_need_a_token_type_table(tmp_path):
    gguf = type("FakeGGUF", (), {"metadata": {}})()
    with pytest.raises(KawaiError, match="token_type"):
        prompt_token_ids(gguf, 4)


def test_weight_bytes_per_token_matches_gguf_size_table(default_model_path, smollm_model_path):
    gguf_pkg = pytest.importorskip("gguf")  # an independent table of block sizes

    def n_bytes(info) -> int:
        block, type_size = gguf_pkg.GGML_QUANT_SIZES[gguf_pkg.GGMLQuantizationType(int(info.ggml_type))]
        return info.n_elements // block * type_size

    for path, tied in ((default_model_path, False), (smollm_model_path, True)):
        gguf = open_gguf(path)
        sizes = {name: n_bytes(info) for name, info in gguf.tensors.items()}
        assert ("output.weight" not in sizes) == tied
        expected = sum(sizes.values()) - (0 if tied else sizes["token_embd.weight"])
        assert weight_bytes_per_token(gguf) == expected
    # docs/kernels.md: Qwen2.5-0.5B Q4_K_M reads about 392 MB per decode step
    assert round(weight_bytes_per_token(open_gguf(default_model_path)) / 1e6) == 392


# ---------------------------------------------------------------- timing


class SleepyRunner:
    """A stand-in engine with known costs, to check what timed_run measures."""

    def __init__(self, prefill_s: float, step_s: float):
        self.prefill_s, self.step_s, self.calls = prefill_s, step_s, []

    def prefill(self, ids):
        self.calls.append(("prefill", len(ids)))
        time.sleep(self.prefill_s)
        return 7

    def decode_step(self, token):
        self.calls.append(("decode", token))
        time.sleep(self.step_s)
        return token + 1


def test_timed_run_counts_only_generated_tokens():
    runner = SleepyRunner(0.05, 0.002)
    run = timed_run(runner, list(range(100)), 5)
    assert run.tokens == [7, 8, 9, 10, 11]  # G tokens: the first from the prefill
    assert len(run.step_s) == 4 and runner.calls[0] == ("prefill", 100)
    assert [c[0] for c in runner.calls[1:]] == ["decode"] * 4
    # Lower bounds only (a sleep lasts at least its time; a loaded machine may stretch it any amount).
    assert run.prefill_s >= 0.05 and all(s >= 0.002 for s in run.step_s)


def test_median_step_skips_warmup_steps():
    assert median_step_s([9.0, 9.0, 1.0, 2.0, 3.0]) == 2.0
    assert median_step_s([9.0, 1.0], warmup_steps=2) == 5.0  # too short to skip: all steps
    assert TimedRun(1.0, [5.0, 5.0, 1.0, 1.0, 2.0], [0] * 6).median_step_s() == 1.0


# ---------------------------------------------------------------- machine measurements


def test_read_bandwidth_is_plausible():
    gb_s = measure_read_bandwidth(threads=1, n_bytes=32 << 20, repeats=2)
    assert 0 < gb_s < 1000  # a rate in GB/s, not B/s or GB/ms; how fast depends on the machine's load


def _child_peak_rss(parent_code: str) -> tuple[float, float]:
    code = (
        "import numpy as np; from kawai.engine.bench import peak_rss_mb; before = peak_rss_mb(); "
        "block = np.ones(200 << 20, dtype=np.uint8); print(before, peak_rss_mb())"
    )
    parent = f"{parent_code}; import subprocess, sys; subprocess.run([sys.executable, '-P', '-c', {code!r}])"
    out = subprocess.run([sys.executable, "-P", "-c", parent], capture_output=True, text=True, check=True).stdout
    before, after = map(float, out.split())
    return before, after


def test_peak_rss_sees_touched_memory():
    before, after = _child_peak_rss("pass")  # a fresh process: this one's peak is unknown
    assert 10 < before < 200 and 200 < after < before + 215  # MiB; an earlier peak may exceed the RSS


def test_peak_rss_is_not_inherited_from_a_big_parent():
    # ru_maxrss survives fork + exec: a child of a 600 MB parent would report >= 600 MB
    before, after = _child_peak_rss("import numpy as np; big = np.ones(600 << 20, dtype=np.uint8)")
    assert before < 200 and after < 450


# ---------------------------------------------------------------- kawai bench


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-m", "no-such-model-anywhere"], "not found"),
        (["--threads", "0"], "--threads"),
        (["--prompt-tokens", "0"], "--prompt-tokens"),
        (["--gen-tokens", "1"], "--gen-tokens"),
    ],
)
def test_bench_bad_input_is_one_line(argv, message, capsys):
    assert main(["bench", "--no-compile", *argv]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bench_rejects_a_file_that_is_not_gguf(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 4)
    assert main(["bench", "--no-compile", "-m", str(bad)]) == 2
    assert "invalid GGUF" in capsys.readouterr().err


def test_bench_end_to_end_json(smollm_model_path, capsys):
    argv = ["bench", "-m", str(smollm_model_path), "--prompt-tokens", "16", "--gen-tokens", "6", "--threads", "1"]
    assert main([*argv, "--no-compile"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["model"] == "smollm2-135m-instruct-q4_1" and result["threads"] == 1
    for key in ("load_s", "prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb", "mem_read_gb_s"):
        assert result[key] > 0, key
    assert result["compile_s"] is None  # --no-compile
    assert result["isa"] == isa.ISA and result["cpu"] == isa.cpu_model()
    assert len(result["load_avg_before"]) == len(result["load_avg_after"]) == 3
    half = 0.00005  # the JSON rounds seconds to 4 decimals: a fast prefill's ttft is only that exact
    assert 16 / (result["ttft_s"] + half) * (1 - 1e-6) <= result["prefill_tok_s"] <= 16 / (result["ttft_s"] - half)
    assert result["weight_gb_s"] == pytest.approx(result["weight_bytes_per_token"] * result["decode_tok_s"] / 1e9,
                                                  rel=1e-3)
    assert result["peak_rss_mb"] > 96  # the weights alone are 96 MB
    # The repacked layout's memory cost is reported; for Q4_1/Q8_0 it stays near the file's size.
    file_mb = result["weight_bytes_per_token"] / 2**20
    assert file_mb < result["packed_weight_mb"] < 1.5 * file_mb
    assert len(lines) > 1  # human lines came first


def test_bench_runner_runs_the_server_path(smollm_model_path):
    """KawaiRunner runs LLM.generate (the scheduler): the prompt in the server's chunks (more than one
    here), one token per step: its greedy tokens are those of llm.forward on the whole prompt."""
    runner = KawaiRunner(smollm_model_path, 1, 2 * CHUNK)
    ids = prompt_token_ids(open_gguf(smollm_model_path), CHUNK + 40)
    run = timed_run(runner, ids, 4)
    cache = runner.llm.new_cache()
    expected = [int(np.argmax(runner.llm.forward(ids, cache)))]
    for _ in range(3):
        expected.append(int(np.argmax(runner.llm.forward([expected[-1]], cache))))
    assert run.tokens == expected
    assert runner.cache.length == len(ids) + 3


@pytest.mark.slow
def test_bench_measures_cold_and_cached_compile(smollm_model_path, capsys):
    argv = ["bench", "-m", str(smollm_model_path), "--prompt-tokens", "8", "--gen-tokens", "4", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # --json: the JSON line only
    result = json.loads(out[0])
    assert result["compile_s"] > result["compile_cached_s"] > 0


# ---------------------------------------------------------------- compare.py summaries


def test_compare_summary_uses_medians_and_never_counts_prompt_tokens():
    compare = _load_script("compare")
    runs = [
        {"prefill_s": 2.0, "step_s": [1.0, 1.0, 0.10, 0.10, 0.10], "tokens": [1] * 6},
        {"prefill_s": 4.0, "step_s": [1.0, 1.0, 0.20, 0.20, 0.20], "tokens": [1] * 6},
        {"prefill_s": 1.0, "step_s": [1.0, 1.0, 0.25, 0.25, 0.25], "tokens": [1] * 6},
    ]
    s = compare.summarize(runs, prompt_tokens=512, bytes_per_token=400_000_000, read_gb_s=20.0)
    assert s["ttft_s"] == 2.0 and s["prefill_tok_s"] == 256.0
    assert s["decode_tok_s"] == pytest.approx(5.0)  # median step 0.2 s
    assert s["weight_gb_s"] == pytest.approx(2.0) and s["bandwidth_fraction"] == pytest.approx(0.1)


def test_compare_agreement_and_ratios():
    compare = _load_script("compare")
    assert compare.leading_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert compare.leading_agreement([1, 2], [1, 2, 3]) == 2
    assert compare.ratio({"x": 3.0}, {"x": 2.0}, "x") == 1.5
    assert compare.ratio({"x": 3.0}, {}, "x") is None


def test_chart_picks_the_newest_result_per_model_threads_and_prompt(tmp_path):
    chart = _load_script("chart")
    for name, model, threads, prompt, value in (
        ("2026-01-01-a-1t-512p.json", "a", 1, 512, 1.0),
        ("2026-02-01-a-1t-512p.json", "a", 1, 512, 2.0),  # newer: wins
        ("2026-01-01-a-1t-12000p.json", "a", 1, 12000, 5.0),  # another prompt length: kept
        ("2026-01-15-a-2t-512p.json", "a", 2, 512, 3.0),
        ("2026-01-01-b-1t-512p.json", "b", 1, 512, 4.0),
    ):
        (tmp_path / name).write_text(json.dumps({"model": model, "threads": threads, "prompt_tokens": prompt,
                                                 "value": value}))
    reports = chart.newest_per_config(sorted(tmp_path.glob("*.json"), reverse=True))
    assert [(r["model"], r["threads"], r["prompt_tokens"], r["value"]) for r in reports] == [
        ("a", 1, 512, 2.0), ("a", 1, 12000, 5.0), ("a", 2, 512, 3.0), ("b", 1, 512, 4.0)]
