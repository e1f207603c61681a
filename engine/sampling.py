"""Per-request sampling: `SamplingParams` (frozen, validated) and `Sampler` (owns its random generator).

Letters: V = vocabulary size, C = number of candidate tokens kept by top-k / top-p.

Order of the filters (the Hugging Face order): logits / temperature -> top-k -> top-p over the
renormalised top-k distribution -> one draw. `temperature == 0` means greedy (argmax, ties to the lowest
id) and ignores the other filters and the seed. Nothing here touches NumPy's global random state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.errors import KawaiError

MAX_TEMPERATURE = 2.0
MAX_STOP_SEQUENCES = 64
MAX_STOP_CHARS = 1024
MAX_SEED = (1 << 64) - 1
FIRST_TOP_P_WINDOW = 64  # candidates examined first for top-p; grows x8 until the mass is reached


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
    max_tokens: most tokens to generate (>= 1).
    stop: strings that end generation; the matched one is not emitted.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()

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
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise SamplingParamsError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
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
    """Picks token ids from logits for one sequence; owns its `np.random.Generator`."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        return self.sample(logits)

    def sample(self, logits: np.ndarray) -> int:
        """logits: (V,) float. Returns the chosen token id."""
        logits = np.asarray(logits).reshape(-1)
        if logits.size == 0:
            raise ValueError("empty logits")
        if np.isnan(logits).any() or not np.isfinite(logits.max()):
            raise KawaiError("the model produced non-finite logits")
        if self.params.greedy:
            return int(np.argmax(logits))
        ids, probs = self.candidates(logits)
        # One uniform draw against the cumulative mass of the candidates.
        cdf = np.cumsum(probs)
        i = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
        return int(ids[min(i, len(ids) - 1)])

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The support set after temperature, top-k and top-p.

        Returns (ids (C,) int64 ascending, probs (C,) float64 summing to 1). Never sorts the whole
        vocabulary: argpartition picks the top-k set and the top-p window.
        """
        p = self.params
        scaled = np.asarray(logits, dtype=np.float32).reshape(-1) / np.float32(p.temperature)  # (V,)
        n_vocab = scaled.size
        if 0 < p.top_k < n_vocab:
            ids = np.sort(np.argpartition(-scaled, p.top_k - 1)[: p.top_k])  # (k,)
            scaled = scaled[ids]
        else:
            ids = np.arange(n_vocab)
        # exp in float32 (arguments <= 0, so no overflow; 8x faster than float64), sums in float64.
        weights = np.exp(scaled - scaled.max())
        probs = weights / weights.sum(dtype=np.float64)  # (C,) float64
        if p.top_p < 1.0:
            keep = _top_p_positions(probs, p.top_p)
            ids, probs = ids[keep], probs[keep] / probs[keep].sum()
        return ids.astype(np.int64, copy=False), probs


def _top_p_positions(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Positions (ascending) of the smallest most-likely set whose mass reaches top_p.

    Looks at a window of the most likely entries (argpartition), widening it x8 until the window holds
    the mass; only the window is sorted. Ties: probability descending, then position ascending.
    """
    n = probs.size
    window = min(FIRST_TOP_P_WINDOW, n)
    while True:
        top = np.argpartition(-probs, window - 1)[:window] if window < n else np.arange(n)
        top = np.sort(top)
        top = top[np.argsort(-probs[top], kind="stable")]  # most likely first, ties by position
        cdf = np.cumsum(probs[top])
        cut = int(np.searchsorted(cdf, top_p, side="left"))  # first index with cdf >= top_p
        if cut < window or window == n:
            return np.sort(top[: min(cut + 1, window)])
        window = min(window * 8, n)
