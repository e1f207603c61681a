"""Sampling: parameter validation, greedy, seeds, temperature, top-k / top-p support sets.

The oracle for support sets and probabilities is a plain float64 full sort + softmax written here.
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kawai.engine.errors import KawaiError
from kawai.engine.sampling import Sampler, SamplingParams, SamplingParamsError

QWEN_VOCAB = 151936


def oracle_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def oracle_support(logits: np.ndarray, temperature=1.0, top_k=0, top_p=1.0) -> set[int]:
    probs = oracle_probs(logits, temperature)
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    if 0 < top_k < len(order):
        order = order[:top_k]
    kept = probs[order] / probs[order].sum()
    if top_p < 1.0:
        n = int(np.searchsorted(np.cumsum(kept), top_p, side="left")) + 1
        order = order[: min(n, len(order))]
    return set(order)


# ---- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": "1"},
        {"temperature": True},
        {"top_k": -1},
        {"top_k": 1.5},
        {"top_k": True},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"top_p": float("nan")},
        {"seed": -1},
        {"seed": 1 << 64},
        {"seed": 1.0},
        {"max_tokens": -1},
        {"max_tokens": 2.0},
        {"stop": "abc"},
        {"stop": ("",)},
        {"stop": (1,)},
        {"stop": ("x" * 5000,)},
        {"stop": tuple(str(i) for i in range(1000))},
    ],
)
def test_bad_params_raise_one_clear_error(kwargs):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert next(iter(kwargs)) in str(e.value)
    assert isinstance(e.value, KawaiError) and isinstance(e.value, ValueError)


def test_params_are_normalised_and_frozen():
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), stop=["a", "b"], seed=np.uint64(7))
    assert p.stop == ("a", "b") and type(p.top_k) is int and type(p.seed) is int
    assert p.temperature == 0.5 and type(p.temperature) is float
    with pytest.raises(AttributeError):
        p.temperature = 1.0
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.01).greedy


# ---- greedy -------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-50, 50, width=32), min_size=1, max_size=300), st.integers(0, 2**32))
def test_greedy_is_argmax(values, seed):
    logits = np.array(values, dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0, top_k=5, top_p=0.5, seed=seed))
    assert sampler.sample(logits) == int(np.argmax(logits))


def test_greedy_ties_go_to_lowest_id():
    logits = np.zeros(QWEN_VOCAB, dtype=np.float32)
    logits[[17, 5, 900]] = 3.0
    assert Sampler(SamplingParams(temperature=0)).sample(logits) == 5


# ---- seeds and the global generator -------------------------------------------------------------


def _draws(params: SamplingParams, logits: np.ndarray, n: int) -> list[int]:
    sampler = Sampler(params)
    return [sampler.sample(logits) for _ in range(n)]


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = np.random.default_rng(1).standard_normal(QWEN_VOCAB).astype(np.float32)
    a = _draws(SamplingParams(seed=42), logits, 50)
    b = _draws(SamplingParams(seed=42), logits, 50)
    c = _draws(SamplingParams(seed=43), logits, 50)
    assert a == b and a != c
    a = _draws(SamplingParams(seed=42, top_k=50, top_p=0.9, temperature=0.7), logits, 50)
    b = _draws(SamplingParams(seed=42, top_k=50, top_p=0.9, temperature=0.7), logits, 50)
    assert a == b


def test_sampler_never_touches_the_global_generator():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    _draws(SamplingParams(seed=1), np.arange(100, dtype=np.float32) / 10, 20)
    _draws(SamplingParams(), np.arange(100, dtype=np.float32) / 10, 20)
    assert np.array_equal(np.random.get_state()[1], before)


# ---- support sets -------------------------------------------------------------------------------


def _ambiguous(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rel: float = 1e-5) -> bool:
    """True when float32 rounding could decide the support: a near-tie at the top-k or top-p cut, or a
    cumulative mass within `rel` of top_p. (The sampler exponentiates in float32; the oracle in float64.)"""
    probs = np.sort(oracle_probs(logits, temperature))[::-1]
    if 0 < top_k < len(probs):
        if probs[top_k - 1] - probs[top_k] <= rel * probs[top_k - 1]:
            return True
        probs = probs[:top_k]
    probs = probs / probs.sum()
    if top_p < 1.0:
        cdf = np.cumsum(probs)
        if np.any(np.abs(cdf - top_p) <= rel):
            return True
        n = int(np.searchsorted(cdf, top_p, side="left")) + 1
        if n < len(probs) and probs[n - 1] - probs[n] <= rel * probs[n - 1]:
            return True
    return False


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-20, 20, width=32), min_size=2, max_size=400),
    st.floats(0.05, 2.0),
    st.integers(0, 450),
    st.floats(0.01, 1.0),
)
def test_candidates_match_full_sort_oracle(values, temperature, top_k, top_p):
    logits = np.array(values, dtype=np.float32)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    ids, probs = Sampler(params).candidates(logits)
    assert np.all(np.diff(ids) > 0) and abs(probs.sum() - 1.0) < 1e-9 and np.all(probs >= 0)
    assume(not _ambiguous(logits, temperature, top_k, top_p))  # skip what rounding decides; never loosen
    assert set(ids.tolist()) == oracle_support(logits, temperature, top_k, top_p)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-20, 20, width=32), min_size=1, max_size=400), st.floats(0.05, 2.0), st.integers(1, 450))
def test_top_k_keeps_exactly_k_of_the_most_likely(values, temperature, top_k):
    """Ties included: exactly min(k, V) tokens, none less likely than a dropped one (up to the float32
    rounding of logits / temperature, which can tie two neighbours)."""
    logits = np.array(values, dtype=np.float32)
    ids, _ = Sampler(SamplingParams(temperature=temperature, top_k=top_k)).candidates(logits)
    assert len(ids) == min(top_k, len(logits))
    dropped = np.setdiff1d(np.arange(len(logits)), ids)
    if dropped.size:
        oracle = oracle_probs(logits, temperature)
        assert oracle[ids].min() >= oracle[dropped].max() * (1 - 1e-6)


def test_top_k_support_and_draws_on_a_full_vocab():
    logits = np.random.default_rng(2).standard_normal(QWEN_VOCAB).astype(np.float32)
    top = set(np.argsort(-logits)[:40].tolist())
    sampler = Sampler(SamplingParams(top_k=40, seed=3))
    assert set(sampler.candidates(logits)[0].tolist()) == top
    assert {sampler.sample(logits) for _ in range(300)} <= top


def test_top_p_wide_support_grows_past_the_first_window():
    # A flat distribution: 0.9 of the mass needs ~0.9 * V tokens, far beyond the first window.
    logits = np.random.default_rng(4).uniform(0, 0.01, 5000).astype(np.float32)
    ids, _ = Sampler(SamplingParams(top_p=0.9)).candidates(logits)
    expected = oracle_support(logits, top_p=0.9)
    assert len(ids) == 4498 and set(ids.tolist()) == expected  # far past the first window of 64


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(SamplingParams(top_p=0.6))
    ids, probs = sampler.candidates(logits)
    assert ids.tolist() == [0, 1] and np.allclose(probs, [0.625, 0.375])
    assert Sampler(SamplingParams(top_p=0.5)).candidates(logits)[0].tolist() == [0]


# ---- temperature and the distribution drawn -----------------------------------------------------


@pytest.mark.parametrize("temperature", [0.25, 1.0, 2.0])
def test_probabilities_are_softmax_of_logits_over_temperature(temperature):
    logits = np.random.default_rng(5).standard_normal(1000).astype(np.float32) * 4
    ids, probs = Sampler(SamplingParams(temperature=temperature)).candidates(logits)
    assert ids.tolist() == list(range(1000))
    np.testing.assert_allclose(probs, oracle_probs(logits, temperature), rtol=2e-5, atol=1e-12)


@pytest.mark.parametrize("temperature", [1e-30, 4.868e-221, 5e-324])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_vanishing_temperature_samples_the_argmax(temperature, top_p):
    """1 / temperature overflows float32 (schemathesis sent 4.9e-221): the weights must not become
    inf - inf = NaN; the distribution is the argmax."""
    logits = np.random.default_rng(8).standard_normal(1000).astype(np.float32) * 30
    logits[::3] = -np.inf  # masked tokens stay impossible
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=0)
    assert set(_draws(params, logits, 5)) == {int(np.argmax(logits))}
    ids, probs = Sampler(params).candidates(logits)
    assert np.isfinite(probs).all() and ids[np.argmax(probs)] == int(np.argmax(logits))


def test_lower_temperature_is_sharper():
    logits = np.random.default_rng(6).standard_normal(1000).astype(np.float32) * 2

    def entropy(t):
        p = Sampler(SamplingParams(temperature=t)).candidates(logits)[1]
        return float(-(p * np.log(np.maximum(p, 1e-300))).sum())

    assert entropy(0.1) < entropy(0.5) < entropy(1.0) < entropy(2.0)
    low = _draws(SamplingParams(temperature=1e-3, seed=0), logits, 30)
    assert set(low) == {int(np.argmax(logits))}


def test_empirical_frequencies_follow_the_distribution():
    probs = np.array([0.5, 0.25, 0.15, 0.1])
    n = 20000
    draws = _draws(SamplingParams(seed=7), np.log(probs).astype(np.float32), n)
    freq = np.bincount(draws, minlength=4) / n
    # 5 standard deviations of a binomial proportion.
    assert np.all(np.abs(freq - probs) < 5 * np.sqrt(probs * (1 - probs) / n))


# ---- bad logits -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_logits_are_a_clear_error(bad):
    logits = np.zeros(10, dtype=np.float32)
    logits[3] = bad
    for params in (SamplingParams(temperature=0), SamplingParams()):
        with pytest.raises(KawaiError, match="non-finite"):
            Sampler(params).sample(logits)
