"""Continuous batching: engine.model.forward over several sequences bit for bit against one-at-a-time
calls, the scheduler (engine/scheduler.py, driven by api/worker.py) against `llm.generate` alone, and a
real uvicorn server under concurrent SDK clients.

Kernels run on one thread (KAWAI_THREADS=1 is what the suite uses; here `threads=1` at load): the
assertions are about scheduling, and the 2-core test machine is shared.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import anthropic
import httpx
import numpy as np
import pytest

from kawai import engine
from kawai.api.app import create_app
from kawai.api.errors import OverloadedError, RateLimitError, UnavailableError
from kawai.api.state import ServerSettings
from kawai.api.worker import Finished, Job, Worker
from api_harness import LiveServer, home, live_server, parse_sse, tokens  # noqa: F401 (home, tokens: fixtures)
from kawai.engine.model import Chunk, forward
from kawai.engine.errors import KawaiError
from kawai.engine.sampling import SamplingParams
from tiny_models import write_tiny_model
from worker_jobs import Collector, run_jobs

N_CTX = 512
K_QUANT_DIMS = dict(d_model=256, d_ff=512)  # K-quant rows hold 256-weight super-blocks


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", qtype="mixed", n_ctx=N_CTX,
                                        **K_QUANT_DIMS),
                       threads=1)


# ---- engine.model.forward over several sequences ------------------------------------------------------


def forward_batch(llm, ids: list[list[int]], caches) -> list[np.ndarray]:
    """Logits (V,) of each sequence's last token, one batched step."""
    return [logits[-1] for logits in forward(llm.config, llm.weights, [Chunk(np.array(t)) for t in ids], caches)]


@pytest.mark.parametrize("arch, qtype", [("qwen2", "mixed"), ("qwen3", "q8_0"), ("llama", "q4_1")])
def test_forward_batch_equals_forward_alone_bit_for_bit(tmp_path, arch, qtype):
    """Mixed batches (prefill chunks next to decode tokens) give each sequence exactly its solo logits."""
    dims = K_QUANT_DIMS if qtype == "mixed" else {}
    llm = engine.load(write_tiny_model(tmp_path, arch, qtype=qtype, n_ctx=128, **dims), threads=1)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, llm.config.n_vocab, n).tolist() for n in (7, 1, 19, 4)]
    follow = [rng.integers(0, llm.config.n_vocab, n).tolist() for n in (1, 5, 1, 1)]
    alone = []
    for p, f in zip(prompts, follow):
        cache = llm.new_cache()
        alone.append((llm.forward(p, cache), llm.forward(f, cache)))
    caches = [llm.new_cache() for _ in prompts]
    first = forward_batch(llm, prompts, caches)  # (4, V)
    second = forward_batch(llm, follow, caches)
    for b, (l1, l2) in enumerate(alone):
        assert np.array_equal(first[b], l1) and np.array_equal(second[b], l2)
        assert caches[b].length == len(prompts[b]) + len(follow[b])


def test_forward_batch_on_the_real_model_is_row_independent(smollm_model_path):
    llm = engine.load(smollm_model_path, threads=1, n_ctx=64)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [100], [42, 43]]
    alone = [llm.forward(p, llm.new_cache()) for p in prompts]
    batched = forward_batch(llm, prompts, [llm.new_cache() for _ in prompts])
    for b in range(len(prompts)):
        assert np.array_equal(batched[b], alone[b])


def test_forward_batch_rejects_bad_batches(tiny_llm):
    cache = tiny_llm.new_cache(4)
    with pytest.raises(KawaiError, match="one cache per sequence"):  # engine.model.forward's own checks
        forward_batch(tiny_llm, [[1], [2]], [cache])
    with pytest.raises(KawaiError, match="twice"):
        forward_batch(tiny_llm, [[1], [2]], [cache, cache])
    with pytest.raises(KawaiError, match="do not fit"):
        forward_batch(tiny_llm, [[1] * 5], [cache])
    with pytest.raises(KawaiError, match="token ids"):
        forward_batch(tiny_llm, [[10**9]], [cache])
    assert cache.length == 0


# ---- the scheduler, driven directly -----------------------------------------------------------------


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


