"""The prompt-prefix cache: the pool's rules (engine/prefix_cache.py) and, on a real server with the real
SmolLM2 model and the official SDK, multi-turn reuse reported as `cache_read_input_tokens`, per tenant."""

from __future__ import annotations

import time

import anthropic
import httpx
import numpy as np
import pytest

from kawai import engine
from kawai.api.app import create_app
from kawai.api.state import ServerSettings
from api_harness import LiveServer, make_tokens
from kawai.engine.kv_disk import DiskCache, clear_blocks, list_blocks
from kawai.engine.prefix_cache import BLOCK_TOKENS, PrefixCache, block_hashes, chain_root
from kawai.engine.sampling import SamplingParams
from tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", n_ctx=64), threads=1)


B = 4  # tokens per block in these tests


def make_pool(llm, blocks: int, block_tokens: int = B) -> PrefixCache:
    """A pool whose KV memory holds `blocks` blocks."""
    per_block = llm.new_cache(1).nbytes * block_tokens
    return PrefixCache(llm.new_cache, blocks * per_block, root=lambda tenant: chain_root("tiny", "f32", tenant),
                       block_tokens=block_tokens)


def run(llm, pool: PrefixCache, lease, release=True):
    """Prefill the rest of the lease's prompt as the scheduler does (then publish, release)."""
    cache = lease.cache
    todo = lease.prompt[lease.reused:]
    assert cache.length >= lease.reused
    cache.truncate(lease.reused)
    assert pool.reserve(lease, len(lease.prompt))
    logits = llm.forward(todo, cache)  # records the ids in cache.tokens
    pool.publish(lease)
    if release:
        pool.release(lease)
    return logits


def fill(llm, pool: PrefixCache, tenant, prompt):
    lease = pool.acquire(tenant, prompt)
    run(llm, pool, lease)
    return lease


