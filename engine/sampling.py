"""Per-request sampling: `SamplingParams` (frozen, validated) and `Sampler` (owns its random generator).

Letters: V = vocabulary size, C = number of candidate tokens kept by top-k / top-p.

Order of the filters (the Hugging Face order): logits / temperature -> top-k -> top-p over the
renormalised top-k distribution -> one draw. `temperature == 0` means greedy (argmax, ties to the lowest
id) and ignores the other filters and the seed. Nothing here touches NumPy's global random state.

With a grammar (engine/constraint.py), the filters and the draw run over the tokens it allows next and
nothing else (as if the others had logit -inf); the drawn token then advances the grammar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kawai.engine.constraint import Constraint, Grammar
from kawai.engine.errors import KawaiError

MAX_TEMPERATURE = 2.0
MAX_STOP_SEQUENCES = 64
MAX_STOP_CHARS = 1024
MAX_SEED = (1 << 64) - 1
FIRST_TOP_P_WINDOW = 64  # candidates examined first for top-p; grows x8 until the mass is reached
DRAW_BLOCK = 1024  # tokens per block in the two-level draw


class SamplingParamsError(KawaiError, ValueError):
    """A sampling parameter out of range; the message names the field."""


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, and when to stop (besides end-of-sequence and a full context).

    temperature: 0 = greedy, otherwise in (0, MAX_TEMPERATURE].
    top_k: keep the k most likely tokens; 0 = off.
    top_p: keep the smallest set of most likely tokens whose mass reaches p; 1.0 = off.
    seed: makes sampling reproducible; None = fresh OS entropy.
    max_tokens: most tokens to generate (>= 0; 0 = prefill the prompt into the cache, sample nothing).
    stop: strings that end generation; the matched one is not emitted.
    grammar: what the reply must match (engine.constraint.Grammar); None = anything.
    ignore_eos: an end-of-sequence token does not stop generation (benchmarks: exactly max_tokens).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    grammar: Grammar | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or not 0.0 <= t <= MAX_TEMPERATURE:
            raise SamplingParamsError(f"temperature must be a number in [0, {MAX_TEMPERATURE}], got {t!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise SamplingParamsError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        p = self.top_p
        if not _is_real(p) or not math.isfinite(p) or not 0.0 < p <= 1.0:
            raise SamplingParamsError(f"top_p must be a number in (0, 1], got {p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise SamplingParamsError(f"seed must be an integer in [0, 2^64), got {self.seed!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise SamplingParamsError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        stop = self.stop
        if isinstance(stop, str) or not isinstance(stop, (tuple, list)):
            raise SamplingParamsError("stop must be a list of strings")
        if len(stop) > MAX_STOP_SEQUENCES:
            raise SamplingParamsError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise SamplingParamsError(
                    f"each stop sequence must be a non-empty string of at most {MAX_STOP_CHARS} characters"
                )
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise SamplingParamsError("grammar must be an engine.constraint.Grammar")
        # Frozen: normalise through object.__setattr__ (list -> tuple, numpy scalars -> Python).
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "seed", None if self.seed is None else int(self.seed))
        object.__setattr__(self, "max_tokens", int(self.max_tokens))
        object.__setattr__(self, "stop", tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Picks token ids from logits for one sequence; owns its `np.random.Generator` and, with a grammar,
    its `Constraint` (advanced by every token it picks)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        self.constraint: Constraint | None = None if params.grammar is None else params.grammar.start()

    def __call__(self, logits: np.ndarray) -> int:
        return self.sample(logits)

    def sample(self, logits: np.ndarray) -> int:
        """logits: (V,) float. Returns the chosen token id."""
        logits = np.asarray(logits).reshape(-1)
        if logits.size == 0:
            raise ValueError("empty logits")
        if np.isnan(logits).any() or not np.isfinite(logits.max()):
            raise KawaiError("the model produced non-finite logits")
        if self.constraint is None:
            return self._pick(logits)
        allowed = self._allowed_ids()  # (A,)
        token = int(allowed[self._pick(logits[allowed])])
        self.constraint.advance(token)
        return token

    def _pick(self, logits: np.ndarray) -> int:
        """Index into logits (C,) of the chosen token."""
        if self.params.greedy:
            return int(np.argmax(logits))
        ids, weights = self._support(logits)
        i = _draw(weights, self._rng.random())
        return i if ids is None else int(ids[i])

    def _allowed_ids(self) -> np.ndarray:
        """(A,) ascending ids the grammar allows next. Sampling runs over these alone: masking the others
        with -inf instead would leave argpartition a vocabulary of ties, its slow case (~100x)."""
        ids = np.flatnonzero(self.constraint.allowed())  # from (V,) bool
        if ids.size == 0:
            raise KawaiError("the grammar allows no next token")
        return ids

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The support set after the grammar, temperature, top-k and top-p: (ids (C,) int64 ascending,
        probs (C,) float64 summing to 1)."""
        logits = np.asarray(logits).reshape(-1)
        allowed = None if self.constraint is None else self._allowed_ids()
        ids, weights = self._support(logits if allowed is None else logits[allowed])
        if ids is None:
            ids = np.arange(weights.size, dtype=np.int64)
        if allowed is not None:
            ids = allowed[ids]
        return ids.astype(np.int64, copy=False), weights / weights.sum(dtype=np.float64)

    def _support(self, logits: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(ids (C,) ascending, or None for the whole vocabulary; unnormalised weights (C,) float32).

        Never sorts the vocabulary: argpartition picks the top-k set; for top-p, tokens too unlikely to
        matter are dropped first (see below) and only values in a small window are sorted."""
        p = self.params
        inv = 1.0 / p.temperature
        if inv > 1e4:  # bounded so that no finite logit overflows float32 (a temperature of 1e-200 is the
            # argmax, not inf - inf = NaN weights); masked logits (-inf) stay -inf
            finite = np.abs(logits[np.isfinite(logits)])
            inv = min(inv, 0.5 * float(np.finfo(np.float32).max) / max(1.0, float(finite.max())))
        scaled = np.multiply(logits, np.float32(inv), dtype=np.float32)  # (V,)
        ids = None
        if 0 < p.top_k < scaled.size:
            ids = np.sort(np.argpartition(scaled, scaled.size - p.top_k)[scaled.size - p.top_k :])  # (k,)
            scaled = scaled[ids]
        # exp in float32 (arguments <= 0: no overflow; 8x faster than float64); sums in float64.
        weights = np.exp(scaled - scaled.max())
        if p.top_p >= 1.0:
            return ids, weights
        total = weights.sum(dtype=np.float64)
        # Tokens below (1 - top_p) / C of the mass hold less than 1 - top_p together, so the top-p set
        # lies within the rest: usually a few hundred tokens instead of the whole vocabulary.
        likely = np.flatnonzero(weights >= 0.5 * (1.0 - p.top_p) * total / weights.size)  # ascending
        keep = likely[_top_p_positions(weights[likely] / total, p.top_p)]
        return (keep if ids is None else ids[keep]), weights[keep]


def _draw(weights: np.ndarray, u: float, block: int = DRAW_BLOCK) -> int:
    """Index i drawn with probability weights[i] / sum(weights), for u uniform in [0, 1).

    Two levels (float64 sums per block of `block`, then a cumulative sum inside one block), which is
    several times faster than one float64 cumulative sum over a 150k vocabulary."""
    starts = np.arange(0, weights.size, block)
    cdf = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))  # (blocks,)
    target = u * cdf[-1]
    b = min(int(np.searchsorted(cdf, target, side="right")), cdf.size - 1)
    inner = np.cumsum(weights[starts[b] : starts[b] + block], dtype=np.float64)
    i = int(np.searchsorted(inner, target - (cdf[b - 1] if b else 0.0), side="right"))
    if i >= inner.size:  # rounding pushed the target past the block: its last token with weight
        i = int(np.flatnonzero(weights[starts[b] : starts[b] + block])[-1])
    return int(starts[b]) + i


def _top_p_positions(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Positions (ascending) of the smallest most-likely set whose mass reaches top_p.

    Only values are partitioned and sorted (no index sorts): the window of the largest probabilities
    grows x8 until it holds top_p of the mass, which gives the probability threshold; positions are then
    picked by comparing with it. Ties at the threshold go to the lowest positions.
    """
    n = probs.size
    window = min(FIRST_TOP_P_WINDOW, n)
    while True:
        top = -np.partition(-probs, window - 1)[:window] if window < n else probs.copy()
        top[::-1].sort()  # descending, in place
        cdf = np.cumsum(top)
        cut = int(np.searchsorted(cdf, top_p, side="left"))  # first index with cdf >= top_p
        if cut < window or window == n:
            n_keep = min(cut + 1, window)
            threshold = top[n_keep - 1]
            above = np.flatnonzero(probs > threshold)
            ties = np.flatnonzero(probs == threshold)[: n_keep - above.size]
            return np.sort(np.concatenate((above, ties)))
        window = min(window * 8, n)
