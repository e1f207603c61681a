"""One sequence's generation state: its prompt, its sampler and stop rules, its counters. The step loop
that drives many of them at once (prefill chunks, decode tokens, one forward per step) is
engine/scheduler.py; `LLM.generate` is that loop running one sequence.

Letters: V = vocabulary size.

Stop rules, checked in this order for every token:
  cancelled      `should_stop()` returned True (checked before each token and between prefill chunks)
  eos            the sampled token is one of the tokenizer's stop ids (its text is not emitted)
  stop_sequence  a stop string completed in the decoded text (text before it is emitted, it is not)
  max_tokens     `params.max_tokens` tokens were sampled
  context_full   the cache cannot take the sampled token

A thinking budget (`ThinkingBudget`) ends a reasoning block after its number of tokens: the close text
is forced, i.e. fed to the model after the sampled token and shown as part of the output, and the
answer follows. `SequenceState.pending` is what the model reads next: the sampled token, then any forced.

`SequenceState` holds everything one sequence carries between steps (cache, sampler, decoder, stop
matcher, counters). The cache records the ids of the positions it holds (`KVCache.tokens`), so a new
prompt on a used cache (a conversation's next turn) keeps their common prefix and prefills the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kawai.engine.chat_format import ChatFormat
from kawai.engine.errors import KawaiError
from kawai.engine.kv_cache import KVCache
from kawai.engine.sampling import Sampler, SamplingParams
from kawai.engine.stop_strings import StopMatcher

FINISH_REASONS = ("eos", "stop_sequence", "max_tokens", "context_full", "cancelled")


@dataclass(frozen=True)
class Prompt:
    """What a sequence starts from: token ids, and for a prompt with images the images its image rows
    (`image_pad` ids, one per image token, engine/vision/) stand for, in order. `text` is the rendered
    prompt when it came from a chat template (LLM.encode_chat)."""

    ids: list[int]
    images: tuple = ()  # PIL images, in prompt order
    text: str = ""
    image_pad: int | None = None  # the id of image rows when there are images

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def image_tokens(self) -> int:
        return self.ids.count(self.image_pad) if self.images else 0

    @property
    def reusable(self) -> int:
        """Leading ids a cache may share with another conversation: those before the first image row
        (image rows of different images have the same id)."""
        return self.ids.index(self.image_pad) if self.images else len(self.ids)


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


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ThinkingBudget:
    """Counts the tokens of a reply's reasoning block; `observe` says when the block must be closed.

    The block's tags come from the model's chat format (engine/chat_format.py: `<think>`/`</think>` for
    Qwen3). Watches the decoded text (a model may spell the tags as one token or several). `start_text` is
    what precedes the reply in the prompt (a template that opens the block, an assistant prefill).
    `close_text` is what the loop forces when the budget is spent."""

    def __init__(self, budget: int, chat_format: ChatFormat, start_text: str = ""):
        if chat_format.think_open is None or chat_format.think_close is None:
            raise KawaiError(f"the {chat_format.name} chat format has no reasoning block to budget")
        self.budget = budget
        self.open, self.close = chat_format.think_open, chat_format.think_close
        self.close_text = chat_format.forced_think_close
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
            if head.startswith(self.open):
                self._inside, self._text = True, head[len(self.open):]
            elif head and not self.open.startswith(head):
                self.done = True  # the reply began without thinking
        if self._inside and self.close in self._text:
            self._inside, self.done = False, True


class SequenceState:
    """Per-sequence state between steps: the batching seam.

    `start()` keeps what the cache already holds of the prompt and returns the ids still to prefill;
    `fed()` says the caller ran `pending` through the model (the cache recorded their ids).
    `accept(logits)` samples the next token and applies the stop rules; when the returned Step is not
    final, `pending` is what the model must see next. The caller (engine/scheduler.py) owns the forward
    calls, so it can batch them.
    """

    def __init__(
        self, prompt: Prompt, params: SamplingParams, cache: KVCache, tokenizer,
        thinking: ThinkingBudget | None = None,
    ):
        self.prompt = prompt.ids
        self.reusable = prompt.reusable  # leading prompt ids a used cache may already hold
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

        At least the last prompt token is always returned: its logits give the first new token. A
        prompt with images shares at most its text before the first image."""
        reuse = min(common_prefix_length(self.cache.tokens, self.prompt), self.reusable, len(self.prompt) - 1)
        self.cache.truncate(reuse)
        return self.prompt[reuse:]

    def fed(self) -> None:
        """`pending` went through the model: the forced ids are in the cache now."""
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
        if token in self.stop_ids and not self.params.ignore_eos:
            return self.finish("eos", token)
        raw = self.decoder.push(token)
        if self.thinking is not None and self.thinking.observe(raw):
            self.forced = self.tokenizer.encode(self.thinking.close_text)
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