def test_block_hashes_chain_every_token_before_them_and_the_tenant():
    root_a, root_b = chain_root("m", "f32", "a"), chain_root("m", "f32", "b")
    h = block_hashes(root_a, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(h) == 2 and h == block_hashes(root_a, [1, 2, 3, 4, 5, 6, 7, 8], 4)  # a partial block has none
    assert block_hashes(root_a, [1, 2, 3, 4, 5, 6, 7, 9], 4)[0] == h[0]
    assert block_hashes(root_a, [9, 2, 3, 4, 5, 6, 7, 8], 4)[1] != h[1]  # block 1 depends on block 0's tokens
    assert block_hashes(root_b, [1, 2, 3, 4], 4)[0] != h[0]  # another tenant: other names
    assert chain_root("m", "f16", "a") != root_a and chain_root("n", "f32", "a") != root_a


def test_longest_prefix_of_the_same_tenant_only(tiny_llm):
    pool = make_pool(tiny_llm, blocks=12)
    fill(tiny_llm, pool, "a", [1, 2, 3, 4, 5])
    fill(tiny_llm, pool, "a", [1, 2, 9, 9])
    assert pool.acquire("b", [1, 2, 3, 4, 5, 6]).reused == 0  # another tenant never sees a's caches
    lease = pool.acquire("a", [1, 2, 3, 4, 5, 6])
    assert lease.reused == 5 and lease.cache.tokens == [1, 2, 3, 4, 5] and lease.cache.length == 5
    assert pool.stats().leased == 2


def test_reused_keys_and_values_equal_a_fresh_prefill(tiny_llm):
    """A conversation extended from the cache (handed over) and one sharing less than a block of it
    (copied) produce exactly the logits of a fresh run; one reading a whole shared block in place gets
    them up to float32 rounding (its attention merges the prefix's partial result with its own)."""
    pool = make_pool(tiny_llm, blocks=12)
    fill(tiny_llm, pool, None, [5, 6, 7, 8, 9, 10])
    for prompt, reused, shared in (([5, 6, 7, 8, 9, 10, 11, 12], 6, 0), ([5, 6, 7, 30, 31], 3, 0),
                                   ([5, 6, 7, 8, 40, 41], 4, 4)):
        lease = pool.acquire(None, prompt)
        assert lease.reused == reused and lease.cache.base == shared
        got = run(tiny_llm, pool, lease)
        want = tiny_llm.forward(prompt, tiny_llm.new_cache())
        if shared:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
            assert got.argmax() == want.argmax()
        else:
            assert np.array_equal(got, want)


def test_blocks_are_shared_by_hash_and_creation_counts_only_new_blocks(tiny_llm):
    pool = make_pool(tiny_llm, blocks=20)
    system = list(range(10, 18))  # two blocks
    first = pool.acquire("t", system + [1, 2, 3])
    run(tiny_llm, pool, first, release=False)  # still running: its blocks are readable by others
    assert first.reused == 0 and first.created == 8
    second = pool.acquire("t", system + [7, 7])
    assert second.reused == 8 and second.cache is not first.cache  # copied from the running sequence
    run(tiny_llm, pool, second)
    assert second.created == 0  # nothing new: its prompt's only full blocks were already cached
    third = pool.acquire("t", system + [7, 7, 7, 7, 7])
    assert third.reused == 10  # the finished conversation, token-exact
    assert pool.stats().memory_hit_tokens == 18 and pool.stats().created_tokens == 8


def test_a_shared_block_stays_until_its_last_holder_is_gone(tiny_llm):
    """Two live sequences hold the same prompt blocks: the blocks stay findable while either holds
    them, and are gone (their memory returned) only when both have been dropped."""
    pool = make_pool(tiny_llm, blocks=20)
    prompt = list(range(20, 29))  # two full blocks and one token
    a = pool.acquire("t", prompt)
    run(tiny_llm, pool, a, release=False)
    b = pool.acquire("t", prompt)
    run(tiny_llm, pool, b, release=False)
    assert a.cache is not b.cache and pool.stats().blocks == 2
    pool.release(a, reusable=False)  # dropped: b still holds the blocks
    other = pool.acquire("u", prompt)
    assert pool.stats().blocks == 2 and other.reused == 0  # and only for its tenant
    pool.release(other)  # never ran: nothing to keep
    c = pool.acquire("t", prompt[:8] + [1])
    assert c.reused == 8
    pool.release(c, reusable=False)
    pool.release(b, reusable=False)
    stats = pool.stats()
    assert stats.blocks == 0 and stats.used_bytes == 0 and stats.leased == stats.idle == 0
    assert pool.acquire("t", prompt).reused == 0


def entries(pool: PrefixCache) -> int:
    stats = pool.stats()
    return stats.leased + stats.idle


def test_two_live_sequences_with_a_common_prefix_hold_its_blocks_once(tiny_llm):
    """The second sequence reads the first one's prompt blocks in place (no copy): memory is accounted
    for the prefix once, plus each sequence's own blocks. A third sharing the second's conversation reads
    the prefix from the first too and copies only what the second computed itself."""
    pool = make_pool(tiny_llm, blocks=20)
    per_block = pool.bytes_per_token * B
    system = list(range(30, 42))  # three blocks
    a = pool.acquire("t", system + [1, 2])
    run(tiny_llm, pool, a, release=False)
    assert pool.stats().used_bytes == 4 * per_block
    b = pool.acquire("t", system + [7, 8, 9, 10, 11])
    assert b.reused == 12 and b.cache.shared is a.cache and b.cache.base == 12
    got = run(tiny_llm, pool, b, release=False)
    want = tiny_llm.forward(system + [7, 8, 9, 10, 11], tiny_llm.new_cache())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    stats = pool.stats()
    assert stats.used_bytes == (4 + 2) * per_block  # a: 3 shared blocks + its own; b: its two own blocks
    assert stats.shared_tokens == 12 and stats.blocks == 4  # b's 4th block is findable too
    assert not np.shares_memory(a.cache.k, b.cache.k)  # b's own positions are its own
    c = pool.acquire("t", system + [7, 8, 9, 10, 11, 12, 13])
    assert c.reused == 16 and c.cache.shared is a.cache and c.cache.base == 12  # b's own block: copied
    pool.release(c)
    k, v = c.cache.positions(0, 16)
    kb, vb = b.cache.positions(0, 16)
    assert np.array_equal(k, kb) and np.array_equal(v, vb)


def test_blocks_shared_by_two_live_sequences_are_freed_only_when_both_end(tiny_llm):
    """The owner ends first and is dropped (an error): its blocks stay, unchanged and accounted, while
    the reader runs (the reader's next tokens are still right); both ended, every byte is returned."""
    pool = make_pool(tiny_llm, blocks=8)
    per_block = pool.bytes_per_token * B
    prompt = list(range(50, 59))  # two blocks and a token
    a = pool.acquire("t", prompt)
    run(tiny_llm, pool, a, release=False)
    b = pool.acquire("t", prompt[:8] + [3, 4])
    run(tiny_llm, pool, b, release=False)
    assert b.cache.shared is a.cache
    shared_k = a.cache.positions(0, 8)[0].copy()
    pool.release(a, reusable=False)
    stats = pool.stats()
    assert stats.used_bytes == (2 + 1) * per_block and stats.shared_tokens == 8  # a's 3rd block went back
    assert pool.clear() is None and pool.stats().used_bytes == 3 * per_block  # clear never drops what b reads
    assert pool.acquire("u", [9] * 24) is None  # 6 blocks: only a's (read by b) could make room
    other = pool.acquire("u", [9] * 20)  # 5 blocks: the rest of the budget
    assert other is not None and pool.stats().used_bytes == pool.stats().budget_bytes
    pool.release(other, reusable=False)
    assert pool.reserve(b, 12)
    logits = tiny_llm.forward([5, 6], b.cache)
    want = tiny_llm.forward(prompt[:8] + [3, 4, 5, 6], tiny_llm.new_cache())
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.array_equal(a.cache.positions(0, 8)[0], shared_k)
    pool.release(b, reusable=False)
    stats = pool.stats()
    assert stats.used_bytes == 0 and stats.blocks == 0 and entries(pool) == 0


def test_an_idle_shared_prefix_is_never_evicted_under_a_live_reader(tiny_llm):
    """The owner finished (idle, evictable) but a running sequence reads its blocks: memory pressure
    evicts other idle caches, and a prompt that only its eviction could admit waits. Once the reader
    ends, the two go (the reader first, then the cache it read)."""
    pool = make_pool(tiny_llm, blocks=7)
    fill(tiny_llm, pool, "t", list(range(60, 69)))  # 3 blocks, idle
    fill(tiny_llm, pool, "x", [2] * 7)  # 2 blocks, idle, the least recently used after b below
    b = pool.acquire("t", list(range(60, 68)) + [1])
    run(tiny_llm, pool, b, release=False)  # reads 2 blocks, owns 1
    assert b.cache.shared is not None and pool.stats().used_bytes == 6 * pool.bytes_per_token * B
    c = pool.acquire("u", [4] * 8)  # 2 blocks, 1 free: evicts x's conversation, never b's prefix
    assert c is not None and pool.stats().evictions == 1
    pool.release(c, reusable=False)
    assert pool.acquire("u", [4] * 20) is None  # 5 blocks: only evicting b's prefix would do
    assert np.isfinite(b.cache.positions(0, 8)[0]).all() and pool.stats().shared_tokens == 8
    pool.release(b)
    d = pool.acquire("u", [4] * 20)
    assert d is not None and d.reused == 0 and pool.stats().evictions == 3  # b's cache, then the prefix's
    pool.release(d, reusable=False)
    assert pool.stats().used_bytes == 0


def test_memory_is_bounded_in_blocks_with_lru_eviction_and_a_wait_when_full(tiny_llm):
    pool = make_pool(tiny_llm, blocks=4)
    per_block = pool.bytes_per_token * B
    fill(tiny_llm, pool, "a", [1, 1, 1])
    fill(tiny_llm, pool, "b", [2, 2, 2])
    fill(tiny_llm, pool, "a", [1, 1, 1, 4])  # a's conversation, extended: b's is now least recently used
    fill(tiny_llm, pool, "c", [3] * 9)  # three blocks: evicts b's
    stats = pool.stats()
    assert stats.used_bytes == 4 * per_block and stats.evictions == 1
    b = pool.acquire("b", [2, 2, 2, 2])  # evicts a's (c's is more recent)
    assert b.reused == 0 and pool.stats().evictions == 2
    held = pool.acquire("c", [3] * 10)
    assert held.reused == 9
    assert pool.acquire("d", [9] * 9) is None  # three blocks, but four are leased: wait
    assert pool.fits(16) and not pool.fits(17)
    assert pool.reserve(held, 12) and not pool.reserve(held, 13)  # a decoding sequence finds no block left
    assert pool.stats().used_bytes <= pool.stats().budget_bytes


# ---- the disk tier -----------------------------------------------------------------------------------------


def disk_pool(llm, root, model_sha="0" * 64, max_bytes=1 << 30, blocks=40) -> PrefixCache:
    k, v = llm.new_cache(B).positions(0, B)
    disk = DiskCache(root, model_sha256=model_sha, kv_format="f32", dtype=k.dtype, k_shape=k.shape,
                     v_shape=v.shape, block_tokens=B, max_bytes=max_bytes)
    per_block = llm.new_cache(1).nbytes * B
    return PrefixCache(llm.new_cache, blocks * per_block, root=lambda tenant: chain_root(model_sha, "f32", tenant),
                       block_tokens=B, disk=disk)


def acquire_waiting(pool, tenant, prompt, timeout=30.0):
    """acquire, waiting out a disk look-up."""
    t0 = time.monotonic()
    while (lease := pool.acquire(tenant, prompt)) is None:
        assert time.monotonic() - t0 < timeout
        time.sleep(0.005)
    return lease


PROMPT = [int(t) for t in np.random.default_rng(3).integers(0, 200, 23)]  # five full blocks and three tokens


def write_prompt(llm, root, **kwargs):
    pool = disk_pool(llm, root, **kwargs)
    want = run(llm, pool, acquire_waiting(pool, "t", PROMPT))
    pool.close(30)
    return want


def block_files(root) -> list:
    return sorted((root / ("0" * 64)).glob("*.kvb"))


def test_blocks_written_to_disk_are_read_back_by_a_new_pool_bit_for_bit(tiny_llm, tmp_path):
    want = write_prompt(tiny_llm, tmp_path)
    assert len(block_files(tmp_path)) == 5
    pool = disk_pool(tiny_llm, tmp_path)
    assert acquire_waiting(pool, "other", PROMPT).reused == 0  # another tenant: no hit
    lease = acquire_waiting(pool, "t", PROMPT)
    assert lease.reused == 20 and lease.disk_tokens == 20
    assert np.array_equal(run(tiny_llm, pool, lease), want)
    assert pool.stats().disk_hit_tokens == 20 and pool.disk.stats().read_blocks == 5
    pool.close(10)


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "garbage", "wrong_model"])
def test_damaged_or_foreign_block_files_are_ignored_and_deleted(tiny_llm, tmp_path, damage):
    write_prompt(tiny_llm, tmp_path)
    files = block_files(tmp_path)
    third = files_in_chain_order(files)[2]
    if damage == "corrupt":  # one payload byte flipped
        data = bytearray(third.read_bytes())
        data[-10] ^= 0x40
        third.write_bytes(bytes(data))
    elif damage == "truncated":
        third.write_bytes(third.read_bytes()[:-100])
    elif damage == "garbage":
        third.write_bytes(b"not a block at all")
    model_sha = "1" * 64 if damage == "wrong_model" else "0" * 64
    if damage == "wrong_model":  # another model's files copied into this model's directory
        (tmp_path / model_sha).mkdir()
        for f in files:
            (tmp_path / model_sha / f.name).write_bytes(f.read_bytes())
    pool = disk_pool(tiny_llm, tmp_path, model_sha=model_sha)
    lease = acquire_waiting(pool, "t", PROMPT)
    if damage == "wrong_model":
        # the chain names differ per model, so its files are never even looked up; read one as if they were
        root = chain_root(model_sha, "f32", "t")
        assert list(pool.disk.read_chain("t", chain_root("0" * 64, "f32", "t"), PROMPT, block_hashes(
            chain_root("0" * 64, "f32", "t"), PROMPT, B))) == []
        assert lease.reused == 0 and root != chain_root("0" * 64, "f32", "t")
        assert pool.disk.stats().rejected_files == 1 and len(list((tmp_path / model_sha).glob("*.kvb"))) == 4
    else:
        assert lease.reused == 8  # blocks 0 and 1; block 2 is bad, so nothing after it is used
        assert pool.disk.stats().rejected_files == 1 and not third.exists()
        want = tiny_llm.forward(PROMPT, tiny_llm.new_cache())
        assert np.array_equal(run(tiny_llm, pool, lease), want)
    pool.close(10)


