"""The step loop: every generation runs here — `kawai run` and `kawai chat`, `kawai bench`, and the server
(api/worker.py drives one Scheduler per model from its engine thread; `LLM.generate` is a Scheduler
running one sequence).

    scheduler = Scheduler(llm, lender)          # lender: engine/prefix_cache.py (or OneCache: one cache)
    seq = scheduler.admit(Request(prompt, params))   # None: wait (slots or KV memory are full)
    while scheduler.running:
        for seq, step in scheduler.step():      # step None: that sequence failed (seq.error)
            ...

Each `step()`:
  1. sequences whose `should_stop()` is True end as `cancelled`;
  2. one batch is built: every decoding sequence contributes its pending token(s) (after reserving KV
     memory for them: a sequence that gets none ends as `context_full`), prefilling sequences contribute
     prompt rows up to CHUNK in all, so a long prompt is interleaved with running streams instead of
     stalling them. Image rows go in as embeddings at their M-RoPE positions (engine/vision/image_prompt.py;
     a sequence's images are encoded, timed, before its first chunk);
  3. one `engine.model.forward` call for the whole batch (each weight read once);
  4. each sequence whose prompt is done samples with its own SamplingParams and stop rules
     (engine.generate.SequenceState); its Step is returned; a finished sequence gives its cache back.

Errors are contained per sequence: a sequence whose images, sampling or forward step fails ends alone
(step None, `seq.error` set, its cache dropped); when a batched forward raises, each sequence of the batch
is rerun alone, so only one that fails again ends.

Letters: V = vocabulary size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from kawai.engine.errors import ContextLengthError, KawaiError
from kawai.engine.generate import GenerationStats, Prompt, SequenceState, Step, ThinkingBudget
from kawai.engine.kv_cache import KVCache
from kawai.engine.model import Chunk
from kawai.engine.prefix_cache import Lease
from kawai.engine.sampling import SamplingParams
from kawai.kernels import matmul_amx

if TYPE_CHECKING:
    from kawai.engine.llm import LLM
    from kawai.engine.vision.image_prompt import ImagePrompt

# Prompt rows per step, across all prefilling sequences: bounds activation memory and the time a decode
# token waits behind a long prompt (the server's latency), lets a cancel act between chunks. With AMX
# (kernels/matmul_amx.py) a step also decodes every weight to bfloat16 once, so it takes 4x the rows, in
# about the time 128 take on the vector kernels.
CHUNK = 512 if matmul_amx.AVAILABLE else 128
MAX_SEQUENCES = 4  # sequences run together at most (the server's default)

# forward(chunks, caches) -> per sequence logits (1, V) of its last row; appends to each cache.
ForwardFn = Callable[[list[Chunk], list[KVCache]], list[np.ndarray]]


class CacheLender(Protocol):
    """Where a sequence's KV cache comes from (engine/prefix_cache.py: PrefixCache, OneCache)."""

    def acquire(self, tenant: str | None, prompt: list[int], reuse: bool = True) -> Lease | None: ...

    def reserve(self, lease: Lease, n_positions: int) -> bool: ...

    def publish(self, lease: Lease) -> None: ...

    def release(self, lease: Lease, reusable: bool = True) -> None: ...


def _never() -> bool:
    return False


@dataclass(eq=False)
class Request:
    """What a caller asks for. `tag`: anything the caller wants back with the sequence (api/worker.py: its job)."""

    prompt: Prompt
    params: SamplingParams
    thinking: ThinkingBudget | None = None  # closes the reply's reasoning block after its budget
    tenant: str | None = None  # prefix caches are never shared across tenants
    should_stop: Callable[[], bool] = _never  # polled before every step
    tag: Any = None


@dataclass(eq=False)
class Running:
    """An admitted sequence: its state, its cache lease, the prompt ids still to prefill, its counts."""

    request: Request
    state: SequenceState
    lease: Lease
    stats: GenerationStats
    todo: list[int]  # prompt ids still to run
    image: ImagePrompt | None = None  # encoded before its first prompt chunk
    error: BaseException | None = None  # why it failed (the step that reported it gave None)

    @property
    def cache(self) -> KVCache:
        return self.lease.cache

    @property
    def prefilling(self) -> bool:
        return bool(self.todo)


