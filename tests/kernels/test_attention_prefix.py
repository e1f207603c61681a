"""kernels/attention.py: attention over a shared prefix (another cache's first P positions, read in place)
plus the sequence's own cache equals attention over one cache holding both, against the NumPy definition."""

from __future__ import annotations

import numpy as np
import pytest

from kawai.kernels import attention as A


def randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _layout(k_all, v_all, max_seq, dtype, fill=0.0):
    """k_all, v_all (L, Hkv, hd) -> the cache layout k (Hkv, hd, S), v (Hkv, S, hd); unused slots = fill."""
    length, kv_heads, hd = k_all.shape
    k_cache = np.full((kv_heads, hd, max_seq), fill, dtype)
    v_cache = np.full((kv_heads, max_seq, hd), fill, dtype)
    k_cache[:, :, :length] = k_all.transpose(1, 2, 0)
    v_cache[:, :length] = v_all.transpose(1, 0, 2)
    return k_cache, v_cache


CASES = [  # n new rows, p shared positions, own positions before the rows, heads, kv_heads, hd
    (1, 64, 0, 14, 2, 64),  # decode right after a shared block
    (1, 300, 41, 9, 3, 64),  # decode, prefix and own part both over several tiles
    (7, 128, 0, 4, 2, 32),  # prefill of the rest of a prompt after its shared blocks
    (40, 64, 23, 6, 2, 32),  # prefill across a tile edge of the own cache
    (20, 5, 3, 8, 1, 128),  # a prefix shorter than a tile, one KV head for all
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("n, p, own, heads, kv_heads, hd", CASES)
def test_attention_with_a_shared_prefix_equals_one_cache_holding_both(n, p, own, heads, kv_heads, hd, dtype):
    """Row i (position p + own + i) sees every prefix position and its own cache causally. The prefix's
    cache holds garbage past p (its owner's later positions): none of it is read."""
    rng = np.random.default_rng(n * 100 + p + own)
    total = p + own + n
    k_all, v_all = randn(rng, total, kv_heads, hd, scale=2.0), randn(rng, total, kv_heads, hd)
    q = randn(rng, n, heads, hd, scale=2.0)
    k_pre, v_pre = _layout(k_all[:p], v_all[:p], p + 50, dtype, fill=np.nan)
    k_own, v_own = _layout(k_all[p:], v_all[p:], own + n + 9, dtype)
    k_one, v_one = _layout(k_all, v_all, total, dtype)  # the same keys and values, as stored, in one cache
    expected = A.attention_reference(q, k_one.transpose(2, 0, 1), v_one.transpose(1, 0, 2), p + own, hd**-0.5)
    for splits in (None, 1, 3):
        out = np.empty_like(q)
        A.attention(q, k_own, v_own, own, np.float32(hd**-0.5), out, splits=splits, prefix=(k_pre, v_pre, p))
        np.testing.assert_allclose(out, expected, rtol=0, atol=5e-6, err_msg=f"splits={splits}")


def test_an_empty_prefix_is_the_plain_call_bit_for_bit():
    rng = np.random.default_rng(2)
    q = randn(rng, 3, 4, 32)
    k_cache, v_cache = _layout(randn(rng, 50, 2, 32), randn(rng, 50, 2, 32), 60, np.float16)
    plain, empty = np.empty_like(q), np.empty_like(q)
    A.attention(q, k_cache, v_cache, 47, np.float32(0.2), plain)
    A.attention(q, k_cache, v_cache, 47, np.float32(0.2), empty, prefix=(k_cache, v_cache, 0))
    np.testing.assert_array_equal(plain, empty)


def test_attention_with_a_prefix_runs_without_jit(tmp_path):
    """As plain Python (NUMBA_DISABLE_JIT=1) too, agreeing with the compiled kernel."""
    from python_runner import run_python

    script = """
import sys
import numpy as np
from kawai.kernels import attention as A
rng = np.random.default_rng(0)
q = rng.standard_normal((3, 4, 8)).astype(np.float32)
kp, vp = rng.standard_normal((2, 8, 70)).astype(np.float16), rng.standard_normal((2, 70, 8)).astype(np.float16)
kc, vc = rng.standard_normal((2, 8, 20)).astype(np.float16), rng.standard_normal((2, 20, 8)).astype(np.float16)
out = np.empty_like(q)
A.attention(q, kc, vc, 10, np.float32(0.3), out, splits=2, prefix=(kp, vp, 66))
np.save(sys.argv[1], out)
"""
    results = []
    for jit in (False, True):
        target = tmp_path / f"jit_{jit}.npy"
        run_python(script, str(target), jit=jit)
        results.append(np.load(target))
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-6)
