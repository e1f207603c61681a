"""The engine thread: generation runs here, never on the event loop.

One `Worker` per loaded model owns a daemon thread and a bounded queue of `Job`s. `submit` never waits:
a full queue raises `OverloadedError` (529) at once. Each Job carries a `StepChannel` the thread pushes
Steps into (thread-safe, via `loop.call_soon_threadsafe`) and a `cancel` event the engine polls through
`should_stop` before every token, so a client that goes away stops its generation within one token.

Prefix reuse: the worker keeps one KV cache. A job reuses the cached prefix only when it comes from the
same tenant (API token id) as the previous job; otherwise the cache is emptied first, so one tenant
cannot probe another's prompts through time-to-first-token.

Batching seam: `_run` takes one job at a time; a batching scheduler would drain several jobs here and
drive their `engine.generate.SequenceState`s with batched forward calls, using the same Job/StepChannel.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

from api.errors import OverloadedError
from engine.sampling import SamplingParams

log = logging.getLogger("kawai.worker")

_STOP = object()  # sentinel that ends the thread


@dataclass(frozen=True)
class Finished:
    """Last item of a channel: the generation's counts."""

    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int


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
    prompt_ids: list[int]
    params: SamplingParams
    channel: StepChannel
    request_id: str
    tenant: str | None = None  # API token id; prefix caches are never shared across tenants
    cancel: threading.Event = field(default_factory=threading.Event)


class Worker:
    def __init__(self, llm, queue_size: int):
        self.llm = llm
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._thread = threading.Thread(target=self._run, name=f"engine-{llm.id}", daemon=True)
        self._cache = None
        self._cache_tenant: str | None = None
        self._lock = threading.Lock()
        self._pending = 0  # jobs accepted and not yet finished (queued or running)
        self._current: Job | None = None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._pending > 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if not self.alive:
            raise OverloadedError("The engine is not running.")
        try:
            with self._lock:
                self._queue.put_nowait(job)
                self._pending += 1
        except queue.Full:
            raise OverloadedError(
                f"Overloaded: {self._queue.maxsize} requests are already waiting for model {self.llm.id!r}. "
                "Retry later."
            ) from None

    def stop(self, timeout: float) -> None:
        """Cancel the running job (it ends after its current token) and the waiting ones; end the thread."""
        current = self._current
        if current is not None:
            current.cancel.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                job.cancel.set()
                job.channel.put(Failed())
                self._done()
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def _run(self) -> None:
        _use_engine_threads(self.llm)
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            self._current = job
            try:
                if job.cancel.is_set():  # the client left while it waited
                    job.channel.put(Failed())
                else:
                    self._generate(job)
            finally:
                self._current = None
                self._done()

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1

    def _generate(self, job: Job) -> None:
        try:
            cache = self._cache_for(job.tenant)
            gen = self.llm.generate(job.prompt_ids, job.params, cache=cache, should_stop=job.cancel.is_set)
            for step in gen:
                if not job.channel.put(step):
                    job.cancel.set()
            stats = gen.stats
            job.channel.put(Finished(stats.prompt_tokens, stats.cached_tokens, stats.generated_tokens))
        except Exception:
            log.exception("request %s: generation failed", job.request_id)
            self._cache = None  # its contents are unknown now
            job.channel.put(Failed())

    def _cache_for(self, tenant: str | None):
        if self._cache is None:
            self._cache = self.llm.new_cache()
        elif tenant != self._cache_tenant:
            self._cache.truncate(0)
            self._cache.tokens = []
        self._cache_tenant = tenant
        return self._cache


def _use_engine_threads(llm) -> None:
    """Numba's thread count is per calling thread: apply the one chosen at load time to this thread."""
    n = getattr(llm, "threads", None)
    if n:
        from kernels.threads import configure_threads

        configure_threads(n)