class Scheduler:
    """Runs up to `max_sequences` sequences of one model, one batched forward per `step()`."""

    def __init__(
        self,
        llm: LLM,
        lender: CacheLender,
        *,
        max_sequences: int = MAX_SEQUENCES,
        chunk: int = CHUNK,
        forward: ForwardFn | None = None,
    ):
        self.llm = llm
        self.lender = lender
        self.max_sequences = max(1, int(max_sequences))
        self.chunk = max(1, int(chunk))
        self.forward = forward or llm.forward_batch
        self.running: list[Running] = []
        self.prompt_tokens_run = 0  # prompt rows run through the model so far (metrics)

    @property
    def has_room(self) -> bool:
        return len(self.running) < self.max_sequences

    # ---- admission ------------------------------------------------------------------------------

    def admit(self, request: Request) -> Running | None:
        """Start a sequence, or None when it must wait (no free slot; the lender has no cache for it yet:
        KV memory full, blocks on their way from disk). KawaiError for a request that can never run."""
        prompt = check_request(self.llm, request)
        if not self.has_room:
            return None
        lease = self.lender.acquire(request.tenant, prompt.ids, reuse=not prompt.images)
        if lease is None:
            return None
        try:
            if len(prompt.ids) > lease.cache.max_seq:
                raise ContextLengthError(
                    f"the prompt has {len(prompt.ids)} tokens, more than the context window of {lease.cache.max_seq}"
                )
            state = SequenceState(prompt, request.params, lease.cache, self.llm.tokenizer, request.thinking)
            todo = state.start()
        except BaseException:
            self.lender.release(lease, reusable=False)
            raise
        stats = GenerationStats(prompt_tokens=len(prompt.ids), cached_tokens=len(prompt.ids) - len(todo),
                                image_tokens=prompt.image_tokens)
        seq = Running(request, state, lease, stats, todo)
        self.running.append(seq)
        return seq

    # ---- one step -------------------------------------------------------------------------------

    def step(self) -> list[tuple[Running, Step | None]]:
        """One batched forward over the running sequences; the Steps it produced, in order (None: that
        sequence failed). Finished and failed sequences have left `running` and given their cache back."""
        events: list[tuple[Running, Step | None]] = []
        for seq in list(self.running):
            if seq.request.should_stop():
                events.append(self._end(seq, seq.state.finish("cancelled")))
        batch: list[tuple[Running, Chunk]] = []
        budget = self.chunk
        for seq in list(self.running):  # a sequence that fails or runs out of KV memory leaves the list
            try:
                chunk = self._next_chunk(seq, budget)
            except Exception as e:  # its images failed to encode: it fails alone
                events.append(self._fail(seq, e))
                continue
            if chunk is None:
                continue
            if seq.prefilling:
                budget -= len(chunk.ids)
            elif not self.lender.reserve(seq.lease, seq.cache.length + len(chunk.ids)):
                events.append(self._end(seq, seq.state.finish("context_full")))  # the KV memory has no block left
                continue
            batch.append((seq, chunk))
        if not batch:
            return events
        t0 = time.perf_counter()
        rows = self._forward(batch, events)  # per sequence logits (1, V), or None: it failed
        seconds = time.perf_counter() - t0
        for (seq, chunk), logits in zip(batch, rows):
            if logits is None:
                continue
            events += self._advance(seq, chunk, logits, seconds)
        return events

    def _next_chunk(self, seq: Running, budget: int) -> Chunk | None:
        """What the sequence feeds the model this step: prompt rows within the budget, or its pending
        token(s); None when the budget is spent."""
        if not seq.prefilling:
            ids = seq.state.pending
            if seq.image is not None:
                return seq.image.decode_chunk(ids, seq.cache.length)
            return Chunk(np.asarray(ids, dtype=np.int64), prompt=False)
        if budget <= 0:
            return None
        prompt = seq.request.prompt
        if prompt.images and seq.image is None:
            seq.image = self.llm.encode_image_prompt(prompt)
            seq.stats.vision_seconds = seq.image.seconds
            seq.stats.prefill_seconds += seq.image.seconds
        ids = seq.todo[:budget]
        if seq.image is not None:
            lo = seq.cache.length
            return seq.image.chunk(ids, lo, lo + len(ids))
        return Chunk(np.asarray(ids, dtype=np.int64))

    def _forward(self, batch: list[tuple[Running, Chunk]], events: list) -> list[np.ndarray | None]:
        """Logits per sequence. If the batched call raises, each sequence runs alone: only one that fails
        again ends (its row None). A failed call stored keys past each cache's length but recorded no ids:
        the rerun overwrites them."""
        try:
            return self.forward([c for _, c in batch], [s.cache for s, _ in batch])
        except Exception as e:
            if len(batch) == 1:
                events.append(self._fail(batch[0][0], e))
                return [None]
        return [self._forward([one], events)[0] for one in batch]

    def _advance(self, seq: Running, chunk: Chunk, logits: np.ndarray, seconds: float) -> list:
        """The sequence's chunk went through the model: count it, sample when its prompt is done."""
        stats = seq.stats
        if seq.prefilling:
            seq.todo = seq.todo[len(chunk.ids):]
            stats.prefill_tokens += len(chunk.ids)
            self.prompt_tokens_run += len(chunk.ids)
            stats.prefill_seconds += seconds
            self.lender.publish(seq.lease)
            if seq.todo:
                return []  # still prefilling: these logits are not needed
        else:
            seq.state.fed()
            stats.decode_seconds += seconds
            stats.decode_steps += 1
        t0 = time.perf_counter()
        try:
            step = seq.state.accept(logits[-1])
        except Exception as e:  # NaN logits, a grammar that allows no next token: this sequence fails
            return [self._fail(seq, e)]
        stats.decode_seconds += time.perf_counter() - t0
        stats.generated_tokens = seq.state.n_generated
        if step.finish_reason is not None:
            return [self._end(seq, step)]
        return [(seq, step)]

    def _end(self, seq: Running, step: Step) -> tuple[Running, Step]:
        """The sequence's last Step: it leaves, its cache goes back for reuse (not an image prompt's)."""
        seq.stats.finish_reason = step.finish_reason
        self._leave(seq, reusable=not seq.request.prompt.images)
        return seq, step

    def _fail(self, seq: Running, error: BaseException) -> tuple[Running, None]:
        seq.error = error
        self._leave(seq, reusable=False)  # its cache's contents are unknown
        return seq, None

    def _leave(self, seq: Running, reusable: bool) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.lender.release(seq.lease, reusable=reusable)

    def abort(self, error: BaseException) -> list[Running]:
        """Fail every running sequence (the caller's loop died); their caches are dropped."""
        out = list(self.running)
        for seq in out:
            self._fail(seq, error)
        return out


