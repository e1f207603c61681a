"""KV memory follows the positions written: a cache's pages are committed only when written
(engine/kv_cache.py: lazy_zeros). Linux-only check through /proc/self/statm (resident pages)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kawai.engine.kv_cache import KVCache

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def test_a_long_context_cache_takes_memory_only_for_the_positions_written():
    cfg = SimpleNamespace(n_layers=24, n_kv_heads=2, head_dim=64)  # Qwen2.5-0.5B: 24 KiB per position in float32
    before = resident_mib()
    cache = KVCache(cfg, 32768, dtype="f32")  # 768 MiB of address space
    assert cache.nbytes == 768 * 2**20 and resident_mib() - before < 8
    k, v = cache.positions(0, 1024)
    k[...], v[...] = 1.0, 2.0  # 24 MiB of keys and values
    grown = resident_mib() - before
    assert 20 < grown < 64, grown  # 2 MiB huge pages would commit whole rows of positions: ~570 MiB
    assert not cache.k[0, 0, 0, 1024:].any() and cache.k.flags.writeable and cache.k.flags.c_contiguous
    del cache, k, v
    assert resident_mib() - before < 8  # unmapped with the arrays
