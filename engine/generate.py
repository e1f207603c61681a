"""The generation loop: prefill the prompt (minus what the cache already holds), then decode one token
at a time until a stop rule fires.

Letters: V = vocabulary size, T = tokens in one forward call.

Stop rules, checked in this order for every token:
  cancelled      `should_stop()` returned True (checked before each token and between prefill chunks)
  eos            the sampled token is one of the tokenizer's stop ids (its text is not emitted)
  stop_sequence  a stop string completed in the decoded text (text before it is emitted, it is not)
  max_tokens     `params.max_tokens` tokens were sampled
  context_full   the cache cannot take the sampled token

A thinking budget (`ThinkingBudget`) ends a `<think>` block after its number of tokens: the close text
is forced, i.e. fed to the model after the sampled token and shown as part of the output, and the
answer follows. `SequenceState.pending` is what the model reads next: the sampled token, then any forced.

`SequenceState` holds everything one sequence carries between steps (cache, sampler, decoder, stop
matcher, counters). `Generation` drives one of them with one forward call per step; a batching scheduler
can drive many by batching the forward calls instead.

The model writes keys and values into the cache but not token ids, so the loop records the ids next to
them in `cache.tokens` (len == cache.length); the next call on the same cache compares them with its
prompt and prefills only the new part.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kawai.engine.errors import ContextLengthError, KawaiError
from kawai.engine.sampling import Sampler, SamplingParams
from kawai.engine.stop_strings import StopMatcher

FINISH_REASONS = ("eos", "stop_sequence", "max_tokens", "context_full", "cancelled")
PREFILL_CHUNK = 512  # prompt tokens per forward call: bounds activation memory, lets cancel act


class Cache(Protocol):
    """What the loop needs from engine.kv_cache.KVCache."""

    max_seq: int
    length: int

    def truncate(self, n: int) -> None: ...


# forward(token_ids (T,), cache) -> logits of the last position (V,); appends T positions to the cache.
ForwardFn = Callable[[Sequence[int], Cache], np.ndarray]


@dataclass(frozen=True)
class Step:
    """One generated token. `token_id` is None only on a final step that sampled nothing (cancelled)."""

    token_id: int | None
    text: str  # safe to show: whole UTF-8 characters, never a possible stop-string prefix
    finish_reason: str | None = None  # None until the last step, then one of FINISH_REASONS
    stop_sequence: str | None = None  # the matched stop string when finish_reason == "stop_sequence"


@dataclass
class GenerationStats:
    """Counts and timings of one run; complete once the last Step has been yielded."""

    prompt_tokens: int = 0  # len(prompt_ids)
    cached_tokens: int = 0  # prompt tokens already in the cache, not prefilled again
    prefill_tokens: int = 0  # prompt tokens run through the model
    generated_tokens: int = 0  # tokens sampled, a final end-of-sequence token included
    decode_steps: int = 0  # single-token forward calls after prefill
    prefill_seconds: float = 0.0  # prefill forward calls (up to the first token's logits), images included
    decode_seconds: float = 0.0  # decode forward calls and sampling; time spent by the consumer excluded
    finish_reason: str | None = None
    image_tokens: int = 0  # prompt tokens that are image embeddings
    vision_seconds: float = 0.0  # image preprocessing + vision encoder (part of prefill_seconds)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def cached_tokens(cache: Cache) -> list[int]:
    """The token ids a cache holds, as recorded by this loop in `cache.tokens`.

    The model writes keys and values but not ids, so the loop keeps the ids next to them. A cache filled
    by someone else (no `tokens`, or a count that disagrees with `length`) is treated as unknown: [].
    """
    tokens = getattr(cache, "tokens", None)
    if isinstance(tokens, list) and len(tokens) == cache.length:
        return tokens
    return []


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ThinkingBudget:
    """Counts the tokens of a reply's <think> block; `observe` says when the block must be closed.

    Watches the decoded text (a model may spell the tags as one token or several). `start_text` is
    what precedes the reply in the prompt (a template that opens the block, an assistant prefill)."""

    CLOSE = "\n" + THINK_CLOSE + "\n\n"

    def __init__(self, budget: int, start_text: str = ""):
        self.budget = budget
        self.used = 0
        self.done = False
        self._text = ""  # text seen since the block opened (or so far, before it opened)
        self._inside = False
        self._see(start_text)

    def observe(self, text: str) -> bool:
        """One generated token and its text; True when the budget is spent inside the block."""
        if self.done:
            return False
        was_inside = self._inside
        self._see(text)
        if not (was_inside and self._inside):
            return False
        self.used += 1
        if self.used >= self.budget:
            self.done = True
            return True
        return False

    def _see(self, text: str) -> None:
        self._text += text
        if not self._inside:
            head = self._text.lstrip()
            if head.startswith(THINK_OPEN):
                self._inside, self._text = True, head[len(THINK_OPEN):]
            elif head and not THINK_OPEN.startswith(head):
                self.done = True  # the reply began without thinking
        if self._inside and THINK_CLOSE in self._text:
            self._inside, self.done = False, True


class SequenceState:
    """Per-sequence state between steps: the batching seam.

    `start()` keeps what the cache already holds of the prompt and returns the ids still to prefill;
    `fed(ids)` records ids the caller ran through the model into the cache. `accept(logits)` samples the
    next token and applies the stop rules; when the returned Step is not final, `next_token` is the token
    the model must see next. The caller owns the forward calls, so a scheduler can batch them.
    """

    def __init__(
        self, prompt: list[int], params: SamplingParams, cache: Cache, tokenizer,
        thinking: ThinkingBudget | None = None,
    ):
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.thinking = thinking
        self.forced: list[int] = []  # ids the model reads after next_token (a closed think block)
        self.params = params
        self.cache = cache
        self.sampler = Sampler(params)
        self.decoder = tokenizer.incremental_decoder(skip_special=True)  # control tokens never shown
        self.stops = StopMatcher(params.stop)
        self.stop_ids = frozenset(int(t) for t in tokenizer.stop_ids)
        self.n_generated = 0
        self.next_token: int | None = None
        self.finish_reason: str | None = None

    def start(self) -> list[int]:
        """Truncate the cache to its longest common prefix with the prompt; return the rest of the prompt.

        At least the last prompt token is always returned: its logits give the first new token."""
        reuse = min(common_prefix_length(cached_tokens(self.cache), self.prompt), len(self.prompt) - 1)
        self.cache.truncate(reuse)
        self.cache.tokens = self.prompt[:reuse]
        return self.prompt[reuse:]

    def fed(self, ids: Sequence[int]) -> None:
        """Record ids just run through the model (their keys and values are in the cache)."""
        self.cache.tokens.extend(ids)
        self.forced = []

    @property
    def pending(self) -> list[int]:
        """What the model reads next: the sampled token, then any forced ones."""
        return [self.next_token] + self.forced

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, logits: np.ndarray) -> Step:
        """logits: (V,) for the position after the cache's last token."""
        if self.params.max_tokens == 0:  # a pre-warm: the prompt is in the cache, nothing is sampled
            return self.finish("max_tokens")
        token = self.sampler.sample(logits)
        self.n_generated += 1
        if token in self.stop_ids:
            return self.finish("eos", token)
        raw = self.decoder.push(token)
        if self.thinking is not None and self.thinking.observe(raw):
            self.forced = self.tokenizer.encode(ThinkingBudget.CLOSE)
            raw += "".join(self.decoder.push(t) for t in self.forced)
        text, matched = self.stops.push(raw)
        if matched is not None:
            self.finish_reason = "stop_sequence"
            return Step(token, text, "stop_sequence", matched)
        if self.n_generated >= self.params.max_tokens:
            return self.finish("max_tokens", token, text)
        if self.cache.length + 1 + len(self.forced) > self.cache.max_seq:
            return self.finish("context_full", token, text)
        self.next_token = token
        return Step(token, text)

    def finish(self, reason: str, token: int | None = None, text: str = "") -> Step:
        """End the sequence: release the text the stop matcher holds back.

        Bytes the decoder still holds are an incomplete UTF-8 character cut off by the end (max_tokens,
        cancel, end of turn); they are dropped rather than shown as U+FFFD."""
        self.decoder.flush()
        tail = self.stops.flush()
        self.finish_reason = reason
        self.next_token = None
        return Step(token, text + tail, reason)