def check_request(llm: LLM, request: Request) -> Prompt:
    """The request's prompt, checked before it takes a slot: KawaiError for one that can never run."""
    if not isinstance(request.params, SamplingParams):
        raise TypeError("params must be a SamplingParams")
    prompt = request.prompt
    if not isinstance(prompt, Prompt):
        raise TypeError(f"a request's prompt must be an engine Prompt, got {type(prompt).__name__}")
    if not prompt.ids:
        raise KawaiError("the prompt is empty: nothing to generate from")
    if prompt.images:
        llm.check_image_prompt(prompt)
    return prompt


class Generation:
    """One sequence run by its own Scheduler: iterate to get Steps; `stats` is complete after the last
    one. Validates and admits eagerly (the cache is truncated to what it shares with the prompt), runs
    lazily; an engine error is raised to the iterating caller."""

    def __init__(self, scheduler: Scheduler, request: Request):
        seq = scheduler.admit(request)
        if seq is None:
            raise KawaiError("no KV cache is free for this generation")
        self.scheduler = scheduler
        self.seq = seq
        self.state = seq.state
        self.stats = seq.stats
        self._done = False

    def __iter__(self) -> Iterator[Step]:
        return self

    def __next__(self) -> Step:
        while not self._done:
            for seq, step in self.scheduler.step():
                if seq is not self.seq:
                    continue
                if step is None:
                    self._done = True
                    raise seq.error
                self._done = step.finish_reason is not None
                return step
        raise StopIteration
