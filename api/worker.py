"""The engine thread: a continuous-batching scheduler, one per loaded model. Generation never runs on the
event loop.

`submit(job)` never waits. A job starts at once when fewer than `max_sequences` run, else it waits in a
bounded queue; past `max_sequences + queue_size` it is refused with 529. While draining (SIGTERM) new jobs
get 503. (The per-token limit on requests in flight, 429, is api/limits.py's InFlightLimit: it counts a
request from its first byte, across models.)

Each loop iteration: drop cancelled waiting jobs, admit waiting jobs in order while the scheduler has a
free slot and the prefix cache (engine/prefix_cache.py) lends each a KV cache (a job whose blocks are being
read from disk waits for them), then one `engine.scheduler.Scheduler.step()`: one batched forward over
every running sequence, prompt chunks next to decode tokens (docs/engine.md walks it). The Steps it
returns go to their jobs' `StepChannel`s; this module adds the HTTP side: queue bounds, metrics, the
access log.

A Job carries the StepChannel (thread-safe, via `loop.call_soon_threadsafe`) and a `cancel` event. The
first item of a channel is `Started` (the prefix-cache hit, once admitted), the last `Finished` (counts)
or `Failed`. `alive` is False when the thread died or its
heartbeat (refreshed every step and every idle second) is older than `wedge_seconds`.

One bad request never hurts another (docs/security.md):
  - errors are contained per sequence by the scheduler: a sequence whose admission, images, sampling or
    forward step raises (the sampler raises on NaN/Inf logits) ends alone with `Failed`;
  - a supervisor (`_run`) restarts the loop when anything else escapes it: the running sequences end
    with `Failed` (their state is unknown), the waiting jobs stay queued, `alive` stays True.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from kawai.api.errors import OverloadedError, UnavailableError
from kawai.api.metrics import TPOT_BUCKETS, TTFT_BUCKETS, Metrics
from kawai.engine.errors import KawaiError
from kawai.engine.generate import Prompt, Step, ThinkingBudget
from kawai.engine.sampling import SamplingParams
from kawai.engine.scheduler import CHUNK, MAX_SEQUENCES, Request, Running
from kawai.engine.served import ServedModel

log = logging.getLogger("kawai.worker")
access_log = logging.getLogger("kawai.access")

IDLE_TICK = 0.5  # seconds between heartbeats when idle
WEDGE_SECONDS = 60.0
DEFAULT_KV_MEMORY_FRACTION = 0.5  # of physical memory, per model, when no KV memory budget is given
RESTART_BACKOFF = (0.05, 2.0)  # seconds before restarting a loop that died: first, doubling up to the last


@dataclass(frozen=True)
class Started:
    """First item of a channel: the job has a sequence slot; `cached_tokens` of its prompt come from
    the prefix cache (so `message_start` reports the same usage split as the end of the reply)."""

    cached_tokens: int


@dataclass(frozen=True)
class Finished:
    """Last item of a channel: the generation's counts."""

    prompt_tokens: int
    cached_tokens: int  # prompt tokens read from the prefix cache
    generated_tokens: int
    created_tokens: int = 0  # prompt tokens this request added to the prefix cache


@dataclass(frozen=True)
class Failed:
    """Last item of a channel when the engine raised; the error is logged, not sent."""