@pytest.fixture(scope="module")
def vision_llm(tmp_path_factory):
    from vision_models import tiny_hf_model, write_language_model, write_mmproj

    root = tmp_path_factory.mktemp("vl")
    hf = tiny_hf_model("qwen2vl")
    path = write_language_model(hf, root / "tiny-vl-f32.gguf")
    write_mmproj(hf, root / "tiny-vl.mmproj.gguf")
    return engine.load(path, threads=1, exact=True)


def picture_prompt(llm, suffix=""):
    from pictures import photo

    picture = [{"role": "user", "content": [{"type": "image", "image": photo(100, 73, seed=1)},
                                            {"type": "text", "text": "What is it?"}]}]
    return llm.encode_chat(picture, suffix=suffix)


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


def test_an_image_prompt_and_a_text_prompt_in_the_same_steps(vision_llm):
    """engine.scheduler directly: both sequences admitted together, so every step of the image prompt's
    prefill and decode holds the text prompt's rows too (M-RoPE rows next to plain-RoPE rows); each gets
    its tokens alone, and the image's stats count its image rows and encoder time."""
    from kawai.engine.prefix_cache import OneCache
    from kawai.engine.scheduler import Request, Scheduler

    llm = vision_llm
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    image, text = picture_prompt(llm), llm.encode_chat([{"role": "user", "content": "Tell me more"}])
    alone = [[s.token_id for s in llm.generate(p, greedy)] for p in (image, text)]

    class TwoCaches:  # one cache per sequence, nothing shared
        def __init__(self):
            self.lenders = [OneCache(llm.new_cache()), OneCache(llm.new_cache())]

        def acquire(self, tenant, prompt, reuse=True):
            return next(lease for lender in self.lenders if (lease := lender.acquire(tenant, prompt, reuse)))

        def reserve(self, lease, n):
            return n <= lease.cache.max_seq

        def publish(self, lease):
            pass

        def release(self, lease, reusable=True):
            for lender in self.lenders:
                lender.release(lease, reusable)

    batch_sizes = []

    def counting_forward(chunks, caches):
        batch_sizes.append(len(chunks))
        return llm.forward_batch(chunks, caches)

    scheduler = Scheduler(llm, TwoCaches(), max_sequences=2, chunk=16, forward=counting_forward)
    seqs = [scheduler.admit(Request(p, greedy)) for p in (image, text)]
    got = {id(s): [] for s in seqs}
    while scheduler.running:
        for seq, step in scheduler.step():
            assert step is not None, seq.error
            got[id(seq)].append(step.token_id)
    assert [got[id(s)] for s in seqs] == alone
    assert max(batch_sizes) == 2 and batch_sizes.count(2) >= greedy.max_tokens
    stats = seqs[0].stats
    assert stats.image_tokens == image.image_tokens == 12 and stats.vision_seconds > 0
    assert stats.prefill_seconds >= stats.vision_seconds and seqs[1].stats.image_tokens == 0


def test_a_thinking_budget_closes_the_block_of_an_image_prompt(vision_llm):
    """The thinking budget is the scheduler's, so it works on image prompts too: after `budget` tokens in
    the <think> block the close is forced (fed at M-RoPE decode positions) and the reply goes on."""
    from kawai.engine.generate import ThinkingBudget
    from kawai.engine.prefix_cache import OneCache
    from kawai.engine.scheduler import Generation, Request, Scheduler

    llm = vision_llm
    prompt = picture_prompt(llm, suffix="<think>\n")  # an assistant prefill that opens the block
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    cache = llm.new_cache()
    thinking = ThinkingBudget(3, llm.chat_format, start_text="<think>\n")
    gen = Generation(Scheduler(llm, OneCache(cache), max_sequences=1), Request(prompt, params, thinking=thinking))
    steps = list(gen)
    assert thinking.done and thinking.used == 3
    assert steps[2].text.endswith(thinking.close_text) and "</think>" not in "".join(s.text for s in steps[:2])
    assert len(steps) == params.max_tokens and steps[-1].finish_reason == "max_tokens"
    close = llm.tokenizer.encode(thinking.close_text)
    fed = cache.tokens[len(prompt.ids):]
    assert fed[3 : 3 + len(close)] == close  # the forced ids went into the cache after the 3rd token
    # the tokens before the budget ran out are the unconstrained ones
    free = [s.token_id for s in llm.generate(prompt, params)]
    assert [s.token_id for s in steps[:3]] == free[:3]