def files_in_chain_order(files) -> list:
    from kawai.engine.kv_disk import read_header

    return sorted(files, key=lambda f: read_header(f)["index"])


def test_the_disk_bound_is_respected_least_recently_used_first(tiny_llm, tmp_path):
    write_prompt(tiny_llm, tmp_path)
    size = block_files(tmp_path)[0].stat().st_size
    pool = disk_pool(tiny_llm, tmp_path, max_bytes=7 * size)
    for i in range(3):
        run(tiny_llm, pool, acquire_waiting(pool, "t", [100 + i] * 16))  # 4 blocks each
    pool.close(30)
    files = block_files(tmp_path)
    assert sum(f.stat().st_size for f in files) <= 7 * size and len(files) == 7
    assert pool.disk.stats().evicted_files == 5 + 12 - 7
    assert list_blocks(tmp_path)[0].files == 7 and list_blocks(tmp_path)[0].tenants == ("t",)
    assert clear_blocks(tmp_path) == (7, 7 * size) and block_files(tmp_path) == []


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
    usage = second.usage
    assert usage.input_tokens + usage.cache_creation_input_tokens + read == len(smollm.encode_chat(turn2).ids)
    steps = smollm.generate(smollm.encode_chat(turn2).ids, SamplingParams(temperature=0, max_tokens=4))
    alone = "".join(step.text for step in steps)
    # reused keys/values change nothing (the API drops a reply's trailing whitespace: engine/output_parser.py)
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
    n = len(smollm.encode_chat([{"role": "system", "content": rules}, {"role": "user", "content": "Hi"}]).ids)
    usage = first.usage
    assert usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens == n
    # creation: the prompt's whole blocks of BLOCK_TOKENS that no cache held before, minus tokens read
    assert usage.cache_creation_input_tokens + usage.cache_read_input_tokens == n // BLOCK_TOKENS * BLOCK_TOKENS
    assert second.usage.cache_creation_input_tokens == 0


