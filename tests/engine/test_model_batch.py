"""engine.model.forward over several sequences (a batch of prompt chunks and decode tokens), bit for bit
against one-at-a-time calls."""

from __future__ import annotations

import numpy as np
import pytest

from kawai import engine
from batch_models import K_QUANT_DIMS, tiny_llm  # noqa: F401 (tiny_llm: fixture)
from kawai.engine.model import Chunk, forward
from kawai.engine.errors import KawaiError
from tiny_models import write_tiny_model


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


def test_decode_rows_and_prompt_rows_keep_their_kernels_in_any_order(tmp_path):
    """Decode steps (prompt=False) listed before, between and after prompt chunks: forward stacks the
    prompt rows first (on AMX CPUs they take the tile kernels, decode rows the vector ones) and returns the
    logits in the callers' order, each bit for bit what the sequence gets alone."""
    llm = engine.load(write_tiny_model(tmp_path, "qwen2", qtype="mixed", n_ctx=128, **K_QUANT_DIMS), threads=1)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, llm.config.n_vocab, n).tolist() for n in (40, 3, 33, 9)]
    nexts = [int(t) for t in rng.integers(0, llm.config.n_vocab, 4)]
    alone = []
    for p, t in zip(prompts, nexts):  # each alone: its prompt, then a decode step
        cache = llm.new_cache()
        llm.forward(p, cache)
        alone.append(llm.forward_batch([Chunk(np.array([t]), prompt=False)], [cache])[0][-1])
    caches = [llm.new_cache() for _ in prompts]
    for b in (1, 3):  # sequences 1 and 3 are decoding, 0 and 2 still prefilling
        llm.forward(prompts[b], caches[b])
    chunks = [Chunk(np.array(prompts[0])), Chunk(np.array([nexts[1]]), prompt=False), Chunk(np.array(prompts[2])),
              Chunk(np.array([nexts[3]]), prompt=False)]
    got = forward(llm.config, llm.weights, chunks, caches)
    for b in (1, 3):
        assert np.array_equal(got[b][-1], alone[b])
    for b in (0, 2):
        assert np.array_equal(got[b][-1], llm.forward(prompts[b], llm.new_cache()))


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