def test_submit_refuses_past_capacity_tenant_limit_and_while_draining(tiny_llm):
    worker = Worker(tiny_llm, queue_size=1, max_sequences=1, max_per_tenant=2)
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

    limited = Worker(tiny_llm, queue_size=8, max_sequences=1, max_per_tenant=2)
    limited.start()
    try:
        limited.submit(Job([1, 2], long, Collector(), "r1", tenant="t1"))
        limited.submit(Job([1, 2], long, Collector(), "r2", tenant="t1"))
        with pytest.raises(RateLimitError) as e:
            limited.submit(Job([1, 2], long, Collector(), "r3", tenant="t1"))
        assert e.value.headers["retry-after"] == "1"
        limited.submit(Job([1, 2], long, Collector(), "r4", tenant="t2"))  # another token is not limited
    finally:
        limited.stop(timeout=10)


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


# ---- a real server and the official SDK -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_llm, home, tokens):
    with live_server(home, [tiny_llm], queue_size=16, max_sequences=8, ping_interval=5.0) as s:
        yield s


def metric(server, tokens, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"x-api-key": tokens.all}).text
    line = next(line for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " "))
    return float(line.rsplit(" ", 1)[1])


def wait_idle(server, tokens, timeout=10.0) -> None:
    worker = server.state.models["tiny-qwen2-mixed"].worker
    t0 = time.monotonic()
    while worker.busy:
        assert time.monotonic() - t0 < timeout, "engine still busy"
        time.sleep(0.02)


def test_32_concurrent_streaming_sdk_clients(server, tokens):
    """8 run, 16 wait, the rest are refused at once with 529; every accepted stream ends with
    message_stop and its text matches its deltas. Greedy streams equal the same request alone."""
    client = anthropic.AsyncAnthropic(base_url=server.url, api_key=tokens.all, max_retries=0, timeout=120)
    prompt = [{"role": "user", "content": "Count with me"}]

    async def one(i: int):
        try:
            async with client.messages.stream(
                model="tiny-qwen2-mixed", max_tokens=24, messages=prompt, extra_body={"temperature": 0}
            ) as stream:
                kinds, text = [], []
                async for event in stream:
                    kinds.append(event.type)
                    if event.type == "content_block_delta" and event.delta.type == "text_delta":
                        text.append(event.delta.text)
                final = await stream.get_final_message()
            return kinds, "".join(text), final
        except anthropic.APIStatusError as e:
            return e.status_code, e.body, None

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(all_of_them())
    ok = [r for r in results if r[2] is not None]
    refused = [r for r in results if r[2] is None]
    assert all(code == 529 and body["error"]["type"] == "overloaded_error" for code, body, _ in refused), refused
    assert len(ok) >= 24 and len(ok) + len(refused) == 32
    texts = set()
    for kinds, text, final in ok:
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        assert final.content[0].text == text and final.usage.output_tokens > 0
        texts.add(text)
    assert len(texts) == 1  # greedy: the same answer for everyone, batched or from the prefix cache
    wait_idle(server, tokens)
    alone = anthropic.Anthropic(base_url=server.url, api_key=tokens.messages_only, max_retries=0).messages.create(
        model="tiny-qwen2-mixed", max_tokens=24, messages=prompt, extra_body={"temperature": 0})
    assert alone.usage.cache_read_input_tokens == 0 and texts == {alone.content[0].text}  # run alone, cold
    assert metric(server, tokens, 'kawai_requests_total{status="529"}') == len(refused)


