"""The forward pass against transformers (float32, same GGUF, weights dequantized by gguf-py).

(a) tiny random qwen2 / qwen3 / llama models, float and quantized storage: exact mode within a few
    float32 roundings, fast kernels within a KL and top-1 agreement close to the measured ones;
(c) decoding token by token with the cache equals a full recompute bit for bit, and a truncated cache is
    reusable (also bit for bit);
    plus config / weights / input errors (tests/engine/test_model_real.py holds the real-model comparisons).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kawai.engine.config import ModelConfig
from kawai.engine.errors import ContextLengthError, KawaiError
from kawai.engine.gguf import open_gguf
from kawai.engine.kv_cache import KVCache
from kawai.engine.scheduler import CHUNK
from one_sequence import forward
from kawai.engine.weights import load_weights
from tiny_models import N_VOCAB, load_hf_model, write_tiny_model

ARCHS = ["qwen2", "qwen3", "llama"]
K_QUANT_DIMS = dict(d_model=256, d_ff=512)  # K-quant rows hold 256-weight super-blocks
STORAGES = {
    "f32": {},
    "f16": {},
    "q8_0": {},
    "q4_1": {},
    "mixed": K_QUANT_DIMS,  # Q4_K, Q5_0, Q5_K, Q6_K, Q8_0 together
}


@pytest.fixture(scope="module", autouse=True)
def torch_single_thread():
    """torch's thread pool next to Numba's only slows both down on a small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(arch, qtype, **kw) -> path, each model written once per module."""
    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def make(arch: str, qtype: str = "f32", **kw) -> object:
        key = (arch, qtype, tuple(sorted(kw.items())))
        if key not in made:
            name = f"{arch}-{qtype}-{len(made)}.gguf"
            made[key] = write_tiny_model(root / name, arch, qtype=qtype, **(STORAGES.get(qtype, {}) | kw))
        return made[key]

    return make


def load(path, exact: bool):
    gguf = open_gguf(path)
    cfg = ModelConfig.from_gguf(gguf)
    return cfg, load_weights(gguf, cfg, exact=exact)


def run(path, tokens, exact: bool) -> np.ndarray:
    cfg, weights = load(path, exact)
    cache = KVCache(cfg, len(tokens), "f32" if exact else "f16")  # exact mode: float32 throughout
    return forward(cfg, weights, tokens, cache, all_logits=True)


def reference(path, tokens) -> np.ndarray:
    with torch.no_grad():
        return load_hf_model(path)(torch.tensor(tokens[None])).logits[0].numpy()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_kl(ref: np.ndarray, ours: np.ndarray) -> float:
    """Mean over positions of KL(ref || ours)."""
    lr, lo = log_softmax(ref), log_softmax(ours)
    return float((np.exp(lr) * (lr - lo)).sum(-1).mean())


# A prompt longer than one CHUNK, so the chunk boundary is crossed.
TOKENS = np.random.default_rng(1).integers(0, N_VOCAB, max(CHUNK, 256) + 44)  # 300 tokens, as before

# Bounds, about twice the measured error (tests/engine/test_model.py on this machine, numpy 2.4, torch 2.13 CPU).
# Exact mode, max |logit diff| vs transformers: 2.6e-6..4.3e-6 (qwen2), 8.5e-6..1.9e-5 (qwen3, llama:
# larger logits, max |logit| 10-21); linear RoPE scaling 2.5e-6 (qwen2), 8.3e-6 (llama).
EXACT_ATOL = 4e-5
# Fast kernels (int8 activations per 32, q/k/v at ~15 bits, top logits recomputed exactly), mean KL and
# top-1 agreement over the 300 positions. Measured per arch over q8_0 / q4_1 / mixed:
#   qwen2 KL 6.2e-5..6.6e-5, top-1 0.970..0.977;  qwen3 KL 4.8e-4..5.8e-4, top-1 0.973..0.993;
#   llama KL 4.7e-4..5.4e-4, top-1 0.977..0.993.
FAST_MAX_KL = {"qwen2": 1.3e-4, "qwen3": 1.1e-3, "llama": 1.1e-3}
FAST_MIN_TOP1 = 0.96  # 12 flips of 300; measured at most 9


# --- (a) tiny models vs transformers ------------------------------------------------------------------


@pytest.mark.parametrize("qtype", list(STORAGES))
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_matches_transformers(tiny, arch, qtype):
    path = tiny(arch, qtype)
    ref = reference(path, TOKENS)
    exact = run(path, TOKENS, exact=True)
    assert np.abs(exact - ref).max() < EXACT_ATOL
    if qtype in ("f32", "f16"):
        return  # float weights: the fast path is the exact path
    # Fast kernels quantize activations to int8 per 32: close, not equal.
    fast = run(path, TOKENS, exact=False)
    assert mean_kl(ref, fast) < FAST_MAX_KL[arch]
    assert (fast.argmax(-1) == ref.argmax(-1)).mean() >= FAST_MIN_TOP1


def test_config_flags_follow_the_architecture(tiny):
    qwen2 = ModelConfig.from_gguf(open_gguf(tiny("qwen2")))
    qwen3 = ModelConfig.from_gguf(open_gguf(tiny("qwen3")))
    llama = ModelConfig.from_gguf(open_gguf(tiny("llama")))
    assert (qwen2.qkv_bias, qwen2.qk_norm, qwen2.tied_output, qwen2.rope_style) == (True, False, False, "neox")
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.tied_output, qwen3.rope_style) == (False, True, True, "neox")
    assert (llama.qkv_bias, llama.qk_norm, llama.tied_output, llama.rope_style) == (False, False, True, "normal")
    assert qwen3.head_dim == 32 and qwen3.q_dim == 128 != qwen3.d_model  # from qwen3.attention.key_length
    assert (llama.n_heads, llama.n_kv_heads, llama.group_size, llama.n_vocab) == (4, 2, 2, N_VOCAB)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_linear_rope_scaling_matches_transformers(tiny, arch):
    path = tiny(arch, rope_scaling_factor=4.0)
    cfg = ModelConfig.from_gguf(open_gguf(path))
    assert (cfg.rope_scaling, cfg.rope_scaling_factor) == ("linear", 4.0)
    tokens = TOKENS[:100]
    assert np.abs(run(path, tokens, exact=True) - reference(path, tokens)).max() < EXACT_ATOL


def test_llama3_rope_freqs_divide_the_frequencies(tiny):
    """rope_freqs.weight of 4 everywhere is the same as linear scaling by 4 (llama.cpp divides theta)."""
    head_dim = 16
    with_freqs = run(tiny("llama", rope_freqs=(4.0,) * (head_dim // 2)), TOKENS[:64], exact=True)
    scaled = run(tiny("llama", rope_scaling_factor=4.0), TOKENS[:64], exact=True)
    plain = run(tiny("llama"), TOKENS[:64], exact=True)
    np.testing.assert_array_equal(with_freqs, scaled)  # the same float32 frequencies either way
    assert np.abs(with_freqs - plain).max() > 0.1


# --- (c) the cache --------------------------------------------------------------------------------


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_equals_full_recompute(tiny, arch, exact):
    cfg, weights = load(tiny(arch, "q8_0"), exact)
    tokens = TOKENS[:40]
    full = forward(cfg, weights, tokens, KVCache(cfg, 64), all_logits=True)  # (40, V)

    cache = KVCache(cfg, 64)
    steps = [forward(cfg, weights, tokens[:25], cache)]  # prefill 25, then decode one at a time
    steps += [forward(cfg, weights, tokens[i : i + 1], cache) for i in range(25, 40)]
    assert cache.length == 40
    assert all(s.shape == (1, cfg.n_vocab) for s in steps)
    # Bit for bit: a row's arithmetic does not depend on how many rows share the call (measured: 0.0).
    np.testing.assert_array_equal(np.concatenate(steps), full[24:])


def test_truncated_cache_reuses_the_prefix(tiny):
    cfg, weights = load(tiny("qwen2"), exact=True)
    a, b = TOKENS[:30], TOKENS[100:120]
    cache = KVCache(cfg, 64)
    forward(cfg, weights, a, cache)
    forward(cfg, weights, TOKENS[200:230], cache)  # a different continuation, then thrown away
    cache.truncate(len(a))
    reused = forward(cfg, weights, b, cache, all_logits=True)
    fresh = forward(cfg, weights, np.concatenate([a, b]), KVCache(cfg, 64), all_logits=True)[len(a) :]
    np.testing.assert_array_equal(reused, fresh)
    assert cache.length == 50
    with pytest.raises(KawaiError):
        cache.truncate(51)


@pytest.mark.parametrize("dtype, itemsize", [("f16", 2), ("f32", 4)])
def test_kv_cache_layout_and_size(tiny, dtype, itemsize):
    cfg = ModelConfig.from_gguf(open_gguf(tiny("qwen3")))
    cache = KVCache(cfg, 100, dtype)
    assert cache.k.shape == (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 100)
    assert cache.v.shape == (cfg.n_layers, cfg.n_kv_heads, 100, cfg.head_dim)
    assert cache.k.dtype == cache.v.dtype == np.dtype(f"float{8 * itemsize}")
    assert cache.nbytes == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 100 * itemsize
    assert cache.nbytes == KVCache.bytes_for(cfg, 100, dtype)
    assert (cache.length, cache.free) == (0, 100)
    with pytest.raises(KawaiError):
        KVCache(cfg, 0, dtype)


def test_kv_cache_stores_rounded_to_its_dtype(tiny):
    cfg = ModelConfig.from_gguf(open_gguf(tiny("qwen2")))
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, cfg.n_kv_heads, cfg.head_dim)).astype(np.float32) * 100
    v = rng.standard_normal((3, cfg.n_kv_heads, cfg.head_dim)).astype(np.float32)
    for dtype, rounded in (("f16", np.float16), ("f32", np.float32)):
        cache = KVCache(cfg, 10, dtype)
        cache.store(1, 4, k, v)  # positions 4, 5, 6 of layer 1
        np.testing.assert_array_equal(cache.k[1, :, :, 4:7], k.astype(rounded).transpose(1, 2, 0))
        np.testing.assert_array_equal(cache.v[1, :, 4:7], v.astype(rounded).transpose(1, 0, 2))
        assert not cache.k[0].any() and not cache.v[1, :, :4].any()
    with pytest.raises(KawaiError, match="f16, f32"):
        KVCache(cfg, 10, "bf16")


def test_float16_cache_barely_moves_the_logits(tiny):
    """The same forward pass over a float16 and a float32 cache: logits within a few 1e-3."""
    cfg, weights = load(tiny("qwen2", "q8_0"), exact=True)
    tokens = TOKENS[:48]
    f32 = forward(cfg, weights, tokens, KVCache(cfg, 48, "f32"), all_logits=True)
    f16 = forward(cfg, weights, tokens, KVCache(cfg, 48, "f16"), all_logits=True)
    diff = np.abs(f16 - f32).max()
    print(f"max |logit diff| f16 vs f32 cache: {diff:.2e}")
    assert 0 < diff < 5e-3


# --- bad input: one clear error -------------------------------------------------------------------


def test_bad_tokens_and_full_context_are_clear_errors(tiny):
    cfg, weights = load(tiny("llama"), exact=False)
    cache = KVCache(cfg, 8)
    for bad in ([-1], [N_VOCAB], [], [[1, 2]], [0.5]):
        with pytest.raises(KawaiError):
            forward(cfg, weights, np.array(bad), cache)
    forward(cfg, weights, np.arange(6), cache)
    with pytest.raises(ContextLengthError):
        forward(cfg, weights, np.arange(3), cache)
    assert cache.length == 6  # a refused call leaves the cache as it was


def _rewrite(src, dst, *, drop_key=None, set_kv=None, drop_tensor=None):
    """Copy a GGUF with one metadata key dropped or set, or one tensor dropped (gguf-py as the writer)."""
    from gguf import GGUFReader, GGUFWriter
    from gguf.constants import GGUFValueType

    set_kv = dict(set_kv or {})
    reader = GGUFReader(src)
    arch = set_kv.pop("general.architecture", reader.fields["general.architecture"].contents())
    writer = GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", drop_key) or name in set_kv:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub_type)
    for name, value in set_kv.items():
        if isinstance(value, str):
            writer.add_string(name, value)
        elif isinstance(value, int):
            writer.add_uint32(name, value)
        else:
            writer.add_float32(name, value)
    for t in reader.tensors:
        if t.name != drop_tensor:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(set_kv={"general.architecture": "mamba"}), "'mamba' is not supported"),
        (dict(drop_key="qwen2.block_count"), "'qwen2.block_count' is missing"),
        (dict(drop_key="qwen2.attention.layer_norm_rms_epsilon"), "layer_norm_rms_epsilon' is missing"),
        (dict(set_kv={"qwen2.attention.head_count_kv": 3}), "not a multiple"),
        (dict(set_kv={"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0}), "'yarn' is not"),
        (dict(set_kv={"qwen2.block_count": "two"}), "'qwen2.block_count' must be an integer"),
        (dict(set_kv={"qwen2.block_count": 3}), "'blk.2.attn_norm.weight' is missing"),
        (dict(drop_tensor="blk.1.ffn_up.weight"), "'blk.1.ffn_up.weight' is missing"),
        (dict(drop_tensor="blk.0.attn_k.bias"), "'blk.0.attn_k.bias' is missing"),
        (dict(set_kv={"qwen2.feed_forward_length": 96}), "'blk.0.ffn_gate.weight' has shape"),
    ],
)
def test_bad_model_files_are_clear_errors(tiny, tmp_path, change, message):
    path = _rewrite(tiny("qwen2"), tmp_path / "bad.gguf", **change)
    with pytest.raises(KawaiError, match=message):
        gguf = open_gguf(path)
        load_weights(gguf, ModelConfig.from_gguf(gguf))
