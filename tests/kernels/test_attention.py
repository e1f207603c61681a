"""kernels/attention.py: float16 widening against NumPy, the tiled kernel against the NumPy definition
(itself checked against torch's SDPA), over float32 and float16 caches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numba import njit

from kawai.kernels import attention as A
from kawai.kernels import isa
from python_runner import run_python


def randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---- float16 storage ------------------------------------------------------------------------------


@njit
def _widen_all(bits, out):
    for i in range(bits.shape[0]):
        out[i] = A.as_float32(bits[i])


@njit
def _widen_portable(bits, out):
    for i in range(bits.shape[0]):
        out[i] = A.f16_bits_to_f32(bits[i])


@pytest.mark.parametrize("widen", [_widen_all, _widen_portable], ids=["as_float32", "portable"])
def test_every_half_widens_exactly(widen):
    """All 65536 halves (subnormals, infinities, NaNs included), as NumPy converts them."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    expected = bits.view(np.float16).astype(np.float32)
    out = np.empty(bits.shape, np.float32)
    widen(bits, out)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.uint32), expected[~nan].view(np.uint32))  # -0.0 included


def test_kernel_view_passes_float32_and_reinterprets_float16():
    x = np.array([1.5, -2.0], np.float32)
    assert A.kernel_view(x) is x
    h = x.astype(np.float16)
    assert A.kernel_view(h).dtype == np.uint16 and np.shares_memory(A.kernel_view(h), h)


# ---- the definition -------------------------------------------------------------------------------


