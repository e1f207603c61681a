"""The server's engine thread (api/worker.py) without HTTP: batched requests against `llm.generate` alone
(text and image prompts), submit's limits (capacity, tenant, draining, KV memory), the heartbeat."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kawai import engine
from kawai.api.errors import OverloadedError, UnavailableError
from kawai.api.worker import Finished, Job, Worker
from batch_models import picture_prompt, tiny_llm, vision_llm  # noqa: F401 (tiny_llm, vision_llm: fixtures)
from kawai.engine.errors import KawaiError
from kawai.engine.sampling import SamplingParams
from worker_jobs import Collector, run_jobs


def test_batched_generation_equals_each_request_alone(tiny_llm):
    """Different prompt lengths, sampling params, seeds and stop rules, run 5 at a time with small
    prefill chunks (long prompts interleave with decode steps): every sequence gets its solo tokens."""
    rng = np.random.default_rng(7)
    jobs = []
    for i in range(6):
        prompt = rng.integers(0, tiny_llm.config.n_vocab, int(rng.integers(3, 90))).tolist()
        temperature = 0.0 if i % 2 == 0 else 0.9
        jobs.append((prompt, SamplingParams(temperature=temperature, top_k=40, max_tokens=int(12 + 5 * i), seed=i)))
    alone = [[s.token_id for s in tiny_llm.generate(p, params) if s.token_id is not None] for p, params in jobs]
    worker = Worker(tiny_llm, queue_size=8, max_sequences=5, prefill_chunk=16)
    worker.start()
    try:
        results = run_jobs(worker, jobs)
    finally:
        worker.stop(timeout=10)
    for got, want, (prompt, _) in zip(results, alone, jobs):
        assert got.tokens == want
        done = got.items[-1]
        assert isinstance(done, Finished) and done.prompt_tokens == len(prompt) and done.generated_tokens == len(want)
    assert not worker.alive and worker.active_sequences == 0


def test_image_prompts_are_batched_with_text_prompts(vision_llm):
    """A vision model through the server: an image request (image rows as embeddings at M-RoPE positions)
    shares the batched steps of text requests; everyone gets exactly the tokens they would get alone."""
    llm = vision_llm
    greedy = SamplingParams(temperature=0, max_tokens=10)
    prompts = [picture_prompt(llm), llm.encode_chat([{"role": "user", "content": "Hi"}]),
               llm.encode_chat([{"role": "user", "content": "Say something longer"}])]
    assert prompts[0].images and not prompts[1].images
    alone = [[s.token_id for s in llm.generate(p, greedy) if s.token_id is not None] for p in prompts]
    worker = Worker(llm, queue_size=4, max_sequences=3)
    worker.start()
    try:
        results = run_jobs(worker, [(p, greedy) for p in prompts])
        again = run_jobs(worker, [(prompts[0], greedy)])  # an image conversation's cache is never reused
    finally:
        worker.stop(timeout=10)
    assert [r.tokens for r in results] == alone
    assert again[0].tokens == alone[0] and again[0].items[-1].cached_tokens == 0


def test_submit_refuses_past_capacity_and_while_draining(tiny_llm):
    worker = Worker(tiny_llm, queue_size=1, max_sequences=1)
    worker.start()
    long = SamplingParams(temperature=0, max_tokens=400)
    try:
        a, b = Collector(), Collector()
        worker.submit(Job([1, 2, 3], long, a, "r1", tenant="t1"))
        worker.submit(Job([1, 2, 3], long, b, "r2", tenant="t2"))
        with pytest.raises(OverloadedError):  # 1 running + 1 waiting
            worker.submit(Job([1], long, Collector(), "r3", tenant="t3"))
        worker.stop_admitting()
        with pytest.raises(UnavailableError):
            worker.submit(Job([1], long, Collector(), "r4", tenant="t3"))
    finally:
        worker.stop(timeout=10)
    assert a.done.is_set() and b.done.is_set()
    assert not worker.busy


def test_a_prompt_longer_than_the_kv_memory_is_refused_with_529_before_it_starts(tiny_llm):
    worker = Worker(tiny_llm, queue_size=4, kv_memory=2 * 64 * tiny_llm.new_cache(1).nbytes)  # two blocks
    worker.start()
    try:
        with pytest.raises(OverloadedError, match="does not fit the KV memory"):
            worker.submit(Job(list(range(1, 130)), SamplingParams(max_tokens=4), Collector(), "r1"))
        fits = Collector()
        worker.submit(Job(list(range(1, 128)), SamplingParams(temperature=0, max_tokens=4), fits, "r2"))
        assert fits.done.wait(60) and isinstance(fits.items[-1], Finished)
        assert fits.items[-2].finish_reason == "context_full"  # 127 + 1 fit the two blocks, the next did not
    finally:
        worker.stop(timeout=10)


def test_idle_engine_keeps_its_heartbeat_and_a_too_small_kv_budget_is_one_clear_error(tiny_llm):
    worker = Worker(tiny_llm, queue_size=1, wedge_seconds=1.0)
    worker.start()
    try:
        time.sleep(1.5)  # idle longer than the wedge bound: heartbeats continue
        assert worker.alive
    finally:
        worker.stop(timeout=5)
    assert not worker.alive
    with pytest.raises(KawaiError, match="raise --kv-memory or lower --ctx"):
        Worker(tiny_llm, queue_size=1, kv_memory=1000)


def test_a_step_longer_than_the_wedge_bound_reads_as_not_alive(smollm_model_path):
    """The heartbeat is refreshed between steps: a 150-token prefill in one step (SmolLM2) outlasts a
    50 ms bound, so `alive` (and /health) reports the engine as wedged until the step ends."""
    llm = engine.load(smollm_model_path, threads=1, n_ctx=200)
    worker = Worker(llm, queue_size=1, prefill_chunk=200, wedge_seconds=0.05)
    worker.start()
    try:
        time.sleep(0.1)
        assert worker.alive
        channel = Collector()
        worker.submit(Job(list(range(100, 250)), SamplingParams(temperature=0, max_tokens=1), channel, "r"))
        seen_wedged = False
        while not channel.done.is_set():
            seen_wedged |= not worker.alive
            time.sleep(0.005)
        assert seen_wedged and isinstance(channel.items[-1], Finished)
        time.sleep(0.01)
        assert worker.alive
    finally:
        worker.stop(timeout=10)


IDLE_PROBE = """
import os, sys, time
sys.path.insert(0, sys.argv[2])  # tests/: the job helpers
from kawai import engine
from kawai.api.worker import Worker
from kawai.engine.sampling import SamplingParams
from worker_jobs import run_jobs
def tasks():
    return len(os.listdir("/proc/self/task"))
worker = Worker(engine.load(sys.argv[1], n_ctx=256, threads=2), queue_size=1, max_sequences=1)
worker.start()
time.sleep(0.5)
idle = tasks()
run_jobs(worker, [([1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=8))])
deadline = time.monotonic() + 5
while tasks() > idle and time.monotonic() < deadline:
    time.sleep(0.05)
print(idle, tasks())
worker.stop(timeout=10)
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not os.path.isdir("/proc/self/task"), reason="needs 2 CPUs, Linux")
def test_an_idle_engine_thread_holds_no_kernel_workers(smollm_model_path):
    """Served side by side, one model's idle engine thread would keep its OpenMP workers, and then every
    kernel launch of the busy one waits for its own sleeping workers (kernels/threads.py)."""
    tests = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-P", "-c", IDLE_PROBE, str(smollm_model_path), str(tests)],
                         capture_output=True, text=True, check=True, env={**os.environ, "NUMBA_NUM_THREADS": "2"})
    idle, after = map(int, out.stdout.split())
    assert after == idle