def test_32_concurrent_streams_under_a_small_kv_memory_finish_or_fail_cleanly(tiny_llm, tmp_path):
    """KV memory for 3 blocks of 64 positions, 8 sequences, replies up to 100 tokens: admission waits for
    memory, a sequence that finds no block for its next token stops (model_context_window_exceeded), the
    rest are refused with 529. Nothing crashes and all memory comes back."""
    budget = 3 * 64 * tiny_llm.new_cache(1).nbytes
    app = create_app(ServerSettings(home=tmp_path, auth=False, queue_size=16, max_sequences=8, kv_memory=budget,
                                    ping_interval=5.0), [tiny_llm])
    body = {"model": "tiny-qwen2-mixed", "max_tokens": 100, "temperature": 0.9, "stream": True}

    async def one(c: httpx.AsyncClient, i: int):
        messages = [{"role": "user", "content": f"Story number {i}"}]
        async with c.stream("POST", "/v1/messages", json={**body, "messages": messages}) as r:
            if r.status_code != 200:
                return r.status_code, json.loads(await r.aread())["error"]["type"]
            frames = parse_sse((await r.aread()).decode())
        kinds = [event for event, _ in frames]
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
        return 200, next(d["delta"]["stop_reason"] for e, d in frames if e == "message_delta")

    async def crowd():
        async with httpx.AsyncClient(base_url=s.url, timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    with LiveServer(app) as s:
        outcomes = asyncio.run(crowd())
        worker = s.state.models["tiny-qwen2-mixed"].worker
        while worker.busy:
            time.sleep(0.02)
        stats = worker.pool.stats()
    ok = [reason for status, reason in outcomes if status == 200]
    assert len(ok) >= 24 and set(ok) <= {"end_turn", "max_tokens", "model_context_window_exceeded"}, outcomes
    assert "model_context_window_exceeded" in ok  # 3 blocks cannot hold 8 replies of 100 tokens
    assert all(o == (529, "overloaded_error") for o in outcomes if o[0] != 200), outcomes
    assert stats.leased == 0 and stats.used_bytes <= stats.budget_bytes == budget


def test_100_clients_that_disconnect_after_the_first_delta_leak_nothing(server, tokens):
    body = {"model": "tiny-qwen2-mixed", "max_tokens": 400, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a long story"}]}
    headers = {"x-api-key": tokens.all}

    async def leave_early(c: httpx.AsyncClient) -> str:
        try:
            async with c.stream("POST", "/v1/messages", json=body, headers=headers) as r:
                if r.status_code != 200:
                    return str(r.status_code)
                async for line in r.aiter_lines():
                    if line.startswith("event: content_block_delta"):
                        return "left"
        except httpx.HTTPError as e:
            return type(e).__name__
        return "ended"

    async def crowd():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*(leave_early(c) for _ in range(100)))

    outcomes = asyncio.run(crowd())
    assert set(outcomes) <= {"left", "529"} and outcomes.count("left") >= 24, outcomes
    client = anthropic.Anthropic(base_url=server.url, api_key=tokens.all, max_retries=0, timeout=60)
    message = client.messages.create(model="tiny-qwen2-mixed", max_tokens=8, extra_body={"temperature": 0},
                                     messages=[{"role": "user", "content": "Hi"}])
    assert message.usage.output_tokens > 0
    wait_idle(server, tokens)
    assert metric(server, tokens, "kawai_active_sequences") == 0
    assert metric(server, tokens, "kawai_queue_length") == 0
    assert metric(server, tokens, "kawai_prefix_cache_leased") == 0


def test_shutdown_drains_in_flight_streams_and_leaves_no_engine_thread(tiny_llm, tmp_path):
    """Server exit (what SIGTERM triggers): the running stream still ends with message_stop, then the
    engine thread is joined."""
    app = create_app(ServerSettings(home=tmp_path, auth=False, max_sequences=2, drain_seconds=10), [tiny_llm])
    body = {"model": "tiny-qwen2-mixed", "max_tokens": 300, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Go on"}]}
    kinds = []
    before = set(threading.enumerate())
    with LiveServer(app) as s:
        worker = s.state.models["tiny-qwen2-mixed"].worker
        with httpx.Client(base_url=s.url, timeout=60) as c, c.stream("POST", "/v1/messages", json=body) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("event: "):
                    kinds.append(line[len("event: "):])
                if kinds[-1:] == ["content_block_delta"]:
                    break
            s.server.should_exit = True  # what uvicorn's SIGTERM handler does
            worker.stop_admitting()  # what `kawai serve` adds to it
            kinds += [line[len("event: "):] for line in lines if line.startswith("event: ")]
    assert kinds[-1] == "message_stop"
    time.sleep(0.2)
    assert [t.name for t in set(threading.enumerate()) - before] == []  # engine, uvicorn, pools: all gone