def test_reference_matches_torch_sdpa():
    rng = np.random.default_rng(0)
    n, start, heads, kv_heads, hd = 5, 7, 6, 2, 16
    q, k, v = randn(rng, n, heads, hd), randn(rng, start + n, kv_heads, hd), randn(rng, start + n, kv_heads, hd)
    qt = torch.from_numpy(q.astype(np.float64)).permute(1, 0, 2)  # (H, n, hd)
    kt = torch.from_numpy(k.astype(np.float64)).permute(1, 0, 2).repeat_interleave(heads // kv_heads, 0)
    vt = torch.from_numpy(v.astype(np.float64)).permute(1, 0, 2).repeat_interleave(heads // kv_heads, 0)
    mask = torch.arange(start + n)[None, :] <= (start + torch.arange(n))[:, None]  # (n, L)
    expected = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=0.3).permute(1, 0, 2).numpy()
    np.testing.assert_allclose(A.attention_reference(q, k, v, start, 0.3), expected, rtol=0, atol=1e-12)


# ---- the kernel -----------------------------------------------------------------------------------


def _cache(k_all, v_all, max_seq, dtype):
    """k_all, v_all (L, Hkv, hd) -> the cache layout: k (Hkv, hd, S), v (Hkv, S, hd) of `dtype`."""
    length, kv_heads, hd = k_all.shape
    k_cache = np.zeros((kv_heads, hd, max_seq), dtype)
    v_cache = np.zeros((kv_heads, max_seq, hd), dtype)
    k_cache[:, :, :length] = k_all.transpose(1, 2, 0)
    v_cache[:, :length] = v_all.transpose(1, 0, 2)
    return k_cache, v_cache


T, R = A.KV_TILE, A.Q_TILE
CASES = [  # n, start, heads, kv_heads, hd
    (1, 0, 4, 2, 32),  # the first token
    (1, 37, 14, 2, 64),  # decode, one partial tile
    (1, 2 * T + 44, 9, 3, 64),  # decode over several tiles, 3 query heads per KV head
    (1, 3 * T + 5, 14, 2, 128),  # decode, 7 query heads per KV head, wide heads
    (9, 0, 4, 4, 32),  # prefill, no grouping
    (40, T - 17, 6, 2, 32),  # prefill after a cached prefix, rows across a tile edge
    (2 * R + 1, 100, 9, 3, 64),  # three query tiles, the last one short
    (70, T + 2, 8, 1, 128),  # one KV head for all, wide heads
    (5, T + 20, 4, 2, 80),  # a head size that is not a multiple of the micro-kernel's columns
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("n, start, heads, kv_heads, hd", CASES)
def test_attention_matches_the_definition(n, start, heads, kv_heads, hd, dtype):
    """Causal GQA over a cache holding a prefix of `start` positions plus the n new ones. With a float16
    cache the definition gets the same rounded keys and values: the kernel's own error is as small."""
    rng = np.random.default_rng(n * 1000 + start)
    total = start + n
    k_all, v_all = randn(rng, total, kv_heads, hd, scale=2.0), randn(rng, total, kv_heads, hd)
    q = randn(rng, n, heads, hd, scale=2.0)
    k_cache, v_cache = _cache(k_all, v_all, total + 5, dtype)
    stored_k = k_cache[:, :, :total].transpose(2, 0, 1)  # (L, Hkv, hd) as stored
    stored_v = v_cache[:, :total].transpose(1, 0, 2)
    expected = A.attention_reference(q, stored_k, stored_v, start, hd**-0.5)
    for splits in (None, 1, 3):
        out = np.empty_like(q)
        A.attention(q, k_cache, v_cache, start, np.float32(hd**-0.5), out, splits=splits)
        np.testing.assert_allclose(out, expected, rtol=0, atol=5e-6, err_msg=f"splits={splits}")


def test_float16_cache_stays_close_to_float32():
    """The rounding of keys and values to 11 significant bits moves the output by ~1e-3 of its scale."""
    rng = np.random.default_rng(7)
    n, start, heads, kv_heads, hd = 4, 200, 8, 2, 64
    k_all, v_all = randn(rng, start + n, kv_heads, hd), randn(rng, start + n, kv_heads, hd)
    q = randn(rng, n, heads, hd, scale=3.0)
    outs = []
    for dtype in (np.float32, np.float16):
        out = np.empty_like(q)
        A.attention(q, *_cache(k_all, v_all, start + n, dtype), start, np.float32(hd**-0.5), out)
        outs.append(out)
    err = np.abs(outs[1] - outs[0]).max()
    assert 0 < err < 2e-3


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_attention_ignores_positions_past_the_query(dtype):
    """Garbage after the causal limit (e.g. a truncated cache's old tail) must not leak in, even inside
    the tile that holds the limit, whether the tile is widened or (6 query vectors: one micro-kernel
    block) read from the cache directly."""
    rng = np.random.default_rng(4)
    q = randn(rng, 3, 2, 16)
    capacity = A.KV_TILE + 100
    k_cache = randn(rng, 1, 16, capacity).astype(dtype)
    v_cache = randn(rng, 1, capacity, 16).astype(dtype)
    out_a, out_b = np.empty_like(q), np.empty_like(q)
    A.attention(q, k_cache, v_cache, 68, np.float32(0.25), out_a)  # rows see positions ..68, ..69, ..70
    k_cache[:, :, 71:90] = 6e4
    k_cache[:, :, 90:] = np.nan
    v_cache[:, 71:] = np.nan
    A.attention(q, k_cache, v_cache, 68, np.float32(0.25), out_b)
    np.testing.assert_array_equal(out_a, out_b)


def test_kv_splits_give_decode_work_to_every_thread():
    assert A.kv_splits(n=256, n_kv=2, length=12000, threads=2) == 1  # prefill: query tiles suffice
    assert A.kv_splits(n=1, n_kv=2, length=12000, threads=2) == 4  # decode: 8 jobs for 2 threads
    assert A.kv_splits(n=1, n_kv=2, length=100, threads=2) == 1  # too short to be worth splitting
    assert A.kv_splits(n=1, n_kv=2, length=12000, threads=1) == 1


def test_attention_runs_without_jit():
    """The kernel also runs as plain Python (NUMBA_DISABLE_JIT=1) and agrees with the compiled one."""
    script = """
import sys
import numpy as np
from kawai.kernels import attention as A
rng = np.random.default_rng(0)
q = rng.standard_normal((3, 4, 8)).astype(np.float32)
outs = []
for dtype in (np.float32, np.float16):
    kc = rng.standard_normal((2, 8, 80)).astype(dtype)
    vc = rng.standard_normal((2, 80, 8)).astype(dtype)
    out = np.empty_like(q)
    A.attention(q, kc, vc, 70, np.float32(0.3), out, splits=2)
    outs.append(out)
np.save(sys.argv[1], np.stack(outs))
"""
    import tempfile
    from pathlib import Path

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for jit in (False, True):
            target = Path(tmp) / f"jit_{jit}.npy"
            run_python(script, str(target), jit=jit)
            results.append(np.load(target))
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-6)


# ---- every instruction-set path -------------------------------------------------------------------

SCRIPT_PATH = """
import json
import numpy as np
from kawai.kernels import attention as A, isa

rng = np.random.default_rng(1)
errors = []
for n, start, heads, kv_heads, hd in [(1, 3 * A.KV_TILE + 5, 14, 2, 64), (1, 2 * A.KV_TILE, 6, 1, 128),
                                      (40, A.KV_TILE - 17, 6, 2, 32), (9, 150, 4, 2, 80)]:
    total = start + n
    k_all = (rng.standard_normal((total, kv_heads, hd)) * 2).astype(np.float32)
    v_all = rng.standard_normal((total, kv_heads, hd)).astype(np.float32)
    q = (rng.standard_normal((n, heads, hd)) * 2).astype(np.float32)
    for dtype in (np.float32, np.float16):
        k_cache = np.zeros((kv_heads, hd, total + 200), dtype)
        v_cache = np.zeros((kv_heads, total + 200, hd), dtype)
        k_cache[:, :, :total] = k_all.transpose(1, 2, 0)
        v_cache[:, :total] = v_all.transpose(1, 0, 2)
        expected = A.attention_reference(q, k_cache[:, :, :total].transpose(2, 0, 1),
                                         v_cache[:, :total].transpose(1, 0, 2), start, hd**-0.5)
        for splits in (1, 3):
            out = np.empty_like(q)
            A.attention(q, k_cache, v_cache, start, np.float32(hd**-0.5), out, splits=splits)
            errors.append(float(np.abs(out - expected).max()))
print(json.dumps({"isa": isa.ISA, "simd": A.SIMD, "rows": A.MR, "cols": A.NC, "errors": errors}))
"""


@pytest.mark.parametrize("path", isa.supported(isa.HOST_FEATURES))
def test_every_isa_path_matches_the_definition(path):
    """Each path this CPU allows (its own micro-kernel sizes, the portable loops without FMA) against the
    definition: decode over several tiles with 7 and 6 query heads per KV head, prefill across a tile edge,
    a head size that is not a multiple of the columns."""
    run = json.loads(run_python(SCRIPT_PATH, env={"KAWAI_ISA": path}).splitlines()[-1])
    assert run["isa"] == path and run["simd"] == (path != "portable")
    assert run["cols"] == (32 if path in ("amx", "avx512vnni", "avx512bw") else 16)
    assert max(run["errors"]) < 5e-6, run