def test_a_restarted_server_reads_the_prompt_from_disk_per_tenant(smollm, tmp_path):
    """A server writes a prompt's blocks to $KAWAI_HOME/kv; a new server on the same home (nothing in
    memory) reads them back: cache_read_input_tokens is the cached prefix, the greedy output is the
    uncached one, and another tenant gets no hit."""
    tokens = make_tokens(tmp_path)
    settings = ServerSettings(home=tmp_path, queue_size=4, max_sequences=2, kv_disk=64 << 20)
    rules = "You are a careful assistant. " + " ".join(f"Rule {i}: answer in one short line." for i in range(25))
    messages = [{"role": "system", "content": rules}, {"role": "user", "content": "Name one color."}]
    n = len(smollm.encode_chat(messages).ids)
    cached = min(n // BLOCK_TOKENS * BLOCK_TOKENS, n - 1)
    assert cached >= 2 * BLOCK_TOKENS

    def ask(server, key):
        client = anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=120)
        return client.messages.create(model=smollm.id, max_tokens=6, system=rules, messages=messages[1:],
                                      extra_body={"temperature": 0})

    with LiveServer(create_app(settings, [smollm])) as s:
        cold = ask(s, tokens.all)
    assert cold.usage.cache_read_input_tokens == 0 and cold.usage.cache_creation_input_tokens == cached
    files = list((tmp_path / "kv").glob("*/*.kvb"))
    assert len(files) == cached // BLOCK_TOKENS

    with LiveServer(create_app(settings, [smollm])) as s:
        other = ask(s, tokens.messages_only)
        warm = ask(s, tokens.all)
        page = httpx.get(s.url + "/metrics", headers={"x-api-key": tokens.all}).text
    assert other.usage.cache_read_input_tokens == 0  # another tenant: no hit, from disk either
    assert warm.usage.cache_read_input_tokens == cached and warm.usage.cache_creation_input_tokens == 0
    steps = smollm.generate(smollm.encode_chat(messages).ids, SamplingParams(temperature=0, max_tokens=6))
    alone = "".join(step.text for step in steps).rstrip()
    assert warm.content[0].text == cold.content[0].text == other.content[0].text == alone
    assert f'kawai_kv_disk_hit_tokens_total{{model="{smollm.id}"}} {cached}' in page
    assert "# TYPE kawai_kv_disk_read_bytes_total counter" in page


