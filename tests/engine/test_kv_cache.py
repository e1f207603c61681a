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
