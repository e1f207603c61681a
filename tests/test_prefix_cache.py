"""The prompt-prefix cache: the pool's rules (engine/prefix_cache.py) and, on a real server with the real
SmolLM2 model and the official SDK, multi-turn reuse reported as `cache_read_input_tokens`, per tenant."""

from __future__ import annotations

import anthropic
import httpx
import numpy as np
import pytest

from kawai import engine
from kawai.api.app import create_app
from kawai.api.state import ServerSettings
from api_harness import LiveServer, make_tokens
from kawai.engine.prefix_cache import PrefixCache
from kawai.engine.sampling import SamplingParams
from tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", n_ctx=64), threads=1)


def fill(llm, pool: PrefixCache, tenant, prompt):
    """Acquire, run the prompt through the model as the scheduler would, release; returns the lease."""
    lease = pool.acquire(tenant, prompt)
    cache = lease.cache
    todo = prompt[cache.length:]
    if todo:
        llm.forward(todo, cache)
        cache.tokens.extend(todo)
    pool.release(lease)
    return lease


def test_longest_prefix_of_the_same_tenant_only(tiny_llm):
    pool = PrefixCache(tiny_llm.new_cache, slots=3)
    fill(tiny_llm, pool, "a", [1, 2, 3, 4, 5])
    fill(tiny_llm, pool, "a", [1, 2, 9, 9])
    assert pool.acquire("b", [1, 2, 3, 4, 5, 6]).reused == 0  # another tenant never sees a's caches
    lease = pool.acquire("a", [1, 2, 3, 4, 5, 6])
    assert lease.reused == 5 and lease.cache.tokens == [1, 2, 3, 4, 5] and lease.cache.length == 5
    assert pool.stats().leased == 2


def test_reused_keys_and_values_equal_a_fresh_prefill(tiny_llm):
    """A conversation extended from the cache (moved) and one sharing part of it (copied into a free
    slot) both produce exactly the logits of a fresh run."""
    pool = PrefixCache(tiny_llm.new_cache, slots=4)
    fill(tiny_llm, pool, None, [5, 6, 7, 8, 9, 10])
    for prompt in ([5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 30, 31]):
        lease = pool.acquire(None, prompt)
        reused = lease.reused
        assert reused in (6, 3)
        got = tiny_llm.forward(prompt[reused:], lease.cache)
        want = tiny_llm.forward(prompt, tiny_llm.new_cache())
        assert np.array_equal(got, want)
        lease.cache.tokens.extend(prompt[reused:])
        pool.release(lease)
    assert pool.stats().allocated == 2  # the partial match was copied: the original entry stayed


def test_bounded_by_slots_with_lru_eviction(tiny_llm):
    pool = PrefixCache(tiny_llm.new_cache, slots=2)
    fill(tiny_llm, pool, "a", [1, 1, 1])
    fill(tiny_llm, pool, "b", [2, 2, 2])
    fill(tiny_llm, pool, "a", [1, 1, 1, 4])  # touches a's entry: b's is now the least recently used
    fill(tiny_llm, pool, "c", [3, 3, 3])  # evicts b
    stats = pool.stats()
    assert stats.allocated == 2 and stats.evictions == 1 and stats.nbytes == 2 * tiny_llm.new_cache().nbytes
    assert pool.acquire("a", [1, 1, 1, 4, 5]).reused == 4
    assert pool.acquire("b", [2, 2, 2, 2]).reused == 0  # b's cache was evicted; c's is emptied for it
    assert pool.acquire("c", [3, 3, 3]) is None  # both slots leased


# ---- multi-turn on a real server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm(smollm_model_path):
    return engine.load(smollm_model_path, threads=1, n_ctx=512)


@pytest.fixture(scope="module")
def server(smollm, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    tokens = make_tokens(home)
    settings = ServerSettings(home=home, queue_size=4, max_sequences=2, ping_interval=5.0)
    with LiveServer(create_app(settings, [smollm])) as s:
        yield s, tokens


@pytest.fixture(autouse=True)
def _no_sdk_env(monkeypatch):
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def test_second_turn_reads_the_first_turn_from_the_cache_per_tenant(server, smollm):
    s, tokens = server
    client = anthropic.Anthropic(base_url=s.url, api_key=tokens.all, max_retries=0, timeout=120)
    greedy = {"temperature": 0}
    turn1 = [{"role": "user", "content": "Name three colors."}]
    first = client.messages.create(model=smollm.id, max_tokens=12, messages=turn1, extra_body=greedy)
    assert first.usage.cache_read_input_tokens == 0
    answer = first.content[0].text
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And two animals?"}]
    second = client.messages.create(model=smollm.id, max_tokens=4, messages=turn2, extra_body=greedy)
    read = second.usage.cache_read_input_tokens
    # the cache holds the first prompt and every answer token but the last (sampled, never fed back)
    assert read >= first.usage.input_tokens + first.usage.output_tokens - 1
    assert second.usage.input_tokens + read == len(smollm.encode_chat(turn2))
    steps = smollm.generate(smollm.encode_chat(turn2), SamplingParams(temperature=0, max_tokens=4))
    alone = "".join(step.text for step in steps)
    # reused keys/values change nothing (the API drops a reply's trailing whitespace: api/toolcalls.py)
    assert second.content[0].text == alone.rstrip()

    other = anthropic.Anthropic(base_url=s.url, api_key=tokens.messages_only, max_retries=0, timeout=120)
    third = other.messages.create(model=smollm.id, max_tokens=4, messages=turn2, extra_body=greedy)
    assert third.usage.cache_read_input_tokens == 0  # another token: no timing side channel
    assert third.content[0].text == alone.rstrip()

    page = httpx.get(s.url + "/metrics", headers={"x-api-key": tokens.all}).text
    assert f'kawai_prefix_cache_hit_tokens_total{{model="{smollm.id}"}} {read}' in page


def test_a_per_request_billing_header_does_not_defeat_the_cache(server, smollm):
    """Claude Code starts `system` with a block whose hash changes every request; it is dropped, so the
    rest of the system prompt is reused (a change anywhere else still ends the reuse there)."""
    s, tokens = server
    client = anthropic.Anthropic(base_url=s.url, api_key=tokens.all, max_retries=0, timeout=120)
    rules = "You are a terse assistant. " + " ".join(f"Rule {i}: be exact." for i in range(30))

    def ask(cch: str, question: str):
        system = [{"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.0; cch={cch};"},
                  {"type": "text", "text": rules}]
        return client.messages.create(model=smollm.id, max_tokens=1, system=system,
                                      messages=[{"role": "user", "content": question}], extra_body={"temperature": 0})

    first = ask("a1b2c", "Hi")
    second = ask("f9e8d", "Hello")
    assert second.usage.cache_read_input_tokens > len(smollm.tokenizer.encode(rules)) - 2
    assert first.usage.input_tokens + first.usage.cache_read_input_tokens == len(
        smollm.encode_chat([{"role": "system", "content": rules}, {"role": "user", "content": "Hi"}]))
