"""KVCache token bookkeeping: the cache owns the ids of the positions it holds (length == len(tokens)),
appended by the forward pass, cut by truncate, copied with copy_prefix, loaded with load."""

from __future__ import annotations

import numpy as np
import pytest

from kawai import engine
from kawai.engine.errors import ContextLengthError, KawaiError
from kawai.engine.model import Chunk, forward
from tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return engine.load(write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", n_ctx=64), threads=1)


def test_the_forward_pass_records_the_ids_it_stores(llm):
    a, b = llm.new_cache(16), llm.new_cache(16)
    assert a.tokens == [] and a.length == 0 and a.free == 16
    forward(llm.config, llm.weights, [Chunk(np.array([5, 6, 7])), Chunk(np.array([9]))], [a, b])
    forward(llm.config, llm.weights, [Chunk(np.array([8]))], [a])
    assert a.tokens == [5, 6, 7, 8] and a.length == 4 and b.tokens == [9] and b.length == 1
    assert all(type(t) is int for t in a.tokens)


def test_a_refused_step_records_nothing(llm):
    a, b = llm.new_cache(4), llm.new_cache(4)
    forward(llm.config, llm.weights, [Chunk(np.array([1, 2]))], [a])
    with pytest.raises(ContextLengthError):  # b's chunk does not fit: neither cache changes
        forward(llm.config, llm.weights, [Chunk(np.array([3])), Chunk(np.array([1] * 5))], [a, b])
    with pytest.raises(KawaiError, match="token ids"):
        forward(llm.config, llm.weights, [Chunk(np.array([3])), Chunk(np.array([10**6]))], [a, b])
    assert a.tokens == [1, 2] and b.tokens == []


def test_truncate_copy_prefix_and_load_keep_ids_with_positions(llm):
    src = llm.new_cache(16)
    llm.forward([3, 4, 5, 6, 7], src)
    dst = llm.new_cache(16)
    dst.copy_prefix(src, 3)
    assert dst.tokens == [3, 4, 5] and dst.length == 3
    k, v = src.positions(0, 3)
    dk, dv = dst.positions(0, 3)
    assert np.array_equal(k, dk) and np.array_equal(v, dv)
    # the copy continues exactly like the original
    assert np.array_equal(llm.forward([6, 7], dst), llm.forward([6, 7], _prefilled(llm, [3, 4, 5])))
    src.truncate(2)
    assert src.tokens == [3, 4] and src.length == 2
    with pytest.raises(KawaiError):
        src.truncate(3)
    loaded = llm.new_cache(16)
    k, v = dst.positions(0, 4)
    loaded.load(np.ascontiguousarray(k), np.ascontiguousarray(v), [3, 4, 5, 6])
    assert loaded.tokens == [3, 4, 5, 6] and loaded.length == 4
    with pytest.raises(KawaiError):
        dst.copy_prefix(src, 5)  # src holds 2


def _prefilled(llm, ids):
    cache = llm.new_cache(16)
    llm.forward(ids, cache)
    return cache


def test_a_cache_reading_a_shared_prefix_in_place(llm):
    """copy_prefix(src, n, share): the first `share` positions are read from src's arrays (no copy), the
    rest copied; positions joins both; the shared positions are read-only; the forward pass continues it
    like a cache holding everything; a cache sharing from a reader shares from the reader's source."""
    src = _prefilled(llm, [3, 4, 5, 6, 7, 8])
    dst = llm.new_cache(16)
    dst.copy_prefix(src, 5, share=4)
    assert dst.shared is src and dst.base == 4 and dst.tokens == [3, 4, 5, 6, 7]
    for a, b in zip(dst.positions(0, 5), src.positions(0, 5)):
        assert np.array_equal(a, b)
    assert not np.shares_memory(dst.k, src.k) and not dst.k[:, :, :, 1:].any()  # only position 4 is its own
    row = np.zeros((1, llm.config.n_kv_heads, llm.config.head_dim), np.float32)  # (1, Hkv, hd)
    with pytest.raises(KawaiError, match="read-only"):
        dst.store(0, 3, row, row)
    want = llm.forward([9, 10], _prefilled(llm, [3, 4, 5, 6, 7]))
    np.testing.assert_allclose(llm.forward([9, 10], dst), want, rtol=0, atol=1e-5 * np.abs(want).max())
    third = llm.new_cache(16)
    third.copy_prefix(dst, 7, share=6)  # dst shares 4 positions: third shares those from src, copies 3
    assert third.shared is src and third.base == 4
    for a, b in zip(third.positions(0, 7), dst.positions(0, 7)):
        assert np.array_equal(a, b)
    third.truncate(2)  # cut inside the shared prefix: reads 2 positions, owns none
    assert third.base == 2 and third.shared is src and third.length == 2
    third.truncate(0)
    assert third.shared is None and third.base == 0