class Generation:
    """Iterate to get Steps; `stats` is complete after the last one. Validates eagerly, runs lazily.

    The cache may already hold tokens (from an earlier turn): the longest common prefix with prompt_ids
    is kept and only the rest is prefilled. At least one prompt token is always run, for its logits.
    """

    def __init__(
        self,
        forward: ForwardFn,
        tokenizer,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cache: Cache,
        should_stop: Callable[[], bool] | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
    ):
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise KawaiError("the prompt is empty: nothing to generate from")
        if len(prompt) > cache.max_seq:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens, more than the context window of {cache.max_seq}"
            )
        self.forward = forward
        self.should_stop = should_stop or (lambda: False)
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.state = SequenceState(prompt, params, cache, tokenizer)
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self._steps = self._run()

    def __iter__(self) -> Iterator[Step]:
        return self

    def __next__(self) -> Step:
        return next(self._steps)

    def _run(self) -> Iterator[Step]:
        state, stats = self.state, self.stats
        cache = state.cache
        todo = state.start()
        stats.cached_tokens = len(state.prompt) - len(todo)

        logits = None
        for start in range(0, len(todo), self.prefill_chunk):
            if self.should_stop():
                yield self._done(state.finish("cancelled"))
                return
            chunk = todo[start : start + self.prefill_chunk]
            t0 = time.perf_counter()
            logits = self.forward(chunk, cache)
            state.fed(chunk)
            stats.prefill_seconds += time.perf_counter() - t0
            stats.prefill_tokens += len(chunk)

        while True:
            if self.should_stop():
                yield self._done(state.finish("cancelled"))
                return
            t0 = time.perf_counter()
            step = state.accept(logits)
            stats.decode_seconds += time.perf_counter() - t0
            stats.generated_tokens = state.n_generated
            if step.finish_reason is not None:
                yield self._done(step)
                return
            yield step
            t0 = time.perf_counter()
            ids = state.pending
            logits = self.forward(ids, cache)
            state.fed(ids)
            stats.decode_seconds += time.perf_counter() - t0
            stats.decode_steps += 1

    def _done(self, step: Step) -> Step:
        self.stats.finish_reason = step.finish_reason
        return step