class StepChannel:
    """Engine thread -> event loop. `put` from any thread; `get` on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> bool:
        """False if the loop is gone (server shutting down)."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            return True
        except RuntimeError:
            return False

    async def get(self, timeout: float | None = None):
        """The next item, or None after `timeout` seconds without one."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None


@dataclass
class Job:
    prompt: Prompt | list[int]  # from LLM.encode_chat; plain ids are wrapped
    params: SamplingParams
    channel: StepChannel
    request_id: str
    tenant: str | None = None  # API token id; prefix caches are never shared across tenants
    thinking: ThinkingBudget | None = None  # closes the reply's reasoning block after its budget
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float = 0.0

    def __post_init__(self):
        if not isinstance(self.prompt, Prompt):
            self.prompt = Prompt([int(t) for t in self.prompt])


class Worker:
    def __init__(
        self,
        llm: ServedModel,
        queue_size: int,
        *,
        max_sequences: int = MAX_SEQUENCES,
        kv_memory: int | None = None,
        kv_dir=None,
        kv_disk: int | None = None,
        prefill_chunk: int = CHUNK,
        metrics: Metrics | None = None,
        wedge_seconds: float = WEDGE_SECONDS,
    ):
        """kv_memory: bytes of KV memory (running sequences and the prefix cache); default: two full
        contexts per sequence (one running, one kept for its conversation's next turn), within
        DEFAULT_KV_MEMORY_FRACTION of the memory, at least one. kv_dir, kv_disk: the disk tier's
        directory and size bound (none without both)."""
        self.llm = llm
        self.queue_size = max(0, queue_size)
        if kv_memory is None:
            context = llm.kv_bytes()
            kv_memory = max(context, min(2 * max_sequences * context, default_kv_memory()))
        try:
            self.pool = llm.prefix_cache(kv_memory, disk_dir=kv_dir, disk_bytes=kv_disk, on_ready=self._wake)
        except KawaiError as e:
            raise KawaiError(f"{e} (raise --kv-memory or lower --ctx)") from None
        self.max_sequences = max(1, max_sequences)
        self.scheduler = llm.scheduler(self.pool, max_sequences=self.max_sequences, chunk=prefill_chunk)
        self.metrics = metrics or Metrics()
        self.wedge_seconds = wedge_seconds
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Running] = []  # the scheduler's running sequences, read under the lock
        self._pending = 0  # jobs accepted and not yet finished
        self._admitting = True
        self._stopping = False
        self._woken = False  # a disk look-up ended since the engine last checked
        self._heartbeat = time.monotonic()
        self.restarts = 0  # times the supervisor restarted a loop that died
        self._thread = threading.Thread(target=self._run, name=f"engine-{llm.id}", daemon=True)

    # ---- the event loop's side ------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and time.monotonic() - self._heartbeat < self.wedge_seconds

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._pending > 0

    @property
    def queue_length(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def active_sequences(self) -> int:
        with self._cond:
            return len(self._active)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise at once: 529 engine stopped or full, 503 draining."""
        with self._cond:
            if not self.alive:
                raise OverloadedError("The engine is not running.")
            if not self._admitting:
                raise UnavailableError("The server is shutting down; retry on another instance or later.")
            if not self.pool.fits(len(job.prompt.ids)):
                raise OverloadedError(
                    f"Overloaded: a prompt of {len(job.prompt.ids)} tokens does not fit the KV memory of model "
                    f"{self.llm.id!r}."
                )
            if self._pending >= self.max_sequences + self.queue_size:
                raise OverloadedError(
                    f"Overloaded: {self.max_sequences} sequences are running and {len(self._waiting)} requests "
                    f"are waiting for model {self.llm.id!r}. Retry later."
                )
            self._waiting.append(job)
            self._pending += 1
            self._cond.notify()

    def stop_admitting(self) -> None:
        """Drain: refuse new jobs (503), let the running and waiting ones finish."""
        with self._cond:
            self._admitting = False

    def stop(self, timeout: float) -> None:
        """Cancel every job (each ends within one step) and end the thread, waiting up to `timeout` s."""
        with self._cond:
            self._admitting = False
            self._stopping = True
            for job in self._waiting:
                job.cancel.set()
            for seq in self._active:
                seq.request.tag.cancel.set()
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.pool.close(timeout)

    def _wake(self) -> None:
        """A disk look-up ended: the job waiting for it may start."""
        with self._cond:
            self._woken = True
            self._cond.notify()

    # ---- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        """The supervisor: run the loop; when it dies, fail the running sequences and restart it."""
        self.llm.use_threads()
        backoff = RESTART_BACKOFF[0]
        try:
            while True:
                started = time.monotonic()
                try:
                    self._loop()
                    return  # stopping, nothing left
                except Exception:
                    log.exception("engine loop for %s died; restarting it in %.2f s", self.llm.id, backoff)
                    self.restarts += 1
                    self._fail_active()
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, backoff)
                healthy_for = time.monotonic() - started
                backoff = RESTART_BACKOFF[0] if healthy_for > 60 else min(2 * backoff, RESTART_BACKOFF[1])
        finally:
            self._fail_everything()

    def _loop(self) -> None:
        while self._wait_for_work():
            self._drop_cancelled()
            self._admit()
            if self.scheduler.running:
                self._step()
            else:
                self._wait_for_admission()

    def _wait_for_work(self) -> bool:
        """Block (with heartbeats) until a job waits or runs; False once stopping with nothing left. An idle
        engine holds no kernel worker threads: another model's engine thread runs faster without them."""
        idle = False
        with self._cond:
            while True:
                self._heartbeat = time.monotonic()
                if self._active or self._waiting:
                    return True
                if self._stopping:
                    return False
                if not idle:
                    idle = True
                    self.llm.release_threads()
                self._cond.wait(min(IDLE_TICK, self.wedge_seconds / 4))

    def _wait_for_admission(self) -> None:
        """Nothing runs and the next job waits (its blocks are being read from disk): sleep until woken."""
        with self._cond:
            if self._waiting and not self._stopping and not self._woken:
                self._cond.wait(min(IDLE_TICK, self.wedge_seconds / 4))
            self._woken = False

    def _drop_cancelled(self) -> None:
        """Waiting jobs whose client left end here; running ones end in the scheduler's next step."""
        with self._cond:
            gone = [job for job in self._waiting if job.cancel.is_set()]
            for job in gone:
                self._waiting.remove(job)
        for job in gone:
            self._fail_job(job)

    def _admit(self) -> None:
        """Start waiting jobs in order while the scheduler takes them (a free slot, a KV cache lent)."""
        while self.scheduler.has_room:
            with self._cond:
                if not self._waiting:
                    return
                job = self._waiting[0]
            request = Request(job.prompt, job.params, job.thinking, job.tenant, job.cancel.is_set, tag=job)
            try:
                seq = self.scheduler.admit(request)
            except Exception:
                log.exception("request %s: could not start", job.request_id)
                with self._cond:
                    self._waiting.popleft()
                self._fail_job(job)
                continue
            if seq is None:
                return  # memory is full or its blocks are on their way from disk: it stays first in line
            with self._cond:
                self._waiting.popleft()
                self._active = list(self.scheduler.running)
            self._count("kawai_prefix_cache_hit_tokens_total", "Prompt tokens reused from the prefix cache.",
                        seq.stats.cached_tokens)
            job.channel.put(Started(seq.stats.cached_tokens))  # an image prompt's cache starts empty: 0

    def _step(self) -> None:
        prefilled = self.scheduler.prompt_tokens_run
        events = self.scheduler.step()
        self._heartbeat = time.monotonic()
        self._count("kawai_prompt_tokens_total", "Prompt tokens run through the model.",
                    self.scheduler.prompt_tokens_run - prefilled)
        for seq, step in events:
            if step is None:
                log.error("request %s: generation failed", seq.request.tag.request_id, exc_info=seq.error)
                self._retire(seq, Failed())
            else:
                self._emit(seq, step)

    def _emit(self, seq: Running, step: Step) -> None:
        job: Job = seq.request.tag
        now = time.monotonic()
        if step.token_id is not None:
            if job.first_token_at is None:
                job.first_token_at = now
                self._observe("kawai_time_to_first_token_seconds", "Request queued -> first token.",
                              now - job.submitted_at, TTFT_BUCKETS)
            else:
                self._observe("kawai_time_per_output_token_seconds", "Time between a stream's tokens.",
                              now - job.last_token_at, TPOT_BUCKETS)
            job.last_token_at = now
            self._count("kawai_generated_tokens_total", "Tokens sampled.", 1)
        if not job.channel.put(step):
            job.cancel.set()
        if step.finish_reason is not None:
            stats = seq.stats
            done = Finished(stats.prompt_tokens, stats.cached_tokens, stats.generated_tokens, seq.lease.created)
            self._access_log(job, done, step.finish_reason, now)  # before the client can see the end
            self._retire(seq, done)

    def _retire(self, seq: Running, last) -> None:
        """The scheduler has freed the sequence's slot and cache: update the counts, then send its last
        item (so a client that sees the end also sees the slot free in /metrics)."""
        with self._cond:
            self._active = list(self.scheduler.running)
        self._done(seq.request.tag)
        seq.request.tag.channel.put(last)

    def _done(self, job: Job) -> None:
        with self._cond:
            self._pending -= 1

    def _fail_job(self, job: Job) -> None:
        """A job that never became a sequence ends with Failed."""
        self._done(job)
        job.channel.put(Failed())

    def _fail_active(self) -> None:
        """The loop died: every running sequence ends with Failed; its cache is dropped, not reused."""
        try:
            failed = self.scheduler.abort(RuntimeError("the engine loop died"))
        except Exception:  # their leases are lost; the slots must not be
            log.exception("running sequences could not be released")
            failed = list(self.scheduler.running)
            self.scheduler.running.clear()
        with self._cond:
            self._active = []
        for seq in failed:
            self._fail_job(seq.request.tag)

    def _fail_everything(self) -> None:
        """The thread is ending: every job still here gets Failed."""
        with self._cond:
            jobs = list(self._waiting) + [s.request.tag for s in self._active]
            self._waiting.clear()
            self._active.clear()
        for job in jobs:
            job.channel.put(Failed())
            self._done(job)

    # ---- observability ------------------------------------------------------------------------

    def _count(self, name: str, help_text: str, value: float) -> None:
        if value:
            self.metrics.inc(name, help_text, value, model=self.llm.id)

    def _observe(self, name: str, help_text: str, value: float, buckets) -> None:
        self.metrics.observe(name, help_text, value, buckets, model=self.llm.id)

    def _access_log(self, job: Job, done: Finished, finish_reason: str, now: float) -> None:
        ttft = (job.first_token_at or now) - job.submitted_at
        access_log.info(
            "generation request_id=%s token_id=%s model=%s input_tokens=%d cached_tokens=%d created_tokens=%d "
            "output_tokens=%d finish=%s ttft_s=%.3f total_s=%.3f",
            job.request_id, job.tenant or "-", self.llm.id,
            done.prompt_tokens - done.cached_tokens - done.created_tokens, done.cached_tokens,
            done.created_tokens, done.generated_tokens, finish_reason, ttft, now - job.submitted_at,
        )

    def gauges(self):
        """(name, labels, value, help) for /metrics."""
        labels = (("model", self.llm.id),)
        pool = self.pool.stats()
        yield "kawai_queue_length", labels, self.queue_length, "Requests waiting for a sequence slot."
        yield "kawai_active_sequences", labels, self.active_sequences, "Sequences being prefilled or decoded."
        yield "kawai_max_sequences", labels, self.max_sequences, "Sequences run together at most."
        yield "kawai_prefix_cache_leased", labels, pool.leased, "KV caches used by running sequences."
        yield "kawai_prefix_cache_idle_tokens", labels, pool.idle_tokens, "Tokens held by reusable KV caches."
        yield "kawai_prefix_cache_blocks", labels, pool.blocks, "Prompt blocks findable in KV memory."
        yield "kawai_prefix_cache_shared_tokens", labels, pool.shared_tokens, \
            "Positions running sequences read in place from another cache (held once)."
        yield "kawai_kv_memory_bytes", labels, pool.used_bytes, "KV memory accounted to caches (whole blocks)."
        yield "kawai_kv_memory_budget_bytes", labels, pool.budget_bytes, "KV memory bound (--kv-memory)."
        if self.pool.disk is not None:
            yield "kawai_kv_disk_bytes", labels, self.pool.disk.stats().bytes, "Bytes of KV block files on disk."
        yield "kawai_engine_up", labels, int(self.alive), "1 while the engine thread runs and beats."

    def counters(self):
        """(name, labels, value, help) of the prefix cache's running totals, for /metrics."""
        labels = (("model", self.llm.id),)
        pool = self.pool.stats()
        yield "kawai_kv_memory_hit_tokens_total", labels, pool.memory_hit_tokens, "Prompt tokens reused from KV memory."
        yield "kawai_kv_disk_hit_tokens_total", labels, pool.disk_hit_tokens, "Prompt tokens reused from disk blocks."
        yield "kawai_kv_created_tokens_total", labels, pool.created_tokens, "Prompt tokens newly cached."
        yield "kawai_kv_evictions_total", labels, pool.evictions, "Idle KV caches evicted for memory."
        if self.pool.disk is not None:
            disk = self.pool.disk.stats()
            yield "kawai_kv_disk_read_bytes_total", labels, disk.read_bytes, "Bytes of KV blocks read from disk."
            yield "kawai_kv_disk_load_seconds_total", labels, disk.load_seconds, "Seconds reading and verifying them."
            yield "kawai_kv_disk_written_bytes_total", labels, disk.written_bytes, "Bytes of KV blocks written."
            yield "kawai_kv_disk_rejected_files_total", labels, disk.rejected_files, "Bad block files deleted."
            yield "kawai_kv_disk_dropped_writes_total", labels, disk.dropped_writes, "Blocks not written (backlog)."
            yield "kawai_kv_disk_evicted_files_total", labels, disk.evicted_files, "Block files removed for --kv-disk."


def default_kv_memory() -> int:
    """The KV budget of a model when none is given: a fraction of physical memory. Pages of a cache are
    committed as positions are written, so this bounds the worst case (every slot full), not the start."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * DEFAULT_KV_MEMORY_FRACTION)


def parse_bytes(text: str) -> int:
    """'2GB', '512MiB', '1.5G', '1000000' -> bytes (K/M/G/T are powers of 1024, as memory is)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 2GB or 512MB)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def format_bytes(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"
