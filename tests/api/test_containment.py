"""One bad request never hurts another: the engine loop (api/worker.py) contains errors per sequence and
a supervisor restarts a loop that dies.

The fault is injected at the model boundary, in the weights: a tiny f32 model whose embedding row of one
"poison" token is NaN. A prompt that contains it gets NaN logits (and the sampler raises); the batch rows
are independent (engine/model.py), so every other sequence keeps its real logits.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from kawai import engine
from kawai.api.metrics import Metrics
from kawai.api.worker import Failed, Finished, Job, Worker
from kawai.engine.gguf import open_gguf
from kawai.engine.model import Chunk, forward
from kawai.engine.sampling import SamplingParams
from worker_jobs import Collector, run_jobs
from tiny_models import write_tiny_model

POISON = 77  # the token whose embedding is NaN
GREEDY = SamplingParams(temperature=0, max_tokens=200)


def poisoned_model(directory) -> engine.LLM:
    path = write_tiny_model(directory, "qwen2", qtype="f32", n_ctx=256)
    info = open_gguf(path).tensors["token_embd.weight"]
    rows = np.memmap(path, dtype="<f4", mode="r+", offset=info.offset, shape=info.shape)  # (n_vocab, d)
    rows[POISON] = np.nan
    rows.flush()
    del rows
    return engine.load(path, threads=1)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return poisoned_model(tmp_path_factory.mktemp("poisoned"))


@pytest.fixture(scope="module")
def healthy_prompt(llm):
    """A prompt whose greedy reply (and the prompt itself) never touches the poison token, and its reply."""
    prompt = [5, 6, 7, 8, 9, 10]
    alone = [s.token_id for s in llm.generate(prompt, GREEDY) if s.token_id is not None]
    assert POISON not in alone and len(alone) == GREEDY.max_tokens
    return prompt, alone


def test_the_poison_token_gives_nan_logits_only_to_its_own_sequence(llm):
    logits = forward(llm.config, llm.weights, [Chunk(np.array([1, 2, POISON])), Chunk(np.array([1, 2, 3]))],
                     [llm.new_cache(), llm.new_cache()])  # 2 x (1, V)
    assert np.isnan(logits[0]).all() and np.isfinite(logits[1]).all()


def test_nan_in_one_batched_sequence_ends_only_that_sequence(llm, healthy_prompt):
    """The healthy stream is decoding when the poisoned prompt joins its batch: the poisoned one ends with
    Failed, the healthy one gets exactly its solo tokens, and the engine keeps serving."""
    prompt, alone = healthy_prompt
    worker = Worker(llm, queue_size=4, max_sequences=2)
    worker.start()
    try:
        healthy, poisoned = TimedCollector(), TimedCollector()
        worker.submit(Job(prompt, GREEDY, healthy, "healthy"))
        while not healthy.tokens:  # decoding: the poisoned prompt's prefill shares its next steps
            time.sleep(0.001)
        worker.submit(Job([3, POISON, 4], GREEDY, poisoned, "poisoned"))
        assert poisoned.done.wait(60) and healthy.done.wait(60)
        assert poisoned.ended_at < healthy.ended_at  # it failed while the healthy stream was running
        assert isinstance(poisoned.items[-1], Failed) and poisoned.tokens == []
        assert isinstance(healthy.items[-1], Finished) and healthy.tokens == alone
        assert worker.alive and worker.restarts == 0
        later = run_jobs(worker, [(prompt, GREEDY), ([POISON], GREEDY), (prompt, GREEDY)])
        assert [c.tokens for c in later] == [alone, [], alone]
        assert isinstance(later[1].items[-1], Failed)
        assert worker.active_sequences == 0 and not worker.busy
        assert worker.pool.stats().leased == 0
    finally:
        worker.stop(timeout=10)


class TimedCollector(Collector):
    """Also records when the last item arrived."""

    def put(self, item) -> bool:
        self.ended_at = time.monotonic()
        return super().put(item)


class FlakyMetrics(Metrics):
    """Metrics whose counter raises once, at the n-th call: a bug outside any one sequence's work."""

    def __init__(self, fail_at: int):
        super().__init__()
        self.calls = 0
        self.fail_at = fail_at

    def inc(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("a bug in the loop")
        return super().inc(*args, **kwargs)


def test_a_loop_that_dies_is_restarted_and_waiting_jobs_still_run(llm, healthy_prompt):
    prompt, alone = healthy_prompt
    worker = Worker(llm, queue_size=4, max_sequences=1, metrics=FlakyMetrics(fail_at=3))
    worker.start()
    try:
        first, waiting = Collector(), Collector()
        worker.submit(Job(prompt, GREEDY, first, "first"))
        worker.submit(Job(prompt, GREEDY, waiting, "waiting"))
        assert first.done.wait(60) and waiting.done.wait(60)
        assert isinstance(first.items[-1], Failed)  # it was running when the loop died
        assert isinstance(waiting.items[-1], Finished) and waiting.tokens == alone
        assert worker.restarts == 1 and worker.alive
        assert run_jobs(worker, [(prompt, GREEDY)])[0].tokens == alone
        assert worker.pool.stats().leased == 0 and not worker.busy
    finally:
        worker.stop(timeout=10)