def test_kawai_cache_lists_and_clears_the_disk_tier(tiny_llm, tmp_path, monkeypatch, capsys):
    from kawai.api.cli import main

    monkeypatch.setenv("KAWAI_HOME", str(tmp_path))
    write_prompt(tiny_llm, tmp_path / "kv")
    assert main(["cache"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["MODEL", "BLOCKS", "SIZE", "TENANTS", "LAST", "USED"]
    assert out[1].split()[1] == "5" and " t " in out[1]  # five blocks of tenant "t"
    assert main(["cache", "clear", "-m", "0" * 64]) == 0
    assert capsys.readouterr().out.startswith("removed 5 block files")
    assert main(["cache"]) == 0 and capsys.readouterr().out.startswith("no cached prompt blocks")
    assert main(["cache", "clear", "-m", "no-such-model"]) == 1


def test_a_next_turn_held_in_memory_reads_nothing_from_disk(tiny_llm, tmp_path):
    """The conversation is in memory and its first prompt's blocks are on disk: the next turn takes the
    conversation from memory and reads no file (the disk offers nothing beyond it)."""
    pool = disk_pool(tiny_llm, tmp_path)
    run(tiny_llm, pool, acquire_waiting(pool, "t", PROMPT))
    t0 = time.monotonic()
    while pool.disk.stats().written_blocks < 5:
        assert time.monotonic() - t0 < 30
        time.sleep(0.01)
    lease = acquire_waiting(pool, "t", PROMPT + [7] * 30)
    assert lease.reused == len(PROMPT) and lease.disk_tokens == 0 and pool.disk.stats().read_blocks == 0
    pool.close(10)
